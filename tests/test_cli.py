"""The command line: every unusable input is one line naming it and what is valid, exit code 2, no
traceback unless --debug; `gate` imports neither torch, Lightning nor W&B."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xai_callbacks.cli import UsageError, main
from xai_callbacks.gate import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "clever_hans.yaml")


@pytest.fixture
def report(tmp_path):
    values = {"spray/0/max_suspicion": 0.1, "spray/0/suspicious_strategy": 2.0, "spray/7/max_suspicion": 0.6,
              "spray/7/suspicious_strategy": 4.0, "spray/7/n_clusters": 3.0, "val/acc": 0.9}
    epochs = [{"epoch": 4, "step": 40, "passed": False, "checks": [], "values": values}]
    return write_report(tmp_path / "run" / "gate.json", ["spray/*/max_suspicion < 0.25"], epochs)


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def bad_inputs(tmp_path, report):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "bad_rule.yaml").write_text("rules: ['val/acc ~ 3']\n")
    (tmp_path / "no_rules.yaml").write_text("something: else\n")
    return [
        (["gatee", "x"], r"invalid choice: 'gatee' \(choose from 'fit', 'gate', 'methods'\)"),
        (["gate"], r"required: report"),
        (["gate", str(tmp_path / "no-such-run")], r"no-such-run does not exist; expected a run directory or a gate.json"),
        (["gate", str(tmp_path / "empty")], r"no gate.json under .*empty; was an ExplanationGate in the run\?"),
        (["gate", str(tmp_path / "broken.json")], r"broken.json is not valid JSON .*expected a gate.json"),
        (["gate", str(report), "--rules", str(tmp_path / "none.yaml")], r"rules file .*none.yaml does not exist"),
        (["gate", str(report), "--rules", str(tmp_path / "bad_rule.yaml")],
         r"cannot parse gate rule 'val/acc ~ 3': expected .* op in \['<'"),
        (["gate", str(report), "--rules", str(tmp_path / "no_rules.yaml")], r"expected a list of rules"),
        (["fit", "--config", str(tmp_path / "nowhere.yaml")], r"config file .*nowhere.yaml does not exist"),
        (["fit", "--config", DEMO, "trainer.max_epochs=1", "callbacks.attribution.methods=[saliency,gradcamm]"],
         r"^xai-callbacks fit: override 'callbacks.attribution.methods=\[saliency,gradcamm\]': in "
         r"callbacks.attribution: unknown attribution method\(s\) \['gradcamm'\]; valid: \[.*'saliency'"),
        (["fit", "--config", DEMO, "trainer.max_epocs=3"],
         r"^xai-callbacks fit: override 'trainer.max_epocs=3': unknown trainer key\(s\) \['max_epocs'\]"),
        (["fit", "data.sizee=3"], r"override 'data.sizee=3': Key 'sizee' not in 'DataConfig'"),
        (["fit", "max_epochs"], r"override 'max_epochs': overrides look like key=value"),
        (["fit", "data.artifact_kind=zigzag"], r"data.artifact_kind='zigzag' is not valid; valid: \["),
        (["fit", "--configg", DEMO], r"unrecognized arguments: --configg"),
        (["fit", "logger.kind=none", "trainer.max_epochs=-5"], r"override 'trainer.max_epochs=-5': in trainer: `max_epochs`"),
        (["fit", "logger.kind=none", "model.width=-1"], r"override 'model.width=-1': in model: .*negative dimension"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, report, capsys, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)  # nothing is written into the repository

    for argv, message in bad_inputs(tmp_path, report):
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, code, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert re.search(message, err.strip()), (argv, err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        main(["gate", str(tmp_path / "no-such-run"), "--debug"])
    with pytest.raises(UsageError, match="gradcamm"):
        main(["--debug", "fit", "callbacks.attribution.methods=[saliency,gradcamm]"])


def test_gate_names_class_strategy_and_evidence(report, capsys):
    code, out, _ = run(["gate", str(report.parent)], capsys)
    assert code == 1
    assert "spray/7/max_suspicion" in out and "FAIL" in out and "1 failed" in out
    assert "class 7, strategy 4: max_suspicion = 0.6" in out
    assert "evidence: panels spray/7/evidence, spray/7/clusters" in out and f"report: {report}" in out


def test_gate_imports_no_torch_lightning_or_wandb(report):
    probe = ("import sys\nfrom xai_callbacks.cli import main\ncodes = [main(['gate', sys.argv[1]]), "
             "main(['gate', sys.argv[1] + '/nope'])]\n"
             "print(codes, sorted(m for m in ('torch', 'lightning', 'wandb', 'omegaconf') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, str(report)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.stdout.strip().splitlines()[-1] == "[1, 2] []", done.stderr


def test_gate_on_a_run_that_never_validated_fails(tmp_path, capsys):
    report = write_report(tmp_path / "gate.json", ["spray/*/max_suspicion < 0.25"], [],
                          final={"epoch": 3, "passed": False, "missing": []})
    code, out, _ = run(["gate", str(report)], capsys)
    assert code == 1 and "NOT LOGGED (logged by SpRAyCallback)" in out
    write_report(tmp_path / "gate.json", ["val/acc > 0.5"], [])
    assert run(["gate", str(report)], capsys)[0] == 2  # no check at all yet: nothing to judge


def test_methods_listing_read_from_the_source_is_the_registry(capsys):
    from xai_callbacks.attribution import available_methods, method_options
    from xai_callbacks.cli import _registered_methods

    live = {name: [(k, repr(v)) for k, v in method_options(name).items()] for name in available_methods()}
    assert _registered_methods() == live  # a method registered other than by @register_method("...") breaks this
    assert main(["methods"]) == 0
    static = capsys.readouterr().out
    assert main(["methods", "--live"]) == 0 and capsys.readouterr().out == static


def test_methods_imports_no_torch():
    probe = ("import sys\nfrom xai_callbacks.cli import main\nmain(['methods'])\n"
             "print(sorted(m for m in ('torch', 'lightning', 'wandb') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert "saliency" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]", done.stderr
