"""Explanation-quality metrics: analytic cases, parity with Quantus and captum on fixed inputs,
torchmetrics behaviour (accumulation, DDP reductions, batch-size independence) and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from xai_callbacks.attribution import explain
from xai_callbacks.guard import hook_count
from xai_callbacks.infill import ConstantInfiller
from xai_callbacks.metrics import (available_metrics, avg_sensitivity, complexity, completeness_error,
                                   deletion_auc, faithfulness_correlation, get_metric, infidelity, input_invariance_error,
                                   insertion_auc, local_lipschitz_estimate, max_sensitivity,
                                   model_parameter_randomisation, pixel_flipping, pointing_game, random_logit,
                                   region_perturbation, relevance_mass, relevance_rank, sparseness)
from xai_callbacks.metrics.axioms import shifted_model
from xai_callbacks.metrics.base import spearman
from xai_callbacks.models import DemoCNN

REL = 1e-4


def close(a, b, rel=REL, abs_=1e-6):
    a = np.asarray(torch.as_tensor(a).detach().double())
    b = np.asarray(b.detach() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=rel, atol=abs_)


class SmallNet(nn.Module):
    """A small conv net with varied outputs (16x16 single-channel inputs, 4 classes)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 4)
        with torch.no_grad():
            self.fc.weight.mul_(8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Linear(nn.Module):
    """f(x) = W x (+ b) on flattened (1, 8, 8) images, 3 classes."""

    def __init__(self, bias: bool = False):
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(64, 3, bias=bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


class Quadratic(nn.Module):
    """f_k(x) = a_k * ||x||^2 / 2: saliency is a_k * x."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -2.0, 3.0]))

    def forward(self, x):
        return self.a[None] * 0.5 * (x.flatten(1) ** 2).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, generator=g)
    x = x - x.flatten(1).amin(1).view(-1, 1, 1, 1)  # min 0: Quantus' "black" baseline is each sample's min
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    r = torch.randn(6, 1, 16, 16, generator=g)  # continuous: no ties in the orderings
    masks = torch.zeros(6, 1, 16, 16)
    masks[:, :, 4:10, 3:12] = 1
    return SmallNet().eval(), x, y, r, masks


# ------------------------------------------------------------------------------ analytic cases
def test_pixel_flipping_curve_of_linear_model_is_the_remaining_contributions():
    model = Linear()
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    r = explain(model, x, y, method="input_x_gradient")  # w * x: exact contributions
    res = pixel_flipping(model, x, y, r, n_steps=16, output="logit", batch_size=7)
    contrib = r.flatten(1)
    order = contrib.argsort(1, descending=True)
    for k in range(17):
        kept = contrib.clone().scatter_(1, order[:, :4 * k], 0.0)
        close(res.curves[:, k], kept.sum(1))
    close(res.scores, (res.curves[:, :1] - res.curves).mean(1))
    lerf = pixel_flipping(model, x, y, r, order="lerf", n_steps=16, output="logit")
    assert (res.scores > lerf.scores).all()  # exact contributions: MoRF drops faster than LeRF


def test_insertion_and_deletion_curves_run_between_image_and_baseline():
    model = Linear(bias=True)
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 2])
    r = explain(model, x, y, method="input_x_gradient")
    full = model(x).gather(1, y[:, None])[:, 0]
    empty = model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    d = deletion_auc(model, x, y, r, n_steps=8, infiller=ConstantInfiller(0.0), output="logit")
    i = insertion_auc(model, x, y, r, n_steps=8, infiller=ConstantInfiller(0.0), output="logit")
    close(d.curves[:, 0], full), close(d.curves[:, -1], empty)
    close(i.curves[:, 0], empty), close(i.curves[:, -1], full)
    close(d.fractions, np.linspace(0, 1, 9))
    close(d.scores, np.trapezoid(d.curves.numpy(), d.fractions.numpy(), axis=1))
    assert (i.scores > d.scores).all()


def test_completeness_error_is_zero_for_input_x_gradient_of_bias_free_linear_model():
    model = Linear()
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    err = completeness_error(model, x, y, explain(model, x, y, method="input_x_gradient"))
    assert err.abs().max() < 1e-5
    err_sal = completeness_error(model, x, y, explain(model, x, y, method="saliency"))
    assert (err_sal > 0.01).all()


def test_shifted_model_computes_the_same_function_on_shifted_inputs():
    torch.manual_seed(0)
    model = DemoCNN().eval()  # first conv has zero padding 1
    x = torch.rand(3, 1, 32, 32)
    shift = torch.tensor([-0.37])
    copy = shifted_model(model, shift).eval()
    close(copy(x + shift), model(x).detach(), rel=1e-4, abs_=1e-5)
    assert hook_count(model) == 0 and model.features[0].padding == (1, 1)


def test_input_invariance_gradient_is_invariant_input_x_gradient_is_not():
    model = Linear(bias=True)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    sal = input_invariance_error(model, x, y, explain(model, x, y, method="saliency"), method="saliency")
    assert sal.abs().max() < 1e-6
    r = explain(model, x, y, method="input_x_gradient")
    ixg = input_invariance_error(model, x, y, r, method="input_x_gradient", shift=-0.5)
    w = model.fc.weight[y].view(4, 1, 8, 8).detach()
    close(ixg, (w * 0.5).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1))


def test_local_lipschitz_estimate_of_quadratic_model_saliency_is_abs_a():
    model = Quadratic()
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    r = explain(model, x, y, method="saliency")
    lle = local_lipschitz_estimate(model, x, y, r, method="saliency", n_samples=5)
    close(lle, [0.5, 2.0, 3.0])
    # sensitivity: ||a d|| / ||a x|| = ||d|| / ||x|| for each perturbation d
    d = (torch.rand(4, 3, 1, 8, 8) * 2 - 1) * 0.2
    close(max_sensitivity(model, x, y, r, method="saliency", perturbations=d),
          (d.flatten(2).norm(dim=2) / x.flatten(1).norm(dim=1)).amax(0))
    close(avg_sensitivity(model, x, y, r, method="saliency", perturbations=d),
          (d.flatten(2).norm(dim=2) / x.flatten(1).norm(dim=1)).mean(0))


def test_localisation_metrics_on_hand_made_heatmaps():
    r = torch.zeros(2, 4, 4)
    m = torch.zeros(2, 4, 4)
    m[:, :2, :2] = 1
    r[0, 0, 0], r[0, 3, 3], r[0, 1, 1] = 3.0, 1.0, -5.0  # top pixel inside, one positive outside
    r[1, 3, 3], r[1, 0, 1] = 2.0, 1.0
    close(relevance_mass(r, m), [0.75, 1 / 3])
    close(pointing_game(r, m), [1.0, 0.0])
    # K = 4: top-4 of sample 0 are 3 (in), 1 (out), then two zeros (first by position: (0,1), (0,2))
    close(relevance_rank(r, m), [0.5, 0.5])


def test_sparseness_and_complexity_extremes():
    one_hot = torch.zeros(1, 8, 8)
    one_hot[0, 2, 3] = -4.0
    flat = torch.ones(1, 8, 8)
    assert sparseness(one_hot) > 0.98 and sparseness(flat).abs() < 1e-6
    close(complexity(flat), [np.log(64)])
    assert complexity(one_hot).abs() < 1e-6


def test_randomisation_leaves_model_untouched_and_scipy_spearman_agrees():
    scipy_stats = pytest.importorskip("scipy.stats")
    model = Linear(bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    r = explain(model, x, y, method="saliency")
    res = model_parameter_randomisation(model, x, y, r, method="saliency")
    assert res.curves.shape == (3, 1) and (res.curves < 0.9).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rl = random_logit(model, x, y, r, method="saliency", seed=3)
    gen = torch.Generator().manual_seed(3)
    other = (y + torch.randint(1, 3, y.shape, generator=gen)) % 3
    w = model.fc.weight.detach()
    close(rl, [scipy_stats.spearmanr(w[t], w[o]).statistic for t, o in zip(y, other)])
    a, b = torch.randn(4, 50), torch.randn(4, 50)
    close(spearman(a, b), [scipy_stats.spearmanr(a[i], b[i]).statistic for i in range(4)])


# ------------------------------------------------------------------------------ parity: Quantus
quantus = None


def _quantus():
    global quantus
    quantus = pytest.importorskip("quantus")
    return quantus


def np_(*ts):
    return [t.detach().numpy() for t in ts]


def test_pixel_flipping_curve_matches_quantus(case):
    q = _quantus()
    model, x, y, r, _ = case
    res = pixel_flipping(model, x, y, r, n_steps=64, infiller=ConstantInfiller(0.0))
    xq, yq, rq = np_(x, y, r)
    ref = q.PixelFlipping(features_in_step=4, perturb_baseline="black", disable_warnings=True)(
        model=model, x_batch=xq, y_batch=yq, a_batch=rq, device="cpu", softmax=True)
    close(res.curves[:, 1:], np.asarray(ref))


def test_region_perturbation_matches_quantus(case):
    q = _quantus()
    model, x, y, r, _ = case
    for order in ("morf", "lerf"):
        res = region_perturbation(model, x, y, r, order=order, patch_size=4, infiller=ConstantInfiller(0.0))
        xq, yq, rq = np_(x, y, r)
        ref = q.RegionPerturbation(patch_size=4, regions_evaluation=16, order=order, perturb_baseline="black",
                                   disable_warnings=True)(
            model=model, x_batch=xq, y_batch=yq, a_batch=rq, device="cpu", softmax=True)
        close(res.curves[:, :1] - res.curves[:, 1:], np.asarray(ref), abs_=1e-6)


def test_faithfulness_correlation_matches_quantus_on_the_same_subsets(case, monkeypatch):
    q = _quantus()
    model, x, y, r, _ = case
    runs, size, b = 20, 32, x.shape[0]
    drawn, choice = [], np.random.choice

    def recording_choice(*args, **kwargs):  # record the subsets Quantus draws (run-major, then sample)
        drawn.append(choice(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(np.random, "choice", recording_choice)
    ref = q.FaithfulnessCorrelation(nr_runs=runs, subset_size=size, perturb_baseline="black", abs=False,
                                    normalise=False, return_aggregate=False, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=r.numpy(), device="cpu", softmax=True)
    subsets = torch.from_numpy(np.stack(drawn).reshape(runs, b, size)).transpose(0, 1)
    close(faithfulness_correlation(model, x, y, r, subsets=subsets), np.asarray(ref))


def test_max_sensitivity_matches_quantus_on_the_same_noise(case):
    q = _quantus()
    model, x, y, _, _ = case
    n, radius, b = 4, 0.1, x.shape[0]
    r = explain(model, x, y, method="saliency")
    np.random.seed(7)
    noise = np.stack([np.random.uniform(-radius, radius, size=(b, 256)) for _ in range(n)])
    np.random.seed(7)

    def explain_func(model, inputs, targets, **_):
        return explain(model, torch.as_tensor(inputs).float(), torch.as_tensor(targets), method="saliency").numpy()

    ref = q.MaxSensitivity(nr_samples=n, lower_bound=radius, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=r.numpy(), device="cpu",
        explain_func=explain_func)
    ours = max_sensitivity(model, x, y, r, method="saliency",
                           perturbations=torch.from_numpy(noise).float().view(n, b, 1, 16, 16))
    close(ours, np.asarray(ref), rel=1e-3)  # the noise is float64 in Quantus, float32 here


def test_complexity_and_localisation_match_quantus(case):
    q = _quantus()
    model, x, y, r, masks = case
    pos = r.abs()  # non-negative: Quantus' mass/rank use raw relevance, ours positive relevance
    xq, yq = x.numpy(), y.numpy()
    kw = dict(model=model, x_batch=xq, y_batch=yq, device="cpu")
    close(sparseness(r), q.Sparseness(disable_warnings=True)(a_batch=r.numpy(), **kw))
    close(complexity(r), q.Complexity(disable_warnings=True)(a_batch=r.numpy(), **kw))
    s = masks.numpy()
    close(relevance_mass(pos, masks), q.RelevanceMassAccuracy(disable_warnings=True)(
        a_batch=pos.numpy(), s_batch=s, **kw))
    close(relevance_rank(pos, masks), q.RelevanceRankAccuracy(disable_warnings=True)(
        a_batch=pos.numpy(), s_batch=s, **kw))
    close(pointing_game(r, masks), q.PointingGame(disable_warnings=True)(a_batch=r.numpy(), s_batch=s, **kw))


def test_infidelity_matches_captum_on_the_same_perturbations(case):
    cm = pytest.importorskip("captum.metrics")
    model, x, y, _, _ = case
    r = explain(model, x, y, method="input_x_gradient")
    n = 5
    noise = torch.randn(x.shape[0], n, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.1

    def perturb(inputs):  # captum repeats each sample n times in a row (repeat_interleave)
        p = noise.reshape(-1, 1, 16, 16)
        return p, inputs - p

    ref = cm.infidelity(model, perturb, x, r, target=y, n_perturb_samples=n)
    ours = infidelity(model, x, y, r, perturbations=noise, output="logit")
    close(ours, ref, rel=1e-3)


# ------------------------------------------------------------------------ torchmetrics behaviour
def test_metric_accumulates_batches_and_sums_across_ranks(case):
    model, x, y, r, masks = case
    m = get_metric("pixel_flipping", model=model, n_steps=16, batch_size=5)
    m.update(x[:3], y[:3], r[:3])
    m.update(x[3:], y[3:], r[3:])
    full = pixel_flipping(model, x, y, r, n_steps=16, batch_size=1000)
    close(m.compute(), full.scores.mean())
    close(m.compute_curve()[1], full.curves.mean(0))
    assert m.key == "pixel_flipping_morf_aopc.constant0"
    assert all(fx.__name__ in ("_sum", "sum") or "sum" in str(fx) for fx in m._reductions.values())


def test_all_registered_metrics_run_with_clean_model(case):
    model, x, y, r, masks = case
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = {"faithfulness_correlation": {"n_runs": 5, "subset_size": 16}, "infidelity": {"n_samples": 3},
             "max_sensitivity": {"n_samples": 2}, "avg_sensitivity": {"n_samples": 2},
             "local_lipschitz_estimate": {"n_samples": 2}, "pixel_flipping": {"n_steps": 8},
             "region_perturbation": {"n_steps": 8}, "insertion_auc": {"n_steps": 8}, "deletion_auc": {"n_steps": 8}}
    rng = torch.get_rng_state()
    for name in available_metrics():
        m = get_metric(name, model=model, method="saliency", **small.get(name, {}))
        m.update(x[:2], y[:2], r[:2], masks=masks[:2])
        assert torch.isfinite(m.compute()), name
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and hook_count(model) == 0


# ---------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(case):
    model, x, y, r, masks = case
    with pytest.raises(ValueError, match=r"relevance \(heatmap\) of shape \(6, 1, 8, 8\).*valid shapes"):
        pixel_flipping(model, x, y, r[..., :8, :8])
    bad = r.clone()
    bad[2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf.*sample\(s\) \[2\]"):
        get_metric("sparseness").update(x, y, bad)
    with pytest.raises(ValueError, match="needs ground-truth masks"):
        get_metric("relevance_mass").update(x, y, r)
    with pytest.raises(ValueError, match=r"unknown metric 'pixel_flip'.*valid: \["):
        get_metric("pixel_flip", model=model)
    with pytest.raises(ValueError, match="unknown order 'most'"):
        get_metric("pixel_flipping", model=model, order="most")
    with pytest.raises(ValueError, match="n_steps"):
        get_metric("sparseness", n_steps=3)
    with pytest.raises(ValueError, match="needs method="):
        get_metric("max_sensitivity", model=model)
    with pytest.raises(ValueError, match="needs the model"):
        get_metric("pixel_flipping")
    with pytest.raises(ValueError, match="unknown infiller"):
        get_metric("deletion_auc", model=model, infiller="gan-not-there")
