"""Explanation work off the training path: the background worker delivers the same results as
inline runs, labelled with their epoch, at fixed points (next validation epoch, end of fit,
exceptions), counts the training's waits, and the gate sees the last results at the end of fit."""
from __future__ import annotations

import signal
import threading

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from conftest import make_trainer
from xai_callbacks import sinks
from xai_callbacks.callbacks.gate import ExplanationGate
from xai_callbacks.callbacks.spray import SpRAyCallback
from xai_callbacks.callbacks.worker import AnalysisWorker, TrainerAt
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN

EPOCHS = 2
SMALL = dict(limit_train_batches=3, limit_val_batches=1)


class Capture(Logger):
    """Keeps every ``log_metrics`` call: (metrics, step)."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[dict, int]] = []

    name, version, save_dir = "capture", 0, None

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((dict(metrics), step))

    def spray_rows(self):
        return [(m, s) for m, s in self.rows if any(k.startswith("spray/") for k in m)]


class ResultsAtEpochStart(Callback):
    """Which epochs' SpRAy results had been delivered when each training epoch started."""

    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(sorted({e for t in self.cb.trackers.values() for h in t.history.values() for e in h}))


def small_module(seed=0):
    torch.manual_seed(seed)
    return Classifier(DemoCNN(width=8), lr=3e-3)


CHEAP = dict(method="saliency", max_per_class=20, evidence_options={"pastes": 1})


def fit(tmp_path, asynchronous, evidence=True, visualisation="tsne"):
    cb = SpRAyCallback(classes=[0, 1], asynchronous=asynchronous, evidence=evidence, save_virelay=False,
                       spray_options={"visualisation": visualisation}, **CHEAP)
    gate = ExplanationGate(rules=["spray/0/n_clusters < 0"], action="warn")  # fails whenever the key is logged
    seen, log = ResultsAtEpochStart(cb), Capture()
    # the gate comes first: its on_fit_end must still see the last analysis
    trainer = make_trainer(tmp_path, [gate, cb, seen], logger=log, max_epochs=EPOCHS, **SMALL)
    trainer.fit(small_module(), ShortcutDigitsDataModule())
    return cb, gate, seen, log


@pytest.mark.parametrize("evidence, visualisation", [(True, "tsne"), (False, "pca")])
def test_background_and_inline_give_the_same_results_labelled_by_epoch(tmp_path, evidence, visualisation):
    inline = fit(tmp_path / "inline", asynchronous=False, evidence=evidence, visualisation=visualisation)
    background = fit(tmp_path / "background", asynchronous=True, evidence=evidence, visualisation=visualisation)
    (cb_i, gate_i, seen_i, log_i), (cb_b, gate_b, seen_b, log_b) = inline, background
    # the same scalars, logged once per analysis with the epoch (and step) it belongs to
    assert log_b.spray_rows() == log_i.spray_rows()
    assert [m["epoch"] for m, _ in log_b.spray_rows()] == list(range(EPOCHS))
    assert [s for _, s in log_b.spray_rows()] == [3 * (e + 1) for e in range(EPOCHS)]  # 3 batches an epoch
    for c in (0, 1):
        ri, rb = cb_i.results[c], cb_b.results[c]
        assert np.array_equal(ri.labels, rb.labels) and np.allclose(ri.embedding, rb.embedding)
        assert np.array_equal(ri.flagged, rb.flagged) and cb_i.strategy_ids[c] == cb_b.strategy_ids[c]
        assert cb_i.trackers[c].history == cb_b.trackers[c].history
    # inline, an epoch's results are there before the next epoch trains; in the background they
    # arrive at the end of the next epoch's validation (so training overlapped the analysis)
    assert seen_i.seen == [[], [0]]
    assert seen_b.seen == [[], []]
    assert cb_b.deliveries == cb_i.deliveries == EPOCHS
    # the gate saw the last epoch's results at the end of fit, although it runs before the callback
    assert gate_b.passed is False and gate_b.final["missing"] == []
    last_i = {k: v for k, v in gate_i.epochs[-1]["values"].items() if k.startswith("spray/")}
    last_b = {k: v for k, v in gate_b.epochs[-1]["values"].items() if k.startswith("spray/")}
    assert last_b == last_i and last_b


def test_training_waits_for_an_unfinished_analysis_and_the_wait_is_logged(tmp_path):
    cb = SpRAyCallback(classes=[0, 1], evidence=False, save_virelay=False, spray_options={"visualisation": None},
                       **CHEAP)
    analyse = cb._analyse

    def slow(*args):  # finishes only once training waits for it
        cb._worker.waiting.wait()
        return analyse(*args)

    cb._analyse = slow
    log = Capture()
    make_trainer(tmp_path, [cb], logger=log, max_epochs=2, **SMALL).fit(small_module(), ShortcutDigitsDataModule())
    assert cb._worker.waits == 2 and cb._worker.wait_seconds > 0  # at epoch 1's validation, at the end of fit
    waits = [m["xai/SpRAyCallback/waits"] for m, _ in log.rows if "xai/SpRAyCallback/waits" in m]
    assert waits == [1.0, 2.0]
    assert [m["epoch"] for m, _ in log.spray_rows()] == [0, 1]


