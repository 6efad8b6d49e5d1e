"""Shortcut scenarios on real photographs and digits, each with its clean control.

The images are real and need no download: crops of the photographs bundled with scikit-image
(``skimage.data``: textures and scenes, no central object) or scikit-learn's handwritten digits.
A shortcut (Clever-Hans cue) is planted on a share (``prevalence``) of one class's samples, in
training and validation alike; ``prevalence=0`` gives the clean control (the same images, no
shortcut). The kinds (:data:`SHORTCUT_KINDS`):

* ``stamp``: a small coloured checker at one fixed position (top left; its side ``stamp_side``,
  :data:`STAMP_SIDE` of the image side by default);
* ``tags``: the same checker at one of the four corners, drawn per sample;
* ``patch``: a patch of a stripe texture (random phase) at a random position;
* ``frame``: a coloured border around the image;
* ``colour``: a global colour shift (brightness on one-channel images);
* ``watermark``: a faint high-frequency pattern spread over the whole image;
* ``blur``: the image's fine detail removed (a Gaussian blur, sigma ``size / 32``: a softer lens
  or a resampled source);
* ``noise``: sensor-like noise, independent Gaussian per pixel (std 0.06), drawn per sample;
* ``grey``: the colour removed (each pixel its channel mean; RGB images only);
* ``background``: every sample is an object (a disc cut from its class's photo) on a background;
  the backgrounds come from a neutral pool, except that the shortcut samples get one fixed,
  class-specific background;
* ``caption``: two white characters on a dark box in the bottom right corner (a date stamp, a
  scanner's or a hospital's marker);
* ``line``: a thin magenta line across the image at a random row (a scanner's line);
* ``marker``: a yellow disc at a random place (a sticker, a marker pen);
* ``vignette``: the corners darkened (a lens);
* ``edge``: a grey bar along the left edge (a film or scanner border);
* ``logo``: scikit-image's logo (on its white square), a quarter of the image side, in the top
  right corner (a broadcaster's or an archive's logo: a real graphic, smooth and colourful, unlike
  the checker).

Every dataset keeps, per sample, the object mask, the artifact mask (where the shortcut is; the
whole image for global kinds), and the same image without its shortcut (``clean_x``), so a
benchmark can intervene: remove the shortcut from its samples, or paste it onto other classes'
samples with :func:`plant_shortcut`.
"""
from __future__ import annotations

import functools
import numpy as np
import torch
import torch.nn.functional as F

from ..infill import gaussian_blur
from . import ShortcutDigits, check_split, split_classes

__all__ = ["SHORTCUT_KINDS", "PHOTO_CLASSES", "BACKGROUND_POOL", "STAMP_SIDE", "ShortcutImages",
           "make_shortcut_images", "plant_shortcut", "photo_crops"]

SHORTCUT_KINDS = ("stamp", "tags", "patch", "frame", "colour", "watermark", "blur", "noise", "grey", "background",
                  "caption", "line", "marker", "vignette", "edge", "logo")
PHOTO_CLASSES = ("brick", "grass", "gravel", "moon", "coffee", "chelsea", "astronaut", "rocket")
BACKGROUND_POOL = ("camera", "page", "text", "clock", "coins")
#: scikit-learn's sample photos (``sklearn.datasets.load_sample_image``), usable as class photos too
SKLEARN_PHOTOS = ("china", "flower")
SHORTCUT_BACKGROUND = "immunohistochemistry"
#: The default side of the ``stamp`` and the ``tags``, a share of the image side (6 pixels at 32).
STAMP_SIDE = 3 / 16
_STAMP_COLOUR = (1.0, 0.1, 0.1)
_FRAME_COLOUR = (0.1, 0.9, 1.0)
_COLOUR_SHIFT = (0.15, 0.0, -0.15)
_LINE_COLOUR = (1.0, 0.0, 1.0)
_MARKER_COLOUR = (1.0, 0.9, 0.0)
# the caption's characters "R4" as 3x5 bitmaps, one column apart
_CAPTION = torch.tensor([[1, 1, 0, 0, 1, 0, 1],
                         [1, 0, 1, 0, 1, 0, 1],
                         [1, 1, 0, 0, 1, 1, 1],
                         [1, 0, 1, 0, 0, 0, 1],
                         [1, 0, 1, 0, 0, 0, 1]], dtype=torch.float32)


