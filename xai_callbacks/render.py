"""Everything the callbacks show, as uint8 RGB pictures built here (so no logger rescales or clips
signed values): heatmaps in a diverging colormap (red positive, blue negative), inputs, rows of
tiles, labelled strategy prototypes, spectra and scatter plots, inpainting examples.

Pictures are (H, W, 3) uint8 arrays; small ones are enlarged by :func:`upscale` (nearest
neighbour, integer factor) and laid side by side by :func:`tile_row`.

>>> img = panel(x[0], relevance[0])                     # input | overlay | colour scale
>>> row = tile_row([input_rgb(a) for a in x[:4]], gap=2)
>>> row.shape, row.dtype                                # four 32-pixel tiles, three gaps
((32, 134, 3), dtype('uint8'))
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["heatmap_rgb", "input_rgb", "overlay", "panel", "colour_scale", "prototype_picture", "spectrum_picture",
           "tokens_html", "upscale", "tile_row", "figure_rgb", "inpainting_row", "strategy_scatter", "signal_panel",
           "signal_fills", "tile_row_signals"]


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


def input_rgb(x, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """(C, H, W) or (H, W) input -> (H, W, 3) uint8.

    Args:
        x: the input; 1 or 3 channels are shown as they are, other channel counts by their mean.
        value_range: ``(low, high)`` shown as black and white (values outside are clipped), e.g. the
            range of a whole batch so that several pictures share one scale; None: the picture's
            own minimum and maximum.
    """
    a = _to_numpy(x)
    if a.ndim == 2:
        a = a[None]
    if a.shape[0] not in (1, 3):
        a = a.mean(0, keepdims=True)
    lo, hi = (a.min(), a.max()) if value_range is None else value_range
    a = np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
    return (a.transpose(1, 2, 0) * 255).round().astype(np.uint8)


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """``img`` (H, W, ...) enlarged ``factor`` times by nearest neighbour (each pixel a block)."""
    return img.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else img


def tile_row(tiles: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """(H, W, 3) uint8 pictures side by side, ``gap`` white pixels apart, top-aligned on white.

    Raises:
        ValueError: no tiles.
    """
    if not tiles:
        raise ValueError("tile_row needs at least one picture")
    h = max(t.shape[0] for t in tiles)
    parts = []
    for t in tiles:
        pad = np.full((h, t.shape[1], 3), 255, np.uint8)
        pad[:t.shape[0]] = t
        parts += [pad, np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def figure_rgb(fig) -> np.ndarray:
    """A matplotlib figure drawn to (H, W, 3) uint8; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def inpainting_row(x, keep, fills, gap: int = 2, side: int = 96) -> np.ndarray:
    """One inpainting example: input | mask (black = removed) | each fill, grey, all on the input's
    own value range, enlarged to about ``side`` pixels high.

    Args:
        x: the input (C, H, W).
        keep: its keep mask (1 or C, H, W) in [0, 1] (1 = kept).
        fills: the filled inputs, each like ``x``.
        gap: white pixels between the tiles (before enlarging).
        side: target height; the row is enlarged by ``max(1, side // H)``.
    """
    x = _to_numpy(x)
    grey = (float(x.min()), float(x.max()))
    tiles = [input_rgb(x.mean(0), grey), input_rgb(_to_numpy(keep).mean(0), (0.0, 1.0))]
    tiles += [input_rgb(_to_numpy(f).mean(0), grey) for f in fills]
    return upscale(tile_row(tiles, gap), max(1, side // x.shape[-2]))


def overlay(x, relevance, percentile: float = 99.5, cmap: str = "bwr") -> np.ndarray:
    """The heatmap over a dimmed greyscale input; each pixel's opacity is its |relevance|."""
    grey = input_rgb(x).mean(axis=2, keepdims=True) * 0.6 + 40
    heat = heatmap_rgb(relevance, percentile, cmap).astype(np.float32)
    alpha = np.abs(_signed_unit(relevance, percentile))[..., None]
    return (alpha * heat + (1 - alpha) * grey).round().clip(0, 255).astype(np.uint8)


def _scale_of(relevance, percentile: float) -> float:
    """The |R| that saturates the colours (as in :func:`heatmap_rgb`)."""
    r = np.abs(_hw(relevance))
    scale = float(np.percentile(r, percentile))
    return scale if np.isfinite(scale) and scale > 0 else float(r.max())


def _text(img: np.ndarray, lines: list[tuple[str, tuple[int, int, int]]], top: int = 2, left: int = 3) -> np.ndarray:
    """``img`` with lines of (text, colour) drawn from its top-left corner (Pillow's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    pic = Image.fromarray(img)
    draw, font = ImageDraw.Draw(pic), ImageFont.load_default()
    for i, (line, colour) in enumerate(lines):
        draw.text((left, top + 12 * i), line, fill=colour, font=font)
    return np.asarray(pic).copy()


def colour_scale(height: int, scale: float, cmap: str = "bwr", width: int = 14) -> np.ndarray:
    """A vertical colour bar for ``height`` pixels with its values: ``+scale`` at the top, 0 in
    the middle, ``-scale`` at the bottom, as (height, width + labels, 3) uint8."""
    from matplotlib import colormaps

    v = np.linspace(1, -1, height)[:, None].repeat(width, axis=1)
    bar = (colormaps[cmap]((v + 1) / 2)[..., :3] * 255).round().astype(np.uint8)
    labels = np.full((height, 48, 3), 255, np.uint8)
    labels = _text(labels, [(f"+{scale:.2g}", (0, 0, 0))], top=0)
    labels = _text(labels, [("0", (0, 0, 0))], top=max(0, height // 2 - 6))
    labels = _text(labels, [(f"-{scale:.2g}", (0, 0, 0))], top=max(0, height - 12))
    return np.concatenate([bar, np.full((height, 2, 3), 255, np.uint8), labels], axis=1)


def panel(x, relevance, scale: int | None = None, gap: int = 2, percentile: float = 99.5) -> np.ndarray:
    """Input | overlay | colour scale, upscaled (nearest) so small images stay visible; the
    scale's ends are the relevance that saturates the colours."""
    left, right = input_rgb(x), overlay(x, relevance, percentile)
    h = left.shape[0]
    scale = scale or max(1, 128 // h)
    sep = np.full((h, gap, 3), 255, np.uint8)
    img = np.concatenate([left, sep, right], axis=1)
    img = upscale(img, scale)
    bar = colour_scale(img.shape[0], _scale_of(relevance, percentile))
    return np.concatenate([img, np.full((img.shape[0], gap * scale, 3), 255, np.uint8), bar], axis=1)


def prototype_picture(prototype, strategy: int, size: int, share: float, flagged: bool, side: int = 192,
                      extra: str = "") -> np.ndarray:
    """A strategy's prototype (mean heatmap) at ``side`` pixels, labelled with its id, size and
    share; a flagged strategy gets a red frame and "FLAGGED" in its label.

    Args:
        prototype: (C, H, W) or (H, W) mean relevance.
        strategy: the strategy's id.
        size: members.
        share: members' share of the class.
        flagged: whether the strategy is a suspected Clever-Hans strategy.
        side: the picture's longer side in pixels (nearest upscaling by an integer factor).
        extra: an optional third label line (e.g. the evidence that flagged it).
    """
    heat = heatmap_rgb(prototype)
    heat = upscale(heat, max(1, side // max(heat.shape[:2])))
    frame = 6 if flagged else 1
    colour = (220, 0, 0) if flagged else (160, 160, 160)
    lines = [(f"strategy {strategy}" + ("  FLAGGED" if flagged else ""), colour if flagged else (0, 0, 0)),
             (f"{size} samples ({share:.0%})", (0, 0, 0))] + ([(extra, (0, 0, 0))] if extra else [])
    header = _text(np.full((12 * len(lines) + 4, heat.shape[1], 3), 255, np.uint8), lines)
    body = np.concatenate([header, heat], axis=0)
    out = np.empty((body.shape[0] + 2 * frame, body.shape[1] + 2 * frame, 3), np.uint8)
    out[:] = colour
    out[frame:-frame, frame:-frame] = body
    return out


def spectrum_picture(eigenvalues, n_clusters: int, title: str = "", n_show: int = 16) -> np.ndarray:
    """The smallest Laplacian eigenvalues with the gap that chose ``n_clusters`` marked, as uint8 RGB.

    Args:
        eigenvalues: ascending eigenvalues.
        n_clusters: the chosen K (the gap lies between eigenvalue K and K+1, 1-based).
        title: the plot's title.
        n_show: eigenvalues shown at most (at least K + 2).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ev = np.asarray(eigenvalues, dtype=float)[: max(n_show, n_clusters + 2)]
    idx = np.arange(1, len(ev) + 1)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.plot(idx, ev, "o-", color="black", markersize=4)
    ax.plot(idx[:n_clusters], ev[:n_clusters], "o", color="tab:red", markersize=6, label=f"K = {n_clusters}")
    if n_clusters < len(ev):
        ax.axvspan(n_clusters, n_clusters + 1, color="tab:red", alpha=0.15, label="chosen gap")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title or f"Laplacian spectrum: {n_clusters} strategies by the eigengap", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.2, right=0.97, bottom=0.15, top=0.9)   # fixed: tight_layout draws it once more
    return figure_rgb(fig)


def strategy_scatter(embedding, strategy, flagged, title: str = "") -> np.ndarray:
    """A 2-D embedding of heatmaps coloured by strategy, flagged strategies ringed in red, as
    (H, W, 3) uint8.

    Args:
        embedding: (N, 2) coordinates (e.g. SpRAy's t-SNE embedding).
        strategy: (N,) strategy id of each sample; -1 for noise (light grey).
        flagged: the ids of the flagged strategies.
        title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    embedding, strategy = np.asarray(embedding), np.asarray(strategy)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    cmap = plt.get_cmap("tab10")
    for sid in sorted(set(strategy.tolist())):
        m = strategy == sid
        ax.scatter(embedding[m, 0], embedding[m, 1], s=12, color="lightgrey" if sid < 0 else cmap(sid % 10),
                   edgecolors="red" if sid in flagged else "none", linewidths=1.0,
                   label=("noise" if sid < 0 else f"strategy {sid}") + (" (flagged)" if sid in flagged else ""))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="best")
    return figure_rgb(fig)


def token_names(ids, vocab=None) -> list[str]:
    """The words of the token ``ids``: ``vocab[i]`` (a sequence indexed by id) or ``vocab(i)`` (a
    function), the ids themselves without a vocabulary."""
    ids = [int(i) for i in ids]
    if vocab is None:
        return [str(i) for i in ids]
    return [str(vocab(i) if callable(vocab) else vocab[i]) for i in ids]


def token_evidence_html(caption: str, example, relevance, region, region_words: Sequence[tuple[str, int]],
                        vocab=None) -> str:
    """One strategy's causal evidence on token ids as HTML: ``caption``, the words its members'
    regions hold most often (``region_words``: (word, count)), and four texts from ``example``
    (4, L) ids: its most confirmed member coloured by its ``relevance`` (L,), the member with its
    ``region`` (L,) removed, an other-class row, and that row with the member's region pasted (the
    region's positions red in those two)."""
    import html

    mark = torch.as_tensor(region).reshape(-1).float()
    rows = [("member", relevance), ("region removed", mark), ("other class", torch.zeros_like(mark)),
            ("region pasted", mark)]
    words = ", ".join(f"{html.escape(w)} ({n})" for w, n in region_words)
    ids = torch.as_tensor(example).reshape(4, -1).round().long().tolist()
    texts = "".join(f"<div>{label}</div>{tokens_html(token_names(row, vocab), colour)}"
                    for (label, colour), row in zip(rows, ids))
    return f"<p><b>{html.escape(caption)}</b><br>its members' regions hold: {words}</p>{texts}"


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


def _signal_axes(n: int, positions, channel_names, channels: int):
    """x values (positions or 0..n-1), whether they are frequencies (log axis) and channel names."""
    freq = positions is not None
    xs = np.asarray(positions, dtype=float) if freq else np.arange(n, dtype=float)
    if len(xs) != n:
        raise ValueError(f"positions has {len(xs)} values for signals of length {n}")
    names = list(channel_names) if channel_names is not None else [f"channel {c}" for c in range(channels)]
    if len(names) != channels:
        raise ValueError(f"channel_names has {len(names)} names for {channels} channels")
    return xs, freq, names


def signal_panel(x, relevance, positions=None, channel_names=None, title: str = "",
                 percentile: float = 99.5) -> np.ndarray:
    """A signal (C, L), e.g. a spectrum's magnitude and phase, one plot per channel, with its
    relevance overlaid as bars (red positive, blue negative; the ``percentile`` of |R| fills the
    plot's height), as (H, W, 3) uint8.

    Args:
        x: the input (C, L).
        relevance: (C, L) relevance (one row per channel) or (L,) / (1, L) shared by the channels.
        positions: the positions' values, e.g. frequencies in Hz (drawn on a log axis); None: 0..L-1.
        channel_names: one name per channel (e.g. ``["magnitude", "phase"]``).
        title: the picture's title.
        percentile: the |R| percentile that fills the height.

    Raises:
        ValueError: mismatched shapes, positions or names.

    Example::

        img = signal_panel(x[0], heat[0], positions=dataset.frequencies, channel_names=dataset.channel_names)
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    a, r = _to_numpy(x), _to_numpy(relevance)
    if a.ndim != 2:
        raise ValueError(f"signal_panel needs one signal (C, L), got shape {a.shape}")
    r = np.broadcast_to(r.reshape(-1, a.shape[1]) if r.size % a.shape[1] == 0 else r, a.shape) \
        if r.shape != a.shape else r
    xs, freq, names = _signal_axes(a.shape[1], positions, channel_names, a.shape[0])
    scale = float(np.percentile(np.abs(r), percentile)) or float(np.abs(r).max()) or 1.0
    fig, axes = plt.subplots(a.shape[0], 1, figsize=(6, 1.6 * a.shape[0] + 0.4), dpi=80, sharex=True, squeeze=False)
    width = np.gradient(xs) if len(xs) > 1 else np.ones(1)
    for c, ax in enumerate(axes[:, 0]):
        ax.plot(xs, a[c], color="black", linewidth=0.9)
        twin = ax.twinx()
        rel = np.clip(r[c] / scale, -1, 1)
        twin.bar(xs, rel, width=width, color=np.where(rel >= 0, "tab:red", "tab:blue"), alpha=0.45, linewidth=0)
        twin.set_ylim(-1.05, 1.05)
        twin.set_yticks([-1, 0, 1], [f"-{scale:.2g}", "0", f"+{scale:.2g}"], fontsize=6)
        ax.set_ylabel(names[c], fontsize=8)
        ax.tick_params(labelsize=7)
        if freq:
            ax.set_xscale("log")
    axes[-1, 0].set_xlabel("frequency (Hz)" if freq else "position", fontsize=8)
    if title:
        axes[0, 0].set_title(title, fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def signal_fills(x, keep, fills, positions=None, channel_names=None, title: str = "") -> np.ndarray:
    """An inpainting example for a signal (C, L): per channel the input (dashed) and each fill, the
    removed positions shaded, as (H, W, 3) uint8.

    Args:
        x: the input (C, L).
        keep: its keep mask (1 or C, L), 1 = kept.
        fills: name -> filled signal (C, L).
        positions, channel_names, title: as in :func:`signal_panel`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    a = _to_numpy(x)
    k = np.broadcast_to(_to_numpy(keep), a.shape)
    xs, freq, names = _signal_axes(a.shape[1], positions, channel_names, a.shape[0])
    fig, axes = plt.subplots(a.shape[0], 1, figsize=(6, 1.6 * a.shape[0] + 0.4), dpi=80, sharex=True, squeeze=False)
    colours = ["tab:green", "tab:orange", "tab:purple", "tab:brown"]
    for c, ax in enumerate(axes[:, 0]):
        lo, hi = float(a[c].min()), float(a[c].max())
        ax.fill_between(xs, lo, hi, where=k[c] < 0.5, color="lightgrey", step="mid", linewidth=0)
        ax.plot(xs, a[c], "--", color="black", linewidth=0.9, label="input")
        for (name, f), colour in zip(fills.items(), colours):
            ax.plot(xs, _to_numpy(f)[c], color=colour, linewidth=0.9, label=name)
        ax.set_ylabel(names[c], fontsize=8)
        ax.tick_params(labelsize=7)
        if freq:
            ax.set_xscale("log")
    axes[0, 0].legend(fontsize=6, loc="upper right")
    axes[-1, 0].set_xlabel("frequency (Hz)" if freq else "position", fontsize=8)
    axes[0, 0].set_title(title or "removed positions shaded", fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def tile_row_signals(examples, positions=None, channel_names=None) -> np.ndarray:
    """SpRAy evidence for signals: ``examples`` (4, C, L) = a member, the member with its region
    removed, an other-class sample, that sample with the region pasted; two plots side by side
    (member vs removed, other vs pasted), as (H, W, 3) uint8."""
    e = _to_numpy(examples)
    if e.ndim != 3 or e.shape[0] != 4:
        raise ValueError(f"tile_row_signals needs (4, C, L) examples, got shape {e.shape}")
    ones = np.ones_like(e[0])
    left = signal_fills(e[0], ones, {"region removed": e[1]}, positions, channel_names, title="member")
    right = signal_fills(e[2], ones, {"region pasted": e[3]}, positions, channel_names, title="other class")
    h = max(left.shape[0], right.shape[0])
    pad = [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in (left, right)]
    return np.concatenate([pad[0], np.full((h, 4, 3), 255, np.uint8), pad[1]], axis=1)
