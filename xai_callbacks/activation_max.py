"""Activation maximisation (Montavon, Samek & Mueller 2018, section 3): what input does a class
detector respond to most?

* plain: ``x* = argmax_x  s_c(x) - l2 * ||x||^2`` (the l2 penalty is a Gaussian prior at 0);
* expert, Gaussian: ``x* = argmax_x  s_c(x) + prior_weight * log N(x; mu, Sigma)``, the density
  fitted to training samples (:class:`GaussianDensity`), so the result looks like data;
* expert, generator: ``x* = G(z*)``, ``z* = argmax_z  s_c(G(z)) - l2 * ||z||^2``, where ``G`` is
  a generative model of the data (the GAN inpainter's generator asked to fill an empty image
  from the noise ``z``): the search runs in the generator's code space.

``s_c`` is the log-probability (default, the tutorial's ``log p(w_c | x)``) or the logit of class
``c``. All classes are optimised in one batch with Adam from a start drawn from an own seeded
generator; gradients are taken with ``torch.autograd.grad`` w.r.t. the optimised input only,
inside :func:`~xai_callbacks.guard.model_guard` for the classifier and the generator.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from .attribution import model_scores
from .guard import model_guard

__all__ = ["GaussianDensity", "activation_maximization", "AM_OUTPUTS"]

AM_OUTPUTS = ("log_probability", "logit")


class GaussianDensity:
    """A Gaussian fitted to samples (N, ...): mean and a shrunk covariance
    ``(1 - shrinkage) * S + shrinkage * mean(diag(S)) * I`` (full up to ``max_full`` dimensions,
    diagonal above).

    Args:
        samples: training inputs (N, ...), N >= 2.
        shrinkage: weight of the scaled identity in the covariance, in (0, 1].
        max_full: largest dimension with a full covariance.

    Raises:
        ValueError: fewer than 2 samples or a shrinkage outside (0, 1].
    """

    def __init__(self, samples: torch.Tensor, shrinkage: float = 0.1, max_full: int = 4096):
        if samples.shape[0] < 2:
            raise ValueError(f"GaussianDensity needs at least 2 samples, got {samples.shape[0]}")
        if not 0 < shrinkage <= 1:
            raise ValueError(f"GaussianDensity shrinkage must be in (0, 1], got {shrinkage}")
        flat = samples.detach().double().flatten(1)
        self.shape = tuple(samples.shape[1:])
        self.mean = flat.mean(0)
        centred = flat - self.mean
        d = flat.shape[1]
        self.full = d <= max_full
        if self.full:
            cov = centred.T @ centred / (flat.shape[0] - 1)
            scale = cov.diagonal().mean().clamp_min(1e-12)
            cov = (1 - shrinkage) * cov + shrinkage * scale * torch.eye(d, dtype=cov.dtype)
            self.precision = torch.linalg.inv(cov)
        else:
            var = centred.pow(2).sum(0) / (flat.shape[0] - 1)
            var = (1 - shrinkage) * var + shrinkage * var.mean().clamp_min(1e-12)
            self.precision = 1 / var
        self.mean, self.precision = self.mean.float(), self.precision.float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised log density (B,): ``-1/2 (x - mu)^T Sigma^-1 (x - mu)``."""
        c = x.flatten(1) - self.mean.to(x.device)
        p = self.precision.to(x.device)
        return -0.5 * ((c @ p) * c).sum(1) if self.full else -0.5 * (c * c * p).sum(1)


def _class_scores(out: torch.Tensor, classes: torch.Tensor, output: str) -> torch.Tensor:
    if output == "log_probability":
        out = out.log_softmax(dim=1)
    return out.gather(1, classes[:, None])[:, 0]


