"""ROAD, RemOve And Debias (Rong et al. 2022): remove the most (or least) relevant pixels and fill
them by *noisy linear imputation*, so the removal leaks no information about where it happened
through the shape of the removed region.

Each removed pixel takes the weighted mean of its 8 neighbours (weight 1/6 for the 4 direct
neighbours, 1/12 for the diagonal ones, neighbours outside the image left out), which for all
removed pixels together is a sparse linear system per image and channel (a discrete Laplace
equation with the kept pixels as boundary values), plus Gaussian noise of std ``noise``. The
systems of all samples and all removal fractions are solved at once on the model's device by
conjugate gradients (the system is symmetric positive definite as long as some pixel is kept);
on the CPU scipy's sparse direct solver is faster and is used instead.

The curve is the target's accuracy (argmax equals the target), probability or logit after
removing ``p`` percent of the pixels, for each ``p`` in ``percentages``; the score is its mean
over the percentages (lower is better for ``morf``, higher for ``lerf``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..attribution import model_device, model_scores
from ..guard import model_guard, unwrap_model
from ..scoring import check_class_target, score_perturbed
from .base import require_images, CurveResult, ExplanationMetric, check_choice, prepare, ranks

__all__ = ["noisy_linear_imputation", "road", "ROAD"]

ORDERS = ("morf", "lerf")
ROAD_OUTPUTS = ("accuracy", "probability", "logit")
_NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


def _neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the 8 neighbours of every pixel of (N, C, H, W); zero outside the image."""
    c = v.shape[1]
    k = _NEIGHBOURS.to(v).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    return F.conv2d(v, k, padding=1, groups=c)


def _direct_solve(x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The imputed values (N, C, H, W) (zero where kept), by scipy's sparse LU per image."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    n, c, h, w = x.shape
    out = torch.zeros_like(x)
    weights = _NEIGHBOURS.double().numpy()
    for b in range(n):
        rem = removed[b, 0].cpu().numpy()
        ii, jj = np.nonzero(rem)
        if not len(ii):
            continue
        var = -np.ones((h, w), dtype=np.int64)
        var[ii, jj] = np.arange(len(ii))
        img = x[b].detach().double().cpu().numpy().reshape(c, h, w)
        rows, cols, vals = [], [], []
        degree = np.zeros(len(ii))
        rhs = np.zeros((len(ii), c))
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                wt = weights[dy + 1, dx + 1]
                if wt == 0:
                    continue
                ny, nx = ii + dy, jj + dx
                inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
                degree[inside] += wt
                k = np.nonzero(inside)[0]
                nb = var[ny[k], nx[k]]
                hole = nb >= 0
                rows.append(k[hole]), cols.append(nb[hole]), vals.append(np.full(hole.sum(), -wt))
                rhs[k[~hole]] += wt * img[:, ny[k[~hole]], nx[k[~hole]]].T
        rows.append(np.arange(len(ii))), cols.append(np.arange(len(ii))), vals.append(degree)
        a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(len(ii), len(ii))).tocsc()
        sol = spsolve(a, rhs).reshape(len(ii), c)
        out[b][:, ii, jj] = torch.as_tensor(sol.T, dtype=x.dtype, device=x.device)
    return out


def noisy_linear_imputation(x: torch.Tensor, removed: torch.Tensor, noise: float = 0.01,
                            generator: torch.Generator | None = None, tol: float = 1e-6,
                            max_iter: int = 2000, solver: str = "auto") -> torch.Tensor:
    """``x`` (N, C, H, W) with the pixels where ``removed`` (N, 1, H, W) is true replaced by the
    noisy linear imputation of their neighbours (see the module docstring).

    Args:
        x: images.
        removed: boolean mask of the pixels to impute (all channels of a pixel).
        noise: std of the Gaussian noise added to the imputed values.
        generator: source of the noise (an own generator; the global RNG is not used).
        tol: conjugate gradients stop when every residual norm is below ``tol`` times the norm
            of its right-hand side.
        max_iter: at most this many conjugate-gradient iterations.
        solver: ``cg`` (batched conjugate gradients on the device), ``direct`` (scipy's sparse
            solver per image, on the CPU) or ``auto``: direct for CPU tensors, cg otherwise
            (``benchmarks/road.py`` measures both).

    Raises:
        ValueError: a sample has every pixel removed (nothing to impute from), or an unknown solver.
    """
    if solver not in ("auto", "cg", "direct"):
        raise ValueError(f"noisy_linear_imputation solver must be 'auto', 'cg' or 'direct', got {solver!r}")
    r = removed.to(x.dtype)
    if (r.flatten(1).sum(1) == r[0].numel()).any():
        raise ValueError("noisy_linear_imputation: a sample has all pixels removed; keep at least one")
    if solver == "direct" or (solver == "auto" and x.device.type == "cpu"):
        v = _direct_solve(x, removed.bool())
        if noise:
            v = v + noise * torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)
        return x * (1 - r) + v * r
    degree = _neighbour_sum(torch.ones_like(r))                  # sum of in-image neighbour weights
    rhs = _neighbour_sum(x * (1 - r)) * r                         # known neighbours' contribution

    def apply(v):                                                 # (D - W_removed) v on removed pixels
        return (degree * v - _neighbour_sum(v * r)) * r

    v = rhs / degree
    res = rhs - apply(v)
    p = res.clone()
    rs = (res * res).sum((2, 3), keepdim=True)
    stop = (tol * rhs.flatten(2).norm(dim=2)[..., None, None]).clamp_min(1e-30) ** 2
    for _ in range(max_iter):
        if (rs <= stop).all():
            break
        ap = apply(p)
        alpha = rs / (p * ap).sum((2, 3), keepdim=True).clamp_min(1e-30)
        v = v + alpha * p
        res = res - alpha * ap
        rs_new = (res * res).sum((2, 3), keepdim=True)
        p = res + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    if noise:
        v = v + noise * torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype)
    return x * (1 - r) + v * r


