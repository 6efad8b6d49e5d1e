"""Grad-CAM (Selvaraju et al.), computed by captum, upsampled to the input size."""
from __future__ import annotations

import captum.attr as ca
import torch
import torch.nn.functional as F
from torch import nn

from . import CheckedForward, register_method


def find_layer(model: nn.Module, layer: str | None) -> nn.Module:
    """The module named ``layer``, or the last convolution layer of ``model`` when None."""
    if layer is not None:
        names = dict(model.named_modules())
        if layer not in names:
            convs = [n for n, m in names.items() if isinstance(m, nn.modules.conv._ConvNd)]
            raise ValueError(f"gradcam layer {layer!r} not found in the model; convolution layers: {convs}")
        return names[layer]
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convs:
        raise ValueError(f"gradcam needs a convolution layer, and {type(model).__name__} has none; "
                         "pass layer='<module name>' to use another layer with spatial output")
    return convs[-1]


@register_method("gradcam")
def gradcam(model, x, target, *, layer: str | None = None, relu: bool = True) -> torch.Tensor:
    """Grad-CAM at ``layer`` (default: the last convolution), bilinearly upsampled to ``x``'s
    spatial size and repeated over its channels."""
    cam = ca.LayerGradCam(CheckedForward(model, target), find_layer(model, layer))
    heat = cam.attribute(x, target=target, relu_attributions=relu)
    if heat.dim() != x.dim():
        raise ValueError(f"gradcam layer output has shape {tuple(heat.shape)}, not spatial like the input "
                         f"{tuple(x.shape)}; choose a convolution layer")
    heat = F.interpolate(heat, size=x.shape[2:], mode="bilinear" if x.dim() == 4 else "linear",
                         align_corners=False)
    return heat.expand_as(x).contiguous()
