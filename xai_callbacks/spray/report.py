"""What the SpRAy callback reports about one class's :class:`~xai_callbacks.spray.core.SpRAyResult`:
which samples can be analysed, the scalars, the tables and the captions, as plain numbers and
strings (no Lightning, no wandb; the pictures come from :mod:`xai_callbacks.render`).

Strategies are named by their persistent ids (``ids[j]`` for cluster ``j``, from
:class:`~xai_callbacks.spray.tracking.StrategyTracker`), samples by their dataset indices.

>>> from xai_callbacks.spray import check_heatmaps, spray
>>> rows, problems = usable_rows(labels, check_heatmaps(heatmaps), class_id=0, k=5, name="0")
>>> result = spray(heatmaps[rows], k=5)
>>> sorted(class_scalars(result, ids=list(range(result.n_clusters))))
['max_suspicion', 'n_clusters', 'n_flagged', 'suspicious_strategy']
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .core import SpRAyResult
from .pipeline import neighbours

__all__ = ["usable_rows", "class_scalars", "suspicious_share", "sample_strategies", "embedding_table",
           "clusters_table", "prototype_caption", "evidence_caption", "EVIDENCE_COLUMNS"]

EVIDENCE_COLUMNS = ("component", "region_size", "score_drop", "transfer_rate", "score_rise", "score_excess", "z")


def usable_rows(labels: np.ndarray, usable: np.ndarray, class_id: int, k: int | str, name: str
                ) -> tuple[np.ndarray | None, list[str]]:
    """The rows of class ``class_id`` whose heatmaps can be analysed, and what is wrong with the others.

    Args:
        labels: (N,) class of each row.
        usable: (N,) bool, heatmaps that are finite and not constant (``check_heatmaps``).
        class_id: the class.
        k: SpRAy's number of neighbours (or ``"auto"``); the class needs more than ``k`` usable rows.
        name: the class's name in the messages.

    Returns:
        The rows (None when there are too few to analyse) and the problems found, as messages.
    """
    rows = np.flatnonzero((labels == class_id) & usable)
    k = neighbours(len(rows), k)
    bad = int(((labels == class_id) & ~usable).sum())
    problems = [f"class {name}: {bad} heatmap(s) are NaN / inf or constant and were left out (constant: the "
                "class's score does not depend on these inputs for the method, e.g. a ReLU after the last layer "
                "that is 0 there)"] if bad else []
    if len(rows) <= k:
        fix = "raise max_per_class or lower spray_options['k']" + (
            "; for the NaN / constant ones try another method or check the model's output for the class" if bad else "")
        problems.append(f"class {name}: {len(rows)} usable heatmap(s), SpRAy with k={k} needs more than {k}; "
                        f"skipped ({fix})")
        return None, problems
    return rows, problems


def _top_strategy(result: SpRAyResult) -> int:
    """The cluster the class's scalars speak of: with causal evidence the flagged one, else the one
    with the highest evidence score; without evidence the highest suspicion."""
    ev = result.evidence
    if ev is not None and len(ev.z):
        return int(np.argmax(np.where(ev.flagged, np.inf, ev.z)))
    return int(np.argmax(result.cluster_suspicion))


def class_scalars(result: SpRAyResult, ids: Sequence[int]) -> dict[str, float]:
    """The class's scalars (logged as ``spray/<class>/<name>``): ``n_clusters``, ``max_suspicion``,
    ``n_flagged``, ``suspicious_strategy`` (its id), and with causal evidence that strategy's
    ``transfer_rate``, ``score_drop``, ``region_size``, the check's ``forward_passes`` and the
    class's ``separation_ratio`` (its best-separated group over the threshold: >= 1 flagged, below
    it how close the class came).

    Args:
        result: the class's SpRAy result (at least one cluster).
        ids: persistent strategy id of each cluster.
    """
    top = _top_strategy(result)
    values = {"n_clusters": float(result.n_clusters), "max_suspicion": result.max_suspicion,
              "n_flagged": float(result.flagged.sum())}
    ev = result.evidence
    if ev is not None and len(ev.z):
        values.update(transfer_rate=float(ev.transfer_rate[top]), score_drop=float(ev.score_drop[top]),
                      region_size=float(ev.region_size[top]), forward_passes=float(ev.forward_passes),
                      separation_ratio=ev.separation_ratio)
    values["suspicious_strategy"] = float(ids[top])
    return values


def suspicious_share(results: Sequence[SpRAyResult]) -> float | None:
    """Share of all analysed samples that sit in flagged clusters (None without samples)."""
    n = sum(len(r.labels) for r in results)
    return sum(r.suspicious_share * len(r.labels) for r in results) / n if n else None


def sample_strategies(result: SpRAyResult, ids: Sequence[int]) -> np.ndarray:
    """(N,) strategy id of each sample; -1 for DBSCAN / HDBSCAN noise."""
    return np.array([ids[lab] if lab >= 0 else -1 for lab in result.labels])


def embedding_table(result: SpRAyResult, ids: Sequence[int], sample_ids: Sequence[int]
                    ) -> tuple[list[str], list[list]]:
    """Columns and rows of the 2-D embedding table: sample id, x, y, strategy, suspicion, the
    causal evidence's per-sample suspicion (with evidence) and each mask's share.

    Args:
        result: the class's SpRAy result, with an embedding.
        ids: persistent strategy id of each cluster.
        sample_ids: dataset index of each analysed sample.
    """
    strategy, ev, shares = sample_strategies(result, ids), result.evidence, list(result.mask_shares)
    columns = (["sample_id", "x", "y", "strategy", "suspicion"] + (["evidence"] if ev is not None else [])
               + [f"{m}_share" for m in shares])
    rows = [[sample_ids[i], float(result.embedding[i, 0]), float(result.embedding[i, 1]), int(strategy[i]),
             float(result.suspicion[i])] + ([float(ev.sample_suspicion[i])] if ev is not None else [])
            + [float(result.mask_shares[m][i]) for m in shares] for i in range(len(result.labels))]
    return columns, rows


def clusters_table(result: SpRAyResult, ids: Sequence[int], sample_ids: Sequence[int],
                   pictures: Sequence[np.ndarray], strips: Sequence[np.ndarray]) -> tuple[list[str], list[list]]:
    """Columns and rows of the clusters table, one row per strategy: id, size, share, suspicion,
    flagged, novelty, compactness, the evidence columns (:data:`EVIDENCE_COLUMNS`, with evidence),
    each mask's share, its prototype picture, a strip of its typical members and their ids.

    Args:
        result: the class's SpRAy result.
        ids: persistent strategy id of each cluster.
        sample_ids: dataset index of each analysed sample.
        pictures: each cluster's prototype picture.
        strips: each cluster's typical members, as one picture.
    """
    ev, masks, f = result.evidence, list(result.cluster_mask_shares), result.factors
    evidence = list(EVIDENCE_COLUMNS) if ev is not None else []
    columns = (["strategy", "size", "share", "suspicion", "flagged", "novelty", "compactness"] + evidence
               + [f"{m}_share" for m in masks] + ["prototype", "typical", "typical_ids"])
    rows = [[ids[j], int(result.cluster_sizes[j]), float(f["share"][j]), float(result.cluster_suspicion[j]),
             bool(result.flagged[j]), float(f["novelty"][j]), float(f["compactness"][j])]
            + [getattr(ev, c)[j].item() for c in evidence] + [float(result.cluster_mask_shares[m][j]) for m in masks]
            + [pictures[j], strips[j], " ".join(str(sample_ids[i]) for i in result.typical[j])]
            for j in range(result.n_clusters)]
    return columns, rows


def prototype_caption(result: SpRAyResult, ids: Sequence[int], j: int) -> str:
    """Cluster ``j``'s caption: id, size, share, suspicion, the evidence, FLAGGED."""
    ev = result.evidence
    checked = (f", {ev.component[j]} transfer {ev.transfer_rate[j]:.2f}, drop {ev.score_drop[j]:.2f}"
               if ev is not None else "")
    return (f"strategy {ids[j]}: {result.cluster_sizes[j]} samples ({result.factors['share'][j]:.0%}), suspicion "
            f"{result.cluster_suspicion[j]:.2f}{checked}{' FLAGGED' if result.flagged[j] else ''}")


def region_words(tokens, regions, vocab=None, top: int = 5) -> list[tuple[str, int]]:
    """The ``top`` words the ``regions`` (n, ...) bool of the token rows ``tokens`` (n, ...; ids, as
    floats where the analysis gathered them so) hold most often, with their counts."""
    import collections

    from ..render import token_names

    held = tokens.reshape(len(tokens), -1)[regions.reshape(len(regions), -1).to(tokens.device)].round().long()
    return collections.Counter(token_names(held.tolist(), vocab)).most_common(top)


def evidence_caption(result: SpRAyResult, ids: Sequence[int], j: int) -> str:
    """The caption of cluster ``j``'s evidence picture (member | region removed | other class |
    the member's strongest component transferred into it)."""
    ev = result.evidence
    return (f"strategy {ids[j]}: member | region removed (score drop {ev.score_drop[j]:.2f}) | other class | "
            f"its {ev.component[j]} transferred (transfer {ev.transfer_rate[j]:.2f}, excess over the class "
            f"{ev.score_excess[j]:.2f}){' FLAGGED' if result.flagged[j] else ''}")
