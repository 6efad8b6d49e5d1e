"""Robustness: do small input changes keep the heatmap?

* max- / avg-sensitivity (Yeh et al. 2019): over ``n_samples`` inputs ``x + U(-radius, radius)``,
  the max / mean of ``||R(x') - R(x)|| / ||R(x)||`` (Frobenius norms of pixel relevance; lower is
  better);
* local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): over ``x' = x + N(0, noise_std^2)``,
  the max of ``||R(x') - R(x)||_2 / ||x' - x||_2`` (lower is better).

The heatmaps of all perturbed copies are computed by :func:`~xai_callbacks.attribution.explain`
in stacks of ``batch_size`` (samples x perturbations), on the model's device.
"""
from __future__ import annotations

import torch
from torch import nn

from ..scoring import select
from .base import ExplanationMetric, explain_stacked, prepare

__all__ = ["max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate", "MaxSensitivity",
           "AvgSensitivity", "LocalLipschitzEstimate"]


def _perturbed_relevance(model, x, target, method, method_options, batch_size, perturbations):
    """Pixel relevance (S, B, H, W) of ``x + perturbations[s]`` for every s."""
    s = perturbations.shape[0]
    inputs = (x[None] + perturbations).flatten(0, 1)
    rows = torch.arange(x.shape[0]).repeat(s)
    r = explain_stacked(model, inputs, select(target, rows), method, method_options, batch_size)
    return r.view(s, *x.shape[:1], *r.shape[1:])


def _draw(kind: str, scale: float, n: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=x.device).manual_seed(seed)
    if kind == "uniform":
        return (torch.rand(n, *x.shape, generator=gen, device=x.device) * 2 - 1) * scale
    return torch.randn(n, *x.shape, generator=gen, device=x.device) * scale


def sensitivity(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, method: str,
                method_options: dict | None = None, n_samples: int = 10, radius: float = 0.2,
                batch_size: int = 256, seed: int = 0, perturbations: torch.Tensor | None = None) -> torch.Tensor:
    """Relative heatmap change (n_samples, B) under uniform noise of half-width ``radius``.

    Args:
        model: the classifier.
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: heatmaps of ``x`` for ``target`` by ``method``.
        method: the explainer (a name from ``available_methods()``) that re-explains perturbed inputs.
        method_options: options of ``method``.
        n_samples: perturbations per sample.
        radius: half-width of the uniform noise added to every input element.
        batch_size: perturbed inputs explained per call.
        seed: seed of the noise (an own generator on the model's device).
        perturbations: optional fixed noise (n_samples, B, C, H, W) (overrides the draws).
    """
    x, target, r = prepare(model, x, target, relevance, "sensitivity")
    if perturbations is None:
        perturbations = _draw("uniform", radius, n_samples, x, seed)
    rp = _perturbed_relevance(model, x, target, method, method_options, batch_size, perturbations.to(x.device))
    return (rp - r[None]).flatten(2).norm(dim=-1) / r.flatten(1).norm(dim=-1)[None]


def max_sensitivity(model, x, target, relevance, **options) -> torch.Tensor:
    """Max-sensitivity (B,); options as in :func:`sensitivity`."""
    return sensitivity(model, x, target, relevance, **options).amax(0)


def avg_sensitivity(model, x, target, relevance, **options) -> torch.Tensor:
    """Avg-sensitivity (B,); options as in :func:`sensitivity`."""
    return sensitivity(model, x, target, relevance, **options).mean(0)