def test_the_analysis_starts_when_training_resumes_not_beside_the_epoch_end_work(tmp_path):
    cb = SpRAyCallback(classes=[0, 1], evidence=False, save_virelay=False, spray_options={"visualisation": None},
                       **CHEAP)
    analyse, started, seen = cb._analyse, threading.Event(), []

    def spy(*args):
        started.set()
        return analyse(*args)

    cb._analyse = spy

    class After(Callback):   # runs after cb's epoch-end work, then training resumes
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(("epoch end", trainer.current_epoch, started.is_set()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0 and trainer.current_epoch == 1:
                started.wait(timeout=60)   # cb.on_train_batch_start (earlier in the list) started it
                seen.append(("batch", trainer.current_epoch, started.is_set()))

    make_trainer(tmp_path, [cb, After()], max_epochs=2, **SMALL).fit(small_module(), ShortcutDigitsDataModule())
    assert seen[:2] == [("epoch end", 0, False), ("batch", 1, True)]
    assert cb.deliveries == 2 and set(cb.results) == {0, 1}


class FailAtEpoch(Classifier):
    def __init__(self, error):
        torch.manual_seed(0)
        super().__init__(DemoCNN(width=8), lr=3e-3)
        self.error = error

    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_exception_delivers_the_pending_analysis(tmp_path, error):
    cb = SpRAyCallback(classes=[0], evidence=False, spray_options={"visualisation": None}, **CHEAP)
    log = Capture()
    trainer = make_trainer(tmp_path, [cb], logger=log, max_epochs=3, **SMALL)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit if isinstance(error, KeyboardInterrupt) else RuntimeError):
            trainer.fit(FailAtEpoch(error), ShortcutDigitsDataModule())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl+C after an interrupt
    # epoch 0's analysis was still running in the background when epoch 1 failed: delivered, not lost
    assert [m["epoch"] for m, _ in log.spray_rows()] == [0] and sorted(cb.results) == [0]
    assert (tmp_path / "spray" / "epoch_0000" / "analysis.h5").exists()
    assert not cb._worker.pending


def test_worker_records_logger_calls_and_reports_failures():
    log = Capture()

    class FakeTrainer:
        current_epoch, global_step, is_global_zero, loggers = 4, 40, True, [log]

    worker = AnalysisWorker(asynchronous=True)
    started = threading.Event()

    def analyse(view):
        started.set()
        sinks.log_metrics(view, {"a": 1.0})  # recorded in the worker, made by the caller
        return view.current_epoch

    trainer = FakeTrainer()
    worker.submit(4, 40, analyse, TrainerAt(trainer))
    with pytest.raises(RuntimeError, match="still pending"):
        worker.submit(5, 50, analyse, TrainerAt(trainer))
    trainer.current_epoch, trainer.global_step = 5, 50  # training went on
    outcome = worker.collect()
    assert started.is_set() and outcome.result == 4 and outcome.failure == "" and log.rows == []
    sinks.replay(outcome.calls)
    assert log.rows == [({"a": 1.0}, 40)]
    worker.submit(5, 50, lambda: 1 / 0)
    assert worker.collect().failure == "ZeroDivisionError: division by zero" and worker.collect() is None
    worker.close()


def test_wait_blocks_until_the_analysis_finished_without_collecting_it():
    worker, release, returned = AnalysisWorker(asynchronous=True), threading.Event(), threading.Event()
    worker.submit(0, 0, lambda: release.wait() and 7)
    waiter = threading.Thread(target=lambda: (worker.wait(), returned.set()))
    waiter.start()
    waiter.join(timeout=0.2)
    assert not returned.is_set()   # still running: wait() has not returned
    release.set()
    waiter.join()
    assert returned.is_set() and worker.pending   # finished, not collected
    assert worker.collect().result == 7 and worker.waits == 0   # neither wait counts as training waiting
    worker.wait()   # nothing pending: returns at once
    worker.close()


def test_attribution_pictures_and_files_are_made_off_the_training_thread_with_the_same_content(tmp_path, monkeypatch):
    from xai_callbacks import AttributionCallback, render

    made_in = []
    panel = render.panel

    def spy(*args, **kwargs):
        made_in.append(threading.current_thread() is threading.main_thread())
        return panel(*args, **kwargs)

    monkeypatch.setattr(render, "panel", spy)
    files = {}
    for asynchronous in (False, True):
        made_in.clear()
        cb = AttributionCallback(methods=["saliency"], probe_size=8, n_images=2, asynchronous=asynchronous)
        trainer = make_trainer(tmp_path / str(asynchronous), [cb], max_epochs=EPOCHS, **SMALL)
        trainer.fit(small_module(), ShortcutDigitsDataModule())
        assert made_in == [not asynchronous] * (2 * EPOCHS)  # 2 panels an epoch, in the training thread or not
        folder = tmp_path / str(asynchronous) / "xai" / "heatmaps"
        files[asynchronous] = {p.name: dict(np.load(p)) for p in sorted(folder.glob("*.npz"))}
        assert cb.deliveries == EPOCHS
    assert list(files[True]) == [f"epoch_{e:04d}.npz" for e in range(EPOCHS)] == list(files[False])
    for name, arrays in files[True].items():
        assert arrays.keys() == files[False][name].keys()
        assert all(np.array_equal(v, files[False][name][k]) for k, v in arrays.items())
