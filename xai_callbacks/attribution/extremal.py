"""Extremal perturbation (Fong, Patrick & Vedaldi 2019), batched over samples and target areas.

For each target area ``a`` (a fraction of the image) a smooth mask ``m`` in [0, 1] is learned
that keeps (``game="preservation"``) or deletes (``"deletion"``) the evidence for the target,
while an area constraint pulls the sorted mask values towards a step with exactly ``a`` ones:

    loss(m) = -reward(m) + area_weight * mean((sort(m) - step_a)^2)

with reward ``score(x with m kept)`` (preservation), ``-score(x with m removed)`` (deletion) or
their sum (``"dual"``). The mask is parameterised at ``1 / mask_step`` of the image resolution,
Gaussian-smoothed (``smoothing``, in mask cells) and bilinearly upsampled; the removed part goes
through any :mod:`xai_callbacks.infill` infiller (``auto``: the GAN inpainter while one trains,
else blur). All samples and areas are optimised in one batch with Adam; the relevance is the
mean of the masks over the areas, so what survives at small areas weighs most. Tied mask values
share the area constraint's pull (:func:`rank_targets`).
"""
from __future__ import annotations

import math

import torch

from . import register_method
from .counterfactual import _OUTPUTS, _optimize, linear_resize
from ..infill import Infiller, gaussian_blur, get_infiller
from ..scoring import target_scores

__all__ = ["extremal_masks", "extremal_perturbation", "rank_targets"]

GAMES = ("preservation", "deletion", "dual")


def rank_targets(m: torch.Tensor, step: torch.Tensor, tie: float = 1e-5) -> torch.Tensor:
    """(R, n): per element of each row of ``m`` the value of ``step`` (sorted ascending) at its rank,
    averaged over runs of values less than ``tie`` apart. ``mean((m - rank_targets(m, step))^2)``
    is the area constraint ``mean((sort(m) - step)^2)`` with the gradient of tied elements shared:
    a constant start or a region the model ignores is pulled alike, not in the order the sort
    leaves ties in (or the upsampling's rounding puts them in), which put the mask of a model blind
    to its input in one part of the image, another part on CUDA than on the CPU."""
    v, order = m.sort(dim=1)
    first = torch.ones_like(v, dtype=torch.bool)
    first[:, 1:] = v[:, 1:] - v[:, :-1] > tie
    block = first.flatten().long().cumsum(0) - 1                     # runs of tied values, row by row
    sums = torch.zeros(block.numel(), device=m.device, dtype=step.dtype).index_add_(0, block, step.flatten())
    mean = sums / torch.bincount(block, minlength=block.numel()).clamp_min(1)
    return torch.empty_like(step).scatter_(1, order, mean[block].view_as(step))


