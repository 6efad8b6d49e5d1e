"""``xai-callbacks``: the command line.

    xai-callbacks fit --config configs/clever_hans.yaml [key=value ...]
    xai-callbacks gate RUN_DIR_OR_REPORT [--rules FILE]   (exit 0 pass, 1 fail, 2 unusable input)
    xai-callbacks methods
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _fit(args) -> int:
    from .config import ConfigError, build, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"xai-callbacks fit: {err}", file=sys.stderr)
        return 2
    if cfg.logger.kind == "wandb" and cfg.logger.offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    trainer, module, datamodule = build(cfg)
    trainer.fit(module, datamodule)
    from . import sinks

    where = sinks.run_dir(trainer) if trainer.loggers else trainer.default_root_dir
    print(f"\nrun written to {where}")
    if sinks.wandb_loggers(trainer):
        import wandb

        wandb.finish()
        print(f"upload it to W&B with:  wandb sync {where}")
    return 0


def _load_rules(path: str) -> list[str]:
    """Rules from YAML: a list, a mapping with ``rules``, or a run config with ``callbacks.gate.rules``."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path))
    if isinstance(data, dict):
        data = data.get("rules", data.get("callbacks", {}).get("gate", {}).get("rules"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a list of rules, a 'rules:' list, or callbacks.gate.rules")
    return [str(r) for r in data]


def _gate(args) -> int:
    from .gate import describe, evaluate, parse_rule, read_report

    try:
        report = read_report(args.report)
        rules = [parse_rule(r) for r in (_load_rules(args.rules) if args.rules else report["rules"])]
        if not report["epochs"]:
            raise ValueError("the gate report has no checked epoch yet")
    except (OSError, ValueError) as err:
        print(f"xai-callbacks gate: {err}", file=sys.stderr)
        return 2
    last = report["epochs"][-1]
    checks = evaluate(rules, last["values"])
    width = max(len(c.key) for c in checks)
    print(f"gate report of epoch {last['epoch']} (step {last.get('step', '?')})")
    print(f"{'key':{width}s}  {'value':>10s}  rule")
    for c in checks:
        verdict = "pass" if c.passed else ("NOT LOGGED" if c.value is None else "FAIL")
        value = "-" if c.value is None else f"{c.value:.4g}"
        print(f"{c.key:{width}s}  {value:>10s}  {c.rule:30s} {verdict}")
    if any(c.value is None for c in checks):
        print("xai-callbacks gate: some rules name values the run never logged", file=sys.stderr)
        return 2
    failed = [c for c in checks if not c.passed]
    for c in failed:
        print(f"FAILED: {describe(c, last['values'])}")
    print(f"gate: {len(checks) - len(failed)} check(s) passed, {len(failed)} failed")
    return 1 if failed else 0


def _methods(args) -> int:
    from .attribution import available_methods, method_options

    for name in available_methods():
        opts = ", ".join(f"{k}={v!r}" for k, v in method_options(name).items())
        print(f"{name:28s} {opts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xai-callbacks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train with the callbacks of a config file")
    fit.add_argument("--config", "-c", help="YAML config (see configs/)")
    fit.add_argument("overrides", nargs="*", help="dotlist overrides such as trainer.max_epochs=3")
    fit.set_defaults(func=_fit)
    gate = sub.add_parser("gate", help="check a run's gate report; exit 0 pass, 1 fail, 2 unusable input")
    gate.add_argument("report", help="a run directory (searched for gate.json) or a gate.json file")
    gate.add_argument("--rules", help="YAML file with rules to check instead of the report's own")
    gate.set_defaults(func=_gate)
    methods = sub.add_parser("methods", help="list attribution methods and their options")
    methods.set_defaults(func=_methods)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
