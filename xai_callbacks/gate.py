"""Gate rules over logged explanation values, and the ``gate.json`` report.

A rule says what must hold: ``"spray/suspicious_share < 0.1"``. Its key may hold ``*``
wildcards (``"spray/*/max_suspicion < 0.5"``), which apply the rule to every matching value, so
a failure names the concrete key (here: the class). No Lightning here: the callback
(:class:`xai_callbacks.callbacks.gate.ExplanationGate`) and the CLI both use these functions.
"""
from __future__ import annotations

import fnmatch
import json
import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["Rule", "Check", "parse_rule", "evaluate", "context", "describe", "logged_by", "not_logged", "evidence",
           "failure_block", "read_report", "write_report", "find_report", "REPORT_NAME", "DEFAULT_RULES"]

# no SpRAy strategy flagged in any class (flagged by causal evidence: removal and transfer); a failure names the class
DEFAULT_RULES = ("spray/*/n_flagged < 1",)

REPORT_NAME = "gate.json"
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}
_RULE = re.compile(r"^\s*(?P<key>[^\s<>=!]+)\s*(?P<op><=|>=|==|!=|<|>)\s*(?P<value>[-+0-9.eE]+|nan|inf)\s*$")


@dataclass(frozen=True)
class Rule:
    key: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.threshold:g}"

    def holds(self, value: float) -> bool:
        return math.isfinite(value) and _OPS[self.op](value, self.threshold)


@dataclass(frozen=True)
class Check:
    """One rule applied to one logged value (``value`` None: nothing was logged under ``key``)."""
    rule: str
    key: str
    value: float | None
    passed: bool

    def to_dict(self) -> dict:
        return {"rule": self.rule, "key": self.key, "value": self.value, "passed": self.passed}


def parse_rule(text: str | Rule) -> Rule:
    """``"<key> <op> <number>"`` with op in <, <=, >, >=, ==, != -> :class:`Rule`."""
    if isinstance(text, Rule):
        return text
    m = _RULE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse gate rule {text!r}: expected '<logged key> <op> <number>' with op in "
                         f"{list(_OPS)}, e.g. 'spray/suspicious_share < 0.1'")
    return Rule(m["key"], m["op"], float(m["value"]))


def evaluate(rules: Iterable[Rule | str], values: Mapping[str, float]) -> list[Check]:
    """Every rule against ``values``; a rule whose key matches nothing yields a failed check with
    ``value=None`` (a gate must not pass on a value that was never logged)."""
    checks = []
    for rule in map(parse_rule, rules):
        keys = sorted(k for k in values if fnmatch.fnmatchcase(k, rule.key)) if "*" in rule.key else (
            [rule.key] if rule.key in values else [])
        if not keys:
            checks.append(Check(str(rule), rule.key, None, False))
        for key in keys:
            value = float(values[key])
            checks.append(Check(str(rule), key, value, rule.holds(value)))
    return checks


def context(key: str, values: Mapping[str, float]) -> dict[str, float]:
    """The other values logged beside ``key`` (same parent path), e.g. a SpRAy class's strategy id."""
    parent = key.rsplit("/", 1)[0] + "/"
    return {k[len(parent):]: v for k, v in sorted(values.items()) if k.startswith(parent) and k != key
            and "/" not in k[len(parent):]}


def describe(check: Check, values: Mapping[str, float]) -> str:
    """``"<key> = <value> breaks '<rule>' (<sibling values>)"`` for a failed check."""
    value = "not logged" if check.value is None else f"{check.value:.4g}"
    around = ", ".join(f"{k}={v:.4g}" for k, v in context(check.key, values).items())
    return f"{check.key} = {value} breaks '{check.rule}'" + (f" ({around})" if around else "")


# key pattern -> what logs it (first match wins)
SOURCES = (("spray/*", "SpRAyCallback"), ("xai/heatmaps/*", "AttributionCallback"),
           ("xai/errors", "any explanation callback"), ("xai/*", "ExplanationMetricsCallback"),
           ("inpainter/*", "InpainterCallback"), ("gate/*", "ExplanationGate"))


def logged_by(key: str) -> str:
    """Who logs ``key`` (a rule's key, wildcards allowed): an xai-callbacks callback, or the module."""
    for pattern, source in SOURCES:
        if fnmatch.fnmatchcase(key, pattern) or fnmatch.fnmatchcase(pattern, key):
            return source
    return "the LightningModule (self.log)"


def not_logged(key: str, callbacks: Mapping[str, Mapping] | None = None) -> str:
    """Why a rule's ``key`` may have gone unlogged: the callback that logs it is not attached, it is
    attached and failed (its failures and the last one's message), or it is attached and logs no
    such key (a misspelt rule). ``callbacks``: the attached callbacks by class name, each with
    ``errors`` and ``last_error`` (None: not known)."""
    source = logged_by(key)
    state = None if callbacks is None else callbacks.get(source)
    if state is None:
        return f"it is logged by {source}: attach it (or drop the rule)"
    if state.get("errors"):
        return f"{source} is attached but failed {state['errors']} time(s), the last: {state.get('last_error')}"
    return f"{source} is attached but logged no such key (is the rule's key right?)"


