"""``spray(heatmaps, ...) -> SpRAyResult``: the whole SpRAy pipeline for the heatmaps of one class."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import pipeline as _p
from .suspicion import cluster_suspicion, mask_shares, positive_part, relevance_distribution, sample_suspicion

__all__ = ["SpRAyResult", "spray"]


@dataclass
class SpRAyResult:
    """What SpRAy found in the heatmaps of one class (N samples, K clusters).

    Attributes:
        labels: (N,) cluster of each sample, ``0..K-1`` (``-1``: noise of DBSCAN / HDBSCAN).
        n_clusters: K.
        eigenvalues: ascending eigenvalues of the normalised Laplacian (the spectrum).
        embedding: (N, 2) visualisation embedding (t-SNE by default), or None.
        spectral_embedding: (N, m) eigenvectors (rows scaled to unit length when so configured).
        prototypes: (K, ...) mean heatmap of each cluster, shaped like one input heatmap.
        typical: K arrays of the most typical members' indices (closest to the centroid).
        cluster_sizes: (K,) members per cluster.
        suspicion: (N,) per-sample suspicion (see :mod:`xai_callbacks.spray.suspicion`).
        cluster_suspicion: (K,) per-cluster suspicion.
        flagged: (K,) bool, suspected Clever-Hans strategies: ``cluster_suspicion >= threshold``
            from the heatmaps alone; after :meth:`confirm`, decided by the causal evidence alone
            (the one strategy made of the class's confirmed samples).
        factors: the per-cluster factors ``novelty``, ``compactness``, ``share``, ``excess``.
        signatures: (K, D) each cluster's mean relevance distribution (what
            :class:`~xai_callbacks.spray.tracking.StrategyTracker` matches across epochs): over the
            ``grid * grid`` cells of the heatmaps, or over the D dimensions of ``features`` when
            SpRAy clustered those (e.g. concepts).
        mask_shares: name -> (N,) share of positive relevance on that mask (empty without masks).
        cluster_mask_shares: name -> (K,) mean of ``mask_shares`` over each cluster's members.
        params: the parameters of the run (k, n_eigval, clustering, ...).
        evidence: the causal evidence per strategy (:class:`~xai_callbacks.spray.evidence.StrategyEvidence`)
            once :meth:`confirm` ran; None before.
    """

    labels: np.ndarray
    n_clusters: int
    eigenvalues: np.ndarray
    embedding: np.ndarray | None
    spectral_embedding: np.ndarray
    prototypes: np.ndarray
    typical: list[np.ndarray]
    cluster_sizes: np.ndarray
    suspicion: np.ndarray
    cluster_suspicion: np.ndarray
    flagged: np.ndarray
    factors: dict[str, np.ndarray]
    signatures: np.ndarray
    mask_shares: dict[str, np.ndarray] = field(default_factory=dict)
    cluster_mask_shares: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    evidence: Any = None

    def confirm(self, evidence, rows: np.ndarray, heatmaps, masks: dict[str, Any] | None = None,
                features=None) -> "SpRAyResult":
        """The class's samples that the causal evidence confirms become its flagged strategy.

        Confirmed samples (:func:`~xai_callbacks.spray.evidence.sample_evidence`) leave the
        clusters SpRAy put them in and form one flagged strategy of their own; the others keep
        SpRAy's clusters. Prototypes, typical members, factors and signatures are recomputed for
        the new labels, and ``evidence`` holds the per-strategy summary
        (:class:`~xai_callbacks.spray.evidence.StrategyEvidence`).

        Args:
            evidence: a :class:`~xai_callbacks.spray.evidence.SampleEvidence` over the analysed samples.
            rows: (N,) this class's samples among the evidence's samples, in this result's order.
            heatmaps: the heatmaps this result was computed from.
            masks: the masks this result was computed with, if any.
            features: the feature vectors SpRAy clustered instead of the heatmaps, if any.

        Raises:
            ValueError: when ``rows`` does not give one evidence row per sample of the result.

        Example:
            >>> result = spray(heatmaps[rows], k=5).confirm(evidence, rows, heatmaps[rows])
            >>> result.flagged.shape == result.evidence.transfer_rate.shape == (result.n_clusters,)
            True
        """
        from .evidence import StrategyEvidence

        rows = np.asarray(rows)
        if rows.shape != self.labels.shape:
            raise ValueError(f"rows must give one evidence row per sample ({len(self.labels)}), got {rows.shape}")
        confirmed = np.asarray(evidence.confirmed)[rows]
        labels = self.labels.copy()
        if confirmed.any():
            labels[confirmed] = labels.max() + 1
            labels = _relabel_by_size(labels)
        dims = self.params["cluster_dims"]
        summary = _summaries(heatmaps, labels, _p._unit_rows(self.spectral_embedding[:, :dims]), masks,
                             self.params["grid"], self.params["n_typical"], features)
        flagged = np.zeros(len(summary["cluster_sizes"]), bool)
        if confirmed.any():
            flagged[labels[np.flatnonzero(confirmed)[0]]] = True
        summary.update(labels=labels, flagged=flagged,
                       evidence=StrategyEvidence.summarise(evidence, rows, labels, flagged))
        return dataclasses.replace(self, **summary)

    @property
    def max_suspicion(self) -> float:
        """The largest cluster suspicion (0 without clusters)."""
        return float(self.cluster_suspicion.max()) if self.n_clusters else 0.0

    @property
    def suspicious_share(self) -> float:
        """Share of the samples that sit in flagged clusters."""
        return float(np.isin(self.labels, np.flatnonzero(self.flagged)).mean()) if len(self.labels) else 0.0


def spray(heatmaps, *, masks: dict[str, Any] | None = None, features=None,
          channel_reduce: str | None = "sum", absolute: bool = False, size: int | tuple[int, int] | None = None,
          normalize: str | None = "l2", k: int | str = "auto", affinity: str = "knn", laplacian: str = "symmetric",
          n_eigval: int = 32, normalize_rows: bool = True, n_clusters: int | None = None, min_clusters: int = 2,
          max_clusters: int = 10, eigengap_eps: float | None = 0.01, cluster_dims: int | None = None, clustering: str = "kmeans",
          clustering_options: dict[str, Any] | None = None, visualisation: str | None = "tsne",
          n_typical: int = 5, grid: int = 8, threshold: float = 0.25, seed: int = 0,
          device: str | None = None) -> SpRAyResult:
    """Spectral relevance analysis of the heatmaps of one class.

    Steps: :func:`~.pipeline.preprocess` -> :func:`~.pipeline.affinity` ->
    :func:`~.pipeline.laplacian` -> :func:`~.pipeline.spectral_embedding` ->
    :func:`~.pipeline.eigengap` -> :func:`~.pipeline.clustering` ->
    :func:`~.pipeline.visualisation_embedding`, :func:`~.pipeline.prototypes`, suspicion scores.

    Args:
        heatmaps: (N, C, H, W) or (N, H, W) relevance of N samples of one class (tensor or array);
            finite and not constant, N > k.
        masks: optional name -> masks shaped like the heatmaps (without or with channels), e.g.
            ``{"object": ..., "artifact": ...}``; adds relevance shares per mask.
        features: optional (N, D) vectors to cluster instead of the preprocessed heatmaps, e.g.
            each sample's concept relevances (:func:`xai_callbacks.concepts.concept_relevance`:
            one relevance per channel of a layer), which separates strategies that use different
            features at the same place, or one feature at varying places. Only ``normalize``
            applies to them (``channel_reduce``, ``absolute``, ``size`` concern heatmaps); the
            heatmaps still give the prototypes, the suspicion scores and the mask shares, and the
            signatures are the clusters' mean (positive) feature distributions.
        channel_reduce: ``"sum"`` over channels, or None to keep them (preprocessing).
        absolute: use ``|R|`` (preprocessing).
        size: average-pool heatmaps to this side / (height, width) before comparing them.
        normalize: per-heatmap scaling ``"l2"``, ``"l1"``, ``"max"``, ``"sum"`` or None.
        k: neighbours of the kNN affinity graph, or ``"auto"``: 10 (CoRelAy's default) up to 1111
            heatmaps, growing with ``sqrt(N)`` above (see :func:`~.pipeline.neighbours`; a fixed k
            loses the eigengap at tens of thousands of heatmaps).
        affinity: ``"knn"`` (binary, as CoRelAy) or ``"knn_rbf"`` (self-tuning Gaussian weights).
        laplacian: ``"symmetric"`` or ``"random_walk"`` normalisation.
        n_eigval: eigenpairs of the Laplacian to compute (capped at N - 1).
        normalize_rows: scale each sample's eigenvector row to unit length.
        n_clusters: fixed number of clusters; None chooses it by the eigengap.
        min_clusters: smallest number of clusters the eigengap may choose.
        max_clusters: largest number of clusters the eigengap may choose.
        eigengap_eps: the eigengap compares ``log(eigenvalue + eps)``; None: absolute gaps.
        cluster_dims: eigenvectors the clustering sees; None uses the first ``n_clusters``
            (Ng, Jordan & Weiss); CoRelAy uses all (``cluster_dims=n_eigval``).
        clustering: ``"kmeans"``, ``"agglomerative"``, ``"dbscan"`` or ``"hdbscan"``.
        clustering_options: keyword arguments for the scikit-learn estimator (e.g. ``eps``).
        visualisation: 2-D embedding for plots: ``"tsne"``, ``"pca"``, ``"spectral"`` or None.
        n_typical: most typical members kept per cluster.
        grid: side of the pooled relevance maps the suspicion scores compare.
        threshold: cluster suspicion at or above which a cluster is flagged.
        seed: seeds the eigensolver's start vector, k-means and t-SNE.
        device: where the kNN search, the step that grows with N^2, runs (e.g. ``"cuda"``);
            None: on the device of ``features`` (or of ``heatmaps``) when given as a tensor, else the
            CPU (see :func:`~.pipeline.knn`). The rest runs on the CPU.

    Raises:
        ValueError: unusable heatmaps or features (NaN / inf, constant heatmaps, all-zero feature
            rows, or features whose count differs from the heatmaps'), or an option out of range.

    Example::

        result = spray(heatmaps)                                   # cluster the heatmaps
        rel = concept_relevance(model, x, y, layer="features.9").relevance
        result = spray(heatmaps, features=rel)                     # cluster the concept relevances
    """
    given = heatmaps if features is None else features
    device = device or (str(given.device) if isinstance(given, torch.Tensor) else None)
    if features is None:
        points = _p.preprocess(heatmaps, channel_reduce=channel_reduce, absolute=absolute, size=size,
                               normalize=normalize)
    else:
        points = _p.normalize_features(_feature_rows(features, len(_p.as_array(heatmaps))), normalize)
    n = points.shape[0]
    k = _p.neighbours(n, k)
    if n <= k:
        raise ValueError(f"SpRAy with k={k} neighbours needs more than {k} heatmaps, got {n}: "
                         f"collect more samples of this class or lower k")
    if n_clusters is not None and not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be None (eigengap) or in [1, {n}], got {n_clusters}")
    adjacency = _p.affinity(points, k=k, kind=affinity, device=device)
    lap = _p.laplacian(adjacency, kind=laplacian)
    eigenvalues, vectors = _p.spectral_embedding(lap, n_eigval=n_eigval, seed=seed, normalize_rows=False)
    if n_clusters is None:
        n_clusters = _p.eigengap(eigenvalues, min_clusters=min_clusters, max_clusters=max_clusters,
                                 eps=eigengap_eps)
    dims = cluster_dims or n_clusters
    chosen = vectors[:, :dims]
    if normalize_rows:
        chosen, vectors = _p._unit_rows(chosen), _p._unit_rows(vectors)
    labels = _p.clustering(chosen, n_clusters, algorithm=clustering, seed=seed, **(clustering_options or {}))
    labels = _relabel_by_size(labels)
    embedding = _p.visualisation_embedding(vectors, kind=visualisation, seed=seed)
    params = dict(features="heatmaps" if features is None else f"given ({points.shape[1]} dims)",
                  channel_reduce=channel_reduce, absolute=absolute, size=size, normalize=normalize, k=k,
                  affinity=affinity, laplacian=laplacian, n_eigval=n_eigval, normalize_rows=normalize_rows,
                  min_clusters=min_clusters, max_clusters=max_clusters, eigengap_eps=eigengap_eps,
                  cluster_dims=dims, clustering=clustering,
                  clustering_options=dict(clustering_options or {}), visualisation=visualisation, grid=grid,
                  n_typical=n_typical,
                  threshold=threshold, seed=seed)
    summary = _summaries(heatmaps, labels, chosen, masks, grid, n_typical, features)
    return SpRAyResult(labels=labels, eigenvalues=eigenvalues, embedding=embedding,
                       spectral_embedding=vectors.astype(np.float32), flagged=summary["cluster_suspicion"] >= threshold,
                       params=params, **summary)


def _summaries(heatmaps, labels: np.ndarray, chosen: np.ndarray, masks, grid: int, n_typical: int,
               features=None) -> dict[str, Any]:
    """What SpRAyResult derives from the cluster labels: prototypes, typical members, sizes,
    suspicion scores, factors, signatures (of ``features`` when SpRAy clustered those) and mask
    shares."""
    proto, typical = _p.prototypes(heatmaps, labels, chosen, n_typical=n_typical)
    found = len(proto)
    dist = relevance_distribution(heatmaps, grid=grid)
    factors = cluster_suspicion(dist, labels)
    suspicion = factors.pop("suspicion")
    shares = mask_shares(heatmaps, masks) if masks else {}
    clustered = dist if features is None else _distribution(_p.as_array(features).reshape(len(labels), -1))
    return dict(n_clusters=found, prototypes=proto, typical=typical,
                cluster_sizes=np.bincount(labels[labels >= 0], minlength=found), suspicion=sample_suspicion(dist),
                cluster_suspicion=suspicion, factors=factors,
                signatures=np.stack([clustered[labels == c].mean(0) for c in range(found)]) if found else clustered[:0],
                mask_shares=shares,
                cluster_mask_shares={name: np.array([v[labels == c].mean() for c in range(found)])
                                     for name, v in shares.items()})


def _feature_rows(features, n: int) -> np.ndarray:
    """``features`` as (N, D) float32, checked against the N heatmaps: finite, not all zero per row."""
    f = _p.as_array(features)
    if f.ndim < 2 or len(f) != n:
        raise ValueError(f"features must be (N, D) with one row per heatmap (N={n}), got shape {tuple(f.shape)}")
    f = f.reshape(n, -1)
    bad = np.flatnonzero(~np.isfinite(f).all(1) | ~(f != 0).any(1))
    if len(bad):
        raise ValueError(f"{len(bad)} feature row(s) contain NaN / inf or are all zero (indices {bad[:10].tolist()}"
                         f"{' ...' if len(bad) > 10 else ''}); drop them first")
    return f


def _distribution(vectors: np.ndarray) -> np.ndarray:
    """(N, D) float64 rows summing to 1: the positive part of each vector (``|v|`` where it has none)."""
    pos = positive_part(vectors.astype(np.float64))
    return pos / pos.sum(1, keepdims=True)


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters ``0..K-1`` by decreasing size (ties by first appearance); keep -1."""
    valid = labels[labels >= 0]
    if not len(valid):
        return labels
    ids, first, counts = np.unique(valid, return_index=True, return_counts=True)
    order = ids[np.lexsort((first, -counts))]
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping.get(v, -1) for v in labels], dtype=np.int64)
