"""Surrogate-model methods over interpretable features, computed by captum: LIME and KernelSHAP.

An image is cut into features, a square grid of patches (``features="grid"``) or SLIC superpixels
(``features="slic"``, scikit-image) per sample. Random subsets of features are removed by
blending with a baseline image (the fill of an infiller: constant, blur, noise), the perturbed
copies are scored ``perturbations_per_eval`` at a time, and a weighted linear model is fit on
the (subset, score) pairs; each pixel gets its feature's coefficient. Samples are explained one
at a time with the random subsets drawn from ``seed`` (forked RNG), so a sample's heatmap does not
depend on the batch it came in.
"""
from __future__ import annotations

import warnings

import captum.attr as ca
import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnLasso, SkLearnLinearRegression

from . import CheckedForward, TargetModel, register_method
from ..scoring import select
from ..guard import rng_guard
from ..infill import Infiller, get_infiller

__all__ = ["feature_mask", "lime", "kernel_shap"]

FEATURES = ("grid", "slic")


def feature_mask(x: torch.Tensor, features: str = "grid", patch_size: int = 4, n_segments: int = 50,
                 compactness: float = 10.0) -> torch.Tensor:
    """Feature ids (B, 1, H, W), 0..K_b-1 per sample, for images ``x`` (B, C, H, W).

    Args:
        x: images.
        features: ``grid`` (squares of ``patch_size`` pixels) or ``slic`` (scikit-image SLIC
            superpixels, ``n_segments`` and ``compactness`` passed on).
        patch_size: side of a grid patch in pixels.
        n_segments: approximate number of SLIC superpixels.
        compactness: SLIC's balance of colour and space proximity.

    Raises:
        ValueError: ``x`` is not a batch of images, or an option is out of range.
    """
    if x.dim() != 4:
        raise ValueError(f"lime / kernel_shap need images (B, C, H, W) to build features, got shape {tuple(x.shape)}")
    if features not in FEATURES:
        raise ValueError(f"unknown features {features!r}; valid: {list(FEATURES)}")
    b, c, h, w = x.shape
    if features == "grid":
        if not 1 <= patch_size <= max(h, w):
            raise ValueError(f"patch_size must be in 1..{max(h, w)}, got {patch_size}")
        cols = -(-w // patch_size)
        ids = (torch.arange(h)[:, None] // patch_size) * cols + torch.arange(w)[None, :] // patch_size
        return ids.to(x.device).expand(b, 1, h, w)
    from skimage.segmentation import slic

    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments}")
    images = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    masks = []
    for img in images:
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        seg = slic(img if c > 1 else img[..., 0], n_segments=n_segments, compactness=compactness, start_label=0,
                   channel_axis=-1 if c > 1 else None)
        masks.append(np.unique(seg, return_inverse=True)[1].reshape(h, w))  # contiguous ids 0..K-1
    return torch.as_tensor(np.stack(masks)[:, None], device=x.device, dtype=torch.long)


def _surrogate(explainer_cls, model, x, target, *, features, patch_size, n_segments, compactness, infiller,
               n_samples, perturbations_per_eval, seed, **explainer_kwargs):
    fill = get_infiller(infiller)
    if type(fill).fill_masked is not Infiller.fill_masked:
        raise ValueError(f"lime / kernel_shap blend with a fixed baseline image; infiller {fill.name!r} depends on "
                         "the mask; use constant, blur or noise")
    if n_samples < 1 or perturbations_per_eval < 1:
        raise ValueError(f"n_samples and perturbations_per_eval must be >= 1, got {n_samples}, "
                         f"{perturbations_per_eval}")
    masks = feature_mask(x, features, patch_size, n_segments, compactness)
    with torch.no_grad():
        CheckedForward(model, target)(x)  # scores and target checked on the whole batch
    baselines = fill.fill(x.detach())
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Lasso|converge|Attempting to construct).*")
        for i in range(x.shape[0]):
            sample_model = model
            if isinstance(model, TargetModel):  # a target function: bound to this sample alone
                sample_model = TargetModel(model.inner, select(model.target, torch.tensor([i])))
            explainer = explainer_cls(sample_model, **explainer_kwargs)
            with rng_guard(seed):
                out.append(explainer.attribute(x[i:i + 1].detach(), baselines=baselines[i:i + 1],
                                               target=target[i:i + 1], feature_mask=masks[i:i + 1],
                                               n_samples=n_samples, perturbations_per_eval=perturbations_per_eval))
    return torch.cat(out)


@register_method("lime")
def lime(model, x, target, *, features: str = "grid", patch_size: int = 4, n_segments: int = 50,
         compactness: float = 10.0, infiller: str | Infiller = "constant", n_samples: int = 200,
         perturbations_per_eval: int = 64, alpha: float = 0.01, kernel_width: float = 1.0,
         seed: int = 0) -> torch.Tensor:
    """LIME (Ribeiro et al. 2016) by captum's ``Lime``: a sparse linear surrogate fit on
    ``n_samples`` random feature subsets, weighted by an exponential kernel on the cosine distance
    to the full image.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        features, patch_size, n_segments, compactness: the interpretable features, see
            :func:`feature_mask`.
        infiller: the baseline removed features are blended with (a mask-independent infiller).
        n_samples: perturbed copies per sample.
        perturbations_per_eval: perturbed copies per forward pass.
        alpha: L1 weight of the Lasso surrogate (0: ordinary least squares).
        kernel_width: width of the similarity kernel.
        seed: seed of the random subsets (the global RNG is forked, not advanced).

    Raises:
        ValueError: inputs that are not images (B, C, H, W), unknown ``features``, ``n_samples`` or
            ``perturbations_per_eval`` < 1, an unknown ``infiller`` (the message names the valid
            ones).

    Example: ``explain(model, x, y, method="lime", features="slic", n_segments=50)``.
    """
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    surrogate = SkLearnLasso(alpha=alpha) if alpha > 0 else SkLearnLinearRegression()
    return _surrogate(ca.Lime, model, x, target, features=features, patch_size=patch_size, n_segments=n_segments,
                      compactness=compactness, infiller=infiller, n_samples=n_samples,
                      perturbations_per_eval=perturbations_per_eval, seed=seed, interpretable_model=surrogate,
                      similarity_func=get_exp_kernel_similarity_function("cosine", kernel_width))


@register_method("kernel_shap")
def kernel_shap(model, x, target, *, features: str = "grid", patch_size: int = 4, n_segments: int = 50,
                compactness: float = 10.0, infiller: str | Infiller = "constant", n_samples: int = 200,
                perturbations_per_eval: int = 64, seed: int = 0) -> torch.Tensor:
    """KernelSHAP (Lundberg & Lee 2017) by captum's ``KernelShap``: Shapley values of the features,
    estimated by a linear regression on ``n_samples`` coalitions drawn with the Shapley kernel.
    Arguments as in :func:`lime`.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        features, patch_size, n_segments, compactness, infiller, n_samples, perturbations_per_eval,
            seed: as in :func:`lime`.

    Raises:
        ValueError: inputs that are not images (B, C, H, W), unknown ``features``, ``n_samples`` or
            ``perturbations_per_eval`` < 1, an unknown ``infiller`` (the message names the valid
            ones).

    Example: ``explain(model, x, y, method="kernel_shap", patch_size=8, n_samples=400)``.
    """
    return _surrogate(ca.KernelShap, model, x, target, features=features, patch_size=patch_size,
                      n_segments=n_segments, compactness=compactness, infiller=infiller, n_samples=n_samples,
                      perturbations_per_eval=perturbations_per_eval, seed=seed)
