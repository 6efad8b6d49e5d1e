"""Concept relevance: conservation at the concept layer, conditional heatmaps that add up to the
LRP heatmap, top concepts and reference samples, and the guard."""
from __future__ import annotations

import torch
from torch import nn

from xai_callbacks.attribution import explain
from xai_callbacks.concepts import concept_relevance, conditional_heatmaps, reference_samples, top_concepts
from xai_callbacks.guard import hook_count
from xai_callbacks.models import DemoCNN


def bias_free_cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5, bias=False)).eval()


def test_concept_relevances_and_conditional_heatmaps_conserve_the_logit():
    """Bias-free ReLU net, conserving rules: the channel relevances at the layer sum to the target
    logit, and each channel's conditional heatmap sums to that channel's relevance."""
    model, x = bias_free_cnn(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    res = concept_relevance(model, x, y, layer="2")
    logit = model(x).gather(1, y[:, None])[:, 0].detach()
    assert res.relevance.shape == (4, 8)
    torch.testing.assert_close(res.relevance.sum(1), logit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.heatmap, explain(model, x, y, method="lrp.epsilon_plus_flat"))
    heat = conditional_heatmaps(model, x, y, "2", torch.arange(8))
    assert heat.shape == (4, 8, 1, 8, 8)
    torch.testing.assert_close(heat.flatten(2).sum(2), res.relevance, rtol=1e-4, atol=1e-5)


def test_conditional_heatmaps_of_all_channels_add_up_to_the_heatmap_on_the_demo_cnn():
    torch.manual_seed(0)
    model = DemoCNN(width=8).train()
    x, y = torch.rand(3, 1, 32, 32), torch.tensor([1, 5, 9])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = concept_relevance(model, x, y, layer="features.4")
    heat = conditional_heatmaps(model, x, y, "features.4", torch.arange(res.relevance.shape[1]))
    torch.testing.assert_close(heat.sum(1), res.heatmap, rtol=1e-4, atol=1e-4 * float(res.heatmap.abs().max()))
    assert model.training and hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_top_concepts_and_reference_samples():
    rel = torch.tensor([[0.0, 5.0, 1.0], [0.0, 4.0, 2.0], [3.0, 0.0, 2.0], [9.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    top = top_concepts(rel, labels, k=2)
    assert top[0].tolist() == [1, 2] and top[1].tolist() == [0, 2]
    assert reference_samples(rel, torch.tensor([0, 1]), n=2).tolist() == [[3, 2], [0, 1]]


def test_errors_name_what_is_valid():
    model, x = bias_free_cnn(), torch.randn(2, 1, 8, 8)
    import pytest

    with pytest.raises(ValueError, match=r"concept layer 'conv9' not found.*module names"):
        concept_relevance(model, x, 0, layer="conv9")
    with pytest.raises(ValueError, match=r"channels must be in 0\.\.7"):
        conditional_heatmaps(model, x, 0, "2", torch.tensor([8]))


def test_callback_logs_top_concepts_per_class_in_a_trainer(tmp_path):
    import lightning.pytorch as pl

    from conftest import make_trainer
    from xai_callbacks import ConceptRelevanceCallback
    from xai_callbacks.data import ShortcutDigitsDataModule
    from xai_callbacks.models import Classifier

    pl.seed_everything(0, verbose=False)
    module = Classifier(DemoCNN(width=8))
    cb = ConceptRelevanceCallback(layer="model.features.4", n_concepts=2, n_references=3, probe_size=20)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, ShortcutDigitsDataModule(batch_size=32))
    assert cb.errors == 0 and cb.relevance.shape == (20, 16)
    assert sorted(cb.concepts) == list(range(10)) and all(len(ch) == 2 for ch in cb.concepts.values())
    pngs = sorted((tmp_path).rglob("*.png"))
    assert any("concepts" in str(p) for p in pngs) and hook_count(module) == 0
