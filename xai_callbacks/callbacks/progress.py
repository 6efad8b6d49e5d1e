"""Explanation work in Lightning's progress bar, and messages printed above it.

:func:`task` opens one extra line in the trainer's progress bar (Lightning's ``TQDMProgressBar``
or ``RichProgressBar``) for a piece of explanation work and hands back a :class:`Progress` whose
:meth:`~Progress.update` advances it and says what runs now ("SpRAy class 3"). Without an
enabled bar, or off rank 0, everything here does nothing. :func:`echo` prints a message above
the bars (not glued to a bar line), or logs it when there is no bar.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Progress", "task", "echo", "active_bar"]


def active_bar(trainer):
    """The trainer's enabled progress bar callback on rank 0, else None."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not getattr(bar, "is_enabled", False) or not trainer.is_global_zero:
        return None
    return bar


def echo(trainer, text: str, log: logging.Logger, above_bar: bool = True) -> None:
    """``text`` above the progress bars (rank 0), or to ``log`` at WARNING when no bar is shown.

    Args:
        trainer: the Lightning trainer.
        text: the message (several lines allowed).
        log: the logger used when no bar is shown.
        above_bar: False once the bars are closed (end of fit), where a bar prints nothing.
    """
    if not trainer.is_global_zero:
        return
    bar = active_bar(trainer) if above_bar else None
    if bar is not None and _draws(bar):
        bar.print(text)
    else:
        log.warning(text)


def _draws(bar) -> bool:
    """Whether ``bar.print`` shows anything now (Lightning's TQDM bar prints only while one of its
    bars is open; other bars always print)."""
    names = ("_train_progress_bar", "_val_progress_bar", "_test_progress_bar", "_predict_progress_bar")
    if not any(hasattr(bar, n) for n in names):
        return True
    return any(getattr(bar, n, None) is not None and not getattr(bar, n).disable for n in names)


class Progress:
    """One line of explanation work in the progress bar (a no-op without a bar).

    Args:
        trainer: the Lightning trainer whose bar shows the line.
        description: what the work is ("SpRAyCallback").
        total: steps the work takes (None: unknown until :meth:`update` sets it).
    """

    def __init__(self, trainer=None, description: str = "", total: int | None = None):
        self.description, self.total, self._tqdm, self._rich, self._task = description, total, None, None, None
        bar = None if trainer is None else active_bar(trainer)
        if bar is None:
            return
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        if isinstance(bar, TQDMProgressBar):
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            self._tqdm = Tqdm(desc=description, total=total, position=2 * bar.process_position + 2, leave=False,
                              dynamic_ncols=True, file=sys.stdout, smoothing=0)
        elif isinstance(bar, RichProgressBar) and getattr(bar, "progress", None) is not None:
            self._rich = bar.progress
            self._task = self._rich.add_task(description, total=total if total is not None else 1)

    @property
    def shown(self) -> bool:
        """Whether a bar shows this line."""
        return self._tqdm is not None or self._rich is not None

    def update(self, advance: int = 0, status: str | None = None, total: int | None = None) -> None:
        """Advance by ``advance`` steps, show ``status`` beside the description, or set the ``total``."""
        if not self.shown:
            return
        if total is not None:
            self.total = total
        label = self.description + (f": {status}" if status else "")
        if self._tqdm is not None:
            if total is not None:
                self._tqdm.reset(total=total)
            self._tqdm.set_description_str(label, refresh=False)
            self._tqdm.update(advance)
            self._tqdm.refresh()
        elif self._rich is not None:
            self._rich.update(self._task, advance=advance, description=label,
                              **({} if total is None else {"total": total}))

    def close(self) -> None:
        """Remove the line from the bar."""
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._rich is not None:
            self._rich.remove_task(self._task)
        self._tqdm = self._rich = None


@contextmanager
def task(trainer, description: str, total: int | None = None) -> Iterator[Progress]:
    """A :class:`Progress` line for the work inside the ``with`` block, removed afterwards."""
    progress = Progress(trainer, description, total)
    try:
        yield progress
    finally:
        progress.close()
