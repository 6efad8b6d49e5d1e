"""The risky cells of the architecture matrix (the full matrix is ``benchmarks/architectures.py``):
LRP on DenseNet, LRP / Grad-CAM / attention rollout on vision transformers, token models.
Tiny configurations of the torchvision classes, random weights, CPU."""
from __future__ import annotations

import pathlib
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xai_callbacks.attribution import explain
from xai_callbacks.attribution.transformer import MethodNotApplicableError
from xai_callbacks.guard import hook_count

tv = pytest.importorskip("torchvision.models")
from torchvision.models.swin_transformer import SwinTransformer  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

ZENNIT_LRP = ["lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box", "lrp.epsilon_alpha2_beta1"]


def densenet(bias_free: bool = False) -> nn.Module:
    """A tiny torchvision DenseNet with non-trivial BatchNorm statistics; ``bias_free`` zeroes
    every BatchNorm's mean and shift and the classifier's bias (BatchNorm is then a pure scale)."""
    torch.manual_seed(0)
    model = tv.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(0 if bias_free else torch.randn(m.num_features, generator=g) * 0.2)
                m.bias.copy_(0 if bias_free else torch.randn(m.num_features, generator=g) * 0.1)
        model.classifier.bias.zero_() if bias_free else None
    return model.eval()


def vit(bias_free: bool = False, num_layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=num_layers, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=10)
    return _randomise(model, bias_free).eval()


def swin(bias_free: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            num_classes=10)
    return _randomise(model, bias_free).eval()


