"""Grad-CAM (Selvaraju et al.), upsampled to the input size: computed by captum on convolution
layers; on vision transformers (torchvision ViT, Swin) on the token grid (see
:func:`~.transformer.gradcam_tokens`), never on their patch-embedding convolution."""
from __future__ import annotations

import captum.attr as ca
import torch
import torch.nn.functional as F
from torch import nn

from . import CheckedForward, register_method
from .transformer import _token_layer, attention_layers, conv_after_attention, gradcam_tokens, not_applicable


def find_layer(model: nn.Module, layer: str | None) -> nn.Module:
    """The module named ``layer``, or the last convolution layer of ``model`` when None."""
    if layer is not None:
        names = dict(model.named_modules())
        if layer not in names:
            convs = [n for n, m in names.items() if isinstance(m, nn.modules.conv._ConvNd)]
            norms = [n for n, m in names.items() if isinstance(m, nn.LayerNorm)]   # a transformer's token layers
            raise ValueError(f"gradcam layer {layer!r} not found in the model; convolution layers: {convs}"
                             + (f"; LayerNorms (token output): {norms}" if norms else ""))
        return names[layer]
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"gradcam needs a convolution layer, and {type(model).__name__} has none; "
                         "pass layer='<module name>' to use another layer with spatial output")
    return convs[-1]


@register_method("gradcam")
def gradcam(model, x, target, *, layer: str | None = None, relu: bool = True) -> torch.Tensor:
    """Grad-CAM at ``layer`` (default: the last convolution; on a vision transformer the last
    block's first LayerNorm, i.e. its input tokens, on torchvision's Swin the last feature stage;
    on a hybrid whose last convolution follows its attention, that convolution), bilinearly
    upsampled to ``x``'s spatial size and repeated over its channels. A named layer with (B, T, D)
    token output is read as a token grid (a leading class token dropped).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        layer: module name whose output is weighted by its mean gradient (default as above).
        relu: keep only the positive part of the map.

    Raises:
        ValueError: a ``layer`` the model does not have (the message lists its convolution layers),
            a model without a convolution layer, a layer output that is not spatial, a target out of
            range or a model output that is not (B, n_classes) scores.
        MethodNotApplicableError: a model with attention layers but no transformer blocks (a
            LayerNorm and an attention layer in one module) and no convolution after its last
            attention layer, without ``layer`` (a CNN with LayerNorm, such as ConvNeXt, uses its
            last convolution).

    Example: ``explain(model, x, y, method="gradcam", layer="features.4")``.
    """
    if layer is None and attention_layers(model) and not conv_after_attention(model):
        found = _token_layer(model)
        if found is None:
            raise not_applicable(model, "gradcam", "its default layer (the last convolution) is not where a "
                                 "transformer's evidence is; pass layer='<module with token or spatial output>'")
        return gradcam_tokens(model, x, target, *found, relu=relu)
    if layer is not None:
        module = find_layer(model, layer)
        probe = []
        handle = module.register_forward_hook(lambda m, i, o: probe.append(o.dim() if isinstance(o, torch.Tensor)
                                                                           else None))
        try:
            with torch.no_grad():
                model(x[:1])
        finally:
            handle.remove()
        if probe and probe[-1] == 3 and x.dim() == 4:
            return gradcam_tokens(model, x, target, module, "tokens", relu=relu)
    cam = ca.LayerGradCam(CheckedForward(model, target), find_layer(model, layer))
    heat = cam.attribute(x, target=target, relu_attributions=relu)
    if heat.dim() != x.dim():
        raise ValueError(f"gradcam layer output has shape {tuple(heat.shape)}, not spatial like the input "
                         f"{tuple(x.shape)}; choose a convolution layer")
    heat = F.interpolate(heat, size=x.shape[2:], mode="bilinear" if x.dim() == 4 else "linear",
                         align_corners=False)
    return heat.expand_as(x).contiguous()
