"""Counterfactual explainers on models whose decisive evidence is known by construction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from xai_callbacks.attribution import available_methods, explain
from xai_callbacks.infill import NoiseInfiller
from xai_callbacks.infill import get_infiller
from xai_callbacks.infill.gan import GANInpainter

REGION = (slice(2, 12), slice(2, 12))


class RegionModel(nn.Module):
    """Two-class scores that depend only on the pixels in REGION (positive weights)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.5 + torch.rand(10, 10, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        s = (x[:, 0, REGION[0], REGION[1]] * self.w).flatten(1).mean(1) * 8 - 4
        return torch.stack([-s, s], dim=1)


class AdditiveModel(nn.Module):
    """f(x) = sum_k a_k tanh(sum of group k of x): components 0 and 1 decide, the rest barely count."""

    def __init__(self, groups: torch.Tensor, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("onehot", nn.functional.one_hot(groups).float())
        self.register_buffer("a", weights)

    def forward(self, x):
        f = (torch.tanh(x @ self.onehot) * self.a).sum(1)
        return torch.stack([-f, f], dim=1)


@pytest.fixture(scope="module")
def region_data():
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    inside = torch.zeros(32, 32)
    inside[REGION] = 1
    return RegionModel(), x, inside


def _share_inside(relevance, inside):
    r = relevance[:, 0].clamp_min(0)
    return (r * inside).sum((1, 2)) / r.sum((1, 2)).clamp_min(1e-12)


def test_methods_registered():
    assert {"meaningful_perturbation", "fido.ssr", "fido.sdr", "rde"} <= set(available_methods())


@pytest.mark.parametrize("method, options", [
    ("fido.ssr", {}),
    ("fido.sdr", {}),
    ("rde", {}),
    ("rde", {"variant": "concrete"}),
])
@pytest.mark.parametrize("infiller", ["constant", "noise"])
def test_mask_lands_on_the_only_region_the_model_uses(region_data, method, options, infiller):
    model, x, inside = region_data
    r = explain(model, x, 1, method=method, infiller=infiller, steps=60, **options)
    assert r.shape == x.shape
    share = _share_inside(r, inside)
    # the region is 100 of 1024 pixels (10%); the mask puts most of its mass there
    assert (share > 0.6).all(), share
    assert model.w.grad is None, "explainers never write the model's .grad"


def test_meaningful_perturbation_deletes_inside_the_region(region_data):
    model, x, inside = region_data
    for game in ("deletion", "preservation"):
        r = explain(model, x, 1, method="meaningful_perturbation", infiller="constant", game=game, steps=60)
        r = r[:, 0]
        mean_in = (r * inside).sum((1, 2)) / inside.sum()
        mean_out = (r * (1 - inside)).sum((1, 2)) / (1 - inside).sum()
        assert (mean_in > 4 * mean_out).all(), (game, mean_in, mean_out)


def test_matching_pursuit_picks_the_decisive_components():
    d, k = 32, 8
    groups = torch.arange(d) % k                       # 8 interleaved components of 4 features
    weights = torch.tensor([4.0, 2.5, 0.1, 0.05, 0.0, 0.1, 0.0, 0.05])
    model = AdditiveModel(groups, weights)
    x = 0.3 + 0.2 * torch.rand(5, d, generator=torch.Generator().manual_seed(0))
    r = explain(model, x, 1, method="rde", variant="matching_pursuit", components=groups,
                infiller=NoiseInfiller(-1.0, 1.0), max_components=3, n_samples=8)
    per_component = r[:, :k]                           # feature j belongs to component j % k
    top2 = per_component.topk(2, dim=1).indices.sort(dim=1).values
    assert (top2 == torch.tensor([0, 1])).all(), per_component
    assert (per_component[:, 0] > per_component[:, 1]).all(), "the bigger weight removes more distortion"
    assert ((per_component > 0).sum(1) <= 3).all()
    # deterministic infiller: batched equals one sample at a time
    one = explain(model, x[:1], 1, method="rde", variant="matching_pursuit", components=groups,
                  infiller="constant", max_components=2, n_samples=1)
    many = explain(model, x, 1, method="rde", variant="matching_pursuit", components=groups,
                   infiller="constant", max_components=2, n_samples=1)
    assert torch.allclose(one[0], many[0], atol=1e-6)


def test_exhaustive_rde_is_the_exact_rate_distortion_minimiser():
    d, k = 24, 4
    groups = torch.arange(d) % k
    weights = torch.tensor([3.0, 1.2, 0.6, 0.05])
    model = AdditiveModel(groups, weights)
    x = 0.3 + 0.4 * torch.rand(6, d, generator=torch.Generator().manual_seed(2))
    # with the constant fill (0, tanh(0) = 0), dropping component j changes the logit f by
    # a_j tanh(sum of group j): the distortion of a mask is 0.5 (sum over dropped j of that)^2
    contrib = torch.tanh(x @ nn.functional.one_hot(groups).float()) * weights          # (6, k)
    masks = torch.tensor([[(m >> j) & 1 for j in range(k)] for m in range(2 ** k)], dtype=torch.float)
    for l1 in (0.5, 3.0, 20.0):
        cost = 0.5 * (contrib @ (1 - masks).T) ** 2 + l1 * masks.mean(1)                # (6, 2^k)
        expected = masks[cost.argmin(1)]
        r = explain(model, x, 1, method="rde", variant="exhaustive", components=groups, infiller="constant",
                    l1=l1, n_samples=1)
        assert torch.equal(r[:, :k], expected), (l1, r[:, :k], expected)
        shared = explain(model, x, 1, method="rde", variant="exhaustive", components=groups, infiller="constant",
                         l1=l1, n_samples=1, shared=True)
        assert torch.equal(shared[:, :k], masks[cost.mean(0).argmin()].expand(6, k))
    assert not torch.equal(masks[(0.5 * (contrib @ (1 - masks).T) ** 2 + 0.5 * masks.mean(1)).argmin(1)],
                           masks[(0.5 * (contrib @ (1 - masks).T) ** 2 + 20 * masks.mean(1)).argmin(1)])
    with pytest.raises(ValueError, match="2\\^K binary masks; K = 11"):
        explain(AdditiveModel(torch.arange(11), torch.ones(11)), torch.rand(2, 11), 1, method="rde",
                variant="exhaustive", components=torch.arange(11))


def test_gan_infiller_passed_or_auto_is_used_and_gradients_reach_the_mask(region_data):
    model, x, _ = region_data
    x = x[:2]
    inp = GANInpainter(width=4, value_range=(0, 1), seed=0)
    before = [p.detach().clone() for p in inp.generator.parameters()]
    r = explain(model, x, 1, method="fido.ssr", infiller=inp.infiller(), steps=5, n_samples=2)
    assert torch.isfinite(r).all() and not torch.allclose(r, torch.full_like(r, 0.5))
    assert all(p.grad is None for p in inp.generator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, inp.generator.parameters()))
    auto = explain(model, x, 1, method="rde", steps=3, n_samples=2,
                   infiller=get_infiller("auto", gan=inp.infiller(seed=5)))
    explicit = explain(model, x, 1, method="rde", steps=3, n_samples=2, infiller=inp.infiller(seed=5))
    assert torch.equal(auto, explicit)


def test_clear_errors():
    model, x = RegionModel(), torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="variant"):
        explain(model, x, 1, method="rde", variant="greedy")
    with pytest.raises(ValueError, match="matching pursuit"):
        explain(model, x, 1, method="rde", variant="matching_pursuit")
    with pytest.raises(ValueError, match="component ids"):
        explain(model, x, 1, method="fido.ssr", components=torch.full((32, 32), 3))
    with pytest.raises(ValueError, match="game"):
        explain(model, x, 1, method="meaningful_perturbation", game="hide")
    with pytest.raises(ValueError, match="mask_size"):
        explain(AdditiveModel(torch.arange(4) % 2, torch.ones(2)), torch.rand(2, 4), 1, method="fido.sdr",
                mask_size=2)


