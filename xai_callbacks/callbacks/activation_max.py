"""ActivationMaximizationCallback: what each class detector responds to, every N epochs."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .. import render, sinks
from ..activation_max import AM_OUTPUTS, GaussianDensity, activation_maximization
from ..guard import model_guard
from .base import ExplanationCallback, read_samples, val_dataloader

__all__ = ["ActivationMaximizationCallback"]

VARIANTS = ("plain", "expert", "gaussian", "generator")


class ActivationMaximizationCallback(ExplanationCallback):
    """Per class, the input that maximises the class score (Montavon et al.'s activation
    maximisation), logged as one image grid per variant, ``xai/activation_max/<variant>``
    (caption: the variant used and each class's score); the latest inputs stay in :attr:`images`,
    their scores in :attr:`scores` and the variant each ``expert`` resolved to in :attr:`kinds`.

    Variants (see :func:`xai_callbacks.activation_max.activation_maximization`):
    ``plain`` (l2 penalty), ``gaussian`` (expert: a Gaussian density fitted once to
    ``density_samples`` training inputs, drawn by seeded indices, never by iterating a
    dataloader), ``generator`` (expert: the generator of a running
    :class:`~xai_callbacks.callbacks.inpainter.InpainterCallback`, once past its warm-up), and
    ``expert``: the generator when the inpainter is trained, else the Gaussian. Runs on rank 0
    only; training is untouched (guarded model, gradients w.r.t. the optimised input only,
    forked RNG).

    Args:
        classes: the classes to visualise (None: all the model's outputs).
        variants: any of ``plain``, ``expert``, ``gaussian``, ``generator``.
        l2: weight of the l2 penalty (of ``z`` for the generator).
        prior_weight: weight of the Gaussian's log-density.
        steps, lr: Adam steps and learning rate.
        output: ``log_probability`` or ``logit`` of the class.
        density_samples: training inputs the Gaussian is fitted to.
        shrinkage: covariance shrinkage of the Gaussian.
        scale: integer upscaling of each image in the grid.
        layer: a module name: visualise the channels ``classes`` of its output (neurons / feature
            maps, mean activation) instead of classes; ``classes`` is then required.
        seed: seed of the start points and of the density samples.
        every_n_epochs, on_error: see :class:`ExplanationCallback` (the probe set is only used
            for the input shape and as the density's data when no training data is reachable).

    Raises:
        ValueError: an unknown variant or output, or ``layer`` without ``classes`` (the message
            names the valid values); with ``on_error="raise"``, the ``generator`` variant before an
            inpainter has trained its generator.

    Example::

        from xai_callbacks import ActivationMaximizationCallback, InpainterCallback

        am = ActivationMaximizationCallback(classes=[0, 1, 2], variants=["plain", "expert"], steps=100)
        Trainer(callbacks=[InpainterCallback(), am]).fit(model, datamodule=dm)
        am.images["expert"]  # (3, C, H, W): what each class detector responds to most
    """

    def __init__(self, classes: Sequence[int] | None = None, variants: Sequence[str] = ("plain", "expert"),
                 l2: float = 0.05, prior_weight: float = 1.0, steps: int = 100, lr: float = 0.05,
                 output: str = "log_probability", density_samples: int = 512, shrinkage: float = 0.1,
                 scale: int = 2, layer: str | None = None, seed: int = 0, every_n_epochs: int = 1,
                 on_error: str = "warn"):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=1, seed=seed, on_error=on_error)
        variants = [variants] if isinstance(variants, str) else list(variants)
        bad = [v for v in variants if v not in VARIANTS]
        if bad or not variants:
            raise ValueError(f"unknown activation maximisation variant(s) {bad or variants}; valid: {list(VARIANTS)}")
        if output not in AM_OUTPUTS:
            raise ValueError(f"output must be one of {list(AM_OUTPUTS)}, got {output!r}")
        if layer is not None and not classes:
            raise ValueError(f"layer={layer!r} needs classes=[channel, ...]: the channels to visualise")
        self.classes = None if classes is None else [int(c) for c in classes]
        self.variants, self.output = variants, output
        self.options = dict(l2=l2, steps=steps, lr=lr, output=output, seed=seed, layer=layer)
        self.prior_weight, self.density_samples, self.shrinkage = prior_weight, density_samples, shrinkage
        self.scale = scale
        self.density: GaussianDensity | None = None
        self.images: dict[str, torch.Tensor] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self.kinds: dict[str, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(variants=self.variants, seed=self.seed)

    # -- density and generator -----------------------------------------------------------------
    def _fit_density(self, trainer) -> GaussianDensity:
        if self.density is None:
            loader = getattr(trainer, "train_dataloader", None)
            if getattr(loader, "dataset", None) is None:
                loader = val_dataloader(trainer)
            idx = np.random.default_rng(self.seed).permutation(len(loader.dataset))[: self.density_samples]
            x = read_samples(loader, idx).x
            self.density = GaussianDensity(torch.as_tensor(x).float(), shrinkage=self.shrinkage)
        return self.density

    def _generator(self, trainer):
        """The generator of this trainer's inpainter once it has finished its warm-up, or None."""
        gan = self.gan_infiller(trainer)
        generator = getattr(gan, "generator", None)
        return generator if isinstance(generator, torch.nn.Module) else None

    # -- work ----------------------------------------------------------------------------------
    def run(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        x = self.probe(trainer, pl_module).x
        with model_guard(pl_module) as model, torch.no_grad():
            n_classes = model(x[:1].clone()).shape[1]
        classes = self.classes if self.classes is not None else list(range(n_classes))
        for variant in self.variants:
            kind = variant
            if variant == "expert":
                kind = "generator" if self._generator(trainer) is not None else "gaussian"
            extra = {}
            if kind == "gaussian":
                extra = dict(density=self._fit_density(trainer), prior_weight=self.prior_weight)
            elif kind == "generator":
                generator = self._generator(trainer)
                if generator is None:
                    raise ValueError("activation maximisation variant 'generator' needs an InpainterCallback that "
                                     "has trained its generator; use 'expert' to fall back to the Gaussian")
                extra = dict(generator=generator)
            images, scores = activation_maximization(pl_module, classes, tuple(x.shape[1:]), **self.options, **extra)
            self.images[variant], self.scores[variant], self.kinds[variant] = images.cpu(), scores.cpu(), kind
            unit = "class" if self.options["layer"] is None else f"{self.options['layer']} channel"
            caption = f"{kind}: " + ", ".join(f"{unit} {c} ({s:.2f})" for c, s in zip(classes, scores.tolist()))
            grid = render.tile_row([render.upscale(render.input_rgb(img), self.scale) for img in images])
            sinks.log_images(trainer, f"xai/activation_max/{variant}", [grid], [caption])
