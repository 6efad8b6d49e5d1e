"""The surrogate, modified-backprop, extremal-perturbation and configurable-LRP methods: analytic
cases, parity with captum / zennit called directly, hand-computed excitation backprop and errors
(the do-no-harm guard checks of every registered method are in test_attribution.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from xai_callbacks.attribution import available_methods, explain, method_options
from xai_callbacks.attribution.surrogate import feature_mask

from test_attribution import FAST, assert_equal_attr, demo_cnn, mlp

ca = pytest.importorskip("captum.attr")
zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite  # noqa: E402

NEW_METHODS = ["lime", "kernel_shap", "deeplift", "deconvnet", "excitation_backprop",
               "excitation_backprop.contrastive", "extremal_perturbation", "lrp.composite"]


def linear_model(bias: bool = True, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=bias))


def test_registry_lists_the_new_methods():
    assert set(NEW_METHODS) <= set(available_methods())
    assert method_options("lime")["features"] == "grid"


# ------------------------------------------------------------------------------ surrogates
@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_surrogates_recover_patch_contributions_of_a_linear_model(method):
    """A linear model is additive over patches: KernelSHAP's Shapley values and an unregularised
    LIME fit both equal each patch's sum of w * (x - baseline)."""
    model = linear_model()
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 2, 1])
    opts = {"alpha": 0.0} if method == "lime" else {}
    rel = explain(model, x, y, method=method, patch_size=4, n_samples=64, **opts)
    contrib = model[1].weight.detach()[y].view(3, 1, 8, 8) * x
    per_patch = contrib.view(3, 1, 2, 4, 2, 4).sum((3, 5), keepdim=True).expand(3, 1, 2, 4, 2, 4).reshape(3, 1, 8, 8)
    torch.testing.assert_close(rel, per_patch, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method, cls", [("lime", "Lime"), ("kernel_shap", "KernelShap")])
def test_surrogates_match_captum_called_directly(method, cls):
    model, x = demo_cnn().eval(), torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([3, 7])
    opts = {"alpha": 1e-4} if method == "lime" else {}
    ours = explain(model, x, y, method=method, patch_size=8, n_samples=40, perturbations_per_eval=7, seed=5, **opts)
    mask = feature_mask(x, "grid", patch_size=8)
    refs = []
    for i in range(2):
        if method == "lime":
            from captum._utils.models.linear_model import SkLearnLasso
            from captum.attr._core.lime import get_exp_kernel_similarity_function
            explainer = ca.Lime(model, interpretable_model=SkLearnLasso(alpha=1e-4),
                                similarity_func=get_exp_kernel_similarity_function("cosine", 1.0))
        else:
            explainer = ca.KernelShap(model)
        torch.manual_seed(5)
        refs.append(explainer.attribute(x[i:i + 1], baselines=0.0, target=y[i:i + 1], feature_mask=mask[i:i + 1],
                                        n_samples=40, perturbations_per_eval=7))
    assert_equal_attr(ours, torch.cat(refs))


def test_lime_is_independent_of_the_batch_it_came_in():
    model, x = demo_cnn(), torch.rand(3, 1, 32, 32)
    opts = dict(patch_size=8, n_samples=24, alpha=0.0)
    full = explain(model, x, 1, method="lime", **opts)
    single = explain(model, x, 1, method="lime", batch_size=1, **opts)
    assert_equal_attr(single, full, rtol=1e-4)


def test_slic_features_follow_image_edges():
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, :, 16:] = 1.0  # two flat halves
    x[1] += 0.05 * torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = feature_mask(x, "slic", n_segments=8)
    assert ids.shape == (2, 1, 32, 32)
    for b in range(2):
        u = ids[b].unique()
        assert torch.equal(u, torch.arange(len(u)))  # contiguous ids 0..K-1
        assert len(u) >= 2
        left, right = set(ids[b, 0, :, :16].unique().tolist()), set(ids[b, 0, :, 16:].unique().tolist())
        assert not left & right, "a superpixel straddles the edge"
    rel = explain(demo_cnn(), x[:, :1], 0, method="kernel_shap", features="slic", n_segments=8, n_samples=16)
    assert rel.shape == (2, 1, 32, 32)


