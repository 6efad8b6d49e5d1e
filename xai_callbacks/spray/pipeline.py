"""The SpRAy pipeline, one function per step, named as in the paper and CoRelAy.

``preprocess -> affinity -> laplacian -> spectral_embedding -> eigengap -> clustering``, then
``visualisation_embedding`` (2-D, for plots), ``prototypes`` and the suspicion scores
(:mod:`.suspicion`). Memory grows with ``N * k`` (the sparse kNN graph) and ``N * n_eigval``:
no step builds a dense ``N x N`` matrix (except ``agglomerative`` clustering with a linkage
other than ``ward``, see :func:`clustering`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph  # noqa: F401  (sp.csgraph)
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import ArpackNoConvergence, eigsh

__all__ = ["as_array", "pool", "NORMALIZE", "AFFINITIES", "LAPLACIANS", "CLUSTERINGS", "VISUALISATIONS", "Laplacian",
           "check_heatmaps", "preprocess", "normalize_features", "neighbours", "knn", "affinity", "laplacian", "spectral_embedding", "eigengap",
           "clustering", "visualisation_embedding", "prototypes"]

NORMALIZE = ("l1", "l2", "max", "sum", None)
AFFINITIES = ("knn", "knn_rbf")
LAPLACIANS = ("symmetric", "random_walk")
CLUSTERINGS = ("kmeans", "agglomerative", "dbscan", "hdbscan")
VISUALISATIONS = ("tsne", "pca", "spectral", None)


def as_array(heatmaps) -> np.ndarray:
    """Heatmaps as a float32 numpy array (tensors are detached and moved to the CPU)."""
    if isinstance(heatmaps, torch.Tensor):
        heatmaps = heatmaps.detach().cpu().float().numpy()
    if not isinstance(heatmaps, np.ndarray):
        raise TypeError(f"heatmaps must be a torch.Tensor or numpy array, got {type(heatmaps).__name__}")
    return heatmaps.astype(np.float32, copy=False)


def pool(maps: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Average-pool (N, C, H, W) maps to (N, C, *size) (block means; adaptive pooling otherwise)."""
    th, tw = (size, size) if isinstance(size, int) else size
    n, c, h, w = maps.shape
    if h % th == 0 and w % tw == 0:
        return maps.reshape(n, c, th, h // th, tw, w // tw).mean((3, 5))
    return F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(maps)), (th, tw)).numpy()


def check_heatmaps(heatmaps) -> np.ndarray:
    """Boolean (N,) array: which heatmaps are usable (finite and not constant).

    Args:
        heatmaps: (N, ...) tensor or array of heatmaps.
    """
    h = as_array(heatmaps)
    if len(h) == 0:
        return np.zeros(0, dtype=bool)
    h = h.reshape(len(h), -1)
    finite = np.isfinite(h).all(1)
    h = np.where(np.isfinite(h), h, 0.0)
    return finite & (h.max(1) - h.min(1) > 0)


