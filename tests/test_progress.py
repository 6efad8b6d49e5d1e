"""Explanation work shows in Lightning's progress bar (TQDM and Rich), and nowhere when it is off."""
from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from conftest import make_trainer
from xai_callbacks.callbacks.base import ExplanationCallback
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN


class Steps(ExplanationCallback):
    """Three named steps per run; records whether a bar showed them."""

    def __init__(self):
        super().__init__()
        self.shown = []

    def run(self, trainer, pl_module):
        for i in range(3):
            self.progress.update(advance=int(i > 0), status=f"step {i} of the work", total=3 if i == 0 else None)
        self.shown.append(self.progress.shown)
        rich = getattr(trainer.progress_bar_callback, "progress", None)  # Rich draws off-terminal only at its end
        self.rich_tasks = [t.description for t in rich.tasks] if rich is not None else []


def fit(tmp_path, bar, **kwargs):
    torch.manual_seed(0)
    cb = Steps()
    callbacks = [cb] + ([bar] if bar is not None else [])
    make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                 **kwargs).fit(Classifier(DemoCNN(width=4)), ShortcutDigitsDataModule())
    return cb


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
def test_work_shows_in_the_progress_bar(tmp_path, capsys, kind):
    bar = TQDMProgressBar() if kind == "tqdm" else RichProgressBar()
    cb = fit(tmp_path, bar, enable_progress_bar=True)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().out)
    assert cb.shown == [True]
    if kind == "tqdm":
        assert "Steps: step 2 of the work" in out
    else:
        assert "Steps: step 2 of the work" in cb.rich_tasks
    assert ExplanationCallback.progress.shown is False  # the line is gone after the run


def test_nothing_shows_when_the_bar_is_off(tmp_path, capsys):
    cb = fit(tmp_path, None, enable_progress_bar=False)
    assert cb.shown == [False] and "step 2 of the work" not in capsys.readouterr().out
