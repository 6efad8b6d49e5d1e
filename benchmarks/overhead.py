"""What the default callback set adds to an epoch of training, measured side by side in one run.

    python benchmarks/overhead.py [--device cpu|cuda] [--models demo resnet18] [--batches 30]

For each model it trains with and without the default set (AttributionCallback and
ExplanationMetricsCallback every epoch on a 64-sample probe set, SpRAyCallback every 5 epochs),
times every callback call, and prints the callbacks' time per epoch as a ratio to the training
time of (a) the measured epoch and (b) an epoch of 50k samples at the measured per-sample speed.
SpRAy's cost is divided by its 5-epoch period.
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


def timed(callback):
    """Accumulate the wall time of the callback's work per epoch in ``callback.seconds``."""
    callback.seconds = {}
    work = callback.run_safely

    def run_safely(trainer, pl_module, fn):
        start = time.perf_counter()
        work(trainer, pl_module, fn)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        callback.seconds[trainer.current_epoch] = callback.seconds.get(trainer.current_epoch, 0.0) + (
            time.perf_counter() - start)

    callback.run_safely = run_safely
    return callback


def default_set(max_per_class: int):
    return [timed(AttributionCallback(probe_size=64, save_heatmaps=False)),
            timed(ExplanationMetricsCallback(probe_size=64)),
            timed(SpRAyCallback(max_per_class=max_per_class, every_n_epochs=SPRAY_EVERY, save_virelay=False))]


def fit(module, data, callbacks, device, epochs, batches):
    timer = EpochTimer()
    trainer = pl.Trainer(accelerator=device, devices=1, max_epochs=epochs, limit_train_batches=batches,
                         logger=False, default_root_dir=tempfile.mkdtemp(prefix="xai-overhead-"), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer, *callbacks])
    trainer.fit(module, data)
    return timer


def measure(name, device, epochs, batches):
    torch.manual_seed(0)
    if name == "demo":
        make_module, data, max_per_class = (lambda: Classifier(DemoCNN())), ShortcutDigitsDataModule(), 50
    else:
        from torchvision.models import resnet18

        make_module, data, max_per_class = (lambda: Classifier(resnet18(num_classes=10))), RandomImagesModule(64), 50
    base = fit(make_module(), data, [], device, epochs, batches)
    callbacks = default_set(max_per_class)
    with_cbs = fit(make_module(), data, callbacks, device, epochs, batches)
    # epoch 0 pays warm-up costs; use the later epochs of both runs
    per_sample = sum(base.train_seconds[1:]) / sum(base.samples[1:])
    per_epoch = {type(cb).__name__: sum(cb.seconds.get(e, 0.0) for e in range(1, epochs)) / (epochs - 1)
                 for cb in callbacks[:2]}
    per_epoch["SpRAyCallback"] = callbacks[2].seconds.get(0, 0.0) / SPRAY_EVERY
    added = sum(per_epoch.values())
    measured_epoch = per_sample * with_cbs.samples[-1]
    return {"model": name, "samples": with_cbs.samples[-1], "train_s": measured_epoch, **per_epoch,
            "added_s": added, "ratio_measured": added / measured_epoch,
            "ratio_50k": added / (per_sample * EPOCH_SAMPLES)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["demo", "resnet18"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="training batches per epoch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={args.threads} epochs={args.epochs} batches/epoch={args.batches}")
    print("| model | samples/epoch | train s/epoch | attribution s | metrics s | spray s (/5) | added s/epoch "
          "| added / measured epoch | added / 50k-sample epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args.device, args.epochs, args.batches)
        print(f"| {r['model']} | {r['samples']} | {r['train_s']:.2f} | {r['AttributionCallback']:.2f} "
              f"| {r['ExplanationMetricsCallback']:.2f} | {r['SpRAyCallback']:.2f} | {r['added_s']:.2f} "
              f"| {r['ratio_measured']:.2f} | {r['ratio_50k']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
