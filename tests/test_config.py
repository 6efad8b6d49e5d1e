"""Configs: validation errors, the demo command, and LightningCLI YAML."""
from __future__ import annotations

import glob
import os
import re

import pytest

from xai_callbacks import AttributionCallback, ExplanationGate, SpRAyCallback
from xai_callbacks.cli import main
from xai_callbacks.config import ConfigError, build_callbacks, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "clever_hans.yaml")


@pytest.mark.parametrize("override, message", [
    ("callbacks.attribution.probe_sise=3", r"Key 'probe_sise' not in .*key: callbacks.attribution.probe_sise.*valid keys: \[.*'probe_size'"),
    ("callbacks.attribution.probe_size=many", r"Value 'many' .* Integer \(key: callbacks.attribution.probe_size\)"),
    ("callbacks.explain.methods=[saliency]", r"unknown callback 'callbacks.explain'; valid: \['attribution'"),
    ("trainer.max_epoch=3", r"unknown trainer key\(s\) \['max_epoch'\]; valid: .*'max_epochs'"),
    ("logger.kind=mlflow", r"logger.kind='mlflow' is not valid; valid: \['wandb'"),
    ("data.artifact_fraction=lots", r"Value 'lots' .* Float \(key: data.artifact_fraction\)"),
    ("no_equals_sign", r"overrides look like key=value"),
    ("callbacks.attribution.methods=[saliency,gradcamm]", r"unknown attribution method\(s\) \['gradcamm'\]; valid: \["),
    ("data.artifact_kind=zigzag", r"data.artifact_kind='zigzag' is not valid; valid: \["),
])
def test_wrong_keys_and_types_name_key_value_and_what_is_valid(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(DEMO, ["trainer.max_epochs=2", override])
    assert str(err.value).startswith(f"override {override!r}: ")  # the override, not the YAML file


def test_errors_in_the_file_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("callbacks:\n  spray:\n    method: nope\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: in callbacks.spray: unknown attribution"):
        load_config(bad, ["trainer.max_epochs=2"])
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: not a valid YAML run config"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file .*nowhere.yaml does not exist"):
        load_config(tmp_path / "nowhere.yaml")


RUN_CONFIGS = ["clever_hans.yaml", "gate_only.yaml", "audio.yaml"]
LIGHTNING_CLI_CONFIGS = ["lightning_cli.yaml", "resnet18_cifar.yaml"]


def test_every_shipped_config_loads():
    shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert shipped == sorted(RUN_CONFIGS + LIGHTNING_CLI_CONFIGS + ["gate_rules.yaml"])
    for name in RUN_CONFIGS:
        callbacks = build_callbacks(load_config(os.path.join(ROOT, "configs", name)).callbacks)
        assert any(isinstance(cb, ExplanationGate) for cb in callbacks), name
    from xai_callbacks.cli import _load_rules

    assert "spray/*/n_flagged < 1" in _load_rules(os.path.join(ROOT, "configs", "gate_rules.yaml"))


def test_callbacks_built_from_config_get_their_arguments():
    cbs = build_callbacks({"attribution": {"methods": ["gradcam"], "probe_size": 8},
                           "gate": {"rules": ["val/acc > 0.5"], "action": "raise"}})
    assert isinstance(cbs[0], AttributionCallback) and cbs[0].methods == ["gradcam"] and cbs[0].probe_size == 8
    assert isinstance(cbs[1], ExplanationGate) and cbs[1].action == "raise"


def test_demo_command_writes_an_offline_wandb_run(tmp_path, capsys):
    code = main(["fit", "--config", DEMO, "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                 "trainer.enable_progress_bar=false", f"logger.save_dir={tmp_path}",
                 "callbacks.attribution.methods=[saliency]", "callbacks.attribution.probe_size=10"])
    assert code == 0
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    out = capsys.readouterr().out
    assert "run written to" in out and "wandb sync" in out
    assert main(["fit", "--config", DEMO, "trainer.max_epoch=1"]) == 2


def test_resnet18_config_builds_a_torchvision_resnet_with_the_callbacks():
    from lightning.pytorch.cli import LightningCLI
    from torchvision.models import ResNet

    cli = LightningCLI(args=["--config", os.path.join(ROOT, "configs", "resnet18_cifar.yaml"), "--trainer.logger=false",
                             "--data.class_path=xai_callbacks.data.ShortcutDigitsDataModule"],
                       run=False, save_config_callback=None)
    assert isinstance(cli.model.model, ResNet) and cli.model.model.fc.out_features == 10
    assert {"AttributionCallback", "SpRAyCallback", "ExplanationGate"} <= {type(c).__name__ for c in cli.trainer.callbacks}


def test_callbacks_work_from_lightning_cli_yaml():
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(args=["--config", os.path.join(ROOT, "configs", "lightning_cli.yaml"),
                             "--trainer.logger=false"], run=False, save_config_callback=None)
    kinds = {type(cb) for cb in cli.trainer.callbacks}
    assert {AttributionCallback, SpRAyCallback, ExplanationGate} <= kinds
    gate = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ExplanationGate))
    assert [str(r) for r in gate.rules] == ["spray/suspicious_share < 0.1"] and gate.action == "warn"
