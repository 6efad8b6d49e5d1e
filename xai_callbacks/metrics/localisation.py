"""Localisation: does the heatmap point at the ground-truth region (e.g. the digit's strokes, or
the planted watermark)? Higher is better for all three.

* relevance mass accuracy (Arras et al. 2022): share of the positive relevance inside the mask;
* relevance rank accuracy (Arras et al. 2022): with K the mask's size, the share of the K most
  relevant pixels that lie inside the mask;
* pointing game (Zhang et al. 2018): 1 if the most relevant pixel lies inside the mask, else 0.

Masks are (B, *positions) or (B, C, *positions) (any channel set counts); relevance is summed over
channels. Images, signals and tabular rows (pass ``x`` for signals and tabular rows; without it a
(B, C, H, W) or (B, H, W) heatmap is read as images).
"""
from __future__ import annotations

import torch

from .base import ExplanationMetric, check_inputs, check_masks, pixel_relevance

__all__ = ["relevance_mass", "relevance_rank", "pointing_game", "RelevanceMass", "RelevanceRank", "PointingGame"]


def _prepare(relevance, masks, name, x=None):
    ref = x if x is not None else (relevance if relevance.dim() == 4 else relevance[:, None])
    check_inputs(ref, relevance, name)
    r = pixel_relevance(relevance, ref).flatten(1)
    m = check_masks(masks, ref, name).to(r.device).flatten(1)
    empty = ~m.any(1)
    if empty.any():
        raise ValueError(f"{name}: the masks of sample(s) {empty.nonzero().flatten().tolist()[:10]} are empty; "
                         "a localisation metric needs a non-empty ground-truth region per sample")
    return r, m


def relevance_mass(relevance: torch.Tensor, masks: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance mass accuracy (B,): positive relevance inside the mask / all positive relevance
    (NaN for a heatmap without positive relevance).

    Args:
        relevance: heatmaps (B, C, H, W), (B, 1, H, W) or (B, H, W).
        masks: ground-truth regions (B, H, W) or (B, C, H, W).
        x: the explained images (optional, only to check shapes).
    """
    r, m = _prepare(relevance, masks, "relevance_mass", x)
    pos = r.clamp(min=0)
    return (pos * m).sum(1) / pos.sum(1)


def relevance_rank(relevance: torch.Tensor, masks: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance rank accuracy (B,): share of the |mask| most relevant pixels inside the mask.
    Arguments as in :func:`relevance_mass`."""
    r, m = _prepare(relevance, masks, "relevance_rank", x)
    k = m.sum(1)
    order = r.argsort(dim=1, descending=True, stable=True)
    top = torch.arange(r.shape[1], device=r.device)[None] < k[:, None]
    return (m.gather(1, order) & top).sum(1) / k


def pointing_game(relevance: torch.Tensor, masks: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Pointing game (B,): 1.0 if the most relevant pixel (the first, on ties) is inside the mask.
    Arguments as in :func:`relevance_mass`."""
    r, m = _prepare(relevance, masks, "pointing_game", x)
    return m.gather(1, r.argmax(1, keepdim=True))[:, 0].float()


class _Localisation(ExplanationMetric):
    needs_model = False
    needs_masks = True
    higher_is_better = True
    fn = None

    def __init__(self, model=None, **kwargs):
        super().__init__(model, **kwargs)

    def scores(self, x, target, relevance, masks=None):
        return type(self).fn(relevance, masks, x)


class RelevanceMass(_Localisation):
    """Relevance mass accuracy, logged as ``relevance_mass``; see :func:`relevance_mass`. The
    model argument is accepted and ignored (all metrics share one constructor form).

    Args:
        model, **kwargs: as in :func:`relevance_mass`.

    Raises:
        ValueError: in ``update``, inputs that do not fit (see :class:`ExplanationMetric`).

    Example: ``metric = RelevanceMass()``, updated and computed like any metric; with ``metric.update(x,
        y, relevance, masks)``: masks (B, H, W) mark the object.
    """

    name = "relevance_mass"
    fn = staticmethod(relevance_mass)


class RelevanceRank(_Localisation):
    """Relevance rank accuracy, logged as ``relevance_rank``; see :func:`relevance_rank`.

    Arguments and errors as in :class:`RelevanceMass`.

    Example: ``metric = RelevanceRank()``, updated and computed like any metric; the same ``masks`` as
        relevance mass.
    """

    name = "relevance_rank"
    fn = staticmethod(relevance_rank)


class PointingGame(_Localisation):
    """Pointing game, logged as ``pointing_game``; see :func:`pointing_game`.

    Arguments and errors as in :class:`RelevanceMass`.

    Example: ``metric = PointingGame()``, updated and computed like any metric; a hit when the maximum of
        the heatmap lies in the mask.
    """

    name = "pointing_game"
    fn = staticmethod(pointing_game)
