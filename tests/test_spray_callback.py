"""SpRAyCallback in real Trainers: the demo's watermark is found, clean data flags nothing,
W&B read-back, ViRelAy files, strategy ids across epochs, bad input never stops training."""
from __future__ import annotations

import os
import warnings

import h5py
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import make_trainer
from xai_callbacks.callbacks.gate import ExplanationGate
from xai_callbacks.callbacks.spray import SpRAyCallback, select_per_class
from xai_callbacks.cli import main
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN
from wandb_records import history

EPOCHS = 3


def small_module(seed=0):
    torch.manual_seed(seed)
    return Classifier(DemoCNN(width=8), lr=3e-3)


@pytest.fixture(scope="module")
def artifact_run(tmp_path_factory):
    """The demo: 25% of class 0 carry a watermark; SpRAy on classes 0 and 1 every epoch, W&B offline."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    tmp = tmp_path_factory.mktemp("spray_artifact")
    logger = WandbLogger(project="xai-callbacks-tests", save_dir=str(tmp), offline=True)
    cb = SpRAyCallback(classes=[0, 1], max_per_class=60, every_n_epochs=1)
    gate = ExplanationGate(action="warn")  # the default rule: no SpRAy cluster flagged
    dm = ShortcutDigitsDataModule(ambiguity=0.3)
    trainer = make_trainer(tmp, [cb, gate], logger=logger, max_epochs=EPOCHS)
    trainer.fit(small_module(), dm)
    assert gate.passed is False  # the default rule fails on the watermarked class
    run = os.path.dirname(logger.experiment.dir)
    wandb.finish()
    return cb, dm, run


def watermark_truth(cb, dm, class_id=0):
    idx = np.array(cb.sample_indices)
    labels = dm.val_set.targets.numpy()[idx]
    return dm.val_set.has_artifact.numpy()[idx][labels == class_id]


def test_demo_watermark_is_one_flagged_cluster_and_suspicion_ranks_it(artifact_run):
    cb, dm, _ = artifact_run
    has = watermark_truth(cb, dm)
    r = cb.results[0]
    assert has.sum() >= 10 and len(has) == len(r.labels)
    jaccard = [(has & (r.labels == c)).sum() / (has | (r.labels == c)).sum() for c in range(r.n_clusters)]
    best = int(np.argmax(jaccard))
    members = r.labels == best
    assert (has & members).sum() / members.sum() >= 0.9, "purity"
    assert (has & members).sum() / has.sum() >= 0.9, "recall"
    assert roc_auc_score(has, r.suspicion) >= 0.95
    # the causal check confirms it: the watermark pasted into ones raises their class-0 probability
    # far more than the typical zero's region does
    assert r.evidence is not None and r.evidence.forward_passes > 0
    assert np.median(r.evidence.sample_suspicion[members]) >= 2.0 > r.evidence.z[np.arange(r.n_clusters) != best].max()
    assert r.flagged[best]
    assert not np.delete(r.flagged, best).any(), "a cluster without the watermark was flagged"
    assert not cb.results[1].flagged.any()
    # masks from the batch: the flagged strategy's relevance sits on the artifact, the rest's does not
    assert r.cluster_mask_shares["artifact"][best] > 0.02 > np.delete(r.cluster_mask_shares["artifact"], best).max()


def test_strategy_keeps_its_id_across_epochs(artifact_run):
    cb, _, _ = artifact_run
    r, ids = cb.results[0], cb.strategy_ids[0]
    # the zeros' main strategy (the digit) is matched at every epoch and keeps its id
    main_id = ids[int(np.argmax(r.cluster_sizes))]
    history_of = cb.trackers[0].history[main_id]
    assert sorted(history_of) == list(range(EPOCHS)), "the main strategy was not matched across epochs"
    assert history_of[EPOCHS - 1] == pytest.approx(r.factors["share"][ids.index(main_id)])
    # the watermark strategy got an id of its own
    flagged_id = ids[int(np.flatnonzero(r.flagged)[0])]
    assert flagged_id != main_id and EPOCHS - 1 in cb.trackers[0].history[flagged_id]


def test_wandb_run_has_spray_scalars_plots_tables_images(artifact_run):
    _, _, run = artifact_run
    rows = history(run)

    def logged(key, kind=None):
        return [r for r in rows if key in r or (kind and r.get(f"{key}/_type") == kind)]

    for key in ("spray/0/n_clusters", "spray/0/max_suspicion", "spray/1/n_clusters", "spray/suspicious_share",
                "spray/0/n_flagged", "spray/0/transfer_rate", "spray/0/score_drop", "spray/0/region_size",
                "spray/0/forward_passes", "spray/0/separation_ratio", "spray/1/separation_ratio"):
        assert len([r for r in rows if key in r]) == EPOCHS, key
    # logged in the background, each with the epoch it belongs to (an ``epoch`` value, not a W&B step)
    assert [r["epoch"] for r in rows if "spray/0/max_suspicion" in r] == list(range(EPOCHS))
    assert [r["epoch"] for r in rows if r.get("spray/0/clusters/_type") == "table-file"] == list(range(EPOCHS))
    last = [r for r in rows if "spray/0/max_suspicion" in r][-1]
    assert last["spray/0/n_flagged"] == 1 and 0 < last["spray/suspicious_share"] < 0.5
    assert last["spray/0/separation_ratio"] >= 1 > last["spray/1/separation_ratio"]
    # the 5x5 checker is confirmed by its region of a thirty-second of the input (32 of 1024 pixels)
    assert last["spray/0/region_size"] == 1 / 32
    for cls in ("0", "1"):
        assert len(logged(f"spray/{cls}/clusters", "table-file")) == EPOCHS
        assert len(logged(f"spray/{cls}/embedding", "table-file")) == EPOCHS
        assert len(logged(f"spray/{cls}/prototypes", "images/separated")) == EPOCHS
        assert len(logged(f"spray/{cls}/scatter", "images/separated")) == EPOCHS
        assert len(logged(f"spray/{cls}/evidence", "images/separated")) == EPOCHS
        # the spectrum as a W&B chart; the picture of it is for runs without W&B
        assert len([r for r in rows if any(k.startswith(f"spray/{cls}/eigenvalues") for k in r)]) == EPOCHS
        assert not logged(f"spray/{cls}/spectrum", "images/separated")
        assert len([r for r in rows if any(k.startswith(f"spray/{cls}/strategy_share") for k in r)]) == EPOCHS
    assert [r["xai/errors"] for r in rows if "xai/errors" in r] == [0] * EPOCHS


def test_virelay_databases_written_each_epoch(artifact_run):
    cb, _, run = artifact_run
    for epoch in range(EPOCHS):
        folder = os.path.join(run, "spray", f"epoch_{epoch:04d}")
        with h5py.File(os.path.join(folder, "analysis.h5")) as f:
            assert sorted(f) == ["00000000", "00000001"]
            g = f["00000000"]
            n = len(g["index"])
            assert g["embedding/spectral"].shape[0] == n and g["embedding/tsne"].shape == (n, 2)
            assert list(g["cluster"])[:3] == ["eigengap", "flagged", "kmeans-02"]
            assert g["cluster/eigengap"].shape == (n,)
        with h5py.File(os.path.join(folder, "attribution.h5")) as f:
            assert f["relevance"].shape == (len(cb.sample_indices), 1, 32, 32)
            assert sorted(f["dataset_index"][:].tolist()) == cb.sample_indices
        assert os.path.exists(os.path.join(folder, "input.h5")) and os.path.exists(os.path.join(folder, "project.yaml"))


def test_state_dict_round_trip(artifact_run):
    cb, _, _ = artifact_run
    clone = SpRAyCallback(classes=[0, 1], max_per_class=60, every_n_epochs=1)
    clone.load_state_dict(cb.state_dict())
    assert clone.sample_indices == cb.sample_indices
    assert clone.trackers[0].history == cb.trackers[0].history and clone.trackers[0].next_id == cb.trackers[0].next_id


def test_clean_data_flags_no_cluster(tmp_path):
    """The same demo without the watermark: train as above, then one SpRAy pass over all classes."""
    dm, module = ShortcutDigitsDataModule(artifact_class=None), small_module()
    make_trainer(tmp_path, max_epochs=EPOCHS).fit(module, dm)
    cb = SpRAyCallback(max_per_class=60, spray_options={"visualisation": None}, save_virelay=False)
    gate = ExplanationGate(action="raise")
    trainer = make_trainer(tmp_path, [cb, gate])
    trainer.validate(module, dm)
    assert sorted(cb.results) == list(range(10))
    for c, r in cb.results.items():
        assert r.n_clusters >= 2 and not r.flagged.any(), f"class {c}: cluster suspicion {r.cluster_suspicion}"
    assert trainer.callback_metrics["spray/suspicious_share"] == 0
    # without W&B the spectrum of each class is a picture with the gap marked
    assert {p.parent.name for p in tmp_path.rglob("media/*/*.png")} >= {f"spray__{c}__spectrum" for c in range(10)}
    # the default gate passes, in the run and in CI
    assert gate.passed is True and len(gate.epochs[-1]["checks"]) == 10
    assert main(["gate", str(tmp_path)]) == 0


def test_default_gate_fails_the_shortcut_demo_naming_class_and_strategy(artifact_run, capsys):
    cb, _, run = artifact_run
    assert main(["gate", run]) == 1
    out = capsys.readouterr().out
    flagged = cb.strategy_ids[0][int(np.flatnonzero(cb.results[0].flagged)[0])]
    assert f"class 0, strategy {flagged}: n_flagged = 1" in out  # the flagged cluster, by its strategy id
    assert f"suspicious_strategy={flagged}" in out
    assert "spray/1/n_flagged" in out and "class 1," not in out


def test_too_few_and_constant_heatmaps_warn_count_and_training_goes_on(tmp_path):
    cb = SpRAyCallback(classes=[0, 1], max_per_class=8, save_virelay=False)  # k = 10 needs > 10 per class
    gate = ExplanationGate(rules=["spray/classes_skipped < 1"], action="warn")   # the classes not checked
    trainer = make_trainer(tmp_path, [cb, gate], max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"class 0: 8 usable heatmap\(s\), SpRAy with k=10 needs more than 10"):
        trainer.fit(small_module(), ShortcutDigitsDataModule())
    assert cb.errors == 2 and trainer.current_epoch == 1 and cb.results == {}
    assert float(trainer.callback_metrics["spray/classes_skipped"]) == 2 and gate.passed is False
    # a model whose scores do not depend on the input: constant (zero) saliency maps
    module = small_module()
    torch.nn.init.zeros_(module.model.head[-1].weight)
    cb = SpRAyCallback(method="saliency", classes=[3], max_per_class=20, save_virelay=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb]).validate(module, ShortcutDigitsDataModule())
    text = " ".join(str(w.message) for w in caught)
    assert "class 3: 20 heatmap(s) are NaN / inf or constant and were left out" in text and cb.errors == 3
    assert "the model gives all 20 analysed samples the same output" in text   # its logits are its bias
    # none usable: the advice names the unusable heatmaps
    assert "class 3: 0 usable heatmap(s), SpRAy with k=10 needs more than 10; skipped (raise max_per_class or " \
           "lower spray_options['k']; for the NaN / constant ones try another method" in text


def test_bad_arguments_and_sample_selection():
    with pytest.raises(ValueError, match="unknown spray_options"):
        SpRAyCallback(spray_options={"kk": 3})
    with pytest.raises(ValueError, match="unknown attribution method"):
        SpRAyCallback(method="nope")
    with pytest.raises(ValueError, match=r"unknown attribution method\(s\) \['grad'\]; valid: .*'input_x_gradient'"):
        SpRAyCallback(evidence_regions="grad")
    lrp = "lrp.epsilon_plus_flat"
    assert SpRAyCallback(method=lrp).explained_methods == (lrp, "input_x_gradient")
    assert SpRAyCallback(method=lrp, evidence=False).explained_methods == (lrp,)
    assert SpRAyCallback(method="input_x_gradient").explained_methods == ("input_x_gradient",)   # once
    _, val = ShortcutDigitsDataModule(), None
    from xai_callbacks.data import make_shortcut_digits

    _, val = make_shortcut_digits()
    picked = select_per_class(val, [0, 5], 7, seed=1)
    assert picked == select_per_class(val, [0, 5], 7, seed=1) != select_per_class(val, [0, 5], 7, seed=2)
    assert sorted(np.bincount(val.targets.numpy()[picked], minlength=10)[[0, 5]].tolist()) == [7, 7]


def test_tabular_rows_and_token_ids_are_analysed_as_one_channel_signals(tmp_path):
    """(N, F) rows: a linear model at the defaults, two planted strategies in class 0 (its
    evidence on feature 2 or on feature 9); token ids (N, L): a small text transformer at the
    defaults. The causal check runs on the rows with ROW_EVIDENCE: the two strategies of class 0
    carry it alike, so neither stands apart and nothing is confirmed."""
    from torch.utils.data import DataLoader, TensorDataset

    from test_architectures import TextTransformer

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(48, 12, generator=gen) * 0.1
    y = torch.arange(48) % 2
    x[0:48:4, 2] += 1.0                      # half of class 0: feature 2
    x[2:48:4, 9] += 1.0                      # the other half: feature 9
    x[1::2, 5] += 1.0                        # class 1: feature 5
    linear = torch.nn.Linear(12, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.ones(12), -torch.ones(12)]))
        linear.weight[1, 5] = 3.0
    cb = SpRAyCallback(max_per_class=24, save_virelay=False, on_error="raise")   # the model's LRP: lrp.epsilon_plus
    make_trainer(tmp_path, [cb]).validate(Classifier(linear), DataLoader(TensorDataset(x, y), 16), verbose=False)
    r = cb.results[0]
    assert cb.method == "lrp.epsilon_plus" and not r.flagged.any()
    assert set(r.evidence.component) == {"region"}   # the one component of ROW_EVIDENCE
    assert r.n_clusters == 2 and r.prototypes.shape[1:] == (1, 1, 12)
    idx = np.array(cb.sample_indices)
    first = (x[idx[y[idx].numpy() == 0], 2] > 0.5).numpy()   # class 0's rows in the analysed order
    assert {frozenset(r.labels[first]), frozenset(r.labels[~first])} == {frozenset({0}), frozenset({1})}
    tokens = torch.randint(0, 50, (48, 10), generator=gen)
    cb = SpRAyCallback(max_per_class=24, save_virelay=False, on_error="raise")
    make_trainer(tmp_path, [cb]).validate(Classifier(TextTransformer()), DataLoader(TensorDataset(tokens, y), 16),
                                          verbose=False)
    assert cb.method == "lrp.attn" and sorted(cb.results) == [0, 1] and cb.errors == 0
    assert all(set(r.evidence.component) == {"region"} for r in cb.results.values())
    assert cb.results[1].prototypes.shape[1:] == (1, 1, 10) and np.isfinite(cb.results[1].prototypes).all()
