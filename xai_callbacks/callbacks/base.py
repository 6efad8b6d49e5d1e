"""What every explanation callback shares: schedule, sample selection, targets, DDP work
sharing, the error policy and its counting.

A callback keeps only what is its own: *when* it runs is this base's (``every_n_epochs``, in
``fit`` and ``validate``), *what* it computes is the core's (``attribution``, ``metrics``,
``spray``, ``infill``), how it looks is ``render``'s and where it goes is ``sinks``'.
"""
from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from .. import sinks
from ..data import Batch, unpack_batch
from ..guard import model_guard, rng_guard
from .progress import Progress, task
from .worker import AnalysisWorker, TrainerAt
from ..infill import get_infiller
from ..scoring import Target, class_scores

__all__ = ["ExplanationCallback", "Probe", "select_probe", "select_per_class", "dataset_labels", "val_dataloader",
           "read_samples", "shard_map", "shard_indices", "average_gradients", "on_last_epoch", "TARGETS"]

log = logging.getLogger(__name__)

ON_ERROR = ("warn", "raise")
TARGETS = ("label", "prediction")


@dataclass
class Probe:
    """The fixed probe samples: inputs, labels, optional masks and their dataset indices."""

    x: torch.Tensor
    y: torch.Tensor
    masks: dict[str, torch.Tensor]
    indices: torch.Tensor

    @property
    def batch(self) -> Batch:
        """``Batch(x, y, masks)``: what a target function receives with the model's output."""
        return Batch(self.x, self.y, self.masks)


