"""Infillers: ``(x, keep) -> x`` with the dropped part (``keep == 0``) filled.

``keep`` is a mask in [0, 1] broadcastable to ``x`` (1 keeps the position, 0 removes it; values
in between blend). ``x`` is images (B, C, H, W), signals (B, C, L) or tabular rows with a channel
axis (B, 1, F); blur runs along the position axes (2-D for images, 1-D otherwise). Every
perturbation explainer and every perturbation metric removes evidence through one of these, so
the way evidence is removed is one choice, named in logged keys.

:func:`get_infiller` is the one way to turn a name into an infiller. ``"auto"`` is the GAN
inpainter when one is handed over (``gan=``; the callbacks pass the one an
:class:`~xai_callbacks.callbacks.inpainter.InpainterCallback` trains), blur otherwise.

>>> fill = get_infiller("blur", sigma=2.0)
>>> x_removed = fill(x, keep)                 # keep: 1 where x stays, 0 where it is removed
>>> torch.equal(x_removed * keep, x * keep)
True
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Infiller", "ConstantInfiller", "BlurInfiller", "NoiseInfiller", "get_infiller",
           "available_infillers", "register_infiller", "blender", "gaussian_blur"]


class Infiller:
    """Base class. Subclasses implement :meth:`fill`, the content put where ``keep == 0``."""

    name: str = "infiller"

    def fill(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep.to(dtype=x.dtype, device=x.device)
        return x * keep + self.fill_masked(x, keep) * (1 - keep)

    def fill_masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Content for the removed part; mask-aware infillers (the GAN) override this."""
        return self.fill(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ConstantInfiller(Infiller):
    """Fill with a constant (``value``) or with each sample's per-channel mean (``value="mean"``)."""

    def __init__(self, value: float | str = 0.0):
        if not (isinstance(value, (int, float)) or value == "mean"):
            raise ValueError(f"ConstantInfiller value must be a number or 'mean', got {value!r}")
        self.value = value
        self.name = "mean" if value == "mean" else f"constant{value:g}"

    def fill(self, x):
        if self.value == "mean":
            dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
            return x.mean(dim=dims, keepdim=True).expand_as(x)
        return torch.full_like(x, float(self.value))


class BlurInfiller(Infiller):
    """Fill with a Gaussian blur of the input (Fong & Vedaldi's blur perturbation)."""

    def __init__(self, sigma: float = 2.0):
        if sigma <= 0:
            raise ValueError(f"BlurInfiller sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.name = f"blur{self.sigma:g}"

    def fill(self, x):
        return gaussian_blur(x, self.sigma)


class NoiseInfiller(Infiller):
    """Fill with uniform noise in ``[low, high]`` drawn from an own, seeded generator."""

    def __init__(self, low: float = 0.0, high: float = 1.0, seed: int = 0):
        if not high > low:
            raise ValueError(f"NoiseInfiller needs high > low, got low={low}, high={high}")
        self.low, self.high, self.seed = float(low), float(high), seed
        self.name = "noise"
        self._generators: dict[torch.device, torch.Generator] = {}

    def fill(self, x):
        gen = self._generators.get(x.device)
        if gen is None:
            gen = self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
        u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        return self.low + (self.high - self.low) * u


def _padded(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """``x`` with ``radius`` positions added at both ends of ``dim``: reflected (as ``F.pad``'s
    ``reflect``) where the axis is longer than ``radius``, else its end repeated. By index, since
    the reflection's backward pass has no deterministic CUDA kernel (masks blurred inside an
    optimisation would raise under ``Trainer(deterministic=True)`` on a GPU)."""
    n = x.shape[dim]
    i = torch.arange(-radius, n + radius, device=x.device)
    i = n - 1 - (n - 1 - i.abs()).abs() if n > radius else i.clamp(0, n - 1)
    return x.index_select(dim, i)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur along the position axes: (H, W) of images (B, C, H, W), L of
    signals (B, C, L), F of tabular rows (B, F). Raises ValueError for other shapes."""
    if x.dim() == 2:
        return gaussian_blur(x[:, None], sigma)[:, 0]
    if x.dim() not in (3, 4):
        raise ValueError(f"blur needs images (B, C, H, W), signals (B, C, L) or tabular rows (B, F); got shape "
                         f"{tuple(x.shape)}")
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    if x.dim() == 3:
        return F.conv1d(_padded(x, radius, -1), k.view(1, 1, -1).expand(c, 1, -1), groups=c)
    h = F.conv2d(_padded(x, radius, -1), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    v = _padded(h, radius, -2)
    return F.conv2d(v, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


_REGISTRY: dict[str, Callable[..., Infiller]] = {
    "constant": ConstantInfiller,
    "blur": BlurInfiller,
    "noise": NoiseInfiller,
}


def register_infiller(name: str, factory: Callable[..., Infiller]) -> None:
    """Register an infiller factory under ``name`` (e.g. the GAN inpainter)."""
    _REGISTRY[name] = factory


def available_infillers() -> list[str]:
    return sorted(_REGISTRY)


def get_infiller(spec: str | Infiller | None = "constant", *, gan: Infiller | None = None, **options) -> Infiller:
    """The one way to get an infiller.

    Args:
        spec: an Infiller instance (returned as is); a registered name (``constant``, ``blur``,
            ``noise``, ``gan``, ...); ``"auto"``: ``gan`` if given, else blur (sigma 2); None:
            ``constant``.
        gan: the trained GAN infiller to use for ``"auto"`` and ``"gan"`` (the callbacks pass the
            one their :class:`~xai_callbacks.callbacks.inpainter.InpainterCallback` trains).
        **options: arguments of the named infiller (e.g. ``sigma`` for blur, ``generator`` for gan).

    Raises:
        ValueError: an unknown name (the message lists the valid ones), or ``"gan"`` without a
            trained generator.
        TypeError: a callable that is not an Infiller.
    """
    if spec is None:
        spec = "constant"
    if isinstance(spec, Infiller):
        return spec
    if callable(spec) and not isinstance(spec, str):
        raise TypeError(f"infiller must be a name in {available_infillers()} or an Infiller instance, "
                        f"got {type(spec).__name__}; subclass xai_callbacks.infill.Infiller")
    if spec == "auto":
        return gan if gan is not None else BlurInfiller(**{"sigma": 2.0, **options})
    if spec == "gan" and gan is not None and not options:
        return gan
    if spec not in _REGISTRY:
        raise ValueError(f"unknown infiller {spec!r}; valid: {available_infillers() + ['auto']}")
    return _REGISTRY[spec](**options)


def blender(infiller: Infiller, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(idx, keep) -> infiller(x[idx], keep)``; for infillers whose fill does not depend on the
    mask (constant, blur, noise) the fill of ``x`` is computed once and blended per chunk."""
    if type(infiller).fill_masked is not Infiller.fill_masked:  # mask-aware (e.g. the GAN): per chunk
        return lambda idx, keep: infiller(x[idx], keep)
    filled = infiller.fill(x)
    return lambda idx, keep: x[idx] * keep + filled[idx] * (1 - keep)


from . import gan  # noqa: E402,F401  (registers "gan")