def test_surrogate_errors_name_the_valid_choices():
    model, x = demo_cnn(), torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"unknown features 'quickshift'.*\['grid', 'slic'\]"):
        explain(model, x, 0, method="lime", features="quickshift")
    with pytest.raises(ValueError, match="need images"):
        explain(mlp(), torch.rand(2, 48), 0, method="kernel_shap")


# ------------------------------------------------------------------------------ deeplift, deconvnet
def test_deeplift_matches_captum_and_sums_to_the_score_difference():
    model = mlp(bias=True).eval()
    x, base = torch.randn(4, 3, 4, 4), torch.full((4, 3, 4, 4), 0.1)
    y = torch.tensor([0, 1, 2, 3])
    ours = explain(model, x, y, method="deeplift", baseline=base)
    assert_equal_attr(ours, ca.DeepLift(model).attribute(x, baselines=base, target=y))
    with torch.no_grad():
        delta = (model(x) - model(base)).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(ours.flatten(1).sum(1), delta, rtol=1e-4, atol=1e-5)  # summation-to-delta


class TwiceReLU(nn.Module):
    """One ReLU module called twice per forward, as in torchvision's ResNet blocks."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(8, 8), nn.Linear(8, 3), nn.ReLU()

    def forward(self, x):
        return self.b(self.relu(self.a(self.relu(x.flatten(1)))))


def test_deeplift_on_a_reused_relu_names_the_module_and_the_methods_that_apply():
    from xai_callbacks.attribution.transformer import MethodNotApplicableError

    model = TwiceReLU()
    with pytest.raises(MethodNotApplicableError, match=r"'deeplift' does not apply to TwiceReLU: .*'relu' is called "
                                                       r"2 times.*Methods that apply to TwiceReLU: \[.*'saliency'") as err:
        explain(model, torch.randn(2, 8), 0, method="deeplift")
    assert "'deeplift'" not in str(err.value).split("Methods that apply")[1]
    assert not any(m._forward_hooks for m in model.modules())   # the counting hooks are gone


def test_deconvnet_matches_captum():
    model, x = demo_cnn().eval(), torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2, 5])
    ref = ca.Deconvolution(model).attribute(x.clone().requires_grad_(True), target=y)
    assert_equal_attr(explain(model, x, y, method="deconvnet"), ref)


# ------------------------------------------------------------------------------ excitation backprop
def hand_net() -> nn.Module:
    """x (3,) -> Linear W1, b1 -> ReLU -> Linear W2 -> 2 scores; weights chosen for hand computation."""
    net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, 2.0], [0.5, 1.0, -1.0]]))
        net[0].bias.copy_(torch.tensor([0.1, -0.2]))
        net[2].weight.copy_(torch.tensor([[2.0, -1.0], [1.0, 3.0]]))
    return net


def test_excitation_backprop_on_a_hand_computed_network():
    """x = (1, 2, 0.5): hidden ReLU outputs h = (0.1, 1.8).
    Target 0: W2+ row (2, 0), so P(h) = (0.2 / 0.2, 0) = (1, 0); W1+ row 0 = (1, 0, 2) with
    sum x W1+ = 2, so P(x) = (1/2, 0, 1/2).
    Dual of target 0: (-W2)+ row (0, 1): P(h) = (0, 1); W1+ row 1 = (0.5, 1, 0), sum 2.5:
    P(x) = (0.2, 0.8, 0). Contrastive: (0.3, -0.8, 0.5), positive part (0.3, 0, 0.5).
    Target 1: W2+ row (1, 3), z = 5.5: P(h) = (0.1 / 5.5, 5.4 / 5.5)."""
    net, x = hand_net(), torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.5]])
    t = torch.tensor([0, 1])
    mwp = explain(net, x, t, method="excitation_backprop")
    p_h = torch.tensor([0.1 / 5.5, 5.4 / 5.5])
    expected_1 = p_h[0] * torch.tensor([0.5, 0.0, 0.5]) + p_h[1] * torch.tensor([0.2, 0.8, 0.0])
    torch.testing.assert_close(mwp, torch.stack([torch.tensor([0.5, 0.0, 0.5]), expected_1]))
    c = explain(net, x[:1], 0, method="excitation_backprop.contrastive", positive=False)
    torch.testing.assert_close(c, torch.tensor([[0.3, -0.8, 0.5]]))
    c_pos = explain(net, x[:1], 0, method="excitation_backprop.contrastive")
    torch.testing.assert_close(c_pos, torch.tensor([[0.3, 0.0, 0.5]]))


def test_excitation_backprop_matches_zennit_composite_on_non_negative_inputs():
    """zennit's ExcitationBackprop composite (z+ with the bias zeroed) is the same rule where the
    inputs are non-negative; winning probabilities sum to 1 at the input."""
    from zennit.composites import ExcitationBackprop

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)).eval()
    x = torch.rand(3, 1, 16, 16)
    y = torch.tensor([0, 3, 4])
    ours = explain(model, x, y, method="excitation_backprop")
    with Gradient(model=model, composite=ExcitationBackprop(stabilizer=1e-20, zero_params=["bias"])) as attributor:
        _, ref = attributor(x.clone(), lambda out: nn.functional.one_hot(y, 5).float())
    assert_equal_attr(ours, ref)
    torch.testing.assert_close(ours.flatten(1).sum(1), torch.ones(3), rtol=1e-5, atol=1e-5)
    at_layer = explain(model, x, y, method="excitation_backprop", layer="3")  # second conv: 8x8 -> upsampled
    assert at_layer.shape == x.shape and (at_layer >= 0).all()
    torch.testing.assert_close(at_layer.flatten(1).sum(1) / 4, torch.ones(3), rtol=1e-4, atol=1e-4)


def test_excitation_backprop_errors():
    net = hand_net()
    with pytest.raises(ValueError, match=r"layer 'nope' not found.*module names"):
        explain(net, torch.rand(1, 3), 0, method="excitation_backprop", layer="nope")
    with pytest.raises(ValueError, match=r"classifier_layer 'fc' not found"):
        explain(net, torch.rand(1, 3), 0, method="excitation_backprop.contrastive", classifier_layer="fc")


# ------------------------------------------------------------------------------ extremal perturbation
class RegionScore(nn.Module):
    """Class 0 scores the sum of the input over rows 8..15, cols 8..15 of a 32x32 image."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(2, 1, 32, 32)
        w[0, :, 8:16, 8:16] = 1.0
        w[1] = -w[0]
        self.fc = nn.Linear(1024, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w.view(2, -1))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_extremal_preservation_mask_finds_the_region_at_its_area():
    from xai_callbacks.attribution.extremal import extremal_masks
    from xai_callbacks.infill import ConstantInfiller

    model, x = RegionScore(), torch.ones(2, 1, 32, 32)
    area = 64 / 1024
    opts = dict(infiller=ConstantInfiller(0.0), steps=150, lr=0.1, mask_step=2, smoothing=0.0)
    masks = extremal_masks(model, x, torch.tensor([0, 0]), areas=[area, 4 * area], **opts)
    assert masks.shape == (2, 2, 1, 32, 32)
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[8:16, 8:16] = True
    far = torch.ones(32, 32, dtype=torch.bool)
    far[4:20, 4:20] = False  # more than 4 pixels away from the region
    small = masks[:, 0, 0]
    assert (small[:, region].mean(1) > 0.8).all(), small[:, region].mean(1)
    assert (small[:, far].mean(1) < 0.02).all(), small[:, far].mean(1)
    for k, a in enumerate([area, 4 * area]):
        mean = masks[:, k].flatten(1).mean(1)
        assert ((mean - a).abs() < 0.03).all(), f"mask area {mean.tolist()} for target area {a}"
    rel = explain(model, x, 0, method="extremal_perturbation", areas=[area], **opts)
    torch.testing.assert_close(rel, masks[:, :1, 0].expand_as(x))


