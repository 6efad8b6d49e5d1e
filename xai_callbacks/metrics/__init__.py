"""Explanation-quality metrics as ``torchmetrics.Metric`` classes, each with a functional twin.

Every metric class is built as ``Metric(model, **options)`` (plus ``method=...`` for metrics that
re-explain), updated with ``update(x, target, relevance, masks=None)`` and computed as the mean
per-sample score; states are sums with ``dist_reduce_fx="sum"``, correct under DDP. Its ``key``
is the name it is logged under (``xai/<method>/<key>``); metrics that remove evidence name the
infiller in it (``pixel_flipping_morf_aopc.blur2``).

>>> from xai_callbacks.metrics import get_metric, available_metrics
>>> m = get_metric("pixel_flipping", model=model, order="morf", infiller="blur")
>>> m.update(x, y, relevance); m.compute().shape
torch.Size([])
"""
from __future__ import annotations

import inspect

from torch import nn

from .axioms import CompletenessError, InputInvarianceError, completeness_error, input_invariance_error
from .base import CurveResult, ExplanationMetric
from .complexity import Complexity, Sparseness, complexity, sparseness
from .faithfulness import (Deletion, FaithfulnessCorrelation, Infidelity, Insertion, PixelFlipping,
                           RegionPerturbation, deletion_auc, faithfulness_correlation, infidelity, insertion_auc,
                           pixel_flipping, region_perturbation)
from .localisation import PointingGame, RelevanceMass, RelevanceRank, pointing_game, relevance_mass, relevance_rank
from .randomisation import ModelParameterRandomisation, RandomLogit, model_parameter_randomisation, random_logit
from .robustness import (AvgSensitivity, LocalLipschitzEstimate, MaxSensitivity, avg_sensitivity,
                         local_lipschitz_estimate, max_sensitivity)
from .removal import IROF, Selectivity, SensitivityN, irof, selectivity, sensitivity_n
from .road import ROAD, road
from .smooth_mprt import SmoothMPRT, smooth_mprt

__all__ = [
    "get_metric", "available_metrics", "metric_class", "metric_options", "ExplanationMetric", "CurveResult",
    "PixelFlipping", "RegionPerturbation", "Insertion", "Deletion", "FaithfulnessCorrelation", "Infidelity",
    "MaxSensitivity", "AvgSensitivity", "LocalLipschitzEstimate",
    "RelevanceMass", "RelevanceRank", "PointingGame", "Sparseness", "Complexity",
    "ModelParameterRandomisation", "RandomLogit", "CompletenessError", "InputInvarianceError",
    "pixel_flipping", "region_perturbation", "insertion_auc", "deletion_auc", "faithfulness_correlation",
    "infidelity", "max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate", "relevance_mass",
    "relevance_rank", "pointing_game", "sparseness", "complexity", "model_parameter_randomisation",
    "random_logit", "completeness_error", "input_invariance_error",
    "ROAD", "IROF", "Selectivity", "SensitivityN", "SmoothMPRT", "road", "irof", "selectivity", "sensitivity_n",
    "smooth_mprt",
]

_METRICS: dict[str, type[ExplanationMetric]] = {
    "pixel_flipping": PixelFlipping,
    "region_perturbation": RegionPerturbation,
    "insertion_auc": Insertion,
    "deletion_auc": Deletion,
    "faithfulness_correlation": FaithfulnessCorrelation,
    "infidelity": Infidelity,
    "max_sensitivity": MaxSensitivity,
    "avg_sensitivity": AvgSensitivity,
    "local_lipschitz_estimate": LocalLipschitzEstimate,
    "relevance_mass": RelevanceMass,
    "relevance_rank": RelevanceRank,
    "pointing_game": PointingGame,
    "sparseness": Sparseness,
    "complexity": Complexity,
    "model_parameter_randomisation": ModelParameterRandomisation,
    "random_logit_similarity": RandomLogit,
    "completeness_error": CompletenessError,
    "input_invariance_error": InputInvarianceError,
    "road": ROAD,
    "irof": IROF,
    "selectivity": Selectivity,
    "sensitivity_n": SensitivityN,
    "smooth_mprt": SmoothMPRT,
}


def available_metrics() -> list[str]:
    """Names accepted by :func:`get_metric`."""
    return sorted(_METRICS)


def metric_class(name: str) -> type[ExplanationMetric]:
    """The metric class registered under ``name``."""
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {available_metrics()}")
    return _METRICS[name]


def metric_options(name: str) -> list[str]:
    """The options the metric ``name`` accepts (besides model, method and method_options)."""
    params = inspect.signature(metric_class(name).__init__).parameters
    return sorted(p for p in params if p not in ("self", "model", "method", "method_options", "kwargs"))


def get_metric(name: str, model: nn.Module | None = None, method: str | None = None,
               method_options: dict | None = None, **options) -> ExplanationMetric:
    """A new metric object.

    Args:
        name: a name from :func:`available_metrics`.
        model: the explained classifier (ignored by metrics that need none).
        method: the explainer, for metrics that re-explain perturbed inputs or models
            (robustness, randomisation, input invariance); ignored by the others.
        method_options: options of ``method``.
        **options: the metric's own options (see its class), e.g. ``order``, ``infiller``, ``n_steps``.
    """
    cls = metric_class(name)
    bad = sorted(set(options) - set(metric_options(name)))
    if bad:
        raise ValueError(f"unknown option(s) {bad} for metric {name!r}; valid: {metric_options(name)}")
    try:
        if cls.needs_method:
            if method is None:
                raise ValueError(f"metric {name!r} re-explains inputs and needs method=<explainer name>")
            return cls(model, method=method, method_options=method_options, **options)
        return cls(model, **options)
    except TypeError as err:
        raise TypeError(f"bad options {sorted(options)} for metric {name!r}: {err}") from err
