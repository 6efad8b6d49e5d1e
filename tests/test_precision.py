"""bf16 mixed precision and compiled modules still give fp32 heatmaps equal to eager fp32 ones."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_trainer
from xai_callbacks import AttributionCallback
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN

METHODS = ["saliency", "integrated_gradients", "gradcam", "lrp.epsilon_plus_flat"]


def _heatmaps(tmp_path, module, **trainer_args):
    cb = AttributionCallback(methods=METHODS, probe_size=16, save_heatmaps=False, on_error="raise")
    make_trainer(tmp_path, [cb], **trainer_args).validate(module, ShortcutDigitsDataModule(), verbose=False)
    return cb.heatmaps


def _cosine(a, b):
    """Per-sample cosine similarity; two all-zero heatmaps (Grad-CAM's ReLU can give them) count as equal."""
    a, b = a.flatten(1), b.flatten(1)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    both_zero = (a.abs().amax(1) == 0) & (b.abs().amax(1) == 0)
    return torch.where(both_zero, torch.ones_like(cos), cos)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    return Classifier(DemoCNN(width=8))


def test_bf16_mixed_precision_heatmaps_are_fp32_and_match(tmp_path, trained):
    reference = _heatmaps(tmp_path, trained, precision="32-true")
    mixed = _heatmaps(tmp_path, trained, precision="bf16-mixed")
    for method in METHODS:
        assert mixed[method].dtype == torch.float32, method
        assert _cosine(mixed[method], reference[method]).min() >= 0.999, method


def test_true_precision_models_are_explained_in_their_own_dtype(tmp_path, trained):
    """``precision="64-true"`` / ``"bf16-true"`` cast the weights: every explainer's fp32 inputs
    met weights of another dtype and raised ("Input type (float) and bias type (double) should be
    the same"). The guard casts each call's inputs to the weights' dtype and its outputs to fp32:
    fp64 heatmaps equal fp32 ones; bf16 ones are fp32 tensors, finite, and the metrics and SpRAy
    callbacks run through a bf16 fit."""
    from xai_callbacks import ExplanationMetricsCallback, SpRAyCallback
    from xai_callbacks.models import Classifier

    reference = _heatmaps(tmp_path, trained)
    for precision in ("64-true", "bf16-true"):
        module = Classifier(DemoCNN(width=8))
        module.load_state_dict(trained.state_dict())
        got = _heatmaps(tmp_path, module, precision=precision)
        for method in METHODS:
            assert got[method].dtype == torch.float32 and torch.isfinite(got[method]).all(), (precision, method)
            if precision == "64-true":
                assert _cosine(got[method], reference[method]).min() >= 0.9999, method
    spray = SpRAyCallback(classes=[0], on_error="raise")
    metrics = ExplanationMetricsCallback(probe_size=16, on_error="raise")
    module = Classifier(DemoCNN(width=8))
    make_trainer(tmp_path, [spray, metrics], precision="bf16-true", max_epochs=1,
                 limit_train_batches=2).fit(module, ShortcutDigitsDataModule())
    assert 0 in spray.results and metrics.values and all(map(math.isfinite, metrics.values.values()))


def test_compiled_module_heatmaps_match_eager(tmp_path, trained):
    """Lightning runs a compiled module's forward through dynamo; the guard explains the original."""
    reference = _heatmaps(tmp_path, trained)
    compiled = torch.compile(trained, backend="eager")  # dynamo tracing without a C++ toolchain
    got = _heatmaps(tmp_path, compiled)
    assert trained._compiler_ctx is not None  # Lightning really ran the compiled forward
    for method in METHODS:
        assert _cosine(got[method], reference[method]).min() >= 0.999, method


def test_explain_inside_bf16_autocast_computes_in_fp32(trained, digits):
    """Callers may sit inside autocast (a precision plugin's step context); the guard leaves it."""
    from xai_callbacks.attribution import explain

    x, y = digits[1].x[:16], digits[1].targets[:16]
    reference = {m: explain(trained, x, y, method=m) for m in METHODS}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = {m: explain(trained, x, y, method=m) for m in METHODS}
    for method in METHODS:
        assert mixed[method].dtype == torch.float32, method
        assert _cosine(mixed[method], reference[method]).min() >= 0.9999, method
