"""Faithfulness: does removing what the heatmap calls relevant change the model's decision?

* pixel flipping / region perturbation (Samek et al. 2017): remove pixels (or square regions) in
  the heatmap's order, most relevant first (``morf``) or least relevant first (``lerf``); the
  curve is the target score after each step, AOPC the mean drop from the unperturbed score
  ``1/(L+1) * sum_k (f(x) - f(x_k))`` over steps k = 0..L (higher is better for MoRF, lower for LeRF);
* insertion / deletion (Petsiuk et al. 2018): area under the curve of the score while the most
  relevant pixels are inserted into a baseline image (insertion, higher is better) or deleted
  from the image (deletion, lower is better), x axis the fraction of pixels;
* faithfulness correlation (Bhatt et al. 2020): Pearson correlation, over random pixel subsets,
  between the subset's relevance sum and the score drop when the subset is removed;
* infidelity (Yeh et al. 2019): mean squared error between the heatmap's predicted score change
  ``sum(I * R)`` and the true change ``f(x) - f(x - I)`` under Gaussian perturbations ``I``.

The removed part is filled by an infiller (``constant``, ``blur``, ``noise`` or any
:class:`~xai_callbacks.infill.Infiller`, e.g. the GAN inpainter); its name is part of the key.
All perturbed inputs of all samples and steps are built on the model's device from one rank
table and scored ``batch_size`` at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from ..infill import Infiller, blender, get_infiller
from ..scoring import score_perturbed
from .base import OUTPUTS, CurveResult, ExplanationMetric, check_choice, keep_shape, pearson, positions, prepare, ranks

__all__ = ["pixel_flipping", "region_perturbation", "insertion_auc", "deletion_auc", "faithfulness_correlation",
           "infidelity", "PixelFlipping", "RegionPerturbation", "Insertion", "Deletion",
           "FaithfulnessCorrelation", "Infidelity"]

ORDERS = ("morf", "lerf")


def _regions(size: tuple[int, ...], patch_size: int, device) -> tuple[torch.Tensor, int]:
    """Region index of every position (prod(size),) for a grid of ``patch_size`` squares (images)
    or segments (signals, tabular rows), and their count."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if len(size) == 1:
        return torch.arange(size[0], device=device) // patch_size, -(-size[0] // patch_size)
    h, w = size
    cols = -(-w // patch_size)
    rows = -(-h // patch_size)
    i = torch.arange(h, device=device)[:, None] // patch_size
    j = torch.arange(w, device=device)[None, :] // patch_size
    return (i * cols + j).flatten(), rows * cols


def _counts(n_units: int, n_steps: int | None) -> torch.Tensor:
    """Units removed after each step k = 0..n_steps: round(k * n_units / n_steps)."""
    n_steps = n_units if n_steps is None else n_steps
    if not 1 <= n_steps <= n_units:
        raise ValueError(f"n_steps must be in 1..{n_units} (the number of pixels/regions), got {n_steps}")
    k = torch.arange(n_steps + 1, dtype=torch.float64)
    return torch.round(k * n_units / n_steps).long()


def removal_curve(model: nn.Module, x: torch.Tensor, target: torch.Tensor, r: torch.Tensor, *, order: str,
                  patch_size: int, n_steps: int | None, infiller: Infiller, output: str, batch_size: int,
                  insertion: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B, n_steps + 1) while units (pixels or patches) are removed (or inserted) in the
    heatmap's order, and the fraction of units done at each step."""
    b, shape = x.shape[0], keep_shape(x)
    unit_of_pixel, n_units = _regions(positions(x), patch_size, x.device)
    unit_relevance = torch.zeros(b, n_units, device=x.device).index_add_(1, unit_of_pixel, r.flatten(1))
    key = -unit_relevance if order == "morf" else unit_relevance
    position = ranks(key)[:, unit_of_pixel]  # (B, H*W): 0 = the first unit to go
    counts = _counts(n_units, n_steps).to(x.device)
    p = counts.numel()
    blend = blender(infiller, x)

    def make(idx):
        i, k = idx // p, idx % p
        done = position[i] < counts[k, None]
        keep = done if insertion else ~done
        return blend(i, keep.view(-1, *shape).to(x.dtype))

    sample_of = torch.arange(b * p, device=x.device) // p
    scores = score_perturbed(model, make, sample_of, target, output=output, batch_size=batch_size).view(b, p)
    return scores, counts.double() / n_units


def _aopc(curve: torch.Tensor) -> torch.Tensor:
    return (curve[:, :1] - curve).mean(1)


def _auc(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(curve.double(), fractions.to(curve.device)[None], dim=1).float()


def pixel_flipping(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, order: str = "morf",
                   n_steps: int | None = 64, infiller: str | Infiller = "constant", output: str = "probability",
                   batch_size: int = 256) -> CurveResult:
    """Pixel flipping: AOPC (B,) and curves (B, n_steps + 1) of removing pixels in heatmap order.

    Args:
        model: the classifier.
        x: images (B, C, H, W), signals (B, C, L) or tabular rows (B, F).
        target: explained class, int or (B,); None for the predicted class; or a target function.
        relevance: heatmaps of ``x`` for ``target``.
        order: ``morf`` (most relevant first) or ``lerf`` (least relevant first).
        n_steps: number of removal steps over all H*W pixels (None: one pixel per step).
        infiller: what replaces removed pixels: a name or an Infiller instance.
        output: score the ``probability`` (softmax) or the ``logit`` of the target.
        batch_size: perturbed inputs per forward pass.
    """
    return _aopc_curve("pixel_flipping", model, x, target, relevance, order=order, patch_size=1, n_steps=n_steps,
                       infiller=infiller, output=output, batch_size=batch_size)


def region_perturbation(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, order: str = "morf",
                        patch_size: int = 4, n_steps: int | None = None, infiller: str | Infiller = "constant",
                        output: str = "probability", batch_size: int = 256) -> CurveResult:
    """Region perturbation: like :func:`pixel_flipping` with non-overlapping ``patch_size`` squares
    ordered by their relevance sum; ``n_steps`` None removes one region per step."""
    return _aopc_curve("region_perturbation", model, x, target, relevance, order=order, patch_size=patch_size,
                       n_steps=n_steps, infiller=infiller, output=output, batch_size=batch_size)


def _aopc_curve(name: str, model, x, target, relevance, *, order, patch_size, n_steps, infiller, output,
                batch_size) -> CurveResult:
    check_choice(order, ORDERS, "order", name)
    check_choice(output, OUTPUTS, "output", name)
    x, target, r = prepare(model, x, target, relevance, name)
    curve, fractions = removal_curve(model, x, target, r, order=order, patch_size=patch_size, n_steps=n_steps,
                                     infiller=get_infiller(infiller), output=output, batch_size=batch_size)
    return CurveResult(_aopc(curve), curve, fractions)


def deletion_auc(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, n_steps: int | None = 64,
             infiller: str | Infiller = "constant", output: str = "probability", batch_size: int = 256) -> CurveResult:
    """Deletion: area under the score curve (B,) while the most relevant pixels are removed; lower
    is better. Arguments as in :func:`pixel_flipping`."""
    check_choice(output, OUTPUTS, "output", "deletion")
    x, target, r = prepare(model, x, target, relevance, "deletion")
    curve, fractions = removal_curve(model, x, target, r, order="morf", patch_size=1, n_steps=n_steps,
                                     infiller=get_infiller(infiller), output=output, batch_size=batch_size)
    return CurveResult(_auc(curve, fractions), curve, fractions)


def insertion_auc(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, n_steps: int | None = 64,
              infiller: str | Infiller = "blur", output: str = "probability", batch_size: int = 256) -> CurveResult:
    """Insertion: area under the score curve (B,) while the most relevant pixels are inserted into
    the fully infilled image (blurred by default); higher is better. Arguments as in
    :func:`pixel_flipping`."""
    check_choice(output, OUTPUTS, "output", "insertion")
    x, target, r = prepare(model, x, target, relevance, "insertion")
    curve, fractions = removal_curve(model, x, target, r, order="morf", patch_size=1, n_steps=n_steps,
                                     infiller=get_infiller(infiller), output=output, batch_size=batch_size,
                                     insertion=True)
    return CurveResult(_auc(curve, fractions), curve, fractions)


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def faithfulness_correlation(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *,
                             n_runs: int = 100, subset_size: int = 128, infiller: str | Infiller = "constant",
                             output: str = "probability", batch_size: int = 256, seed: int = 0,
                             subsets: torch.Tensor | None = None) -> torch.Tensor:
    """Faithfulness correlation (B,): Pearson correlation over ``n_runs`` random pixel subsets of
    the subset's relevance sum and the score drop when it is removed (higher is better).

    Args:
        model, x, target, relevance, infiller, output, batch_size: as in :func:`pixel_flipping`.
        n_runs: random subsets per sample.
        subset_size: pixels per subset.
        seed: seed of the subsets (an own generator on the model's device).
        subsets: optional fixed subsets, LongTensor (B, n_runs, subset_size) of flat pixel
            indices (overrides ``n_runs``, ``subset_size`` and ``seed``).
    """
    check_choice(output, OUTPUTS, "output", "faithfulness_correlation")
    x, target, r = prepare(model, x, target, relevance, "faithfulness_correlation")
    b, shape = x.shape[0], keep_shape(x)
    n_pos = r[0].numel()
    if subsets is None:
        if not 1 <= subset_size <= n_pos or n_runs < 2:
            raise ValueError(f"faithfulness_correlation needs 1 <= subset_size <= {n_pos} and n_runs >= 2, "
                             f"got subset_size={subset_size}, n_runs={n_runs}")
        noise = torch.rand(b, n_runs, n_pos, generator=_generator(x.device, seed), device=x.device)
        subsets = noise.argsort(-1)[..., :subset_size]
    subsets = subsets.to(x.device)
    runs = subsets.shape[1]
    blend = blender(get_infiller(infiller), x)

    def make(idx):
        i, j = idx // runs, idx % runs
        keep = torch.ones(len(idx), n_pos, device=x.device).scatter_(1, subsets[i, j], 0.0)
        return blend(i, keep.view(-1, *shape))

    base = score_perturbed(model, lambda idx: x[idx], torch.arange(b), target, output=output, batch_size=batch_size)
    perturbed = score_perturbed(model, make, torch.arange(b * runs) // runs, target, output=output,
                                batch_size=batch_size)
    drops = base[:, None] - perturbed.view(b, runs)
    sums = r.flatten(1).gather(1, subsets.flatten(1)).view(b, runs, -1).sum(-1)
    return pearson(sums, drops)


def infidelity(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, n_samples: int = 32,
               noise_std: float = 0.1, output: str = "logit", batch_size: int = 256, seed: int = 0,
               perturbations: torch.Tensor | None = None) -> torch.Tensor:
    """Infidelity (B,): ``mean_s (sum(I_s * R) - (f(x) - f(x - I_s)))^2`` with pixel noise
    ``I_s ~ N(0, noise_std^2)`` shared by a pixel's channels (lower is better). No rescaling of
    the heatmap (captum's ``normalize=False``).

    Args:
        model, x, target, relevance, batch_size: as in :func:`pixel_flipping`.
        n_samples: perturbations per sample.
        noise_std: standard deviation of the Gaussian perturbations.
        output: ``logit`` (default: heatmaps explain logits) or ``probability``.
        seed: seed of the perturbations (an own generator on the model's device).
        perturbations: optional fixed perturbations (B, n_samples, H, W) (overrides the draws).
    """
    check_choice(output, OUTPUTS, "output", "infidelity")
    x, target, r = prepare(model, x, target, relevance, "infidelity")
    b, shape = x.shape[0], keep_shape(x)
    if perturbations is None:
        perturbations = noise_std * torch.randn(b, n_samples, *positions(x), generator=_generator(x.device, seed),
                                                device=x.device)
    perturbations = perturbations.to(x.device, torch.float32)
    s = perturbations.shape[1]
    base = score_perturbed(model, lambda idx: x[idx], torch.arange(b), target, output=output, batch_size=batch_size)
    perturbed = score_perturbed(model, lambda idx: x[idx // s] - perturbations.flatten(0, 1)[idx].view(-1, *shape),
                                torch.arange(b * s) // s, target, output=output, batch_size=batch_size).view(b, s)
    predicted = (perturbations * r[:, None]).flatten(2).sum(-1)
    return ((predicted - (base[:, None] - perturbed)) ** 2).mean(1)


# ------------------------------------------------------------------------------------ classes
class _Perturbation(ExplanationMetric):
    """Base of the metrics that remove evidence through an infiller."""

    def __init__(self, model, infiller, output, batch_size, n_curve_points=0, **kwargs):
        super().__init__(model, n_curve_points=n_curve_points, **kwargs)
        self.infiller = get_infiller(infiller)
        self.output = check_choice(output, OUTPUTS, "output", self.name)
        self.batch_size = batch_size

    @property
    def key(self) -> str:
        return f"{self.name}.{self.infiller.name}"


class PixelFlipping(_Perturbation):
    """Pixel flipping AOPC, logged as ``pixel_flipping_<order>_aopc.<infiller>``; the mean curve
    via :meth:`compute_curve`.

    Args:
        model, order, n_steps, infiller, output, batch_size, **kwargs: as in :func:`pixel_flipping`.

    Raises:
        ValueError: an unknown ``order``, ``infiller`` or ``output`` (the message names the valid
            values).

    Example: ``metric = PixelFlipping(model, order="morf", infiller="blur")``, updated and computed like
        any metric; ``metric.compute_curve()`` gives the mean score after each step.
    """

    higher_is_better = None

    def __init__(self, model: nn.Module, order: str = "morf", n_steps: int | None = 64,
                 infiller: str | Infiller = "constant", output: str = "probability", batch_size: int = 256, **kwargs):
        self.order = check_choice(order, ORDERS, "order", "pixel_flipping")
        self.name = f"pixel_flipping_{order}_aopc"
        self.n_steps = n_steps
        super().__init__(model, infiller, output, batch_size, n_curve_points=(n_steps or -1) + 1, **kwargs)

    def scores(self, x, target, relevance, masks=None):
        if not self.n_curve_points:  # one pixel per step: the curve length depends on the image
            raise ValueError(f"{self.name}: the metric class needs a fixed n_steps; use the functional form "
                             "for one pixel per step")
        return pixel_flipping(self.model, x, target, relevance, order=self.order, n_steps=self.n_steps,
                              infiller=self.infiller, output=self.output, batch_size=self.batch_size)


class RegionPerturbation(PixelFlipping):
    """Region perturbation AOPC, logged as ``region_perturbation_<order>_aopc.<infiller>``.
    Arguments as in :func:`region_perturbation`; ``n_steps`` is required here (e.g. 64 regions of
    4x4 pixels cover a 32x32 image).

    Args:
        model, order, patch_size, n_steps, infiller, output, batch_size, **kwargs: as in
            :func:`region_perturbation`.

    Raises:
        ValueError: an unknown ``order``, ``infiller`` or ``output`` (the message names the valid
            values).

    Example: ``metric = RegionPerturbation(model, patch_size=4, n_steps=64)``, updated and computed like
        any metric; 64 regions of 4 x 4 pixels cover a 32 x 32 image.
    """

    def __init__(self, model: nn.Module, order: str = "morf", patch_size: int = 4, n_steps: int = 64,
                 infiller: str | Infiller = "constant", output: str = "probability", batch_size: int = 256, **kwargs):
        self.patch_size = patch_size
        super().__init__(model, order, n_steps, infiller, output, batch_size, **kwargs)
        self.name = f"region_perturbation_{order}_aopc"

    def scores(self, x, target, relevance, masks=None):
        return region_perturbation(self.model, x, target, relevance, order=self.order, patch_size=self.patch_size,
                                   n_steps=self.n_steps, infiller=self.infiller, output=self.output,
                                   batch_size=self.batch_size)


class Deletion(_Perturbation):
    """Deletion AUC, logged as ``deletion_auc.<infiller>`` (lower is better).

    Args:
        model, n_steps, infiller, output, batch_size, **kwargs: as in :func:`deletion_auc`.

    Raises:
        ValueError: an unknown ``infiller`` or ``output`` (the message names the valid values).

    Example: ``metric = Deletion(model, n_steps=32)``, updated and computed like any metric; its curve:
        the score as 1/32, 2/32, ... of the pixels go.
    """

    name = "deletion_auc"
    higher_is_better = False
    fn = staticmethod(deletion_auc)  # the functional form whose scores this class accumulates

    def __init__(self, model: nn.Module, n_steps: int = 64, infiller: str | Infiller = "constant",
                 output: str = "probability", batch_size: int = 256, **kwargs):
        self.n_steps = n_steps
        super().__init__(model, infiller, output, batch_size, n_curve_points=n_steps + 1, **kwargs)

    def scores(self, x, target, relevance, masks=None):
        return self.fn(self.model, x, target, relevance, n_steps=self.n_steps, infiller=self.infiller,
                       output=self.output, batch_size=self.batch_size)


class Insertion(Deletion):
    """Insertion AUC, logged as ``insertion_auc.<infiller>`` (higher is better).

    Arguments and errors as in :class:`Deletion`.

    Example: ``metric = Insertion(model, n_steps=32)``, updated and computed like any metric; higher is
        better.
    """

    name = "insertion_auc"
    higher_is_better = True
    fn = staticmethod(insertion_auc)

    def __init__(self, model: nn.Module, n_steps: int = 64, infiller: str | Infiller = "blur",
                 output: str = "probability", batch_size: int = 256, **kwargs):
        super().__init__(model, n_steps, infiller, output, batch_size, **kwargs)


class FaithfulnessCorrelation(_Perturbation):
    """Faithfulness correlation, logged as ``faithfulness_correlation.<infiller>`` (higher is
    better).

    Args:
        model, n_runs, subset_size, infiller, output, batch_size, seed, **kwargs: as in
            :func:`faithfulness_correlation`.

    Raises:
        ValueError: an unknown ``infiller`` or ``output`` (the message names the valid values).

    Example: ``metric = FaithfulnessCorrelation(model, n_runs=50, subset_size=64)``, updated and computed
        like any metric; 50 random subsets of 64 pixels per sample.
    """

    name = "faithfulness_correlation"
    higher_is_better = True

    def __init__(self, model: nn.Module, n_runs: int = 100, subset_size: int = 128,
                 infiller: str | Infiller = "constant", output: str = "probability", batch_size: int = 256,
                 seed: int = 0, **kwargs):
        super().__init__(model, infiller, output, batch_size, **kwargs)
        self.n_runs, self.subset_size, self.seed = n_runs, subset_size, seed

    def scores(self, x, target, relevance, masks=None):
        return faithfulness_correlation(self.model, x, target, relevance, n_runs=self.n_runs,
                                        subset_size=self.subset_size, infiller=self.infiller, output=self.output,
                                        batch_size=self.batch_size, seed=self.seed)


class Infidelity(ExplanationMetric):
    """Infidelity, logged as ``infidelity`` (lower is better).

    Args:
        model, n_samples, noise_std, output, batch_size, seed, **kwargs: as in :func:`infidelity`.

    Raises:
        ValueError: an unknown ``output`` (the message names the valid values).

    Example: ``metric = Infidelity(model, n_samples=16)``, updated and computed like any metric; 16
        Gaussian perturbations per sample, explained on logits.
    """

    name = "infidelity"
    higher_is_better = False

    def __init__(self, model: nn.Module, n_samples: int = 32, noise_std: float = 0.1, output: str = "logit",
                 batch_size: int = 256, seed: int = 0, **kwargs):
        super().__init__(model, **kwargs)
        self.n_samples, self.noise_std, self.seed, self.batch_size = n_samples, noise_std, seed, batch_size
        self.output = check_choice(output, OUTPUTS, "output", self.name)

    def scores(self, x, target, relevance, masks=None):
        return infidelity(self.model, x, target, relevance, n_samples=self.n_samples, noise_std=self.noise_std,
                          output=self.output, batch_size=self.batch_size, seed=self.seed)
