"""Where callback results go: W&B when a ``WandbLogger`` is attached, TensorBoard images when a
``TensorBoardLogger`` is, files under the run's directory otherwise.

Everything here writes on global rank 0 only, except :func:`log_scalars`, which goes through
``pl_module.log(..., sync_dist=True)`` on every rank so EarlyStopping / ModelCheckpoint can
monitor the values. No function passes ``step=`` to ``wandb.log`` (W&B silently drops lower
steps); the trainer's step travels as ``trainer/global_step`` and every W&B dict carries the
``epoch`` its values belong to (``trainer.current_epoch``; for work finished in the background,
the epoch it was started in, see :class:`~xai_callbacks.callbacks.worker.AnalysisWorker`).

Logger calls made inside :func:`recording` are kept, not made, and :func:`replay` makes them
later: a background thread renders and encodes, the training thread talks to the loggers.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

__all__ = ["log_scalars", "log_results", "recording", "replay", "log_metrics", "log_images", "log_audio", "log_html", "log_table",
           "log_line_plot", "log_summary", "run_dir", "save_npz", "wandb_loggers"]


_RECORDER = threading.local()


@contextlib.contextmanager
def recording():
    """Keep this thread's logger calls (W&B, TensorBoard, any Lightning logger) instead of making
    them; yields the list they go to, for :func:`replay`. Files (PNGs, CSVs without W&B) are still
    written at once.

    Example::

        with recording() as calls:
            log_images(trainer, "key", images)   # rendered and encoded here, nothing logged yet
        replay(calls)                            # logged now, in this (the training) thread
    """
    calls: list = []
    outer = getattr(_RECORDER, "calls", None)
    _RECORDER.calls = calls
    try:
        yield calls
    finally:
        _RECORDER.calls = outer


def replay(calls: Sequence) -> None:
    """Make the logger calls kept by :func:`recording`, in their order."""
    for fn, args, kwargs in calls:
        _emit(fn, *args, **kwargs)


def _emit(fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` now, or kept when this thread is :func:`recording`."""
    calls = getattr(_RECORDER, "calls", None)
    if calls is None:
        fn(*args, **kwargs)
    else:
        calls.append((fn, args, kwargs))


def wandb_loggers(trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _has_image_logger(trainer) -> bool:
    return any(isinstance(lg, (WandbLogger, TensorBoardLogger)) for lg in trainer.loggers)


def run_dir(trainer) -> Path:
    """The run's directory: the W&B run folder (``wandb/<run>/``), else the trainer's log dir."""
    for lg in wandb_loggers(trainer):
        return Path(lg.experiment.dir).parent
    # like trainer.log_dir, but without its broadcast: this runs on rank 0 alone
    for lg in trainer.loggers:
        folder = getattr(lg, "log_dir", None) or lg.save_dir
        if folder:
            return Path(folder)
    return Path(trainer.default_root_dir)


def _safe(key: str) -> str:
    return key.replace("/", "__")


def log_scalars(pl_module, values: Mapping[str, float]) -> None:
    """Scalars through ``pl_module.log`` on every rank, reduced across ranks (monitorable)."""
    for key, value in values.items():
        pl_module.log(key, float(value), sync_dist=True, on_epoch=True, on_step=False)


def log_results(trainer, values: Mapping[str, float]) -> None:
    """Scalars of work that may finish after its epoch: to every logger (rank 0) with the
    ``epoch`` they belong to (``trainer.current_epoch``), and into ``trainer.callback_metrics``
    on every rank, where the :class:`~xai_callbacks.ExplanationGate`, EarlyStopping and
    ModelCheckpoint read them. Call it on every rank with the same values (this does not reduce).
    """
    if not values:
        return
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            _emit(lg.log_metrics, {**{k: float(v) for k, v in values.items()}, "epoch": trainer.current_epoch},
                  step=trainer.global_step)
    import torch

    _emit(trainer.callback_metrics.update, {k: torch.tensor(float(v)) for k, v in values.items()})


def log_metrics(trainer, values: Mapping[str, float]) -> None:
    """Scalars straight to every logger (rank 0), for values outside ``self.log``'s hooks."""
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            _emit(lg.log_metrics, dict(values), step=trainer.global_step)


def log_images(trainer, key: str, images: Sequence[np.ndarray], captions: Sequence[str] | None = None) -> None:
    """A panel of HxWx3 uint8 images under ``key``."""
    if not trainer.is_global_zero or not images:
        return
    if wandb_loggers(trainer):
        import wandb

        panel = [wandb.Image(img, caption=captions[i] if captions else None) for i, img in enumerate(images)]
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            _emit(lg.log_metrics, {key: panel, "epoch": trainer.current_epoch}, step=trainer.global_step)
        elif isinstance(lg, TensorBoardLogger):
            for i, img in enumerate(images):
                _emit(lg.experiment.add_image, f"{key}/{i}", img, trainer.global_step, dataformats="HWC")
    if not _has_image_logger(trainer):
        from PIL import Image

        folder = run_dir(trainer) / "media" / _safe(key)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / f"epoch{trainer.current_epoch:04d}_{i:03d}.png")


