"""ExplanationGate and `xai-callbacks gate`: rules, actions, report, exit codes, W&B summary."""
from __future__ import annotations

import json
import logging
import os
import re

import lightning.pytorch as pl
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


def test_stop_action_stops_training_writes_report_and_cli_exits_1(tmp_path, capsys, caplog):
    gate = ExplanationGate(rules=["val/acc > 0.999", "val/loss < 100"], action="stop")
    trainer = make_trainer(tmp_path, [gate], max_epochs=5, limit_train_batches=2)
    with caplog.at_level(logging.WARNING, logger="xai_callbacks"):
        trainer.fit(module(), ShortcutDigitsDataModule())
    assert trainer.current_epoch == 1 and gate.passed is False  # stopped after the first epoch
    # one block at the end of the epoch, one at the end of the run, from the gate's own logger
    blocks = [r for r in caplog.records if "xai-callbacks gate FAILED" in r.getMessage()]
    assert [r.name for r in blocks] == ["xai_callbacks.callbacks.gate"] * 2
    assert "at epoch 0" in blocks[0].getMessage() and "at the end of the run" in blocks[1].getMessage()
    assert "rule 'val/acc > 0.999'" in blocks[0].getMessage() and "training stops" in blocks[0].getMessage()
    assert "val/loss" not in blocks[0].getMessage().split("beside it")[0]  # only the failed rule
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
    capsys.readouterr()
    assert main(["gate", str(tmp_path), "--rules", str(rules)]) == 1  # never logged: the gate fails
    assert "NOT LOGGED (logged by SpRAyCallback)" in capsys.readouterr().out
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


class LateLogger(pl.Callback):
    """Logs ``late/value`` from epoch ``start`` on, like a callback that runs every N epochs."""

    def __init__(self, start: int):
        self.start = start

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch >= self.start:
            pl_module.log("late/value", 1.0)


def test_default_rule_without_spray_fails_at_the_end_naming_key_and_callback(tmp_path, capsys, caplog):
    gate = ExplanationGate(action="raise")  # the default rule needs SpRAyCallback, which is not attached
    trainer = make_trainer(tmp_path, [gate], max_epochs=2, limit_train_batches=2)
    with caplog.at_level(logging.WARNING, logger="xai_callbacks"):
        with pytest.raises(GateFailure, match=r"end of the run: spray/\*/n_flagged = not logged .*logged by "
                                              r"SpRAyCallback"):
            trainer.fit(module(), ShortcutDigitsDataModule())
    assert trainer.current_epoch == 2  # pending while the run went on, failed at its end
    assert gate.passed is False and [e["passed"] for e in gate.epochs] == [True, True]
    messages = [r.getMessage() for r in caplog.records if r.name == "xai_callbacks.callbacks.gate"]
    assert "no SpRAyCallback is attached" in messages[0]  # said when fitting starts
    assert "never logged by the end of the run; it is logged by SpRAyCallback" in messages[-1]
    report = json.loads((tmp_path / "gate.json").read_text())
    assert report["verdict"] == "fail" and report["final"]["missing"][0]["logged_by"] == "SpRAyCallback"
    assert main(["gate", str(tmp_path)]) == 1
    assert "NOT LOGGED (logged by SpRAyCallback)" in capsys.readouterr().out


def test_a_key_never_logged_names_why_the_attached_callback_did_not_log_it(tmp_path, capsys, monkeypatch):
    """SpRAyCallback attached but failing (as its causal check did under deterministic algorithms
    on CUDA): the gate names the failure, not "attach it"; attached and well, a misspelt rule's
    key: the gate asks whether the key is right."""
    import xai_callbacks.callbacks.spray as spray_callback
    from xai_callbacks import SpRAyCallback

    def fails(*args, **kwargs):
        raise RuntimeError("median_cuda has no deterministic implementation")

    data = ShortcutDigitsDataModule()
    cb = SpRAyCallback(max_per_class=20, spray_options={"visualisation": None}, save_virelay=False)
    monkeypatch.setattr(spray_callback, "sample_evidence", fails)
    with pytest.raises(GateFailure, match=r"SpRAyCallback is attached but failed 1 time\(s\), the last: .*epoch 0: "
                                          r"RuntimeError: median_cuda has no deterministic"):
        make_trainer(tmp_path / "failed", [cb, ExplanationGate(action="raise")]).validate(module(), data)
    assert main(["gate", str(tmp_path / "failed")]) == 1
    assert "SpRAyCallback is attached but failed 1 time(s)" in capsys.readouterr().out
    monkeypatch.undo()
    cb = SpRAyCallback(max_per_class=20, spray_options={"visualisation": None}, save_virelay=False)
    gate = ExplanationGate(rules=["spray/*/n_flaged < 1"], action="warn")
    make_trainer(tmp_path / "typo", [cb, gate]).validate(module(), data)
    assert cb.errors == 0 and gate.passed is False
    assert main(["gate", str(tmp_path / "typo")]) == 1
    assert "SpRAyCallback is attached but logged no such key (is the rule's key right?)" in capsys.readouterr().out


