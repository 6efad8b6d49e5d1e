"""Gradient family, computed by captum: saliency, input x gradient, integrated gradients,
SmoothGrad, guided backprop."""
from __future__ import annotations

import warnings

import captum.attr as ca
import torch

from . import CheckedForward, register_method
from ..guard import input_gradient


@register_method("saliency")
def saliency(model, x, target, *, abs: bool = False) -> torch.Tensor:
    """Gradient of the target score w.r.t. the input (Simonyan et al.); ``abs=True`` for |grad|."""
    return ca.Saliency(CheckedForward(model, target)).attribute(x, target=target, abs=abs)


@register_method("input_x_gradient")
def input_x_gradient(model, x, target) -> torch.Tensor:
    """Input times gradient."""
    return ca.InputXGradient(CheckedForward(model, target)).attribute(x, target=target)


@register_method("integrated_gradients")
def integrated_gradients(model, x, target, *, n_steps: int = 32, baseline: float | torch.Tensor = 0.0,
                         batch_size: int | None = None, integration: str = "gausslegendre") -> torch.Tensor:
    """Integrated gradients (Sundararajan et al.) from ``baseline`` to ``x`` in ``n_steps`` steps;
    ``batch_size`` path points per forward pass (None: all at once); ``integration`` is captum's
    quadrature rule ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
    "riemann_middle"). (Not called ``method``: that name is taken by :func:`explain`.)"""
    return ca.IntegratedGradients(CheckedForward(model, target)).attribute(
        x, baselines=baseline, target=target, n_steps=n_steps, method=integration,
        internal_batch_size=batch_size)


@register_method("smoothgrad")
def smoothgrad(model, x, target, *, n_samples: int = 16, noise_level: float = 0.15,
               batch_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """SmoothGrad (Smilkov et al.): mean gradient under Gaussian noise of std
    ``noise_level * (max(x) - min(x))`` per sample; at most ``batch_size`` noisy inputs go through
    the model at once (None: all ``n_samples`` copies of the batch). Noise comes from an own
    generator seeded with ``seed``."""
    flat = x.detach().flatten(1)
    std = (noise_level * (flat.amax(1) - flat.amin(1))).view(-1, *[1] * (x.dim() - 1))
    forward = CheckedForward(model, target)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    per_pass = n_samples if batch_size is None else max(1, batch_size // len(x))
    total = torch.zeros_like(x)
    for start in range(0, n_samples, per_pass):
        k = min(per_pass, n_samples - start)
        noise = torch.randn(k, *x.shape, device=x.device, generator=gen)
        noisy = (x.detach() + std * noise).flatten(0, 1).requires_grad_(True)
        scores = forward(noisy).gather(1, target.repeat(k)[:, None])
        total += input_gradient(scores, noisy).view(k, *x.shape).sum(0)
    return total / n_samples


@register_method("guided_backprop")
def guided_backprop(model, x, target) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al.): only positive gradients pass ReLUs backwards."""
    CheckedForward(model, target)(x[:1])  # validate scores and target before captum's hooks
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        return ca.GuidedBackprop(model).attribute(x, target=target)