def _randomise(model: nn.Module, bias_free: bool) -> nn.Module:
    """torchvision zero-initialises the ViT head; give it weights. ``bias_free`` zeroes every
    bias, the class token and the position embedding (constants that absorb relevance)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if bias_free and (n.endswith("bias") or "class_token" in n or "pos_embedding" in n):
                p.zero_()
            elif n.startswith("heads"):
                p.normal_(0, 0.5)
    return model


def assert_conserved(relevance: torch.Tensor, model: nn.Module, x: torch.Tensor, target: int, rtol: float):
    with torch.no_grad():
        logit = model(x)[:, target]
    total = relevance.flatten(1).sum(1)
    torch.testing.assert_close(total, logit, rtol=rtol, atol=rtol * float(logit.abs().max()))


# ---------------------------------------------------------------------------------------------
# DenseNet: BatchNorm after concatenations


@pytest.mark.parametrize("method", ZENNIT_LRP + ["lrp.cp"])
def test_densenet_lrp_conserves_relevance_and_leaves_the_model_untouched(method):
    """alpha2-beta1 is not conservative where a neuron has no negative contributions: it only runs."""
    model, x = densenet(bias_free=True), torch.rand(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rel = explain(model, x, 2, method=method)
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0
    if method != "lrp.epsilon_alpha2_beta1":
        assert_conserved(rel, model, x, 2, rtol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hook_count(model) == 0


def test_densenet_lrp_equals_zennit_with_the_valid_merges_named():
    """The traced merge finds exactly the valid (conv, BatchNorm) pairs: conv0 -> norm0 and each
    layer's conv1 -> norm2; the BatchNorms after concatenations stay (zennit's pass rule)."""
    from zennit.canonizers import AttributeCanonizer, NamedMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    def head_as_modules(name, module):   # DenseNet's functional ReLU and pooling as zennit sees modules
        if not isinstance(module, tv.DenseNet):
            return None
        relu, pool = nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        return {"head_relu": relu, "head_pool": pool,
                "forward": lambda x: module.classifier(torch.flatten(pool(relu(module.features(x))), 1))}

    model, x = densenet(), torch.rand(2, 3, 16, 16)
    names = [((n.replace("norm2", "conv1"),), n) for n, _ in model.named_modules() if n.endswith("norm2")]
    merges = NamedMergeBatchNorm([(("features.conv0",), "features.norm0")] + names)
    composite = EpsilonPlusFlat(canonizers=[AttributeCanonizer(head_as_modules), merges])
    xr = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(xr)
        (ref,) = torch.autograd.grad(out, xr, grad_outputs=torch.zeros_like(out).index_fill_(1, torch.tensor([2]),
                                                                                          1.0) * out.detach())
    ours = explain(model, x, 2, method="lrp.epsilon_plus_flat")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _bias_free(model: nn.Module, size: int) -> nn.Module:
    """``benchmarks/lrp_conservation.py``'s model preparation: BatchNorm statistics of random
    inputs, then every bias and BatchNorm shift zeroed (LRP's z+ / epsilon rules conserve)."""
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "lrp_conservation.py"
    spec = importlib.util.spec_from_file_location("lrp_conservation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(1)
    return module.bias_free(model, size)


@pytest.mark.parametrize("name,rtol", [("mobilenet_v2", 1e-2), ("mnasnet0_5", 1e-2), ("regnet_x_400mf", 1e-2),
                                       ("mobilenet_v3_small", 0.5), ("efficientnet_b0", 0.5),
                                       ("regnet_y_400mf", 0.5)])
def test_lrp_conserves_relevance_through_torchvisions_functional_additions_and_gates(name, rtol):
    """Residual additions as functions passed the full relevance into both inputs: the input's
    relevance summed to 10^3 (MobileNetV2, MNASNet) up to 10^29 (EfficientNet-B0) times the logit,
    and NaN on RegNet-Y (``benchmarks/lrp_conservation.py``). With the norm rule on them
    (``FunctionalRules``), bias-free models conserve; with a squeeze-and-excitation gate (MobileNetV3, EfficientNet, RegNet-Y) the gate is held constant,
    which conserves up to a few tens of percent here (0.64-1.34 over three 64-pixel samples each)."""
    import torchvision

    torch.manual_seed(0)
    model = _bias_free(getattr(torchvision.models, name)(num_classes=4), 32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        target = int(model(x)[0].argmax())
    rel = explain(model, x, target, method="lrp.epsilon_plus_flat")
    assert torch.isfinite(rel).all()
    assert_conserved(rel, model, x, target, rtol=rtol)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and hook_count(model) == 0


def test_configured_lrp_and_concept_relevance_conserve_through_functional_additions():
    """``lrp.composite`` and the concept relevance run their own zennit forward passes: under the
    same functional rules (on a bias-free MobileNetV2 both summed to about 1,000x the logit before)."""
    import torchvision

    from xai_callbacks.concepts import concept_relevance

    torch.manual_seed(0)
    model = _bias_free(torchvision.models.mobilenet_v2(num_classes=4), 32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert_conserved(explain(model, x, 1, method="lrp.composite"), model, x, 1, rtol=1e-2)
    assert_conserved(concept_relevance(model, x, 1, "features.10").heatmap, model, x, 1, rtol=1e-2)


class _GatedCNN(nn.Module):
    """Gates as model code writes them, bias-free: a spatial gate (``x.mul_(g)`` in place), a
    channel gate (squeeze-and-excitation, ``x * sigmoid(...)`` as timm's blocks write it), one
    expanded to the signal's shape on the left (``g.expand_as(x) * x``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1, bias=False), nn.Conv2d(4, 8, 1, bias=False)
        self.spatial, self.head = nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = self.conv1(x)
        h.mul_(torch.sigmoid(self.spatial(x.mean(1, keepdim=True))))
        h = F.relu(h)
        h = h * torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3), keepdim=True)))))
        h = F.relu(self.conv2(h))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1))))).view(-1, 8, 1, 1)
        h = gate.expand_as(h) * h   # the gate as large as the signal: known as a sigmoid's output
        return self.head(h.mean((2, 3)))


def test_lrp_and_excitation_backprop_hold_gates_written_as_functions_constant():
    """The gated signal takes all of the relevance (or winning probability); the gradient of
    ``x * g`` scaled it by the gate and sent part into the gate's own layers (0.16x the logit
    here; timm's EfficientNet-B0 10^22x, MobileNetV3 10^12x: ``benchmarks/lrp_conservation.py
    --timm``)."""
    model, x = _GatedCNN().eval(), torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = int(model(x)[0].argmax())
    assert_conserved(explain(model, x, target, method="lrp.epsilon_plus_flat"), model, x, target, rtol=2e-3)
    mwp = explain(model, x, target, method="excitation_backprop")
    torch.testing.assert_close(mwp.flatten(1).sum(1), torch.ones(2), rtol=1e-4, atol=1e-4)
    from xai_callbacks.attribution.lrp import FunctionalRules

    with torch.no_grad():   # forward values unchanged by the rules: the same logits as without them
        plain = model(x)
        with FunctionalRules():
            torch.testing.assert_close(model(x), plain)


@pytest.mark.parametrize("make", ["torchvision/shufflenet_v2_x0_5", "timm/mobileone_s0", "timm/xception41"])
def test_zplus_passes_on_the_relevance_of_units_without_positive_contributions(make):
    """Depthwise convolutions feeding the next convolution without a ReLU (ShuffleNetV2, Xception)
    and sums of convolution branches (MobileOne): a unit whose value comes from negative
    contributions alone still gets relevance from above; zennit's z+ dropped it (ShuffleNetV2 kept
    0.30-0.48 of the logit, Xception 0.24-0.31) or, negative, inflated the total (MobileOne up to
    13x). On ReLU networks nothing changes (``test_methods_more.py`` compares with zennit)."""
    library, name = make.split("/")
    torch.manual_seed(0)
    if library == "timm":
        model = pytest.importorskip("timm").create_model(name, num_classes=4)
    else:
        model = getattr(tv, name)(num_classes=4)
    model = _bias_free(model, 32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = int(model(x)[0].argmax())
    assert_conserved(explain(model, x, target, method="lrp.epsilon_plus_flat"), model, x, target, rtol=0.05)


def test_zplus_is_zennits_bit_for_bit_where_no_unit_lacks_a_positive_contribution():
    """Where a layer's input has no negative value (after a ReLU; here both convolutions on the
    non-negative input, the second one on the input with negative values) our ZPlus skips zennit's
    pass of negative inputs through negative weights, which adds exactly 0: the same relevance, bit
    for bit."""
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite
    from zennit.rules import ZPlus as ZennitZPlus
    from zennit.types import Convolution

    from xai_callbacks.attribution.lrp import ZPlus

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 3)).eval()
    for x in (torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8)):
        relevance = []
        for rule in (ZPlus(), ZennitZPlus()):
            with Gradient(model, LayerMapComposite([(Convolution, rule)])) as attributor:
                relevance.append(attributor(x, torch.eye(3)[[0, 1, 2, 0]])[1])
        assert relevance[0].abs().sum() > 0 and torch.equal(relevance[0], relevance[1])


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation as BiT / NF-ResNets write it: the forward convolves with a weight
    computed from the stored one."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _ScaledCNN(nn.Module):
    """Bias-free; standardised convolutions, a group normalisation (BiT), a residual branch scaled
    by a parameter (NF-ResNet's alpha, a layer scale) and a division by a number."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = _StandardisedConv(3, 6, 3, padding=1, bias=False), _StandardisedConv(6, 6, 3, padding=1, bias=False)
        self.alpha, self.head = nn.Parameter(torch.full((1, 6, 1, 1), 0.3)), nn.Linear(6, 3, bias=False)
        self.norm = nn.GroupNorm(2, 6)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x):
        h = F.relu(self.norm(self.conv1(x)))
        h = h + F.relu(self.conv2(h)) * self.alpha
        return self.head((h / 4.0).mean((2, 3)))


class ChannelAttention(nn.Module):
    """CBAM's channel gate as user code names it: sigmoid(MLP(avg pool) + MLP(max pool))."""

    def __init__(self, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2, 1, bias=False), nn.ReLU(), nn.Conv2d(2, channels, 1, bias=False))

    def forward(self, x):
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class SpatialAttention(nn.Module):
    """CBAM's spatial gate: sigmoid(conv([mean over channels, max over channels]))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class _CbamCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.ca, self.sa, self.head = ChannelAttention(8), SpatialAttention(), nn.Linear(8, 3, bias=False)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = h * self.ca(h)
        h = h * self.sa(h)
        return self.head(h.mean((2, 3)))


def test_a_cnn_with_cbam_gates_named_attention_is_a_cnn():
    """Modules named ``ChannelAttention`` / ``SpatialAttention`` (CBAM) made the model a
    transformer by name: zennit's composites, excitation backprop and Grad-CAM's default layer
    were refused. They are gates: LRP conserves through them (held constant)."""
    from xai_callbacks.attribution.transformer import applicable_methods, model_lrp

    model, x = _CbamCNN().eval(), torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    assert model_lrp(model) == "lrp.epsilon_plus_flat"
    assert {"gradcam", "excitation_backprop", "lrp.epsilon_gamma_box"} <= set(applicable_methods(model))
    with torch.no_grad():
        target = int(model(x)[0].argmax())
    assert_conserved(explain(model, x, target, method="lrp.epsilon_plus_flat"), model, x, target, rtol=2e-3)


@pytest.mark.parametrize("make", ["own", "timm/nf_resnet26"])
def test_lrp_sees_computed_weights_and_passes_constant_scalings(make):
    """zennit's rules modify the stored weight, which a standardising layer transformed again (an
    NF-ResNet-26's heatmaps were 0); a group normalisation's gradient scaled the relevance by its
    weight over the standard deviation (timm's BiT ResNetV2-50: 10^-9x the logit); a product with
    a constant scaled it by the constant (NF-ResNet-26 kept 0.89x its logit with the computed
    weights alone). The model is left as it was."""
    if make == "own":
        model = _ScaledCNN().eval()
        x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    else:
        torch.manual_seed(0)
        model = _bias_free(pytest.importorskip("timm").create_model("nf_resnet26", num_classes=4), 32)
        x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        target = int(model(x)[0].argmax())
    assert_conserved(explain(model, x, target, method="lrp.epsilon_plus_flat"), model, x, target, rtol=1e-2)
    mwp = explain(model, x, target, method="excitation_backprop")
    torch.testing.assert_close(mwp.flatten(1).sum(1), torch.ones(2), rtol=1e-3, atol=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules()) and hook_count(model) == 0


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "rexnet_100", "lcnet_050"])
def test_lrp_and_excitation_backprop_conserve_on_timm_models_with_gates(name):
    """timm's squeeze-and-excitation blocks (``x * self.gate(x_se)``, at 1x1 at the end of a
    32-pixel input): bias-free, LRP summed to 4-10^11x the logit and MWP as much before the gate
    rule (``benchmarks/lrp_conservation.py --timm``)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _bias_free(timm.create_model(name, num_classes=4), 32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = int(model(x)[0].argmax())
    assert_conserved(explain(model, x, target, method="lrp.epsilon_plus_flat"), model, x, target, rtol=0.1)
    mwp = explain(model, x, target, method="excitation_backprop")
    assert (mwp >= 0).all() and ((mwp.flatten(1).sum(1) - 0.85).abs() < 0.15).all()


class _OwnResidualCNN(nn.Module):
    """A residual CNN as CIFAR code writes it: ``out += shortcut`` then ``F.relu``, ``F.avg_pool2d``
    and ``x.mean``: every addition and pooling a function, no bias."""

    def __init__(self, add: str = "+="):
        super().__init__()
        torch.manual_seed(0)
        self.add = add
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(4))
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        out = torch.nn.functional.relu(self.stem(x))
        for conv in self.blocks:
            h = conv(out)
            if self.add == "+=":
                h += out
            elif self.add == "add_":   # a statement: h itself must change
                h.add_(out)
            else:
                h = torch.add(h, out)
            out = torch.nn.functional.relu(h)
        return self.head(torch.nn.functional.avg_pool2d(out, 2).mean((2, 3)))