def val_dataloader(trainer) -> DataLoader:
    """The trainer's (first) validation dataloader."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise RuntimeError("explanation callbacks need validation data: pass val_dataloaders or a datamodule "
                           "with val_dataloader() to fit / validate")
    return loaders


def read_samples(loader: DataLoader, indices: Sequence[int]) -> Batch:
    """The samples ``indices`` of ``loader.dataset``, read one by one and collated with the loader's
    ``collate_fn`` (default collation where it has none), as a :class:`~xai_callbacks.data.Batch`
    on the CPU; never inference tensors (they are cached across ``fit`` and ``validate``)."""
    collate = getattr(loader, "collate_fn", None) or default_collate
    with torch.inference_mode(False):
        return unpack_batch(collate([loader.dataset[int(i)] for i in indices]))


def dataset_labels(dataset, candidates: np.ndarray) -> tuple[np.ndarray, bool]:
    """Labels (len(candidates),) to stratify by, and whether they are class ids.

    Labels come from ``dataset.targets`` / ``dataset.labels`` when present, else from the
    candidates' items. Where a label is not a single class id (multi-label vectors, regression
    values, segmentation maps), the sample's *first* label value is used and the second value
    returned is False, so the caller can say so.
    """
    labels = None
    for name in ("targets", "labels"):
        found = getattr(dataset, name, None)
        if found is not None and len(found) == len(dataset):
            labels = torch.as_tensor(np.asarray(found) if not isinstance(found, torch.Tensor) else found)[
                torch.as_tensor(candidates, dtype=torch.long)]
            break
    if labels is None:
        labels = [torch.as_tensor(unpack_batch(default_collate([dataset[int(i)]])).y)[0] for i in candidates]
        labels = torch.stack(labels) if labels else torch.zeros(0, dtype=torch.long)
    class_ids = labels.dim() == 1 and (not labels.is_floating_point() or binary_labels(labels))
    first = labels.reshape(len(labels), -1)[:, 0] if len(labels) else labels.reshape(-1)
    return first.cpu().numpy(), class_ids


def binary_labels(labels: torch.Tensor) -> bool:
    """Float labels (B,) that are all 0 or 1: a binary classifier's (``BCEWithLogitsLoss`` takes
    float targets), read as class ids."""
    return labels.dim() == 1 and labels.is_floating_point() and bool(((labels == 0) | (labels == 1)).all())


_SAID: set = set()


def _say_once(message: str, about: object = None) -> None:
    """Warn ``message`` once per process and ``about`` object (e.g. once per dataset)."""
    key = (message, id(about))
    if key not in _SAID:
        _SAID.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def _stratify_note(class_ids: bool, dataset) -> None:
    if not class_ids:
        _say_once("the labels are not single class ids (multi-label, regression or segmentation): samples are "
                  "stratified by each sample's first label value", dataset)


def select_probe(dataset, size: int, seed: int) -> list[int]:
    """``size`` dataset indices, seeded and stratified by class (round robin over classes).

    Labels come from ``dataset.targets`` / ``dataset.labels`` when present; otherwise only a
    seeded candidate subset (20x the size) is read, never the whole dataset. Labels that are not
    single class ids are stratified by their first value (said once, as a warning).
    """
    rng = np.random.default_rng(seed)
    n = len(dataset)
    candidates = rng.permutation(n)
    if not hasattr(dataset, "targets") and not hasattr(dataset, "labels"):
        candidates = candidates[: 20 * size]
    labels, class_ids = dataset_labels(dataset, candidates)
    _stratify_note(class_ids, dataset)
    per_class = [list(candidates[labels == c]) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(size, len(candidates)):
        for members in per_class:
            if members and len(chosen) < size:
                chosen.append(int(members.pop(0)))
    return sorted(chosen)


def select_per_class(dataset, classes: Sequence[int] | None, max_per_class: int, seed: int) -> list[int]:
    """Up to ``max_per_class`` dataset indices of each class, seeded; sorted.

    Labels as in :func:`select_probe` (the first label value where labels are not class ids);
    without ``dataset.targets`` / ``dataset.labels`` a seeded candidate subset
    (``20 * max_per_class`` per class wanted) is read, never the whole dataset.

    Args:
        dataset: a map-style dataset of ``(x, y, ...)`` tuples or dicts with ``x`` / ``y``.
        classes: the classes to sample; None: every class found.
        max_per_class: samples per class at most.
        seed: seed of the draw.
    """
    candidates = np.random.default_rng(seed).permutation(len(dataset))
    if not any(getattr(dataset, n, None) is not None for n in ("targets", "labels")):
        candidates = candidates[: 20 * max_per_class * (len(classes) if classes else 10)]
    labels, class_ids = dataset_labels(dataset, candidates)
    _stratify_note(class_ids, dataset)
    wanted = sorted(set(labels.tolist())) if classes is None else list(classes)
    chosen = [candidates[labels == c][:max_per_class] for c in wanted]
    return sorted(int(i) for part in chosen for i in part)


def shard_indices(trainer, n: int, device=None) -> torch.Tensor:
    """This DDP rank's share of ``n`` samples: the r-th contiguous block of ``ceil(n / world)``
    (possibly empty for the last ranks), without padding, so per-sample sums over the ranks
    count every sample once. All of ``range(n)`` with one process."""
    world = trainer.world_size
    per = -(-n // world)
    start = min(n, trainer.global_rank * per)
    return torch.arange(start, min(n, start + per), device=device)


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


def average_gradients(module: torch.nn.Module) -> None:
    """Average ``module``'s gradients across DDP ranks, in place: for a callback's own model
    (e.g. the inpainter's G and D) trained beside the explained one. No-op without a process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def on_last_epoch(trainer) -> bool:
    """Whether the trainer is in the last epoch ``max_epochs`` allows (False without a bound:
    ``max_epochs`` None or -1, as when training is bounded by ``max_steps``)."""
    return trainer.max_epochs is not None and trainer.max_epochs > 0 and \
        trainer.current_epoch >= trainer.max_epochs - 1


def _log_error_total(trainer) -> None:
    """Log ``xai/errors``: the failures counted by all explanation callbacks of the run so far."""
    total = sum(cb.errors for cb in trainer.callbacks if isinstance(cb, ExplanationCallback))
    sinks.log_metrics(trainer, {"xai/errors": float(total)})


def _target_function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"target {spec!r}: cannot import the target function ({err}); give 'label', "
                         "'prediction', a function (output, batch) -> (B,) or 'package.module:function'") from None
    if not callable(fn):
        raise ValueError(f"target {spec!r} is not callable")
    return fn


