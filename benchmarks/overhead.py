"""How long the default callback set blocks the training loop per epoch, inline vs background.

    python benchmarks/overhead.py [--device cpu|cuda] [--models demo resnet18] [--batches 20]
    python benchmarks/overhead.py --quick     # DemoCNN only, small: a check in a few minutes

For each model it trains with the default set, every callback at its defaults
(``AttributionCallback()``, ``ExplanationMetricsCallback()`` every epoch, ``SpRAyCallback()``
every 20 epochs and on the last one), twice: with ``asynchronous=False`` (everything inline) and
with the default ``asynchronous=True`` (what needs no model in a background thread). It times
what each callback blocks in the training loop: its own work per run (the inline part and the
handoff, after the warm-up of epoch 0 where it ran later too), the logger calls of its
deliveries, and the wait for its background analysis that an epoch of 50k samples would see (the
analysis's run time beyond that epoch; the benchmark's own short epochs make training wait more:
``waits here``, measured and not counted). Each callback's time is divided by its period and
summed, and given as a share of an epoch of 50k samples at the per-sample training speed of the
inline run's last epoch (nothing runs beside it; measured in the same process, so a shared
machine's load weighs on both alike).
``background s`` is the work the workers did beside training (CPU time a GPU run would not wait
for; on the CPU it shares the cores with training: ``epoch 1 training slowdown``). A second table
gives each default metric's cost per epoch (one ``trainer.validate`` per metric, alone on the
probe set).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
import torch
from torch.utils.data import DataLoader, Dataset

from xai_callbacks import AttributionCallback, ExplanationMetricsCallback, SpRAyCallback
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN

warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "offline")
EPOCH_SAMPLES = 50_000


class RandomImages(Dataset):
    """Seeded random 3x32x32 images with 10 labels (CIFAR-sized; the content does not matter here)."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 32, 32, generator=g)
        self.targets = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


