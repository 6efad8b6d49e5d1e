"""Perturbation family: occlusion and RISE, with any infiller for the removed part.

Perturbed copies of all samples are stacked into batches of ``perturbation_batch`` and scored
on the model's device; the removal goes through :mod:`xai_callbacks.infill` so the GAN
inpainter can replace the constant fill.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import CheckedForward, register_method
from ..infill import Infiller, get_infiller


def perturbed_scores(forward, x: torch.Tensor, keep: torch.Tensor, target: torch.Tensor, infiller: Infiller,
                     perturbation_batch: int, output: str = "logit") -> torch.Tensor:
    """Target scores of every sample under every mask: (B, M) for x (B, ...) and keep (M, 1, ...)."""
    if output not in ("logit", "probability"):
        raise ValueError(f"output must be 'logit' or 'probability', got {output!r}")
    b, m = x.shape[0], keep.shape[0]
    pairs = torch.cartesian_prod(torch.arange(b, device=x.device), torch.arange(m, device=x.device))
    scores = torch.empty(b * m, device=x.device)
    with torch.no_grad():
        for start in range(0, b * m, perturbation_batch):
            i, j = pairs[start:start + perturbation_batch].unbind(1)
            out = forward(infiller(x[i], keep[j]))
            if output == "probability":
                out = out.softmax(dim=1)
            scores[start:start + len(i)] = out.gather(1, target[i, None])[:, 0]
    return scores.view(b, m)


@register_method("occlusion")
def occlusion(model, x, target, *, window: int = 4, stride: int | None = None, infiller: str | Infiller = "constant",
              perturbation_batch: int = 256, output: str = "logit") -> torch.Tensor:
    """Occlusion (Zeiler & Fergus): score drop when a ``window`` x ``window`` patch (all channels)
    is removed, averaged over the windows that cover a pixel; stride defaults to the window."""
    if x.dim() != 4:
        raise ValueError(f"occlusion needs image input (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[2:]
    stride = stride or window
    if not (1 <= window <= min(h, w)) or stride < 1:
        raise ValueError(f"occlusion window must be in 1..{min(h, w)} and stride >= 1, got window={window}, "
                         f"stride={stride}")
    tops = range(0, h - window + 1, stride)
    lefts = range(0, w - window + 1, stride)
    keep = torch.ones(len(tops) * len(lefts), 1, h, w, device=x.device)
    for k, (t, l) in enumerate((t, l) for t in tops for l in lefts):
        keep[k, :, t:t + window, l:l + window] = 0
    forward = CheckedForward(model, target)
    with torch.no_grad():
        out = forward(x)
        base = (out.softmax(1) if output == "probability" else out).gather(1, target[:, None])
    drop = base - perturbed_scores(forward, x, keep, target, get_infiller(infiller), perturbation_batch, output)
    removed = 1 - keep[:, 0].flatten(1)                     # (M, H*W)
    total = (drop @ removed).view(-1, 1, h, w)              # (B, 1, H, W)
    count = removed.sum(0).view(1, 1, h, w)
    return (total / count.clamp_min(1)).expand_as(x).contiguous()


@register_method("rise")
def rise(model, x, target, *, n_masks: int = 500, grid: int = 8, p_keep: float = 0.5,
         infiller: str | Infiller = "constant", perturbation_batch: int = 256,
         output: str = "probability", mask_seed: int = 0) -> torch.Tensor:
    """RISE (Petsiuk et al.): mean of random smooth masks weighted by the target score of the
    masked input, divided by ``p_keep``. Masks: ``grid`` x ``grid`` Bernoulli(``p_keep``) cells,
    bilinearly upsampled and randomly shifted; drawn from an own generator seeded with
    ``mask_seed``, so every sample and every batch chunk sees the same masks."""
    if x.dim() != 4:
        raise ValueError(f"rise needs image input (B, C, H, W), got shape {tuple(x.shape)}")
    if not 0 < p_keep < 1:
        raise ValueError(f"rise p_keep must be in (0, 1), got {p_keep}")
    h, w = x.shape[2:]
    cell_h, cell_w = -(-h // grid), -(-w // grid)
    gen = torch.Generator().manual_seed(mask_seed)
    cells = (torch.rand(n_masks, 1, grid, grid, generator=gen) < p_keep).float()
    up = F.interpolate(cells, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear",
                       align_corners=False)
    dy = torch.randint(0, cell_h, (n_masks,), generator=gen).tolist()
    dx = torch.randint(0, cell_w, (n_masks,), generator=gen).tolist()
    keep = torch.stack([up[k, :, a:a + h, b:b + w] for k, (a, b) in enumerate(zip(dy, dx))]).to(x.device)
    forward = CheckedForward(model, target)
    scores = perturbed_scores(forward, x, keep, target, get_infiller(infiller), perturbation_batch, output)
    sal = (scores @ keep.flatten(1)).view(-1, 1, h, w) / (n_masks * p_keep)
    return sal.expand_as(x).contiguous()
