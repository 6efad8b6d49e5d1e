"""Causal evidence for SpRAy strategies: does a cluster's region carry its class, and does it transfer?

SpRAy's clusters are prediction strategies; whether one is a Clever-Hans shortcut is decided
here by intervening on the inputs rather than by the shape of the heatmaps. For each checked
cluster ``c`` of a class:

1. **Region.** Each member's relevance distribution ``P_i`` (positive, channel-summed relevance
   scaled to sum 1) minus the mean distribution of the *rest of the class* ``P_rest``: what the
   member's strategy adds over its class. Subtracting the class's own mean cancels what every
   heatmap of the class shares, such as the LRP bias towards the top-left corner on small
   inputs (strided 1x1 shortcut convolutions of ResNets pass relevance from the top left of each
   2x2 block only). The region is the square window (``area`` of the image) where this
   difference has the most mass, per member, so a tag at one of several positions is found
   wherever it sits.
2. **Removal.** The region is removed from the member through an infiller (blur by default; any
   :mod:`xai_callbacks.infill` infiller, the GAN inpainter when one is trained): ``score_drop``
   is the mean fall of the class probability.
3. **Transfer.** The member's pixels in its region are pasted into ``pastes`` samples of other
   classes: ``transfer_rate`` is the share of pasted samples that the model did not give the
   class (probability < 0.5) and now does (>= 0.5); ``score_rise`` the mean rise of the class
   probability.

A cluster is **flagged** when ``transfer_rate >= min_transfer`` and ``score_drop >=
min_drop``: a small region that carries the decision and moves other classes' samples into
this one. A strategy that looks at the object or the texture of its class does not transfer
through a small window. The thresholds are calibrated on ``benchmarks/shortcuts.py`` (several
shortcut kinds and architectures with clean controls), not on one scenario.

Cost: ``forward_passes`` counts the model evaluations (members and paste targets once, each
checked member once removed and ``pastes`` times pasted), all batched on the model's device
under :func:`xai_callbacks.guard.model_guard`. No Lightning, no W&B here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution import model_device
from ..guard import unwrap_model
from ..infill import Infiller, get_infiller
from ..scoring import score_perturbed

__all__ = ["StrategyEvidence", "strategy_evidence", "relevance_regions", "MIN_TRANSFER", "MIN_DROP"]

MIN_TRANSFER = 0.3
MIN_DROP = 0.0


@dataclass
class StrategyEvidence:
    """Causal evidence for the K clusters of one class (N analysed samples).

    Attributes:
        checked: (K,) bool, which clusters were tested (the candidates: at least ``min_members``
            members, at most ``max_share`` of the class).
        n_checked: (K,) members tested per cluster (at most ``max_members``).
        region_size: (K,) share of the image in each member's region.
        score_drop: (K,) mean fall of the class probability when members lose their region.
        transfer_rate: (K,) share of pasted other-class samples newly given the class.
        score_rise: (K,) mean rise of the class probability of pasted other-class samples.
        flagged: (K,) bool, ``transfer_rate >= min_transfer`` and ``score_drop >= min_drop``.
        sample_suspicion: (N,) per sample: the mean of its own paste success and its cluster's
            transfer rate (its cluster's rate for untested members; 0 for noise, unchecked).
        regions: (N, H, W) bool region of each tested member (all False otherwise).
        examples: K entries, each None or a (4, C, H, W) tensor: a member, the member with its
            region removed, the other-class sample and the same sample with the region pasted.
        forward_passes: model evaluations spent.
        params: the parameters of the check.
    """

    checked: np.ndarray
    n_checked: np.ndarray
    region_size: np.ndarray
    score_drop: np.ndarray
    transfer_rate: np.ndarray
    score_rise: np.ndarray
    flagged: np.ndarray
    sample_suspicion: np.ndarray
    regions: torch.Tensor
    examples: list
    forward_passes: int
    params: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The per-cluster arrays by name (for tables and files)."""
        return {name: getattr(self, name) for name in ("region_size", "score_drop", "transfer_rate", "score_rise",
                                                        "flagged", "checked", "n_checked")}


def _distribution(heatmaps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) positive channel-summed relevance scaled to sum 1 (``|R|`` where none is positive)."""
    r = heatmaps.float().sum(1) if heatmaps.dim() == 4 else heatmaps.float()
    pos = r.clamp_min(0)
    none = pos.flatten(1).sum(1) == 0
    pos[none] = r[none].abs()
    total = pos.flatten(1).sum(1).clamp_min(1e-30)
    return pos / total[:, None, None]


def relevance_regions(heatmaps: torch.Tensor, reference: torch.Tensor, area: float = 1 / 16) -> torch.Tensor:
    """(N, H, W) bool: per heatmap, the square window of ``area`` of the image where its relevance
    distribution most exceeds ``reference``.

    Args:
        heatmaps: (N, C, H, W) or (N, H, W) relevance.
        reference: (H, W) the distribution to compare with (e.g. the rest of the class's mean).
        area: the window's share of the image, in (0, 1].

    Raises:
        ValueError: for an area outside (0, 1] or a reference of another shape.
    """
    if not 0 < area <= 1:
        raise ValueError(f"area must be in (0, 1], got {area}")
    p = _distribution(heatmaps)
    n, h, w = p.shape
    if tuple(reference.shape) != (h, w):
        raise ValueError(f"reference must have shape {(h, w)} like the heatmaps, got {tuple(reference.shape)}")
    sh, sw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
    mass = F.avg_pool2d((p - reference.to(p))[:, None], (sh, sw), stride=1)[:, 0]
    best = mass.flatten(1).argmax(1)
    top, left = best // mass.shape[-1], best % mass.shape[-1]
    rows, cols = torch.arange(h, device=p.device), torch.arange(w, device=p.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + sh)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + sw)
    return in_rows[:, :, None] & in_cols[:, None, :]


def strategy_evidence(model: torch.nn.Module, x: torch.Tensor, heatmaps: torch.Tensor, labels, target: int,
                      others: torch.Tensor, *, infiller: str | Infiller = "blur", area: float = 1 / 16,
                      pastes: int = 2, max_members: int = 16, min_members: int = 3, max_share: float = 0.5,
                      min_transfer: float = MIN_TRANSFER, min_drop: float = MIN_DROP, batch_size: int = 256,
                      seed: int = 0) -> StrategyEvidence:
    """Remove-and-paste evidence for each cluster of one class (see the module docstring).

    Args:
        model: the classifier (logits out); evaluated under the model guard, on its device.
        x: (N, C, H, W) the analysed inputs of the class.
        heatmaps: (N, C, H, W) or (N, H, W) their relevance for the class.
        labels: (N,) SpRAy cluster of each sample (``0..K-1``; ``-1`` noise, never checked).
        target: the class (output index) whose score is measured.
        others: (M, C, H, W) samples of other classes to paste regions into (M >= 1).
        infiller: how a region is removed: a name (``blur``, ``constant``, ``noise``, ``gan``)
            or an :class:`~xai_callbacks.infill.Infiller` instance (e.g. a trained GAN).
        area: each region's share of the image.
        pastes: other-class samples each tested member is pasted into.
        max_members: members tested per cluster at most (a seeded draw).
        min_members: clusters with fewer members are not checked.
        max_share: clusters holding more than this share of the class are not checked: a
            class's majority strategy is what the class is (and what the others are compared
            with), a shortcut is a minority strategy.
        min_transfer: transfer rate at or above which a cluster may be flagged.
        min_drop: score drop at or above which a cluster may be flagged.
        batch_size: inputs per forward pass.
        seed: seeds the draw of members and paste targets.

    Raises:
        ValueError: for mismatched shapes, no other-class samples, or bad counts.
    """
    labels = np.asarray(labels).reshape(-1)
    if x.dim() != 4 or len(x) != len(labels) or len(heatmaps) != len(x):
        raise ValueError(f"x must be (N, C, H, W) with one heatmap and one label per sample; got x {tuple(x.shape)}, "
                         f"heatmaps {tuple(heatmaps.shape)}, labels {labels.shape}")
    if others.dim() != 4 or others.shape[1:] != x.shape[1:] or len(others) < 1:
        raise ValueError(f"others must be (M >= 1, {', '.join(map(str, x.shape[1:]))}) samples of other classes, "
                         f"got {tuple(others.shape)}")
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share must be in (0, 1], got {max_share}")
    if pastes < 1 or max_members < 1 or min_members < 1:
        raise ValueError(f"pastes, max_members and min_members must be >= 1, got {pastes}, {max_members}, "
                         f"{min_members}")
    with torch.inference_mode(False), torch.no_grad():  # inputs may be inference tensors (Trainer.validate)
        return _evidence(model, x.clone(), heatmaps.clone(), labels, target, others.clone(), get_infiller(infiller),
                         area, pastes, max_members, min_members, max_share, min_transfer, min_drop, batch_size, seed)


def _evidence(model, x, heatmaps, labels, target, others, fill, area, pastes, max_members, min_members, max_share,
              min_transfer, min_drop, batch_size, seed) -> StrategyEvidence:
    device = model_device(unwrap_model(model))
    x, others = x.detach().to(device, torch.float32), others.detach().to(device, torch.float32)
    heatmaps = heatmaps.detach().to(device, torch.float32)
    p = _distribution(heatmaps)
    n, (h, w) = len(x), x.shape[-2:]
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    rng = np.random.default_rng(seed)
    zeros = np.zeros(k)
    out = dict(checked=np.zeros(k, bool), n_checked=np.zeros(k, int), region_size=zeros.copy(),
               score_drop=zeros.copy(), transfer_rate=zeros.copy(), score_rise=zeros.copy())
    regions = torch.zeros(n, h, w, dtype=torch.bool, device=device)
    tested, partner = [], []          # (member row, cluster) and its paste targets
    for c in range(k):
        member = np.flatnonzero(labels == c)
        if len(member) < min_members or len(member) > max_share * n:
            continue
        rest = p[torch.from_numpy(np.flatnonzero(labels != c)).to(device)].mean(0)
        chosen = np.sort(rng.choice(member, min(max_members, len(member)), replace=False))
        regions[chosen] = relevance_regions(heatmaps[chosen], rest, area)
        out["checked"][c], out["n_checked"][c] = True, len(chosen)
        for i in chosen:
            tested.append((int(i), c))
            partner.append(rng.choice(len(others), min(pastes, len(others)), replace=False))
    sample = np.zeros(n)
    examples: list = [None] * k
    forward_passes = 0
    if tested:
        rows = torch.tensor([i for i, _ in tested], device=device)
        keep = (~regions[rows]).float()[:, None]
        pairs = [(t, j) for t, js in enumerate(partner) for j in js]
        src = torch.tensor([t for t, _ in pairs], device=device)
        dst = torch.tensor([int(j) for _, j in pairs], device=device)

        def score(make, count):
            return score_perturbed(model, make, torch.arange(count, device=device),
                                   torch.full((count,), target, device=device), output="probability",
                                   batch_size=batch_size)

        base_x = score(lambda idx: x[rows[idx]], len(rows))
        base_o = score(lambda idx: others[idx], len(others))
        removed = score(lambda idx: fill(x[rows[idx]], keep[idx]), len(rows))
        pasted = score(lambda idx: others[dst[idx]] * keep[src[idx]] + x[rows[src[idx]]] * (1 - keep[src[idx]]),
                       len(pairs))
        forward_passes = 2 * len(rows) + len(others) + len(pairs)
        drop = (base_x - removed).cpu().numpy()
        rise = (pasted - base_o[dst]).cpu().numpy()
        moved = ((base_o[dst] < 0.5) & (pasted >= 0.5)).float().cpu().numpy()
        eligible = (base_o[dst] < 0.5).float().cpu().numpy()
        tested_c = np.array([c for _, c in tested])
        pair_t = src.cpu().numpy()
        own = np.zeros(len(tested))
        for t in range(len(tested)):
            e = eligible[pair_t == t].sum()
            own[t] = moved[pair_t == t].sum() / e if e else 0.0
        for c in np.flatnonzero(out["checked"]):
            ts = np.flatnonzero(tested_c == c)
            ps = np.isin(pair_t, ts)
            out["region_size"][c] = float(regions[rows[ts]].float().mean())
            out["score_drop"][c] = float(drop[ts].mean())
            out["score_rise"][c] = float(rise[ps].mean())
            out["transfer_rate"][c] = float(moved[ps].sum() / max(eligible[ps].sum(), 1.0))
            first, j = ts[0], int(np.flatnonzero(ps)[0])
            i = rows[first]
            examples[c] = torch.stack([x[i], fill(x[i:i + 1], keep[first:first + 1])[0], others[dst[j]],
                                       others[dst[j]] * keep[first] + x[i] * (1 - keep[first])]).cpu()
        for c in range(k):
            sample[labels == c] = out["transfer_rate"][c]
        for t, (i, c) in enumerate(tested):
            sample[i] = 0.5 * (own[t] + out["transfer_rate"][c])
    flagged = out["checked"] & (out["transfer_rate"] >= min_transfer) & (out["score_drop"] >= min_drop)
    params = dict(infiller=getattr(fill, "name", type(fill).__name__), area=area, pastes=pastes,
                  max_members=max_members, min_members=min_members, max_share=max_share, min_transfer=min_transfer, min_drop=min_drop,
                  target=int(target), n_others=len(others), seed=seed)
    return StrategyEvidence(flagged=flagged, sample_suspicion=sample, regions=regions.cpu(), examples=examples,
                            forward_passes=forward_passes, params=params, **out)
