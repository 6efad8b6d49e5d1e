"""``xai-callbacks``: the command line.

    xai-callbacks fit --config configs/clever_hans.yaml [key=value ...]
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
    methods = sub.add_parser("methods", help="list attribution methods and their options")
    methods.set_defaults(func=_methods)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
