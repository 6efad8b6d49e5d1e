"""Correctness of ``explain`` against analytic answers and against captum / zennit called
directly, its error messages, and the do-no-harm guard around every method."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from xai_callbacks.attribution import available_methods, explain
from xai_callbacks.attribution.transformer import MethodNotApplicableError
from xai_callbacks.guard import hook_count
from xai_callbacks.models import DemoCNN

ca = pytest.importorskip("captum.attr")
zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, EpsilonPlusFlat  # noqa: E402

ALL_METHODS = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop",
               "gradcam", "lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box", "lrp.epsilon_alpha2_beta1",
               "occlusion", "rise"]
# small settings so the tests stay fast; the defaults are exercised by the callback tests
FAST = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4},
        "occlusion": {"window": 8}, "rise": {"n_masks": 32},
        "lime": {"n_samples": 16, "patch_size": 8}, "kernel_shap": {"n_samples": 16, "patch_size": 8},
        "extremal_perturbation": {"steps": 3, "areas": [0.1, 0.3]}, "meaningful_perturbation": {"steps": 3},
        "fido.sdr": {"steps": 3}, "fido.ssr": {"steps": 3}, "rde": {"steps": 3}}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, so merging them
    into the preceding layer (the LRP canonizers) changes the weights noticeably."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def demo_cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(DemoCNN())


def resnet18() -> nn.Module:
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return randomize_batchnorm(tv.resnet18(weights=None, num_classes=10))


def mlp(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32, bias=bias), nn.ReLU(), nn.Linear(32, 16, bias=bias),
                         nn.ReLU(), nn.Linear(16, 5, bias=bias))


def last_conv_name(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]


def assert_equal_attr(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4):
    """Equal up to float round-off, scaled by the size of the reference."""
    assert ours.shape == ref.shape
    assert torch.isfinite(ref).all() and ref.abs().max() > 0, "degenerate reference"
    ref = ref.detach()
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


# ---------------------------------------------------------------------------------------------
# analytic answers


def test_registry_lists_all_methods():
    assert set(ALL_METHODS) <= set(available_methods())


def test_saliency_of_linear_model_is_its_weight_row():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 7))
    x = torch.randn(6, 2, 5, 5)
    target = torch.tensor([0, 3, 6, 1, 1, 5])
    weight = model[1].weight.detach()
    expected = weight[target].view_as(x)
    torch.testing.assert_close(explain(model, x, target, method="saliency"), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(explain(model, x, target, method="input_x_gradient"), x * expected,
                               rtol=1e-6, atol=1e-7)


def completeness_error(n_steps: int, integration: str = "gausslegendre"):
    """Per-sample |sum(IG) - (f(x) - f(0))| / |f(x) - f(0)| on a small ReLU MLP (He init, so the
    scores change by O(1) along the path), explaining the class whose score changes most."""
    torch.manual_seed(0)
    model = mlp(bias=True)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    x = torch.rand(32, 3, 4, 4)
    with torch.no_grad():
        change = model(x) - model(torch.zeros_like(x))
    target = change.abs().argmax(1)
    delta = change.gather(1, target[:, None])[:, 0]
    rel = explain(model, x, target, method="integrated_gradients", n_steps=n_steps, baseline=0.0,
                  integration=integration)
    err = (rel.flatten(1).sum(1) - delta).abs()
    return err / delta.abs(), err.sum() / delta.abs().sum()


def test_integrated_gradients_completeness_within_one_percent_at_64_steps():
    """On a ReLU net the gradient jumps where units switch along the path, so quadrature error
    per sample varies; over the batch the error is within 1% at 64 steps, within 5% per sample
    (the check Sundararajan et al. propose), and shrinks with more steps."""
    per_sample, overall = completeness_error(64)
    assert overall < 0.01, f"IG completeness error over the batch {overall:.4f}"
    assert per_sample.max() < 0.05, f"IG completeness error per sample {per_sample.max():.4f}"
    coarse = completeness_error(8)[1]
    fine_per_sample = completeness_error(256)[0]
    assert coarse > overall
    assert fine_per_sample.max() < 0.01, f"IG completeness error at 256 steps {fine_per_sample.max():.4f}"
    trapezoid = completeness_error(64, "riemann_trapezoid")[1]
    assert trapezoid < 0.05 and not torch.isclose(trapezoid, overall)  # the option reaches captum


@pytest.mark.parametrize("method, net", [
    ("lrp.epsilon_plus_flat", "mlp"), ("lrp.epsilon_gamma_box", "mlp"), ("lrp.epsilon_alpha2_beta1", "mlp"),
    ("lrp.epsilon_plus", "mlp"), ("lrp.epsilon_plus_flat", "conv"), ("lrp.epsilon_gamma_box", "conv"),
    ("lrp.epsilon_plus", "conv"),
    # alpha2-beta1 on convolutions is not conservative where a unit has no negative contributions
])
def test_lrp_conserves_relevance_on_bias_free_relu_net(method, net):
    """Every rule these composites put on a bias-free ReLU net (flat / z^B first layer, epsilon on
    dense, z+ / gamma on conv, norm on average pooling) redistributes, so relevance sums to the
    target logit (the epsilon stabilizer 1e-6 is far below the tolerance)."""
    torch.manual_seed(2)
    if net == "mlp":
        model = mlp(bias=False)
        x = torch.randn(6, 3, 4, 4)
    else:
        model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(),
                              nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
                              nn.Flatten(), nn.Linear(8 * 4 * 4, 5, bias=False))
        x = torch.randn(6, 1, 8, 8)
    target = torch.arange(6) % 5
    rel = explain(model, x, target, method=method)
    with torch.no_grad():
        logit = model(x).gather(1, target[:, None])[:, 0]
    assert logit.abs().min() > 1e-3
    torch.testing.assert_close(rel.flatten(1).sum(1), logit, rtol=1e-4, atol=1e-4 * float(logit.abs().max()))


def test_smoothgrad_without_noise_is_saliency():
    model, x = demo_cnn(), torch.randn(3, 1, 32, 32)
    sal = explain(model, x, 2, method="saliency")
    smooth = explain(model, x, 2, method="smoothgrad", noise_level=0.0, n_samples=3)
    assert_equal_attr(smooth, sal, rtol=1e-5)
    noisy = explain(model, x, 2, method="smoothgrad", noise_level=0.2, n_samples=3)
    assert not torch.allclose(noisy, sal, rtol=1e-3, atol=1e-3 * float(sal.abs().max()))


def test_rise_reproducible_given_seed_and_independent_of_batch_size():
    model, x = demo_cnn(), torch.randn(4, 1, 32, 32)
    opts = dict(n_masks=40, seed=7, batch_size=64)
    a = explain(model, x, 1, method="rise", **opts)
    b = explain(model, x, 1, method="rise", **opts)
    assert torch.equal(a, b)
    c = explain(model, x, 1, method="rise", **dict(opts, batch_size=7))
    assert_equal_attr(c, a, rtol=1e-5)
    d = explain(model, x, 1, method="rise", **dict(opts, seed=8))
    assert not torch.allclose(d, a, rtol=1e-3)


def test_gradcam_finds_the_last_conv_layer_and_accepts_a_named_one():
    model, x = demo_cnn(), torch.randn(3, 1, 32, 32)
    model.eval()
    auto = explain(model, x, 4, method="gradcam", relu=False)
    named = explain(model, x, 4, method="gradcam", layer=last_conv_name(model), relu=False)
    assert torch.equal(auto, named)
    first = explain(model, x, 4, method="gradcam", layer="features.0", relu=False)
    assert first.shape == x.shape
    assert not torch.allclose(first, auto, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# parity with captum / zennit used directly


def captum_reference(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same attribution computed by captum / zennit directly, on the model in eval mode."""
    if method == "saliency":
        return ca.Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=False)
    if method == "input_x_gradient":
        return ca.InputXGradient(model).attribute(x.clone().requires_grad_(True), target=target)
    if method == "integrated_gradients":
        return ca.IntegratedGradients(model).attribute(x, baselines=0.0, target=target, n_steps=8)
    if method == "guided_backprop":
        return ca.GuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=target)
    if method == "gradcam":
        layer = dict(model.named_modules())[last_conv_name(model)]
        cam = ca.LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=False)
        return ca.LayerAttribution.interpolate(cam, x.shape[2:], "bilinear").expand_as(x)
    if method == "occlusion":
        c = x.shape[1]
        return ca.Occlusion(model).attribute(x, sliding_window_shapes=(c, 16, 16), strides=(c, 8, 8),
                                             baselines=0.0, target=target)
    raise KeyError(method)


