"""Layer-wise relevance propagation through zennit's composites and canonizers.

Canonizers are picked from the model: torchvision ResNets get zennit's ``ResNetCanonizer``
(BatchNorm merged, residual additions as explicit ``Sum`` layers); other models get
:class:`TracedMergeBatchNorm`, which merges a BatchNorm into the linear or convolution layer
before it only where one forward pass shows that the BatchNorm reads exactly that layer's output.
A BatchNorm after a concatenation (DenseNet) or after a pooling layer is left as it is and gets
zennit's rule for BatchNorm (relevance passed through unchanged). Canonizers merge BatchNorm
running statistics, which is valid in eval mode only: the guard puts the model in eval mode
first; and the model's parameter and buffer values are copied before the canonizers run and put
back if anything raises (:func:`~xai_callbacks.guard.preserve_values`).

Transformers (attention, LayerNorm) have no zennit rules; the composites here refuse them before
touching the model and name the methods that apply (``lrp.cp``, see ``transformer.py``).
Models with their own residual additions should add through ``zennit.layer.Sum`` so the
composites see them.
"""
from __future__ import annotations

import torch
from torch import nn
from zennit import composites, canonizers
from zennit.types import BatchNorm, Linear as ZennitLinear

from . import CheckedForward, register_method
from ..guard import input_gradient, preserve_values
from .transformer import refuse_transformer


class TracedMergeBatchNorm(canonizers.SequentialMergeBatchNorm):
    """Merge each BatchNorm into the linear / convolution layer whose output it reads, as found by
    one forward pass of ``example`` (identity of the tensors passed between the modules), not by
    the order of the modules in the model. A BatchNorm whose input is a concatenation, a sum, a
    pooled or otherwise transformed tensor is not merged; neither is one whose linear layer's
    output is also read by another module.

    Args:
        example: one input batch (a single sample suffices) to trace the data flow with; None
            until :func:`lrp` sets the batch being explained.
    """

    def __init__(self, example: torch.Tensor | None = None):
        super().__init__()
        self.example = example

    def copy(self):
        return canonizers.SequentialMergeBatchNorm()

    def apply(self, root_module: nn.Module) -> list:
        if self.example is None:
            raise ValueError("TracedMergeBatchNorm needs an example input to trace the model with")
        instances = []
        for linear, norm in traced_batchnorm_pairs(root_module, self.example):
            instance = self.copy()
            instance.register((linear,), norm)
            instances.append(instance)
        return instances


def traced_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, nn.Module]]:
    """(linear, batchnorm) pairs where the BatchNorm's input is the linear layer's output and no
    other module reads that output, found by one forward pass of ``example`` without gradients."""
    outputs, readers = {}, {}  # id(tensor) -> producing linear layer; id(tensor) -> reading modules
    handles, alive = [], []  # every recorded tensor is kept alive so its id stays unique

    def record(module, inputs, output):
        for t in inputs:
            if isinstance(t, torch.Tensor):
                readers.setdefault(id(t), []).append(module)
                alive.append(t)
        if isinstance(module, ZennitLinear) and isinstance(output, torch.Tensor):
            outputs[id(output)] = module
            alive.append(output)

    try:
        for m in model.modules():
            if not list(m.children()):
                handles.append(m.register_forward_hook(record))
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for key, linear in outputs.items():
        mods = readers.get(key, [])
        if len(mods) == 1 and isinstance(mods[0], BatchNorm) and getattr(linear, "weight", None) is not None:
            pairs.append((linear, mods[0]))
    return pairs