def preprocess(heatmaps, *, channel_reduce: str | None = "sum", absolute: bool = False,
               size: int | tuple[int, int] | None = None, normalize: str | None = "l2") -> np.ndarray:
    """Heatmaps (N, C, H, W) or (N, H, W) -> float32 features (N, H' * W') (or (N, C * H' * W')).

    Args:
        heatmaps: relevance maps of one class; must be finite and not constant.
        channel_reduce: ``"sum"`` (CoRelAy's ``SumChannel``) or ``None`` (keep channels).
        absolute: take ``|R|`` first (CoRelAy's ``absspectral`` variant).
        size: average-pool each map to this (side or (height, width)) before flattening;
            None keeps the resolution.
        normalize: per heatmap: ``"l1"`` (divide by sum |R|), ``"l2"`` (unit Euclidean norm, so
            distances compare shapes like a cosine), ``"max"`` (divide by max |R|), ``"sum"``
            (divide by the signed sum, CoRelAy's ``Normalize``), or None.

    Raises:
        ValueError: naming the heatmaps that contain NaN / inf or are constant.
    """
    h = as_array(heatmaps)
    if h.ndim not in (3, 4) or h.shape[0] == 0:
        raise ValueError(f"heatmaps must have shape (N, C, H, W) or (N, H, W) with N >= 1, got {tuple(h.shape)}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if channel_reduce not in ("sum", None):
        raise ValueError(f"channel_reduce must be 'sum' or None, got {channel_reduce!r}")
    ok = check_heatmaps(h)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(f"{len(bad)} heatmap(s) contain NaN / inf or are constant (indices {bad[:10].tolist()}"
                         f"{' ...' if len(bad) > 10 else ''}); drop them first (see check_heatmaps)")
    if h.ndim == 3:
        h = h[:, None]
    if absolute:
        h = np.abs(h)
    if channel_reduce == "sum":
        h = h.sum(1, keepdims=True)
    if size is not None:
        h = pool(h, size)
    return normalize_features(h.reshape(len(h), -1), normalize)


def normalize_features(x: np.ndarray, normalize: str | None = "l2") -> np.ndarray:
    """Scale each row of (N, D) features (flattened heatmaps, or vectors SpRAy clusters instead).

    Args:
        x: (N, D) float array.
        normalize: ``"l1"`` (divide by sum |x|), ``"l2"`` (unit Euclidean norm), ``"max"`` (divide
            by max |x|), ``"sum"`` (divide by the signed sum) or None (unchanged).

    Raises:
        ValueError: an unknown ``normalize``, or rows it would divide by zero (naming them).

    Example::

        normalize_features(np.array([[3.0, 4.0]]), "l2")    # [[0.6, 0.8]]
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if normalize == "l1":
        scale = np.abs(x).sum(1, keepdims=True)
    elif normalize == "l2":
        scale = np.linalg.norm(x, axis=1, keepdims=True)
    elif normalize == "max":
        scale = np.abs(x).max(1, keepdims=True)
    elif normalize == "sum":
        scale = x.sum(1, keepdims=True)
    else:
        scale = np.ones((len(x), 1), np.float32)
    zero = np.flatnonzero(scale.ravel() == 0)
    if len(zero):
        raise ValueError(f"normalize={normalize!r} divides by zero for row(s) {zero[:10].tolist()} (their "
                         f"{normalize} is 0 after preprocessing); use another normalize or drop them")
    return (x / scale).astype(np.float32, copy=False)


def neighbours(n: int, k: int | str = "auto") -> int:
    """The ``k`` of the kNN graph for ``n`` samples: ``k`` itself, or for ``"auto"``
    ``max(10, round(0.3 * sqrt(n)))`` (10, CoRelAy's default, up to 1111 samples; 21 at 5000,
    42 at 20000).

    Why it grows: with a fixed ``k`` the kNN graph of a large class becomes a fine mesh along each
    strategy's spread (position, size of the relevant region), and the smooth modes *within* a
    strategy get Laplacian eigenvalues as small as the cuts *between* strategies, so the eigengap
    vanishes and k-means splits strategies. ``benchmarks/spray.py``, 20000 heatmaps of 5 planted
    strategies: k=10 gives eigenvalues 5 and 6 of 0.0010 and 0.0011 (no gap) and ARI 0.76 against
    the truth; k=42 gives 0.0028 and 0.019 and ARI 0.96, as k=10 does at 5000.

    Raises:
        ValueError: ``k`` neither an int >= 1 nor ``"auto"``.
    """
    if k == "auto":
        return max(10, int(round(0.3 * np.sqrt(n))))
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1 or 'auto', got {k!r}")
    return int(k)


def knn(features: np.ndarray, k: int, chunk: int | None = None, device: str | torch.device | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (Euclidean, self excluded): ``(distances, indices)``, each (N, k).

    Blocked matrix products in torch into one reused ``chunk x N`` buffer, never ``N x N``: memory
    is O(N * D + chunk * N) on ``device`` and O(N * k) for the result. This is the step whose cost
    grows with N^2 * D (at 100k heatmaps of 32x32, 2 * 10^13 multiply-adds), so it runs where the
    data's accelerator is; the eigensolver that follows works on the sparse graph (O(N * k) per
    iteration) and stays on the CPU (ARPACK; ``torch.lobpcg`` on the same Laplacian measured 27x
    slower there at 5000 heatmaps).

    Args:
        features: (N, D) float array or tensor.
        k: neighbours per sample, ``1 <= k <= N - 1``.
        chunk: rows per block; None: as many as fit a buffer of 2**25 distances (128 MiB).
        device: where the distances are computed (e.g. ``"cuda"``); None: where ``features`` is
            (the CPU for arrays). The result is on the CPU either way.

    Example::

        dist, idx = knn(points, k=10, device="cuda" if torch.cuda.is_available() else None)
    """
    x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(features))
    x = x.detach().to(device=device or x.device, dtype=torch.float32)
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} neighbours need at least k + 1 = {k + 1} samples, got {n}")
    chunk = chunk or max(64, min(n, 2**25 // n))
    sq = (x * x).sum(1)
    buf = torch.empty(min(chunk, n), n, device=x.device)
    dists, idx = [], []
    for s in range(0, n, chunk):
        rows = min(chunk, n - s)
        d2 = buf[:rows]
        torch.mm(x[s:s + rows], x.T, out=d2)  # squared distances, in place: |a|^2 - 2 a.b + |b|^2
        d2.mul_(-2).add_(sq[None]).add_(sq[s:s + rows, None]).clamp_min_(0)
        own = torch.arange(rows, device=x.device)
        d2[own, own + s] = float("inf")  # exclude self, also when duplicates exist
        val, ind = d2.topk(k, dim=1, largest=False)
        dists.append(val.sqrt_())
        idx.append(ind)
    return torch.cat(dists).cpu().numpy().astype(np.float64), torch.cat(idx).cpu().numpy()


def affinity(features: np.ndarray, k: int = 10, kind: str = "knn", symmetric: bool = True,
             device: str | torch.device | None = None) -> sp.csr_matrix:
    """Sparse kNN affinity matrix (N, N) with about ``N * k`` non-zeros.

    Args:
        features: (N, D) preprocessed heatmaps.
        k: neighbours per sample (CoRelAy default 10).
        kind: ``"knn"``: binary edges (CoRelAy's ``SparseKNN``); ``"knn_rbf"``: edges weighted
            ``exp(-d^2 / (sigma_i * sigma_j))`` with sigma_i the distance to the k-th neighbour
            (self-tuning scale).
        symmetric: average the matrix with its transpose (an undirected graph).
        device: where the neighbour search runs (see :func:`knn`).
    """
    if kind not in AFFINITIES:
        raise ValueError(f"affinity kind must be one of {AFFINITIES}, got {kind!r}")
    n = features.shape[0]
    dist, idx = knn(features, k, device=device)
    rows = np.repeat(np.arange(n), k)
    if kind == "knn":
        values = np.ones(n * k)
    else:
        sigma = np.maximum(dist[:, -1], 1e-12)
        values = np.exp(-dist.ravel() ** 2 / (sigma[rows] * sigma[idx.ravel()]))
    a = sp.csr_matrix((values, (rows, idx.ravel())), shape=(n, n))
    if symmetric:
        a = ((a + a.T) * 0.5).tocsr()
    return a


class Laplacian(NamedTuple):
    """A normalised graph Laplacian: ``matrix`` is ``L_sym = I - D^-1/2 A D^-1/2`` (sparse),
    ``degree`` the node degrees, ``kind`` which normalisation the eigenvectors follow."""

    matrix: sp.csr_matrix
    degree: np.ndarray
    kind: str


def laplacian(adjacency: sp.spmatrix, kind: str = "symmetric") -> Laplacian:
    """The normalised Laplacian of an affinity matrix.

    Args:
        adjacency: sparse symmetric non-negative (N, N) affinity.
        kind: ``"symmetric"`` (``I - D^-1/2 A D^-1/2``, eigenvectors as is) or ``"random_walk"``
            (``I - D^-1 A``: same eigenvalues, eigenvectors ``D^-1/2 u``).
    """
    if kind not in LAPLACIANS:
        raise ValueError(f"laplacian kind must be one of {LAPLACIANS}, got {kind!r}")
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    degree = np.asarray(a.sum(1)).ravel()
    if (degree <= 0).any():
        raise ValueError(f"{int((degree <= 0).sum())} node(s) of the affinity graph have no edges")
    d = sp.diags(degree ** -0.5)
    return Laplacian((sp.identity(a.shape[0], format="csr") - d @ a @ d).tocsr(), degree, kind)


def spectral_embedding(lap: Laplacian, n_eigval: int = 32, seed: int = 0,
                       normalize_rows: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_eigval`` smallest eigenvalues (ascending) of the Laplacian and their eigenvectors.

    Uses ``scipy.sparse.linalg.eigsh`` on ``I - L`` (largest algebraic eigenvalues, which ARPACK
    finds quickly), with a seeded start vector, per connected component of the graph (so the
    eigenvalue 0 keeps its multiplicity); components of at most ``max(2 * n_eigval + 1, 64)``
    nodes are solved densely (their size, not N, bounds that memory).

    Args:
        lap: from :func:`laplacian`.
        n_eigval: number of eigenpairs (CoRelAy default 32); capped at ``N - 1``.
        seed: seed of the start vector.
        normalize_rows: scale each sample's row of eigenvectors to unit length (as CoRelAy's
            ``EigenDecomposition(normalize=True)`` and Ng, Jordan & Weiss do).

    Returns:
        ``(eigenvalues (m,), eigenvectors (N, m))`` with ``m = min(n_eigval, N - 1)``.
    """
    n = lap.matrix.shape[0]
    if n < 3:
        raise ValueError(f"a spectral embedding needs at least 3 samples, got {n}")
    if n_eigval < 1:
        raise ValueError(f"n_eigval must be >= 1, got {n_eigval}")
    m = min(n_eigval, n - 1)
    # The spectrum of a disconnected graph is the union of its components' spectra; solving per
    # component keeps eigenvalue 0 with its full multiplicity (one per component), which a single
    # Lanczos run can miss.
    n_comp, comp = sp.csgraph.connected_components(lap.matrix, directed=False)
    values, pairs = [], []
    for j in range(n_comp):
        nodes = np.flatnonzero(comp == j)
        block = (sp.identity(len(nodes), format="csr") - lap.matrix[nodes][:, nodes]).tocsr()
        mu, vec = _largest_eigenpairs(block, min(m, len(nodes)), seed)
        values.append(1.0 - mu)
        pairs += [(nodes, vec[:, i]) for i in range(len(mu))]
    ev = np.concatenate(values)
    order = np.argsort(ev, kind="stable")[:m]
    eigenvalues = np.clip(ev[order], 0.0, 2.0)
    vectors = np.zeros((n, m))
    for col, i in enumerate(order):
        nodes, vec = pairs[i]
        vectors[nodes, col] = vec
    if lap.kind == "random_walk":
        vectors = vectors / np.sqrt(lap.degree)[:, None]
    # fix each eigenvector's sign (largest-magnitude entry positive) so results are reproducible
    signs = np.sign(vectors[np.abs(vectors).argmax(0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1, signs)
    if normalize_rows:
        vectors = _unit_rows(vectors)
    return eigenvalues, vectors


def _largest_eigenpairs(matrix: sp.csr_matrix, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` largest eigenpairs of a symmetric sparse matrix: ARPACK, dense for tiny ones."""
    n = matrix.shape[0]
    if n <= max(2 * m + 1, 64):
        mu, vec = np.linalg.eigh(matrix.toarray())
        return mu[::-1][:m], vec[:, ::-1][:, :m]
    v0 = np.random.default_rng(seed).uniform(0.5, 1.5, n)
    try:
        return eigsh(matrix, k=m, which="LA", v0=v0)
    except ArpackNoConvergence:
        return eigsh(matrix, k=m, which="LA", v0=v0, tol=1e-8, ncv=min(n, max(4 * m, 40)), maxiter=100 * n)


def _unit_rows(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norm > 0, norm, 1)


def eigengap(eigenvalues: np.ndarray, min_clusters: int = 1, max_clusters: int = 10,
             eps: float | None = 0.01) -> int:
    """Number of clusters from the largest gap in the ascending Laplacian spectrum.

    Returns the ``K`` in ``[min_clusters, max_clusters]`` that maximises the gap after the K-th
    smallest eigenvalue, ``log(ev[K] + eps) - log(ev[K-1] + eps)``: a gap counts relative to
    the eigenvalues around it, so the jump from (near) zero to the first clearly positive
    eigenvalue wins over the wider but relatively smaller gaps higher up the spectrum.

    Args:
        eigenvalues: ascending eigenvalues of the normalised Laplacian.
        min_clusters: smallest K considered (>= 1).
        max_clusters: largest K considered; capped at ``len(eigenvalues) - 1``.
        eps: eigenvalues well below ``eps`` count as zero; None compares absolute gaps
            ``ev[K] - ev[K-1]`` (the textbook heuristic).
    """
    ev = np.asarray(eigenvalues, dtype=np.float64)
    if min_clusters < 1:
        raise ValueError(f"min_clusters must be >= 1, got {min_clusters}")
    if eps is not None and eps <= 0:
        raise ValueError(f"eps must be > 0 or None, got {eps}")
    hi = min(max_clusters, len(ev) - 1)
    if hi < min_clusters:
        raise ValueError(f"the eigengap over K in [{min_clusters}, {max_clusters}] needs at least "
                         f"{min_clusters + 1} eigenvalues, got {len(ev)}")
    gaps = np.diff(ev if eps is None else np.log(np.clip(ev, 0, None) + eps))  # gaps[K-1]: after the K-th
    ks = np.arange(min_clusters, hi + 1)
    return int(ks[np.argmax(gaps[ks - 1])])


def clustering(embedding: np.ndarray, n_clusters: int, algorithm: str = "kmeans", seed: int = 0,
               **options) -> np.ndarray:
    """Cluster labels (N,) of a spectral embedding; ``-1`` marks noise (DBSCAN / HDBSCAN).

    Args:
        embedding: (N, d) spectral embedding.
        n_clusters: clusters for ``kmeans`` / ``agglomerative``; ignored by the density methods.
        algorithm: ``kmeans`` (scikit-learn, ``n_init=10``), ``agglomerative`` (Ward linkage by
            default; other linkages build an N x N distance matrix), ``dbscan`` (options ``eps``,
            default 0.5, and ``min_samples``, default 5) or ``hdbscan`` (scikit-learn's, option
            ``min_cluster_size``, default 5).
        seed: random state of k-means.
        **options: passed to the scikit-learn estimator.
    """
    from sklearn import cluster

    if algorithm not in CLUSTERINGS:
        raise ValueError(f"clustering algorithm must be one of {CLUSTERINGS}, got {algorithm!r}")
    n = embedding.shape[0]
    if algorithm in ("kmeans", "agglomerative") and not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}] for {n} samples, got {n_clusters}")
    if algorithm == "kmeans":
        est = cluster.KMeans(n_clusters=n_clusters, n_init=options.pop("n_init", 10), random_state=seed, **options)
    elif algorithm == "agglomerative":
        est = cluster.AgglomerativeClustering(n_clusters=n_clusters, **options)
    elif algorithm == "dbscan":
        est = cluster.DBSCAN(**options)
    else:
        est = cluster.HDBSCAN(**{"min_cluster_size": 5, "copy": True, **options})
    with _one_openmp_thread():
        return np.asarray(est.fit_predict(embedding), dtype=np.int64)


