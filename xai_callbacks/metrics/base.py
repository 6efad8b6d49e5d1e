"""Shared pieces of the explanation-quality metrics: input checks, batched scoring of perturbed
inputs on the model's device, rank and similarity helpers, and the torchmetrics base class.

Conventions used by every metric:

* ``x`` is a batch of images (B, C, H, W), signals (B, C, L) or tabular rows (B, F); its
  *positions* are the pixels (H, W), time steps (L) or features (F). ``relevance`` is shaped like
  ``x``, or (B, 1, *positions), or (B, *positions). Metrics work on *position* relevance, the sum
  over channels (B, *positions); removing a position removes all its channels.
* ``target`` is the explained class: an int or a LongTensor (B,); or a target function
  ``fn(output, batch) -> (B,)`` / :class:`~xai_callbacks.scoring.Target` (see
  :mod:`xai_callbacks.scoring`); the ``output`` option (probability / logit) applies to classes.
* Every call into the model goes through :func:`~xai_callbacks.guard.model_guard` (eval mode,
  fp32, no parameter gradients, global RNG untouched); explanations of perturbed inputs go
  through :func:`~xai_callbacks.attribution.explain`.
* Perturbed copies of all samples (and all steps) are scored by
  :func:`~xai_callbacks.scoring.score_perturbed`, ``batch_size`` per forward pass on the model's
  device; nothing leaves the device inside the loop.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn
from torchmetrics import Metric

from ..attribution import explain, model_device, model_scores
from ..guard import model_guard, unwrap_model
from ..scoring import as_target

__all__ = ["ExplanationMetric", "CurveResult", "check_inputs", "pixel_relevance", "check_masks",
           "explain_stacked", "spearman", "pearson", "cosine", "SIMILARITIES", "OUTPUTS"]

OUTPUTS = ("probability", "logit")
SHAPES = {4: "images (B, C, H, W)", 3: "signals (B, C, L)", 2: "tabular rows (B, F)"}
ALL_SHAPES = (2, 3, 4)


class CurveResult(NamedTuple):
    """Result of a curve metric: ``scores`` (B,), ``curves`` (B, P) and the x axis ``fractions`` (P,)."""

    scores: torch.Tensor
    curves: torch.Tensor
    fractions: torch.Tensor


# ----------------------------------------------------------------------------------------- checks
def positions(x: torch.Tensor) -> tuple[int, ...]:
    """The position axes' sizes of a batch: (H, W) of images, (L,) of signals, (F,) of tabular rows."""
    return tuple(x.shape[2:]) if x.dim() >= 3 else tuple(x.shape[1:])


def require_images(x: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming ``name`` and the shape it needs unless ``x`` is images (B, C, H, W)."""
    if x.dim() != 4:
        raise ValueError(f"{name} needs images (B, C, H, W), got shape {tuple(x.shape)}; for signals (B, C, L) "
                         "and tabular rows (B, F) use pixel_flipping, faithfulness_correlation, selectivity or the "
                         "robustness and complexity metrics")


def check_inputs(x: torch.Tensor, relevance: torch.Tensor | None = None, name: str = "metric") -> None:
    """Raise a ValueError naming the problem if ``x`` is not a finite float batch of images
    (B, C, H, W), signals (B, C, L) or tabular rows (B, F), or ``relevance`` is not a finite
    heatmap shaped like ``x``, (B, 1, *positions) or (B, *positions)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() not in (2, 3, 4):
        got = f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}"
        raise ValueError(f"{name}: x must be a float tensor of images (B, C, H, W), signals (B, C, L) or tabular "
                         f"rows (B, F), got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: x contains {int((~torch.isfinite(x)).sum())} non-finite value(s)")
    if relevance is None:
        return
    b, pos = x.shape[0], positions(x)
    valid = [tuple(x.shape), (b, *pos)] + ([(b, 1, *pos)] if x.dim() >= 3 else [])
    if not isinstance(relevance, torch.Tensor) or tuple(relevance.shape) not in valid:
        got = tuple(relevance.shape) if isinstance(relevance, torch.Tensor) else type(relevance).__name__
        raise ValueError(f"{name}: relevance (heatmap) of shape {got} does not fit x of shape {tuple(x.shape)}; "
                         f"valid shapes: {sorted(set(valid))}")
    bad = ~torch.isfinite(relevance)
    if bad.any():
        raise ValueError(f"{name}: relevance contains {int(bad.sum())} NaN/inf value(s) in sample(s) "
                         f"{bad.flatten(1).any(1).nonzero().flatten().tolist()[:10]}; heatmaps must be finite")


