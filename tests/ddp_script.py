"""Run the callbacks under a given strategy and write what each rank saw (used by test_ddp.py).

    python tests/ddp_script.py OUT_DIR DEVICES

Lightning's DDP launcher re-runs this script once per extra rank, so it must be a script.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from xai_callbacks.callbacks.attribution import AttributionCallback
from xai_callbacks.callbacks.gate import ExplanationGate
from xai_callbacks.callbacks.metrics import ExplanationMetricsCallback
from xai_callbacks.callbacks.spray import SpRAyCallback
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN

warnings.filterwarnings("ignore")
METHODS = ["saliency", "lrp.epsilon_gamma_box", "occlusion"]


def main(out: str, devices: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = Classifier(DemoCNN(width=8))
    attribution = AttributionCallback(methods=METHODS, method_options={"occlusion": {"window": 8}}, probe_size=10)
    metrics = ExplanationMetricsCallback(methods=["saliency"], metrics=["sparseness", "relevance_mass"], probe_size=10)
    spray = SpRAyCallback(classes=[0, 1], max_per_class=15, save_virelay=False, spray_options={"visualisation": None})
    gate = ExplanationGate(rules=["val/acc > 2"], action="stop")  # can never pass: every rank must stop
    common = dict(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    validate = pl.Trainer(logger=CSVLogger(out, name="validate", version=0), callbacks=[attribution, metrics, spray], **common)
    validate.validate(module, ShortcutDigitsDataModule(batch_size=50), verbose=False)
    values = {k: float(v) for k, v in validate.callback_metrics.items()}
    # SpRAy's causal check alone on this rank: its model evaluations, counted by a forward hook
    seen = [0]
    handle = module.model.register_forward_pre_hook(lambda m, args: seen.__setitem__(0, seen[0] + len(args[0])))
    data = spray._collect(validate, module)
    seen[0] = 0
    evidence, _ = spray._evidence(validate, data)
    handle.remove()

    fit = pl.Trainer(logger=CSVLogger(out, name="fit", version=0), callbacks=[gate], max_epochs=4,
                     limit_train_batches=3, num_sanity_val_steps=0, **common)
    fit.fit(module, ShortcutDigitsDataModule(batch_size=32))
    with open(os.path.join(out, f"rank{fit.global_rank}.json"), "w") as f:
        json.dump({"world_size": fit.world_size, "probe_indices": attribution.probe_indices,
                   "heatmap_sums": {m: float(h.sum()) for m, h in attribution.heatmaps.items()},
                   "spray_labels": {c: r.labels.tolist() for c, r in spray.results.items()},
                   "values": values, "stopped_at_epoch": fit.current_epoch, "gate_passed": gate.passed,
                   "check_inputs": seen[0], "check_passes": int(evidence.forward_passes),
                   "excess": evidence.excess.tolist(), "drop": evidence.drop.tolist()}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