@pytest.mark.parametrize("method,add", [("lrp.epsilon_plus_flat", "+="), ("lrp.epsilon_plus", "add_"),
                                        ("lrp.epsilon_plus", "torch.add")])
def test_lrp_conserves_relevance_through_a_models_own_functional_additions_and_pooling(method, add):
    """Without the norm rule on functional additions each addition passed the full relevance into
    both inputs: the input's relevance summed to 8.6x the logit here; now to the logit."""
    model, x = _OwnResidualCNN(add).eval(), torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), _OwnResidualCNN("+=").eval()(x))   # the three spell one model
    rel = explain(model, x, 1, method=method)
    assert_conserved(rel, model, x, 1, rtol=1e-4)


@pytest.mark.parametrize("pool", ["mean", "sum", "bag-sum", "bag-mean", "bag-max", "bag-weighted"])
def test_token_lrp_through_a_pooling_of_embeddings_follows_the_tokens(pool):
    """A bag of embeddings (a mean, a sum or an ``nn.EmbeddingBag`` with padding 0 over the tokens,
    then a dense layer): the pooling's norm rule gives each token its share of the linear logit (a
    bag's max the token that wins each dimension); the gradient gave every token the same relevance."""
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            mode = pool.removeprefix("bag-").replace("weighted", "sum")
            self.embedding = nn.EmbeddingBag(20, 6, mode=mode, padding_idx=0) if pool.startswith("bag") \
                else nn.Embedding(20, 6)
            self.head = nn.Linear(6, 2, bias=False)

        def forward(self, tokens):
            if pool == "bag-weighted":
                return self.head(self.embedding(tokens, per_sample_weights=tokens.float() / 10))
            e = self.embedding(tokens)
            return self.head(e if pool.startswith("bag") else getattr(e, pool)(1))

    model, tokens = Bag().eval(), torch.tensor([[1, 2, 3, 4], [5, 7, 6, 0]])
    rel = explain(model, tokens, 0, method="lrp.epsilon_plus")
    with torch.no_grad():
        e, logit, w = model.embedding.weight[tokens], model(tokens)[:, 0], model.head.weight[0]
        if pool == "bag-max":   # per dimension the winning token's value (no ties here)
            e = e * (e == e.masked_fill(tokens[..., None] == 0, -torch.inf).amax(1, keepdim=True))
        if pool.startswith("bag"):
            e = e * (tokens > 0)[..., None]   # the padding is left out
        if pool == "bag-weighted":
            e = e * tokens[..., None] / 10
        count = (tokens > 0).sum(1, keepdim=True) if pool.startswith("bag") else tokens.shape[1]
        want = (e * w).sum(2) / (count if pool.endswith("mean") else 1)   # token i's part of the linear logit
    # up to the dense layer's epsilon stabiliser
    torch.testing.assert_close(rel, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(rel.sum(1), logit, rtol=1e-3, atol=1e-5)


def test_a_model_that_embeds_other_ids_than_the_explained_ones_is_refused_by_name():
    """A bag given the flat ids and offsets, a model that puts a [CLS] id before the ids: the error
    names the shapes and what to do, where it was a shape mismatch deep inside the model."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 3)

        def forward(self, tokens):
            return self.bag(tokens.flatten(), torch.arange(0, tokens.numel(), tokens.shape[1]))

    class Cls(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.head = nn.Embedding(20, 3), nn.Linear(3, 2)

        def forward(self, tokens):
            return self.head(self.embedding(torch.cat([torch.zeros_like(tokens[:, :1]), tokens], 1)).mean(1))

    tokens = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"EmbeddingBag was called with ids of shape \(4,\), not the explained ones "
                                         r"\(2, 2\) \(an nn.EmbeddingBag given 1-D ids and offsets"):
        explain(Flat(), tokens, 0, method="input_x_gradient")
    with pytest.raises(ValueError, match=r"shape \(\d, 3\), not the explained ones \(\d, 2\): .*\[CLS\] token"):
        explain(Cls(), tokens, 0, method="lrp.epsilon_plus")


def test_excitation_backprop_through_a_functional_residual_addition_is_a_distribution():
    """Marginal winning probabilities sum to 1 over the input; RegNet's residual additions as
    functions passed the full probability into both inputs (about 10^6 at 64 pixels)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.regnet_x_400mf(num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mwp = explain(model, x, 1, method="excitation_backprop")
    torch.testing.assert_close(mwp.flatten(1).sum(1), torch.ones(2), rtol=1e-4, atol=1e-4)


def test_excitation_backprop_counts_negative_activations_as_not_excited():
    """x = (1, -2) -> h = W1 x = (3, -1), no activation -> W2 = (1, 2), target 0.
    With a+ = max(a, 0): P(h) = (1 * 3 / 3, 0) = (1, 0), then W1+ row 0 = (1, 0), x+ = (1, 0):
    P(x) = (1, 0). The signed rule gave P(h) = (3 / (3 - 2), -2 / 1) = (3, -2)."""
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        net[1].weight.copy_(torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(explain(net, torch.tensor([[1.0, -2.0]]), 0, method="excitation_backprop"),
                               torch.tensor([[1.0, 0.0]]))


@pytest.mark.parametrize("name", ["shufflenet_v2_x0_5", "mobilenet_v3_small", "efficientnet_b0"])
def test_excitation_backprop_is_a_distribution_where_activations_go_negative(name):
    """Depthwise convolutions feeding the next one (ShuffleNetV2), linear bottlenecks, Hardswish and
    SiLU (MobileNetV3, EfficientNet), inputs normalised to signed values: MWP is non-negative and sums
    to at most 1. With signed activations in the rule: sums of -10^2 (ShuffleNetV2), 10^11
    (MobileNetV3), NaN (EfficientNet)."""
    torch.manual_seed(0)
    model = getattr(tv, name)(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mwp = explain(model, x, 1, method="excitation_backprop")
    total = mwp.flatten(1).sum(1)
    assert torch.isfinite(mwp).all() and (mwp >= 0).all() and (total > 0.01).all() and (total <= 1 + 1e-4).all()


def test_excitation_backprop_refuses_layer_norm_models():
    """ConvNeXt's LayerNorm and layer scale have no MWP rule (the probabilities vanished, 10^-6)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from xai_callbacks.attribution.transformer import applicable_methods

    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3).eval()
    for method in ("excitation_backprop", "excitation_backprop.contrastive"):
        with pytest.raises(MethodNotApplicableError, match=rf"{method}' does not apply to ConvNeXt.*LayerNorm"):
            explain(model, torch.rand(1, 3, 32, 32), 0, method=method)
        assert method not in applicable_methods(model)


def test_cp_lrp_runs_through_in_place_activations_and_additions():
    """torchvision's SiLU(inplace=True) then an in-place residual addition (EfficientNetV2's fused
    blocks): the identity rule's output is a new tensor, so the addition may write into it."""
    class Block(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.act, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.SiLU(inplace=inplace), nn.Linear(3, 2)

        def forward(self, x):
            h = self.act(self.conv(x))
            h += x
            return self.head(h.mean((2, 3)))

    x = torch.rand(2, 3, 8, 8)
    ours = explain(Block(inplace=True), x, 1, method="lrp.cp")
    torch.testing.assert_close(ours, explain(Block(inplace=False), x, 1, method="lrp.cp"))


# ---------------------------------------------------------------------------------------------
# vision transformers


@pytest.mark.parametrize("make", [vit, swin], ids=["vit", "swin"])
def test_cp_lrp_conserves_relevance_on_bias_free_transformers(make):
    model, x = make(bias_free=True), torch.rand(2, 3, 32, 32)
    rel = explain(model, x, 3, method="lrp.cp")
    assert rel.abs().sum() > 0
    assert_conserved(rel, model, x, 3, rtol=1e-4)


@pytest.fixture()
def lxt_patches(monkeypatch):
    """lxt's efficient patches, imported without its package ``__init__`` (which imports every
    Hugging Face model it knows); the classes it patches are restored afterwards."""
    lxt = pytest.importorskip("lxt")
    stub = types.ModuleType("lxt.efficient")
    stub.__path__ = [str(pathlib.Path(lxt.__file__).parent / "efficient")]
    monkeypatch.setitem(sys.modules, "lxt.efficient", stub)
    for name in ("lxt.efficient.patches", "lxt.efficient.rules"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import lxt.efficient.patches as patches

    yield patches
    for name in ("lxt.efficient.patches", "lxt.efficient.rules"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("method", ["lrp.cp", "lrp.attn"])
def test_transformer_lrp_on_vit_equals_lxt(lxt_patches, method):
    """lxt's rules for torchvision's ViT patch the GELU, LayerNorm and MultiheadAttention
    classes (lxt's CP-LRP map; for AttnLRP its uniform rule, ``divide_gradient``, on query, key
    and value as lxt does for Hugging Face attention); ours changes only one forward pass. Same
    relevance, with biases."""
    p = lxt_patches
    from lxt.efficient.rules import divide_gradient

    def attn_lrp_forward(self, query, key, value, *args, **kwargs):
        return self.original_forward(divide_gradient(query, 4), divide_gradient(key, 4), divide_gradient(value, 2),
                                     *args, **kwargs)

    model, x = vit(), torch.rand(2, 3, 32, 32)
    ours = explain(model, x, 3, method=method)
    attention = p.cp_multi_head_attention_forward if method == "lrp.cp" else attn_lrp_forward
    patched = {nn.GELU: (p.non_linear_forward, True), nn.LayerNorm: (p.layer_norm_forward, False),
               nn.MultiheadAttention: (attention, True)}
    saved = {cls: cls.forward for cls in patched}
    try:
        for cls, (fn, keep) in patched.items():
            p.patch_method(fn, cls, keep_original=keep)
        xr = x.clone().requires_grad_(True)
        model(xr)[:, 3].sum().backward()
        ref = (xr * xr.grad).detach()
    finally:
        for cls, fn in saved.items():
            cls.forward = fn
            if "original_forward" in cls.__dict__:
                del cls.original_forward
    assert nn.LayerNorm.forward is saved[nn.LayerNorm]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


class Bilinear(nn.Module):
    """logits = head(flatten(q k^T)) with q, k bias-free projections of the tokens: homogeneous
    of degree 2 in the input, so gradient x input sums to twice the logit."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.head = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(9, 2, bias=False)

    def forward(self, x):
        return self.head(self.q(x).matmul(self.k(x).transpose(-1, -2)).flatten(1))


def test_attn_lrp_uniform_rule_conserves_a_product_of_activations():
    model, x = Bilinear(), torch.randn(2, 3, 4)
    with torch.no_grad():
        logit = model(x)[:, 1]
    total = explain(model, x, 1, method="lrp.attn").flatten(1).sum(1)
    torch.testing.assert_close(total, logit, rtol=1e-4, atol=1e-6)
    plain = explain(model, x, 1, method="input_x_gradient").flatten(1).sum(1)
    torch.testing.assert_close(plain, 2 * logit, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [vit, swin], ids=["vit", "swin"])
@pytest.mark.parametrize("method", ZENNIT_LRP)
def test_zennit_lrp_on_transformers_names_architecture_method_and_alternatives(make, method):
    model = make()
    with pytest.raises(MethodNotApplicableError) as err:
        explain(model, torch.rand(1, 3, 32, 32), 0, method=method)
    msg = str(err.value)
    assert type(model).__name__ in msg and repr(method) in msg and "lrp.cp" in msg and "saliency" in msg


def test_callbacks_name_a_method_that_does_not_apply_before_any_epoch():
    from xai_callbacks import AttributionCallback, SpRAyCallback
    from xai_callbacks.models import Classifier

    module = Classifier(vit())
    with pytest.warns(UserWarning, match=r"AttributionCallback: method\(s\) \['lrp.epsilon_plus_flat'\] do not apply "
                                         r"to VisionTransformer; methods that apply: \[.*'lrp.cp'"):
        AttributionCallback(methods=["saliency", "lrp.epsilon_plus_flat"]).setup(None, module, "fit")
    with pytest.raises(MethodNotApplicableError, match=r"SpRAyCallback: method\(s\) \['lrp.epsilon_plus_flat'\]"):
        SpRAyCallback(method="lrp.epsilon_plus_flat", on_error="raise").setup(None, module, "fit")
    AttributionCallback(methods=["saliency", "lrp.cp"], on_error="raise").setup(None, module, "fit")   # they apply
    cnn, transformer = AttributionCallback(on_error="raise"), AttributionCallback(on_error="raise")
    cnn.setup(None, Classifier(), "fit")   # the defaults: saliency and the model's LRP
    transformer.setup(None, module, "fit")
    assert cnn.methods == ["saliency", "lrp.epsilon_plus_flat"] and transformer.methods == ["saliency", "lrp.attn"]
    with pytest.raises(ValueError, match="need named methods"):
        AttributionCallback(method_options={"saliency": {}})


def test_the_model_lrp_of_a_dense_first_layer_has_no_flat_rule():
    """The flat rule gives every input of a dense first layer the same relevance: on an MLP over
    features (or an embedding followed by dense layers) each heatmap would be constant."""
    from xai_callbacks.attribution.transformer import model_lrp

    torch.manual_seed(0)
    mlp, rows = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), torch.randn(5, 6)
    flat = explain(mlp, rows, 1, method="lrp.epsilon_plus_flat")
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), rtol=1e-4)   # constant over the features
    assert model_lrp(mlp) == model_lrp(BagOfEmbeddings()) == "lrp.epsilon_plus"
    assert model_lrp(densenet()) == "lrp.epsilon_plus_flat" and model_lrp(vit()) == "lrp.attn"
    rel = explain(mlp, rows, 1, method=model_lrp(mlp))
    assert (rel.std(1) > 1e-3).all()
    # on a bias-free ReLU MLP the epsilon rule everywhere is gradient x input (LRP-0)
    bias_free = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    torch.testing.assert_close(explain(bias_free, rows, 1, method="lrp.epsilon_plus", epsilon=1e-12),
                               explain(bias_free, rows, 1, method="input_x_gradient"), rtol=1e-4, atol=1e-5)


def test_spray_at_its_defaults_explains_a_vit_with_attnlrp_and_a_cnn_with_zennit(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import make_trainer
    from xai_callbacks import SpRAyCallback
    from xai_callbacks.models import Classifier

    cnn = SpRAyCallback(on_error="raise")
    cnn.setup(None, Classifier(), "fit")
    assert cnn.method == "lrp.epsilon_plus_flat" and cnn.explained_methods == ("lrp.epsilon_plus_flat",
                                                                                "input_x_gradient")
    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 32, 32), torch.arange(24) % 2
    cb = SpRAyCallback(max_per_class=12, evidence=False, save_virelay=False, on_error="raise",
                       spray_options={"visualisation": None, "k": 4})
    make_trainer(tmp_path, [cb]).validate(Classifier(vit()), DataLoader(TensorDataset(x, y), 12),
                                          verbose=False)
    assert cb.method == "lrp.attn" and sorted(cb.results) == [0, 1]
    assert cb.results[0].prototypes.shape[1:] == (3, 32, 32) and np.isfinite(cb.results[0].prototypes).all()
    with pytest.raises(ValueError, match=r"method_options \{'epsilon': 0.1\} need a named method"):
        SpRAyCallback(method_options={"epsilon": 0.1})


def test_vit_gradcam_reads_the_token_grid_not_the_patch_embedding():
    """Reference computed here by hand: gradients and activations of the last block's input
    tokens, class token dropped, 4x4 grid, channel weights = mean gradient."""
    import torch.nn.functional as F

    model, x = vit(), torch.rand(2, 3, 32, 32)
    layer, acts = model.encoder.layers[-1].ln_1, []

    def keep(module, inputs, output):
        output.retain_grad()
        acts.append(output)

    h = layer.register_forward_hook(keep)
    model(x)[:, 3].sum().backward()
    h.remove()
    a, g = acts[0][:, 1:], acts[0].grad[:, 1:]  # (B, 16, D)
    cam = ((g.mean(1, keepdim=True) * a).sum(-1)).clamp(min=0).reshape(2, 1, 4, 4)
    ref = F.interpolate(cam.detach(), size=(32, 32), mode="bilinear", align_corners=False).expand(2, 3, 32, 32)
    ours = explain(model, x, 3, method="gradcam")
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    conv_cam = explain(model, x, 3, method="gradcam", layer="conv_proj")
    assert not torch.allclose(ours, conv_cam)
    named = explain(model, x, 3, method="gradcam", layer="encoder.layers.encoder_layer_1.ln_1")
    torch.testing.assert_close(named, ref, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"'ln_1' not found.*LayerNorms \(token output\): \[.*'encoder.layers"):
        explain(model, x, 3, method="gradcam", layer="ln_1")   # the error lists the token layers to choose from


def test_swin_gradcam_runs_on_its_feature_grid():
    model, x = swin(), torch.rand(2, 3, 32, 32)
    rel = explain(model, x, 3, method="gradcam", relu=False)
    assert rel.shape == x.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0


def test_convnext_gradcam_is_captums_on_its_last_convolution():
    """ConvNeXt has LayerNorm but no attention: a CNN whose last convolution is a spatial map."""
    from captum.attr import LayerGradCam
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    from xai_callbacks.attribution.transformer import applicable_methods

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    ref = LayerGradCam(model, last).attribute(x.clone().requires_grad_(True), target=y, relu_attributions=True)
    ref = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False).expand_as(x)
    torch.testing.assert_close(explain(model, x, y, method="gradcam"), ref, rtol=1e-5, atol=1e-7)
    assert "gradcam" in applicable_methods(model) and "lrp.epsilon_plus_flat" not in applicable_methods(model)


def test_attention_rollout_of_one_layer_without_residual_is_the_class_token_attention():
    model, x = vit(num_layers=1), torch.rand(2, 3, 32, 32)
    block = model.encoder.layers[0]
    with torch.no_grad():
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(2, -1, -1), tokens], 1) + model.encoder.pos_embedding
        z = block.ln_1(tokens)
        _, w = block.self_attention(z, z, z, need_weights=True, average_attn_weights=True)
    expected = torch.nn.functional.interpolate(w[:, 0, 1:].reshape(2, 1, 4, 4), size=(32, 32), mode="bilinear",
                                               align_corners=False).expand(2, 3, 32, 32)
    ours = explain(model, x, 0, method="attention_rollout", residual=0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def _timm_vit(distilled: bool) -> nn.Module:
    """A one-block ViT as timm builds them (fused attention); ``distilled``: DeiT's with a class and
    a distillation token before the 4x4 patch tokens."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)
    make = timm_vit.VisionTransformer
    if distilled:
        make = pytest.importorskip("timm.models.deit").VisionTransformerDistilled
    model = make(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3).eval()
    nn.init.normal_(model.head.weight, std=0.5)
    return model


def _timm_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first block's normalised input tokens (B, prefix + 16, D)."""
    seen = []
    handle = model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("distilled", [False, True], ids=["vit", "deit_distilled"])
def test_attention_rollout_and_gradcam_on_vits_built_as_timms_are(distilled):
    """timm's attention is one fused ``F.scaled_dot_product_attention`` (no weights to read) and its
    ViTs may put more than a class token before the patches (DeiT's distillation token): both
    methods refused every timm ViT. Rollout of one block without the residual is the class
    token's attention over the patches (computed here from the block's q and k); Grad-CAM's map is
    the gradient-weighted channel sum over the patch tokens of the last block's normalised input."""
    model, x = _timm_vit(distilled), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prefix, attn = model.num_prefix_tokens, model.blocks[0].attn
    with torch.no_grad():
        z = _timm_tokens(model, x)
        q, k, _ = attn.qkv(z).reshape(2, z.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * attn.head_dim ** -0.5).softmax(-1).mean(1)
    expected = F.interpolate(w[:, 0, prefix:].reshape(2, 1, 4, 4), size=(32, 32), mode="bilinear",
                             align_corners=False).expand(2, 3, 32, 32)
    torch.testing.assert_close(explain(model, x, 0, method="attention_rollout", residual=0.0), expected,
                               rtol=1e-4, atol=1e-6)

    acts = []   # Grad-CAM by hand
    handle = model.blocks[0].norm1.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        score = model(x.clone().requires_grad_(True))[:, 2].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, acts[0])
    a, g = acts[0].detach()[:, prefix:], grad[:, prefix:]   # (B, 16, D)
    cam = (g.mean(1, keepdim=True) * a).sum(-1).clamp(min=0).reshape(2, 1, 4, 4)
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False).expand(2, 3, 32, 32)
    torch.testing.assert_close(explain(model, x, 2, method="gradcam"), expected, rtol=1e-4, atol=1e-6)


class _Hybrid(nn.Module):
    """Convolutions, self-attention over the positions, a final convolution (as MobileViT)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.attention = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.MultiheadAttention(8, 2, batch_first=True)
        self.final, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + self.attention(tokens, tokens, tokens, need_weights=False)[0]
        h = torch.relu(self.final(tokens.transpose(1, 2).reshape(b, c, hh, ww)))
        return self.head(h.mean((2, 3)))


def test_gradcam_on_a_hybrid_reads_the_convolution_after_the_attention():
    """A model whose last convolution follows its attention (MobileViT, timm's ``mobilevit_xxs``
    as well) was refused like a ViT; Grad-CAM is captum's at that convolution."""
    from captum.attr import LayerGradCam

    from xai_callbacks.attribution.transformer import applicable_methods

    model, x, y = _Hybrid().eval(), torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    ref = LayerGradCam(model, model.final).attribute(x.clone().requires_grad_(True), target=y, relu_attributions=True)
    ref = F.interpolate(ref, size=(16, 16), mode="bilinear", align_corners=False).expand_as(x)
    torch.testing.assert_close(explain(model, x, y, method="gradcam"), ref, rtol=1e-5, atol=1e-7)
    assert "gradcam" in applicable_methods(model)


def test_attention_rollout_refuses_swin_and_cnns():
    for model in (swin(), densenet()):
        with pytest.raises(MethodNotApplicableError, match=type(model).__name__):
            explain(model, torch.rand(1, 3, 32, 32), 0, method="attention_rollout")


# ---------------------------------------------------------------------------------------------
# token models


def test_a_huggingface_vit_gets_token_gradcam_and_rollout():
    """HuggingFace's ViT (wrapped to return its logits) was not recognised as a ViT: default
    Grad-CAM and rollout were refused. Its blocks are found by structure (a LayerNorm and an
    attention layer in one module): Grad-CAM's default is its last block's first LayerNorm; rollout
    reads the fused attention and names the fix for an eager one."""
    transformers = pytest.importorskip("transformers")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for implementation in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3,
                                        attn_implementation=implementation)
        model = _Logits(transformers.ViTForImageClassification(config), "pixel_values").eval()
        last = [n for n, _ in model.named_modules() if n.endswith("layernorm_before")][-1]
        torch.testing.assert_close(explain(model, x, 2, method="gradcam"),
                                   explain(model, x, 2, method="gradcam", layer=last))
        if implementation == "sdpa":
            rollout = explain(model, x, 2, method="attention_rollout")
            assert torch.isfinite(rollout).all() and (rollout >= 0).all() and rollout.amax() > 0
        else:
            with pytest.raises(MethodNotApplicableError, match="no attention weights were recorded.*sdpa"):
                explain(model, x, 2, method="attention_rollout")


class _Logits(nn.Module):
    """A HuggingFace classifier as a LightningModule's forward calls it."""

    def __init__(self, net: nn.Module, argument: str = "input_ids"):
        super().__init__()
        self.net, self.argument = net, argument

    def forward(self, inputs):
        return self.net(**{self.argument: inputs}).logits


@pytest.mark.parametrize("method", ["lrp.cp", "lrp.attn", "integrated_gradients"])
def test_a_huggingface_text_classifier_is_explained_per_token_with_either_attention(method):
    """A HuggingFace BERT classifier as a LightningModule calls it (``net(ids).logits``): one
    relevance per token, the same whether its attention runs eagerly (``matmul``, ``softmax``) or
    fused (``F.scaled_dot_product_attention``), and the model's LRP is AttnLRP."""
    transformers = pytest.importorskip("transformers")
    from xai_callbacks.attribution.transformer import model_lrp

    heatmaps = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16, num_labels=3,
                                         attn_implementation=implementation)
        model = _Logits(transformers.BertForSequenceClassification(config)).eval()
        ids = torch.randint(1, 50, (2, 8), generator=torch.Generator().manual_seed(1))
        heatmaps[implementation] = explain(model, ids, 1, method=method)
        assert model_lrp(model) == "lrp.attn"
    with pytest.raises(ValueError, match=r"got SequenceClassifierOutput \(its scores are its \.logits"):
        explain(model.net, ids, 1, method=method)   # the HuggingFace model itself: the error says what to do
    assert heatmaps["eager"].shape == (2, 8) and torch.isfinite(heatmaps["eager"]).all()
    assert heatmaps["eager"].abs().amax() > 0
    torch.testing.assert_close(heatmaps["eager"], heatmaps["sdpa"], rtol=1e-4, atol=1e-7)


class BagOfEmbeddings(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(50, 8)
        self.net = nn.Sequential(nn.Linear(8, 16, bias=bias), nn.ReLU(), nn.Linear(16, 4, bias=bias))

    def forward(self, tokens):
        return self.net(self.embedding(tokens)).mean(1)


class TextTransformer(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, activation="gelu", bias=bias)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4, bias=bias)

    def forward(self, tokens):
        return self.head(self.encoder(self.embedding(tokens)).mean(1))


TOKENS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad",
                                    "guided_backprop", "lrp.cp"])
