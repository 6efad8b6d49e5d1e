"""How long the default callback set blocks the training loop per epoch, inline vs background.

    python benchmarks/overhead.py [--device cpu|cuda] [--models demo resnet18] [--batches 20]
    python benchmarks/overhead.py --quick     # DemoCNN only, small: a check in a few minutes

For each model it trains with the default set
(AttributionCallback and ExplanationMetricsCallback every epoch on a 64-sample probe set,
SpRAyCallback every 5 epochs) twice: SpRAy inline (``asynchronous=False``) and in the background
(``asynchronous=True``, the default). It times every callback hook that runs in the training
loop (``on_validation_epoch_end``: the inline work and any wait for the background analysis;
``on_fit_end``: the last delivery) and prints the blocked time per epoch as a share of an epoch
of 50k samples at the per-sample training speed of the run's last epoch (no warm-up, nothing in
the background; measured in the same run, so a shared machine's load weighs on both alike); SpRAy's time is divided by its 5-epoch
period. The benchmark's own epochs are short, so training may wait for the background analysis
(``waits``, measured); in the blocked figures that wait is replaced by the one a 50k-sample epoch
would see (the analysis's run time beyond that epoch's length, usually none). ``background s`` is the work the SpRAy worker did beside training (CPU time a GPU run
would not wait for). A second table gives each default metric's cost per epoch (one
``trainer.validate`` per metric, the metric alone on the probe set).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from xai_callbacks import AttributionCallback, ExplanationMetricsCallback, SpRAyCallback
from xai_callbacks.callbacks.metrics import DEFAULT_METRICS
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN

warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "offline")
EPOCH_SAMPLES = 50_000
SPRAY_EVERY = 5


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


def blocking(callback):
    """Accumulate the wall time of the callback's hooks in the training loop per epoch in
    ``callback.blocked`` (``on_validation_epoch_end``) and ``callback.blocked_at_end`` (``on_fit_end``)."""
    callback.blocked, callback.blocked_at_end = {}, 0.0
    epoch_end, fit_end = callback.on_validation_epoch_end, callback.on_fit_end

    def sync(pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_validation_epoch_end(trainer, pl_module):
        start = time.perf_counter()
        epoch_end(trainer, pl_module)
        sync(pl_module)
        e = trainer.current_epoch
        callback.blocked[e] = callback.blocked.get(e, 0.0) + time.perf_counter() - start

    def on_fit_end(trainer, pl_module):
        start = time.perf_counter()
        fit_end(trainer, pl_module)
        callback.blocked_at_end += time.perf_counter() - start

    callback.on_validation_epoch_end, callback.on_fit_end = on_validation_epoch_end, on_fit_end
    return callback


def default_set(max_per_class: int, asynchronous: bool):
    return [blocking(AttributionCallback(probe_size=64, save_heatmaps=False)),
            blocking(ExplanationMetricsCallback(probe_size=64)),
            blocking(SpRAyCallback(max_per_class=max_per_class, every_n_epochs=SPRAY_EVERY, save_virelay=False,
                                   asynchronous=asynchronous))]


def fit(module, data, callbacks, device, epochs, batches):
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator=device, devices=1, max_epochs=epochs, limit_train_batches=batches,
                         logger=False, default_root_dir=tempfile.mkdtemp(prefix="xai-overhead-"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[timer, *callbacks])
    trainer.fit(module, data)
    return timer


def metric_costs(make_module, data, device):
    """Seconds each default metric takes for one epoch's probe set (the metric alone)."""
    costs = {}
    for spec in ("sparseness",) + tuple(DEFAULT_METRICS):  # the first pays the warm-up and is measured again
        name = metric_name(spec)
        cb = blocking(ExplanationMetricsCallback(probe_size=64, metrics=[spec]))
        trainer = pl.Trainer(accelerator=device, devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                             default_root_dir=tempfile.mkdtemp(prefix="xai-overhead-"))
        trainer.validate(make_module(), data, verbose=False)
        costs[name] = sum(cb.blocked.values())
    return costs


