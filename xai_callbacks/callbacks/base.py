"""What every explanation callback shares: schedule, probe set, error policy."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from .. import sinks
from ..data import unpack_batch
from ..guard import rng_guard
from .progress import Progress, task
from ..infill import get_infiller

__all__ = ["ExplanationCallback", "Probe", "select_probe", "val_dataloader", "shard_map"]

ON_ERROR = ("warn", "raise")


@dataclass
class Probe:
    """The fixed probe samples: inputs, labels, optional masks and their dataset indices."""

    x: torch.Tensor
    y: torch.Tensor
    masks: dict[str, torch.Tensor]
    indices: torch.Tensor


def val_dataloader(trainer) -> DataLoader:
    """The trainer's (first) validation dataloader."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise RuntimeError("explanation callbacks need validation data: pass val_dataloaders or a datamodule "
                           "with val_dataloader() to fit / validate")
    return loaders


def _labels(dataset, candidates: np.ndarray) -> np.ndarray:
    for name in ("targets", "labels"):
        labels = getattr(dataset, name, None)
        if labels is not None and len(labels) == len(dataset):
            return np.asarray(torch.as_tensor(labels))[candidates]
    return np.array([int(unpack_batch(default_collate([dataset[int(i)]])).y) for i in candidates])


def select_probe(dataset, size: int, seed: int) -> list[int]:
    """``size`` dataset indices, seeded and stratified by class (round robin over classes).

    Labels come from ``dataset.targets`` / ``dataset.labels`` when present; otherwise only a
    seeded candidate subset (20x the size) is read, never the whole dataset.
    """
    rng = np.random.default_rng(seed)
    n = len(dataset)
    candidates = rng.permutation(n)
    if not hasattr(dataset, "targets") and not hasattr(dataset, "labels"):
        candidates = candidates[: 20 * size]
    labels = _labels(dataset, candidates)
    per_class = [list(candidates[labels == c]) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(size, len(candidates)):
        for members in per_class:
            if members and len(chosen) < size:
                chosen.append(int(members.pop(0)))
    return sorted(chosen)


def shard_map(trainer, fn, *tensors: torch.Tensor):
    """``fn(*tensors)`` with the samples split across DDP ranks, gathered back in order on every rank.

    Rank r takes the r-th contiguous block of ``ceil(n / world_size)`` samples (the last blocks
    padded with sample 0); ``fn`` must treat samples independently and return a tensor, or a dict
    of tensors, with one row per sample. With one process this is just ``fn(*tensors)``.
    """
    world, n = trainer.world_size, tensors[0].shape[0]
    if world == 1:
        return fn(*tensors)
    per = -(-n // world)
    idx = torch.arange(trainer.global_rank * per, (trainer.global_rank + 1) * per, device=tensors[0].device)
    idx = torch.where(idx < n, idx, torch.zeros_like(idx))
    out = fn(*(t[idx] for t in tensors))

    def gather(t: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.all_gather(t.contiguous()).flatten(0, 1)[:n]

    return {k: gather(v) for k, v in out.items()} if isinstance(out, dict) else gather(out)


class ExplanationCallback(pl.Callback):
    """Base class of the explanation callbacks.

    Subclasses implement :meth:`run`; it is called in ``on_validation_epoch_end`` every
    ``every_n_epochs`` epochs (never during the sanity check), inside ``rng_guard`` so the
    global RNG streams of training are untouched.

    Args:
        every_n_epochs: run on epochs where ``current_epoch % every_n_epochs == 0``.
        probe_size: number of validation samples in the fixed probe set.
        seed: seed of the probe set's stratified draw (and of the callback's own random draws).
        on_error: ``"warn"``: a failure warns, is counted (logged as ``xai/errors``) and training
            goes on; ``"raise"``: it fails the run.
    """

    def __init__(self, every_n_epochs: int = 1, probe_size: int = 64, seed: int = 0, on_error: str = "warn"):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be an int >= 1, got {probe_size!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.every_n_epochs, self.probe_size, self.seed, self.on_error = every_n_epochs, probe_size, seed, on_error
        self.probe_indices: list[int] | None = None
        self.errors = 0
        self._probe: Probe | None = None

    progress: Progress = Progress()  # the progress-bar line of the running work (no-op outside run_safely)

    # -- what subclasses implement -------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    # -- schedule and error policy --------------------------------------------------------
    def should_run(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.should_run(trainer):
            self.run_safely(trainer, pl_module, self.run)

    def guarded(self, what: str, fn, *args) -> None:
        """Call ``fn(*args)`` under the RNG guard with the ``on_error`` policy: raise, or warn
        ``"<Callback> <what>: <error>"`` and count the failure in :attr:`errors`."""
        try:
            with rng_guard():
                fn(*args)
        except Exception as err:
            if self.on_error == "raise":
                raise
            self.errors += 1
            warnings.warn(f"{type(self).__name__} {what}: {type(err).__name__}: {err}; training goes on "
                          "(on_error='warn')", stacklevel=3)

    def run_safely(self, trainer, pl_module, fn) -> None:
        """:meth:`guarded` ``fn(trainer, pl_module)``, then log all explanation callbacks' failures."""
        # the work shows as a line of the progress bar; run() may update self.progress with its step
        with task(trainer, f"{type(self).__name__}") as self.progress:
            self.guarded(f"failed at epoch {trainer.current_epoch}", fn, trainer, pl_module)
        del self.progress  # back to the class's no-op line
        total = sum(cb.errors for cb in trainer.callbacks if isinstance(cb, ExplanationCallback))
        sinks.log_metrics(trainer, {"xai/errors": float(total)})

    # -- infillers -------------------------------------------------------------------------
    @staticmethod
    def gan_infiller(trainer):
        """The GAN infiller an :class:`~xai_callbacks.callbacks.inpainter.InpainterCallback` of this
        trainer has trained past its warm-up, or None."""
        for cb in trainer.callbacks:
            gan = getattr(cb, "trained_infiller", None)
            if gan is not None:
                return gan
        return None

    def resolve_infillers(self, trainer, options: Mapping[str, Any],
                          defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``options`` with an ``infiller`` of ``"auto"`` or ``"gan"`` (given, or the default in
        ``defaults``) replaced by the infiller it means now: :func:`~xai_callbacks.infill.get_infiller`
        with this trainer's GAN. So the GAN reaches explainers and metrics as an argument."""
        options = dict(options)
        spec = options.get("infiller", (defaults or {}).get("infiller"))
        if isinstance(spec, str) and spec in ("auto", "gan"):
            options["infiller"] = get_infiller(spec, gan=self.gan_infiller(trainer))
        return options

    # -- probe set -------------------------------------------------------------------------
    def probe(self, trainer, pl_module) -> Probe:
        """The probe set on the module's device: chosen once, kept in ``state_dict``."""
        if self._probe is None:
            loader = val_dataloader(trainer)
            if self.probe_indices is None:
                self.probe_indices = select_probe(loader.dataset, self.probe_size, self.seed)
            collate = loader.collate_fn or default_collate
            with torch.inference_mode(False):  # cached across fit / validate: no inference tensors
                x, y, masks = unpack_batch(collate([loader.dataset[i] for i in self.probe_indices]))
            if y is None:
                raise ValueError("the probe set needs labels: batches must be (x, y, ...) or dicts with 'y'")
            dev = pl_module.device
            self._probe = Probe(x.to(dev), torch.as_tensor(y).to(dev), {k: v.to(dev) for k, v in masks.items()},
                                torch.tensor(self.probe_indices))
        return self._probe

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"probe_indices": self.probe_indices, "errors": self.errors}

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe_indices = state_dict.get("probe_indices")
        self.errors = state_dict.get("errors", 0)
        self._probe = None