def test_token_relevance_is_one_per_token_and_chunking_does_not_change_it(method):
    """SmoothGrad's noise depends on the chunk's shape: only its shape is compared."""
    model = TextTransformer()
    opts = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 3}}.get(method, {})
    rel = explain(model, TOKENS, 1, method=method, **opts)
    assert rel.shape == TOKENS.shape and torch.isfinite(rel).all() and rel.abs().sum() > 0
    chunked = explain(model, TOKENS, 1, method=method, batch_size=2, **opts)
    if method != "smoothgrad":
        torch.testing.assert_close(chunked, rel)


def test_token_relevance_under_lightning_validation_contexts():
    """Lightning validates under no_grad (in fit) and inference_mode (standalone validate)."""
    model = TextTransformer()
    expected = explain(model, TOKENS, 1, method="lrp.cp")
    for outer in (torch.inference_mode, torch.no_grad):
        with outer():
            tokens = TOKENS.clone()  # an inference tensor under inference_mode, like Lightning's batches
            rel = explain(model, tokens, 1, method="lrp.cp")
        torch.testing.assert_close(rel, expected)


def test_token_input_x_gradient_equals_captum_on_the_embedding_layer():
    ca = pytest.importorskip("captum.attr")
    model = TextTransformer().eval()
    ref = ca.LayerGradientXActivation(model, model.embedding).attribute(TOKENS, target=1).sum(-1)
    torch.testing.assert_close(explain(model, TOKENS, 1, method="input_x_gradient"), ref.detach())