def metric_name(spec) -> str:
    return spec if isinstance(spec, str) else spec["name"]


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
        # the training speed of this run's last epoch (no warm-up, no background analysis beside it):
        # measured minutes apart from the blocked times, so a shared machine's load weighs on both alike
        per_sample = run.train_seconds[-1] / run.samples[-1]
        epoch_50k = per_sample * EPOCH_SAMPLES
        attribution, metrics, spray = callbacks
        per_epoch = {type(cb).__name__: sum(cb.blocked.get(e, 0.0) for e in range(1, epochs)) / (epochs - 1)
                     for cb in (attribution, metrics)}
        # SpRAy ran at epoch 0: its inline work then, any wait later, the last delivery at the end
        per_epoch["SpRAyCallback"] = (sum(spray.blocked.values()) + spray.blocked_at_end) / SPRAY_EVERY
        worker = spray._worker
        # the benchmark's epochs are short, so the background analysis may not be done by the next
        # one: that wait is measured, and replaced by the wait a 50k-sample epoch would see
        wait_50k = max(0.0, worker.busy_seconds - epoch_50k) if asynchronous else 0.0
        per_epoch["SpRAyCallback"] += (wait_50k - worker.wait_seconds) / SPRAY_EVERY if asynchronous else 0.0
        blocked = sum(per_epoch.values())
        rows.append({"model": name, "spray": "background" if asynchronous else "inline",
                     "train_s": per_sample * run.samples[-1], "epoch_50k": epoch_50k, **per_epoch,
                     "background_s": (worker.busy_seconds if asynchronous else 0.0) / SPRAY_EVERY,
                     "waits": worker.waits, "wait_s": worker.wait_seconds, "blocked_s": blocked,
                     "share_50k": blocked / epoch_50k,
                     # epoch 1 trains beside the background analysis of epoch 0 (on the CPU they share cores)
                     "train_slowdown": run.train_seconds[1] / run.samples[1] / per_sample})
    return rows, metric_costs(make_module, data, device), epoch_50k


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    parser.add_argument("--epochs", type=int, default=3, help="at least 3: epoch 1 overlaps the analysis, the last not")
    parser.add_argument("--batches", type=int, default=20, help="training batches per epoch")
    parser.add_argument("--max-per-class", type=int, default=50, help="SpRAy's samples per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="DemoCNN only, 10 batches, 20 SpRAy samples per class")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batches, args.max_per_class = ["demo"], 10, 20
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} epochs={args.epochs} batches/epoch={args.batches} "
          f"SpRAy max_per_class={args.max_per_class}")
    print("| model | SpRAy | 50k epoch s | attribution s | metrics s | SpRAy blocked s (/5) | SpRAy background s (/5) "
          "| waits here (s) | blocked s/epoch | blocked / 50k epoch | epoch 1 training slowdown |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    costs = {}
    for name in args.models:
        rows, costs[name], epoch_50k = measure(name, args.device, args.epochs, args.batches, args.max_per_class)
        for r in rows:
            print(f"| {r['model']} | {r['spray']} | {r['epoch_50k']:.1f} | {r['AttributionCallback']:.2f} "
                  f"| {r['ExplanationMetricsCallback']:.2f} | {r['SpRAyCallback']:.2f} | {r['background_s']:.2f} "
                  f"| {r['waits']} ({r['wait_s']:.2f}) | {r['blocked_s']:.2f} | {r['share_50k']:.1%} "
                  f"| {r['train_slowdown']:.2f}x |", flush=True)
        costs[name] = {k: (v, v / epoch_50k) for k, v in costs[name].items()}
    print("\nEach default metric alone, per epoch (probe set of 64): seconds (share of a 50k-sample epoch)")
    names = [metric_name(spec) for spec in DEFAULT_METRICS]
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for name, c in costs.items():
        print(f"| {name} | " + " | ".join(f"{c[m][0]:.2f} ({c[m][1]:.1%})" for m in names) + " |")


if __name__ == "__main__":
    main()
