"""Concept relevance (Achtibat et al. 2023, CRP), own implementation on zennit's LRP composites.

The channels of a chosen layer are the *concepts*. LRP relevance arriving at the layer's output,
summed over positions, is each concept's relevance for the target; masking that relevance to one
channel before propagating further gives the concept's *conditional heatmap* in input space
(which part of the input the concept used for this decision). Heatmaps of all channels sum to
the plain LRP heatmap, as the propagation is linear in the relevance from above. *Reference
samples* of a concept are the samples where it is most relevant (relevance maximisation).

All conditional heatmaps of a batch are computed in one backward pass over stacked copies (one
copy per requested concept); the model runs inside the do-no-harm guard.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .attribution import model_device, model_scores
from .attribution.lrp import FunctionalRules, default_canonizers, epsilon_plus_flat_composite
from .guard import input_gradient, model_guard, preserve_values, unwrap_model
from .scoring import as_target, check_class_target, class_scores

__all__ = ["ConceptResult", "find_concept_layer", "concept_relevance", "conditional_heatmaps", "top_concepts",
           "reference_samples"]


class ConceptResult(NamedTuple):
    """``relevance`` (B, C): each channel's relevance for the target; ``heatmap`` (B, ...) the
    plain LRP heatmap of the inputs."""

    relevance: torch.Tensor
    heatmap: torch.Tensor


def find_concept_layer(model: nn.Module, name: str) -> nn.Module:
    """The module ``name`` of ``model`` whose output channels are the concepts.

    Raises:
        ValueError: no module has that name (the message lists the model's module names).

    Example::

        find_concept_layer(DemoCNN(), "features.9")    # the last convolution
    """
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise ValueError(f"concept layer {name!r} not found in the model; module names: "
                         f"{[n for n in modules if n][:40]}")
    return modules[name]


def _lrp_at_layer(model, x, target, layer: str, channel_mask: torch.Tensor | None, make_composite):
    """LRP of ``x`` for ``target`` (class indices); the relevance at ``layer``'s output, optionally
    multiplied by ``channel_mask`` (N, C) before it propagates on. Returns (heatmap, layer relevance)."""
    captured = {}

    def hook(module, inputs, output):
        out = output.clone()  # a fresh tensor: its gradient is the relevance of this layer's output

        def on_grad(grad):
            captured["relevance"] = grad
            if channel_mask is not None:
                return grad * channel_mask.view(*channel_mask.shape, *([1] * (grad.dim() - 2)))
            return grad

        out.register_hook(on_grad)
        return out

    with model_guard(model) as module, preserve_values(module):
        composite = (make_composite or epsilon_plus_flat_composite)(
            default_canonizers(module, x))
        with composite.context(module) as modified:
            handle = find_concept_layer(modified, layer).register_forward_hook(hook)
            try:
                x = x.detach().clone().requires_grad_(True)
                with FunctionalRules():
                    out = class_scores(modified(x))   # a binary classifier's one logit as two classes
            finally:
                handle.remove()
            check_class_target(out, target)
            onehot = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
            heat = input_gradient(out, x, grad_outputs=onehot * out.detach())
    return heat.detach(), captured["relevance"].detach()


def concept_relevance(model: nn.Module, x: torch.Tensor, target, layer: str, make_composite=None) -> ConceptResult:
    """Relevance of each channel of ``layer`` for ``target`` (B, C), and the LRP heatmaps.

    Args:
        model: a classifier returning (B, n_classes) scores.
        x: inputs (B, ...).
        target: class indices (int or (B,)); None for the predicted class.
        layer: module name whose output channels (dimension 1) are the concepts.
        make_composite: ``canonizers -> zennit composite`` (default: ``lrp.epsilon_plus_flat``'s).

    Raises:
        ValueError: unknown layer, or a target that does not fit the model.
    """
    x = x.detach().to(model_device(unwrap_model(model)), torch.float32)
    if target is None:
        with model_guard(model) as module, torch.no_grad():
            target = model_scores(module, x).argmax(1)
    target = as_target(target, x.shape[0], x.device)
    heat, rel = _lrp_at_layer(model, x, target, layer, None, make_composite)
    return ConceptResult(rel.flatten(2).sum(2) if rel.dim() > 2 else rel, heat)


def conditional_heatmaps(model: nn.Module, x: torch.Tensor, target, layer: str, channels: torch.Tensor,
                         make_composite=None) -> torch.Tensor:
    """Conditional heatmaps (B, K, ...): the LRP heatmap of ``x`` for ``target`` with the
    relevance at ``layer`` restricted to channel ``channels[b, k]``; one backward pass over the
    B * K stacked copies. Arguments as in :func:`concept_relevance`; ``channels`` is (B, K) or (K,)."""
    x = x.detach().to(model_device(unwrap_model(model)), torch.float32)
    b = x.shape[0]
    target = as_target(target, b, x.device)
    channels = torch.as_tensor(channels, device=x.device).long()
    channels = channels.expand(b, -1) if channels.dim() == 1 else channels
    k = channels.shape[1]
    with model_guard(model) as module, torch.no_grad():
        n_channels = _probe_channels(module, x[:1], layer)
    if channels.min() < 0 or channels.max() >= n_channels:
        raise ValueError(f"channels must be in 0..{n_channels - 1} (layer {layer!r} has {n_channels}), "
                         f"got {channels.unique().tolist()[:10]}")
    mask = torch.zeros(b * k, n_channels, device=x.device).scatter_(1, channels.reshape(-1, 1), 1.0)
    heat, _ = _lrp_at_layer(model, x.repeat_interleave(k, 0), target.repeat_interleave(k), layer, mask,
                            make_composite)
    return heat.view(b, k, *x.shape[1:])


def _probe_channels(module: nn.Module, x: torch.Tensor, layer: str) -> int:
    seen = {}

    def hook(module, inputs, output):
        seen["c"] = output.shape[1]

    handle = find_concept_layer(module, layer).register_forward_hook(hook)
    try:
        module(x)
    finally:
        handle.remove()
    return seen["c"]


def top_concepts(relevance: torch.Tensor, labels: torch.Tensor, k: int = 5) -> dict[int, torch.Tensor]:
    """Per class, the ``k`` channels with the highest mean relevance over the samples of that class:
    ``{class: LongTensor (k,)}`` from channel relevances (B, C) and the samples' classes (B,)."""
    out = {}
    for c in labels.unique().tolist():
        mean = relevance[labels == c].mean(0)
        out[int(c)] = mean.topk(min(k, mean.numel())).indices
    return out


def reference_samples(relevance: torch.Tensor, channels: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Relevance maximisation: for each channel in ``channels`` (K,), the indices (K, n) of the
    ``n`` samples where that channel is most relevant, from channel relevances (B, C)."""
    channels = torch.as_tensor(channels, device=relevance.device).long()
    return relevance[:, channels].T.topk(min(n, relevance.shape[0]), dim=1).indices
