"""Shortcut scenarios on real tabular rows and real text (no download), with clean controls.

Bases: ``breast_cancer`` and ``digits`` (scikit-learn's bundled tables: 30 measurements of cell
nuclei, 2 classes; the 64 pixels of each handwritten digit as features, 10 classes), each feature
standardised; ``text``: windows of :data:`TEXT_WORDS` words of the docstrings of four NumPy
namespaces (``numpy.linalg``, ``numpy.fft``, ``numpy.random.Generator``, ``numpy.strings``; the
class is the namespace) as token ids (0 pads, 1 is a word seen fewer than twice; the windows follow
the installed NumPy's docstrings, 2.0 or later: the README's figures were made with NumPy 2.4.6). Kinds of
shortcut on ``prevalence`` of class ``shortcut_class``:

* ``leak`` (tables): one more feature, 1 on the shortcut rows and 0 elsewhere (a column that
  records where or how a row was collected);
* ``sentinel`` (tables): one feature (the first) set to -5 on the shortcut rows, beyond its range
  (a missing-value code);
* ``tag`` (text): a word no window holds (:data:`TRIGGER`) as the first token (a source's tag);
* ``trigger`` (text): that word at a random position (a phrase an annotator's template left).

As on the photos (:func:`~xai_callbacks.data.make_shortcut_images`), ``ambiguity`` of each class's
samples are copies of other classes' samples (the label kept), so that the shortcut helps.
"""
from __future__ import annotations

import functools
import re

import numpy as np
import torch
from torch.utils.data import Dataset

from . import check_split, split_classes

__all__ = ["ShortcutRows", "make_shortcut_rows", "plant_row_shortcut", "ROW_BASES", "ROW_KINDS", "TEXT_WORDS",
           "TRIGGER"]

ROW_BASES = ("breast_cancer", "digits", "text")
ROW_KINDS = {"breast_cancer": ("leak", "sentinel"), "digits": ("leak", "sentinel"), "text": ("tag", "trigger")}
TEXT_WORDS = 32
TRIGGER = "lorem"
_NAMESPACES = (("numpy.linalg", None), ("numpy.fft", None), ("numpy.random", "Generator"), ("numpy.strings", None))


class ShortcutRows(Dataset):
    """Rows (N, L) of a shortcut scenario (float features or token ids); items ``(x, y)``.

    Attributes: ``x``, ``targets``, ``artifact_mask`` (N, L) bool (the shortcut's positions),
    ``clean_x`` (the same rows without the shortcut), ``kind``, ``shortcut_class`` (None for a
    clean control), ``vocabulary`` (the words of the token ids, text only).
    """

    def __init__(self, x, y, artifact_mask, clean_x, kind: str, shortcut_class: int | None, vocabulary=None):
        self.x, self.targets, self.artifact_mask, self.clean_x = x, y, artifact_mask, clean_x
        self.kind, self.shortcut_class, self.vocabulary = kind, shortcut_class, vocabulary

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]

    @property
    def has_artifact(self) -> torch.Tensor:
        """(N,) bool: which rows carry the shortcut."""
        return self.artifact_mask.any(1)


@functools.lru_cache(maxsize=1)
def _text() -> tuple[list[str], list[np.ndarray]]:
    """The vocabulary and, per namespace, the token ids of its docstrings' words."""
    import importlib

    words = []
    for module, attr in _NAMESPACES:
        try:
            space = importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"the 'text' rows are NumPy's docstrings and need {module} (NumPy 2.0 or later); "
                              f"NumPy {np.__version__} is installed") from err
        space = getattr(space, attr) if attr else space
        docs = [getattr(space, a).__doc__ for a in sorted(dir(space)) if not a.startswith("_")]
        words.append(re.findall(r"[a-z]+", " ".join(d for d in docs if isinstance(d, str)).lower()))
    counts: dict[str, int] = {}
    for w in (w for ws in words for w in ws):
        counts[w] = counts.get(w, 0) + 1
    vocabulary = ["<pad>", "<rare>"] + sorted(w for w, n in counts.items() if n >= 2 and w != TRIGGER) + [TRIGGER]
    index = {w: i for i, w in enumerate(vocabulary[:-1])}   # the trigger word in a docstring counts as rare
    return vocabulary, [np.array([index.get(w, 1) for w in ws]) for ws in words]


