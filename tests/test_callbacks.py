"""AttributionCallback in real Trainers: W&B read-back, do-no-harm, probe set, schedule, errors."""
from __future__ import annotations

import glob
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from conftest import make_trainer
from xai_callbacks import AttributionCallback
from xai_callbacks.callbacks.base import select_probe
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN
from wandb_records import finish_run, history


def small_module(seed=0):
    torch.manual_seed(seed)
    return Classifier(DemoCNN(width=8), lr=3e-3)


def test_wandb_run_has_heatmap_panel_and_table_every_epoch(tmp_path, wandb_logger):
    methods = ["saliency", "lrp.epsilon_plus_flat"]
    cb = AttributionCallback(methods=methods, probe_size=20, n_images=6)
    trainer = make_trainer(tmp_path, [cb], logger=wandb_logger, max_epochs=2, limit_train_batches=4)
    trainer.fit(small_module(), ShortcutDigitsDataModule())
    run = os.path.dirname(wandb_logger.experiment.dir)
    finish_run()
    rows = history(run)
    for method in methods:
        panels = [r for r in rows if r.get(f"xai/heatmaps/{method}/_type") == "images/separated"]
        assert len(panels) == 2, f"{method}: one panel per epoch expected, got {len(panels)}"
        for p in panels:
            assert p[f"xai/heatmaps/{method}/count"] == 6
            assert len(p[f"xai/heatmaps/{method}/captions"]) == 6
            assert p[f"xai/heatmaps/{method}/captions"][0].startswith("#")
            for name in p[f"xai/heatmaps/{method}/filenames"]:
                assert os.path.exists(os.path.join(run, "files", name))
    tables = [r for r in rows if r.get("xai/heatmap_table/_type") == "table-file"]
    assert [t["xai/heatmap_table/nrows"] for t in tables] == [12, 12]
    assert [r["xai/errors"] for r in rows if "xai/errors" in r] == [0, 0]
    for epoch in (0, 1):
        saved = np.load(os.path.join(run, "xai", "heatmaps", f"epoch_{epoch:04d}.npz"))
        assert saved["saliency"].shape == (20, 1, 32, 32) and np.isfinite(saved["saliency"]).all()
        assert sorted(saved["indices"].tolist()) == sorted(cb.probe_indices)


ALL_CHEAP = {"saliency": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 4},
             "smoothgrad": {"n_samples": 3}, "guided_backprop": {}, "gradcam": {},
             "lrp.epsilon_plus_flat": {}, "lrp.epsilon_gamma_box": {}, "lrp.epsilon_alpha2_beta1": {},
             "occlusion": {"window": 8}, "rise": {"n_masks": 16}}


def _train(tmp_path, callbacks):
    pl.seed_everything(123, verbose=False)
    module = small_module(seed=123)
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=6, num_sanity_val_steps=2)
    trainer.fit(module, ShortcutDigitsDataModule(batch_size=32))
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    """The do-no-harm contract: BN, Dropout, in-place ReLU, a residual block, shuffled data."""
    without = _train(tmp_path / "a", [])
    cb = AttributionCallback(methods=list(ALL_CHEAP), method_options=ALL_CHEAP, probe_size=10, save_heatmaps=False)
    with_cb = _train(tmp_path / "b", [cb])
    assert cb.errors == 0 and set(cb.heatmaps) == set(ALL_CHEAP)
    assert without.keys() == with_cb.keys()
    for key in without:
        assert torch.equal(without[key], with_cb[key]), f"{key} differs"


def test_probe_set_is_stratified_and_survives_resume(tmp_path, digits):
    _, val = digits
    idx = select_probe(val, 30, seed=0)
    assert np.bincount(val.targets[idx].numpy(), minlength=10).tolist() == [3] * 10
    assert select_probe(val, 30, seed=0) == idx and select_probe(val, 30, seed=1) != idx

    cb = AttributionCallback(methods="saliency", probe_size=30, save_heatmaps=False)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, enable_checkpointing=True)
    trainer.fit(small_module(), ShortcutDigitsDataModule())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["callbacks"][cb.state_key]["probe_indices"] == cb.probe_indices

    resumed = AttributionCallback(methods="saliency", probe_size=30, seed=99, save_heatmaps=False)
    trainer = make_trainer(tmp_path, [resumed], max_epochs=2, limit_train_batches=2)
    trainer.fit(small_module(), ShortcutDigitsDataModule(), ckpt_path=str(ckpt))
    assert resumed.probe_indices == cb.probe_indices  # restored, not redrawn with the new seed


