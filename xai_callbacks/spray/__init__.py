"""SpRAy (spectral relevance analysis): find a class's prediction strategies by clustering heatmaps.

>>> from xai_callbacks.spray import spray
>>> result = spray(heatmaps_of_one_class, k=5)     # (N, C, H, W) relevance
>>> len(result.labels) == len(heatmaps_of_one_class), len(result.flagged) == result.n_clusters
(True, True)

The steps are named as in Lapuschkin et al. (2019) and CoRelAy (:mod:`.pipeline`); the
suspicion scores are in :mod:`.suspicion`, cluster matching across epochs in :mod:`.tracking`,
the ViRelAy database export in :mod:`.virelay`, and what the callback reports about a class
(usable rows, scalars, tables, captions) in :mod:`.report`. No Lightning, no W&B here.
"""
from .core import SpRAyResult, spray
from .pipeline import (affinity, check_heatmaps, clustering, eigengap, knn, laplacian, preprocess, prototypes,
                       spectral_embedding, visualisation_embedding)
from .tracking import StrategyTracker, prototype_similarity
from .virelay import write_virelay
from .suspicion import cluster_suspicion, mask_shares, relevance_distribution, sample_suspicion

__all__ = ["spray", "SpRAyResult", "preprocess", "affinity", "knn", "laplacian", "spectral_embedding", "eigengap",
           "clustering", "visualisation_embedding", "prototypes", "check_heatmaps", "relevance_distribution",
           "sample_suspicion", "cluster_suspicion", "mask_shares", "StrategyTracker", "prototype_similarity",
           "write_virelay"]