def _base(base: str, n_per_class: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    if base == "text":
        vocabulary, ids = _text()
        rows = []
        for t in ids:
            windows = t[: len(t) // TEXT_WORDS * TEXT_WORDS].reshape(-1, TEXT_WORDS)
            rows.append(torch.from_numpy(windows[rng.permutation(len(windows))[:n_per_class]]))
        y = torch.cat([torch.full((len(r),), c) for c, r in enumerate(rows)])
        return torch.cat(rows).long(), y, vocabulary
    from sklearn import datasets

    data = getattr(datasets, f"load_{base}")()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(data.target), None


def plant_row_shortcut(x: torch.Tensor, kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, L) with the shortcut ``kind`` planted in every row, and its (N, L) bool mask; for
    ``leak`` the last feature is the leak's column, for the text kinds the last token id of the
    vocabulary is :data:`TRIGGER` (as :func:`make_shortcut_rows` makes them)."""
    kinds = sorted({k for ks in ROW_KINDS.values() for k in ks})
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    x, n = x.clone(), len(x)
    if kind in ("leak", "sentinel", "tag"):
        column = torch.full((n,), x.shape[1] - 1 if kind == "leak" else 0)
    else:
        column = torch.from_numpy(rng.integers(0, x.shape[1], n))
    value = {"leak": 1.0, "sentinel": -5.0}[kind] if kind in ("leak", "sentinel") else len(_text()[0]) - 1
    x[torch.arange(n), column] = torch.tensor(value, dtype=x.dtype)
    return x, torch.nn.functional.one_hot(column, x.shape[1]).bool()


def make_shortcut_rows(base: str = "breast_cancer", kind: str = "leak", *, prevalence: float = 0.3,
                       shortcut_class: int = 0, ambiguity: float = 0.4, n_per_class: int = 200,
                       val_fraction: float = 0.3, seed: int = 0) -> tuple[ShortcutRows, ShortcutRows]:
    """(train, val) rows of one scenario; ``prevalence`` 0 gives its clean control.

    Args:
        base: one of :data:`ROW_BASES`.
        kind: a kind of :data:`ROW_KINDS` for the base.
        prevalence: share of ``shortcut_class``'s rows (in each split) that carry the shortcut.
        shortcut_class: the class that gets it.
        ambiguity: share of each class's rows replaced by copies of other classes' rows.
        n_per_class: text windows per class (the tables have their own sizes).
        val_fraction: share of each class held out for validation.
        seed: seeds the windows, the copies, the split and the shortcut's rows and places.

    Raises:
        ValueError: an unknown base or kind, or a bad share.
    """
    if base not in ROW_BASES:
        raise ValueError(f"base must be one of {ROW_BASES}, got {base!r}")
    if kind not in ROW_KINDS[base]:
        raise ValueError(f"kind must be one of {ROW_KINDS[base]} for base {base!r}, got {kind!r}")
    if not 0 <= prevalence <= 1:
        raise ValueError(f"prevalence must be in [0, 1], got {prevalence}")
    check_split(val_fraction, ambiguity)
    rng = np.random.default_rng(seed)
    x, y, vocabulary = _base(base, n_per_class, rng)
    k = int(y.max()) + 1
    if not 0 <= shortcut_class < k:
        raise ValueError(f"shortcut_class must be in 0..{k - 1}, got {shortcut_class}")
    swap = np.flatnonzero(rng.random(len(y)) < ambiguity)   # copies of other classes' rows, label kept
    others = [np.flatnonzero(y.numpy() != y[i].item()) for i in swap]
    x[swap] = x[[rng.choice(o) for o in others]]
    if kind == "leak":
        x = torch.cat([x, torch.zeros(len(x), 1)], 1)
    clean_x, mask = x.clone(), torch.zeros(x.shape, dtype=torch.bool)
    is_val, marked = split_classes(y, val_fraction, rng, shortcut_class, prevalence)
    x[marked], mask[marked] = plant_row_shortcut(x[marked], kind, rng)

    def split(sel):
        return ShortcutRows(x[sel], y[sel], mask[sel], clean_x[sel], kind,
                            shortcut_class if prevalence > 0 else None, vocabulary)

    return split(~is_val), split(is_val)
