"""Lightning's loops: every callback works in fit, in a standalone validate (inference_mode) and in
validate after fit; trainer.test warns once that the callbacks run in validation only."""
from __future__ import annotations

import warnings

import pytest
from torch.utils.data import DataLoader, Subset

from conftest import make_trainer
from xai_callbacks.callbacks.attribution import AttributionCallback
from xai_callbacks.callbacks.inpainter import InpainterCallback
from xai_callbacks.callbacks.metrics import ExplanationMetricsCallback
from xai_callbacks.callbacks.spray import SpRAyCallback
from xai_callbacks.models import Classifier, DemoCNN


def _callbacks():
    return [AttributionCallback(methods=["saliency"], probe_size=6, n_images=2, save_heatmaps=False, on_error="raise"),
            ExplanationMetricsCallback(methods=["saliency"], probe_size=6, on_error="raise",
                                       metrics=[{"name": "pixel_flipping", "n_steps": 4}, "sparseness"]),
            SpRAyCallback(method="saliency", classes=[0, 1], max_per_class=8, save_virelay=False, on_error="raise",
                          spray_options={"k": 3, "visualisation": None}),
            InpainterCallback(width=4, warmup_steps=1, probe_size=4, n_images=1, save_generator=False,
                              on_error="raise")]


@pytest.fixture(scope="module")
def loaders(digits):
    train, val = digits
    return (DataLoader(Subset(train, range(32)), batch_size=16), DataLoader(Subset(val, range(80)), batch_size=40))


def _ran(callbacks, trainer):
    keys = set(trainer.callback_metrics)
    return {"attribution": bool(callbacks[0].heatmaps),
            "metrics": "xai/saliency/pixel_flipping_morf_aopc.constant0" in keys,
            "spray": "spray/0/n_clusters" in keys,
            "inpainter": callbacks[3].inpainter is None or "inpainter/l1/gan" in keys}


def test_fit_then_validate_and_standalone_validate(tmp_path, loaders):
    train, val = loaders
    callbacks = _callbacks()
    model = Classifier(DemoCNN(width=4))
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1)
    trainer.fit(model, train, val)
    assert all(_ran(callbacks, trainer).values())
    trainer.validate(model, val)                  # validate after fit: inference_mode, cached probe sets
    assert all(_ran(callbacks, trainer).values()) and all(cb.errors == 0 for cb in callbacks)
    fresh = _callbacks()
    standalone = make_trainer(tmp_path / "v", fresh)
    standalone.validate(Classifier(DemoCNN(width=4)), val)
    ran = _ran(fresh, standalone)
    assert ran["attribution"] and ran["metrics"] and ran["spray"], ran
    assert all(cb.errors == 0 for cb in fresh)


class Tested(Classifier):
    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)


def test_test_loop_warns_once_that_callbacks_run_in_validation_only(tmp_path, loaders):
    _, val = loaders
    callbacks = _callbacks()[:1]
    trainer = make_trainer(tmp_path, callbacks)
    model = Tested(DemoCNN(width=4))
    with pytest.warns(UserWarning, match="runs in validation only"):
        trainer.test(model, val)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*runs in validation only")
        trainer.test(model, val)                  # said once
    assert not callbacks[0].heatmaps