def evidence(key: str, run_dir: str | Path | None = None, epoch: int | None = None) -> list[str]:
    """Where to look at what a failed ``key`` is about: dashboard panels and files of the run."""
    parts = key.split("/")
    where = []
    if parts[0] == "spray" and len(parts) > 2:
        where.append(f"panels spray/{parts[1]}/evidence, spray/{parts[1]}/clusters, spray/{parts[1]}/prototypes, "
                     f"spray/{parts[1]}/scatter")
        if run_dir is not None:
            found = sorted(Path(run_dir).glob("spray/epoch_*/project.yaml"))
            mine = [p for p in found if epoch is not None and p.parent.name == f"epoch_{epoch:04d}"]
            if mine or found:
                where.append(f"ViRelAy: virelay {(mine or found)[-1]}")
    elif parts[0] == "xai" and len(parts) > 2:
        where.append(f"panel xai/heatmaps/{parts[1]}")
    elif parts[0] == "inpainter":
        where.append("panels inpainter/*")
    return where


def failure_block(checks: Iterable[Check], values: Mapping[str, float], *, epoch: int | None, action: str = "",
                  run_dir: str | Path | None = None, report: str | Path | None = None, final: bool = False,
                  callbacks: Mapping[str, Mapping] | None = None) -> str:
    """The text a failing gate prints: each failed rule with its key (for SpRAy: the class and its
    most suspicious strategy), the value, who logs it, and where the evidence is; for a key never
    logged, why (:func:`not_logged`, with the run's ``callbacks``)."""
    failed = [c for c in checks if not c.passed]
    when = "at the end of the run" if final else f"at epoch {epoch}"
    lines = [f"==== xai-callbacks gate FAILED {when}: {len(failed)} check(s) ===="]
    for c in failed:
        lines.append(f"  rule '{c.rule}'")
        if c.value is None:
            lines.append(f"    {c.key}: never logged" + (" by the end of the run" if final else "") +
                         f"; {not_logged(c.key, callbacks)}")
            continue
        parts = c.key.split("/")
        around = context(c.key, values)
        if parts[0] == "spray" and len(parts) == 3:
            strategy = around.get("suspicious_strategy")
            lines.append(f"    class {parts[1]}" + ("" if strategy is None else f", strategy {int(strategy)}") +
                         f": {parts[2]} = {c.value:.4g}")
        else:
            lines.append(f"    {c.key} = {c.value:.4g}")
        if around:
            lines.append("    beside it: " + ", ".join(f"{k}={v:.4g}" for k, v in around.items()))
        for where in evidence(c.key, run_dir, epoch):
            lines.append(f"    evidence: {where}")
    if report is not None:
        lines.append(f"  report: {report}")
    if action:
        lines.append({"warn": "  training goes on (action='warn')", "stop": "  training stops (action='stop')",
                      "raise": "  the run fails (action='raise')"}.get(action, f"  action: {action}"))
    return "\n".join(lines)


def write_report(path: str | Path, rules: Iterable[Rule | str], epochs: list[dict], final: dict | None = None,
                 missing: str = "fail", callbacks: Mapping[str, Mapping] | None = None) -> Path:
    """``gate.json``: the rules, each checked epoch (values and checks), the end-of-run check
    (``final``: rules whose key was never logged), the run's callbacks with their failures
    (:func:`not_logged`), and the verdict (fail when the last checked epoch or the end-of-run check
    failed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    last = epochs[-1] if epochs else None
    verdicts = [e["passed"] for e in ([last] if last else []) + ([final] if final else [])]
    report = {"rules": [str(parse_rule(r)) for r in rules], "missing": missing, "epochs": epochs, "final": final,
              "callbacks": dict(callbacks or {}),
              "verdict": None if not verdicts else ("pass" if all(verdicts) else "fail")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)
    return path


def find_report(path: str | Path) -> Path:
    """The report itself, or the newest ``gate.json`` under a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected a run directory or a {REPORT_NAME}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a {REPORT_NAME} nor a run directory")
    found = sorted(path.rglob(REPORT_NAME), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {REPORT_NAME} under {path}; was an ExplanationGate in the run?")
    return found[-1]


def read_report(path: str | Path) -> dict:
    """The parsed report; ``ValueError`` when it is not one."""
    path = find_report(path)
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected a {REPORT_NAME} written by ExplanationGate") from None
    if not isinstance(report, dict) or not isinstance(report.get("epochs"), list) or "rules" not in report:
        raise ValueError(f"{path} is not a gate report (needs 'rules' and 'epochs')")
    return report
