"""Complexity: how concentrated is the heatmap? Both work on |pixel relevance|.

* sparseness (Chalasani et al. 2020): Gini index of |R| / max|R| + 1e-7 (higher is sparser);
* complexity (Bhatt et al. 2020): entropy of the shares |R_i| / sum|R| (lower is simpler).
"""
from __future__ import annotations

import torch

from .base import ExplanationMetric, check_inputs, pixel_relevance

__all__ = ["sparseness", "complexity", "Sparseness", "Complexity"]


def _magnitudes(relevance: torch.Tensor, name: str, x: torch.Tensor | None = None) -> torch.Tensor:
    ref = x if x is not None else (relevance if relevance.dim() == 4 else relevance[:, None])
    check_inputs(ref, relevance, name)
    return pixel_relevance(relevance, ref).flatten(1).abs().double()


def sparseness(relevance: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Gini index (B,) of each heatmap's |pixel relevance| (0: uniform, towards 1: one pixel).

    Args:
        relevance: heatmaps (B, C, H, W), (B, 1, H, W) or (B, H, W); of signals or tabular rows
            with ``x``.
        x: the explained inputs (optional; needed to read heatmaps of signals (B, C, L) per position).
    """
    a = _magnitudes(relevance, "sparseness", x)
    peak = a.amax(1, keepdim=True)
    a = torch.where(peak > 0, a / peak, a) + 1e-7
    a, n = a.sort(dim=1).values, a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    return (((2 * i - n - 1) * a).sum(1) / (n * a.sum(1))).float()


def complexity(relevance: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy (B,) of each heatmap's shares |R_i| / sum|R| (natural log; NaN for an all-zero
    heatmap). Arguments as in :func:`sparseness`."""
    a = _magnitudes(relevance, "complexity", x)
    p = a / a.sum(1, keepdim=True)
    return (-(p * torch.log(p + 1e-12)).sum(1)).float()


class Sparseness(ExplanationMetric):
    """Sparseness, logged as ``sparseness``; see :func:`sparseness`. ``model`` is accepted and ignored.

    Args:
        model, **kwargs: as in :func:`sparseness`.

    Raises:
        ValueError: in ``update``, inputs that do not fit (see :class:`ExplanationMetric`).

    Example: ``metric = Sparseness()``, updated and computed like any metric; no model needed: only the
        heatmap is read.
    """

    name = "sparseness"
    needs_model = False
    higher_is_better = True

    def __init__(self, model=None, **kwargs):
        super().__init__(model, **kwargs)

    def scores(self, x, target, relevance, masks=None):
        return sparseness(relevance, x)


class Complexity(Sparseness):
    """Complexity, logged as ``complexity``; see :func:`complexity`.

    Arguments and errors as in :class:`Sparseness`.

    Example: ``metric = Complexity()``, updated and computed like any metric; the entropy of the
        normalised |relevance|.
    """

    name = "complexity"
    higher_is_better = False

    def scores(self, x, target, relevance, masks=None):
        return complexity(relevance, x)