def extremal_masks(model, x, target, *, areas=(0.05, 0.1, 0.2), game: str = "preservation",
                   infiller: str | Infiller = "auto", steps: int = 100, lr: float = 0.05, mask_step: int = 4,
                   smoothing: float = 1.0, area_weight: float = 300.0, output: str = "logit") -> torch.Tensor:
    """Extremal masks (B, A, 1, H, W), one per sample and area; arguments as in
    :func:`extremal_perturbation`. ``model`` must already be in eval mode (call through
    :func:`~xai_callbacks.attribution.explain` for the guard)."""
    if x.dim() != 4:
        raise ValueError(f"extremal_perturbation needs images (B, C, H, W), got shape {tuple(x.shape)}")
    areas = [float(a) for a in (areas if isinstance(areas, (list, tuple)) else [areas])]
    if not areas or not all(0 < a < 1 for a in areas):
        raise ValueError(f"extremal_perturbation areas must be fractions in (0, 1), got {areas}")
    if game not in GAMES:
        raise ValueError(f"extremal_perturbation game must be one of {list(GAMES)}, got {game!r}")
    if steps < 1 or not lr > 0 or mask_step < 1 or smoothing < 0 or area_weight < 0:
        raise ValueError(f"extremal_perturbation needs steps >= 1, lr > 0, mask_step >= 1, smoothing >= 0, "
                         f"area_weight >= 0; got steps={steps}, lr={lr}, mask_step={mask_step}, "
                         f"smoothing={smoothing}, area_weight={area_weight}")
    if output not in _OUTPUTS:
        raise ValueError(f"extremal_perturbation output must be one of {list(_OUTPUTS)}, got {output!r}")
    b, _, h, w = x.shape
    n_areas = len(areas)
    fill = get_infiller(infiller)
    x_rep = x.detach().repeat(n_areas, 1, 1, 1)   # area-major (A * B, ...): copies of the batch, as targets expect
    n_pixels = h * w
    step_fn = torch.zeros(n_areas, n_pixels, device=x.device)
    for k, a in enumerate(areas):
        step_fn[k, n_pixels - math.ceil(a * n_pixels):] = 1.0
    step_fn = step_fn.repeat_interleave(b, dim=0)                                   # (A * B, H * W)

    def masks(p):
        if smoothing > 0:
            p = gaussian_blur(p, smoothing)
        return linear_resize(p, (h, w))

    def loss_fn(p):
        m = masks(p)
        reward = 0.0
        if game in ("preservation", "dual"):
            reward = reward + target_scores(model(fill(x_rep, m)), target, output)
        if game in ("deletion", "dual"):
            reward = reward - target_scores(model(fill(x_rep, 1 - m)), target, output)
        flat = m.flatten(1)
        area = ((flat - rank_targets(flat.detach(), step_fn)) ** 2).mean(1)
        return (-reward + area_weight * area).sum()

    p0 = torch.full((n_areas * b, 1, -(-h // mask_step), -(-w // mask_step)), 0.5, device=x.device)
    p = _optimize(p0, loss_fn, steps, lr, clamp=True)
    with torch.no_grad():
        return masks(p).view(n_areas, b, 1, h, w).transpose(0, 1)


@register_method("extremal_perturbation", target_functions=True)
def extremal_perturbation(model, x, target, *, areas: tuple[float, ...] | list[float] | float = (0.05, 0.1, 0.2),
                          game: str = "preservation", infiller: str | Infiller = "auto", steps: int = 100,
                          lr: float = 0.05, mask_step: int = 4, smoothing: float = 1.0, area_weight: float = 300.0,
                          output: str = "logit") -> torch.Tensor:
    """Extremal perturbation on images (B, C, H, W): the mean over ``areas`` of the learned masks.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        areas: target areas as fractions of the image (one mask each).
        game: ``preservation`` (keep the mask), ``deletion`` (remove it) or ``dual`` (both).
        infiller: fills removed pixels: a name, an Infiller, or ``auto`` (GAN if trained, else blur).
        steps: Adam steps; lr: Adam learning rate on the mask parameters (clamped to [0, 1]).
        mask_step: the mask parameters live on a grid ``mask_step`` times coarser than the image.
        smoothing: sigma, in grid cells, of the Gaussian smoothing of the parameters (0: none).
        area_weight: weight of the area constraint.
        output: ``logit`` (as in the paper), ``log_probability`` or ``probability`` of the target.

    Raises:
        ValueError: inputs that are not images (B, C, H, W), ``areas`` outside (0, 1), an unknown
            ``game`` or ``output``, an unknown ``infiller`` (the message names the valid ones).

    Example: ``explain(model, x, y, method="extremal_perturbation", areas=[0.1], game="preservation", steps=200)``.
    """
    m = extremal_masks(model, x, target, areas=areas, game=game, infiller=infiller, steps=steps, lr=lr,
                       mask_step=mask_step, smoothing=smoothing, area_weight=area_weight, output=output)
    return m.mean(1).expand_as(x).contiguous()