@lru_cache(maxsize=1)
def _threadpools():
    """The loaded thread pools, found once (3 ms a search; scikit-learn and torch are imported by
    the first call)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _one_openmp_thread():
    """One OpenMP thread inside: scikit-learn's OpenMP threads next to torch's oversubscribe the
    cores (measured 100x slower for 55 samples inside a Lightning run on 2 cores); one thread is
    fast at these sizes."""
    return _threadpools().limit(limits=1, user_api="openmp")


def visualisation_embedding(embedding: np.ndarray, kind: str | None = "tsne", seed: int = 0,
                            perplexity: float = 30.0) -> np.ndarray | None:
    """A 2-D embedding of the spectral embedding for plots (None when ``kind`` is None).

    Args:
        embedding: (N, d) spectral embedding.
        kind: ``tsne`` (scikit-learn, PCA init), ``pca``, ``spectral`` (the 2nd and 3rd
            eigenvectors) or None.
        seed: random state of t-SNE.
        perplexity: t-SNE perplexity, capped at ``(N - 1) / 3``.
    """
    if kind not in VISUALISATIONS:
        raise ValueError(f"visualisation kind must be one of {VISUALISATIONS}, got {kind!r}")
    if kind is None:
        return None
    n = embedding.shape[0]
    if kind == "spectral" or embedding.shape[1] < 3 or n < 5:
        cols = embedding[:, 1:3] if embedding.shape[1] >= 3 else np.pad(embedding, ((0, 0), (0, 2)))[:, :2]
        return np.ascontiguousarray(cols, dtype=np.float32)
    if kind == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embedding).astype(np.float32)
    from sklearn.manifold import TSNE

    # 500 iterations (250 after the early exaggeration), not scikit-learn's 1000, in half the time: on
    # two groups of 50, 100 and 300 points the KL divergence and the trustworthiness were the same,
    # on 1000 points the trustworthiness the same and the KL divergence 3 % higher
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", max_iter=500,
                random_state=seed)
    with _one_openmp_thread():
        return tsne.fit_transform(embedding).astype(np.float32)


def prototypes(heatmaps, labels: np.ndarray, embedding: np.ndarray, n_typical: int = 5
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per cluster, the mean heatmap and the most typical members.

    Args:
        heatmaps: (N, ...) heatmaps (any shape per sample; e.g. the raw (C, H, W) relevance).
        labels: (N,) cluster labels ``0..K-1`` (``-1`` = noise, left out).
        embedding: (N, d) the embedding the clusters were found in.
        n_typical: members per cluster closest to the cluster's centroid in ``embedding``.

    Returns:
        ``(means (K, ...), typical)``: ``typical[c]`` holds up to ``n_typical`` sample indices,
        most typical first.
    """
    h = as_array(heatmaps)
    k = int(labels.max()) + 1 if (labels >= 0).any() else 0
    means = np.zeros((k,) + h.shape[1:], dtype=np.float32)
    typical = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        if len(members) == 0:
            typical.append(members)
            continue
        means[c] = h[members].mean(0)
        centre = embedding[members].mean(0)
        d = np.linalg.norm(embedding[members] - centre, axis=1)
        typical.append(members[np.argsort(d, kind="stable")[:n_typical]])
    return means, typical