def log_audio(trainer, key: str, waves: Sequence[np.ndarray], sample_rate: int,
              captions: Sequence[str] | None = None) -> list[Path]:
    """Sounds (1-D float arrays in [-1, 1]) under ``key``: written as 16-bit WAV files to
    ``<run dir>/media/<key>/epochNNNN_III.wav`` and, with a W&B logger, logged as ``wandb.Audio``
    of those files (which needs the ``soundfile`` package), or without it as a ``wandb.Html`` page
    of audio players. Returns the files written (rank 0; [] elsewhere)."""
    if not trainer.is_global_zero or not waves:
        return []
    import wave

    folder = run_dir(trainer) / "media" / _safe(key)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, w in enumerate(waves):
        path = folder / f"epoch{trainer.current_epoch:04d}_{i:03d}.wav"
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes((np.clip(np.asarray(w, dtype=np.float64), -1, 1) * 32767).astype("<i2").tobytes())
        paths.append(path)
    wandbs = wandb_loggers(trainer)
    if wandbs:
        import importlib.util

        import wandb

        captions = list(captions) if captions else [""] * len(paths)
        if importlib.util.find_spec("soundfile") is not None:   # wandb.Audio needs it
            value = [wandb.Audio(str(p), caption=c) for p, c in zip(paths, captions)]
        else:  # the same sounds as HTML audio players
            value = wandb.Html(_audio_html(paths, captions))
        for lg in wandbs:
            _emit(lg.log_metrics, {key: value, "epoch": trainer.current_epoch}, step=trainer.global_step)
    return paths


def _audio_html(paths: Sequence[Path], captions: Sequence[str]) -> str:
    """One HTML page with a player per WAV file (embedded as base64), each under its caption."""
    import base64
    import html

    items = [f"<p>{html.escape(str(c or p.name))}<br><audio controls src=\"data:audio/wav;base64,"
             f"{base64.b64encode(p.read_bytes()).decode()}\"></audio></p>" for p, c in zip(paths, captions)]
    return "<div>" + "".join(items) + "</div>"


def log_html(trainer, key: str, page: str) -> None:
    """An HTML page under ``key``: ``wandb.Html`` with W&B, else
    ``<run dir>/media/<key>/epoch<NNNN>.html``."""
    if not trainer.is_global_zero:
        return
    wandbs = wandb_loggers(trainer)
    if wandbs:
        import wandb

        for lg in wandbs:
            _emit(lg.log_metrics, {key: wandb.Html(page), "epoch": trainer.current_epoch}, step=trainer.global_step)
        return
    folder = run_dir(trainer) / "media" / _safe(key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"epoch{trainer.current_epoch:04d}.html").write_text(page)


def log_table(trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table; cells holding HxWx3 uint8 arrays become images (PNG files without W&B)."""
    if not trainer.is_global_zero:
        return
    wandbs = wandb_loggers(trainer)
    if wandbs:
        import wandb

        table = wandb.Table(columns=list(columns),
                            data=[[wandb.Image(c) if isinstance(c, np.ndarray) else c for c in row] for row in rows])
        for lg in wandbs:
            _emit(lg.log_metrics, {key: table, "epoch": trainer.current_epoch}, step=trainer.global_step)
        return
    from PIL import Image

    folder = run_dir(trainer) / "tables" / f"{_safe(key)}_epoch{trainer.current_epoch:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r, row in enumerate(rows):
            cells = []
            for c, cell in enumerate(row):
                if isinstance(cell, np.ndarray):
                    name = f"r{r:04d}c{c}.png"
                    Image.fromarray(cell).save(folder / name)
                    cell = name
                cells.append(cell)
            writer.writerow(cells)


def log_line_plot(trainer, key: str, x: Sequence[float], ys: Mapping[str, Sequence[float]], title: str = "",
                  xname: str = "x") -> None:
    """Several named curves over a shared ``x``: a W&B line plot, else a matplotlib PNG."""
    if not trainer.is_global_zero:
        return
    wandbs = wandb_loggers(trainer)
    if wandbs:
        import wandb

        plot = wandb.plot.line_series(xs=list(map(float, x)), ys=[list(map(float, y)) for y in ys.values()],
                                      keys=list(ys), title=title or key, xname=xname)
        for lg in wandbs:
            _emit(lg.experiment.log, {key: plot, "trainer/global_step": trainer.global_step,
                                      "epoch": trainer.current_epoch})
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.14, top=0.9)   # bbox_inches="tight" drew it twice
    for name, y in ys.items():
        ax.plot(list(x), list(y), label=name)
    ax.set_xlabel(xname)
    ax.set_title(title or key)
    ax.legend()
    folder = run_dir(trainer) / "media" / _safe(key)
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"epoch{trainer.current_epoch:04d}.png", dpi=80)
    plt.close(fig)


def log_summary(trainer, values: Mapping[str, Any]) -> None:
    """Run-level values: the W&B summary, and ``summary.json`` in the run directory."""
    if not trainer.is_global_zero:
        return
    for lg in wandb_loggers(trainer):
        _emit(lg.experiment.summary.update, dict(values))
    path = run_dir(trainer) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(values)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(old, indent=2, default=float))
    os.replace(tmp, path)


def save_npz(trainer, relpath: str, **arrays: np.ndarray) -> Path | None:
    """Compressed arrays at ``run_dir / relpath`` (rank 0); returns the path."""
    if not trainer.is_global_zero:
        return None
    path = run_dir(trainer) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
