"""Instrument-like notes and their DFT magnitude and phase on a log-frequency axis, without download.

The stand-in for NSynth in the audio experiments of Heiss et al. (2020): each instrument (class)
is an additive synthesiser with its own harmonic profile, envelope, inharmonicity, noise level,
pitch range and phase law (:data:`INSTRUMENTS`). Two pairs of classes are built to be told apart
by one half of the representation only:

* ``brass`` and ``reed`` differ only in **magnitude** (a bright vs a dark spectral tilt over the
  same partials; the same pitch range, envelope, noise and phases);
* ``organ`` and ``organ_alt`` differ only in **phase** (the even partials of ``organ_alt`` start a
  quarter period later; the same magnitudes).

Representation (:class:`LogSpectrum`): the note (``sample_rate`` 16 kHz, ``n_samples`` samples)
under a Hann window, its DFT with the time origin at the window's centre, read on ``n_bins``
log-spaced frequencies from ``f_min`` 20 Hz to ``f_max`` 8000 Hz (triangular weights over the DFT
bins around each frequency); channel 0 the magnitude, power-normalised (mean square 1 over the
bins), channel 1 the phase divided by pi (in [-1, 1]). A sample is (2, n_bins).

An optional planted shortcut on a share of one class (in training and validation alike):
``hum``, a constant 50 Hz tone with a fixed phase, or ``click``, a short impulse at a fixed
time. Every sample carries ``object_mask`` (bins where the clean note has magnitude) and
``artifact_mask`` (bins where the shortcut has; empty for clean samples), both shaped like x.

>>> train, val = make_note_spectra(n_per_class=100, shortcut_class=3, seed=0)
>>> train.x.shape, train.class_names[3]
(torch.Size([420, 2, 128]), 'reed')
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from . import ShortcutDigits, SplitDataModule, check_split

__all__ = ["Instrument", "INSTRUMENTS", "NOTE_SHORTCUTS", "LogSpectrum", "NoteSpectra", "synthesize_note",
           "make_note_spectra", "NoteSpectraDataModule", "MAGNITUDE", "PHASE"]

MAGNITUDE, PHASE = 0, 1          # the channels of a spectrum
NOTE_SHORTCUTS = ("hum", "click")
HUM_HZ = 50.0


@dataclass(frozen=True)
class Instrument:
    """An additive synthesiser: partial k (1-based) has frequency ``k f0 sqrt(1 + B k^2)`` and
    amplitude ``k^-rolloff`` (times ``odd_only``'s zero for even k), jittered per note.

    Args:
        name: the class name.
        pitch: (low, high) MIDI pitch range (drawn uniformly, continuous).
        rolloff: amplitude exponent over the partials.
        odd_only: only odd partials sound.
        n_partials: partials at most (those above 7.5 kHz are dropped).
        inharmonicity: B in the stretched-partial law (strings).
        attack, decay: envelope: linear attack (s), then ``exp(-t / decay)`` (s; inf: sustained).
        noise: level of white noise relative to the note's RMS.
        even_phase: start phase of the even partials (radians); odd partials start at 0.
    """

    name: str
    pitch: tuple[float, float]
    rolloff: float = 1.0
    odd_only: bool = False
    n_partials: int = 16
    inharmonicity: float = 0.0
    attack: float = 0.02
    decay: float = math.inf
    noise: float = 0.005
    even_phase: float = 0.0


INSTRUMENTS: tuple[Instrument, ...] = (
    Instrument("bass", pitch=(28, 45), rolloff=1.2, n_partials=12, attack=0.005, decay=0.15, noise=0.003),
    Instrument("guitar", pitch=(40, 64), rolloff=1.5, n_partials=14, inharmonicity=4e-4, attack=0.002,
               decay=0.08, noise=0.005),
    Instrument("brass", pitch=(50, 70), rolloff=0.6, n_partials=15, noise=0.005),
    Instrument("reed", pitch=(50, 70), rolloff=1.6, n_partials=15, noise=0.005),
    Instrument("organ", pitch=(48, 68), rolloff=0.6, n_partials=10, noise=0.003),
    Instrument("organ_alt", pitch=(48, 68), rolloff=0.6, n_partials=10, noise=0.003, even_phase=math.pi / 2),
)


def _midi_hz(m: float) -> float:
    return 440.0 * 2 ** ((m - 69) / 12)


def synthesize_note(instrument: Instrument, rng: np.random.Generator, sample_rate: int = 16000,
                    n_samples: int = 4096) -> np.ndarray:
    """One note of ``instrument`` (float64, ``n_samples``), RMS 1 before the noise is added.

    The partials' phases are referenced to the centre of the note (where the analysis window is
    centred), so a partial's phase in the spectrum is its start phase.
    """
    f0 = _midi_hz(rng.uniform(*instrument.pitch))
    t = (np.arange(n_samples) - n_samples // 2) / sample_rate
    k = np.arange(1, instrument.n_partials + 1)
    freqs = k * f0 * np.sqrt(1 + instrument.inharmonicity * k ** 2)
    amps = k ** -instrument.rolloff * rng.lognormal(0.0, 0.25, len(k))
    if instrument.odd_only:
        amps[k % 2 == 0] = 0.0
    amps[freqs > 7500] = 0.0
    phases = np.where(k % 2 == 0, instrument.even_phase, 0.0)
    note = (amps[:, None] * np.cos(2 * np.pi * freqs[:, None] * t[None] + phases[:, None])).sum(0)
    since_onset = np.arange(n_samples) / sample_rate
    env = np.minimum(1.0, since_onset / instrument.attack) * np.exp(-since_onset / instrument.decay)
    note = note * env
    note = note / max(np.sqrt(np.mean(note ** 2)), 1e-12)
    return note + instrument.noise * rng.standard_normal(n_samples)


class LogSpectrum:
    """Windowed DFT magnitude and phase read on log-spaced frequencies (see the module docstring).

    Args:
        sample_rate: samples per second.
        n_samples: length of the analysed signal.
        n_bins: log-spaced frequencies from ``f_min`` to ``f_max`` (Hz).

    Raises:
        ValueError: a frequency range outside (0, sample_rate / 2] or fewer than 2 bins.
    """

    def __init__(self, sample_rate: int = 16000, n_samples: int = 4096, n_bins: int = 128, f_min: float = 20.0,
                 f_max: float = 8000.0):
        if not 0 < f_min < f_max <= sample_rate / 2 or n_bins < 2:
            raise ValueError(f"LogSpectrum needs 0 < f_min < f_max <= sample_rate / 2 and n_bins >= 2; got "
                             f"f_min={f_min}, f_max={f_max}, sample_rate={sample_rate}, n_bins={n_bins}")
        self.sample_rate, self.n_samples, self.n_bins = sample_rate, n_samples, n_bins
        self.frequencies = np.geomspace(f_min, f_max, n_bins)
        dft = np.fft.rfftfreq(n_samples, 1 / sample_rate)
        edges = np.geomspace(f_min, f_max, n_bins)
        ratio = edges[1] / edges[0]
        half = np.maximum(edges * (ratio - 1), dft[1])          # at least one DFT bin: interpolation
        weights = np.clip(1 - np.abs(dft[None] - edges[:, None]) / half[:, None], 0, None)
        self.weights = weights / weights.sum(1, keepdims=True)   # (n_bins, n_dft)
        self._sparse_weights = sparse.csr_matrix(self.weights)
        self.window = np.hanning(n_samples)

    def __call__(self, signals: np.ndarray) -> np.ndarray:
        """(N, n_samples) signals -> (N, 2, n_bins) float32: power-normalised magnitude, phase / pi."""
        s = np.atleast_2d(signals) * self.window
        dft = np.fft.rfft(np.fft.ifftshift(s, axes=-1), axis=-1)       # time origin at the centre
        spec = (self._sparse_weights @ dft.T).T
        mag = np.abs(spec)
        mag = mag / np.maximum(np.sqrt(np.mean(mag ** 2, axis=1, keepdims=True)), 1e-12)
        return np.stack([mag, np.angle(spec) / np.pi], axis=1).astype(np.float32)

    def to_audio(self, spectrum, n_samples: int | None = None) -> np.ndarray:
        """An approximate inverse for listening: the sum of one cosine per bin at the bin's frequency
        with its magnitude and phase (time origin at the centre), (n_samples,) float32 peak-scaled to 0.9.

        Args:
            spectrum: (2, n_bins) magnitude and phase / pi (a tensor or an array).
            n_samples: length of the sound (default: the analysed length).
        """
        a = spectrum.detach().float().cpu().numpy() if isinstance(spectrum, torch.Tensor) else np.asarray(spectrum)
        if a.shape != (2, self.n_bins):
            raise ValueError(f"to_audio needs one spectrum (2, {self.n_bins}), got shape {a.shape}")
        n = n_samples or self.n_samples
        t = (np.arange(n) - n // 2) / self.sample_rate
        mag = np.clip(a[MAGNITUDE], 0, None)
        wave = (mag[:, None] * np.cos(2 * np.pi * self.frequencies[:, None] * t[None] + np.pi * a[PHASE][:, None])
                ).sum(0) * np.hanning(n)
        peak = np.abs(wave).max()
        return (0.9 * wave / peak if peak > 0 else wave).astype(np.float32)


class NoteSpectra(ShortcutDigits):
    """Spectra of notes (items: dicts ``x, y, object_mask, artifact_mask, index``).

    Attributes beyond :class:`~xai_callbacks.data.ShortcutDigits`: ``class_names``,
    ``transform`` (the :class:`LogSpectrum`), ``shortcut``, ``shortcut_class``, and what the
    callbacks read to draw and play signals: ``frequencies`` (Hz of each bin), ``channel_names``,
    ``sample_rate`` and :meth:`to_audio`.
    """

    channel_names = ("magnitude", "phase")   # the phase channel holds the phase / pi

    def __init__(self, x, y, object_mask, artifact_mask, class_names, transform: LogSpectrum,
                 shortcut: str | None, shortcut_class: int | None):
        super().__init__(x, y, object_mask, artifact_mask)
        self.class_names, self.transform = list(class_names), transform
        self.shortcut, self.shortcut_class = shortcut, shortcut_class

    @property
    def frequencies(self) -> np.ndarray:
        return self.transform.frequencies

    @property
    def sample_rate(self) -> int:
        return self.transform.sample_rate

    def to_audio(self, spectrum) -> np.ndarray:
        """The sound of a spectrum (2, n_bins); see :meth:`LogSpectrum.to_audio`."""
        return self.transform.to_audio(spectrum)


def _shortcut_signal(kind: str, sample_rate: int, n_samples: int, level: float) -> np.ndarray:
    t = (np.arange(n_samples) - n_samples // 2) / sample_rate
    if kind == "hum":
        return level * np.cos(2 * np.pi * HUM_HZ * t)
    if kind == "click":
        s = np.zeros(n_samples)
        at = n_samples // 2 - n_samples // 8
        s[at:at + 4] = level * n_samples / 64
        return s
    raise ValueError(f"unknown shortcut {kind!r}; valid: {NOTE_SHORTCUTS} or None")


def make_note_spectra(n_per_class: int = 120, instruments: tuple[Instrument, ...] = INSTRUMENTS,
                      shortcut: str | None = "hum", shortcut_class: int | None = 3,
                      shortcut_fraction: float = 0.3, shortcut_level: float = 0.7, n_bins: int = 128,
                      n_samples: int = 4096, sample_rate: int = 16000, val_fraction: float = 0.3,
                      ambiguity: float = 0.0, seed: int = 0) -> tuple[NoteSpectra, NoteSpectra]:
    """Train and validation splits (per class, seeded) of note spectra.

    Args:
        n_per_class: notes per class (split into train and validation).
        instruments: the classes.
        shortcut: ``hum`` (50 Hz tone), ``click`` (short impulse) or None (clean data).
        shortcut_class: the class whose notes get it; None: clean data.
        shortcut_fraction: share of that class's notes (in train and validation) that carry it.
        shortcut_level: its amplitude relative to the note's RMS.
        n_bins, n_samples, sample_rate: of the representation (:class:`LogSpectrum`).
        val_fraction: share of each class held out.
        ambiguity: share of each class's notes played by another instrument (drawn uniformly) under
            the class's label, in [0, 1): the sound then tells the class only in part and the
            shortcut becomes worth learning (as real labels are noisy).
        seed: seeds every draw.

    Raises:
        ValueError: a bad shortcut, class, share or count (the message names the valid values).
    """
    if shortcut is not None and shortcut not in NOTE_SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; valid: {NOTE_SHORTCUTS} or None")
    if shortcut_class is not None and not 0 <= shortcut_class < len(instruments):
        raise ValueError(f"shortcut_class must be a class id 0..{len(instruments) - 1} or None, got {shortcut_class}")
    if not 0 <= shortcut_fraction <= 1:
        raise ValueError(f"shortcut_fraction must be in [0, 1], got {shortcut_fraction}")
    check_split(val_fraction, ambiguity)
    if n_per_class < 2:
        raise ValueError(f"n_per_class must be >= 2, got {n_per_class}")
    rng = np.random.default_rng(seed)
    transform = LogSpectrum(sample_rate, n_samples, n_bins)
    planted = shortcut is not None and shortcut_class is not None
    artifact = transform(_shortcut_signal(shortcut, sample_rate, n_samples, 1.0))[0, MAGNITUDE] if planted else None
    xs, ys, objects, artifacts, is_val = [], [], [], [], []
    for c, instrument in enumerate(instruments):
        notes = np.stack([synthesize_note(instrument, rng, sample_rate, n_samples) for _ in range(n_per_class)])
        if ambiguity > 0:   # a share of the class played by other instruments
            for i in np.flatnonzero(rng.random(n_per_class) < ambiguity):
                other = instruments[(c + rng.integers(1, len(instruments))) % len(instruments)]
                notes[i] = synthesize_note(other, rng, sample_rate, n_samples)
        clean = transform(notes)
        n_val = int(round(val_fraction * n_per_class))
        val = np.arange(n_per_class) < n_val
        marked = np.zeros(n_per_class, bool)
        if planted and c == shortcut_class:
            for split in (np.flatnonzero(val), np.flatnonzero(~val)):
                marked[split[: int(round(shortcut_fraction * len(split)))]] = True
            notes[marked] += _shortcut_signal(shortcut, sample_rate, n_samples, shortcut_level)
        x = transform(notes)
        obj = clean[:, MAGNITUDE] > 0.1 * clean[:, MAGNITUDE].max(1, keepdims=True)
        art = np.zeros_like(obj)
        if marked.any():
            art[marked] = artifact > 0.1 * artifact.max()
        xs.append(x)
        ys.append(np.full(n_per_class, c))
        objects.append(obj & ~art)
        artifacts.append(art)
        is_val.append(val)
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys)).long()
    channels = x.shape[1]
    obj = torch.from_numpy(np.concatenate(objects))[:, None].expand(-1, channels, -1).float()
    art = torch.from_numpy(np.concatenate(artifacts))[:, None].expand(-1, channels, -1).float()
    is_val = torch.from_numpy(np.concatenate(is_val))
    names = [i.name for i in instruments]
    kind = shortcut if planted else None

    def split(mask):
        return NoteSpectra(x[mask], y[mask], obj[mask].contiguous(), art[mask].contiguous(), names, transform, kind,
                           shortcut_class if planted else None)

    return split(~is_val), split(is_val)


class NoteSpectraDataModule(SplitDataModule):
    """LightningDataModule of :func:`make_note_spectra`; keyword arguments go there.

    Args:
        batch_size: samples per batch.
        num_workers: DataLoader workers.
        **data_options: arguments of :func:`make_note_spectra`.
    """

    make = staticmethod(make_note_spectra)
