"""Train any LightningModule / DataModule with the callbacks configured in LightningCLI YAML.

    python examples/lightning_cli.py fit --config configs/lightning_cli.yaml
"""
import os

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    LightningCLI(save_config_kwargs={"overwrite": True})
