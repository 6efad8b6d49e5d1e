"""Perturbation family: occlusion and RISE, with any infiller for the removed part.

Inputs are images (B, C, H, W), signals (B, C, L) or tabular rows (B, F): masks act on the
positions (pixels, time steps, features) and are shared by the channels. Perturbed copies of all
samples are scored by :func:`~xai_callbacks.scoring.score_perturbed`, ``batch_size`` per
forward pass; the removal goes through :mod:`xai_callbacks.infill`, so the GAN inpainter can
replace the constant fill.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import register_method
from ..infill import Infiller, get_infiller
from ..scoring import score_perturbed, target_scores

__all__ = ["occlusion", "rise", "positions", "perturbed_scores"]


def positions(x: torch.Tensor, method: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` with a channel axis (B, C, *positions) and the positions' shape; tabular (B, F) gets
    one channel. Raises a ValueError naming the shapes ``method`` takes."""
    if x.dim() == 2:
        return x[:, None], tuple(x.shape[1:])
    if x.dim() in (3, 4):
        return x, tuple(x.shape[2:])
    raise ValueError(f"{method} needs images (B, C, H, W), signals (B, C, L) or tabular rows (B, F); got shape "
                     f"{tuple(x.shape)}")


def perturbed_scores(model, x: torch.Tensor, keep: torch.Tensor, target, infiller: Infiller, batch_size: int,
                     output: str = "logit") -> torch.Tensor:
    """Target scores (B, M) of every sample of ``x`` (B, ...) under every keep mask (M, 1, ...)."""
    xc = positions(x, "perturbation")[0]
    b, m = x.shape[0], keep.shape[0]

    def make(idx):  # flat index j * B + i: mask j on sample i
        return infiller(xc[idx % b], keep[idx // b]).view(len(idx), *x.shape[1:])

    sample_of = torch.arange(b * m, device=x.device) % b
    return score_perturbed(model, make, sample_of, target, output=output, batch_size=batch_size).view(m, b).T


@register_method("occlusion", target_functions=True)
def occlusion(model, x, target, *, window: int = 4, stride: int | None = None, infiller: str | Infiller = "constant",
              batch_size: int = 256, output: str = "logit") -> torch.Tensor:
    """Occlusion (Zeiler & Fergus): score drop when a window of ``window`` positions per axis (all
    channels) is removed, averaged over the windows that cover a position; stride defaults to the
    window. Images: ``window`` x ``window`` patches; signals: ``window`` time steps; tabular:
    ``window`` consecutive features.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        window: side of the removed window along every position axis.
        stride: step between windows (default: ``window``).
        infiller: fills the removed window: a name or an Infiller.
        batch_size: perturbed inputs per forward pass.
        output: ``logit``, ``probability`` or ``log_probability`` of a class target.

    Raises:
        ValueError: a ``window`` larger than the input or < 1, ``stride`` < 1, an unknown
            ``output``, an unknown ``infiller`` (the message names the valid ones), a target out of
            range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="occlusion", window=8, stride=4)``.
    """
    xc, size = positions(x, "occlusion")
    stride = stride or window
    if not (1 <= window <= min(size)) or stride < 1:
        raise ValueError(f"occlusion window must be in 1..{min(size)} and stride >= 1, got window={window}, "
                         f"stride={stride}")
    starts = [range(0, n - window + 1, stride) for n in size]
    corners = list(itertools.product(*starts))
    keep = torch.ones(len(corners), 1, *size, device=x.device)
    for k, corner in enumerate(corners):
        keep[(k, slice(None), *(slice(c, c + window) for c in corner))] = 0
    with torch.no_grad():
        base = target_scores(model(x), target, output)
    drop = base[:, None] - perturbed_scores(model, x, keep, target, get_infiller(infiller), batch_size, output)
    removed = 1 - keep[:, 0].flatten(1)                     # (M, P)
    total = (drop @ removed).view(-1, 1, *size)             # (B, 1, *positions)
    count = removed.sum(0).view(1, 1, *size)
    return (total / count.clamp_min(1)).expand_as(xc).reshape(x.shape).contiguous()


@register_method("rise", target_functions=True)
def rise(model, x, target, *, n_masks: int = 500, grid: int = 8, p_keep: float = 0.5,
         infiller: str | Infiller = "constant", batch_size: int = 256,
         output: str = "probability", seed: int = 0) -> torch.Tensor:
    """RISE (Petsiuk et al.): mean of random smooth masks weighted by the target score of the
    masked input, divided by ``p_keep``. Masks: ``grid`` cells per position axis, each kept with
    probability ``p_keep``, upsampled (bilinear for images, linear for signals and tabular rows)
    and randomly shifted; drawn from an own generator seeded with ``seed``, so every sample and
    every batch chunk sees the same masks.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        n_masks: number of random masks.
        grid: cells per position axis before upsampling.
        p_keep: probability that a cell is kept.
        infiller: fills the removed part: a name or an Infiller.
        batch_size: perturbed inputs per forward pass.
        output: ``probability``, ``logit`` or ``log_probability`` of a class target.
        seed: seed of the masks.

    Raises:
        ValueError: ``p_keep`` outside (0, 1), ``n_masks`` or ``grid`` < 1, an unknown ``output``,
            an unknown ``infiller`` (the message names the valid ones), a target out of range or a
            model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="rise", n_masks=1000, grid=7)``.
    """
    xc, size = positions(x, "rise")
    if not 0 < p_keep < 1:
        raise ValueError(f"rise p_keep must be in (0, 1), got {p_keep}")
    if not isinstance(n_masks, int) or not isinstance(grid, int) or n_masks < 1 or grid < 1:
        raise ValueError(f"rise n_masks and grid must be ints >= 1, got n_masks={n_masks!r}, grid={grid!r}")
    cell = [-(-n // grid) for n in size]
    gen = torch.Generator().manual_seed(seed)
    cells = (torch.rand(n_masks, 1, *[grid] * len(size), generator=gen) < p_keep).float()
    up = F.interpolate(cells, size=tuple((grid + 1) * c for c in cell),
                       mode="bilinear" if len(size) == 2 else "linear", align_corners=False)
    shifts = [torch.randint(0, c, (n_masks,), generator=gen).tolist() for c in cell]
    keep = torch.stack([up[(k, slice(None), *(slice(s[k], s[k] + n) for s, n in zip(shifts, size)))]
                        for k in range(n_masks)]).to(x.device)
    scores = perturbed_scores(model, x, keep, target, get_infiller(infiller), batch_size, output)
    sal = (scores @ keep.flatten(1)).view(-1, 1, *size) / (n_masks * p_keep)
    return sal.expand_as(xc).reshape(x.shape).contiguous()
