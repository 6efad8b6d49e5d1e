"""Offline demo data with a planted Clever-Hans shortcut, and batch unpacking.

Shortcut scenarios on real photographs, with clean controls, are in :mod:`.shortcuts`
(:func:`make_shortcut_images`), on real tables and text in :mod:`.rows` (:func:`make_shortcut_rows`).
:func:`make_shortcut_digits` takes scikit-learn's bundled handwritten digits (real data, no
download), upscales them, and stamps a small watermark on a fraction of one class. Every sample
carries its object mask (the digit's strokes) and its artifact mask (the watermark, empty for
clean samples), so localisation metrics and SpRAy can be checked against the truth.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ["ShortcutDigits", "make_shortcut_digits", "ShortcutDigitsDataModule", "Batch", "unpack_batch",
           "ARTIFACT_KINDS", "SHORTCUT_KINDS", "ShortcutImages", "make_shortcut_images", "plant_shortcut",
           "NoteSpectra", "NoteSpectraDataModule", "make_note_spectra", "RadioMaps", "make_radio_maps",
           "ShortcutRows", "make_shortcut_rows"]

ARTIFACT_KINDS = ("square", "checker", "cross")


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor | None
    masks: dict[str, torch.Tensor]


def unpack_batch(batch: Any) -> Batch:
    """``(x, y, ...)`` tuples / lists or dicts with ``x`` / ``y`` (and optional ``*_mask``) keys."""
    if isinstance(batch, dict):
        missing = [k for k in ("x", "y") if k not in batch]
        if missing:
            huggingface = {"input_ids", "pixel_values", "labels"} & set(batch)
            hint = ("; a HuggingFace batch (input_ids / pixel_values, labels) needs them renamed in the "
                    "DataLoader's collate_fn, and the model called with x alone") if huggingface else ""
            raise ValueError(f"a dict batch needs keys 'x' and 'y' (missing {missing}); got keys {sorted(batch)}"
                             f"{hint}")
        masks = {k: v for k, v in batch.items() if k.endswith("_mask")}
        return Batch(batch["x"], batch["y"], masks)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return Batch(batch[0], batch[1], {})
    if isinstance(batch, torch.Tensor):
        return Batch(batch, None, {})
    raise ValueError(f"cannot unpack a batch of type {type(batch).__name__}: expected (x, y, ...), "
                     "a dict with 'x' and 'y', or a tensor")


def _stamp(kind: str, size: int) -> torch.Tensor:
    if kind == "square":
        return torch.ones(size, size)
    if kind == "checker":
        i = torch.arange(size)
        return ((i[:, None] + i[None, :]) % 2 == 0).float()
    if kind == "cross":
        s = torch.zeros(size, size)
        s[size // 2, :] = 1
        s[:, size // 2] = 1
        return s
    raise ValueError(f"unknown artifact kind {kind!r}; valid: {ARTIFACT_KINDS}")


class ShortcutDigits(Dataset):
    """Tensors of the demo data; items are dicts ``x, y, object_mask, artifact_mask, index``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, object_mask: torch.Tensor, artifact_mask: torch.Tensor):
        self.x, self.targets = x, y
        self.object_mask, self.artifact_mask = object_mask, artifact_mask

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.targets[i], "object_mask": self.object_mask[i],
                "artifact_mask": self.artifact_mask[i], "index": i}

    @property
    def has_artifact(self) -> torch.Tensor:
        """Boolean (N,) tensor: which samples carry the watermark."""
        return self.artifact_mask.flatten(1).any(1)


