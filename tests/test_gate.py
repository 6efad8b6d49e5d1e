"""ExplanationGate and `xai-callbacks gate`: rules, actions, report, exit codes, W&B summary."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import make_trainer
from xai_callbacks.callbacks.gate import ExplanationGate, GateFailure
from xai_callbacks.cli import main
from xai_callbacks.data import ShortcutDigitsDataModule
from xai_callbacks.gate import evaluate, parse_rule
from xai_callbacks.models import Classifier, DemoCNN
from wandb_records import read_records


def module():
    torch.manual_seed(0)
    return Classifier(DemoCNN(width=8))


def test_rules_parse_and_evaluate_with_wildcards():
    rule = parse_rule("spray/suspicious_share < 0.1")
    assert (rule.key, rule.op, rule.threshold) == ("spray/suspicious_share", "<", 0.1)
    with pytest.raises(ValueError, match="cannot parse gate rule.*op in"):
        parse_rule("spray/suspicious_share ~ 0.1")
    values = {"spray/0/max_suspicion": 0.9, "spray/1/max_suspicion": 0.2, "xai/a/b": float("nan")}
    checks = evaluate(["spray/*/max_suspicion < 0.5", "xai/a/b > 0", "missing/key >= 1"], values)
    assert [(c.key, c.passed) for c in checks] == [
        ("spray/0/max_suspicion", False), ("spray/1/max_suspicion", True), ("xai/a/b", False), ("missing/key", False)]
    assert checks[-1].value is None  # never logged: fails, never passes silently


def test_stop_action_stops_training_writes_report_and_cli_exits_1(tmp_path, capsys):
    gate = ExplanationGate(rules=["val/acc > 0.999", "val/loss < 100"], action="stop")
    trainer = make_trainer(tmp_path, [gate], max_epochs=5, limit_train_batches=2)
    with pytest.warns(UserWarning, match="val/acc = .* breaks 'val/acc > 0.999'.*stopping"):
        trainer.fit(module(), ShortcutDigitsDataModule())
    assert trainer.current_epoch == 1 and gate.passed is False  # stopped after the first epoch
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["verdict"] == "fail" and report["rules"] == ["val/acc > 0.999", "val/loss < 100"]
    assert [c["passed"] for c in report["epochs"][0]["checks"]] == [False, True]
    assert json.loads((tmp_path / "summary.json").read_text())["gate/passed"] is False

    assert main(["gate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "val/acc" in out and "FAIL" in out and "1 failed" in out

    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - val/loss < 100\n")
    assert main(["gate", str(tmp_path / "gate.json"), "--rules", str(rules)]) == 0
    rules.write_text("rules:\n  - spray/suspicious_share < 0.1\n")
    assert main(["gate", str(tmp_path), "--rules", str(rules)]) == 2  # never logged: unusable
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "gate.json").write_text("{not json")
    assert main(["gate", str(tmp_path / "bad")]) == 2
    assert main(["gate", str(tmp_path / "nowhere")]) == 2


def test_raise_action_fails_the_run_naming_rules_and_values(tmp_path):
    gate = ExplanationGate(rules=["val/acc > 0.999"], action="raise")
    trainer = make_trainer(tmp_path, [gate], max_epochs=3, limit_train_batches=2)
    with pytest.raises(GateFailure, match=r"epoch 0: val/acc = 0\.\d+ breaks 'val/acc > 0.999'"):
        trainer.fit(module(), ShortcutDigitsDataModule())


def test_passing_gate_writes_wandb_summary(tmp_path, wandb_logger):
    gate = ExplanationGate(rules=["val/loss < 100"], action="raise")
    trainer = make_trainer(tmp_path, [gate], logger=wandb_logger, max_epochs=2, limit_train_batches=2)
    trainer.fit(module(), ShortcutDigitsDataModule())
    assert gate.passed is True and len(gate.epochs) == 2
    run = os.path.dirname(wandb_logger.experiment.dir)
    import wandb

    wandb.finish()
    summary = {}
    for record in read_records(run):
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    assert summary["gate/passed"] is True and summary["gate/val/loss"] < 100
    assert main(["gate", run]) == 0


def test_bad_gate_arguments():
    with pytest.raises(ValueError, match="action must be one of"):
        ExplanationGate(action="explode")
    with pytest.raises(ValueError, match="cannot parse gate rule"):
        ExplanationGate(rules=["no operator here"])