def test_validate_runs_under_inference_mode_and_sanity_check_is_skipped(tmp_path):
    calls = []

    class Counting(AttributionCallback):
        def run(self, trainer, pl_module):
            calls.append((trainer.sanity_checking, torch.is_inference_mode_enabled()))
            super().run(trainer, pl_module)

    cb = Counting(methods=["integrated_gradients", "lrp.epsilon_gamma_box"], probe_size=12, save_heatmaps=False)
    trainer = make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=2, num_sanity_val_steps=2)
    module, dm = small_module(), ShortcutDigitsDataModule()
    trainer.fit(module, dm)
    assert calls == [(False, False)]
    trainer.validate(module, dm, verbose=False)
    assert calls[-1] == (False, True)
    assert cb.errors == 0
    assert all(torch.isfinite(h).all() and h.abs().sum() > 0 for h in cb.heatmaps.values())


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_failures_warn_and_count_or_raise(tmp_path):
    cb = AttributionCallback(methods=["gradcam"], probe_size=10)  # an MLP has no conv layer
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2)
    with pytest.warns(UserWarning, match="gradcam needs a convolution layer"):
        trainer.fit(MLP(), ShortcutDigitsDataModule())
    assert trainer.current_epoch == 2 and cb.errors == 2

    cb = AttributionCallback(methods=["gradcam"], probe_size=10, on_error="raise")
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=2)
    with pytest.raises(ValueError, match="gradcam needs a convolution layer"):
        trainer.fit(MLP(), ShortcutDigitsDataModule())


def test_every_n_epochs_and_file_fallback_for_other_loggers(tmp_path):
    cb = AttributionCallback(methods=["saliency"], probe_size=10, n_images=3, every_n_epochs=2)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [cb], logger=logger, max_epochs=4, limit_train_batches=2)
    trainer.fit(small_module(), ShortcutDigitsDataModule())
    saved = sorted(os.path.basename(p) for p in glob.glob(f"{logger.log_dir}/xai/heatmaps/*.npz"))
    assert saved == ["epoch_0000.npz", "epoch_0002.npz", "epoch_0003.npz"]  # and always the last epoch
    pngs = sorted(glob.glob(f"{logger.log_dir}/media/xai__heatmaps__saliency/*.png"))
    assert len(pngs) == 9 and os.path.basename(pngs[0]) == "epoch0000_000.png"
    assert len(glob.glob(f"{logger.log_dir}/tables/xai__heatmap_table_epoch*/table.csv")) == 3


def test_bad_arguments_name_what_is_valid():
    with pytest.raises(ValueError, match="unknown attribution method.*valid"):
        AttributionCallback(methods=["lrp.nope"])
    with pytest.raises(ValueError, match="unknown option.*n_step.*valid"):
        AttributionCallback(methods=["integrated_gradients"], method_options={"integrated_gradients": {"n_step": 3}})
    with pytest.raises(ValueError, match="on_error must be one of"):
        AttributionCallback(on_error="ignore")
    with pytest.raises(ValueError, match="every_n_epochs"):
        AttributionCallback(every_n_epochs=0)


def test_tensorboard_logger_gets_the_heatmap_images(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = AttributionCallback(methods=["saliency"], probe_size=10, n_images=3)
    make_trainer(tmp_path, [cb], logger=logger, max_epochs=1, limit_train_batches=2).fit(
        small_module(), ShortcutDigitsDataModule())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["images"] == [f"xai/heatmaps/saliency/{i}" for i in range(3)]


def test_last_epoch_is_known_only_for_a_bounded_run():
    from types import SimpleNamespace

    from xai_callbacks.callbacks.base import on_last_epoch

    assert on_last_epoch(SimpleNamespace(max_epochs=4, current_epoch=3))
    assert not on_last_epoch(SimpleNamespace(max_epochs=4, current_epoch=2))
    # bounded by max_steps: Lightning sets max_epochs to -1, and no epoch is the last one
    assert not on_last_epoch(SimpleNamespace(max_epochs=-1, current_epoch=0))
    assert not on_last_epoch(SimpleNamespace(max_epochs=None, current_epoch=7))
