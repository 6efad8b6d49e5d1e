"""Activation maximisation: closed-form optima on linear models (plain and Gaussian expert), the
generator variant, and the callback in real Trainers (W&B read-back, bit-identical training)."""
from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from conftest import make_trainer
from xai_callbacks import ActivationMaximizationCallback, InpainterCallback
from xai_callbacks.activation_max import GaussianDensity, activation_maximization
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.guard import hook_count
from xai_callbacks.models import Classifier, DemoCNN
from wandb_records import history, read_records


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3, bias=True))


def test_plain_optimum_of_a_linear_logit_is_w_over_2_l2():
    """max_x w_c x + b_c - l2 ||x||^2  =>  x* = w_c / (2 l2)."""
    model, l2 = linear(), 0.5
    x, score = activation_maximization(model, [0, 1, 2], (1, 4, 4), l2=l2, output="logit", steps=400, lr=0.05)
    w = model[1].weight.detach()
    torch.testing.assert_close(x.flatten(1), w / (2 * l2), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(score, model(x).gather(1, torch.arange(3)[:, None])[:, 0].detach())


def test_neuron_variant_maximises_a_channel_of_a_layer():
    """The output channels of the last layer as neurons: the same optimum as the logit."""
    model, l2 = linear(), 0.5
    x, score = activation_maximization(model, [2, 0], (1, 4, 4), l2=l2, layer="1", steps=400, lr=0.05)
    w = model[1].weight.detach()[[2, 0]]
    torch.testing.assert_close(x.flatten(1), w / (2 * l2), rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match=r"layer 'fc' not found"):
        activation_maximization(model, [0], (1, 4, 4), layer="fc")
    with pytest.raises(ValueError, match=r"has 3 channels"):
        activation_maximization(model, [5], (1, 4, 4), layer="1")


def test_gaussian_expert_optimum_is_mean_plus_covariance_times_w():
    """max_x w_c x + log N(x; mu, Sigma)  =>  x* = mu + Sigma w_c."""
    model = linear(1)
    g = torch.Generator().manual_seed(0)
    data = 0.3 * torch.randn(200, 1, 4, 4, generator=g) @ torch.randn(4, 4, generator=g) * 0.5 + 0.2
    density = GaussianDensity(data, shrinkage=0.2)
    x, _ = activation_maximization(model, [0, 2], (1, 4, 4), density=density, output="logit", steps=600, lr=0.02)
    cov = torch.linalg.inv(density.precision.double())
    w = model[1].weight.detach().double()[[0, 2]]
    expected = density.mean.double() + w @ cov
    torch.testing.assert_close(x.flatten(1).double(), expected, rtol=2e-2, atol=2e-3)
    with pytest.raises(ValueError, match=r"fitted to inputs of shape \(1, 4, 4\), not \(1, 5, 5\)"):
        activation_maximization(model, [0], (1, 5, 5), density=density)


class ToyGenerator(nn.Module):
    """G(x, keep, z) = sigmoid(conv(z)): the call signature of the inpainter's generator."""

    config = {"noise_channels": 2}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, keep, noise):
        return torch.sigmoid(self.conv(noise))


def test_generator_variant_searches_the_code_space_and_leaves_both_models_untouched():
    torch.manual_seed(0)
    model, gen = DemoCNN(width=8).train(), ToyGenerator().train()
    for p in list(model.parameters()) + list(gen.parameters()):
        p.grad = torch.zeros_like(p)
    before = {k: v.clone() for k, v in list(model.state_dict().items()) + list(gen.state_dict().items())}
    x0, s0 = activation_maximization(model, [1, 4], (1, 32, 32), generator=gen, steps=1, lr=1e-9)
    x, s = activation_maximization(model, [1, 4], (1, 32, 32), generator=gen, steps=30, lr=0.1, l2=0.0)
    assert x.shape == (2, 1, 32, 32) and (x >= 0).all() and (x <= 1).all()  # G's output range
    assert (s > s0 + 1e-3).all(), (s, s0)
    after = {k: v for k, v in list(model.state_dict().items()) + list(gen.state_dict().items())}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad.abs().sum() == 0 for p in list(model.parameters()) + list(gen.parameters()))
    assert model.training and gen.training and hook_count(model) == hook_count(gen) == 0


