"""Gradient family, computed by captum: saliency, input x gradient, integrated gradients,
SmoothGrad, guided backprop."""
from __future__ import annotations

import warnings

import captum.attr as ca
import torch

from . import CheckedForward, output_checked, register_method
from ..guard import input_gradient

INTEGRATIONS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


@register_method("saliency")
def saliency(model, x, target, *, abs: bool = False) -> torch.Tensor:
    """Gradient of the target score w.r.t. the input (Simonyan et al.).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        abs: return |grad| instead of the signed gradient.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="saliency", abs=True)``.
    """
    return ca.Saliency(CheckedForward(model, target)).attribute(x, target=target, abs=abs)


@register_method("input_x_gradient")
def input_x_gradient(model, x, target) -> torch.Tensor:
    """Input times gradient: ``x * d score / d x``.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="input_x_gradient")``.
    """
    return ca.InputXGradient(CheckedForward(model, target)).attribute(x, target=target)


@register_method("integrated_gradients")
def integrated_gradients(model, x, target, *, n_steps: int = 32, baseline: float | torch.Tensor = 0.0,
                         batch_size: int | None = None, integration: str = "gausslegendre") -> torch.Tensor:
    """Integrated gradients (Sundararajan et al.): the gradient averaged along the straight path
    from ``baseline`` to ``x``, times ``x - baseline``.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        n_steps: points on the path (>= 1).
        baseline: the path's start: a number or a tensor broadcastable to one sample.
        batch_size: path points per forward pass (None: all at once).
        integration: captum's quadrature rule, one of ``gausslegendre``, ``riemann_trapezoid``,
            ``riemann_left``, ``riemann_right``, ``riemann_middle`` (not called ``method``: that
            name is taken by :func:`explain`).

    Raises:
        ValueError: ``n_steps`` < 1, an unknown ``integration`` (the message names the valid ones),
            a target out of range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="integrated_gradients", n_steps=64, baseline=0.0)``.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"integrated_gradients n_steps must be an int >= 1, got {n_steps!r}")
    if integration not in INTEGRATIONS:
        raise ValueError(f"integrated_gradients integration must be one of {list(INTEGRATIONS)}, got {integration!r}")
    return ca.IntegratedGradients(CheckedForward(model, target)).attribute(
        x, baselines=baseline, target=target, n_steps=n_steps, method=integration,
        internal_batch_size=batch_size)


@register_method("smoothgrad")
def smoothgrad(model, x, target, *, n_samples: int = 16, noise_level: float = 0.15,
               batch_size: int | None = None, seed: int = 0) -> torch.Tensor:
    """SmoothGrad (Smilkov et al.): the mean gradient over noisy copies of the input.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        n_samples: noisy copies per sample (>= 1).
        noise_level: the noise's standard deviation as a share of each sample's value range,
            ``noise_level * (max(x) - min(x))`` (>= 0).
        batch_size: at most this many noisy inputs per forward pass (None: all ``n_samples``
            copies of the batch at once).
        seed: seed of the noise (an own generator; the global RNG is untouched).

    Raises:
        ValueError: ``n_samples`` < 1 or ``noise_level`` < 0, a target out of range or a model
            output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="smoothgrad", n_samples=32, noise_level=0.1, seed=1)``.
    """
    if not isinstance(n_samples, int) or n_samples < 1 or noise_level < 0:
        raise ValueError(f"smoothgrad needs n_samples an int >= 1 and noise_level >= 0, got {n_samples!r}, "
                         f"{noise_level!r}")
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
    """Guided backpropagation (Springenberg et al.), by captum: only positive gradients pass
    ReLUs backwards (ReLUs must be ``nn.ReLU`` modules for captum's hooks).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="guided_backprop")``.
    """
    with warnings.catch_warnings(), output_checked(model, target):
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        return ca.GuidedBackprop(model).attribute(x, target=target)
