"""Axioms: properties a heatmap should have by construction. Lower is better for both.

* completeness / conservation error (Sundararajan et al. 2017; Bach et al. 2015): relative gap
  between the heatmap's sum and the score change from a baseline,
  ``|sum R - (f(x) - f(x0))| / |f(x) - f(x0)|``, with ``x0`` the fully infilled image (zeros by
  default);
* input invariance (Kindermans et al. 2019, "The (Un)reliability of Saliency Methods"): a copy of
  the model whose first layer absorbs a constant shift ``m`` of the input (bias ``b - W m``, zero
  padding replaced by padding with ``m``) computes exactly the same function on ``x + m`` as the
  model on ``x``; the error is ``||R'(x + m) - R(x)|| / ||R(x)||`` (Frobenius norms of pixel
  relevance). The shift defaults to minus each channel's mean over the batch (a mean shift).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..infill import Infiller, get_infiller
from ..scoring import score_perturbed
from .base import OUTPUTS, ExplanationMetric, check_choice, copy_model, explain_stacked, prepare
from .faithfulness import _Perturbation

__all__ = ["completeness_error", "input_invariance_error", "shifted_model", "CompletenessError",
           "InputInvarianceError"]


def completeness_error(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *,
                       infiller: str | Infiller = "constant", output: str = "logit",
                       batch_size: int = 256) -> torch.Tensor:
    """Relative completeness error (B,) of heatmaps against the baseline ``infiller(x, 0)``.

    Args:
        model: the classifier.
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: heatmaps of ``x`` for ``target``.
        infiller: builds the baseline (everything removed); ``constant`` gives zeros.
        output: ``logit`` (default: heatmaps explain logits) or ``probability``.
        batch_size: inputs per forward pass.
    """
    check_choice(output, OUTPUTS, "output", "completeness_error")
    x, target, r = prepare(model, x, target, relevance, "completeness_error")
    fill = get_infiller(infiller)
    b = x.shape[0]
    zeros = torch.zeros_like(x[:, :1])
    first = [-1] + [1] * (x.dim() - 1)  # idx < b: the input itself; else its baseline
    scores = score_perturbed(model, lambda idx: torch.where((idx < b).view(first), x[idx % b],
                                                             fill(x[idx % b], zeros[idx % b])),
                             torch.arange(2 * b) % b, target, output=output, batch_size=batch_size)
    change = scores[:b] - scores[b:]
    return ((r.flatten(1).sum(1) - change).abs() / change.abs()).float()


def shifted_model(model: nn.Module, shift: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with ``f'(x + shift) == f(x)``: the first Conv1d / Conv2d / Linear
    layer (in module order, assumed to read the raw input) absorbs the shift (C,) in its bias; a
    zero-padded convolution instead pads with ``shift`` through a forward pre-hook on the copy."""
    copied = copy_model(model)
    first = next((m for m in copied.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))), None)
    if first is None:
        raise ValueError("input_invariance_error needs a model whose first layer is an nn.Conv1d, nn.Conv2d or "
                         "nn.Linear")
    shift = shift.to(first.weight.device, first.weight.dtype)
    if first.bias is None:
        first.bias = nn.Parameter(torch.zeros(first.weight.shape[0], device=first.weight.device))
    with torch.no_grad():
        if isinstance(first, nn.Linear):
            per_feature = shift.repeat_interleave(first.in_features // shift.numel())
            first.bias -= first.weight @ per_feature
            return copied
        if first.padding_mode != "zeros" or isinstance(first.padding, str) and first.padding != "valid":
            raise ValueError(f"input_invariance_error supports a first convolution with integer zero padding, "
                             f"got padding={first.padding!r}, padding_mode={first.padding_mode!r}")
        spatial = first.weight.dim() - 2
        m = shift.view(1, -1, *[1] * spatial)
        first.bias -= (first.weight * m).sum(tuple(range(1, first.weight.dim())))
        pads = (0,) * spatial if isinstance(first.padding, str) else first.padding
        first.padding = (0,) * spatial
        widths = [p for size in reversed(pads) for p in (size, size)]  # F.pad order: last axis first

        def pad_with_shift(_, args):
            (z,) = args
            return (F.pad(z - m, widths) + m,)

        first.register_forward_pre_hook(pad_with_shift)
    return copied


def input_invariance_error(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, method: str,
                           method_options: dict | None = None, shift: float | str = "mean",
                           batch_size: int = 256) -> torch.Tensor:
    """Input invariance error (B,) under a constant input shift.

    Args:
        model: the classifier (copied; the original is not modified).
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: heatmaps of ``x`` for ``target`` by ``method``.
        method: the explainer that explains the shifted copy.
        method_options: options of ``method``.
        shift: ``mean`` (minus each channel's mean over the batch) or a number added to every input.
        batch_size: samples explained per call.
    """
    x, target, r = prepare(model, x, target, relevance, "input_invariance_error")
    dims = (0,) + tuple(range(2, x.dim()))  # per channel; per feature for tabular rows
    if shift == "mean":
        m = -x.mean(dims)
    elif isinstance(shift, (int, float)):
        m = torch.full((x.shape[1],), float(shift), device=x.device)
    else:
        raise ValueError(f"input_invariance_error: shift must be 'mean' or a number, got {shift!r}")
    shifted = shifted_model(model, m)
    rs = explain_stacked(shifted, x + m.view(1, -1, *[1] * (x.dim() - 2)), target, method, method_options,
                         batch_size)
    return (rs - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)


class CompletenessError(_Perturbation):
    """Completeness error, logged as ``completeness_error.<infiller>``.

    Args:
        model, infiller, output, batch_size, **kwargs: as in :func:`completeness_error`.

    Raises:
        ValueError: an unknown ``infiller`` or ``output`` (the message names the valid values).

    Example: ``metric = CompletenessError(model)``, updated and computed like any metric; for methods
        whose relevance should sum to f(x) - f(baseline).
    """

    name = "completeness_error"
    higher_is_better = False

    def __init__(self, model: nn.Module, infiller: str | Infiller = "constant", output: str = "logit",
                 batch_size: int = 256, **kwargs):
        super().__init__(model, infiller, output, batch_size, **kwargs)

    def scores(self, x, target, relevance, masks=None):
        return completeness_error(self.model, x, target, relevance, infiller=self.infiller, output=self.output,
                                  batch_size=self.batch_size)


class InputInvarianceError(ExplanationMetric):
    """Input invariance error, logged as ``input_invariance_error``.

    Args:
        model, method, method_options, shift, batch_size, **kwargs: as in
            :func:`input_invariance_error`.

    Raises:
        ValueError: in ``update``, an unknown ``method`` or inputs that do not fit (see
            :class:`ExplanationMetric`).

    Example: ``metric = InputInvarianceError(model, method="saliency", shift="mean")``, updated and
        computed like any metric; 0 for shift-invariant methods.
    """

    name = "input_invariance_error"
    needs_method = True
    higher_is_better = False

    def __init__(self, model: nn.Module, method: str, method_options: dict | None = None,
                 shift: float | str = "mean", batch_size: int = 256, **kwargs):
        super().__init__(model, **kwargs)
        self.method, self.method_options = method, dict(method_options or {})
        self.shift, self.batch_size = shift, batch_size

    def scores(self, x, target, relevance, masks=None):
        return input_invariance_error(self.model, x, target, relevance, method=self.method,
                                      method_options=self.method_options, shift=self.shift,
                                      batch_size=self.batch_size)