def zennit_reference(method: str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, resnet: bool):
    if resnet:
        from zennit.torchvision import ResNetCanonizer
        canonizers = [ResNetCanonizer()]
    else:
        canonizers = [SequentialMergeBatchNorm()]
    # the box bounds of the first layer: each sample's own minimum and maximum
    low = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    composite = {
        "lrp.epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=canonizers),
        "lrp.epsilon_plus": lambda: EpsilonPlus(canonizers=canonizers),
        "lrp.epsilon_gamma_box": lambda: EpsilonGammaBox(low=low, high=high, canonizers=canonizers),
        "lrp.epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(canonizers=canonizers),
    }[method]()
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x.clone(), lambda out: out * nn.functional.one_hot(target, out.shape[1]))
    return rel


PARITY = ["saliency", "input_x_gradient", "integrated_gradients", "guided_backprop", "gradcam", "occlusion",
          "lrp.epsilon_plus_flat", "lrp.epsilon_plus", "lrp.epsilon_gamma_box", "lrp.epsilon_alpha2_beta1"]


@pytest.fixture(scope="module", params=["demo_cnn", "resnet18"])
def parity_case(request):
    if request.param == "demo_cnn":
        model, x = demo_cnn(), torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    else:
        model, x = resnet18(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        target = model.eval()(x).argsort(dim=1)[:, -2]  # the runner-up class: not the trivial argmax
    return request.param, model, x, target


@pytest.mark.parametrize("method", PARITY)
def test_parity_with_captum_and_zennit(parity_case, method):
    name, model, x, target = parity_case
    # gradcam unrectified: on ResNet-18 at 32x32 the last conv map is 1x1 and its ReLU often 0
    options = {"integrated_gradients": {"n_steps": 8}, "occlusion": {"window": 16, "stride": 8},
               "gradcam": {"relu": False}}.get(method, {})
    model.train()  # explain must switch to eval itself; the reference runs in eval mode
    ours = explain(model, x, target, method=method, **options)
    model.eval()
    if method.startswith("lrp."):
        ref = zennit_reference(method, model, x, target, resnet=name == "resnet18")
    else:
        ref = captum_reference(method, model, x, target)
    assert_equal_attr(ours, ref)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def cnn_and_batch():
    return demo_cnn(), torch.randn(4, 1, 32, 32)


def test_unknown_method_names_the_valid_ones(cnn_and_batch):
    model, x = cnn_and_batch
    with pytest.raises(ValueError, match=r"unknown attribution method 'lrp\.bogus'.*'saliency'"):
        explain(model, x, 0, method="lrp.bogus")


def test_unknown_option_names_the_valid_ones(cnn_and_batch):
    model, x = cnn_and_batch
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['steps'\].*'n_steps'"):
        explain(model, x, 0, method="integrated_gradients", steps=10)


@pytest.mark.parametrize("target", [10, -1, torch.tensor([0, 1, 2, 12])])
def test_target_out_of_range_names_the_valid_range(cnn_and_batch, target):
    model, x = cnn_and_batch
    with pytest.raises(ValueError, match=r"out of range.*10 classes.*0\.\.9"):
        explain(model, x, target, method="saliency")


@pytest.mark.parametrize("target", [torch.tensor([0, 1, 2]), torch.zeros(4), "3", torch.zeros(4, 2, dtype=torch.long)])
def test_wrong_target_shape_or_type_is_rejected(cnn_and_batch, target):
    model, x = cnn_and_batch
    with pytest.raises(ValueError, match=r"target must be an int, a LongTensor of shape \(4,\)"):
        explain(model, x, target, method="saliency")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected(cnn_and_batch, bad):
    model, x = cnn_and_batch
    x = x.clone()
    x[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        explain(model, x, 0, method="saliency")


def test_gradcam_without_conv_layer_says_so():
    with pytest.raises(ValueError, match="gradcam needs a convolution layer.*Sequential has none"):
        explain(mlp(), torch.randn(2, 3, 4, 4), 0, method="gradcam")


def test_gradcam_unknown_layer_lists_the_conv_layers(cnn_and_batch):
    model, x = cnn_and_batch
    with pytest.raises(ValueError, match=r"layer 'features\.99' not found.*'features\.9'"):
        explain(model, x, 0, method="gradcam", layer="features.99")


def test_wrong_input_type_is_rejected(cnn_and_batch):
    model, x = cnn_and_batch
    with pytest.raises(ValueError, match="integer token ids.*nn.Embedding.*floating-point inputs"):
        explain(model, (x * 10).long(), 0, method="saliency")


# ---------------------------------------------------------------------------------------------
# the do-no-harm guard


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }


def assert_untouched(model: nn.Module, before: dict):
    after = snapshot(model)
    assert hook_count(model) == 0, "hooks left on the model"
    for key in ("params", "grads", "buffers"):
        for n, t in before[key].items():
            assert torch.equal(after[key][n], t), f"{key[:-1]} {n} changed"
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert torch.equal(after["rng"][0], before["rng"][0]), "global torch RNG state changed"
    assert np.array_equal(after["rng"][1], before["rng"][1]), "numpy RNG state changed"
    assert after["rng"][2] == before["rng"][2], "python RNG state changed"


@pytest.fixture()
def training_cnn():
    """DemoCNN in train mode with one submodule deliberately in eval mode (each flag is restored,
    not just the root's), and every parameter's .grad set to a known tensor."""
    model = demo_cnn().train()
    model.features[7].bn1.eval()
    g = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    return model


def explain_where_applicable(model: nn.Module, x: torch.Tensor, target, method: str,
                             before: dict | None = None) -> torch.Tensor:
    """``explain`` with the fast options; a method that does not apply to ``model`` (e.g. a
    transformer-only method on a CNN) must say so with MethodNotApplicableError, leaving the model
    as it was in ``before`` (a :func:`snapshot`), and the test is skipped."""
    try:
        return explain(model, x, target, method=method, **FAST.get(method, {}))
    except MethodNotApplicableError as err:
        if before is not None:
            assert_untouched(model, before)
        pytest.skip(f"{method} does not apply to this CNN: {err}")


# the do-no-harm guard: every registered method, on a CNN
@pytest.mark.parametrize("method", available_methods())
def test_guard_leaves_model_and_rng_untouched(training_cnn, method):
    model = training_cnn
    x = torch.rand(3, 1, 32, 32)
    random.random(), np.random.rand()  # noqa: B018 - move the states off their defaults
    before = snapshot(model)
    rel = explain_where_applicable(model, x, torch.tensor([1, 2, 3]), method, before)
    assert rel.shape == x.shape and torch.isfinite(rel).all()
    assert_untouched(model, before)


@pytest.mark.parametrize("method", available_methods())
def test_guard_restores_everything_when_the_method_raises(training_cnn, method):
    """A target out of range is noticed on the first forward, i.e. after captum / zennit put
    their hooks and canonizers on the model."""
    model = training_cnn
    x = torch.rand(2, 1, 32, 32)
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        explain_where_applicable(model, x, torch.tensor([0, 42]), method, before)
    assert_untouched(model, before)


@pytest.mark.parametrize("method", available_methods())
def test_methods_work_under_outer_no_grad_and_inference_mode(cnn_and_batch, method):
    """Lightning validates under no_grad inside fit and under inference_mode in validate/test."""
    model, x = cnn_and_batch
    x = x[:2]
    expected = explain_where_applicable(model, x, 3, method)
    for outer in (torch.inference_mode, torch.no_grad):
        with outer():
            x_inner = x.clone()  # an inference tensor under inference_mode, like Lightning's batches
            rel = explain(model, x_inner, 3, method=method, **FAST.get(method, {}))
        torch.testing.assert_close(rel, expected, msg=lambda m: f"under {outer.__name__}: {m}")


def test_compiled_module_is_unwrapped(cnn_and_batch):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    model, x = cnn_and_batch
    try:
        compiled = torch.compile(model)
    except Exception as e:  # pragma: no cover - platform without a compiler backend
        pytest.skip(f"torch.compile unavailable: {e}")
    assert compiled is not model
    expected = explain(model, x, 3, method="gradcam")
    torch.testing.assert_close(explain(compiled, x, 3, method="gradcam"), expected)
    assert hook_count(model) == 0