def test_extremal_mask_of_a_model_blind_to_its_input_prefers_no_place():
    """Tied mask values share the area constraint's pull: a model that ignores its input gets a
    uniform mask (in the sort's order of ties, 0.85 of its mass went to the bottom half of a 32x32
    image in 50 steps), and the targets are the step at each rank where nothing is tied."""
    from xai_callbacks.attribution.extremal import extremal_masks, rank_targets

    class Blind(nn.Module):
        def forward(self, x):
            return torch.stack([x.sum((1, 2, 3)) * 0, x.sum((1, 2, 3)) * 0 + 1], 1)

    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = extremal_masks(Blind(), x, torch.tensor([0, 1]), areas=[0.1], steps=30)
    spread = masks.flatten(2).amax(2) - masks.flatten(2).amin(2)
    assert (spread < 1e-4).all(), spread
    m = torch.rand(3, 10, generator=torch.Generator().manual_seed(1))
    step = torch.zeros(3, 10)
    step[:, 7:] = 1
    targets = rank_targets(m, step)
    assert torch.equal(targets.gather(1, m.argsort(1)), step)   # each element: the step at its rank
    assert rank_targets(torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.7, 0.7, 0.2]]),
                        torch.tensor([[0.0, 0, 0, 1], [0, 0, 1, 1]])).tolist() == [[0.25] * 4, [0, 1, 1, 0]]