class RandomImagesModule(pl.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        self.train, self.val = RandomImages(4096, 0), RandomImages(1000, 1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=256)


class EpochTimer(pl.Callback):
    """Training time per epoch, up to the start of validation."""

    def __init__(self):
        self.train_seconds, self.samples = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n += len(batch[0]) if isinstance(batch, (list, tuple)) else len(batch["x"])

    def on_validation_start(self, trainer, pl_module):
        # validation (and the callbacks' work in it) starts when the epoch's training is done
        if trainer.sanity_checking:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.train_seconds.append(time.perf_counter() - self.start)
        self.samples.append(self.n)


def sync(pl_module):
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize()


def blocking(callback):
    """Time what the callback blocks in the training loop: per epoch, its hooks
    (``callback.blocked``: ``on_validation_epoch_end``, i.e. delivering the previous analysis,
    waiting for it if needed, and the epoch's own work), its own work alone (``callback.ran``: the
    inline part and the handoff to the worker), and ``on_fit_end`` (``callback.blocked_at_end``)."""
    callback.blocked, callback.ran, callback.blocked_at_end = {}, {}, 0.0
    epoch_end, fit_end, run = callback.on_validation_epoch_end, callback.on_fit_end, callback.run

    def timed(hook, into):
        def wrapper(trainer, pl_module):
            start = time.perf_counter()
            hook(trainer, pl_module)
            sync(pl_module)
            into[trainer.current_epoch] = into.get(trainer.current_epoch, 0.0) + time.perf_counter() - start
        return wrapper

    def on_fit_end(trainer, pl_module):
        start = time.perf_counter()
        fit_end(trainer, pl_module)
        callback.blocked_at_end += time.perf_counter() - start

    callback.on_validation_epoch_end = timed(epoch_end, callback.blocked)
    callback.run = timed(run, callback.ran)
    callback.on_fit_end = on_fit_end
    return callback


def default_set(max_per_class: int | None, asynchronous: bool):
    """The callbacks at their defaults (``max_per_class``: SpRAy's, if given)."""
    spray = {} if max_per_class is None else {"max_per_class": max_per_class}
    return [blocking(AttributionCallback(asynchronous=asynchronous)),
            blocking(ExplanationMetricsCallback(asynchronous=asynchronous)),
            blocking(SpRAyCallback(asynchronous=asynchronous, **spray))]


def per_epoch(callback, epoch_50k: float) -> tuple[float, float]:
    """(blocked, background) seconds per epoch of 50k samples: the callback's own work per run
    (after epoch 0's warm-up where it ran later too), the deliveries' logger calls, and the wait a
    50k-sample epoch would see for the background analysis (its run time beyond that epoch: the
    analysis of one epoch is delivered at the end of the next); all divided by its period."""
    runs = sorted(callback.ran)
    steady = [callback.ran[e] for e in runs if e > 0] or [callback.ran[runs[0]]]
    worker = callback._worker   # None for a callback with nothing to hand off
    flushing = sum(callback.blocked.values()) + callback.blocked_at_end - sum(callback.ran.values())
    replay = max(0.0, flushing - (worker.wait_seconds if worker else 0.0)) / len(runs)
    busy = worker.busy_seconds / len(runs) if worker and worker.asynchronous else 0.0
    blocked = sum(steady) / len(steady) + replay + max(0.0, busy - epoch_50k)
    return blocked / callback.every_n_epochs, busy / callback.every_n_epochs


class Settle(pl.Callback):
    """Before the callbacks' epoch-end work, let the background analyses of the last epoch finish
    (untimed): in an epoch of 50k samples they would have (``per_epoch`` adds the wait where they
    would not), and in the benchmark's short epochs they would share the cores with the timed work."""

    def __init__(self, callbacks):
        self.callbacks = callbacks

    def on_validation_epoch_end(self, trainer, pl_module):
        for cb in self.callbacks:
            cb.wait_for_analysis()


def fit(module, data, callbacks, device, epochs, batches):
    timer = EpochTimer()
    folder = tempfile.mkdtemp(prefix="xai-overhead-")
    # an offline W&B run, as users log: media are encoded in the worker, logged in the training thread
    logger = WandbLogger(project="xai-overhead", save_dir=folder, offline=True)
    trainer = pl.Trainer(accelerator=device, devices=1, max_epochs=epochs, limit_train_batches=batches,
                         logger=logger, default_root_dir=folder,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[timer, Settle(callbacks), *callbacks])
    trainer.fit(module, data)
    logger.experiment.finish()
    return timer


def metric_costs(make_module, data, device):
    """Seconds each default metric takes for one epoch's probe set (the metric alone)."""
    costs = {}
    for name, options in [("sparseness", {})] + metric_specs():  # the first pays the warm-up, measured again
        cb = blocking(ExplanationMetricsCallback(metrics=[{"name": name, **options}]))
        trainer = pl.Trainer(accelerator=device, devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                             default_root_dir=tempfile.mkdtemp(prefix="xai-overhead-"))
        trainer.validate(make_module(), data, verbose=False)
        costs[name] = sum(cb.blocked.values())
    return costs


def metric_specs() -> list[tuple[str, dict]]:
    """The default metrics as the callback reads them: ``(name, options)``."""
    return ExplanationMetricsCallback().specs


def model_and_data(name):
    if name == "demo":
        return (lambda: Classifier(DemoCNN())), ShortcutDigitsDataModule()
    from torchvision.models import resnet18

    return (lambda: Classifier(resnet18(num_classes=10))), RandomImagesModule(64)


def measure(name, device, epochs, batches, max_per_class):
    make_module, data = model_and_data(name)
    rows = []
    for asynchronous in (False, True):
        torch.manual_seed(0)
        callbacks = default_set(max_per_class, asynchronous)
        run = fit(make_module(), data, callbacks, device, epochs, batches)
        if not asynchronous:
            # the training speed of the inline run's last epoch (no warm-up, nothing in the
            # background beside it), for both runs: measured in the same process minutes apart,
            # so a shared machine's load weighs on training and callbacks alike
            per_sample = run.train_seconds[-1] / run.samples[-1]
            epoch_50k = per_sample * EPOCH_SAMPLES
        costs = {type(cb).__name__: per_epoch(cb, epoch_50k) for cb in callbacks}
        blocked = sum(b for b, _ in costs.values())
        rows.append({"model": name, "mode": "background" if asynchronous else "inline", "epoch_50k": epoch_50k,
                     **{k: b for k, (b, _) in costs.items()}, "background_s": sum(g for _, g in costs.values()),
                     "waits": sum(cb._worker.waits for cb in callbacks if cb._worker),
                     "wait_s": sum(cb._worker.wait_seconds for cb in callbacks if cb._worker),
                     "blocked_s": blocked, "share_50k": blocked / epoch_50k,
                     # epoch 1 trains beside the background analyses of epoch 0 (on the CPU they share cores)
                     "train_slowdown": run.train_seconds[1] / run.samples[1] / per_sample})
    return rows, metric_costs(make_module, data, device), epoch_50k


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    parser.add_argument("--epochs", type=int, default=3, help="at least 3: epoch 1 overlaps the analysis, the last not")
    parser.add_argument("--batches", type=int, default=20, help="training batches per epoch")
    parser.add_argument("--max-per-class", type=int, default=None, help="SpRAy's samples per class (default: its default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="DemoCNN only, 10 batches an epoch")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches = ["demo"], 10
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} epochs={args.epochs} batches/epoch={args.batches} "
          f"SpRAy max_per_class={args.max_per_class or SpRAyCallback().max_per_class}")
    print(f"SpRAy every {SpRAyCallback().every_n_epochs} epochs (and the last); per epoch of 50k samples:")
    print("| model | analyses | 50k epoch s | attribution s | metrics s | SpRAy s | background s "
          "| waits here (s) | blocked s/epoch | blocked / 50k epoch | epoch 1 training slowdown |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    costs = {}
    for name in args.models:
        rows, costs[name], epoch_50k = measure(name, args.device, args.epochs, args.batches, args.max_per_class)
        for r in rows:
            print(f"| {r['model']} | {r['mode']} | {r['epoch_50k']:.1f} | {r['AttributionCallback']:.2f} "
                  f"| {r['ExplanationMetricsCallback']:.2f} | {r['SpRAyCallback']:.2f} | {r['background_s']:.2f} "
                  f"| {r['waits']} ({r['wait_s']:.2f}) | {r['blocked_s']:.2f} | {r['share_50k']:.1%} "
                  f"| {r['train_slowdown']:.2f}x |", flush=True)
        costs[name] = {k: (v, v / epoch_50k) for k, v in costs[name].items()}
    print(f"\nEach default metric alone, per epoch (probe set of {ExplanationMetricsCallback().probe_size}): "
          "seconds (share of a 50k-sample epoch)")
    names = [name for name, _ in metric_specs()]
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, c in costs.items():
        print(f"| {name} | " + " | ".join(f"{c[m][0]:.2f} ({c[m][1]:.1%})" for m in names) + " |")


if __name__ == "__main__":
    main()