def activation_maximization(model: nn.Module, classes: Sequence[int] | torch.Tensor, shape: Sequence[int], *,
                            l2: float = 0.05, density: GaussianDensity | None = None, prior_weight: float = 1.0,
                            generator: nn.Module | None = None, noise_channels: int | None = None,
                            steps: int = 100, lr: float = 0.05, output: str = "log_probability",
                            init_std: float = 0.01, seed: int = 0, layer: str | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (K, *shape) that maximise each class's score (or each chosen neuron's activation),
    and those scores (K,).

    Args:
        model: classifier returning (B, n_classes) scores.
        classes: the K classes, or with ``layer`` the K channels of that layer.
        shape: the shape of one input, e.g. (C, H, W).
        l2: weight of ``||x||^2`` (plain), or of ``||z||^2`` (generator).
        density: expert variant with this Gaussian (replaces the l2 penalty, starts at its mean).
        prior_weight: weight of the density's log-probability.
        generator: expert variant through this generator ``G(x, keep, noise)`` (an
            :class:`~xai_callbacks.infill.gan.InpaintGenerator`), optimising the noise ``z``.
        noise_channels: channels of ``z`` (default: the generator's ``config["noise_channels"]``).
        steps: Adam steps; lr: Adam learning rate.
        output: ``log_probability`` or ``logit`` of the class.
        init_std: std of the random start (plain around 0; generator: ``z``).
        seed: seed of the start (an own generator; the global RNG is not used).
        layer: a module name: maximise the mean activation of channel ``classes[k]`` of its
            output (a neuron or feature map) instead of a class score (``output`` is then unused).

    Raises:
        ValueError: bad options, an unknown layer or channel, or both ``density`` and
            ``generator`` given.
    """
    if output not in AM_OUTPUTS:
        raise ValueError(f"activation_maximization output must be one of {list(AM_OUTPUTS)}, got {output!r}")
    if steps < 1 or not lr > 0 or l2 < 0:
        raise ValueError(f"activation_maximization needs steps >= 1, lr > 0, l2 >= 0; got {steps}, {lr}, {l2}")
    if density is not None and generator is not None:
        raise ValueError("activation_maximization takes a density or a generator, not both")
    if density is not None and tuple(density.shape) != tuple(shape):
        raise ValueError(f"the density was fitted to inputs of shape {density.shape}, not {tuple(shape)}")
    device = next(iter(model.parameters()), torch.empty(0)).device
    classes = torch.as_tensor(classes, dtype=torch.long, device=device).reshape(-1)
    k, shape = len(classes), tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    with model_guard(model) as module:
        if generator is not None:
            channels = noise_channels or generator.config["noise_channels"]
            start = init_std * torch.randn((k, channels, *shape[1:]), generator=gen)
        elif density is not None:
            start = density.mean.view(1, *density.shape).expand(k, *density.shape).clone()
        else:
            start = init_std * torch.randn((k, *shape), generator=gen)
        param = start.to(device).requires_grad_(True)
        if layer is not None:
            modules = dict(module.named_modules())
            if layer not in modules or not layer:
                raise ValueError(f"activation_maximization layer {layer!r} not found; module names: "
                                 f"{[n for n in modules if n][:40]}")

        def objective_scores(x):
            if layer is None:
                return _class_scores(model_scores(module, x), classes, output)
            seen = []

            def keep_output(module_, inputs, out):
                seen.append(out)

            handle = modules[layer].register_forward_hook(keep_output)
            try:
                module(x)
            finally:
                handle.remove()
            act = seen[0]
            if int(classes.max()) >= act.shape[1]:
                raise ValueError(f"layer {layer!r} has {act.shape[1]} channels; got channels {classes.tolist()}")
            return act.gather(1, classes.view(-1, *([1] * (act.dim() - 1))).expand(-1, 1, *act.shape[2:])) \
                .flatten(1).mean(1)

        opt = torch.optim.Adam([param], lr=lr)
        with model_guard(generator) if generator is not None else contextlib.nullcontext() as g:
            blank = torch.zeros((k, *shape), device=device)

            def decode(p):
                return g(blank, torch.zeros_like(blank[:, :1]), p) if g is not None else p

            for _ in range(steps):
                x = decode(param)
                score = objective_scores(x)
                if density is not None:
                    objective = score + prior_weight * density.log_prob(x)
                else:
                    objective = score - l2 * param.flatten(1).pow(2).sum(1)
                (param.grad,) = torch.autograd.grad(-objective.sum(), [param])
                opt.step()
            with torch.no_grad():
                x = decode(param)
                score = objective_scores(x)
    return x.detach(), score.detach()
