"""ROAD, IROF, selectivity, sensitivity-n and smooth MPRT: parity with Quantus 0.6 on the same
inputs (same noise, same segments, same subsets where they are random), analytic cases,
torchmetrics behaviour and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from xai_callbacks.attribution import explain
from xai_callbacks.guard import hook_count
from xai_callbacks.infill import ConstantInfiller
from xai_callbacks.metrics import (faithfulness_correlation, get_metric, irof, road, selectivity, sensitivity_n,
                                   smooth_mprt)
from xai_callbacks.metrics.removal import superpixels
from xai_callbacks.metrics.road import noisy_linear_imputation

from test_metrics import Linear, case, close  # noqa: F401

quantus = pytest.importorskip("quantus")
BLACK = ConstantInfiller(0.0)  # the case's images have minimum 0: Quantus' "black" baseline


def test_noisy_linear_imputation_matches_quantus():
    from quantus.functions.perturb_func import noisy_linear_imputation as q_nli

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 10, generator=g)
    removed = torch.rand(2, 1, 12, 10, generator=g) < 0.4
    removed[1, :, :6] = True  # a large hole touching the border
    ours = noisy_linear_imputation(x, removed, noise=0.0, solver="direct")
    cg = noisy_linear_imputation(x, removed, noise=0.0, tol=1e-10, solver="cg")
    for i in range(2):
        idx = removed[i, 0].flatten().nonzero().flatten().numpy()
        ref = q_nli(x[i].double().numpy(), idx, noise=0.0)
        close(ours[i], ref, rel=1e-5, abs_=1e-6)
        close(cg[i], ref, rel=1e-5, abs_=1e-6)
    assert torch.equal(ours[~removed.expand_as(x)], x[~removed.expand_as(x)])  # kept pixels untouched
    noisy = noisy_linear_imputation(x, removed, noise=0.5, generator=torch.Generator().manual_seed(1))
    assert 0.3 < float((noisy - ours)[removed.expand_as(x)].std()) < 0.7


def test_road_matches_quantus(case):  # noqa: F811
    model, x, y, r, _ = case
    percentages = [5, 20, 40, 60, 80]
    ref = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=r.numpy(), device="cpu")
    ours = road(model, x, y, r, percentages=percentages, noise=0.0)
    close(ours.curves.mean(0), [ref[p] for p in percentages])
    assert ours.curves.shape == (6, 5) and set(ours.curves.unique().tolist()) <= {0.0, 1.0}
    close(ours.scores, ours.curves.mean(1))


def test_road_accuracy_curve_matches_quantus_where_predictions_flip():
    """Class 0 scores a bright square of varying brightness, class 1 is a constant: removing the
    square flips the prediction at a different percentage for each sample."""
    model = Linear(bias=True)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[0].view(8, 8)[2:6, 2:6] = 1.0
        model.fc.bias.copy_(torch.tensor([0.0, 6.0, -100.0]))
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = 0.05 * torch.rand(8, 1, 8, 8, generator=g)
    x[:, :, 2:6, 2:6] += torch.linspace(0.45, 1.2, 8).view(8, 1, 1, 1)
    y = model(x).argmax(1).detach()
    r = explain(model, x, y, method="input_x_gradient") + 1e-3 * torch.rand(8, 1, 8, 8, generator=g)
    pct = [5, 10, 15, 20, 25, 30]
    ref = quantus.ROAD(percentages=pct, noise=0.0, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=r.numpy(), device="cpu")
    ours = road(model, x, y, r, percentages=pct, noise=0.0)
    close(ours.curves.mean(0), [ref[p] for p in pct])
    assert len(set(ours.curves.mean(0).tolist())) >= 3  # the curve is not flat


def test_road_morf_drops_the_score_of_a_region_model_lerf_keeps_it():
    """Class 0 scores the sum of a bright square; removing the square (MoRF of the exact
    contributions) imputes it from its dark surroundings, removing anything else changes nothing."""
    model = Linear()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[0].view(8, 8)[2:6, 2:6] = 1.0
    x = 0.05 * torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:, :, 2:6, 2:6] += 1.0
    r = explain(model, x, 0, method="input_x_gradient")
    pct = (10, 20, 25)  # at most the 16 square pixels of 64
    morf = road(model, x, 0, r, order="morf", percentages=pct, noise=0.0, output="logit")
    lerf = road(model, x, 0, r, order="lerf", percentages=pct, noise=0.0, output="logit")
    full = model(x)[:, 0].detach()
    close(lerf.curves, full[:, None].expand(4, 3))
    assert (morf.curves[:, -1] < 0.3 * full).all() and (morf.curves.diff(dim=1) < 0).all()


@pytest.fixture()
def quantus_auc(monkeypatch):
    """Quantus 0.6 integrates with np.trapz, which numpy 2 removed; np.trapezoid is the same."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


def test_irof_matches_quantus(case, quantus_auc):  # noqa: F811
    model, x, y, r, _ = case
    ref = quantus.IROF(perturb_baseline="black", return_aggregate=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=r.numpy(), device="cpu", softmax=True)
    ours = irof(model, x, y, r, infiller=BLACK)
    close(ours, np.asarray(ref), rel=1e-4)
    seg = superpixels(x)
    assert seg.shape == (6, 16, 16) and all(len(s.unique()) > 2 for s in seg)
    close(irof(model, x, y, r, segments=seg, infiller=BLACK), ours)


