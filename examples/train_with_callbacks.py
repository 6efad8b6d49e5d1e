"""The callbacks in plain Python: the demo's shortcut data, a small CNN, an offline W&B run.

    python examples/train_with_callbacks.py [--epochs 6]
"""
import argparse
import os

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from xai_callbacks import AttributionCallback, ExplanationGate, ExplanationMetricsCallback, SpRAyCallback
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.models import Classifier, DemoCNN


def main(epochs: int) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    pl.seed_everything(0)
    gate = ExplanationGate(rules=["spray/*/n_flagged < 1"], action="warn")
    callbacks = [
        AttributionCallback(methods=["saliency", "gradcam", "lrp.epsilon_plus_flat"], probe_size=64),
        ExplanationMetricsCallback(methods=["lrp.epsilon_plus_flat"], metrics=["pixel_flipping", "sparseness"]),
        SpRAyCallback(method="lrp.epsilon_plus_flat", max_per_class=60, every_n_epochs=epochs - 1),
        gate,
    ]
    trainer = pl.Trainer(max_epochs=epochs, logger=WandbLogger(project="xai-callbacks", save_dir="runs"),
                         callbacks=callbacks, enable_model_summary=False)
    trainer.fit(Classifier(DemoCNN(), lr=3e-3), ShortcutDigitsDataModule(artifact_class=0, artifact_fraction=0.25))
    failed = [f"{c['key']} = {c['value']:.3g}" for c in gate.epochs[-1]["checks"] if not c["passed"]]
    print("gate passed" if not failed else f"gate failed: {', '.join(failed)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    main(parser.parse_args().epochs)