class ExplanationCallback(pl.Callback):
    """Base class of the explanation callbacks.

    Subclasses implement :meth:`run`; it is called in ``on_validation_epoch_end`` every
    ``every_n_epochs`` epochs (never during the sanity check), inside ``rng_guard`` so the
    global RNG streams of training are untouched. It runs in ``trainer.fit``, in a standalone
    ``trainer.validate`` and in ``validate`` after ``fit``; ``trainer.test`` runs no validation
    epoch, so nothing is computed there and the callback says so once (a warning).

    The base owns what every callback needs:

    * sample selection: the probe set (:meth:`probe`, seeded, stratified by class, kept in
      ``state_dict``) and per-class samples (:func:`select_per_class`);
    * the explained target (:meth:`targets`): the label, the prediction, or a target function;
    * DDP: :func:`shard_map` (split samples across ranks, gather on all), :func:`shard_indices`
      (each rank's share, for work whose results are summed), :meth:`on_rank_zero`
      ("rank 0 analyses, all ranks receive") and :func:`average_gradients` (a callback's own
      model trained on every rank);
    * the error policy and its counting: :meth:`guarded` counts a failure once, :meth:`run_safely`
      logs the total of all explanation callbacks as ``xai/errors`` once per run;
    * work off the training path (:mod:`~xai_callbacks.callbacks.worker`): :meth:`analyse_later`
      hands an analysis that needs no model to a background thread on rank 0 (with
      :attr:`asynchronous`; inline otherwise), :meth:`deliver` logs its result, :meth:`flush`
      delivers it at the end of the next validation epoch, at the end of ``fit`` and on an
      exception (waiting for it if needed: counted and logged as ``xai/<Callback>/waits`` and
      ``xai/<Callback>/wait_s``).

    Args:
        every_n_epochs: while fitting, run on epochs where ``current_epoch % every_n_epochs == 0``
            and on the last epoch (``max_epochs - 1``); a standalone ``validate`` always runs.
        probe_size: number of validation samples in the fixed probe set.
        seed: seed of the probe set's stratified draw (and of the callback's own random draws).
        target: what is explained: ``"label"`` (the sample's class label), ``"prediction"`` (the
            predicted class), a target function ``fn(output, batch) -> (B,)`` scores (see
            :mod:`xai_callbacks.scoring`; ``batch`` is the probe's ``Batch(x, y, masks)``), or the
            import path ``"package.module:function"`` of one (for configs). Labels that are not
            class ids (multi-label, regression, segmentation) need a target function.
        on_error: ``"warn"``: a failure warns, is counted (logged as ``xai/errors``) and training
            goes on; ``"raise"``: it fails the run.

    Raises:
        ValueError: an argument out of its valid range (the message names what is valid).

    Example::

        class MyCallback(ExplanationCallback):
            def run(self, trainer, pl_module):
                probe = self.probe(trainer, pl_module)
                heat = explain(pl_module, probe.x, self.targets(pl_module, probe))
    """

    def __init__(self, every_n_epochs: int = 1, probe_size: int = 64, seed: int = 0, target: Any = "label",
                 on_error: str = "warn"):
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be an int >= 1, got {probe_size!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if isinstance(target, str) and target not in TARGETS:
            if ":" not in target:
                raise ValueError(f"target must be one of {TARGETS}, a function (output, batch) -> (B,) or "
                                 f"'package.module:function'; got {target!r}")
            target = _target_function(target)
        elif not isinstance(target, str) and not callable(target):
            raise ValueError(f"target must be one of {TARGETS} or a function (output, batch) -> (B,); got {target!r}")
        self.every_n_epochs, self.probe_size, self.seed, self.on_error = every_n_epochs, probe_size, seed, on_error
        self.target = target
        self.probe_indices: list[int] | None = None
        self.errors = 0
        self.last_error: str | None = None   # the last failure's message
        self._probe: Probe | None = None
        self.asynchronous = False  # subclasses that split their work set it from their argument
        self.deliveries = 0  # analyses delivered so far (the gate re-checks after late ones)
        self._worker: AnalysisWorker | None = None

    progress: Progress = Progress()  # the progress-bar line of the running work (no-op outside run_safely)

    # -- what subclasses implement -------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise NotImplementedError

    # -- schedule and error policy --------------------------------------------------------
    def should_run(self, trainer: pl.Trainer) -> bool:
        """In ``fit`` on epochs that are a multiple of ``every_n_epochs`` and on the last epoch
        (``max_epochs - 1``), so that the final model is always analysed (and gated); in every
        standalone ``validate`` (an evaluation asked for)."""
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == "validate":
            return True
        return on_last_epoch(trainer) or trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.flush(trainer)  # the previous analysis, before this epoch's gate check
        if self.should_run(trainer):
            self.run_safely(trainer, pl_module, self.run)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._worker is not None:   # the last validation's analysis runs beside training from here
            self._worker.start()

    def on_fit_end(self, trainer, pl_module) -> None:
        errors = self.errors
        if self.flush(trainer) and self.errors != errors:
            _log_error_total(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:  # keep what was computed; the run's own error is the one that propagates
            self.flush(trainer, collective=False)
        except Exception as err:
            warnings.warn(f"{type(self).__name__}: delivering the last analysis failed after {type(exception).__name__}: "
                          f"{type(err).__name__}: {err}", stacklevel=2)
        finally:
            if self._worker is not None:
                self._worker.close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._worker is not None:
            self._worker.close()

    def on_test_start(self, trainer, pl_module) -> None:
        _say_once(f"{type(self).__name__} runs in validation only (fit / validate); trainer.test computes and "
                  "logs nothing of it: call trainer.validate(model, dataloaders=<test loader>) to explain test data", self)

    @property
    def explained_methods(self) -> tuple[str, ...]:
        """The attribution methods the callback calls (checked against the model at setup)."""
        return ()

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Name, before any epoch runs, each of :attr:`explained_methods` that does not apply to
        the model's architecture (zennit's LRP composites on a transformer, attention rollout on a
        CNN, ...) with the methods that do: raised as a ``MethodNotApplicableError`` with
        ``on_error="raise"``, else warned (each epoch that tries it is then counted in ``xai/errors``)."""
        from ..attribution.transformer import MethodNotApplicableError, _architecture, applicable_methods

        if not self.explained_methods:
            return
        valid = applicable_methods(pl_module)
        bad = [m for m in self.explained_methods if m not in valid]
        if not bad:
            return
        message = (f"{type(self).__name__}: method(s) {bad} do not apply to {_architecture(pl_module)}; "
                   f"methods that apply: {valid}")
        if self.on_error == "raise":
            raise MethodNotApplicableError(message)
        warnings.warn(message, UserWarning, stacklevel=2)

    def count_error(self, message: str) -> None:
        """Warn ``"<Callback> <message>"`` and count it in :attr:`errors` (logged as ``xai/errors``):
        for a failure under ``on_error="warn"``, or a problem that skipped part of the work."""
        self.errors += 1
        self.last_error = message
        warnings.warn(f"{type(self).__name__} {message}", UserWarning, stacklevel=3)

    def guarded(self, what: str, fn, *args) -> tuple[bool, Any]:
        """Call ``fn(*args)`` under the RNG guard with the ``on_error`` policy: raise, or warn
        ``"<Callback> <what>: <error>"`` and count the failure once in :attr:`errors`.

        Returns:
            ``(True, fn's result)`` or ``(False, None)`` after a counted failure.
        """
        try:
            with rng_guard():
                return True, fn(*args)
        except Exception as err:
            if self.on_error == "raise":
                raise
            self.count_error(f"{what}: {type(err).__name__}: {err}; training goes on (on_error='warn')")
            return False, None

    def run_safely(self, trainer, pl_module, fn) -> None:
        """:meth:`guarded` ``fn(trainer, pl_module)``, then log all explanation callbacks' failures
        (``xai/errors``, once per call)."""
        # the work shows as a line of the progress bar; run() may update self.progress with its step
        with task(trainer, f"{type(self).__name__}") as self.progress:
            self.guarded(f"failed at epoch {trainer.current_epoch}", fn, trainer, pl_module)
        del self.progress  # back to the class's no-op line
        _log_error_total(trainer)

    def on_rank_zero(self, trainer, what: str, fn, *args) -> Any:
        """"Rank 0 analyses, all ranks receive": ``fn(*args)`` on global rank 0 only, its result
        (or its failure) broadcast to every rank. A failure is raised on every rank at once
        (``on_error="raise"``) or warned and counted on every rank; then the result is None."""
        result, failure = None, ""
        if trainer.is_global_zero:
            try:
                with rng_guard():
                    result = fn(*args)
            except Exception as err:  # reported after the broadcast, so all ranks stay in step
                failure = f"{type(err).__name__}: {err}"
        if trainer.world_size > 1:
            result, failure = trainer.strategy.broadcast((result, failure), src=0)
        if failure:
            if self.on_error == "raise":
                raise RuntimeError(f"{type(self).__name__} {what}: {failure}")
            self.count_error(f"{what}: {failure}; training goes on (on_error='warn')")
        return result

    # -- work off the training path -----------------------------------------------------------
    def analyse_later(self, trainer, fn, *args, failure: str = "") -> None:
        """Run ``fn(view, *args)`` on rank 0 in the background (while fitting with
        :attr:`asynchronous`), else now; its result goes to :meth:`deliver` when :meth:`flush`
        delivers it. Call it on every rank (other ranks register an empty share).

        ``fn`` must not touch the model nor the global random state (it runs beside training):
        give it CPU copies. ``view`` is :class:`~xai_callbacks.callbacks.worker.TrainerAt`, the
        trainer with this epoch and step frozen: pass it to the sinks, whose logger calls are
        recorded and made at delivery, labelled with this epoch.

        Args:
            trainer: the Lightning trainer.
            fn: the analysis, ``fn(view, *args) -> result``.
            *args: its inputs (CPU tensors / arrays; not changed afterwards).
            failure: a failure found before the handoff (``"Type: message"``): delivered as the
                analysis's failure, ``fn`` does not run.

        Raises:
            RuntimeError: the previous analysis was not delivered (call :meth:`flush` first).
        """
        if self._worker is None:
            self._worker = AnalysisWorker(name=type(self).__name__)
        worker = self._worker
        if not worker.pending:
            worker.asynchronous = self.asynchronous and trainer.state.fn == "fit"
        epoch, step = trainer.current_epoch, trainer.global_step
        if failure or not trainer.is_global_zero:
            worker.skip(epoch, step, failure=failure)
        else:
            worker.submit(epoch, step, fn, TrainerAt(trainer), *args)
        if not worker.asynchronous:
            self.flush(trainer)

    def deliver(self, trainer, result: Any) -> tuple[dict[str, float], list[str]]:
        """Take a finished analysis's ``result`` (rank 0, training thread; ``trainer`` is the
        :class:`~xai_callbacks.callbacks.worker.TrainerAt` view of its epoch): keep what the
        callback keeps, return ``(scalars, problems)``: the scalars are logged on every rank with
        the analysis's epoch, each problem is warned and counted in ``xai/errors``."""
        raise NotImplementedError

    def wait_for_analysis(self) -> None:
        """Block until the background analysis in flight, if any, has finished; it is delivered,
        as always, by the next :meth:`flush` (a benchmark calls this so that the background work
        does not share the cores with what it times)."""
        if self._worker is not None:
            self._worker.wait()

    def flush(self, trainer, collective: bool = True) -> bool:
        """Deliver the pending analysis, if any: wait for it (a wait is counted), make its logger
        calls, :meth:`deliver` it and log its scalars (``sinks.log_results``, with its epoch);
        scalars and failures are broadcast from rank 0, so call it on every rank unless
        ``collective`` is False (on an exception: no collectives, rank 0 delivers alone).

        Returns:
            Whether an analysis was delivered.

        Raises:
            RuntimeError: the analysis failed and ``on_error="raise"`` (not with ``collective=False``).
        """
        worker = self._worker
        if worker is None or not worker.pending:
            return False
        waits = worker.waits
        outcome = worker.collect()
        view = TrainerAt(trainer, outcome.epoch, outcome.step)
        scalars, problems, failure = {}, [], outcome.failure
        if trainer.is_global_zero and not failure:
            sinks.replay(outcome.calls)
            try:
                scalars, problems = self.deliver(view, outcome.result)
            except Exception as err:
                failure = f"{type(err).__name__}: {err}"
        if collective and trainer.world_size > 1:
            scalars, problems, failure = trainer.strategy.broadcast((scalars, problems, failure), src=0)
        self.deliveries += 1
        if worker.asynchronous:
            name = type(self).__name__
            sinks.log_metrics(trainer, {f"xai/{name}/waits": float(worker.waits), f"xai/{name}/wait_s": worker.wait_seconds})
            if worker.waits > waits:
                log.info("%s: training waited %.2f s for the analysis of epoch %d", name,
                         worker.wait_seconds, outcome.epoch)
        if failure and self.on_error == "raise" and collective:
            raise RuntimeError(f"{type(self).__name__} analysis of epoch {outcome.epoch} failed: {failure}")
        for p in problems + ([failure] if failure else []):
            self.count_error(f"at epoch {outcome.epoch}: {p}; training goes on (on_error='warn')")
        if collective or trainer.world_size == 1:
            sinks.log_results(view, scalars)
        return True

    def all_ranks_ok(self, trainer, ok: bool) -> bool:
        """True if ``ok`` on every DDP rank (a collective: call it on all ranks)."""
        if trainer.world_size == 1:
            return ok
        return bool(trainer.strategy.reduce_boolean_decision(bool(ok), all=True))

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

    # -- samples and targets ---------------------------------------------------------------
    def probe(self, trainer, pl_module) -> Probe:
        """The probe set on the module's device: chosen once, kept in ``state_dict``."""
        if self._probe is None:
            loader = val_dataloader(trainer)
            if self.probe_indices is None:
                self.probe_indices = select_probe(loader.dataset, self.probe_size, self.seed)
            self._probe = self.load_samples(trainer, pl_module, self.probe_indices)
        return self._probe

    def load_samples(self, trainer, pl_module, indices: Sequence[int]) -> Probe:
        """The validation samples ``indices`` as a :class:`Probe` on the module's device (read one
        by one from the dataset and collated with the loader's ``collate_fn``; no inference tensors)."""
        x, y, masks = read_samples(val_dataloader(trainer), indices)
        if y is None:
            raise ValueError("the explanation callbacks need labels: batches must be (x, y, ...) or dicts with 'y'")
        dev = pl_module.device
        return Probe(x.to(dev), torch.as_tensor(y).to(dev), {k: v.to(dev) for k, v in masks.items()},
                     torch.as_tensor(list(indices), dtype=torch.long))

    @staticmethod
    def signal_axes(trainer) -> dict[str, Any]:
        """How the validation dataset's signals (B, C, L) are drawn: ``positions`` (e.g. the
        frequencies in Hz of a spectrum's bins, drawn on a log axis) and ``channel_names``, from
        the dataset's attributes of those names (None where absent)."""
        dataset = val_dataloader(trainer).dataset
        return {"positions": getattr(dataset, "frequencies", None),
                "channel_names": getattr(dataset, "channel_names", None)}

    def select_per_class(self, trainer, classes: Sequence[int] | None, max_per_class: int) -> list[int]:
        """Up to ``max_per_class`` validation indices of each class (seeded with :attr:`seed`);
        see :func:`select_per_class`."""
        return select_per_class(val_dataloader(trainer).dataset, classes, max_per_class, self.seed)

    def targets(self, pl_module, probe: Probe) -> torch.Tensor | Target:
        """What is explained for ``probe``: its labels (class ids), the predicted classes, or the
        target function bound to ``probe.batch``.

        Raises:
            ValueError: ``target="label"`` with labels that are not class ids (names the fix).
        """
        if callable(self.target):
            return Target(self.target, probe.batch)
        if self.target == "prediction":
            with model_guard(pl_module) as model, torch.no_grad():
                out = model(probe.x.clone())
            out = class_scores(out)
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ValueError(f"target='prediction' needs a classifier's (B, n_classes) scores, got output of "
                                 f"shape {tuple(getattr(out, 'shape', ()))}; pass a target function")
            return out.argmax(1)
        y = probe.y
        if binary_labels(y):
            y = y.long()
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError(f"target='label' needs class ids (B,), but the labels have shape {tuple(y.shape)} and "
                             f"dtype {y.dtype}; pass target=<function (output, batch) -> (B,)>, e.g. "
                             "xai_callbacks.scoring.multilabel_target() or regression_target()")
        return y

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"probe_indices": self.probe_indices, "errors": self.errors}

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe_indices = state_dict.get("probe_indices")
        self.errors = state_dict.get("errors", 0)
        self._probe = None
