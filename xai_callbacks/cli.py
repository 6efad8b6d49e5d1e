"""``xai-callbacks``: the command line.

    xai-callbacks fit --config configs/clever_hans.yaml [key=value ...]
    xai-callbacks gate RUN_DIR_OR_REPORT [--rules FILE]   (exit 0 pass, 1 fail, 2 unusable input)
    xai-callbacks methods

Every unusable input (a missing file, a misspelled key, an unknown method, a malformed rule)
ends in one line naming it and what is valid, with exit code 2; ``--debug`` shows the traceback.
``gate`` and ``methods`` import neither torch, Lightning nor W&B (``methods`` reads the
registry from the source; ``methods --live`` imports it).
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "UsageError"]


class UsageError(Exception):
    """An input the command cannot use; the message names it and what is valid."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: message``) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _fit(args) -> int:
    from .config import ConfigError, build, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.logger.kind == "wandb" and cfg.logger.offline:
            os.environ.setdefault("WANDB_MODE", "offline")
        trainer, module, datamodule = build(cfg, args.config, args.overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from err
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
    import yaml

    if not os.path.exists(path):
        raise UsageError(f"rules file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path}: cannot read rules ({first})") from err
    if isinstance(data, dict):
        data = data.get("rules", (data.get("callbacks") or {}).get("gate", {}).get("rules"))
    if not isinstance(data, list) or not data:
        raise UsageError(f"{path}: expected a list of rules, a 'rules:' list, or callbacks.gate.rules")
    return [str(r) for r in data]


def _gate(args) -> int:
    from .gate import evaluate, failure_block, find_report, logged_by, parse_rule, read_report

    try:
        report = read_report(args.report)
        path = find_report(args.report)
        rules = [parse_rule(r) for r in (_load_rules(args.rules) if args.rules else report["rules"])]
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from err
    if not report["epochs"] and not report.get("final"):
        raise UsageError(f"{path}: the gate report has no checked epoch yet (did the run reach a validation?)")
    # a run that ended without any validation still has its end-of-run check: its rules were never logged
    last = report["epochs"][-1] if report["epochs"] else {"epoch": report["final"]["epoch"], "values": {}}
    seen: dict[str, float] = {}
    for entry in report["epochs"]:
        seen.update(entry["values"])
    checks = evaluate(rules, {**seen, **last["values"]})
    skip = report.get("missing") == "skip" and not args.rules
    checks = [c for c in checks if c.value is not None or not skip]
    print(f"gate report {path}: epoch {last['epoch']} (step {last.get('step', '?')})"
          + (", run finished" if report.get("final") else ""))
    if not checks:
        print("gate: no rule matched a logged value and missing values are skipped (missing='skip')")
        return 0
    width = max(len(c.key) for c in checks)
    print(f"{'key':{width}s}  {'value':>10s}  rule")
    for c in checks:
        verdict = "pass" if c.passed else (f"NOT LOGGED (logged by {logged_by(c.key)})" if c.value is None
                                           else "FAIL")
        value = "-" if c.value is None else f"{c.value:.4g}"
        print(f"{c.key:{width}s}  {value:>10s}  {c.rule:30s} {verdict}")
    failed = [c for c in checks if not c.passed]
    if failed:
        print(failure_block(failed, last["values"], epoch=last["epoch"], run_dir=path.parent, report=path,
                            final=bool(report.get("final")), callbacks=report.get("callbacks")))
    print(f"gate: {len(checks) - len(failed)} check(s) passed, {len(failed)} failed")
    return 1 if failed else 0


def _registered_methods() -> dict[str, list[tuple[str, str]]]:
    """The attribution registry read from the source, without importing it (no torch): every
    function decorated ``@register_method("<name>", ...)`` in ``xai_callbacks/attribution/``
    and its options (the parameters after ``(model, x, target)`` that are keyword-only or have a
    default), as ``name -> [(option, repr of its default)]``. ``methods --live`` imports the
    registry instead; a test keeps the two equal."""
    import ast
    from pathlib import Path

    found: dict[str, list[tuple[str, str]]] = {}
    for path in sorted((Path(__file__).parent / "attribution").glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for dec in fn.decorator_list:
                if (isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "register_method" and dec.args
                        and isinstance(dec.args[0], ast.Constant)):
                    a = fn.args
                    positional = a.posonlyargs + a.args
                    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
                    params = list(zip(positional, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
                    options = []
                    for i, (arg, default) in enumerate(params):
                        if i < 3 or (default is None and arg not in a.kwonlyargs):
                            continue
                        try:
                            shown = "<required>" if default is None else repr(ast.literal_eval(default))
                        except ValueError:
                            shown = ast.unparse(default)
                        options.append((arg.arg, shown))
                    found[dec.args[0].value] = options
    return dict(sorted(found.items()))


def _methods(args) -> int:
    if args.live:
        from .attribution import available_methods, method_options

        listing = {name: [(k, repr(v)) for k, v in method_options(name).items()] for name in available_methods()}
    else:
        listing = _registered_methods()
    for name, options in listing.items():
        print(f"{name:28s} " + ", ".join(f"{k}={v}" for k, v in options))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok / pass, 1 gate failed, 2 unusable input)."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    parser = _Parser(prog="xai-callbacks", description=__doc__.split("\n\n")[0], parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fit = sub.add_parser("fit", help="train with the callbacks of a config file", parents=[debug])
    fit.add_argument("--config", "-c", help="YAML config (see configs/)")
    fit.add_argument("overrides", nargs="*", help="dotlist overrides such as trainer.max_epochs=3")
    fit.set_defaults(func=_fit)
    gate = sub.add_parser("gate", help="check a run's gate report; exit 0 pass, 1 fail, 2 unusable input",
                          parents=[debug])
    gate.add_argument("report", help="a run directory (searched for gate.json) or a gate.json file")
    gate.add_argument("--rules", help="YAML file with rules to check instead of the report's own")
    gate.set_defaults(func=_gate)
    methods = sub.add_parser("methods", help="list attribution methods and their options", parents=[debug])
    methods.add_argument("--live", action="store_true", help="import the registry (torch) instead of reading "
                                                               "the source")
    methods.set_defaults(func=_methods)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        if getattr(args, "debug", False):
            raise
        print(f"xai-callbacks {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