def test_extremal_errors():
    model, x = RegionScore(), torch.ones(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"areas must be fractions in \(0, 1\)"):
        explain(model, x, 0, method="extremal_perturbation", areas=[0.0, 0.5])
    with pytest.raises(ValueError, match=r"game must be one of \['preservation', 'deletion', 'dual'\]"):
        explain(model, x, 0, method="extremal_perturbation", game="keep")


# ------------------------------------------------------------------------------ lrp.composite
def zennit_attr(model, x, y, composite, grad=None):
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(x.clone(), grad or (lambda out: out * nn.functional.one_hot(y, out.shape[1])))
    return rel


@pytest.mark.parametrize("rules, reference", [
    (None, lambda x: EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])),
    ({"features.0": {"rule": "zbox", "low": -1.0, "high": 2.0}, "Convolution": {"rule": "gamma", "gamma": 0.5},
      "Dense": {"rule": "epsilon", "epsilon": 1e-3}},
     lambda x: EpsilonGammaBox(low=-1.0, high=2.0, epsilon=1e-3, gamma=0.5, canonizers=[SequentialMergeBatchNorm()])),
    ({"Convolution": {"rule": "alpha_beta", "alpha": 2.0, "beta": 1.0}, "Linear": "epsilon"},
     lambda x: EpsilonAlpha2Beta1(canonizers=[SequentialMergeBatchNorm()])),
])
def test_lrp_composite_from_config_matches_zennit_composites(rules, reference):
    model = demo_cnn().eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([4, 1])
    ours = explain(model, x, y, method="lrp.composite", rules=rules)
    assert_equal_attr(ours, zennit_attr(model, x, y, reference(x)))


@pytest.mark.parametrize("rules", [{"Dense": "zero"}, {"first": "wsquare", "Dense": "zplus"},
                                   {"first": "flat", "1": {"rule": "gamma", "gamma": 0.1}, "Linear": "epsilon"}])
