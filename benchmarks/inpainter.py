"""Cost of the GAN inpainter and of the counterfactual explainers, as ratios measured in one run.

    python benchmarks/inpainter.py                        # DemoCNN, 64x1x32x32 batches, 16 explained samples
    python benchmarks/inpainter.py --repeats 5 --explain-batch 8 --width 32

Part 1, training: one inpainter step (:meth:`GANInpainter.train_step`: one D and one G update,
adversarial phase; and the L1-only warm-up phase) divided by one training step of the model on
the same batch (forward, cross-entropy, backward, Adam step). With ``every_n_steps=N`` the
callback's share of training time is this ratio / N.

Part 2, explaining: each counterfactual explainer with its default options on a batch of
samples, divided by one forward + backward (to the input) of the model on the same batch, i.e.
the cost per sample in units of one forward+backward per sample. Infillers: ``blur`` (the
fallback) and ``gan`` (a G of the given width; its cost does not depend on training).

In each repeat the baseline and the measured call run back to back and the ratio is taken within
the repeat (load on a shared machine hits both alike); the tables show the median over repeats.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xai_callbacks.attribution import explain  # noqa: E402
from xai_callbacks.infill.gan import GANInpainter  # noqa: E402
from xai_callbacks.models import DemoCNN  # noqa: E402

EXPLAINERS = [
    ("meaningful_perturbation", {}),
    ("fido.ssr", {}),
    ("fido.sdr", {}),
    ("rde", {}),
    ("rde", {"variant": "concrete"}),
    ("rde", {"variant": "matching_pursuit", "mask_size": 4}),
]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_ratio(measure, baseline, repeats: int) -> tuple[float, float]:
    """Median of measure/baseline over repeats (each pair back to back) and the median measure time."""
    measure(), baseline()  # warm-up
    ratios, times = [], []
    for _ in range(repeats):
        b = timed(baseline)
        m = timed(measure)
        ratios.append(m / b)
        times.append(m)
    return statistics.median(ratios), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="training batch size")
    ap.add_argument("--explain-batch", type=int, default=16, help="samples per explainer call")
    ap.add_argument("--width", type=int, default=16, help="width of G and D")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, 32, 32, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)

    model = DemoCNN().to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def model_step():
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    print(f"# inpainter training, batch {args.batch}x1x32x32, G/D width {args.width}, device {args.device}, "
          f"{args.threads} threads")
    print("| phase | inpainter step / model step | inpainter step (ms) |")
    print("|---|---:|---:|")
    for phase, warmup in (("L1 warm-up", 10 ** 9), ("adversarial", 0)):
        inp = GANInpainter(width=args.width, value_range=(0, 1), warmup_steps=warmup, device=args.device)
        ratio, t = median_ratio(lambda: inp.train_step(x), model_step, args.repeats)
        print(f"| {phase} | {ratio:.2f} | {1000 * t:.1f} |")

    model.eval()
    xe = x[: args.explain_batch]
    target = y[: args.explain_batch]

    def fwd_bwd():
        xi = xe.clone().requires_grad_(True)
        out = model(xi).gather(1, target[:, None]).sum()
        torch.autograd.grad(out, xi)

    gan = GANInpainter(width=args.width, value_range=(0, 1), device=args.device).infiller()
    print(f"\n# counterfactual explainers, {args.explain_batch} samples of 1x32x32, DemoCNN, default options")
    print("| method | options | infiller | per sample / (fwd+bwd per sample) | call (s) |")
    print("|---|---|---|---:|---:|")
    reps = max(1, args.repeats // 2)
    for method, opts in EXPLAINERS:
        for name, infiller in (("blur", "blur"), ("gan", gan)):
            def call():
                explain(model, xe, target, method=method, infiller=infiller, **opts)
            ratio, t = median_ratio(call, fwd_bwd, reps)
            shown = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
            print(f"| {method} | {shown} | {name} | {ratio:.0f} | {t:.2f} |")


if __name__ == "__main__":
    main()
