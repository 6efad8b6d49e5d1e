"""ExplanationMetricsCallback in a real Lightning fit with an offline W&B run: the scalars reach
the logger and the trainer's callback_metrics (monitorable), the curves become line plots, the
summary holds the last values, and a failing metric is a counted warning."""
from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, Subset

from xai_callbacks.callbacks.metrics import ExplanationMetricsCallback
from xai_callbacks.data import make_shortcut_digits
from xai_callbacks.models import Classifier, DemoCNN

wandb = pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def loaders():
    train, val = make_shortcut_digits(size=16, seed=0)
    return (DataLoader(Subset(train, range(64)), batch_size=32, shuffle=True),
            DataLoader(val, batch_size=64))


def fit(tmp_path, loaders, callback, logger=None, extra=()):
    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, limit_val_batches=1, logger=logger or False,
                         callbacks=[callback, *extra], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Classifier(DemoCNN(image_size=16, width=4)), *loaders)
    return trainer


def test_scalars_curves_and_summary_reach_wandb(tmp_path, loaders, wandb_logger):
    from wandb_records import finish_run, history

    logger = wandb_logger
    cb = ExplanationMetricsCallback(methods=["saliency"], probe_size=10, metrics=[
        {"name": "pixel_flipping", "n_steps": 8}, {"name": "deletion_auc", "n_steps": 8}, "sparseness",
        "relevance_mass", {"name": "max_sensitivity", "n_samples": 2}])
    stop = EarlyStopping(monitor="xai/saliency/sparseness", mode="max", patience=3)
    trainer = fit(tmp_path, loaders, cb, logger, extra=[stop])
    keys = ["xai/saliency/pixel_flipping_morf_aopc.constant0", "xai/saliency/deletion_auc.constant0",
            "xai/saliency/sparseness", "xai/saliency/relevance_mass", "xai/saliency/max_sensitivity"]
    assert set(keys) <= set(trainer.callback_metrics)
    for k in keys:
        assert torch.isfinite(trainer.callback_metrics[k]), k
        assert cb.values[k] == pytest.approx(float(trainer.callback_metrics[k]), rel=1e-6)
    run = os.path.dirname(logger.experiment.dir)
    finish_run()
    rows = history(run)
    logged = {k for row in rows for k in row}
    assert set(keys) <= logged
    curves = [row for row in rows if any(k.startswith("xai/curves/pixel_flipping_morf_aopc.constant0") for k in row)]
    assert curves and all(row["epoch"] == 0 for row in curves)   # drawn in the background, labelled with its epoch
    assert cb.errors == 0 and cb.deliveries == 1
    summary = json.loads(open(os.path.join(run, "summary.json")).read())  # written by sinks.log_summary
    assert summary["xai/saliency/sparseness"] == pytest.approx(cb.values["xai/saliency/sparseness"])


def test_failing_metric_is_a_counted_warning_and_others_still_log(tmp_path, loaders):
    cb = ExplanationMetricsCallback(methods=["saliency"], probe_size=8, mask_key="no_such_mask",
                                    metrics=["relevance_mass", "sparseness"])
    with pytest.warns(UserWarning, match="needs masks 'no_such_mask'.*object_mask"):
        trainer = fit(tmp_path, loaders, cb)
    assert cb.errors == 1
    assert "xai/saliency/sparseness" in trainer.callback_metrics


def test_bad_configuration_is_rejected_early():
    with pytest.raises(ValueError, match="unknown metric 'aopc'"):
        ExplanationMetricsCallback(metrics=["aopc"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['steps'\] for metric 'pixel_flipping'"):
        ExplanationMetricsCallback(metrics={"pixel_flipping": {"steps": 3}})
    with pytest.raises(ValueError, match="unknown attribution method"):
        ExplanationMetricsCallback(methods=["salience"])
