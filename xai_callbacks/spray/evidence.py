"""Causal evidence for SpRAy strategies: which samples rely on a region that carries their class?

SpRAy's clusters show how a class is recognised; whether a strategy is a Clever-Hans shortcut
is decided here by intervening on the inputs rather than by the shape of the heatmaps. For each
analysed sample ``i`` of class ``c`` (:func:`sample_evidence`):

1. **Region.** The sample's relevance distribution ``P_i`` (positive, channel-summed relevance
   scaled to sum 1) minus the per-position median ``P_c`` of its class, smoothed over 3
   positions: what its strategy adds over the typical sample of its class. The median is the
   typical sample even when up to half of the class carries a shortcut, and subtracting it
   cancels what every heatmap of the class shares, such as the LRP bias towards the top-left
   corner on small inputs (strided 1x1 shortcut convolutions of ResNets pass relevance from the
   top left of each 2x2 block only). The region is the ``area`` share of positions where this
   difference is largest: a stamp, a tag wherever it sits, a frame, a patch.
2. **Transfer.** The sample's values in its region are pasted into ``pastes`` samples of other
   classes: ``rise`` is the mean rise of the class probability, ``flip_rate`` the share of those
   the model did not give the class (probability < 0.5) and now does.
3. **Removal.** The region is removed from the sample through an infiller (blur by default;
   the GAN inpainter when one is trained keeps the removal in-distribution): ``drop`` is the fall
   of the class probability (reported, not part of the decision: a texture or object that fills
   the rest of the image keeps carrying the class).
4. **Decision.** A shortcut is a *minority* of a class whose region carries the class into other
   classes' samples far better than the class's typical region does. A sample's excess is its
   rise over the ``baseline`` quantile (the lower quartile) of its class's rises; ``z`` is the
   excess in units of a spread: that of all analysed samples' excesses (1.4826 x their median
   absolute deviation) or, if larger, the class's own (median minus 10th percentile of its rises,
   the half a minority shortcut does not reach), plus ``floor``. So one threshold holds for
   models whose pastes move little and for classes whose own evidence transfers well. A sample is **confirmed** when ``z >= min_z`` and ``rise >=
   min_rise``, and its class has at least ``min_members`` such samples (a strategy, not a single
   odd sample). :meth:`~xai_callbacks.spray.core.SpRAyResult.confirm` makes a class's confirmed
   samples its flagged strategy, and also flags a SpRAy cluster of the rest (at least
   ``min_members``, at most ``max_share`` of the class) whose members' median ``z`` is at least
   ``min_strategy_z``: a group the heatmaps already isolate needs less evidence per sample.

A class's majority strategy (its object, its texture) does not stand out of its own class, so it
is never confirmed, however well it transfers. The thresholds are calibrated on the scenarios of
``benchmarks/shortcuts.py`` (seven kinds of shortcut and four clean controls, the small CNN over
three seeds, four ResNet-18 scenarios), not on one scenario. Global shortcuts (a colour shift over the
whole image, a faint high-frequency watermark) have no region: see the README for which are
caught.

Cost: ``forward_passes`` counts the model evaluations: each sample once as it is, once removed
and ``pastes`` times pasted, plus each class's pool of other-class samples once, all batched on
the model's device under :func:`xai_callbacks.guard.model_guard`. No Lightning, no W&B here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution import model_device
from ..guard import unwrap_model
from ..infill import Infiller, get_infiller
from ..scoring import score_perturbed

__all__ = ["SampleEvidence", "StrategyEvidence", "sample_evidence", "relevance_regions", "MIN_Z", "MIN_RISE",
           "MIN_STRATEGY_Z"]

MIN_Z = 6.0
MIN_RISE = 0.1
MIN_STRATEGY_Z = 2.0


def _distribution(heatmaps: torch.Tensor, spatial: int) -> torch.Tensor:
    """(N, *S) positive channel-summed relevance scaled to sum 1 (``|R|`` where none is positive)."""
    r = heatmaps.float()
    r = r.sum(1) if r.dim() == spatial + 2 else r
    pos = r.clamp_min(0)
    none = pos.flatten(1).sum(1) == 0
    pos[none] = r[none].abs()
    total = pos.flatten(1).sum(1).clamp_min(1e-30)
    return pos / total.view(-1, *[1] * spatial)


def relevance_regions(heatmaps: torch.Tensor, reference: torch.Tensor, area: float = 1 / 8) -> torch.Tensor:
    """(N, *S) bool: per heatmap, the ``area`` share of positions where its relevance distribution,
    smoothed over 3 positions, most exceeds ``reference``.

    Args:
        heatmaps: (N, C, *S) or (N, *S) relevance; ``S`` is (H, W) for images, (L,) for signals.
        reference: (*S) the distribution to compare with (e.g. the median of the class).
        area: the region's share of the positions, in (0, 1].

    Raises:
        ValueError: for an area outside (0, 1] or a reference of another shape.

    Example:
        >>> regions = relevance_regions(heatmaps, reference=torch.zeros(32, 32), area=1 / 8)
    """
    if not 0 < area <= 1:
        raise ValueError(f"area must be in (0, 1], got {area}")
    spatial = reference.dim()
    if spatial not in (1, 2) or heatmaps.dim() not in (spatial + 1, spatial + 2):
        raise ValueError(f"reference must be (L,) or (H, W) and heatmaps (N, [C,] *reference.shape); got reference "
                         f"{tuple(reference.shape)}, heatmaps {tuple(heatmaps.shape)}")
    p = _distribution(heatmaps, spatial)
    if tuple(p.shape[1:]) != tuple(reference.shape):
        raise ValueError(f"reference must have shape {tuple(p.shape[1:])} like the heatmaps, "
                         f"got {tuple(reference.shape)}")
    pool = F.avg_pool2d if spatial == 2 else F.avg_pool1d
    diff = pool((p - reference.to(p))[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    flat = diff.flatten(1)
    k = max(1, round(area * flat.shape[1]))
    region = torch.zeros_like(flat, dtype=torch.bool)
    region.scatter_(1, flat.topk(k, dim=1).indices, True)
    return region.view(p.shape)


@dataclass
class SampleEvidence:
    """Per-sample causal evidence of N analysed samples (all classes together).

    Attributes:
        classes: (N,) the class each sample is analysed for.
        rise: (N,) mean rise of the class probability of ``pastes`` other-class samples when the
            sample's region is pasted into them.
        flip_rate: (N,) share of those pasted samples newly given the class.
        drop: (N,) fall of the sample's class probability when its region is removed.
        z: (N,) the rise over the class's lower quartile, in units of the spread of all samples.
        confirmed: (N,) bool, ``z >= min_z``, ``rise >= min_rise``, in a class with at least
            ``min_members`` such samples.
        regions: (N, *S) bool region of each sample.
        partners: (N, pastes) the other-class samples (indices into the N) each was pasted into.
        forward_passes: model evaluations spent.
        infiller: the infiller that removed the regions.
        params: the parameters of the check.
    """

    classes: np.ndarray
    rise: np.ndarray
    flip_rate: np.ndarray
    drop: np.ndarray
    z: np.ndarray
    confirmed: np.ndarray
    regions: torch.Tensor
    partners: np.ndarray
    forward_passes: int
    infiller: Infiller
    params: dict = field(default_factory=dict)

    def example(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """(4, C, *S): sample ``i``, it with its region removed, its first paste partner, and the
        partner with the region pasted (``x`` the N analysed inputs)."""
        keep = (~self.regions[i]).to(x.dtype)[None].cpu()
        j = int(self.partners[i, 0])
        xi, xj = x[i:i + 1].detach().float().cpu(), x[j:j + 1].detach().float().cpu()
        with torch.inference_mode(False), torch.no_grad():
            removed = self.infiller(xi.clone(), keep[None])
        return torch.cat([xi, removed, xj, xj * keep + xi * (1 - keep)])


@dataclass
class StrategyEvidence:
    """The evidence of one class's SpRAy strategies (K clusters, n samples), summarised per strategy.

    Attributes:
        region_size: (K,) mean share of the input in the members' regions.
        score_drop: (K,) mean fall of the class probability when members lose their region.
        transfer_rate: (K,) mean share of pasted other-class samples newly given the class.
        score_rise: (K,) mean rise of the class probability of pasted other-class samples.
        z: (K,) mean evidence score of the members.
        flagged: (K,) bool, the strategy made of the class's confirmed samples.
        top: (K,) the member (row of the class) with the highest evidence score.
        sample_suspicion: (n,) each sample's evidence score ``z``.
        regions: (n, *S) bool region of each sample.
        forward_passes: model evaluations spent on the class's samples.
        params: the parameters of the check.
    """

    region_size: np.ndarray
    score_drop: np.ndarray
    transfer_rate: np.ndarray
    score_rise: np.ndarray
    z: np.ndarray
    flagged: np.ndarray
    top: np.ndarray
    sample_suspicion: np.ndarray
    regions: torch.Tensor
    forward_passes: int
    params: dict = field(default_factory=dict)

    @classmethod
    def summarise(cls, evidence: SampleEvidence, rows: np.ndarray, labels: np.ndarray, flagged: np.ndarray
                  ) -> "StrategyEvidence":
        """Per-strategy means of ``evidence`` over the class's ``rows`` clustered by ``labels``."""
        k = len(flagged)
        size = evidence.regions[rows].flatten(1).float().mean(1).numpy()
        per = {name: getattr(evidence, name)[rows] for name in ("drop", "flip_rate", "rise", "z")}

        def mean(values):
            return np.array([values[labels == j].mean() if (labels == j).any() else 0.0 for j in range(k)])

        top = np.array([np.flatnonzero(labels == j)[np.argmax(per["z"][labels == j])] if (labels == j).any() else -1
                        for j in range(k)])
        passes = evidence.forward_passes * len(rows) // max(len(evidence.classes), 1)
        return cls(region_size=mean(size), score_drop=mean(per["drop"]), transfer_rate=mean(per["flip_rate"]),
                   score_rise=mean(per["rise"]), z=mean(per["z"]), flagged=np.asarray(flagged, bool), top=top,
                   sample_suspicion=per["z"], regions=evidence.regions[rows], forward_passes=passes,
                   params=evidence.params)

    def as_dict(self) -> dict[str, np.ndarray]:
        """The per-strategy arrays by name (for tables and files)."""
        return {name: getattr(self, name) for name in ("region_size", "score_drop", "transfer_rate", "score_rise",
                                                        "z", "flagged", "top")}


