"""On a CUDA device: every explainer matches its CPU result, the callbacks run in a GPU Trainer, and
SpRAy's causal check decides as on the CPU.

Skipped where no GPU is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_trainer
from xai_callbacks import AttributionCallback, ExplanationGate, ExplanationMetricsCallback, SpRAyCallback
from xai_callbacks.attribution import available_methods, explain
from xai_callbacks.attribution.transformer import applicable_methods
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.guard import hook_count
from xai_callbacks.models import Classifier, DemoCNN

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS, as Trainer(deterministic=True)

CHEAP = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4}, "rise": {"n_masks": 64},
         "occlusion": {"window": 8}, "meaningful_perturbation": {"steps": 20}, "fido.ssr": {"steps": 20},
         "fido.sdr": {"steps": 20}, "rde": {"steps": 20}, "lime": {"n_samples": 32}, "kernel_shap": {"n_samples": 32},
         "extremal_perturbation": {"steps": 20}}
RANDOM = {"smoothgrad", "meaningful_perturbation", "fido.ssr", "fido.sdr", "rde"}  # device RNG streams differ


@contextlib.contextmanager
def deterministic():
    """torch's deterministic algorithms, as ``Trainer(deterministic=True)`` turns them on."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("method", available_methods())
def test_explainers_on_cuda_match_cpu_and_leave_no_trace(method, digits):
    """Every method that applies to a CNN, on CUDA with deterministic algorithms (no op without a
    deterministic kernel), matches its CPU result."""
    torch.manual_seed(0)
    cpu_model = DemoCNN(width=8).train()
    if method not in applicable_methods(cpu_model):
        pytest.skip(f"{method} does not apply to a CNN")
    gpu_model = copy.deepcopy(cpu_model).cuda()
    x, y = digits[1].x[:8], digits[1].targets[:8]
    options = CHEAP.get(method, {})
    on_cpu = explain(cpu_model, x, y, method=method, **options)
    buffers = {k: v.clone() for k, v in gpu_model.state_dict().items()}
    with deterministic():
        on_gpu = explain(gpu_model, x.cuda(), y.cuda(), method=method, **options)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == x.shape and torch.isfinite(on_gpu).all()
    assert hook_count(gpu_model) == 0 and gpu_model.training
    assert all(torch.equal(buffers[k], v) for k, v in gpu_model.state_dict().items())
    if method not in RANDOM:
        cos = torch.nn.functional.cosine_similarity(on_gpu.cpu().flatten(1), on_cpu.flatten(1), dim=1)
        zero = (on_gpu.cpu().flatten(1).abs().amax(1) == 0) & (on_cpu.flatten(1).abs().amax(1) == 0)
        assert torch.where(zero, torch.ones_like(cos), cos).min() > 0.999, method


def test_callbacks_in_a_gpu_trainer(tmp_path):
    torch.manual_seed(0)
    attribution = AttributionCallback(methods=["saliency", "lrp.epsilon_gamma_box", "occlusion"], probe_size=32)
    metrics = ExplanationMetricsCallback(methods=["saliency"], metrics=["pixel_flipping", "sparseness"], probe_size=32)
    gate = ExplanationGate(rules=["xai/saliency/sparseness >= 0"], action="raise")
    trainer = make_trainer(tmp_path, [attribution, metrics, gate], accelerator="gpu", max_epochs=2,
                           limit_train_batches=5, precision="bf16-mixed")
    trainer.fit(Classifier(DemoCNN(width=8)), ShortcutDigitsDataModule())
    assert attribution.errors == metrics.errors == 0 and gate.passed is True
    assert all(h.device.type == "cuda" and h.dtype == torch.float32 for h in attribution.heatmaps.values())


def test_spray_knn_on_cuda_matches_cpu():
    from xai_callbacks.spray.pipeline import knn, preprocess
    rng = np.random.default_rng(0)
    x = preprocess(rng.random((3000, 1, 16, 16)).astype(np.float32))
    dist, idx = knn(x, 10)
    dist_g, idx_g = knn(x, 10, device="cuda", chunk=512)
    assert isinstance(idx_g, np.ndarray)
    np.testing.assert_allclose(dist_g, dist, rtol=2e-3)   # TF32 matmuls, where enabled, round to 1e-3
    assert (idx_g == idx).mean() > 0.98   # rounding may swap near-equal neighbours


def test_the_causal_check_on_cuda_decides_as_on_the_cpu(tmp_path):
    """The real-photo stamp model of ``test_shortcuts.py``: SpRAy with its causal check in a GPU
    Trainer flags the same samples as in a CPU Trainer, every class comes as close to its threshold,
    and the gate decides the same."""
    from test_shortcuts import trained

    module, val = trained(0.3, tmp_path / "train")
    runs = {}
    for accelerator in ("cpu", "gpu"):
        cb = SpRAyCallback(max_per_class=60, spray_options={"visualisation": None}, save_virelay=False)
        gate = ExplanationGate(action="warn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the gate's failure warning
            make_trainer(tmp_path / accelerator, [cb, gate], accelerator=accelerator).validate(
                module, DataLoader(val, batch_size=64), verbose=False)
        runs[accelerator] = cb, gate
    (cpu, cpu_gate), (gpu, gpu_gate) = runs["cpu"], runs["gpu"]
    assert gpu.sample_indices == cpu.sample_indices and cpu_gate.passed is False and gpu_gate.passed is False
    for c, r in cpu.results.items():
        g = gpu.results[c]
        flagged = [np.isin(x.labels, np.flatnonzero(x.flagged)) for x in (r, g)]
        assert (flagged[0] == flagged[1]).all(), f"class {c}"
        np.testing.assert_allclose(g.evidence.separation_ratio, r.evidence.separation_ratio, rtol=0.05)
    assert cpu.results[0].flagged.any()   # the stamp