def local_lipschitz_estimate(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, method: str,
                             method_options: dict | None = None, n_samples: int = 10, noise_std: float = 0.1,
                             batch_size: int = 256, seed: int = 0,
                             perturbations: torch.Tensor | None = None) -> torch.Tensor:
    """Local Lipschitz estimate (B,): ``max_s ||R(x + d_s) - R(x)|| / ||d_s||`` with Gaussian
    ``d_s ~ N(0, noise_std^2)``. Arguments as in :func:`sensitivity`; ``noise_std`` replaces
    ``radius``."""
    x, target, r = prepare(model, x, target, relevance, "local_lipschitz_estimate")
    if perturbations is None:
        perturbations = _draw("normal", noise_std, n_samples, x, seed)
    perturbations = perturbations.to(x.device)
    rp = _perturbed_relevance(model, x, target, method, method_options, batch_size, perturbations)
    ratio = (rp - r[None]).flatten(2).norm(dim=-1) / perturbations.flatten(2).norm(dim=-1)
    return ratio.amax(0)


class _Robustness(ExplanationMetric):
    needs_method = True
    higher_is_better = False

    def __init__(self, model: nn.Module, method: str, method_options: dict | None = None, n_samples: int = 10,
                 batch_size: int = 256, seed: int = 0, **kwargs):
        super().__init__(model, **kwargs)
        if not isinstance(method, str):
            raise ValueError(f"{self.name} needs the explainer's name (method=...), got {method!r}")
        self.method, self.method_options = method, dict(method_options or {})
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed


class MaxSensitivity(_Robustness):
    """Max-sensitivity, logged as ``max_sensitivity``.

    Args:
        model, method, method_options, n_samples, radius, batch_size, seed, **kwargs: as in
            :func:`sensitivity`.

    Raises:
        ValueError: in ``update``, an unknown ``method`` or inputs that do not fit (see
            :class:`ExplanationMetric`).

    Example: ``metric = MaxSensitivity(model, method="saliency", radius=0.1)``, updated and computed like
        any metric; re-explains 10 noisy copies of each input.
    """

    name = "max_sensitivity"

    def __init__(self, model, method, method_options=None, n_samples: int = 10, radius: float = 0.2,
                 batch_size: int = 256, seed: int = 0, **kwargs):
        super().__init__(model, method, method_options, n_samples, batch_size, seed, **kwargs)
        self.radius = radius

    def _ratios(self, x, target, relevance):
        return sensitivity(self.model, x, target, relevance, method=self.method, method_options=self.method_options,
                           n_samples=self.n_samples, radius=self.radius, batch_size=self.batch_size, seed=self.seed)

    def scores(self, x, target, relevance, masks=None):
        return self._ratios(x, target, relevance).amax(0)


class AvgSensitivity(MaxSensitivity):
    """Avg-sensitivity, logged as ``avg_sensitivity``.

    Arguments and errors as in :class:`MaxSensitivity`.

    Example: ``metric = AvgSensitivity(model, method="saliency")``, updated and computed like any metric;
        the mean instead of the maximum.
    """

    name = "avg_sensitivity"

    def scores(self, x, target, relevance, masks=None):
        return self._ratios(x, target, relevance).mean(0)


class LocalLipschitzEstimate(_Robustness):
    """Local Lipschitz estimate, logged as ``local_lipschitz_estimate``.

    Arguments and errors as in :class:`MaxSensitivity` (see :func:`local_lipschitz_estimate`), with
    ``noise_std``, the standard deviation of the Gaussian input noise, in place of ``radius``.

    Example: ``metric = LocalLipschitzEstimate(model, method="saliency")``, updated and computed like any
        metric; the largest ratio ||R(x) - R(x + noise)|| / ||noise|| over Gaussian draws.
    """

    name = "local_lipschitz_estimate"

    def __init__(self, model, method, method_options=None, n_samples: int = 10, noise_std: float = 0.1,
                 batch_size: int = 256, seed: int = 0, **kwargs):
        super().__init__(model, method, method_options, n_samples, batch_size, seed, **kwargs)
        self.noise_std = noise_std

    def scores(self, x, target, relevance, masks=None):
        return local_lipschitz_estimate(self.model, x, target, relevance, method=self.method,
                                        method_options=self.method_options, n_samples=self.n_samples,
                                        noise_std=self.noise_std, batch_size=self.batch_size, seed=self.seed)