def test_errors():
    model = linear()
    with pytest.raises(ValueError, match=r"output must be one of \['log_probability', 'logit'\]"):
        activation_maximization(model, [0], (1, 4, 4), output="probability")
    with pytest.raises(ValueError, match=r"unknown activation maximisation variant\(s\) \['dream'\]"):
        ActivationMaximizationCallback(variants=["plain", "dream"])


# ------------------------------------------------------------------------------ the callback
def _train(tmp_path, callbacks, logger=False, epochs=2):
    pl.seed_everything(7, verbose=False)
    torch.manual_seed(7)
    module = Classifier(DemoCNN(width=8), lr=3e-3)
    trainer = make_trainer(tmp_path, callbacks, logger=logger, max_epochs=epochs, limit_train_batches=2,
                           limit_val_batches=1)
    trainer.fit(module, ShortcutDigitsDataModule(batch_size=32))
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    without = _train(tmp_path / "a", [])
    cb = ActivationMaximizationCallback(variants=["plain", "gaussian"], classes=[0, 3], steps=5,
                                        density_samples=64)
    with_cb = _train(tmp_path / "b", [cb])
    assert cb.errors == 0 and set(cb.images) == {"plain", "gaussian"}
    assert cb.images["plain"].shape == (2, 1, 32, 32)
    for key in without:
        assert torch.equal(without[key], with_cb[key]), f"{key} differs"


def finished_history(run: str, timeout: float = 60.0) -> list[dict]:
    """The run's history once its record file holds the exit record (the W&B service may still
    be writing when ``finish`` returns on a loaded machine)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.WhichOneof("record_type") == "exit" for r in read_records(run)):
            break
        time.sleep(0.5)
    return history(run)


def test_grids_are_logged_to_wandb_every_epoch(tmp_path, wandb_logger):
    cb = ActivationMaximizationCallback(variants=["plain", "expert"], classes=[0, 5, 7], steps=3, scale=1,
                                        density_samples=64)
    _train(tmp_path, [cb], logger=wandb_logger)
    run = os.path.dirname(wandb_logger.experiment.dir)
    wandb_logger.experiment.finish()  # this run, whatever wandb.run is
    rows = finished_history(run)
    for variant in ("plain", "expert"):
        grids = [r for r in rows if r.get(f"xai/activation_max/{variant}/_type") == "images/separated"]
        assert len(grids) == 2, f"{variant}: one grid per epoch expected"
        assert grids[0][f"xai/activation_max/{variant}/count"] == 1
        assert (grids[0][f"xai/activation_max/{variant}/width"], grids[0][f"xai/activation_max/{variant}/height"]) \
            == (3 * 32 + 2 * 2, 32)
    captions = [r["xai/activation_max/expert/captions"][0] for r in rows if "xai/activation_max/expert/captions" in r]
    assert all(c.startswith("gaussian: class 0") for c in captions), captions  # no inpainter: the Gaussian
    assert cb.errors == 0


def test_expert_variant_uses_the_inpainters_generator(tmp_path):
    inpainter = InpainterCallback(warmup_steps=1, width=4, n_images=2, probe_size=4, save_generator=False,
                                  baselines=("constant",))
    cb = ActivationMaximizationCallback(variants=["expert"], classes=[1, 2], steps=3, scale=1)
    _train(tmp_path, [inpainter, cb], epochs=1)
    assert cb.errors == 0 and cb.kinds == {"expert": "generator"}
    assert cb.images["expert"].shape == (2, 1, 32, 32)