def test_matching_pursuit_over_a_coarse_pixel_grid(region_data):
    model, x, inside = region_data
    r = explain(model, x[:2], 1, method="rde", variant="matching_pursuit", mask_size=4, infiller="constant",
                max_components=2, n_samples=1)
    assert r.shape == (2, 1, 32, 32)
    cells = r[:, 0, 4::8, 4::8]                        # values at the centres of the 8x8 cells
    # cell (0, 0) holds 36 of the region's 100 pixels, more than any other cell
    assert (cells.flatten(1).argmax(1) == 0).all(), cells
    assert (cells[:, 2:, :] == 0).all() and (cells[:, :, 2:] == 0).all(), "cells off the region stay at 0"


def test_mask_resize_and_blur_equal_torch_ops_and_pass_gradients():
    """The masks' upsampling and the Gaussian blur avoid the torch ops whose backward pass has no
    deterministic CUDA kernel (bilinear ``interpolate``, reflection padding); they compute the same."""
    import math

    import torch.nn.functional as F

    from xai_callbacks.attribution.counterfactual import linear_resize
    from xai_callbacks.infill import gaussian_blur

    gen = torch.Generator().manual_seed(0)
    for shape, size in [((2, 1, 4, 4), (16, 16)), ((2, 3, 7, 9), (4, 30)), ((1, 1, 5), (17,))]:
        m = torch.rand(shape, generator=gen, requires_grad=True)
        mode = "bilinear" if len(size) == 2 else "linear"
        torch.testing.assert_close(linear_resize(m, size), F.interpolate(m, size=size, mode=mode, align_corners=False))
        w = torch.rand(shape[:2] + size, generator=gen)
        got, = torch.autograd.grad((linear_resize(m, size) * w).sum(), m)
        want, = torch.autograd.grad((F.interpolate(m, size=size, mode=mode, align_corners=False) * w).sum(), m)
        torch.testing.assert_close(got, want)
    for shape, sigma in [((2, 3, 16, 16), 1.0), ((1, 2, 3, 40), 2.0), ((2, 1, 50), 5.0), ((3, 2, 2), 1.0)]:
        x = torch.rand(shape, generator=gen)
        r = max(1, math.ceil(3 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        want = x
        for d in range(2, x.dim()):   # each position axis: pad (reflect where longer than r), convolve
            moved = want.movedim(d, -1)
            flat = moved.reshape(-1, 1, moved.shape[-1])
            padded = F.pad(flat, (r, r), mode="reflect" if flat.shape[-1] > r else "replicate")
            want = F.conv1d(padded, k.view(1, 1, -1)).view(moved.shape).movedim(-1, d)
        torch.testing.assert_close(gaussian_blur(x, sigma), want)
