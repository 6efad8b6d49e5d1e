"""Explanation work off the training path: one background analysis in flight per callback.

A callback splits an epoch's work in two. What needs the model (attributions of this epoch's
weights, causal checks) runs inline in ``on_validation_epoch_end``; what needs only their
results (clustering, embeddings, rendering, media encoding, files) goes to an
:class:`AnalysisWorker`, a thread that overlaps it with the next training epoch (torch, numpy,
scikit-learn and PNG encoding release the GIL). The thread starts on the analysis when training
resumes (:meth:`AnalysisWorker.start`, called by the callbacks on the next training batch), not
at once: beside the other callbacks' epoch-end work it would compete with them for the cores and
the GIL, which ``benchmarks/overhead.py`` measured as a slower inline part. The worker's logger
calls are recorded (:func:`xai_callbacks.sinks.recording`) and made later in the training
thread, labelled with the epoch and step the analysis belongs to (:class:`TrainerAt`).

When results arrive is fixed, not timed: the analysis of epoch ``e`` is delivered at the end of
the next validation epoch (before the :class:`~xai_callbacks.ExplanationGate` checks it), at the
end of ``fit``, and on an exception or ``KeyboardInterrupt``. If it is not finished then, training
waits for it; :attr:`AnalysisWorker.waits` and :attr:`AnalysisWorker.wait_seconds` count that.
So every run delivers the same results at the same epochs, whatever the machine's speed.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import sinks

__all__ = ["AnalysisWorker", "Outcome", "TrainerAt"]


class TrainerAt:
    """The trainer as it was when an analysis started: ``current_epoch`` and ``global_step`` are
    frozen, everything else is read from the live trainer. Sinks given this view label what they
    log with the analysis's epoch and step, however late it is logged.

    Args:
        trainer: the live ``lightning.pytorch.Trainer``.
        epoch: the epoch to show (default: the trainer's now).
        step: the global step to show (default: the trainer's now).

    Example::

        view = TrainerAt(trainer)            # at the end of epoch 3
        sinks.log_images(view, "key", imgs)  # logged with epoch 3, also when called in epoch 4
    """

    def __init__(self, trainer, epoch: int | None = None, step: int | None = None):
        self.__dict__.update(_trainer=trainer, current_epoch=trainer.current_epoch if epoch is None else epoch,
                             global_step=trainer.global_step if step is None else step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_trainer"], name)


@dataclass
class Outcome:
    """A finished analysis: the epoch and global step it belongs to, its result, its failure
    (``"Type: message"``, or ``""``), the logger calls it recorded (made by
    :meth:`AnalysisWorker.collect`'s caller) and the seconds it ran."""

    epoch: int
    step: int
    result: Any = None
    failure: str = ""
    calls: list = field(default_factory=list)
    seconds: float = 0.0


def _record(epoch: int, step: int, fn: Callable, args: tuple) -> Outcome:
    start = time.perf_counter()
    with sinks.recording() as calls:
        try:
            result = fn(*args)
        except Exception as err:  # handed to the training thread, which applies the error policy
            return Outcome(epoch, step, None, f"{type(err).__name__}: {err}", calls, time.perf_counter() - start)
    return Outcome(epoch, step, result, "", calls, time.perf_counter() - start)


class AnalysisWorker:
    """At most one analysis in flight, in a background thread (or inline).

    Args:
        asynchronous: True: :meth:`submit` starts the analysis in a thread and returns; False:
            it runs at once, in the caller's thread (the same code path, so the same results).
        name: the thread's name (shows in stack dumps).

    Example::

        worker = AnalysisWorker()
        worker.submit(epoch, step, analyse, heatmaps.cpu())  # returns at once
        worker.start()                                    # when training resumes
        ...                                               # training goes on
        outcome = worker.collect()                        # waits if it is not finished
        sinks.replay(outcome.calls)
    """

    def __init__(self, asynchronous: bool = True, name: str = "xai-analysis"):
        self.asynchronous, self.name = bool(asynchronous), name
        self.waits, self.wait_seconds = 0, 0.0
        self.busy_seconds = 0.0  # seconds the collected analyses ran
        self.waiting = threading.Event()  # set while collect() waits for an unfinished analysis
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | Outcome | tuple | None = None   # a tuple: submitted, not started

    @property
    def pending(self) -> bool:
        """Whether an analysis was submitted and not collected yet."""
        return self._pending is not None

    def submit(self, epoch: int, step: int, fn: Callable, *args) -> None:
        """Hand over ``fn(*args)`` for ``epoch`` (at global ``step``), to run in the thread from
        :meth:`start` on (or at once, in the caller's thread, when not ``asynchronous``): it must
        touch no model and no global random state (it runs beside training) and may call the
        sinks, whose logger calls are recorded.

        Raises:
            RuntimeError: an analysis is still pending (collect it first: at most one in flight).
        """
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: an analysis is still pending; collect() it before submitting the next")
        if not self.asynchronous:
            self._pending = _record(epoch, step, fn, args)
            return
        self._pending = (epoch, step, fn, args)

    def start(self) -> None:
        """Start the submitted analysis in the thread, if it has not started yet."""
        if not isinstance(self._pending, tuple):
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.name)
        self._pending = self._pool.submit(_record, *self._pending)

    def skip(self, epoch: int, step: int, result: Any = None, failure: str = "") -> None:
        """Register an analysis that needs no work (another rank's share, or a failure before the
        handoff) so it is delivered like the others."""
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: an analysis is still pending; collect() it before submitting the next")
        self._pending = Outcome(epoch, step, result, failure)

    def wait(self) -> None:
        """Block until the pending analysis, if any, has finished, without collecting it (not
        counted as a wait: for callers that want the cores idle before timing something)."""
        self.start()
        if isinstance(self._pending, Future):
            self._pending.exception()

    def collect(self) -> Outcome | None:
        """The pending analysis's :class:`Outcome` (None if none is pending), waiting for it if it
        is still running; a wait is counted in :attr:`waits` and :attr:`wait_seconds`, the
        analysis's run time added to :attr:`busy_seconds`."""
        self.start()
        pending, self._pending = self._pending, None
        if not isinstance(pending, Future):
            self.busy_seconds += pending.seconds if pending is not None else 0.0
            return pending
        if not pending.done():
            start = time.perf_counter()
            self.waiting.set()
            try:
                pending.result()
            finally:
                self.waiting.clear()
            self.waits += 1
            self.wait_seconds += time.perf_counter() - start
        self.busy_seconds += pending.result().seconds
        return pending.result()

    def close(self) -> None:
        """Stop the thread (after the pending analysis, if any, finished); the worker can be reused."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