class DenseNetHeadCanonizer(canonizers.AttributeCanonizer):
    """torchvision's DenseNet applies its final ReLU and average pooling as functions, which no
    LRP rule sees: the pooling would spread relevance evenly over positions and the ReLU's
    gradient would drop what lands on negative features. While registered, the DenseNet runs them
    as modules (``head_relu``, ``head_pool``), so they get the composites' rules (pass, norm)."""

    def __init__(self):
        super().__init__(self.attributes)

    @staticmethod
    def attributes(name: str, module: nn.Module) -> dict | None:
        from torchvision.models.densenet import DenseNet

        if not isinstance(module, DenseNet):
            return None
        relu, pool = nn.ReLU(), nn.AdaptiveAvgPool2d(1)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return module.classifier(torch.flatten(pool(relu(module.features(x))), 1))

        return {"head_relu": relu, "head_pool": pool, "forward": forward}

    def copy(self):
        return DenseNetHeadCanonizer()


def default_canonizers(model: nn.Module, example: torch.Tensor | None = None) -> list:
    """The canonizers for ``model``: zennit's ResNet canonizer for torchvision ResNets, else
    :class:`TracedMergeBatchNorm` traced with ``example`` (after :class:`DenseNetHeadCanonizer`
    on torchvision DenseNets; without ``example``, :func:`lrp` traces with the explained batch)."""
    from torchvision.models.densenet import DenseNet
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from zennit.torchvision import ResNetCanonizer

    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        return [ResNetCanonizer()]
    head = [DenseNetHeadCanonizer()] if any(isinstance(m, DenseNet) for m in model.modules()) else []
    return head + [TracedMergeBatchNorm(None if example is None else example[:1].detach())]


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite, method: str = "lrp") -> torch.Tensor:
    """Relevance of ``x`` for ``target`` under ``composite``: a zennit composite, or a function
    ``canonizers -> composite`` that gets :func:`default_canonizers`. The target logit is the
    relevance put into the output, so relevance sums to it where the rules conserve.
    Raises :class:`~.transformer.MethodNotApplicableError` (naming ``method``) for models with
    layers the composites have no rule for (attention, LayerNorm), before anything on the model
    is changed."""
    refuse_transformer(model, method, "zennit's composites have no rules for attention and LayerNorm")
    forward = CheckedForward(model, target)
    if not isinstance(composite, composites.Composite):
        composite = composite(default_canonizers(model, x))
    for c in composite.canonizers:
        if isinstance(c, TracedMergeBatchNorm) and c.example is None:
            c.example = x[:1].detach()
    with preserve_values(model):
        with composite.context(model) as modified:
            forward.model = modified
            x = x.requires_grad_(True)
            out = forward(x)
            onehot = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
            return input_gradient(out, x, grad_outputs=onehot * out.detach())


@register_method("lrp.epsilon_plus_flat")
def epsilon_plus_flat(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule on dense layers, z+ on convolutions, flat rule on the first layer."""
    return lrp(model, x, target, lambda c: composites.EpsilonPlusFlat(epsilon=epsilon, canonizers=c),
               "lrp.epsilon_plus_flat")


@register_method("lrp.epsilon_gamma_box")
def epsilon_gamma_box(model, x, target, *, low: float | None = None, high: float | None = None,
                      epsilon: float = 1e-6, gamma: float = 0.25) -> torch.Tensor:
    """Epsilon on dense, gamma on convolutions, z^B (box) on the first layer with the input
    bounds ``low`` / ``high`` (default: each sample's own minimum and maximum)."""
    dims = tuple(range(1, x.dim()))
    low = x.detach().amin(dim=dims, keepdim=True).expand_as(x) if low is None else low
    high = x.detach().amax(dim=dims, keepdim=True).expand_as(x) if high is None else high
    return lrp(model, x, target, lambda c: composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon,
                                                                       gamma=gamma, canonizers=c),
               "lrp.epsilon_gamma_box")


@register_method("lrp.epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon on dense layers, alpha=2 beta=1 on convolutions, flat rule on the first layer."""
    return lrp(model, x, target, lambda c: composites.EpsilonAlpha2Beta1(epsilon=epsilon, canonizers=c),
               "lrp.epsilon_alpha2_beta1")
