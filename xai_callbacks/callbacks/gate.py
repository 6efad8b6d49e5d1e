"""ExplanationGate: stop or fail a run whose explanations break a rule."""
from __future__ import annotations

import fnmatch
import logging
import math
from typing import Sequence

import lightning.pytorch as pl
import torch

from .. import sinks
from ..gate import (DEFAULT_RULES, REPORT_NAME, Check, describe, evaluate, failure_block, logged_by,
                    not_logged, parse_rule, write_report)
from .base import ExplanationCallback, on_last_epoch
from .progress import echo

log = logging.getLogger(__name__)

__all__ = ["ExplanationGate", "GateFailure"]

ACTIONS = ("warn", "stop", "raise")


class GateFailure(RuntimeError):
    """Raised by an ``ExplanationGate(action="raise")`` whose rules failed."""


class ExplanationGate(pl.Callback):
    """Check rules over logged explanation values after each validation.

    Values are the trainer's ``callback_metrics`` (everything logged with ``self.log`` by the
    module and by callbacks such as the metrics and SpRAy callbacks), read in
    ``on_validation_end`` so they are all in. Analyses that run in the background (SpRAy's with
    ``asynchronous=True``) are checked once delivered: the analysis of epoch ``e`` at the end of
    epoch ``e + 1``'s validation, and the last one at the end of ``fit``, where the gate delivers
    every explanation callback's pending analysis itself (whatever the callbacks' order) and
    checks the rules again before the end-of-run check. The pass / fail decision is reduced across DDP
    ranks (any rank failing fails all), so every rank stops or raises together. Each check is
    appended to ``gate.json`` in the run directory, ``gate/passed`` and the checked values go to
    the summary (``gate/<key>``), and an online W&B run gets a ``wandb.alert`` on failure.

    A failure prints one block (which rule, which key, for SpRAy the class and its strategy, who
    logs it and where the evidence is) above the progress bar, or through the
    ``xai_callbacks.callbacks.gate`` logger when no bar is shown, at the end of the epoch and
    again at the end of the run.

    The gate never passes by silence: a rule whose key is not logged yet is pending while the run
    goes on (a callback may run every N epochs), and fails the gate at the end of ``fit`` (or of
    ``validate``) when its key was never logged, naming the key and the callback that logs it. A
    rule that needs a callback which is not attached (``spray/...`` without a
    :class:`~xai_callbacks.SpRAyCallback`) is reported when fitting starts.

    Args:
        rules: rules such as ``"spray/suspicious_share < 0.1"`` or
            ``"spray/*/max_suspicion < 0.25"`` (``*`` matches any part of a key; the default:
            no SpRAy cluster is flagged in any class). A failure names the key and the values
            logged beside it (for SpRAy: the class and its most suspicious strategy).
        action: on failure ``"warn"``, ``"stop"`` (``trainer.should_stop``) or ``"raise"``
            (:class:`GateFailure` naming the failed rules and values).
        every_n_epochs: check on epochs where ``current_epoch % every_n_epochs == 0``, and
            on the last epoch.
        missing: a rule whose key was never logged by the end of the run: ``"fail"`` fails the
            gate (default), ``"skip"`` ignores the rule (only for keys that may legitimately be
            absent).

    Raises:
        ValueError: an unknown ``action`` or ``missing``, ``every_n_epochs`` < 1, no rules, or a
            rule that does not parse.
        GateFailure: during ``fit`` / ``validate`` with ``action="raise"`` when a rule fails.

    Example::

        from xai_callbacks import ExplanationGate, ExplanationMetricsCallback, SpRAyCallback

        gate = ExplanationGate(rules=["spray/*/n_flagged < 1", "xai/saliency/sparseness > 0.2"], action="stop")
        Trainer(callbacks=[SpRAyCallback(), ExplanationMetricsCallback(), gate]).fit(model, datamodule=dm)
        gate.passed  # True, False, or None before the first check
    """

    def __init__(self, rules: Sequence[str] = DEFAULT_RULES, action: str = "stop",
                 every_n_epochs: int = 1, missing: str = "fail"):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if missing not in ("fail", "skip"):
            raise ValueError(f"missing must be 'fail' or 'skip', got {missing!r}")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        rules = [rules] if isinstance(rules, str) else list(rules)
        if not rules:
            raise ValueError("an ExplanationGate needs at least one rule")
        self.rules = [parse_rule(r) for r in rules]
        self.action, self.every_n_epochs, self.missing = action, every_n_epochs, missing
        self.epochs: list[dict] = []
        self.final: dict | None = None
        self._seen_deliveries = 0
        self._run_dir = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rules=[str(r) for r in self.rules])

    def on_fit_start(self, trainer, pl_module) -> None:
        self.final = None
        self._seen_deliveries = self._deliveries(trainer)
        attached = {k.__name__ for cb in trainer.callbacks for k in type(cb).__mro__}
        for rule in self.rules:
            source = logged_by(rule.key)
            if source.endswith("Callback") and source not in attached:
                echo(trainer, f"xai-callbacks gate: rule '{rule}' reads {rule.key}, which {source} logs, and no "
                     f"{source} is attached to the Trainer: the gate will fail at the end of the run unless "
                     f"something else logs it", log, above_bar=False)  # no bar is drawn yet

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not (trainer.current_epoch % self.every_n_epochs == 0 or on_last_epoch(trainer)):
            return
        self._check(trainer)

    @staticmethod
    def _deliveries(trainer) -> int:
        return sum(getattr(cb, "deliveries", 0) for cb in trainer.callbacks)

    def _check(self, trainer) -> None:
        """Check the rules on the values logged so far (every rank takes the same decision)."""
        self._seen_deliveries = self._deliveries(trainer)
        values = self._values(trainer)
        checks = evaluate(self.rules, values)
        # a key not logged yet is pending while fitting; a lone validate() is its own end of run
        final = trainer.state.fn != "fit"
        if final:
            self.final = None
        failed = [c for c in checks if not c.passed and (c.value is not None or (final and self.missing == "fail"))]
        # every rank takes the same decision: any failing rank fails all
        failed_anywhere = trainer.strategy.reduce_boolean_decision(bool(failed), all=False)
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step, "passed": not failed_anywhere,
                 "checks": [c.to_dict() for c in checks],
                 "values": {k: v for k, v in values.items() if math.isfinite(v)}}
        self.epochs.append(entry)
        report = self._write(trainer, checks)
        if failed_anywhere:
            self._fail(trainer, failed, values, report, final=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        """The end-of-run check: the pending background analyses are delivered and checked, then
        every rule's key must have been logged at least once."""
        for cb in trainer.callbacks:
            flush = getattr(cb, "flush", None)
            if cb is not self and callable(flush):
                flush(trainer)
        if self._deliveries(trainer) != getattr(self, "_seen_deliveries", 0):
            self._check(trainer)  # results delivered after the last check (here or in an earlier on_fit_end)
        seen = set(self._values(trainer))
        for entry in self.epochs:
            seen |= set(entry["values"])
        missing = [Check(str(r), r.key, None, False) for r in self.rules
                   if self.missing == "fail" and not any(fnmatch.fnmatchcase(k, r.key) for k in seen)]
        failed_anywhere = trainer.strategy.reduce_boolean_decision(bool(missing), all=False)
        self.final = {"epoch": trainer.current_epoch, "passed": not failed_anywhere,
                      "missing": [{"rule": c.rule, "key": c.key, "logged_by": logged_by(c.key)} for c in missing]}
        report = self._write(trainer, [])
        if failed_anywhere:
            self._fail(trainer, missing, {}, report, final=True)
        elif self.epochs and not self.epochs[-1]["passed"]:
            last = self.epochs[-1]
            failed = [Check(c["rule"], c["key"], c["value"], c["passed"]) for c in last["checks"]
                      if not c["passed"] and c["value"] is not None]
            echo(trainer, failure_block(failed, last["values"], epoch=last["epoch"], run_dir=self._run_dir,
                                        report=report, final=True), log, above_bar=False)

    @staticmethod
    def _callbacks(trainer) -> dict[str, dict]:
        """The attached callbacks by class name, the explanation callbacks with their failures so far
        (why a key went unlogged)."""
        return {type(cb).__name__: {"errors": int(cb.errors), "last_error": cb.last_error}
                if isinstance(cb, ExplanationCallback) else {} for cb in trainer.callbacks}

    @staticmethod
    def _values(trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}

    def _write(self, trainer, checks: list[Check]):
        """Write ``gate.json`` and the summary on rank 0; the report's path (None elsewhere)."""
        self._run_dir = None
        if not trainer.is_global_zero:
            return None
        self._run_dir = sinks.run_dir(trainer)
        path = write_report(self._run_dir / REPORT_NAME, self.rules, self.epochs, final=self.final,
                            missing=self.missing, callbacks=self._callbacks(trainer))
        summary = {"gate/passed": self.passed is not False, "gate/epoch": trainer.current_epoch}
        summary.update({f"gate/{c.key}": c.value for c in checks if c.value is not None})
        sinks.log_summary(trainer, summary)
        return path

    def _fail(self, trainer, failed: list[Check], values: dict, report, final: bool) -> None:
        callbacks = self._callbacks(trainer)
        reasons = "; ".join(describe(c, values) + (f" ({not_logged(c.key, callbacks)})" if c.value is None else "")
                            for c in failed) or "on another rank"
        when = "at the end of the run" if final else f"at epoch {trainer.current_epoch}"
        message = f"explanation gate failed {when}: {reasons}"
        action = "raise" if self.action == "raise" else ("" if final else self.action)
        echo(trainer, failure_block(failed, values, epoch=trainer.current_epoch, action=action,
                                    run_dir=self._run_dir, report=report, final=final, callbacks=callbacks),
             log, above_bar=not final)
        if trainer.is_global_zero:
            self._alert(trainer, message)
        if self.action == "raise":
            raise GateFailure(message)
        if self.action == "stop":
            trainer.should_stop = True

    @staticmethod
    def _alert(trainer, message: str) -> None:
        for lg in sinks.wandb_loggers(trainer):
            if not getattr(lg.experiment, "offline", True):
                lg.experiment.alert(title="xai-callbacks gate failed", text=message)

    @property
    def passed(self) -> bool | None:
        """The verdict: the last check's, failed also by the end-of-run check (None before any check)."""
        verdicts = [e["passed"] for e in ([self.epochs[-1]] if self.epochs else []) + ([self.final] if self.final else [])]
        return all(verdicts) if verdicts else None

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))

