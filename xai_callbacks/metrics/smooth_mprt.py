"""Smooth model parameter randomisation test, sMPRT (Hedström et al. 2023).

The MPRT (Adebayo et al. 2018) compares heatmaps of the trained model with heatmaps of copies
whose layers are re-initialised one after another; noisy heatmaps make it unreliable, so sMPRT
denoises every heatmap first: the mean over ``n_samples`` explanations of noisy copies of the
input (Gaussian noise of std ``noise_magnitude * (max(x) - min(x))`` per sample, the last copy
without noise), of the trained model and of each randomised copy alike. Heatmaps are then
normalised by their second-moment estimate and (``abs=True``) made absolute, as Quantus does,
and compared per layer (Spearman by default). The score is the mean similarity over the layers
(lower is better); the curve is the similarity after 1..L randomised layers.

The noise comes from an own generator; the same noise is used for every model, so the
comparison sees the model change, not the noise. Re-initialisation uses each layer's
``reset_parameters`` (or a normal draw), each layer from ``seed`` inside a forked RNG (as
Quantus seeds each layer); the trained model is never touched.
"""
from __future__ import annotations

import torch
from torch import nn

from ..guard import rng_guard
from .base import SIMILARITIES, CurveResult, ExplanationMetric, check_choice, copy_model, explain_stacked, prepare
from .randomisation import ORDERS, _randomise, parameter_layers

__all__ = ["smooth_mprt", "SmoothMPRT"]


def _smoothed(model, x, target, method, method_options, noise, batch_size, abs_):
    """Mean pixel heatmap over the noisy copies ``x + noise[k]`` and ``x`` itself, normalised."""
    k = noise.shape[0]
    stacked = torch.cat([x[None] + noise, x[None]]).flatten(0, 1)          # (K + 1) * B copies, copy-major
    heat = explain_stacked(model, stacked, target.repeat(k + 1), method, method_options, batch_size)
    heat = heat.view(k + 1, *x.shape[:1], *heat.shape[1:]).mean(0).flatten(1)
    heat = heat / (heat.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30))
    return heat.abs() if abs_ else heat


def smooth_mprt(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor | None = None, *, method: str,
                method_options: dict | None = None, n_samples: int = 8, noise_magnitude: float = 0.1,
                layer_order: str = "bottom_up", similarity: str = "spearman", abs: bool = True,  # noqa: A002
                batch_size: int = 256, seed: int = 0, noise: torch.Tensor | None = None) -> CurveResult:
    """sMPRT: mean similarity (B,) and similarity per randomised layer (B, L).

    Args:
        model: the classifier (copied; the original is not modified).
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: the heatmaps of ``x`` (checked for shape only: the reference is the denoised
            heatmap of the trained model, computed here).
        method: the explainer re-run on noisy inputs and randomised copies.
        method_options: options of ``method``.
        n_samples: explanations averaged per heatmap (``n_samples - 1`` noisy copies and ``x``).
        noise_magnitude: noise std as a fraction of each sample's value range.
        layer_order: ``bottom_up`` (input layer first, as in sMPRT) or ``top_down``.
        similarity: ``spearman``, ``pearson`` or ``cosine``.
        abs: compare absolute heatmaps.
        batch_size: samples explained per call.
        seed: seed of the noise and of the re-initialisation.
        noise: optional fixed noise (n_samples - 1, B, C, H, W) (overrides the draws).

    Raises:
        ValueError: bad ``n_samples``, ``layer_order`` or ``similarity``.
    """
    compare = SIMILARITIES[check_choice(similarity, SIMILARITIES, "similarity", "smooth_mprt")]
    check_choice(layer_order, ORDERS, "layer_order", "smooth_mprt")
    if n_samples < 1:
        raise ValueError(f"smooth_mprt n_samples must be >= 1, got {n_samples}")
    x, target, _ = prepare(model, x, target, relevance, "smooth_mprt")
    if noise is None:
        dims = tuple(range(1, x.dim()))
        std = noise_magnitude * (x.amax(dims, keepdim=True) - x.amin(dims, keepdim=True))
        gen = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randn((n_samples - 1, *x.shape), generator=gen, device=x.device) * std
    noise = noise.to(x.device, x.dtype)
    reference = _smoothed(model, x, target, method, method_options, noise, batch_size, abs)
    randomised = copy_model(model)
    steps = []
    for name in parameter_layers(model, layer_order):
        with rng_guard(seed), torch.no_grad():
            _randomise(randomised.get_submodule(name))
        steps.append(compare(reference, _smoothed(randomised, x, target, method, method_options, noise, batch_size,
                                                  abs)))
    curves = torch.stack(steps, 1)
    return CurveResult(curves.mean(1), curves, torch.arange(1, curves.shape[1] + 1, dtype=torch.float64))


class SmoothMPRT(ExplanationMetric):
    """sMPRT, logged as ``smooth_mprt`` (the mean similarity of the denoised heatmaps; lower is
    better); the per-layer curve via :meth:`compute_curve`.

    Args:
        model, method, method_options, n_samples, noise_magnitude, layer_order, similarity, abs,
            batch_size, seed, **kwargs: as in :func:`smooth_mprt`.

    Raises:
        ValueError: an unknown ``layer_order`` or ``similarity`` (the message names the valid values).

    Example: ``metric = SmoothMPRT(model, method="saliency", n_samples=4)``, updated and computed like any
        metric; each heatmap averaged over 4 noisy inputs.
    """

    name = "smooth_mprt"
    curve_axis = "randomised layers"
    needs_method = True
    higher_is_better = False

    def __init__(self, model: nn.Module, method: str, method_options: dict | None = None, n_samples: int = 8,
                 noise_magnitude: float = 0.1, layer_order: str = "bottom_up", similarity: str = "spearman",
                 abs: bool = True, batch_size: int = 256, seed: int = 0, **kwargs):  # noqa: A002
        n_layers = len(parameter_layers(model, layer_order)) if isinstance(model, nn.Module) else 0
        super().__init__(model, n_curve_points=n_layers, **kwargs)
        check_choice(similarity, SIMILARITIES, "similarity", self.name)
        self.method, self.method_options = method, dict(method_options or {})
        self.n_samples, self.noise_magnitude, self.layer_order = n_samples, noise_magnitude, layer_order
        self.similarity, self.abs, self.batch_size, self.seed = similarity, abs, batch_size, seed

    def scores(self, x, target, relevance, masks=None):
        return smooth_mprt(self.model, x, target, relevance, method=self.method, method_options=self.method_options,
                           n_samples=self.n_samples, noise_magnitude=self.noise_magnitude,
                           layer_order=self.layer_order, similarity=self.similarity, abs=self.abs,
                           batch_size=self.batch_size, seed=self.seed)