def sample_evidence(model: torch.nn.Module, x: torch.Tensor, heatmaps: torch.Tensor, classes, *,
                    infiller: str | Infiller = "blur", area: float = 1 / 8, pastes: int = 8, min_z: float = MIN_Z,
                    min_rise: float = MIN_RISE, baseline: float = 0.25, floor: float = 0.01, min_members: int = 3,
                    min_strategy_z: float = MIN_STRATEGY_Z, max_share: float = 0.5, max_others: int = 64,
                    batch_size: int = 256, seed: int = 0) -> SampleEvidence:
    """Remove-and-paste evidence for every analysed sample (see the module docstring).

    Args:
        model: the classifier (logits out); evaluated under the model guard, on its device.
        x: (N, C, *S) the analysed inputs (images (N, C, H, W) or signals (N, C, L)), at least
            two classes.
        heatmaps: (N, C, *S) or (N, *S) their relevance for their class.
        classes: (N,) the class (output index) each sample is analysed for.
        infiller: how a region is removed: a name (``blur``, ``constant``, ``noise``, ``gan``)
            or an :class:`~xai_callbacks.infill.Infiller` instance (e.g. a trained GAN).
        area: each region's share of the input, in (0, 1].
        pastes: other-class samples each sample's region is pasted into (drawn from its class's pool).
        max_others: per class, the pool of other-class samples (a seeded draw) pasted into.
        min_z: evidence score at or above which a sample may be confirmed.
        min_rise: mean probability rise at or above which a sample may be confirmed.
        baseline: the quantile of its class's rises a sample's rise is compared with, in [0, 0.5].
        floor: added to the spread of the excesses (probability units), so that a model whose
            pastes move nothing does not turn tiny rises into large scores.
        min_members: confirmed samples a class needs for any of them to count; also the smallest
            SpRAy cluster flagged by its median score.
        min_strategy_z: median score at or above which a SpRAy cluster is flagged as a whole.
        max_share: SpRAy clusters holding more than this share of their class are never flagged
            by their median (a class's majority strategy is what the class is).
        batch_size: inputs per forward pass.
        seed: seeds the draw of paste partners.

    Raises:
        ValueError: for mismatched shapes, fewer than two classes, or bad parameters.

    Example:
        >>> ev = sample_evidence(model, x, heatmaps, y)
        >>> ev.confirmed.sum(), ev.z.max()
    """
    classes = np.asarray(classes).reshape(-1)
    if x.dim() not in (3, 4) or len(x) != len(classes) or len(heatmaps) != len(x):
        raise ValueError(f"x must be (N, C, H, W) or (N, C, L) with one heatmap and one class per sample; got x "
                         f"{tuple(x.shape)}, heatmaps {tuple(heatmaps.shape)}, classes {classes.shape}")
    if len(np.unique(classes)) < 2:
        raise ValueError("sample_evidence needs samples of at least two classes (regions are pasted into the "
                         f"other classes' samples), got classes {np.unique(classes).tolist()}")
    if not 0 < area <= 1 or not 0 <= baseline <= 0.5 or floor <= 0:
        raise ValueError(f"need 0 < area <= 1, 0 <= baseline <= 0.5 and floor > 0; got area={area}, "
                         f"baseline={baseline}, floor={floor}")
    if pastes < 1 or min_members < 1 or max_others < 1:
        raise ValueError(f"pastes, min_members and max_others must be >= 1, got {pastes}, {min_members}, {max_others}")
    fill = get_infiller(infiller)
    params = dict(infiller=getattr(fill, "name", type(fill).__name__), area=area, pastes=pastes, min_z=min_z,
                  min_rise=min_rise, baseline=baseline, floor=floor, min_members=min_members,
                  min_strategy_z=min_strategy_z, max_share=max_share, max_others=max_others, seed=seed)
    with torch.inference_mode(False), torch.no_grad():  # inputs may be inference tensors (Trainer.validate)
        rise, flip, drop, regions, partners, passes = _measure(model, x.clone(), heatmaps.clone(), classes, fill,
                                                               area, pastes, max_others, batch_size, seed)
    excess = np.zeros(len(classes))
    for c in np.unique(classes):
        excess[classes == c] = rise[classes == c] - np.quantile(rise[classes == c], baseline)
    spread = 1.4826 * np.median(np.abs(excess - np.median(excess))) + floor
    z = np.zeros(len(classes))
    for c in np.unique(classes):
        r = rise[classes == c]
        lower = np.quantile(r, 0.5) - np.quantile(r, 0.1)   # the class's own spread, from its lower half
        z[classes == c] = excess[classes == c] / max(spread, lower + floor)
    confirmed = (z >= min_z) & (rise >= min_rise)
    for c in np.unique(classes):
        if confirmed[classes == c].sum() < min_members:
            confirmed[classes == c] = False
    return SampleEvidence(classes=classes, rise=rise, flip_rate=flip, drop=drop, z=z, confirmed=confirmed,
                          regions=regions, partners=partners, forward_passes=passes, infiller=fill,
                          params=params)


