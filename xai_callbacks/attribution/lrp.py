"""Layer-wise relevance propagation through zennit's composites and canonizers.

Canonizers are picked from the model: torchvision ResNets get zennit's ``ResNetCanonizer``
(BatchNorm merged, residual additions as explicit ``Sum`` layers), other models
``SequentialMergeBatchNorm``. Canonizers merge BatchNorm running statistics, which is valid in
eval mode only: the guard puts the model in eval mode first. Models with their own residual
additions should add through ``zennit.layer.Sum`` so the composites see them.
"""
from __future__ import annotations

import torch
from torch import nn
from zennit import composites, canonizers

from . import CheckedForward, TargetModel, register_method
from ..scoring import target_scores
from ..guard import input_gradient


def default_canonizers(model: nn.Module) -> list:
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from zennit.torchvision import ResNetCanonizer

    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        return [ResNetCanonizer()]
    return [canonizers.SequentialMergeBatchNorm()]


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite) -> torch.Tensor:
    """Relevance of ``x`` for ``target`` under ``composite``; the target logit is the relevance
    put into the output, so relevance sums to it where the rules conserve."""
    forward = CheckedForward(model, target)
    with composite.context(model) as modified:
        x = x.requires_grad_(True)
        if isinstance(modified, TargetModel):  # a target function: relevance starts at the model's own output,
            out = modified.inner(x)             # R = output * d score / d output (sums to a linear score)
            score = target_scores(out, modified.target)
        else:
            forward.model = modified
            out = forward(x)
            score = out.gather(1, target[:, None])
        (d_score,) = torch.autograd.grad(score.sum(), out, retain_graph=True)
        return input_gradient(out, x, grad_outputs=d_score * out.detach())


@register_method("lrp.epsilon_plus_flat")
def epsilon_plus_flat(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule on dense layers, z+ on convolutions, flat rule on the first layer."""
    return lrp(model, x, target, composites.EpsilonPlusFlat(epsilon=epsilon, canonizers=default_canonizers(model)))


@register_method("lrp.epsilon_gamma_box")
def epsilon_gamma_box(model, x, target, *, low: float | None = None, high: float | None = None,
                      epsilon: float = 1e-6, gamma: float = 0.25) -> torch.Tensor:
    """Epsilon on dense, gamma on convolutions, z^B (box) on the first layer with the input
    bounds ``low`` / ``high`` (default: each sample's own minimum and maximum)."""
    dims = tuple(range(1, x.dim()))
    low = x.detach().amin(dim=dims, keepdim=True).expand_as(x) if low is None else low
    high = x.detach().amax(dim=dims, keepdim=True).expand_as(x) if high is None else high
    comp = composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma,
                                      canonizers=default_canonizers(model))
    return lrp(model, x, target, comp)


@register_method("lrp.epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon on dense layers, alpha=2 beta=1 on convolutions, flat rule on the first layer."""
    comp = composites.EpsilonAlpha2Beta1(epsilon=epsilon, canonizers=default_canonizers(model))
    return lrp(model, x, target, comp)
