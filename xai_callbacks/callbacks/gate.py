"""ExplanationGate: stop or fail a run whose explanations break a rule."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import lightning.pytorch as pl
import torch

from .. import sinks
from ..gate import DEFAULT_RULES, REPORT_NAME, describe, evaluate, parse_rule, write_report

__all__ = ["ExplanationGate", "GateFailure"]

ACTIONS = ("warn", "stop", "raise")


class GateFailure(RuntimeError):
    """Raised by an ``ExplanationGate(action="raise")`` whose rules failed."""


class ExplanationGate(pl.Callback):
    """Check rules over logged explanation values after each validation.

    Values are the trainer's ``callback_metrics`` (everything logged with ``self.log`` by the
    module and by callbacks such as the metrics and SpRAy callbacks), read in
    ``on_validation_end`` so they are all in. The pass / fail decision is reduced across DDP
    ranks (any rank failing fails all), so every rank stops or raises together. Each check is
    appended to ``gate.json`` in the run directory, ``gate/passed`` and the checked values go to
    the summary (``gate/<key>``), and an online W&B run gets a ``wandb.alert`` on failure.

    Args:
        rules: rules such as ``"spray/suspicious_share < 0.1"`` or
            ``"spray/*/max_suspicion < 0.25"`` (``*`` matches any part of a key; the default:
            no SpRAy cluster is flagged in any class). A failure names the key and the values
            logged beside it (for SpRAy: the class and its most suspicious strategy).
        action: on failure ``"warn"``, ``"stop"`` (``trainer.should_stop``) or ``"raise"``
            (:class:`GateFailure` naming the failed rules and values).
        every_n_epochs: check on epochs where ``current_epoch % every_n_epochs == 0``, and
            on the last epoch.
        missing: what a rule whose key was never logged does: ``"fail"`` or ``"skip"``.
    """

    def __init__(self, rules: Sequence[str] = DEFAULT_RULES, action: str = "stop",
                 every_n_epochs: int = 1, missing: str = "skip"):
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rules=[str(r) for r in self.rules])

    @property
    def passed(self) -> bool | None:
        """The verdict of the last check (None before the first)."""
        return self.epochs[-1]["passed"] if self.epochs else None

    def on_validation_end(self, trainer, pl_module) -> None:
        last = trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - 1
        if trainer.sanity_checking or not (trainer.current_epoch % self.every_n_epochs == 0 or last):
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
        checks = [c for c in evaluate(self.rules, values) if c.value is not None or self.missing == "fail"]
        failed = [c for c in checks if not c.passed]
        # every rank takes the same decision: any failing rank fails all
        failed_anywhere = trainer.strategy.reduce_boolean_decision(bool(failed), all=False)
        entry = {"epoch": trainer.current_epoch, "step": trainer.global_step, "passed": not failed_anywhere,
                 "checks": [c.to_dict() for c in checks],
                 "values": {k: v for k, v in values.items() if math.isfinite(v)}}
        self.epochs.append(entry)
        if trainer.is_global_zero:
            write_report(sinks.run_dir(trainer) / REPORT_NAME, self.rules, self.epochs)
            summary = {"gate/passed": not failed_anywhere, "gate/epoch": trainer.current_epoch}
            summary.update({f"gate/{c.key}": c.value for c in checks if c.value is not None})
            sinks.log_summary(trainer, summary)
        if not failed_anywhere:
            return
        reasons = "; ".join(describe(c, values) for c in failed) or "on another rank"
        message = f"explanation gate failed at epoch {trainer.current_epoch}: {reasons}"
        if trainer.is_global_zero:
            self._alert(trainer, message)
        if self.action == "raise":
            raise GateFailure(message)
        if self.action == "stop":
            trainer.should_stop = True
        warnings.warn(message + (" -- stopping training" if self.action == "stop" else ""), stacklevel=2)

    @staticmethod
    def _alert(trainer, message: str) -> None:
        for lg in sinks.wandb_loggers(trainer):
            if not getattr(lg.experiment, "offline", True):
                lg.experiment.alert(title="xai-callbacks gate failed", text=message)

    def state_dict(self) -> dict:
        return {"epochs": self.epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))

