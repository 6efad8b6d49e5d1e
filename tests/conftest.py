"""Shared fixtures: offline W&B, the demo data, and a small Trainer factory."""
from __future__ import annotations

import os
import warnings

import lightning.pytorch as pl
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")


@pytest.fixture(scope="session")
def digits():
    """(train, val) splits of the shortcut digits with the default watermark."""
    from xai_callbacks.data import make_shortcut_digits

    return make_shortcut_digits()


def make_trainer(tmp_path, callbacks=(), logger=False, max_epochs=2, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing under ``tmp_path``."""
    args = dict(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                default_root_dir=str(tmp_path), num_sanity_val_steps=0, deterministic=True)
    args.update(kwargs)
    return pl.Trainer(**args)


@pytest.fixture
def wandb_logger(tmp_path):
    """An offline WandbLogger writing under ``tmp_path``; the run is finished afterwards."""
    from lightning.pytorch.loggers import WandbLogger
    import wandb

    logger = WandbLogger(project="xai-callbacks-tests", save_dir=str(tmp_path), offline=True)
    yield logger
    wandb.finish()
