"""More removal-based faithfulness metrics: IROF, selectivity and sensitivity-n.

* IROF, iterative removal of features (Rieger & Hansen 2020): cut each image into SLIC
  superpixels (scikit-image), remove them cumulatively in the order of their mean relevance
  (highest first), and take the area over the curve of the target score relative to the
  unperturbed score: ``S - trapz(f(x_k) / f(x))`` for k = 1..S segments (higher is better);
* selectivity (Montavon et al. 2018): remove square patches cumulatively in the order of their
  relevance sum and take the area under the curve of the target score after each removal
  (``trapz`` with unit steps, as Quantus reports it; lower is better);
* sensitivity-n (Ancona et al. 2018): for each subset size ``n``, the Pearson correlation over
  random subsets of ``n`` pixels between the subset's relevance sum and the score drop when it
  is removed; the score is the mean over the sizes (higher is better), the curve one
  correlation per size. At a single size it is the faithfulness correlation.

Removed pixels are filled by an infiller (its name is part of the logged key); all perturbed
inputs are built on the model's device and scored ``batch_size`` at a time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..infill import Infiller, blender, get_infiller
from ..scoring import score_perturbed
from .base import require_images, OUTPUTS, CurveResult, check_choice, pearson, prepare, ranks
from .faithfulness import _Perturbation, removal_curve

__all__ = ["superpixels", "irof", "selectivity", "sensitivity_n", "IROF", "Selectivity", "SensitivityN"]


def superpixels(x: torch.Tensor, n_segments: int = 100, compactness: float = 10.0) -> torch.Tensor:
    """SLIC superpixel ids (B, H, W), 0..S_b-1 per image, computed by scikit-image on the raw
    (H, W, C) image in float64 (as Quantus does)."""
    from skimage.segmentation import slic

    images = x.detach().double().cpu().permute(0, 2, 3, 1).numpy()
    segs = [np.unique(slic(img, n_segments=n_segments, compactness=compactness, start_label=0),
                      return_inverse=True)[1].reshape(img.shape[:2]) for img in images]
    return torch.as_tensor(np.stack(segs), device=x.device, dtype=torch.long)


def irof(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, n_segments: int = 100,
         compactness: float = 10.0, segments: torch.Tensor | None = None, infiller: str | Infiller = "constant",
         output: str = "probability", batch_size: int = 256) -> torch.Tensor:
    """IROF (B,): area over the curve of the relative target score while superpixels are removed,
    most relevant (highest mean relevance) first.

    Args:
        model: the classifier.
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: heatmaps of ``x`` for ``target``.
        n_segments, compactness: SLIC options (see :func:`superpixels`).
        segments: optional fixed segment ids (B, H, W), 0..S_b-1 (overrides SLIC).
        infiller: what replaces removed segments.
        output: ``probability`` or ``logit`` of the target.
        batch_size: perturbed inputs per forward pass.

    Raises:
        ValueError: segments that do not fit ``x``.
    """
    check_choice(output, OUTPUTS, "output", "irof")
    x, target, r = prepare(model, x, target, relevance, "irof")
    require_images(x, "irof")
    b, _, h, w = x.shape
    seg = superpixels(x, n_segments, compactness) if segments is None else \
        torch.as_tensor(segments, device=x.device)
    if tuple(seg.shape) != (b, h, w) or seg.is_floating_point():
        raise ValueError(f"irof: segments must be integer ids of shape {(b, h, w)}, got {tuple(seg.shape)}")
    seg = seg.long().flatten(1)
    n_seg = seg.amax(1) + 1                                              # (B,)
    s_max = int(n_seg.max())
    sums = torch.zeros(b, s_max, device=x.device).scatter_add_(1, seg, r.flatten(1))
    sizes = torch.zeros(b, s_max, device=x.device).scatter_add_(1, seg, torch.ones_like(r.flatten(1)))
    mean = torch.where(sizes > 0, sums / sizes.clamp_min(1), torch.full_like(sums, -float("inf")))
    position = ranks(-mean).gather(1, seg)                               # (B, H*W): segment's removal rank
    blend = blender(get_infiller(infiller), x)

    def make(idx):
        i, k = idx // s_max, idx % s_max + 1
        keep = position[i] >= k[:, None]
        return blend(i, keep.view(-1, 1, h, w).to(x.dtype))

    samples = torch.arange(b, device=x.device)
    base = score_perturbed(model, lambda idx: x[idx], samples, target, output=output, batch_size=batch_size)
    curve = score_perturbed(model, make, samples.repeat_interleave(s_max), target, output=output,
                            batch_size=batch_size).view(b, s_max)
    valid = torch.arange(1, s_max + 1, device=x.device)[None] <= n_seg[:, None]
    curve = (curve / base[:, None]) * valid
    return n_seg.double() - torch.trapezoid(curve.double(), dx=1.0, dim=1)


def selectivity(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, patch_size: int = 8,
                infiller: str | Infiller = "constant", output: str = "probability", batch_size: int = 256) -> CurveResult:
    """Selectivity: area under the curve (B,) of the target score after each cumulative removal of
    a ``patch_size`` square (highest relevance sum first), and the curves (B, n_patches + 1)
    starting at the unperturbed score. Arguments as in :func:`irof`."""
    check_choice(output, OUTPUTS, "output", "selectivity")
    x, target, r = prepare(model, x, target, relevance, "selectivity")
    curve, fractions = removal_curve(model, x, target, r, order="morf", patch_size=patch_size, n_steps=None,
                                     infiller=get_infiller(infiller), output=output, batch_size=batch_size)
    return CurveResult(torch.trapezoid(curve[:, 1:].double(), dx=1.0, dim=1).float(), curve, fractions)


def sensitivity_n(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *,
                  fractions: Sequence[float] = (0.01, 0.03, 0.1, 0.3), n_runs: int = 32,
                  infiller: str | Infiller = "constant", output: str = "logit", batch_size: int = 256, seed: int = 0,
                  subsets: Sequence[torch.Tensor] | None = None) -> CurveResult:
    """Sensitivity-n: mean correlation (B,) and correlation per subset size (B, len(fractions)).

    Args:
        model, x, target, relevance, infiller, batch_size: as in :func:`irof`.
        fractions: subset sizes as fractions of the H*W pixels (n = max(1, round(f * H * W))).
        n_runs: random subsets per sample and size (at least 2).
        output: ``logit`` (default: heatmaps explain logits) or ``probability``.
        seed: seed of the subsets (an own generator on the model's device).
        subsets: optional fixed subsets, one LongTensor (B, n_runs, n) of flat pixel indices per
            size (overrides ``fractions``, ``n_runs`` and ``seed``).

    Raises:
        ValueError: a fraction outside (0, 1] or fewer than 2 runs.
    """
    check_choice(output, OUTPUTS, "output", "sensitivity_n")
    x, target, r = prepare(model, x, target, relevance, "sensitivity_n")
    require_images(x, "sensitivity_n")
    b, _, h, w = x.shape
    if subsets is None:
        if n_runs < 2 or not fractions or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"sensitivity_n needs fractions in (0, 1] and n_runs >= 2, got fractions="
                             f"{list(fractions)}, n_runs={n_runs}")
        gen = torch.Generator(device=x.device).manual_seed(seed)
        sizes = [max(1, round(f * h * w)) for f in fractions]
        subsets = [torch.rand(b, n_runs, h * w, generator=gen, device=x.device).argsort(-1)[..., :n] for n in sizes]
    subsets = [s.to(x.device) for s in subsets]
    blend = blender(get_infiller(infiller), x)
    samples = torch.arange(b, device=x.device)
    base = score_perturbed(model, lambda idx: x[idx], samples, target, output=output, batch_size=batch_size)
    corrs = []
    for sub in subsets:
        runs = sub.shape[1]

        def make(idx, sub=sub, runs=runs):
            i, j = idx // runs, idx % runs
            keep = torch.ones(len(idx), h * w, device=x.device).scatter_(1, sub[i, j], 0.0)
            return blend(i, keep.view(-1, 1, h, w))

        perturbed = score_perturbed(model, make, samples.repeat_interleave(runs), target, output=output,
                                    batch_size=batch_size)
        drops = base[:, None] - perturbed.view(b, runs)
        sums = r.flatten(1).gather(1, sub.flatten(1)).view(b, runs, -1).sum(-1)
        corrs.append(pearson(sums, drops))
    curves = torch.stack(corrs, 1)
    sizes = torch.tensor([s.shape[-1] for s in subsets], dtype=torch.float64) / (h * w)
    return CurveResult(curves.mean(1), curves, sizes)


# ------------------------------------------------------------------------------------ classes
class IROF(_Perturbation):
    """IROF, logged as ``irof.<infiller>`` (higher is better).

    Args:
        model, n_segments, compactness, infiller, output, batch_size, **kwargs: as in :func:`irof`.

    Raises:
        ValueError: an unknown ``infiller`` or ``output`` (the message names the valid values).

    Example: ``metric = IROF(model, n_segments=50)``, updated and computed like any metric; SLIC
        superpixels, removed in order of mean relevance.
    """

    name = "irof"
    higher_is_better = True

    def __init__(self, model: nn.Module, n_segments: int = 100, compactness: float = 10.0,
                 infiller: str | Infiller = "constant", output: str = "probability", batch_size: int = 256, **kwargs):
        super().__init__(model, infiller, output, batch_size, **kwargs)
        self.n_segments, self.compactness = n_segments, compactness

    def scores(self, x, target, relevance, masks=None):
        return irof(self.model, x, target, relevance, n_segments=self.n_segments, compactness=self.compactness,
                    infiller=self.infiller, output=self.output, batch_size=self.batch_size)


class Selectivity(_Perturbation):
    """Selectivity, logged as ``selectivity.<infiller>`` (lower is better). The mean curve via
    :meth:`compute_curve` needs images of one size.

    Args:
        model, patch_size, infiller, output, batch_size, **kwargs: as in :func:`selectivity`.

    Raises:
        ValueError: an unknown ``infiller`` or ``output`` (the message names the valid values).

    Example: ``metric = Selectivity(model, patch_size=8)``, updated and computed like any metric; the
        curve needs images of one size.
    """

    name = "selectivity"
    higher_is_better = False

    def __init__(self, model: nn.Module, patch_size: int = 8, infiller: str | Infiller = "constant",
                 output: str = "probability", batch_size: int = 256, **kwargs):
        super().__init__(model, infiller, output, batch_size, **kwargs)
        self.patch_size = patch_size

    def scores(self, x, target, relevance, masks=None):
        res = selectivity(self.model, x, target, relevance, patch_size=self.patch_size, infiller=self.infiller,
                          output=self.output, batch_size=self.batch_size)
        return res.scores


class SensitivityN(_Perturbation):
    """Sensitivity-n, logged as ``sensitivity_n.<infiller>`` (higher is better); the mean
    correlation per subset size via :meth:`compute_curve`.

    Args:
        model, fractions, n_runs, infiller, output, batch_size, seed, **kwargs: as in
            :func:`sensitivity_n`.

    Raises:
        ValueError: an unknown ``infiller`` or ``output`` (the message names the valid values).

    Example: ``metric = SensitivityN(model, fractions=(0.05, 0.2))``, updated and computed like any
        metric; one correlation per subset size in ``compute_curve()``.
    """

    name = "sensitivity_n"
    curve_axis = "subset size (fraction of pixels)"
    higher_is_better = True

    def __init__(self, model: nn.Module, fractions: Sequence[float] = (0.01, 0.03, 0.1, 0.3), n_runs: int = 32,
                 infiller: str | Infiller = "constant", output: str = "logit", batch_size: int = 256, seed: int = 0,
                 **kwargs):
        self.subset_fractions = tuple(fractions)  # (``fractions`` is the base class's curve axis)
        super().__init__(model, infiller, output, batch_size, n_curve_points=len(self.subset_fractions), **kwargs)
        self.n_runs, self.seed = n_runs, seed

    def scores(self, x, target, relevance, masks=None):
        return sensitivity_n(self.model, x, target, relevance, fractions=self.subset_fractions, n_runs=self.n_runs,
                             infiller=self.infiller, output=self.output, batch_size=self.batch_size, seed=self.seed)
