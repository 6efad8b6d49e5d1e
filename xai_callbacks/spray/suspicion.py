"""Suspicion scores: which prediction strategies of a class look like Clever Hans, without masks.

All scores work on *relevance distributions*: the positive, channel-summed relevance of each
heatmap, average-pooled to a ``grid x grid`` map and scaled to sum 1 (``P_i``). With ``u = 1 /
grid**2`` the share of a uniform map per cell:

* **sample suspicion** ``s_i = max_p w(p) * (P_i(p) - M(p)) / (MAD(p) + u / 10)``: the most
  anomalous relevance the sample puts where the class's majority does not look, as a robust
  z-score. ``M`` and ``MAD`` are the per-cell median and median absolute deviation of ``P`` over
  the class (robust to a minority strategy), ``w(p) = max(0, 1 - M(p) / u)`` is 1 where the
  majority puts no relevance and 0 where it puts at least uniform relevance. Unbounded; a few
  units is ordinary variation, tens mean relevance on a spot the class otherwise ignores.
* **cluster suspicion** ``S_c = novelty_c * compactness_c * (1 - share_c)``, each in [0, 1]:

  - ``D_c = max(0, mean_c P - mean_rest P)``: the relevance the cluster adds over the rest of
    the class;
  - ``novelty_c``: the share of ``D_c`` in cells where the rest puts less than uniform relevance
    (weighted by ``max(0, 1 - rest(p) / u)``): relevance *away* from where the others look;
  - ``compactness_c``: the share of ``D_c`` in its densest ``ceil(grid**2 / 16)`` cells (one
    sixteenth of the image): a compact spot rather than a different stroke style;
  - ``share_c``: the cluster's share of the class (a small cluster is more suspicious).

A cluster is *flagged* when ``S_c >= threshold``. When masks are given, :func:`mask_shares`
reports the share of positive relevance on each mask (e.g. object and artifact; ``|R|`` where a
heatmap has none, as for ``P_i``).
"""
from __future__ import annotations

import math

import numpy as np

from .pipeline import as_array, pool

__all__ = ["positive_part", "relevance_distribution", "sample_suspicion", "cluster_suspicion", "mask_shares"]


def positive_part(values):
    """The positive part of each sample (first axis) of ``values`` (a numpy array or a torch
    tensor); ``|v|`` for a sample with no positive entry (a heatmap of only negative relevance
    still has a distribution)."""
    pos = values.clip(min=0)
    none = pos.reshape(len(pos), -1).sum(1) == 0
    pos[none] = abs(values[none])
    return pos


def relevance_distribution(heatmaps, grid: int = 8) -> np.ndarray:
    """(N, grid * grid) float64: positive channel-summed relevance pooled to a grid, summing to 1.

    A heatmap without positive relevance uses ``|R|`` instead.

    Args:
        heatmaps: (N, C, H, W) or (N, H, W) tensor or array.
        grid: side of the pooled map.
    """
    h = as_array(heatmaps).astype(np.float64)
    if h.ndim == 3:
        h = h[:, None]
    if h.ndim != 4:
        raise ValueError(f"heatmaps must have shape (N, C, H, W) or (N, H, W), got {tuple(h.shape)}")
    pos = positive_part(h.sum(1, keepdims=True))
    p = pool(pos, grid).reshape(len(pos), -1)
    total = p.sum(1, keepdims=True)
    if (total == 0).any():
        raise ValueError(f"heatmap(s) {np.flatnonzero(total.ravel() == 0)[:10].tolist()} are all zero: "
                         "no relevance distribution")
    return p / total


def sample_suspicion(dist: np.ndarray) -> np.ndarray:
    """Per-sample suspicion (N,) (a robust z-score >= 0) from :func:`relevance_distribution` of one class."""
    u = 1.0 / dist.shape[1]
    median = np.median(dist, axis=0)
    mad = np.median(np.abs(dist - median), axis=0)
    weight = np.clip(1.0 - median / u, 0.0, 1.0)
    return np.clip((weight * (dist - median) / (mad + 0.1 * u)).max(1), 0.0, None)


def cluster_suspicion(dist: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-cluster suspicion and its factors, each (K,), for labels ``0..K-1`` (``-1`` = noise).

    Returns:
        dict with ``suspicion``, ``novelty``, ``compactness``, ``share`` (of the class) and
        ``excess`` (the mass of ``D_c``, the total-variation distance to the rest).
    """
    n, cells = dist.shape
    u = 1.0 / cells
    top = max(1, math.ceil(cells / 16))
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    out = {name: np.zeros(k) for name in ("suspicion", "novelty", "compactness", "share", "excess")}
    for c in range(k):
        member = labels == c
        out["share"][c] = member.mean()
        if member.all() or not member.any():
            continue
        rest = dist[~member].mean(0)
        extra = np.clip(dist[member].mean(0) - rest, 0.0, None)
        mass = extra.sum()
        out["excess"][c] = mass
        if mass <= 0:
            continue
        out["novelty"][c] = (extra * np.clip(1.0 - rest / u, 0.0, 1.0)).sum() / mass
        out["compactness"][c] = np.sort(extra)[::-1][:top].sum() / mass
    out["suspicion"] = out["novelty"] * out["compactness"] * (1.0 - out["share"])
    return out


def mask_shares(heatmaps, masks: dict[str, object]) -> dict[str, np.ndarray]:
    """Share of each heatmap's positive relevance on each mask: ``{name: (N,) array}``; ``|R|``
    for a heatmap with no positive relevance (:func:`positive_part`), as the relevance
    distributions do: the explanation of a class the model does not give may be negative
    everywhere and still shows where the model looks.

    Args:
        heatmaps: (N, C, H, W) or (N, H, W) relevance.
        masks: name -> (N, H, W), (N, 1, H, W) or (N, C, H, W) masks in [0, 1] (e.g.
            ``{"object": ..., "artifact": ...}``).
    """
    h = as_array(heatmaps).astype(np.float64)
    if h.ndim == 3:
        h = h[:, None]
    pos = positive_part(h.sum(1))
    total = np.maximum(pos.reshape(len(pos), -1).sum(1), 1e-30)
    shares = {}
    for name, m in masks.items():
        m = as_array(m).astype(np.float64)
        if m.ndim == 4:
            m = m.max(1)
        if m.shape != pos.shape:
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}; expected (N, H, W) = {tuple(pos.shape)} "
                             "(or with a channel axis) to match the heatmaps")
        shares[name] = (pos * m).reshape(len(pos), -1).sum(1) / total
    return shares
