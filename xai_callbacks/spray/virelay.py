"""Write SpRAy results as a ViRelAy project (HDF5 databases + ``project.yaml``) that ViRelAy opens.

One directory per call holds:

* ``input.h5``: ``data`` uint8 (N, H', W', 3), each input rendered as an RGB picture (ViRelAy
  moves a leading channel axis last and hands the array to Pillow, which rejects one-channel
  (H, W, 1) arrays and rescales floats by guessing their range); ``label`` uint32 (N,); and,
  outside ViRelAy's keys, ``input`` float32 (N, C, H, W), the model inputs as given;
* ``attribution.h5``: ``attribution`` float32 (N, 3, H', W') for ViRelAy's heatmap renderer
  (three-channel relevance as it is; any other as three equal channels of a third of its
  channel sum, so their sum, which ViRelAy draws, is the relevance), ``label``
  uint32 (N,), ``index`` uint32 (N,) (row in ``input.h5``), ``prediction`` float32
  (N, classes), and outside ViRelAy's keys ``relevance`` float32 (N, C, H, W) as given and
  ``dataset_index`` (each sample's index in the validation dataset). ViRelAy takes the shortest
  axis of a picture or heatmap for its channels, so a side shorter than :data:`MIN_SIDE` (a
  signal's or a row's one-row picture: (N, C, 1, L)) is repeated to at least that many pixels
  (H', W'): a row of L tokens is shown as a strip of 8 x L;
* ``analysis.h5``: one group per class, named by its 8-digit id (``00000003``), with ``index``
  (uint32, rows of ``attribution.h5``), ``embedding/spectral`` (N_c x m, attribute
  ``eigenvalue``), ``embedding/<visualisation>`` (N_c x 2, e.g. ``tsne``), and the same
  clustering names in every class (ViRelAy lists the names of the first class only):

  - ``eigengap``: SpRAy's strategies (the clusters of the cluster count the eigengap chose),
    attributes ``k``, ``strategy_id`` and ``flagged`` per cluster;
  - ``flagged``: 1 for the members of a flagged (suspected Clever-Hans) strategy, else 0;
  - ``kmeans-02`` ... ``kmeans-<max_clusters>``: k-means on the spectral embedding for every
    other cluster count (as CoRelAy writes them), so other counts can be browsed;

  and, outside ViRelAy's keys, ``spray/`` with the per-sample and per-cluster scores, the
  prototypes, the strategy ids and, when the causal check ran, ``spray/evidence/`` (per cluster:
  region size, score drop, transfer rate, score rise, flagged, checked; per sample: suspicion
  and the tested member's region; the class's separation ratio);
* ``label-map.json`` and ``project.yaml``: the ViRelAy project over these files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..render import input_rgb
from .core import SpRAyResult

__all__ = ["write_virelay", "category_name", "clusterings", "TARGETS", "MIN_SIDE"]

# the callback's ``target`` -> ViRelAy's ``attribution_strategy``
TARGETS = {"label": "true_label", "prediction": "predicted_label"}

#: the shortest side, in pixels, of the pictures and heatmaps ViRelAy shows (see the module's doc)
MIN_SIDE = 8


def category_name(class_id: int) -> str:
    """The analysis group (and label-map key) of a class: its id as 8 digits."""
    return f"{int(class_id):08d}"


def _np(a) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().cpu().float().numpy() if a.is_floating_point() else a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(a)


def clusterings(result: SpRAyResult, ks: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    """The clusterings written for one class: ``eigengap``, ``flagged`` and ``kmeans-<K>`` per K.

    ``kmeans-<K>`` clusters the first K spectral dimensions (rows scaled to unit length when
    SpRAy does so), as SpRAy does for its own K; for the K SpRAy chose with k-means it is
    SpRAy's labelling itself. K larger than the samples or the spectral dimensions is capped.

    Args:
        result: SpRAy's result for the class.
        ks: the cluster counts of the k-means alternatives.
        seed: random state of k-means.
    """
    from .pipeline import _unit_rows, clustering

    flagged = np.isin(result.labels, np.flatnonzero(result.flagged)).astype(np.int32)
    out = {"eigengap": result.labels.astype(np.int32), "flagged": flagged}
    emb = result.spectral_embedding
    own = result.params.get("clustering", "kmeans") == "kmeans" and \
        result.params.get("cluster_dims") == result.n_clusters
    for k in ks:
        if own and k == result.n_clusters:
            out[f"kmeans-{k:02d}"] = result.labels.astype(np.int32)
            continue
        kk = max(1, min(int(k), emb.shape[1], emb.shape[0]))
        x = emb[:, :kk]
        x = _unit_rows(x) if result.params.get("normalize_rows", True) else x
        out[f"kmeans-{k:02d}"] = clustering(x, kk, "kmeans", seed=seed, n_init=3).astype(np.int32)
    return out


def write_virelay(directory, heatmaps, labels, results: Mapping[int, tuple[Sequence[int], SpRAyResult]], *,
                  inputs, predictions, indices=None, class_names: Mapping[int, str] | None = None,
                  strategy_ids: Mapping[int, Sequence[int]] | None = None, attribution_method: str = "relevance",
                  target: str = "label", ks: Sequence[int] | None = None,
                  project_name: str = "xai-callbacks SpRAy") -> dict[str, Path]:
    """Write the ViRelAy databases and project file for one SpRAy run.

    Args:
        directory: output folder (created).
        heatmaps: (N, C, H, W) or (N, H, W) relevance of all analysed samples.
        labels: (N,) class of each sample.
        results: class id -> (rows of ``heatmaps`` analysed for that class, its SpRAyResult).
        inputs: (N, C, H, W) model inputs of the same samples (ViRelAy needs a dataset).
        predictions: (N, classes) model scores (ViRelAy shows them beside each heatmap).
        indices: (N,) dataset index of each sample (default ``0..N-1``).
        class_names: optional class id -> readable name for the label map.
        strategy_ids: optional class id -> per-cluster strategy ids (from
            :class:`~xai_callbacks.spray.tracking.StrategyTracker`); default ``0..K-1``.
        attribution_method: the explainer's name, recorded in the project file.
        target: what was explained: ``"label"`` (true class) or ``"prediction"``; recorded as
            ViRelAy's ``attribution_strategy`` (``true_label`` / ``predicted_label``).
        ks: cluster counts of the ``kmeans-<K>`` alternatives (default: 2 to the largest
            ``max_clusters`` of the results).
        project_name: the project's name in ViRelAy.

    Returns:
        name -> path of each written file (``input``, ``attribution``, ``analysis``,
        ``label_map``, ``project``).

    Raises:
        ValueError: shapes that do not match (heatmaps, labels, inputs, predictions, rows of a
            class vs its SpRAy labels), or an unknown ``target``.
    """
    import h5py

    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    heatmaps = _np(heatmaps).astype(np.float32)
    labels = _np(labels).astype(np.uint32).reshape(-1)
    heatmaps = heatmaps[:, None] if heatmaps.ndim == 3 else heatmaps
    if heatmaps.ndim != 4 or len(labels) != len(heatmaps):
        raise ValueError(f"heatmaps must be (N, C, H, W) with one label each; got heatmaps {heatmaps.shape} "
                         f"and {len(labels)} labels")
    n, _, h, w = heatmaps.shape
    inputs = _np(inputs).astype(np.float32)
    inputs = inputs[:, None] if inputs.ndim == 3 else inputs
    if inputs.ndim != 4 or inputs.shape[0] != n or inputs.shape[2:] != (h, w):
        raise ValueError(f"inputs must be (N, C, H, W) like the heatmaps {heatmaps.shape}; got {inputs.shape}")
    predictions = _np(predictions).astype(np.float32)
    if predictions.ndim != 2 or len(predictions) != n:
        raise ValueError(f"predictions must be (N, classes) with N={n}; got {predictions.shape}")
    indices = np.arange(n, dtype=np.uint32) if indices is None else _np(indices).astype(np.uint32)
    for class_id, (rows, result) in results.items():
        if len(rows) != len(result.labels):
            raise ValueError(f"class {class_id}: {len(rows)} rows but {len(result.labels)} SpRAy labels")
    if ks is None:
        top = max([int(r.params.get("max_clusters", 10)) for _, r in results.values()] or [10])
        ks = range(2, top + 1)
    paths = {"input": out / "input.h5", "attribution": out / "attribution.h5", "analysis": out / "analysis.h5",
             "label_map": out / "label-map.json", "project": out / "project.yaml"}
    fh, fw = -(-MIN_SIDE // h), -(-MIN_SIDE // w)   # each side repeated to at least MIN_SIDE pixels

    def shown(a: np.ndarray, axis: int) -> np.ndarray:
        return a.repeat(fh, axis).repeat(fw, axis + 1)

    with h5py.File(paths["input"], "w") as f:
        f["data"] = shown(np.array([input_rgb(a) for a in inputs], np.uint8).reshape(n, h, w, 3), 1)
        f["label"] = labels
        f["input"] = inputs
    with h5py.File(paths["attribution"], "w") as f:
        three = heatmaps if heatmaps.shape[1] == 3 else np.repeat(heatmaps.sum(1, keepdims=True) / 3, 3, axis=1)
        f["attribution"] = shown(three, 2)
        f["relevance"] = heatmaps
        f["label"] = labels
        f["index"] = np.arange(n, dtype=np.uint32)
        f["dataset_index"] = indices
        f["prediction"] = predictions
    with h5py.File(paths["analysis"], "w") as f:
        for class_id, (rows, result) in results.items():
            _write_class(f, class_id, np.asarray(rows, dtype=np.uint32), result, class_names,
                         None if strategy_ids is None else strategy_ids.get(class_id), ks)
    classes = sorted({int(c) for c in np.unique(labels)} | {int(c) for c in results}
                     | set(range(predictions.shape[1])))
    label_map = [{"index": c, "word_net_id": category_name(c), "name": (class_names or {}).get(c, str(c))}
                 for c in classes]
    paths["label_map"].write_text(json.dumps(label_map, indent=2))
    paths["project"].write_text(
        f"project:\n  name: {json.dumps(project_name)}\n  model: model\n  label_map: label-map.json\n"
        f"  dataset:\n    name: inputs\n    type: hdf5\n    path: input.h5\n"
        f"    input_width: {w * fw}\n    input_height: {h * fh}\n    up_sampling_method: none\n"
        f"    down_sampling_method: none\n"
        f"  attributions:\n    attribution_method: {json.dumps(attribution_method)}\n"
        f"    attribution_strategy: {TARGETS[target]}\n    sources:\n      - attribution.h5\n"
        f"  analyses:\n    - analysis_method: spray\n      sources:\n        - analysis.h5\n")
    return paths


def _write_class(f, class_id: int, rows: np.ndarray, result: SpRAyResult, class_names, ids, ks) -> None:
    """One class's analysis group (see the module docstring)."""
    g = f.create_group(category_name(class_id))
    g.attrs["name"] = (class_names or {}).get(class_id, str(class_id))
    g["index"] = rows
    emb = g.create_group("embedding")
    emb["spectral"] = result.spectral_embedding.astype(np.float32)
    emb["spectral"].attrs["eigenvalue"] = result.eigenvalues.astype(np.float32)
    if result.embedding is not None:
        kind = str(result.params.get("visualisation") or "tsne")
        emb[kind] = result.embedding.astype(np.float32)
        emb[kind].attrs["embedding"] = "spectral"
        emb[kind].attrs["index"] = np.array([0, 1])
    ids = np.asarray(list(range(result.n_clusters)) if ids is None else ids, dtype=np.int64)
    cl = g.create_group("cluster", track_order=True)  # ViRelAy lists (and opens first) in this order
    for name, values in clusterings(result, ks, seed=int(result.params.get("seed", 0))).items():
        cl[name] = values
        cl[name].attrs["embedding"] = "spectral"
        cl[name].attrs["k"] = int(values.max()) + 1 if len(values) else 0
    cl["eigengap"].attrs["k"] = result.n_clusters
    cl["eigengap"].attrs["strategy_id"] = ids
    cl["eigengap"].attrs["flagged"] = result.flagged.astype(bool)
    cl["flagged"].attrs["k"] = 2
    s = g.create_group("spray")
    s["suspicion"] = result.suspicion.astype(np.float32)
    s["cluster_suspicion"] = result.cluster_suspicion.astype(np.float32)
    s["flagged"] = result.flagged.astype(bool)
    s["prototype"] = result.prototypes.astype(np.float32)
    s["strategy_id"] = ids
    for key, value in result.factors.items():
        value = np.asarray(value)
        if value.dtype.kind in "biuf":
            s[f"cluster_{key}"] = value.astype(np.float32)
    for key, value in result.mask_shares.items():
        s[f"{key}_share"] = value.astype(np.float32)
    s.attrs["params"] = json.dumps(result.params, default=str)
    evidence = getattr(result, "evidence", None)
    if evidence is not None:  # the causal check: per cluster, per sample, and each tested member's region
        e = s.create_group("evidence")
        for key, value in evidence.as_dict().items():
            value = np.asarray(value)
            e[key] = value.astype("S") if value.dtype.kind == "U" else value
        e["sample_suspicion"] = np.asarray(evidence.sample_suspicion, dtype=np.float32)
        e["region"] = _np(evidence.regions).astype(bool)
        e.attrs["params"] = json.dumps(getattr(evidence, "params", {}), default=str)
        e.attrs["separation_ratio"] = float(evidence.separation_ratio)
