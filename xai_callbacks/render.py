"""Heatmaps to pictures: signed relevance in a diverging colormap (red positive, blue negative),
rendered to uint8 RGB here, so no logger rescales or clips signed values."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["heatmap_rgb", "input_rgb", "overlay", "panel"]


def _to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float32)


def _hw(relevance) -> np.ndarray:
    r = _to_numpy(relevance)
    return r.sum(0) if r.ndim == 3 else r


def _signed_unit(relevance, percentile: float) -> np.ndarray:
    """Relevance summed over channels, scaled to [-1, 1] by its ``percentile`` of |R|."""
    r = _hw(relevance)
    scale = np.percentile(np.abs(r), percentile)
    if not np.isfinite(scale) or scale <= 0:
        scale = np.abs(r).max()
    return np.clip(r / scale, -1, 1) if scale > 0 else np.zeros_like(r)


def heatmap_rgb(relevance, percentile: float = 99.5, cmap: str = "bwr") -> np.ndarray:
    """(C, H, W) or (H, W) relevance -> (H, W, 3) uint8; zero is white, the ``percentile`` of |R|
    is full red (positive) or full blue (negative)."""
    from matplotlib import colormaps

    v = _signed_unit(relevance, percentile)
    return (colormaps[cmap]((v + 1) / 2)[..., :3] * 255).round().astype(np.uint8)


def input_rgb(x) -> np.ndarray:
    """(C, H, W) input with 1 or 3 channels -> (H, W, 3) uint8, min-max scaled per image."""
    a = _to_numpy(x)
    if a.ndim == 2:
        a = a[None]
    if a.shape[0] not in (1, 3):
        a = a.mean(0, keepdims=True)
    lo, hi = a.min(), a.max()
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
    return (a.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def overlay(x, relevance, percentile: float = 99.5, cmap: str = "bwr") -> np.ndarray:
    """The heatmap over a dimmed greyscale input; each pixel's opacity is its |relevance|."""
    grey = input_rgb(x).mean(axis=2, keepdims=True) * 0.6 + 40
    heat = heatmap_rgb(relevance, percentile, cmap).astype(np.float32)
    alpha = np.abs(_signed_unit(relevance, percentile))[..., None]
    return (alpha * heat + (1 - alpha) * grey).round().clip(0, 255).astype(np.uint8)


def panel(x, relevance, scale: int | None = None, gap: int = 2) -> np.ndarray:
    """Input and overlay side by side, upscaled (nearest) so small images stay visible."""
    left, right = input_rgb(x), overlay(x, relevance)
    h = left.shape[0]
    scale = scale or max(1, 128 // h)
    sep = np.full((h, gap, 3), 255, np.uint8)
    img = np.concatenate([left, sep, right], axis=1)
    return img.repeat(scale, axis=0).repeat(scale, axis=1)


def tokens_html(tokens, relevance, percentile: float = 99.5, cmap: str = "bwr") -> str:
    """A line of tokens as HTML, each on a background coloured by its relevance (zero white, the
    ``percentile`` of |R| full red for positive, full blue for negative); hovering shows the value.

    Args:
        tokens: the token strings (L,).
        relevance: one relevance per token, (L,).
        percentile: the |R| percentile that saturates the colour.
        cmap: a diverging matplotlib colormap name.
    Raises ``ValueError`` when the lengths differ."""
    import html

    from matplotlib import colormaps

    r = (relevance.detach().float().cpu().numpy() if isinstance(relevance, torch.Tensor)
         else np.asarray(relevance, dtype=np.float32)).reshape(-1)
    if len(tokens) != len(r):
        raise ValueError(f"{len(tokens)} tokens but {len(r)} relevance values")
    scale = np.percentile(np.abs(r), percentile) if len(r) else 0.0
    scale = scale if np.isfinite(scale) and scale > 0 else (np.abs(r).max() if len(r) else 0.0)
    unit = np.clip(r / scale, -1, 1) if scale > 0 else np.zeros_like(r)
    colours = (colormaps[cmap]((unit + 1) / 2)[:, :3] * 255).round().astype(int)
    spans = [f'<span title="{v:.4g}" style="background-color: rgb({c[0]},{c[1]},{c[2]}); padding: 1px 2px; '
             f'margin: 1px; border-radius: 3px">{html.escape(str(t))}</span>'
             for t, v, c in zip(tokens, r, colours)]
    return '<div style="font-family: monospace; line-height: 1.8">' + " ".join(spans) + "</div>"
