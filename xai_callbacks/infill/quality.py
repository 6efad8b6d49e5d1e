"""How well an infiller fills: closeness to the removed content and what the model makes of it.

For a batch of inputs and keep masks, :func:`fill_quality` fills the removed part and measures,
over the removed region only, the mean absolute error (:func:`~xai_callbacks.infill.gan.masked_l1`)
and the PSNR (:func:`masked_psnr`) against the original, and the share of samples whose predicted
class is the same on the filled and the original input (``agreement``: a fill the model reads like
the data keeps its prediction). No Lightning, no wandb: tensors in, numbers out.

>>> from xai_callbacks.guard import model_guard
>>> from xai_callbacks.infill import get_infiller
>>> with model_guard(model) as m, torch.no_grad():
...     predicted = m(x).argmax(1)
...     filled, scores = fill_quality(m, x, keep, get_infiller("blur"), predicted, value_range=(0, 1))
>>> sorted(scores), 0 <= scores["agreement"] <= 1
(['agreement', 'l1', 'psnr'], True)
"""
from __future__ import annotations

import torch
from torch import nn

from ..scoring import class_scores
from . import Infiller
from .gan import masked_l1

__all__ = ["masked_psnr", "fill_quality"]


def masked_psnr(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor, span: float) -> torch.Tensor:
    """Peak signal-to-noise ratio of ``a`` against ``b`` over ``region``, in dB:
    ``10 log10(span^2 / MSE)`` with the MSE weighted by ``region`` (in [0, 1], broadcastable).

    Args:
        a, b: tensors of one shape.
        region: where to compare (1) and not (0).
        span: the data's value range (high - low), the "peak" of the ratio.
    """
    region = region.to(a.dtype).expand_as(a)
    mse = ((a - b) ** 2 * region).sum() / region.sum().clamp_min(1)
    return 10 * torch.log10(span ** 2 / mse.clamp_min(1e-12))


def fill_quality(model: nn.Module, x: torch.Tensor, keep: torch.Tensor, infiller: Infiller,
                 predicted: torch.Tensor, value_range: tuple[float, float] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Fill ``x`` where ``keep == 0`` and score the fill.

    Args:
        model: the classifier, called as it is (guard it with
            :func:`~xai_callbacks.guard.model_guard` and ``torch.no_grad``); it returns (B, n_classes) scores.
        x: inputs (B, C, ...).
        keep: keep masks broadcastable to ``x``, 1 = kept, 0 = removed.
        infiller: what fills the removed part.
        predicted: the model's predicted classes (B,) on ``x``.
        value_range: ``(low, high)`` of the data, for the PSNR; None: the range of ``x``.

    Returns:
        The filled inputs and ``{"l1": ..., "psnr": ..., "agreement": ...}``.

    Raises:
        ValueError: ``predicted`` does not have one class per sample.
    """
    if predicted.shape != (x.shape[0],):
        raise ValueError(f"predicted must hold one class per sample, shape ({x.shape[0]},); got "
                         f"{tuple(predicted.shape)}")
    span = (value_range[1] - value_range[0]) if value_range is not None else float(x.max() - x.min()) or 1.0
    filled = infiller(x, keep)
    hole = (1 - keep).expand_as(x)
    scores = {"l1": float(masked_l1(filled, x, hole)), "psnr": float(masked_psnr(filled, x, hole, span)),
              "agreement": float((class_scores(model(filled)).argmax(dim=1) == predicted).float().mean())}
    return filled, scores