@pytest.mark.parametrize("model,method", [(BagOfEmbeddings(bias=False), "lrp.epsilon_plus_flat"),
                                          (TextTransformer(bias=False), "lrp.cp")], ids=["bag-lrp", "transformer-cp"])
def test_token_lrp_conserves_relevance_on_bias_free_models(model, method):
    rel = explain(model, TOKENS, 2, method=method)
    assert_conserved(rel, model.eval(), TOKENS, 2, rtol=1e-4)


def test_token_input_to_image_methods_and_models_without_embedding_is_refused():
    with pytest.raises(MethodNotApplicableError, match="'occlusion' does not apply to token ids"):
        explain(BagOfEmbeddings(), TOKENS, 0, method="occlusion")
    with pytest.raises(ValueError, match="nn.Embedding"):
        explain(nn.Sequential(nn.Flatten(), nn.Linear(7, 2)), TOKENS, 0, method="saliency")
    with pytest.raises(ValueError, match="0..49"):
        explain(BagOfEmbeddings(), TOKENS + 50, 0, method="saliency")


def test_callback_logs_tokens_highlighted_by_relevance_to_wandb(tmp_path, wandb_logger):
    """A text classifier in a real Trainer: one HTML panel per method and epoch, read back from
    the offline W&B run, whose tokens are the vocabulary's words coloured by their relevance."""
    import os

    import wandb
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import make_trainer
    from xai_callbacks import AttributionCallback
    from xai_callbacks.models import Classifier
    from wandb_records import history

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (48, 7), generator=g)
    labels = (tokens == 3).any(1).long() + 2 * (tokens == 4).any(1).long()
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=16)
    vocab = [f"w{i}" for i in range(50)]
    cb = AttributionCallback(methods=["saliency", "lrp.cp"], probe_size=8, n_images=3, vocab=vocab)
    trainer = make_trainer(tmp_path, [cb], logger=wandb_logger, max_epochs=2, limit_train_batches=2)
    trainer.fit(Classifier(TextTransformer(), lr=1e-3), loader, loader)
    run = os.path.dirname(wandb_logger.experiment.dir)
    wandb.finish()
    assert cb.errors == 0
    # the offline writer may still be flushing the record file after finish (see the flaky-test
    # issue): read until both methods' panels of both epochs are there, at most 20 s
    import time

    deadline = time.monotonic() + 20
    while True:
        rows = history(run)
        if sum("xai/tokens/lrp.cp/_type" in r for r in rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for method in ("saliency", "lrp.cp"):
        panels = [r for r in rows if r.get(f"xai/tokens/{method}/_type") == "html-file"]
        assert len(panels) == 2, f"{method}: one panel per epoch expected, got {len(panels)}"
        page = open(os.path.join(run, "files", panels[-1][f"xai/tokens/{method}/path"])).read()
        assert page.count("<span") == 3 * 7 and "background-color: rgb(" in page and "w" in page
        assert cb.heatmaps[method].shape == (8, 7)


def test_tokens_html_colours_follow_the_relevance_sign():
    from xai_callbacks.render import tokens_html

    page = tokens_html(["good", "<b>", "bad"], torch.tensor([1.0, 0.0, -1.0]))
    assert "&lt;b&gt;" in page  # escaped
    spans = page.split("<span")[1:]
    red, white, blue = (s[s.index("rgb(") + 4:s.index(")")].split(",") for s in spans)
    assert int(red[0]) > int(red[2]) and int(blue[2]) > int(blue[0]) and min(map(int, white)) > 240
    with pytest.raises(ValueError, match="2 tokens but 3"):
        tokens_html(["a", "b"], [1, 2, 3])