def test_lrp_composite_conserves_on_bias_free_net(rules):
    model, x = mlp(bias=False), torch.rand(5, 3, 4, 4) + 0.1
    y = torch.arange(5)
    rel = explain(model, x, y, method="lrp.composite", rules=rules)
    with torch.no_grad():
        logit = model(x).gather(1, y[:, None])[:, 0]
    keep = logit > 1e-3  # z+ / w^2 conserve the relevance of positive logits
    torch.testing.assert_close(rel.flatten(1).sum(1)[keep], logit[keep], rtol=1e-4, atol=1e-5)
    assert keep.any()


def test_lrp_log_odds_equals_merged_difference_layer():
    """Montavon et al.: eta_c = -log sum_{c'} exp(-(z_c - z_c')) as a difference layer merged into
    the last dense layer, relevance R_cc' = d_c' softmin(d)_c'; ours stacks the difference on the
    logits, which is the same with epsilon on the last layer."""
    model, x, c = mlp(bias=False).eval(), torch.randn(4, 3, 4, 4), 2
    ours = explain(model, x, c, method="lrp.composite", rules={"Dense": "epsilon"}, output="log_odds")
    w = model[5].weight.detach()
    others = [k for k in range(5) if k != c]
    merged = nn.Sequential(*list(model)[:5], nn.Linear(16, 4, bias=False))
    with torch.no_grad():
        merged[5].weight.copy_(w[c][None] - w[others])

    def relevance(d):
        return d * torch.softmax(-d, dim=1)

    ref = zennit_attr(merged, x, None, LayerMapComposite([(nn.Linear, zennit.rules.Epsilon())]),
                      grad=lambda d: relevance(d.detach()))
    assert_equal_attr(ours, ref)
    logit = explain(model, x, c, method="lrp.composite", rules={"Dense": "epsilon"})
    assert not torch.allclose(ours, logit, atol=1e-3)


def test_lrp_composite_errors_name_what_is_valid():
    model, x = demo_cnn(), torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"unknown LRP rule 'eps'.*'epsilon'"):
        explain(model, x, 0, method="lrp.composite", rules={"Dense": "eps"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['gama'\] for LRP rule 'gamma'.*'gamma'"):
        explain(model, x, 0, method="lrp.composite", rules={"Convolution": {"rule": "gamma", "gama": 0.1}})
    with pytest.raises(ValueError, match=r"key 'Conv' is neither a module name.*'Convolution'"):
        explain(model, x, 0, method="lrp.composite", rules={"Conv": "zplus"})
    with pytest.raises(ValueError, match=r"output must be one of \['logit', 'log_odds'\]"):
        explain(model, x, 0, method="lrp.composite", output="probability")


# ------------------------------------------------------------------------------ target functions
@pytest.mark.parametrize("method", NEW_METHODS)
def test_a_regression_target_function_gives_the_class_index_explanation(method):
    """A one-output regressor explained through regression_target() equals explaining class 0 of
    a classifier whose logit 0 is that output (the methods see the target function's score as that
    output). Class ids on a one-output model itself would read it as a binary classifier."""
    from xai_callbacks.scoring import regression_target

    torch.manual_seed(0)
    reg = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(16, 1)).eval()
    two = nn.Sequential(*reg[:-1], nn.Linear(16, 2)).eval()   # logit 0: the regressor's output; logit 1: 0
    with torch.no_grad():
        two[-1].weight.copy_(torch.cat([reg[-1].weight, torch.zeros_like(reg[-1].weight)]))
        two[-1].bias.copy_(torch.cat([reg[-1].bias, torch.zeros_like(reg[-1].bias)]))
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    opts = {**FAST.get(method, {}), **({"alpha": 0.0} if method == "lime" else {})}
    by_function = explain(reg, x, regression_target(), method=method, **opts)
    torch.testing.assert_close(by_function, explain(two, x, 0, method=method, **opts))


def test_deeplift_runs_under_deterministic_algorithms_and_leaves_the_flag_on():
    """Trainer(deterministic=True) turns on torch's global determinism; DeepLIFT through max pooling
    needs max_unpool2d, which has no deterministic kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = explain(model, x, 1, method="deeplift")
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(explain(model, x, 1, method="deeplift"), expected)
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
