"""SpRAy core: steps against analytic / dense / CoRelAy references, suspicion, tracking, ViRelAy export."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from xai_callbacks.spray import (StrategyTracker, affinity, check_heatmaps, eigengap, laplacian, mask_shares,
                                 preprocess, relevance_distribution, spectral_embedding, spray, write_virelay)
from xai_callbacks.spray.pipeline import knn


def blob(cy, cx, size=32, sigma=3.0):
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def strategies(n_per=(30, 30, 30), seed=0, size=32, sigma=3.0, jitter=1.0, noise=0.05):
    """Heatmaps of one class with planted strategies: blobs at distinct places, jittered, noisy."""
    rng = np.random.default_rng(seed)
    centres = [(10, 10), (10, 22), (22, 16), (22, 6)]
    maps, labels = [], []
    for s, n in enumerate(n_per):
        for _ in range(n):
            cy, cx = np.array(centres[s]) + rng.normal(0, jitter, 2)
            maps.append(blob(cy, cx, size, sigma) + noise * rng.random((size, size)))
            labels.append(s)
    return np.stack(maps)[:, None].astype(np.float32), np.array(labels)


def clever_hans(n=80, fraction=0.25, artifact=True, seed=0, size=32):
    """A class whose relevance sits on a varying central 'object'; a fraction also puts relevance
    on a small fixed corner patch (the artifact). Returns heatmaps, has_artifact, artifact mask."""
    rng = np.random.default_rng(seed)
    maps, has, masks = [], [], []
    for i in range(n):
        cy, cx = 16 + rng.normal(0, 2.0, 2)
        r = blob(cy, cx, size, sigma=4.0 + rng.random()) + 0.1 * rng.random((size, size))
        r -= 0.03 * rng.random((size, size))  # some negative relevance
        m = np.zeros((size, size))
        marked = artifact and i < int(fraction * n)
        if marked:
            m[1:6, 1:6] = 1
            r = r + 0.6 * m * (1 + 0.2 * rng.random((size, size)))
        maps.append(r)
        has.append(marked)
        masks.append(m)
    return np.stack(maps)[:, None].astype(np.float32), np.array(has), np.stack(masks)[:, None]


def test_planted_strategies_are_found_with_eigengap_chosen_k():
    h, truth = strategies()
    r = spray(h, visualisation="pca")
    assert r.n_clusters == 3
    assert adjusted_rand_score(truth, r.labels) == 1.0
    assert r.embedding.shape == (90, 2) and r.spectral_embedding.shape == (90, 32)
    assert r.prototypes.shape == (3, 1, 32, 32)
    # prototypes are the members' mean heatmaps, typical members belong to their cluster
    for c in range(3):
        np.testing.assert_allclose(r.prototypes[c], h[r.labels == c].mean(0), rtol=1e-5, atol=1e-6)
        assert (r.labels[r.typical[c]] == c).all() and len(r.typical[c]) == 5
    assert list(r.cluster_sizes) == [30, 30, 30]


def test_spectrum_matches_dense_eigendecomposition_and_counts_components():
    h, _ = strategies((15, 15, 15), seed=1)
    x = preprocess(h)
    a = affinity(x, k=5)
    lap = laplacian(a)
    ev, vec = spectral_embedding(lap, n_eigval=10, normalize_rows=False)
    dense = np.linalg.eigvalsh(lap.matrix.toarray())[:10]
    np.testing.assert_allclose(ev, dense, atol=1e-7)
    # eigenvectors: L v = lambda v
    np.testing.assert_allclose(lap.matrix @ vec, vec * ev, atol=1e-6)
    # three disconnected groups -> three zero eigenvalues, eigengap says 3
    n_comp = sp.csgraph.connected_components(a)[0]
    assert n_comp == 3 and np.sum(ev < 1e-8) == 3 and eigengap(ev) == 3


def test_affinity_is_sparse_symmetric_knn_graph():
    h, _ = strategies()
    x = preprocess(h)
    for kind in ("knn", "knn_rbf"):
        a = affinity(x, k=7, kind=kind)
        assert sp.issparse(a) and a.nnz <= 2 * 7 * len(x)
        assert abs(a - a.T).max() < 1e-12 and a.diagonal().max() == 0
    # the binary graph holds each sample's 7 nearest neighbours (brute force reference)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    ref = np.zeros_like(d)
    np.put_along_axis(ref, np.argsort(d, 1)[:, :7], 1.0, 1)
    np.testing.assert_allclose(affinity(x, k=7).toarray(), (ref + ref.T) / 2)


def test_knn_takes_tensors_and_a_device_and_returns_cpu_arrays():
    h, truth = strategies()
    x = preprocess(h)
    dist, idx = knn(x, 7)
    # blocks of 5 rows, a tensor on an explicit device: the same neighbours and distances
    dist_t, idx_t = knn(torch.from_numpy(x), 7, chunk=5, device="cpu")
    assert isinstance(idx_t, np.ndarray) and np.array_equal(idx, idx_t)
    np.testing.assert_allclose(dist, dist_t, atol=1e-5)  # float32 |a|^2 - 2ab + |b|^2, summed per block
    d = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(dist, np.sort(d, 1)[:, :7], atol=1e-4)
    # spray on a tensor gives the same clusters as on the array
    r = spray(torch.from_numpy(h), visualisation=None)
    assert adjusted_rand_score(truth, r.labels) == 1.0
    with pytest.raises(ValueError, match=r"k=7 neighbours need at least k \+ 1 = 8 samples, got 7"):
        knn(x[:7], 7)


def test_random_walk_laplacian_same_spectrum_scaled_vectors():
    h, truth = strategies()
    a = affinity(preprocess(h), k=10)
    ev_s, v_s = spectral_embedding(laplacian(a, "symmetric"), 8, normalize_rows=False)
    ev_r, v_r = spectral_embedding(laplacian(a, "random_walk"), 8, normalize_rows=False)
    np.testing.assert_allclose(ev_s, ev_r, atol=1e-9)
    r = spray(h, laplacian="random_walk", affinity="knn_rbf", visualisation=None)
    assert adjusted_rand_score(truth, r.labels) == 1.0 and r.embedding is None


@pytest.mark.parametrize("algorithm,options", [("agglomerative", {}), ("dbscan", {"eps": 0.3}),
                                               ("hdbscan", {"min_cluster_size": 10})])
def test_other_clusterings_recover_planted_strategies(algorithm, options):
    h, truth = strategies()
    r = spray(h, clustering=algorithm, clustering_options=options, visualisation="spectral")
    keep = r.labels >= 0
    assert keep.mean() > 0.9 and adjusted_rand_score(truth[keep], r.labels[keep]) == 1.0


def test_parity_with_corelay_spectral_clustering():
    pytest.importorskip("corelay")
    from corelay.pipeline.spectral import SpectralClustering
    from corelay.processor.affinity import SparseKNN
    from corelay.processor.clustering import KMeans
    from corelay.processor.embedding import EigenDecomposition

    # a connected kNN graph (overlapping strategies) and N large enough that CoRelAy's
    # largest-magnitude eigsh on D^-1/2 A D^-1/2 returns the same (smallest-Laplacian) end
    h, truth = strategies((150, 100, 50), seed=3, sigma=5.0, jitter=3.0, noise=0.3)
    x = preprocess(h)
    pipe = SpectralClustering(affinity=SparseKNN(n_neighbors=10, symmetric=True),
                              embedding=EigenDecomposition(n_eigval=8, is_output=True),
                              clustering=KMeans(n_clusters=3, kwargs={"n_init": 10, "random_state": 0}, is_output=True))
    (ev_ref, _), labels_ref = pipe(x)
    r = spray(x.reshape(-1, 32, 32), normalize=None, k=10, n_eigval=8, n_clusters=3, cluster_dims=8,
              visualisation=None)
    assert sp.csgraph.connected_components(affinity(x, k=10))[0] == 1
    np.testing.assert_allclose(np.sort(ev_ref), r.eigenvalues, atol=1e-6)
    assert adjusted_rand_score(labels_ref, r.labels) >= 0.95
    assert adjusted_rand_score(truth, r.labels) >= 0.8


def test_suspicion_flags_compact_off_object_cluster_and_ranks_samples():
    h, has, m = clever_hans()
    r = spray(h, masks={"artifact": m, "object": 1 - m}, visualisation="pca")
    best = max(range(r.n_clusters), key=lambda c: (has & (r.labels == c)).sum())
    members = r.labels == best
    assert (has & members).sum() / members.sum() >= 0.9 and (has & members).sum() / has.sum() >= 0.9
    assert r.flagged[best] and r.flagged.sum() == 1
    assert roc_auc_score(has, r.suspicion) >= 0.95
    assert r.suspicious_share == pytest.approx(members.mean())
    # with masks: the flagged cluster's relevance sits on the artifact, the others' does not
    assert r.cluster_mask_shares["artifact"][best] > 0.05
    assert np.delete(r.cluster_mask_shares["artifact"], best).max() < 0.01


def test_suspicion_flags_nothing_without_artifact():
    h, _, _ = clever_hans(artifact=False)
    assert not spray(h, visualisation=None).flagged.any()
    h, truth = strategies((40, 40), seed=2, sigma=6.0)  # two broad, overlapping styles: not Clever Hans
    r = spray(h, visualisation=None)
    assert adjusted_rand_score(truth, r.labels) > 0.9 and not r.flagged.any()


def test_mask_shares_analytic():
    h = np.zeros((3, 1, 4, 4), np.float32)
    h[0, 0, 0, 0], h[0, 0, 3, 3], h[0, 0, 1, 1] = 3.0, 1.0, -5.0  # negative relevance is ignored
    h[1, 0, 2, 2] = 2.0
    h[2, 0, 0, 0], h[2, 0, 2, 2] = -3.0, -1.0   # none positive: where |R| is (as relevance_distribution)
    m = np.zeros((3, 4, 4))
    m[:, 0, 0] = 1
    s = mask_shares(h, {"a": m})["a"]
    np.testing.assert_allclose(s, [0.75, 0.0, 0.75])
    np.testing.assert_allclose(relevance_distribution(h[2:], grid=4)[0, 0], 0.75)
    with pytest.raises(ValueError, match="mask 'a' has shape"):
        mask_shares(h, {"a": m[:, :2]})


def test_bad_input_gives_clear_errors():
    h, _ = strategies((4, 4, 0))
    with pytest.raises(ValueError, match=r"needs more than 10 heatmaps, got 8"):
        spray(h)
    h, _ = strategies()
    h[3] = np.nan
    h[7] = 1.0
    assert list(np.flatnonzero(~check_heatmaps(h))) == [3, 7]
    with pytest.raises(ValueError, match=r"NaN / inf or are constant \(indices \[3, 7\]\)"):
        spray(h)
    with pytest.raises(ValueError, match="clustering algorithm must be one of"):
        spray(strategies()[0], clustering="spectral")
    with pytest.raises(ValueError, match="shape"):
        spray(np.zeros((5, 2, 3, 4, 5)))


def test_strategy_tracker_keeps_ids_and_round_trips():
    h, _ = strategies()
    r = spray(h, visualisation=None)
    t = StrategyTracker()
    first = t.update(r.signatures, r.factors["share"], epoch=0)
    again = t.update(r.signatures[::-1], r.factors["share"][::-1], epoch=1)  # same strategies, new order
    assert again == first[::-1]
    other = spray(strategies((30, 30, 30, 30), seed=5)[0], visualisation=None)
    ids = t.update(other.signatures, other.factors["share"], epoch=2)
    assert sorted(ids)[:3] == sorted(first) and max(ids) == 3  # the fourth place is a new strategy
    clone = StrategyTracker()
    clone.load_state_dict(t.state_dict())
    assert clone.share_curves() == t.share_curves() and clone.next_id == 4
    epochs, curves = t.share_curves()
    assert epochs == [0, 1, 2] and curves["strategy 3"] == [0.0, 0.0, 0.25]


def test_virelay_export_layout(tmp_path):
    import h5py

    h, has, m = clever_hans(n=40)
    r = spray(h, masks={"artifact": m}, visualisation="pca")
    labels = np.zeros(40, int)
    paths = write_virelay(tmp_path / "db", h, labels, {0: (np.arange(40), r)}, indices=np.arange(100, 140),
                          inputs=h, predictions=np.zeros((40, 2)), strategy_ids={0: list(range(10, 10 + r.n_clusters))})
    with h5py.File(paths["attribution"]) as f:
        assert f["relevance"].shape == (40, 1, 32, 32) and list(f["dataset_index"][:3]) == [100, 101, 102]
    with h5py.File(paths["analysis"]) as f:
        g = f["00000000"]
        assert list(g["index"][:]) == list(range(40))
        np.testing.assert_allclose(g["embedding/spectral"].attrs["eigenvalue"], r.eigenvalues, rtol=1e-6)
        assert g["embedding/pca"].shape == (40, 2) and g["embedding/pca"].attrs["embedding"] == "spectral"
        clustering = g[f"cluster/kmeans-{r.n_clusters:02d}"]
        assert (clustering[:] == r.labels).all() and clustering.attrs["k"] == r.n_clusters
        assert list(g["spray/strategy_id"][:]) == list(range(10, 10 + r.n_clusters))
        assert g["spray/artifact_share"].shape == (40,)
    assert "analysis.h5" in paths["project"].read_text()
