"""Shapes: signals (B, C, L) and tabular rows (B, F) through every explainer, infiller and metric
that applies to them (masks, windows and infills on the position axes); the others raise an error
naming the shape they need."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from xai_callbacks.attribution import available_methods, explain
from xai_callbacks.guard import hook_count
from xai_callbacks.infill import get_infiller
from xai_callbacks.infill.gan import GANInpainter
from xai_callbacks.metrics import available_metrics, get_metric, pixel_flipping
from xai_callbacks.scoring import regression_target

CHEAP = {"integrated_gradients": {"n_steps": 4}, "smoothgrad": {"n_samples": 2}, "occlusion": {"window": 2},
         "rise": {"n_masks": 8}, "meaningful_perturbation": {"steps": 2, "mask_size": 4},
         "fido.ssr": {"steps": 2}, "fido.sdr": {"steps": 2}, "rde": {"steps": 2}}
NOT_TABULAR = {"gradcam": "convolution layer", "meaningful_perturbation": r"images \(B, C, H, W\) or signals"}
IMAGES_ONLY = {"lime": r"need images \(B, C, H, W\)", "kernel_shap": r"need images \(B, C, H, W\)",
               "extremal_perturbation": r"needs images \(B, C, H, W\)",
               "attention_rollout": "does not apply to Sequential: it needs a transformer with a class token"}
IMAGE_METRICS = ("road", "irof", "sensitivity_n")


def signal_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).eval()


def tabular_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("kind", ["signal", "tabular"])
@pytest.mark.parametrize("method", available_methods())
def test_every_method_on_signals_and_tabular_rows(kind, method):
    model, x = (signal_model(), torch.randn(3, 2, 16)) if kind == "signal" else (tabular_model(), torch.randn(3, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    refused = IMAGES_ONLY.get(method) or (NOT_TABULAR.get(method) if kind == "tabular" else None)
    if refused:
        with pytest.raises(ValueError, match=refused):
            explain(model, x, 1, method=method, **CHEAP.get(method, {}))
    else:
        r = explain(model, x, 1, method=method, **CHEAP.get(method, {}))
        assert r.shape == x.shape and torch.isfinite(r).all()
    assert hook_count(model) == 0 and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_occlusion_of_a_linear_signal_model_is_the_windows_contribution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8, 1, bias=False))
    x = torch.randn(2, 2, 8)
    r = explain(model, x, regression_target(), method="occlusion", window=2)   # the one output itself
    contrib = (model[1].weight.view(1, 2, 8) * x).sum(1)                  # per time step, channels summed
    per_window = contrib.view(2, 4, 2).sum(-1).repeat_interleave(2, 1)   # each step: its window's drop
    assert torch.allclose(r, per_window[:, None].expand_as(x), atol=1e-5)


@pytest.mark.parametrize("name", ["constant", "blur", "noise"])
@pytest.mark.parametrize("shape", [(2, 3, 20), (2, 12)])
def test_infillers_keep_known_positions_of_signals_and_rows(name, shape):
    x = torch.rand(*shape)
    keep = (torch.rand(shape[0], *([1] if len(shape) == 3 else []), shape[-1]) > 0.5).float()
    z = get_infiller(name)(x, keep)
    assert z.shape == x.shape
    assert torch.equal(z * keep, x * keep)


def test_blur_of_a_signal_runs_along_time_only():
    x = torch.zeros(1, 2, 21)
    x[0, 0, 10] = 1.0
    z = get_infiller("blur", sigma=1.5).fill(x)
    assert torch.allclose(z[0, 0].sum(), torch.tensor(1.0), atol=1e-5) and z[0, 1].abs().max() == 0
    assert z[0, 0, 10] == z[0, 0].max() and torch.allclose(z[0, 0, 9], z[0, 0, 11])


def test_gan_infiller_names_the_image_shape():
    gan = GANInpainter(width=4).infiller()
    with pytest.raises(ValueError, match=r"expects images \(B, 1, H, W\)"):
        gan(torch.rand(2, 1, 16), torch.ones(2, 1, 16))


@pytest.mark.parametrize("kind", ["signal", "tabular"])
def test_every_metric_on_signals_and_tabular_rows(kind):
    model, x = (signal_model(), torch.randn(4, 2, 16)) if kind == "signal" else (tabular_model(), torch.randn(4, 10))
    y = torch.tensor([0, 1, 2, 1])
    r = explain(model, x, y, method="input_x_gradient")
    positions = x.shape[2:] if kind == "signal" else x.shape[1:]
    masks = torch.zeros(4, *positions, dtype=torch.bool)
    masks[:, :3] = True
    small = {"faithfulness_correlation": {"n_runs": 5, "subset_size": 4}, "infidelity": {"n_samples": 3},
             "max_sensitivity": {"n_samples": 2}, "avg_sensitivity": {"n_samples": 2},
             "local_lipschitz_estimate": {"n_samples": 2}, "pixel_flipping": {"n_steps": 4},
             "region_perturbation": {"n_steps": 4, "patch_size": 2}, "insertion_auc": {"n_steps": 4},
             "deletion_auc": {"n_steps": 4}}
    ran = []
    for name in available_metrics():
        m = get_metric(name, model=model, method="saliency", **small.get(name, {}))
        if name in IMAGE_METRICS:
            with pytest.raises(ValueError, match=rf"{name} needs images \(B, C, H, W\), got shape"):
                m.update(x, y, r, masks=masks)
            continue
        m.update(x, y, r, masks=masks)
        assert torch.isfinite(m.compute()), name
        ran.append(name)
    assert {"pixel_flipping", "region_perturbation", "deletion_auc", "insertion_auc", "faithfulness_correlation",
            "infidelity", "max_sensitivity", "relevance_mass", "sparseness", "completeness_error",
            "model_parameter_randomisation", "input_invariance_error"} <= set(ran)
    assert hook_count(model) == 0


def test_pixel_flipping_of_a_linear_tabular_model_removes_the_biggest_contributions_first():
    torch.manual_seed(0)
    model = nn.Linear(6, 2, bias=False)
    x = torch.rand(2, 6)
    contributions = (model.weight[1] * x).detach()
    res = pixel_flipping(model, x, 1, contributions, n_steps=None, output="logit")
    ordered = contributions.sort(1, descending=True).values
    remaining = contributions.sum(1, keepdim=True) - torch.cat([torch.zeros(2, 1), ordered.cumsum(1)], 1)
    assert torch.allclose(res.curves, remaining, atol=1e-5)


def test_metrics_name_the_shapes_they_take():
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\), signals \(B, C, L\) or tabular rows \(B, F\)"):
        pixel_flipping(tabular_model(), torch.rand(2, 1, 2, 2, 3), 0, torch.rand(2, 1, 2, 2, 3))