def pixel_relevance(relevance: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance per position (B, *positions): the sum over channels. Without ``x`` a 4-D heatmap
    is read as images (B, C, H, W) and anything else as already per position."""
    relevance = relevance.detach().float()
    if x is None:
        return relevance.sum(1) if relevance.dim() == 4 else relevance
    return relevance if tuple(relevance.shape[1:]) == positions(x) else relevance.sum(1)


def check_masks(masks: torch.Tensor | None, x: torch.Tensor, name: str) -> torch.Tensor:
    """Ground-truth masks as a boolean (B, *positions) tensor; a clear error if missing or misshaped."""
    if masks is None:
        raise ValueError(f"{name} is a localisation metric and needs ground-truth masks (B, H, W) or (B, 1, H, W), "
                         "e.g. the demo data's 'object_mask'; got masks=None")
    b, pos = x.shape[0], positions(x)
    ok = isinstance(masks, torch.Tensor) and masks.shape[0] == b and (
        tuple(masks.shape[1:]) == pos or (x.dim() >= 3 and masks.dim() == len(pos) + 2 and
                                          tuple(masks.shape[2:]) == pos))
    if not ok:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        valid = [(b, *pos)] + ([(b, "C", *pos)] if x.dim() >= 3 else [])
        raise ValueError(f"{name}: masks of shape {got} do not fit x of shape {tuple(x.shape)}; "
                         f"valid: {' or '.join(str(v).replace(chr(39), '') for v in valid)}")
    masks = masks.to(x.device).bool()
    return masks if tuple(masks.shape[1:]) == pos else masks.any(1)


def keep_shape(x: torch.Tensor) -> tuple[int, ...]:
    """The shape of one keep mask for ``x``: (1, *positions) (shared by the channels), or (F,) for
    tabular rows."""
    return (1, *positions(x)) if x.dim() >= 3 else positions(x)


def check_choice(value, valid, what: str, name: str):
    if value not in valid:
        raise ValueError(f"{name}: unknown {what} {value!r}; valid: {list(valid)}")
    return value


# ------------------------------------------------------------------------------------ model calls
def explain_stacked(model: nn.Module, inputs: torch.Tensor, target, method: str,
                    method_options: dict | None, batch_size: int) -> torch.Tensor:
    """Position relevance (N, *positions) of a stack of inputs, explained ``batch_size`` at a time."""
    return pixel_relevance(explain(model, inputs, target, method=method, batch_size=batch_size,
                                   **(method_options or {})), inputs)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of the unwrapped model that shares (does not copy) a Lightning trainer reference."""
    module = unwrap_model(model)
    trainer = getattr(module, "_trainer", None)
    return copy.deepcopy(module, memo={id(trainer): trainer} if trainer is not None else {})


def prepare(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor | None, name: str):
    """Check inputs; move x, target and pixel relevance to the model's device."""
    check_inputs(x, relevance, name)
    device = model_device(unwrap_model(model)) if model is not None else x.device
    x = x.detach().to(device=device, dtype=torch.float32)
    if target is None:
        with model_guard(model) as module, torch.no_grad():
            target = model_scores(module, x).argmax(1)
    target = as_target(target, x.shape[0], x.device, batch=x)
    r = pixel_relevance(relevance, x).to(device) if relevance is not None else None
    return x, target, r


# ---------------------------------------------------------------------------- ranks, similarities
def ranks(v: torch.Tensor) -> torch.Tensor:
    """Ordinal ranks (0 = smallest) along the last dimension."""
    order = v.argsort(dim=-1, stable=True)
    r = torch.empty_like(order)
    r.scatter_(-1, order, torch.arange(v.shape[-1], device=v.device).expand_as(order))
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the rows of (B, N) tensors (NaN for a constant row)."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of the rows of (B, N) tensors (ordinal ranks; ties broken by position)."""
    return pearson(ranks(a).float(), ranks(b).float())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the rows of (B, N) tensors."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()


SIMILARITIES = {"spearman": spearman, "pearson": pearson, "cosine": cosine}


# ------------------------------------------------------------------------------------ base class
class ExplanationMetric(Metric):
    """Base class: a torchmetrics ``Metric`` accumulating per-sample scores of explanations.

    ``update(x, target, relevance, masks=None)`` scores one batch; ``compute()`` returns the
    mean over all finite per-sample scores seen (non-finite ones, e.g. the correlation of a
    constant heatmap, are counted in ``n_skipped``). States are sums with
    ``dist_reduce_fx="sum"``, so the mean is exact across DDP ranks. Curve metrics also sum
    their curves (``curve_total``); :meth:`compute_curve` returns the mean curve.

    Args:
        model: the explained classifier (kept by reference, not registered as a submodule, so
            the metric's state_dict and ``.to()`` do not touch it); None for metrics that need
            no model (complexity, localisation).
        n_curve_points: length of the curve a curve metric accumulates (0: no curve).
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``dist_sync_on_step``).

    Raises:
        ValueError: at construction, no ``nn.Module`` for a metric that needs the model; in
            ``update``, inputs of a rank the metric does not take (``input_dims``) or a localisation
            metric without masks; in :meth:`compute_curve`, a metric without a curve.

    Example::

        class MeanRelevance(ExplanationMetric):
            name, needs_model = "mean_relevance", False

            def scores(self, x, target, relevance, masks=None):
                return relevance.flatten(1).mean(1)

        metric = MeanRelevance()
        metric.update(x, y, relevance)
        metric.compute()  # the mean over all samples seen (summed across DDP ranks)
    """

    name: str = "metric"
    curve_axis: str = "fraction of pixels"  # the x axis of a curve metric's curve
    input_dims: tuple[int, ...] = ALL_SHAPES  # input ranks it takes: 4 images, 3 signals, 2 tabular rows
    needs_model: bool = True
    needs_masks: bool = False
    needs_method: bool = False
    full_state_update = False

    def __init__(self, model: nn.Module | None = None, n_curve_points: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_curve_points = n_curve_points
        if self.needs_model and not isinstance(model, nn.Module):
            raise ValueError(f"{self.name} needs the model (an nn.Module); got {type(model).__name__}")
        self._model_ref = (model,)
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_skipped", torch.tensor(0.0), dist_reduce_fx="sum")
        if self.n_curve_points:
            self.add_state("curve_total", torch.zeros(self.n_curve_points), dist_reduce_fx="sum")
            self.add_state("curve_count", torch.tensor(0.0), dist_reduce_fx="sum")
            self.fractions = None

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref[0]

    @property
    def key(self) -> str:
        """The name under which this metric is logged (``xai/<method>/<key>``)."""
        return self.name

    def scores(self, x, target, relevance, masks=None):  # pragma: no cover - abstract
        """Per-sample scores (B,) or a :class:`CurveResult`; implemented by each metric."""
        raise NotImplementedError

    def update(self, x: torch.Tensor, target, relevance: torch.Tensor, masks: torch.Tensor | None = None) -> None:
        """Score a batch: ``x`` (B, C, H, W), ``target`` int or (B,), ``relevance`` the heatmaps
        of ``x`` for ``target``, ``masks`` ground truth (B, H, W) for localisation metrics."""
        if isinstance(x, torch.Tensor) and x.dim() not in self.input_dims:
            shapes = " or ".join(SHAPES[d] for d in self.input_dims)
            raise ValueError(f"{self.name} needs {shapes}, got shape {tuple(x.shape)}")
        if self.needs_masks and masks is None:
            check_masks(None, x, self.name)
        result = self.scores(x, target, relevance, masks)
        s = result.scores if isinstance(result, CurveResult) else result
        s = s.detach().to(self.total.device, torch.float32)
        finite = torch.isfinite(s)
        self.total += s[finite].sum()
        self.count += finite.sum()
        self.n_skipped += (~finite).sum()
        if isinstance(result, CurveResult):
            self.curve_total += result.curves.detach().to(self.curve_total.device, torch.float32).sum(0)
            self.curve_count += result.curves.shape[0]
            self.fractions = result.fractions.detach().cpu()

    def compute(self) -> torch.Tensor:
        return self.total / self.count

    def compute_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fractions, mean curve) of a curve metric."""
        if not self.n_curve_points:
            raise ValueError(f"{self.name} has no curve")
        with self.sync_context(should_sync=self._to_sync):  # sum over DDP ranks, restore after
            return self.fractions, self.curve_total / self.curve_count
