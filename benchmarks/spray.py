"""SpRAy: our pipeline against CoRelAy's SpectralClustering on the same heatmaps, same parameters.

Both get the same preprocessed heatmaps (32x32, channel-summed, unit L2 norm) and the same
parameters: binary kNN affinity with k = 10 symmetrised, normalised Laplacian, 32 eigenpairs,
k-means (n_init=10, random_state=0) with K = 5 on the eigenvectors of the 5 smallest eigenvalues
(rows not rescaled). (k-means on all 32 row-normalised eigenvectors, CoRelAy's example setting,
is unstable on these data: two k-means seeds of the same pipeline agree with ARI 0.2-0.8, so it
cannot measure agreement between implementations.) Both are also scored against the planted
strategies.
Each pipeline runs in a fresh process; reported: wall time of the pipeline call, peak memory
above the process's resident size before the call (VmHWM - VmRSS, so torch allocations count),
(the peak is reset right before the call) and the agreement of the two labelings (adjusted
Rand index). CoRelAy builds a dense N x N
distance matrix, so it is skipped above ``--corelay-max`` (default 5000); its matrix alone would
need N^2 * 8 bytes.

Ours runs twice: with CoRelAy's k = 10 (the comparison) and with ``k="auto"`` (our default:
10 up to 1111 heatmaps, ``0.3 * sqrt(N)`` above), which keeps the eigengap, and so the ARI against
the planted strategies, at large N (see ``xai_callbacks.spray.pipeline.neighbours``).

``--embedding`` times the 2-D embeddings of the plots (scikit-learn t-SNE, openTSNE's
FFT-accelerated t-SNE, PCA) on the 32-dimensional spectral embedding.

    PYTHONPATH=. python benchmarks/spray.py            # N = 1000, 5000 (about 1-2 minutes)
    PYTHONPATH=. python benchmarks/spray.py --large    # adds N = 20000 (ours only by default)
    PYTHONPATH=. python benchmarks/spray.py --embedding --sizes 100 1000 5000
    PYTHONPATH=. python benchmarks/spray.py --sizes 20000 100000 --device cuda   # kNN on a GPU
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

K_NEIGHBOURS, N_EIGVAL, N_CLUSTERS = 10, 32, 5


def heatmaps(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """N synthetic 32x32 heatmaps of one class with 5 strategies (jittered blobs at 5 places plus
    noise); 5% of the samples blend two strategies, so the kNN graph stays connected."""
    rng = np.random.default_rng(seed)
    centres = np.array([(10, 10), (10, 22), (22, 16), (16, 6), (16, 26)], dtype=float)
    yy, xx = np.mgrid[:32, :32]

    def blobs(which):
        c = centres[which] + rng.normal(0, 1.5, (len(which), 2))
        sigma = rng.uniform(3, 4, (len(which), 1, 1))
        return np.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / (2 * sigma ** 2))

    truth = rng.integers(0, len(centres), n)
    maps = blobs(truth)
    mixed = rng.random(n) < 0.02
    maps[mixed] = 0.5 * maps[mixed] + 0.5 * blobs(rng.integers(0, len(centres), int(mixed.sum())))
    maps += 0.2 * rng.random((n, 32, 32))
    return maps[:, None].astype(np.float32), truth


def _mem_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _pipeline(which: str, device: str | None = None):
    """A function features (N, 1024) -> labels, for ``ours`` (k = 10), ``auto`` (k="auto") or ``corelay``;
    ours runs its kNN search on ``device``."""
    if which == "corelay":
        from corelay.pipeline.spectral import SpectralClustering
        from corelay.processor.affinity import SparseKNN
        from corelay.processor.clustering import KMeans
        from corelay.processor.embedding import EigenDecomposition

        # CoRelAy's eigsh returns eigenvalues 1 - mu in ARPACK's ascending-mu order: the K
        # smallest Laplacian eigenvalues are its last K columns
        pipe = SpectralClustering(affinity=SparseKNN(n_neighbors=K_NEIGHBOURS, symmetric=True),
                                  embedding=EigenDecomposition(n_eigval=N_EIGVAL, normalize=False, is_output=True),
                                  clustering=KMeans(n_clusters=N_CLUSTERS, index=(slice(None), slice(-N_CLUSTERS, None)),
                                                    kwargs={"n_init": 10, "random_state": 0}, is_output=True))
        return lambda x: pipe(x)[1]
    from xai_callbacks.spray import spray

    k = "auto" if which == "auto" else K_NEIGHBOURS
    return lambda x: spray(x.reshape(len(x), 32, 32), normalize=None, k=k, n_eigval=N_EIGVAL,
                           n_clusters=N_CLUSTERS, normalize_rows=False, visualisation=None, device=device).labels


def _run(which: str, n: int, device: str | None, queue) -> None:
    from xai_callbacks.spray import preprocess

    run = _pipeline(which, device)
    run(preprocess(heatmaps(200, seed=1)[0]))  # warm-up: imports, thread pools
    x = preprocess(heatmaps(n)[0])
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current size
        f.write("5")
    before = _mem_kib("VmRSS")
    t = time.perf_counter()
    labels = run(x)
    seconds = time.perf_counter() - t
    queue.put((seconds, (_mem_kib("VmHWM") - before) / 1024, np.asarray(labels)))


def measure(which: str, n: int, device: str | None = None):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(which, n, device, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="add N = 20000")
    parser.add_argument("--corelay-max", type=int, default=5000, help="largest N CoRelAy is run at")
    parser.add_argument("--sizes", type=int, nargs="+", help="the N to run (default 1000 5000, and 20000 with --large)")
    parser.add_argument("--embedding", action="store_true", help="time the 2-D embeddings instead")
    parser.add_argument("--device", default=None, help="where our kNN search runs (e.g. cuda; default: the CPU)")
    args = parser.parse_args()
    from sklearn.metrics import adjusted_rand_score

    sizes = args.sizes or [1000, 5000] + ([20000] if args.large else [])
    if args.embedding:
        return embeddings(sizes)
    print(f"SpRAy vs CoRelAy 1.0 SpectralClustering: 32x32 heatmaps, k={K_NEIGHBOURS}, n_eigval={N_EIGVAL}, "
          f"k-means K={N_CLUSTERS}")
    print(f"{'N':>6} | {'ours s':>7} {'ours MiB':>9} {'ARI truth':>9} | {'auto k':>6} {'s':>6} {'ARI truth':>9} | "
          f"{'CoRelAy s':>9} {'CoRelAy MiB':>11} {'ARI truth':>9} | {'time ratio':>10} {'mem ratio':>9} "
          f"{'ARI ours-CoRelAy':>16}")
    from xai_callbacks.spray.pipeline import neighbours

    for n in sizes:
        truth = heatmaps(n)[1]
        ours_s, ours_mb, ours_labels = measure("ours", n, args.device)
        auto_s, _, auto_labels = measure("auto", n, args.device)
        row = (f"{n:>6} | {ours_s:>7.2f} {ours_mb:>9.0f} {adjusted_rand_score(truth, ours_labels):>9.3f} | "
               f"{neighbours(n):>6} {auto_s:>6.2f} {adjusted_rand_score(truth, auto_labels):>9.3f} | ")
        if n <= args.corelay_max:
            ref_s, ref_mb, ref_labels = measure("corelay", n)
            row += (f"{ref_s:>9.2f} {ref_mb:>11.0f} {adjusted_rand_score(truth, ref_labels):>9.3f} | "
                    f"{ref_s / ours_s:>9.1f}x {ref_mb / max(ours_mb, 1):>8.1f}x "
                    f"{adjusted_rand_score(ref_labels, ours_labels):>16.3f}")
        else:
            row += f"{'not run':>9} {n * n * 8 / 2**20:>10.0f}* {'':>9} |"
        print(row, flush=True)
    if any(n > args.corelay_max for n in sizes):
        print("* CoRelAy not run: its dense float64 distance matrix alone would need this many MiB")


def embeddings(sizes) -> None:
    """Seconds of each 2-D embedding of the spectral embedding of N heatmaps (one process, 1 thread
    for scikit-learn as in the pipeline)."""
    from openTSNE import TSNE as OpenTSNE
    from sklearn.metrics import adjusted_rand_score  # noqa: F401  (same imports as the main run)

    from xai_callbacks.spray import pipeline as P, preprocess

    print(f"2-D embeddings of the 32-d spectral embedding (k='auto'): seconds")
    print(f"{'N':>6} | {'sklearn t-SNE':>13} {'openTSNE FFT':>12} {'PCA':>8} | {'sklearn / openTSNE':>18}")
    for n in sizes:
        x = preprocess(heatmaps(n)[0])
        lap = P.laplacian(P.affinity(x, k=P.neighbours(n)))
        _, vec = P.spectral_embedding(lap, n_eigval=N_EIGVAL)
        times = {}
        for kind in ("tsne", "opentsne", "pca"):
            t = time.perf_counter()
            if kind == "opentsne":
                OpenTSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), initialization="pca", random_state=0,
                         n_jobs=1, negative_gradient_method="fft" if n >= 1000 else "bh").fit(vec)
            else:
                P.visualisation_embedding(vec, kind=kind)
            times[kind] = time.perf_counter() - t
        print(f"{n:>6} | {times['tsne']:>13.2f} {times['opentsne']:>12.2f} {times['pca']:>8.3f} | "
              f"{times['tsne'] / times['opentsne']:>17.1f}x", flush=True)


if __name__ == "__main__":
    main()