class ShortcutImages(ShortcutDigits):
    """Tensors of a shortcut scenario (items: dicts ``x, y, object_mask, artifact_mask, index``).

    Attributes beyond :class:`~xai_callbacks.data.ShortcutDigits`: ``clean_x`` (the same images
    without the shortcut), ``kind``, ``shortcut_class``, ``prevalence``, ``stamp_side``.
    """

    def __init__(self, x, y, object_mask, artifact_mask, clean_x, kind: str, shortcut_class: int | None,
                 prevalence: float, stamp_side: float = STAMP_SIDE):
        super().__init__(x, y, object_mask, artifact_mask)
        self.clean_x, self.kind, self.shortcut_class, self.prevalence = clean_x, kind, shortcut_class, prevalence
        self.stamp_side = stamp_side


def _photo(name: str) -> torch.Tensor:
    """(3, H, W) float photo in [0, 1] from ``skimage.data``, or one of scikit-learn's two sample
    photos (:data:`SKLEARN_PHOTOS`)."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        fn = functools.partial(load_sample_image, f"{name}.jpg")
    if fn is None:
        raise ValueError(f"skimage.data has no image {name!r} (nor is it one of scikit-learn's {SKLEARN_PHOTOS}); "
                         f"valid class photos: {PHOTO_CLASSES}")
    img = np.asarray(fn())
    if img.dtype == bool:
        img = img.astype(np.float32) * 255
    img = torch.tensor(img, dtype=torch.float32) / 255.0
    if img.dim() == 2:
        img = img[..., None].expand(-1, -1, 3)
    return img[..., :3].permute(2, 0, 1).contiguous()


def photo_crops(name: str, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """(n, 3, size, size) random square crops (an eighth to a half of the shorter side, random
    horizontal flips) of the photo ``name``, resized to ``size``.

    Args:
        name: a ``skimage.data`` image or one of :data:`SKLEARN_PHOTOS`.
        n: number of crops.
        size: side of the output images.
        rng: numpy generator of the crop positions.
    """
    from torchvision.ops import roi_align

    img = _photo(name)
    h, w = img.shape[1:]
    short = min(h, w)
    side = rng.uniform(short / 8, short / 2, n)
    top, left = rng.uniform(0, h - side), rng.uniform(0, w - side)
    boxes = torch.tensor(np.stack([np.zeros(n), left, top, left + side, top + side], 1), dtype=torch.float32)
    crops = roi_align(img[None], boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=4,
                      aligned=True)
    flip = torch.from_numpy(rng.random(n) < 0.5)
    crops[flip] = crops[flip].flip(-1)
    return crops.clamp(0, 1)


def _colour(rgb: tuple[float, float, float], channels: int) -> torch.Tensor:
    """(channels, 1, 1): the colour ``rgb`` on RGB images, white on one-channel ones."""
    return torch.tensor(rgb if channels == 3 else (1.0,)).view(channels, 1, 1)


def _checker(side: int, channels: int) -> torch.Tensor:
    i = torch.arange(side)
    board = ((i[:, None] // max(1, side // 3) + i[None, :] // max(1, side // 3)) % 2).float()
    colour = _colour(_STAMP_COLOUR, channels)
    return board * colour + (1 - board) * (1 - colour)


def plant_shortcut(x: torch.Tensor, kind: str, object_mask: torch.Tensor | None = None, seed: int = 0,
                   stamp_side: float = STAMP_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Plant the shortcut ``kind`` on images ``x``; returns the images and the artifact masks.

    Args:
        x: (N, C, H, W) images in [0, 1], C = 1 or 3; sizes (stamp, patch, frame, caption, line,
            marker, logo, blur) scale with the shorter side ``min(H, W)``.
        kind: one of :data:`SHORTCUT_KINDS`.
        object_mask: (N, 1, H, W) the object's disc, needed for ``background`` (everything else
            becomes the shortcut background).
        seed: seeds the per-sample draws (positions, phases, background crops).
        stamp_side: the side of the ``stamp`` and the ``tags`` as a share of the image's shorter side
            (at least 2 pixels), in (0, 0.5).

    Raises:
        ValueError: for an unknown kind, a missing object mask, a ``stamp_side`` outside (0, 0.5), or
            ``grey`` on images that are not RGB.
    """
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"unknown shortcut kind {kind!r}; valid: {SHORTCUT_KINDS}")
    if not 0 < stamp_side < 0.5:
        raise ValueError(f"stamp_side must be in (0, 0.5) (a share of the image side), got {stamp_side}")
    n, c, h, w = x.shape
    short = min(h, w)   # what sizes scale with
    rng = np.random.default_rng(seed)
    x, mask = x.clone(), torch.zeros(n, 1, h, w)
    if kind in ("stamp", "tags"):
        side = max(2, round(stamp_side * short))
        stamp = _checker(side, c)
        corners = [(1, 1), (1, w - side - 1), (h - side - 1, 1), (h - side - 1, w - side - 1)]
        where = np.zeros(n, int) if kind == "stamp" else rng.integers(0, 4, n)
        for i, k in enumerate(where):
            r, q = corners[k]
            x[i, :, r:r + side, q:q + side] = stamp
            mask[i, :, r:r + side, q:q + side] = 1
    elif kind == "patch":
        side = max(4, short // 4)
        yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        for i in range(n):
            phase = rng.integers(0, 3)
            stripes = ((yy + xx + phase) % 3 == 0).float()
            r, q = rng.integers(0, (h - side + 1, w - side + 1))
            x[i, :, r:r + side, q:q + side] = stripes
            mask[i, :, r:r + side, q:q + side] = 1
    elif kind == "frame":
        width = max(1, short // 16)
        mask[:, :, :width], mask[:, :, -width:], mask[:, :, :, :width], mask[:, :, :, -width:] = 1, 1, 1, 1
        colour = _colour(_FRAME_COLOUR, c)
        x = x * (1 - mask) + colour * mask
    elif kind == "colour":
        shift = torch.tensor(_COLOUR_SHIFT if c == 3 else (0.15,)).view(1, c, 1, 1)
        x, mask = (x + shift).clamp(0, 1), torch.ones_like(mask)
    elif kind == "watermark":
        board = ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2).float() * 2 - 1
        x, mask = (x + 0.06 * board).clamp(0, 1), torch.ones_like(mask)
    elif kind == "blur":
        x, mask = gaussian_blur(x, short / 32), torch.ones_like(mask)
    elif kind == "noise":
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2 ** 31))))
        x, mask = x + 0.06 * noise, torch.ones_like(mask)
    elif kind == "grey":
        if c != 3:
            raise ValueError(f"the 'grey' shortcut removes colour and needs RGB images, got {c} channel(s)")
        x, mask = x.mean(1, keepdim=True).expand_as(x), torch.ones_like(mask)
    elif kind == "caption":
        scale = max(1, short // 32)
        box = F.pad(_CAPTION, (1, 1, 1, 1)).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        bh, bw = box.shape
        r, q = h - bh - 1, w - bw - 1
        x[:, :, r:r + bh, q:q + bw] = 0.05 + 0.95 * box
        mask[:, :, r:r + bh, q:q + bw] = 1
    elif kind == "line":
        t = max(1, short // 32)
        colour = _colour(_LINE_COLOUR, c)
        for i, r in enumerate(rng.integers(2, h - t - 1, n)):
            x[i, :, r:r + t] = colour
            mask[i, :, r:r + t] = 1
    elif kind == "marker":
        radius = short / 10
        yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        colour = _colour(_MARKER_COLOUR, c)
        for i, (cy, cx) in enumerate(rng.uniform(radius + 1, (h - radius - 1, w - radius - 1), (n, 2))):
            disc = (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2).float()
            x[i] = x[i] * (1 - disc) + colour * disc
            mask[i, 0] = disc
    elif kind == "vignette":
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        x, mask = x * (1 - 0.6 * ((yy ** 2 + xx ** 2) / 2) ** 1.5), torch.ones_like(mask)
    elif kind == "edge":
        t = max(2, w // 10)
        x[:, :, :, :t], mask[:, :, :, :t] = 0.5, 1
    elif kind == "logo":
        side = max(4, short // 4)
        x[:, :, 1:1 + side, w - side - 1:w - 1] = _logo(side, c)
        mask[:, :, 1:1 + side, w - side - 1:w - 1] = 1
    else:  # background
        if object_mask is None:
            raise ValueError("the 'background' shortcut needs object_mask (N, 1, H, W): the object's disc")
        background = photo_crops(SHORTCUT_BACKGROUND, n, max(h, w), rng)[:, :, :h, :w]
        if c == 1:
            background = background.mean(1, keepdim=True)
        mask = 1 - object_mask.float()
        x = x * object_mask + background * mask
    return x.clamp(0, 1), mask


@functools.lru_cache(maxsize=8)
def _logo(side: int, channels: int) -> torch.Tensor:
    """(channels, side, side) in [0, 1]: ``skimage.data.logo()`` (opaque, on white) at ``side``
    pixels, its channels' mean on one-channel images; read once per size (callers copy it)."""
    import skimage.data

    rgb = torch.tensor(np.asarray(skimage.data.logo())[..., :3], dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    rgb = F.interpolate(rgb, size=(side, side), mode="area")[0]
    return rgb if channels == 3 else rgb.mean(0, keepdim=True)


def _disc(size: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    r = torch.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2)
    return (r <= radius).float()[None, None]


def _digits(classes: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target < classes
    x = torch.tensor(digits.images[keep], dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target[keep], dtype=torch.long)


def make_shortcut_images(kind: str = "stamp", base: str = "photos", classes: int | tuple[str, ...] = 4,
                         size: int = 32, n_per_class: int = 200, shortcut_class: int = 0,
                         prevalence: float = 0.3, ambiguity: float = 0.4, val_fraction: float = 0.3, seed: int = 0,
                         stamp_side: float = STAMP_SIDE) -> tuple[ShortcutImages, ShortcutImages]:
    """Train and validation splits of one shortcut scenario (``prevalence=0``: its clean control).

    Args:
        kind: the shortcut, one of :data:`SHORTCUT_KINDS`.
        base: ``"photos"`` (crops of ``skimage.data`` photographs, RGB) or ``"digits"``
            (scikit-learn's digits, one channel; ``n_per_class`` is ignored, about 180 per class).
        classes: number of classes (the first of :data:`PHOTO_CLASSES` or digits ``0..k-1``),
            or the photo names.
        size: side of the square images.
        n_per_class: crops per class (photos).
        shortcut_class: the class whose samples carry the shortcut.
        prevalence: share of that class's samples (in each split) with the shortcut, in [0, 1].
        ambiguity: share of each class's samples whose content comes from the other classes'
            photos (drawn uniformly), in [0, 1): content then separates the classes only in part,
            as in real data, and a shortcut becomes worth learning (photos only). 0.4 by default,
            as in ``benchmarks/shortcuts.py`` and :func:`~xai_callbacks.data.make_shortcut_rows`:
            at 0 the photos alone mostly tell the classes apart, so most trained models ignore a
            planted shortcut (43 of 52 benchmark models void), and deep models learn the photos so
            well that a class's own distinctive content (a sky only one photo has) transfers as a
            stamp does.
        val_fraction: share of each class held out for validation.
        seed: seeds crops, split, the choice of shortcut samples and the shortcut's draws.
        stamp_side: the side of the ``stamp`` and the ``tags`` (see :func:`plant_shortcut`).

    Raises:
        ValueError: for an unknown kind or base, a bad class count, prevalence or fraction, or a bad
            stamp side where a shortcut is planted (``prevalence > 0``).
    """
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"unknown shortcut kind {kind!r}; valid: {SHORTCUT_KINDS}")
    if base not in ("photos", "digits"):
        raise ValueError(f"base must be 'photos' or 'digits', got {base!r}")
    if not 0 <= prevalence <= 1:
        raise ValueError(f"prevalence must be in [0, 1], got {prevalence}")
    check_split(val_fraction, ambiguity)
    names = tuple(classes) if not isinstance(classes, int) else None
    k = len(names) if names else int(classes)
    limit = len(PHOTO_CLASSES) if base == "photos" else 10
    if not 2 <= k <= (len(names) if names else limit):
        raise ValueError(f"classes must be between 2 and {limit} for base {base!r}, got {classes!r}")
    if not 0 <= shortcut_class < k:
        raise ValueError(f"shortcut_class must be in 0..{k - 1}, got {shortcut_class}")
    rng = np.random.default_rng(seed)
    if base == "photos":
        names = names or PHOTO_CLASSES[:k]
        x = torch.cat([photo_crops(nm, n_per_class, size, rng) for nm in names])
        y = torch.arange(k).repeat_interleave(n_per_class)
        if ambiguity > 0:  # a share of each class shows another class's photo
            swap = np.flatnonzero(rng.random(len(y)) < ambiguity)
            source = (y[swap].numpy() + rng.integers(1, k, len(swap))) % k
            x[swap] = x[source * n_per_class + rng.integers(0, n_per_class, len(swap))]
    else:
        x, y = _digits(k, size)
    channels = x.shape[1]
    if kind == "grey" and prevalence > 0 and (x.amax(1) - x.amin(1))[y == shortcut_class].max() < 1e-3:
        raise ValueError(f"the 'grey' shortcut removes colour, but class {shortcut_class} of {names or base} has "
                         f"no colour; use colour photos (e.g. classes={PHOTO_CLASSES[4:]})")
    if kind == "background":
        disc = _disc(size, 0.32 * size)
        pool = torch.cat([photo_crops(nm, -(-len(x) // len(BACKGROUND_POOL)), size, rng) for nm in BACKGROUND_POOL])
        pool = pool[torch.from_numpy(rng.permutation(len(pool))[: len(x)])]
        if channels == 1:
            pool = pool.mean(1, keepdim=True)
        x = x * disc + pool * (1 - disc)
        object_mask = disc.expand(len(x), 1, size, size).clone()
    else:
        object_mask = torch.ones(len(x), 1, size, size) if base == "photos" else (x.amax(1, keepdim=True) > 0.25).float()
    clean_x, artifact_mask = x.clone(), torch.zeros(len(x), 1, size, size)
    is_val, marked = split_classes(y, val_fraction, rng, shortcut_class, prevalence)
    if len(marked):
        planted, m = plant_shortcut(x[marked], kind, object_mask[marked], seed=seed + 1, stamp_side=stamp_side)
        x[marked], artifact_mask[marked] = planted, m
    object_mask = object_mask * (1 - artifact_mask)

    def split(sel):
        return ShortcutImages(x[sel], y[sel], object_mask[sel], artifact_mask[sel], clean_x[sel], kind,
                              shortcut_class if prevalence > 0 else None, prevalence, stamp_side)

    return split(~is_val), split(is_val)
