"""Time of each explanation-quality metric per batch, as a ratio to the bare model calls it
needs (forward passes of its perturbed inputs, or explainer calls, timed alone in the same run:
the limit), and four metrics as a ratio to Quantus at equal values.

    PYTHONPATH=. python benchmarks/metrics.py [--n 64] [--steps 64] [--device cpu|cuda] [--repeats 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from xai_callbacks.attribution import explain
from xai_callbacks.data import make_shortcut_digits
from xai_callbacks.infill import ConstantInfiller
from xai_callbacks.metrics import (complexity, deletion_auc, faithfulness_correlation, infidelity,
                                   insertion_auc, local_lipschitz_estimate, max_sensitivity,
                                   model_parameter_randomisation, pixel_flipping, pointing_game, random_logit,
                                   region_perturbation, relevance_mass, relevance_rank, sparseness)
from xai_callbacks.metrics.randomisation import parameter_layers
from xai_callbacks.models import DemoCNN


def timed(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def forwards(model, x, n_inputs, batch_size):
    """The limit of a perturbation metric: n_inputs forward passes in batches, inputs prebuilt."""
    inputs = x[torch.arange(n_inputs, device=x.device) % len(x)]
    if inputs.dim() == 4 and inputs.device.type == "cpu":   # the layout score_perturbed gives images on the CPU
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for s in range(0, n_inputs, batch_size):
            model(inputs[s:s + batch_size]).softmax(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-quantus", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    _, val = make_shortcut_digits()
    x, y, masks = val.x[:a.n].to(a.device), val.targets[:a.n].to(a.device), val.object_mask[:a.n].to(a.device)
    model = DemoCNN().to(a.device).eval()
    r = explain(model, x, y, method="saliency")
    n, st, bs, rep = a.n, a.steps, a.batch_size, a.repeats
    fill = ConstantInfiller(0.0)
    fc_runs, fc_size, ms_samples = 100, 128, 10
    t_explain, _ = timed(lambda: explain(model, x, y, method="saliency", batch_size=bs), rep)
    cases = [  # name, metric call, limit call
        ("pixel_flipping", lambda: pixel_flipping(model, x, y, r, n_steps=st, infiller=fill, batch_size=bs),
         lambda: forwards(model, x, n * (st + 1), bs)),
        ("region_perturbation", lambda: region_perturbation(model, x, y, r, patch_size=4, infiller=fill,
                                                            batch_size=bs),
         lambda: forwards(model, x, n * 65, bs)),
        ("insertion_auc", lambda: insertion_auc(model, x, y, r, n_steps=st, batch_size=bs),
         lambda: forwards(model, x, n * (st + 1), bs)),
        ("deletion_auc", lambda: deletion_auc(model, x, y, r, n_steps=st, batch_size=bs),
         lambda: forwards(model, x, n * (st + 1), bs)),
        ("faithfulness_correlation", lambda: faithfulness_correlation(model, x, y, r, n_runs=fc_runs,
                                                                      subset_size=fc_size, batch_size=bs),
         lambda: forwards(model, x, n * (fc_runs + 1), bs)),
        ("infidelity", lambda: infidelity(model, x, y, r, n_samples=32, batch_size=bs),
         lambda: forwards(model, x, n * 33, bs)),
        ("max_sensitivity", lambda: max_sensitivity(model, x, y, r, method="saliency", n_samples=ms_samples,
                                                    batch_size=bs),
         lambda: explain(model, x.repeat(ms_samples, 1, 1, 1), y.repeat(ms_samples), method="saliency",
                         batch_size=bs)),
        ("local_lipschitz_estimate", lambda: local_lipschitz_estimate(model, x, y, r, method="saliency",
                                                                      n_samples=ms_samples, batch_size=bs),
         lambda: explain(model, x.repeat(ms_samples, 1, 1, 1), y.repeat(ms_samples), method="saliency",
                         batch_size=bs)),
        ("model_parameter_randomisation", lambda: model_parameter_randomisation(model, x, y, r, method="saliency",
                                                                           batch_size=bs),
         lambda: [explain(model, x, y, method="saliency", batch_size=bs) for _ in parameter_layers(model)]),
        ("random_logit_similarity", lambda: random_logit(model, x, y, r, method="saliency", batch_size=bs),
         lambda: explain(model, x, y, method="saliency", batch_size=bs)),
    ]
    print(f"device {a.device}, {n} digits 32x32, DemoCNN, saliency heatmaps, {st} steps, batch {bs}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'metric':28s} {'ours s':>8s} {'limit s':>8s} {'ratio':>6s}")
    results = {}
    for name, fn, limit in cases:
        t, out = timed(fn, rep)
        tl, _ = timed(limit, rep)
        results[name] = (t, out)
        print(f"{name:28s} {t:8.3f} {tl:8.3f} {t / tl:6.2f}")
    for name, fn in [("relevance_mass", lambda: relevance_mass(r, masks)),
                     ("relevance_rank", lambda: relevance_rank(r, masks)),
                     ("pointing_game", lambda: pointing_game(r, masks)),
                     ("sparseness", lambda: sparseness(r)), ("complexity", lambda: complexity(r))]:
        t, _ = timed(fn, rep)
        print(f"{name:28s} {t:8.4f} {'(explain':>8s} {t_explain:.3f}s)")
    if a.no_quantus:
        return
    try:
        import quantus as q
    except ImportError:
        print("quantus not installed: no comparison")
        return
    print(f"\nagainst Quantus {q.__version__} (same model, inputs, heatmaps, settings)")
    print(f"{'metric':28s} {'ours s':>8s} {'quantus s':>9s} {'speedup':>7s}  values")
    xq, yq, rq = x.cpu().numpy(), y.cpu().numpy(), r.cpu().numpy()
    kw = dict(model=model, x_batch=xq, y_batch=yq, a_batch=rq, device=a.device)
    # Quantus' "black" baseline is each sample's minimum, 0 for these digits: equal to our constant 0
    t, res = results["pixel_flipping"]
    tq, ref = timed(lambda: q.PixelFlipping(features_in_step=1024 // st, disable_warnings=True)(**kw, softmax=True), 1)
    diff = float(np.abs(res.curves[:, 1:].cpu().numpy() - np.asarray(ref)).max())
    print(f"{'pixel_flipping':28s} {t:8.3f} {tq:9.3f} {tq / t:7.2f}  max |curve diff| {diff:.1e}")
    t, res = results["region_perturbation"]
    tq, ref = timed(lambda: q.RegionPerturbation(patch_size=4, regions_evaluation=64, disable_warnings=True)(
        **kw, softmax=True), 1)
    drops = (res.curves[:, :1] - res.curves[:, 1:]).cpu().numpy()
    print(f"{'region_perturbation':28s} {t:8.3f} {tq:9.3f} {tq / t:7.2f}  max |curve diff| "
          f"{float(np.abs(drops - np.asarray(ref)).max()):.1e}")
    t, res = results["faithfulness_correlation"]
    tq, ref = timed(lambda: q.FaithfulnessCorrelation(nr_runs=fc_runs, subset_size=fc_size, return_aggregate=False,
                                                      disable_warnings=True)(**kw, softmax=True), 1)
    print(f"{'faithfulness_correlation':28s} {t:8.3f} {tq:9.3f} {tq / t:7.2f}  mean ours {float(res.mean()):.3f} "
          f"quantus {float(np.mean(ref)):.3f} (random subsets; exact parity on equal subsets in tests)")
    t, res = results["max_sensitivity"]

    def explain_func(model, inputs, targets, **_):
        return explain(model, torch.as_tensor(inputs, device=a.device).float(),
                       torch.as_tensor(targets, device=a.device), method="saliency").cpu().numpy()

    tq, ref = timed(lambda: q.MaxSensitivity(nr_samples=ms_samples, lower_bound=0.2, disable_warnings=True)(
        **kw, explain_func=explain_func), 1)
    print(f"{'max_sensitivity':28s} {t:8.3f} {tq:9.3f} {tq / t:7.2f}  mean ours {float(res.mean()):.3f} "
          f"quantus {float(np.mean(ref)):.3f} (random noise; exact parity on equal noise in tests)")


if __name__ == "__main__":
    main()
