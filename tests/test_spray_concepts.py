"""Concept-space SpRAy: clustering concept relevances separates strategies that pixel heatmaps mix.

The synthetic case: a two-channel input and a model whose concept layer copies each input channel
into its own concept. Sample pairs ("twins") carry the same blob at the same place with the same
strength, one twin in input channel 0, the other in channel 1. Their channel-summed LRP heatmaps
are identical, so pixel-space SpRAy cannot tell the two groups apart; their concept relevances sit
on different channels, so concept-space SpRAy must.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from xai_callbacks.attribution import explain
from xai_callbacks.concepts import concept_relevance
from xai_callbacks.spray import spray


def twin_model() -> nn.Module:
    concept = nn.Conv2d(2, 2, 1, bias=False)  # concept c = input channel c
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        concept.weight.copy_(torch.eye(2)[:, :, None, None])
        head.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    return nn.Sequential(concept, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval()


def twins(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(2n, 2, 8, 8) inputs and their group (0: blob in channel 0, 1: the twin in channel 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(2 * n, 2, 8, 8)
    for i in range(n):
        r, c = torch.randint(0, 7, (2,), generator=g).tolist()
        value = 0.5 + float(torch.rand(1, generator=g))
        x[2 * i, 0, r:r + 2, c:c + 2] = value
        x[2 * i + 1, 1, r:r + 2, c:c + 2] = value
    return x, torch.arange(2 * n) % 2


def purities(labels: np.ndarray, group: np.ndarray) -> list[float]:
    """Per cluster, the share of its larger group."""
    return [max(group[labels == j].mean(), 1 - group[labels == j].mean()) for j in np.unique(labels)]


def test_concept_space_separates_what_pixel_space_cannot():
    model, (x, group) = twin_model(), twins()
    y = torch.zeros(len(x), dtype=torch.long)
    heat = explain(model, x, y, method="lrp.epsilon_plus_flat")
    assert torch.equal(heat.sum(1)[0::2], heat.sum(1)[1::2])  # pixel space: the twins are identical
    rel = concept_relevance(model, x, y, layer="0").relevance
    group = group.numpy()
    pixel = spray(heat, visualisation=None)
    assert max(purities(pixel.labels, group)) < 0.6  # every pixel-space cluster mixes the groups
    concepts = spray(heat, features=rel, visualisation=None)
    assert concepts.n_clusters == 2 and purities(concepts.labels, group) == [1.0, 1.0]
    # signatures: each cluster's mean concept distribution, all on its own channel
    np.testing.assert_allclose(np.sort(concepts.signatures, axis=1), [[0.0, 1.0], [0.0, 1.0]])
    assert concepts.prototypes.shape == (2,) + heat.shape[1:]  # prototypes stay heatmaps
    assert concepts.params["features"] == "given (2 dims)" and pixel.params["features"] == "heatmaps"


def test_spray_rejects_unusable_features():
    heat = torch.rand(12, 1, 4, 4)
    with pytest.raises(ValueError, match=r"one row per heatmap \(N=12\)"):
        spray(heat, features=torch.rand(11, 3))
    rows = torch.rand(12, 3)
    rows[4] = 0
    rows[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"2 feature row\(s\) contain NaN / inf or are all zero \(indices \[4, 7\]"):
        spray(heat, features=rows)


def test_callback_clusters_concepts_in_a_trainer_and_writes_virelay(tmp_path):
    import h5py
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from conftest import make_trainer
    from xai_callbacks.callbacks.spray import SpRAyCallback
    from xai_callbacks.models import Classifier

    x, group = twins()
    data = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    results = {}
    for features in ("heatmaps", "concepts"):
        pl.seed_everything(0, verbose=False)
        cb = SpRAyCallback(classes=[0], max_per_class=len(x), evidence=False, features=features,
                           concept_layer="model.0" if features == "concepts" else None,
                           spray_options={"visualisation": None}, on_error="raise")
        make_trainer(tmp_path / features, [cb]).validate(Classifier(twin_model()), DataLoader(data, batch_size=16),
                                                         verbose=False)
        groups = group.numpy()[np.array(cb.sample_indices)]
        results[features] = purities(cb.results[0].labels, groups)
    assert max(results["heatmaps"]) < 0.6 and results["concepts"] == [1.0, 1.0]
    analysis = next((tmp_path / "concepts").rglob("analysis.h5"))
    with h5py.File(analysis) as f:
        assert len(set(f["00000000/cluster/eigengap"][()].tolist())) == 2
        assert "concepts of model.0 (2 channels)" in f["00000000/spray"].attrs["params"]


def test_bad_concept_options_name_what_is_valid(tmp_path):
    from torch.utils.data import DataLoader

    from conftest import make_trainer
    from xai_callbacks.callbacks.spray import SpRAyCallback
    from xai_callbacks.models import Classifier

    with pytest.raises(ValueError, match=r"features must be one of \('heatmaps', 'concepts'\), got 'channels'"):
        SpRAyCallback(features="channels")
    with pytest.raises(ValueError, match=r"features='concepts' needs concept_layer"):
        SpRAyCallback(features="concepts")
    with pytest.raises(ValueError, match=r"target='label' or 'prediction', not a target function"):
        SpRAyCallback(features="concepts", concept_layer="model.0", target=lambda out, batch: out[:, 0])
    with pytest.raises(ValueError, match=r"unknown spray_options \['features'\]"):
        SpRAyCallback(spray_options={"features": np.zeros((3, 2))})
    cb = SpRAyCallback(features="concepts", concept_layer="model.conv9", max_per_class=4, evidence=False)
    x, _ = twins(n=4)
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match=r"concept layer 'model.conv9' not found.*'model.0'"):
        make_trainer(tmp_path, [cb]).validate(Classifier(twin_model()), loader, verbose=False)