def test_selectivity_matches_quantus(case, quantus_auc):  # noqa: F811
    model, x, y, r, _ = case
    metric = quantus.Selectivity(patch_size=4, perturb_baseline="black", disable_warnings=True)
    ref = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=r.numpy(), device="cpu", softmax=True)
    ours = selectivity(model, x, y, r, patch_size=4, infiller=BLACK)
    close(ours.curves[:, 1:], np.asarray(ref))
    close(ours.scores.mean(), metric.get_auc_score)


def test_sensitivity_n_of_a_linear_model_with_exact_contributions_is_one():
    """Ancona et al.: sensitivity-n holds for every n exactly when the model is linear and the
    heatmap its exact decomposition (input x gradient with a zero baseline)."""
    model = Linear()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    exact = explain(model, x, y, method="input_x_gradient")
    res = sensitivity_n(model, x, y, exact, fractions=(0.05, 0.25, 0.5), n_runs=16, infiller=BLACK)
    close(res.curves, np.ones((4, 3)), rel=1e-5, abs_=1e-5)
    noisy = exact + 0.5 * exact.abs().mean() * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))
    assert (sensitivity_n(model, x, y, noisy, fractions=(0.05, 0.25), infiller=BLACK).scores < 0.99).all()


def test_sensitivity_n_at_one_size_is_the_faithfulness_correlation(case):  # noqa: F811
    """At one subset size sensitivity-n is Bhatt et al.'s faithfulness correlation, which is
    checked against Quantus in test_metrics. (Quantus' own SensitivityN correlates across the
    batch for ordered removal, a different quantity.)"""
    model, x, y, r, _ = case
    subsets = torch.rand(6, 10, 256, generator=torch.Generator().manual_seed(3)).argsort(-1)[..., :32]
    ours = sensitivity_n(model, x, y, r, subsets=[subsets], infiller=BLACK, output="probability")
    close(ours.curves[:, 0], faithfulness_correlation(model, x, y, r, subsets=subsets, infiller=BLACK))


def test_smooth_mprt_matches_quantus_on_the_same_noise(case, monkeypatch):  # noqa: F811
    model, x, y, _, _ = case
    n_samples, magnitude, qseed = 3, 0.1, 42
    draws = [np.random.default_rng(k).standard_normal(x.shape) for k in range(n_samples - 1)]
    calls = []

    def fixed_randn(*shape):  # every model sees the same noise sequence, as in ours
        calls.append(shape)
        return draws[(len(calls) - 1) % (n_samples - 1)].copy()

    monkeypatch.setattr(np.random, "randn", fixed_randn)
    ref = quantus.SmoothMPRT(nr_samples=n_samples, noise_magnitude=magnitude, seed=qseed, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, device="cpu",
        explain_func=quantus.explain, explain_func_kwargs={"method": "Saliency"})
    monkeypatch.undo()
    std = magnitude * (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    noise = torch.from_numpy(np.stack(draws)).float() * std
    r = explain(model, x, y, method="saliency", abs=True)
    # Quantus seeds every layer's re-initialisation with seed + 1
    ours = smooth_mprt(model, x, y, r, method="saliency", method_options={"abs": True}, n_samples=n_samples,
                       seed=qseed + 1, noise=noise)
    layers = [k for k in ref if k != "original"]
    assert len(layers) == ours.curves.shape[1] == 2
    close(ours.curves, np.stack([ref[k] for k in layers], 1), rel=1e-4, abs_=1e-4)


def test_smooth_mprt_leaves_the_model_untouched(case):  # noqa: F811
    model, x, y, r, _ = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    res = smooth_mprt(model, x[:2], y[:2], r[:2], method="saliency", n_samples=2)
    assert res.curves.shape == (2, 2) and torch.isfinite(res.curves).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and hook_count(model) == 0
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("name, fn, options", [
    ("road", road, {"percentages": (10, 50)}), ("irof", irof, {"n_segments": 20}),
    ("selectivity", selectivity, {"patch_size": 4}),
    ("sensitivity_n", sensitivity_n, {"fractions": (0.1, 0.3), "n_runs": 8}),
    ("smooth_mprt", smooth_mprt, {"n_samples": 2}),
])
def test_metric_classes_accumulate_their_functional_twin(case, name, fn, options):  # noqa: F811
    """update() on two chunks gives the mean of the functional scores of the same chunks (noise
    and random subsets are drawn per call, so a chunk's scores depend on its batch)."""
    model, x, y, r, _ = case
    m = get_metric(name, model=model, method="saliency", **options)
    extra = {"method": "saliency"} if name == "smooth_mprt" else {}
    parts = []
    for sl in (slice(0, 3), slice(3, 6)):
        m.update(x[sl], y[sl], r[sl])
        res = fn(model, x[sl], y[sl], r[sl], **options, **extra)
        parts.append(getattr(res, "scores", res))
    close(m.compute(), torch.cat(parts).mean(), rel=1e-5)
    assert torch.isfinite(m.compute())


def test_errors_name_what_is_valid(case):  # noqa: F811
    model, x, y, r, _ = case
    with pytest.raises(ValueError, match=r"unknown order 'most'"):
        road(model, x, y, r, order="most")
    with pytest.raises(ValueError, match=r"percentages must be in \[0, 100\)"):
        road(model, x, y, r, percentages=[50, 100])
    with pytest.raises(ValueError, match="all pixels removed"):
        noisy_linear_imputation(x[:1], torch.ones(1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"segments must be integer ids of shape \(6, 16, 16\)"):
        irof(model, x, y, r, segments=torch.zeros(6, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\]"):
        sensitivity_n(model, x, y, r, fractions=(0.0,))
    with pytest.raises(ValueError, match="needs method="):
        get_metric("smooth_mprt", model=model)
