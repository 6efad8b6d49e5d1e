"""Write SpRAy results in the ViRelAy database layout (HDF5), so ViRelAy can open them.

One directory per call holds:

* ``input.h5`` (optional): ``data`` float32 (N, C, H, W), ``label`` uint32 (N,);
* ``attribution.h5``: ``attribution`` float32 (N, C, H, W), ``label`` uint32 (N,),
  ``index`` uint32 (N,) (row in ``input.h5``: ``0..N-1``), ``dataset_index`` (the sample's index
  in the validation dataset), ``prediction`` float32 (N, classes) when given;
* ``analysis.h5``: one group per class, named by its 8-digit id (``00000003``), with ``index``
  (uint32, rows of ``attribution.h5``), ``embedding/spectral`` (N_c x m, attribute ``eigenvalue``),
  ``embedding/tsne`` (N_c x 2, attributes ``embedding="spectral"``, ``index``),
  ``cluster/<algorithm>-<K>`` (labels, attributes ``embedding``, ``k``, ``index``) and, outside
  ViRelAy's keys, ``spray/`` with the suspicion scores, prototypes and the strategy ids;
* ``label-map.json`` and ``project.yaml``: a ViRelAy project over these files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .core import SpRAyResult

__all__ = ["write_virelay", "category_name"]


def category_name(class_id: int) -> str:
    """The analysis group (and label-map key) of a class: its id as 8 digits."""
    return f"{int(class_id):08d}"


def _np(a) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(a)


def write_virelay(directory, heatmaps, labels, results: Mapping[int, tuple[Sequence[int], SpRAyResult]], *,
                  indices=None, inputs=None, predictions=None, class_names: Mapping[int, str] | None = None,
                  strategy_ids: Mapping[int, Sequence[int]] | None = None, attribution_method: str = "relevance",
                  project_name: str = "xai-callbacks SpRAy") -> dict[str, Path]:
    """Write the ViRelAy databases and project file for one SpRAy run.

    Args:
        directory: output folder (created).
        heatmaps: (N, C, H, W) relevance of all analysed samples.
        labels: (N,) class of each sample.
        results: class id -> (rows of ``heatmaps`` analysed for that class, its SpRAyResult).
        indices: (N,) dataset index of each sample (default ``0..N-1``).
        inputs: optional (N, C, H, W) model inputs; written to ``input.h5``.
        predictions: optional (N, classes) model scores.
        class_names: optional class id -> readable name for the label map.
        strategy_ids: optional class id -> per-cluster strategy ids (from
            :class:`~xai_callbacks.spray.tracking.StrategyTracker`), stored under ``spray/``.
        attribution_method: the explainer's name, recorded in the project file.
        project_name: the project's name in ViRelAy.

    Returns:
        name -> path of each written file.
    """
    import h5py

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    heatmaps = _np(heatmaps).astype(np.float32)
    labels = _np(labels).astype(np.uint32)
    if heatmaps.ndim == 3:
        heatmaps = heatmaps[:, None]
    if heatmaps.ndim != 4 or len(labels) != len(heatmaps):
        raise ValueError(f"heatmaps must be (N, C, H, W) with one label each; got heatmaps {heatmaps.shape} "
                         f"and {len(labels)} labels")
    n = len(heatmaps)
    indices = np.arange(n, dtype=np.uint32) if indices is None else _np(indices).astype(np.uint32)
    paths = {"attribution": out / "attribution.h5", "analysis": out / "analysis.h5",
             "label_map": out / "label-map.json", "project": out / "project.yaml"}
    with h5py.File(paths["attribution"], "w") as f:
        f["attribution"] = heatmaps
        f["label"] = labels
        f["index"] = np.arange(n, dtype=np.uint32)
        f["dataset_index"] = indices
        if predictions is not None:
            f["prediction"] = _np(predictions).astype(np.float32)
    if inputs is not None:
        paths["input"] = out / "input.h5"
        data = _np(inputs).astype(np.float32)
        with h5py.File(paths["input"], "w") as f:
            f["data"] = data
            f["label"] = labels
    with h5py.File(paths["analysis"], "w") as f:
        for class_id, (rows, result) in results.items():
            rows = np.asarray(rows, dtype=np.uint32)
            if len(rows) != len(result.labels):
                raise ValueError(f"class {class_id}: {len(rows)} rows but {len(result.labels)} SpRAy labels")
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
            cl = g.create_group("cluster")
            name = f"{result.params.get('clustering', 'kmeans')}-{result.n_clusters:02d}"
            cl[name] = result.labels.astype(np.int32)
            cl[name].attrs["embedding"] = "spectral"
            cl[name].attrs["k"] = result.n_clusters
            cl[name].attrs["index"] = np.arange(int(result.params.get("cluster_dims", 1)), dtype=np.uint32)
            s = g.create_group("spray")
            s["suspicion"] = result.suspicion.astype(np.float32)
            s["cluster_suspicion"] = result.cluster_suspicion.astype(np.float32)
            s["flagged"] = result.flagged.astype(bool)
            s["prototype"] = result.prototypes.astype(np.float32)
            for key, value in result.mask_shares.items():
                s[f"{key}_share"] = value.astype(np.float32)
            if strategy_ids is not None and class_id in strategy_ids:
                s["strategy_id"] = np.asarray(strategy_ids[class_id], dtype=np.int64)
            s.attrs["params"] = json.dumps(result.params, default=str)
    classes = sorted({int(c) for c in np.unique(labels)} | {int(c) for c in results})
    label_map = [{"index": c, "word_net_id": category_name(c), "name": (class_names or {}).get(c, str(c))}
                 for c in classes]
    paths["label_map"].write_text(json.dumps(label_map, indent=2))
    dataset = ""
    if inputs is not None:
        dataset = (f"  dataset:\n    name: inputs\n    type: hdf5\n    path: input.h5\n"
                   f"    input_width: {heatmaps.shape[3]}\n    input_height: {heatmaps.shape[2]}\n"
                   f"    up_sampling_method: none\n    down_sampling_method: none\n")
    paths["project"].write_text(
        f"project:\n  name: {json.dumps(project_name)}\n  model: model\n  label_map: label-map.json\n{dataset}"
        f"  attributions:\n    attribution_method: {json.dumps(attribution_method)}\n"
        f"    attribution_strategy: true_label\n    sources:\n      - attribution.h5\n"
        f"  analyses:\n    - analysis_method: spray\n      sources:\n        - analysis.h5\n")
    return paths