def _curve_scores(model: nn.Module, make_inputs, sample_of: torch.Tensor, target, output: str,
                  batch_size: int) -> torch.Tensor:
    if output != "accuracy":
        return score_perturbed(model, make_inputs, sample_of, target, output=output, batch_size=batch_size)
    if not isinstance(target, torch.Tensor):
        raise ValueError("road output='accuracy' needs class-index targets; use output='logit' with a target function")
    device = model_device(unwrap_model(model))
    n = sample_of.shape[0]
    with model_guard(model) as module, torch.no_grad():
        scores = torch.empty(n, device=device)
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size), device=device)
            out = model_scores(module, make_inputs(idx))
            t = target[sample_of[idx]]
            if start == 0:
                check_class_target(out, t)
            scores[idx] = (out.argmax(1) == t).float()
    return scores


def road(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, order: str = "morf",
         percentages: Sequence[float] = tuple(range(1, 100, 2)), noise: float = 0.01, output: str = "accuracy",
         batch_size: int = 256, seed: int = 0) -> CurveResult:
    """ROAD: mean score (B,) and curves (B, P) after imputing ``percentages`` of the pixels.

    Args:
        model: the classifier.
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: heatmaps of ``x`` for ``target``.
        order: ``morf`` (most relevant removed first) or ``lerf``.
        percentages: percent of the H*W pixels removed, each in [0, 100); ``int(H*W*p/100)``
            pixels (as Quantus counts them).
        noise: std of the imputation noise.
        output: ``accuracy`` (argmax equals the target, as in the paper), ``probability`` or ``logit``.
        batch_size: perturbed inputs imputed and scored per chunk.
        seed: seed of the imputation noise (an own generator on the model's device).

    Raises:
        ValueError: a bad order, output or percentage.
    """
    check_choice(order, ORDERS, "order", "road")
    check_choice(output, ROAD_OUTPUTS, "output", "road")
    percentages = [float(p) for p in percentages]
    if not percentages or not all(0 <= p < 100 for p in percentages):
        raise ValueError(f"road percentages must be in [0, 100), got {percentages}")
    x, target, r = prepare(model, x, target, relevance, "road")
    require_images(x, "road")
    b, _, h, w = x.shape
    key = -r.flatten(1) if order == "morf" else r.flatten(1)
    position = ranks(key)                                           # (B, H*W): 0 = removed first
    counts = torch.tensor([int(h * w * p / 100) for p in percentages], device=x.device)
    n_p = len(percentages)
    gen = torch.Generator(device=x.device).manual_seed(seed)

    def make(idx):
        i, k = idx // n_p, idx % n_p
        removed = (position[i] < counts[k, None]).view(-1, 1, h, w)
        return noisy_linear_imputation(x[i], removed, noise, gen)

    sample_of = torch.arange(b, device=x.device).repeat_interleave(n_p)
    curves = _curve_scores(model, make, sample_of, target, output, batch_size).view(b, n_p)
    return CurveResult(curves.mean(1), curves, torch.tensor(percentages, dtype=torch.float64) / 100)


class ROAD(ExplanationMetric):
    """ROAD, logged as ``road_<order>`` (lower is better for ``morf``); the mean curve via
    :meth:`compute_curve`.

    Args:
        model, order, percentages, noise, output, batch_size, seed, **kwargs: as in :func:`road`.

    Raises:
        ValueError: an unknown ``order`` or ``output`` (the message names the valid values).

    Example: ``metric = ROAD(model, order="morf")``, updated and computed like any metric; accuracy after
        imputing 5%, 15%, ... 95% of the pixels.
    """

    higher_is_better = None  # lower for morf, higher for lerf

    def __init__(self, model: nn.Module, order: str = "morf", percentages: Sequence[float] = tuple(range(5, 100, 10)),
                 noise: float = 0.01, output: str = "accuracy", batch_size: int = 256, seed: int = 0, **kwargs):
        self.order = check_choice(order, ORDERS, "order", "road")
        self.output = check_choice(output, ROAD_OUTPUTS, "output", "road")
        self.name = f"road_{order}"
        self.percentages, self.noise, self.batch_size, self.seed = tuple(percentages), noise, batch_size, seed
        super().__init__(model, n_curve_points=len(self.percentages), **kwargs)

    def scores(self, x, target, relevance, masks=None):
        return road(self.model, x, target, relevance, order=self.order, percentages=self.percentages,
                    noise=self.noise, output=self.output, batch_size=self.batch_size, seed=self.seed)