def check_split(val_fraction: float, ambiguity: float = 0.0) -> None:
    """Raise a ValueError naming ``val_fraction`` outside (0, 1) or ``ambiguity`` outside [0, 1)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not 0 <= ambiguity < 1:
        raise ValueError(f"ambiguity must be in [0, 1), got {ambiguity}")


def split_classes(y: torch.Tensor, val_fraction: float, rng: np.random.Generator, shortcut_class: int | None = None,
                  prevalence: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """A stratified split: (N,) bool ``is_val`` (``val_fraction`` of each class, shuffled by ``rng``)
    and the indices of the samples of ``shortcut_class`` that get its shortcut (``prevalence`` of
    them in each split)."""
    is_val, marked = torch.zeros(len(y), dtype=torch.bool), np.zeros(0, dtype=np.int64)
    for c in range(int(y.max()) + 1):
        idx = np.flatnonzero(y.numpy() == c)
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        is_val[idx[:n_val]] = True
        if c == shortcut_class and prevalence > 0:
            marked = np.concatenate([s[: int(round(prevalence * len(s)))] for s in (idx[:n_val], idx[n_val:])])
    return is_val, marked


def make_shortcut_digits(size: int = 32, artifact_class: int | None = 0, artifact_fraction: float = 0.25,
                         artifact_kind: str = "checker", artifact_size: int = 5,
                         artifact_position: tuple[int, int] = (1, 1), val_fraction: float = 0.3,
                         ambiguity: float = 0.0, seed: int = 0) -> tuple[ShortcutDigits, ShortcutDigits]:
    """Train and validation splits (stratified, seeded) of the shortcut digits.

    Args:
        size: side of the upscaled square images (the originals are 8x8).
        artifact_class: the class whose samples get the watermark; None plants none.
        artifact_fraction: share of that class's samples (in train and val) that carry it.
        artifact_kind: ``square``, ``checker`` or ``cross``.
        artifact_size: side of the watermark in pixels.
        artifact_position: (row, column) of its top-left corner.
        val_fraction: share of each class held out for validation.
        ambiguity: share of the samples (of every class) that show another class's digit, in
            [0, 1): the digit then tells the class only in part and the watermark becomes worth
            learning, as a shortcut is in real data (0: clean digits, easy without it).
        seed: seeds the split, the ambiguous samples and the choice of watermarked samples.

    Raises:
        ValueError: for a fraction or ambiguity out of range, an artifact that does not fit,
            or an artifact class that is not a digit.
    """
    from sklearn.datasets import load_digits

    if not 0 <= artifact_fraction <= 1:
        raise ValueError(f"artifact_fraction must be in [0, 1], got {artifact_fraction}")
    check_split(val_fraction, ambiguity)
    r, c = artifact_position
    if not (0 <= r <= size - artifact_size and 0 <= c <= size - artifact_size):
        raise ValueError(f"artifact at {artifact_position} of size {artifact_size} does not fit a {size}x{size} image")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    if artifact_class is not None and not 0 <= artifact_class < 10:
        raise ValueError(f"artifact_class must be a digit 0..9 or None, got {artifact_class}")
    rng = np.random.default_rng(seed)
    if ambiguity > 0:  # these samples show a digit of another class under their own label
        swap = np.flatnonzero(rng.random(len(y)) < ambiguity)
        x[swap] = x[[rng.choice(np.flatnonzero(digits.target != digits.target[i])) for i in swap]]
    object_mask = (x > 0.25).float()
    artifact_mask = torch.zeros_like(x)
    is_val = torch.zeros(len(y), dtype=torch.bool)
    stamp = _stamp(artifact_kind, artifact_size)
    for k in range(10):
        idx = np.flatnonzero(digits.target == k)
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        is_val[idx[:n_val]] = True
        if k == artifact_class:
            for split in (idx[:n_val], idx[n_val:]):
                marked = split[: int(round(artifact_fraction * len(split)))]
                artifact_mask[marked, :, r:r + artifact_size, c:c + artifact_size] = 1.0
                x[marked, :, r:r + artifact_size, c:c + artifact_size] = stamp
    object_mask = object_mask * (1 - artifact_mask)

    def split(mask):
        return ShortcutDigits(x[mask], y[mask], object_mask[mask], artifact_mask[mask])

    return split(~is_val), split(is_val)


class SplitDataModule(pl.LightningDataModule):
    """Train / validation loaders of a data factory ``make(**data_options) -> (train, val)``
    (``make`` a class attribute of the subclass), built once at ``setup``."""

    make: Any = None

    def __init__(self, batch_size: int = 64, num_workers: int = 0, **data_options):
        super().__init__()
        self.batch_size, self.num_workers, self.data_options = batch_size, num_workers, data_options
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = type(self).make(**self.data_options)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class ShortcutDigitsDataModule(SplitDataModule):
    """LightningDataModule of :func:`make_shortcut_digits`; keyword arguments go there."""

    make = staticmethod(make_shortcut_digits)


from .shortcuts import SHORTCUT_KINDS, ShortcutImages, make_shortcut_images, plant_shortcut  # noqa: E402
from .notes import NoteSpectra, NoteSpectraDataModule, make_note_spectra  # noqa: E402
from .radio import RadioMaps, make_radio_maps  # noqa: E402
from .rows import ShortcutRows, make_shortcut_rows  # noqa: E402