def _measure(model, x, heatmaps, classes, fill, area, pastes, max_others, batch_size, seed):
    device = model_device(unwrap_model(model))
    x = x.detach().to(device, torch.float32)
    heatmaps = heatmaps.detach().to(device, torch.float32)
    spatial = x.dim() - 2
    n = len(x)
    regions = torch.zeros(n, *x.shape[2:], dtype=torch.bool, device=device)
    partners = np.zeros((n, pastes), dtype=np.int64)
    pool_rows, pool_class = [], []   # per class, the other-class samples its regions are pasted into
    rng = np.random.default_rng(seed)
    for c in np.unique(classes):
        rows = np.flatnonzero(classes == c)
        pool = np.sort(rng.choice(np.flatnonzero(classes != c), min(max_others, int((classes != c).sum())),
                                  replace=False))
        idx = torch.from_numpy(rows).to(device)
        reference = _distribution(heatmaps[idx], spatial).median(0).values
        regions[idx] = relevance_regions(heatmaps[idx], reference, area)
        draw = (np.argsort(rng.random((len(rows), len(pool))), axis=1)[:, :pastes] if len(pool) >= pastes
                else rng.integers(0, len(pool), (len(rows), pastes)))   # distinct partners per sample
        partners[rows] = len(pool_rows) + draw
        pool_rows += pool.tolist()
        pool_class += [int(c)] * len(pool)
    pool_rows_t = torch.tensor(pool_rows, device=device)
    target = torch.from_numpy(classes).to(device)
    keep = (~regions).float()[:, None]
    src = torch.arange(n, device=device).repeat_interleave(pastes)
    dst = pool_rows_t[torch.from_numpy(partners.reshape(-1)).to(device)]

    def score(make, count, cls):
        return score_perturbed(model, make, torch.arange(count, device=device), cls, output="probability",
                               batch_size=batch_size)

    own = score(lambda i: x[i], n, target)
    removed = score(lambda i: fill(x[i], keep[i]), n, target)
    pool_scores = score(lambda i: x[pool_rows_t[i]], len(pool_rows), torch.tensor(pool_class, device=device))
    before = pool_scores[torch.from_numpy(partners.reshape(-1)).to(device)]
    pasted = score(lambda i: x[dst[i]] * keep[src[i]] + x[src[i]] * (1 - keep[src[i]]), len(src), target[src])
    rise = (pasted - before).view(n, pastes).mean(1)
    eligible = (before < 0.5).view(n, pastes).float()
    flip = ((before < 0.5) & (pasted >= 0.5)).view(n, pastes).float().sum(1) / eligible.sum(1).clamp_min(1)
    partners = pool_rows_t.cpu().numpy()[partners]   # as indices into the N samples
    passes = 2 * n + len(pool_rows) + len(src)
    return rise.cpu().numpy(), flip.cpu().numpy(), (own - removed).cpu().numpy(), regions.cpu(), partners, passes