def test_key_logged_only_from_a_later_epoch_is_pending_not_failed(tmp_path):
    gate = ExplanationGate(rules=["late/value > 0"], action="raise")
    trainer = make_trainer(tmp_path, [LateLogger(start=1), gate], max_epochs=2, limit_train_batches=2)
    trainer.fit(module(), ShortcutDigitsDataModule())
    assert gate.passed is True and [c["value"] for e in gate.epochs for c in e["checks"]] == [None, 1.0]
    assert main(["gate", str(tmp_path)]) == 0


def test_missing_skip_is_an_explicit_opt_out(tmp_path):
    gate = ExplanationGate(rules=["late/value > 0", "val/loss < 100"], action="raise", missing="skip")
    make_trainer(tmp_path, [gate], max_epochs=1, limit_train_batches=2).fit(module(), ShortcutDigitsDataModule())
    assert gate.passed is True and main(["gate", str(tmp_path)]) == 0


def test_validate_alone_is_its_own_end_of_run(tmp_path):
    gate = ExplanationGate(rules=["late/value > 0"], action="raise")
    with pytest.raises(GateFailure, match="late/value = not logged"):
        make_trainer(tmp_path, [gate]).validate(module(), ShortcutDigitsDataModule())


@pytest.mark.parametrize("bar", ["tqdm", "rich"])
def test_failure_block_is_printed_above_the_progress_bar(tmp_path, capsys, caplog, bar):
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    gate = ExplanationGate(rules=["val/acc > 2"], action="warn")
    progress = TQDMProgressBar() if bar == "tqdm" else RichProgressBar()
    trainer = make_trainer(tmp_path, [gate, progress], max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                           enable_progress_bar=True)
    with caplog.at_level(logging.WARNING, logger="xai_callbacks"):
        trainer.fit(module(), ShortcutDigitsDataModule())
    out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().out)  # without the terminal's cursor moves
    # during the run the bar prints the block on lines of its own; at its end (bars closed) the logger does
    (line,) = [line for line in out.splitlines() if "xai-callbacks gate FAILED" in line]
    assert line.lstrip().startswith("==== xai-callbacks gate FAILED at epoch 0")
    (record,) = [r for r in caplog.records if "gate FAILED" in r.getMessage()]
    assert "at the end of the run" in record.getMessage() and record.name == "xai_callbacks.callbacks.gate"


def test_a_model_with_the_same_output_for_every_input_fails_the_gate_saying_so(tmp_path, capsys):
    """A dead network (SqueezeNet 1.1 trained on small crops ended so: a ReLU after its last layer,
    0 everywhere): no heatmap can be analysed, SpRAy logs nothing, and the gate's message names the
    model's constant output rather than only the skipped classes."""
    from xai_callbacks import SpRAyCallback

    torch.manual_seed(0)
    dead = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10), torch.nn.ReLU())
    with torch.no_grad():
        dead[1].bias.fill_(-1e3)   # every logit 0 after the ReLU
    cb = SpRAyCallback(max_per_class=20, spray_options={"visualisation": None}, save_virelay=False)
    with pytest.raises(GateFailure, match=r"spray/\*/n_flagged = not logged .*SpRAyCallback is attached but failed "
                                          r"\d+ time\(s\), the last: at epoch 0: the model gives all 200 analysed "
                                          r"samples the same output"):
        make_trainer(tmp_path, [cb, ExplanationGate(action="raise")]).validate(Classifier(dead),
                                                                               ShortcutDigitsDataModule())
    assert cb.errors == 2 * 10 + 1   # per class: its constant heatmaps, its skip; and the model's output
    assert main(["gate", str(tmp_path)]) == 1 and "the same output" in capsys.readouterr().out
