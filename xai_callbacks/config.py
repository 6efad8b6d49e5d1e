"""omegaconf structured configs: YAML + dotlist overrides -> Trainer, module, data, callbacks.

Each callback's config is derived from its constructor's signature (one place for names,
types and defaults), so a wrong key or a wrong type is caught with the key, the value and what
is valid before anything runs.

    run:        task, seed, data, model, trainer, logger, callbacks
    task:       digits (the shortcut digits and DemoCNN) | notes (note spectra and SpectrumCNN)
    callbacks:  attribution | metrics | spray | inpainter | class_importance | gate  (absent or null: not used)
"""
from __future__ import annotations

import collections.abc
import dataclasses
import importlib
import inspect
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["CALLBACKS", "TASKS", "ConfigError", "RunConfig", "NotesRunConfig", "callback_config", "load_config",
           "build_callbacks", "build"]

# config name -> "module:Class"; imported lazily so each callback's dependencies load on use only
CALLBACKS: dict[str, str] = {
    "attribution": "xai_callbacks.callbacks.attribution:AttributionCallback",
    "metrics": "xai_callbacks.callbacks.metrics:ExplanationMetricsCallback",
    "spray": "xai_callbacks.callbacks.spray:SpRAyCallback",
    "inpainter": "xai_callbacks.callbacks.inpainter:InpainterCallback",
    "class_importance": "xai_callbacks.callbacks.class_importance:ClassImportanceCallback",
    "gate": "xai_callbacks.callbacks.gate:ExplanationGate",
}


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it and what is valid."""


def _load_class(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


_PRIMITIVES = (int, float, str, bool)


def _omegaconf_type(tp) -> Any:
    """The closest type omegaconf can check for a constructor annotation (``Any`` if none)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _PRIMITIVES:
        return tp
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        converted = [_omegaconf_type(a) for a in inner]
        if any(c is Any for c in converted):
            return Any
        core = converted[0] if len(converted) == 1 else Union[tuple(converted)]
        return Optional[core] if len(inner) < len(args) else core
    if origin in (list, tuple, collections.abc.Sequence) and args:
        item = _omegaconf_type(args[0])
        return List[item] if item in _PRIMITIVES else List[Any]
    if origin in (dict, collections.abc.Mapping) and args:
        value = _omegaconf_type(args[1])
        return Dict[str, value if value in _PRIMITIVES else Any]
    return Any


def callback_config(cls) -> type:
    """A dataclass with one field per constructor argument of ``cls`` (same names and defaults)."""
    hints = typing.get_type_hints(cls.__init__)
    fields = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        tp = _omegaconf_type(hints.get(name, Any))
        default = p.default
        if isinstance(default, (tuple, list, dict)):
            value = list(default) if isinstance(default, tuple) else default
            fields.append((name, tp, field(default_factory=lambda v=value: type(v)(v))))
        elif default is inspect.Parameter.empty:
            fields.append((name, tp))
        else:
            fields.append((name, tp, field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


@dataclass
class DataConfig:
    """Arguments of :class:`xai_callbacks.data.ShortcutDigitsDataModule`."""
    batch_size: int = 64
    num_workers: int = 0
    size: int = 32
    artifact_class: Optional[int] = 0
    artifact_fraction: float = 0.25
    artifact_kind: str = "checker"
    artifact_size: int = 5
    artifact_position: List[int] = field(default_factory=lambda: [1, 1])
    val_fraction: float = 0.3
    ambiguity: float = 0.0
    seed: int = 0


@dataclass
class ModelConfig:
    """The demo classifier: :class:`xai_callbacks.models.DemoCNN` trained by ``Classifier``."""
    width: int = 16
    dropout: float = 0.2
    lr: float = 3e-3


@dataclass
class LoggerConfig:
    """``kind``: wandb (offline unless ``offline: false``), tensorboard, csv or none."""
    kind: str = "wandb"
    project: str = "xai-callbacks"
    save_dir: str = "runs"
    name: Optional[str] = None
    offline: bool = True


@dataclass
class RunConfig:
    task: str = "digits"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: Dict[str, Any] = field(default_factory=lambda: {"max_epochs": 8})
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: Dict[str, Any] = field(default_factory=dict)


@dataclass
class NotesDataConfig:
    """Arguments of :class:`xai_callbacks.data.NoteSpectraDataModule` (``task: notes``)."""
    batch_size: int = 32
    num_workers: int = 0
    n_per_class: int = 120
    shortcut: Optional[str] = "hum"
    shortcut_class: Optional[int] = 3
    shortcut_fraction: float = 0.4
    shortcut_level: float = 1.0
    n_bins: int = 128
    val_fraction: float = 0.3
    ambiguity: float = 0.0
    seed: int = 0


@dataclass
class NotesRunConfig(RunConfig):
    """``task: notes``: instrument-like note spectra classified by :class:`xai_callbacks.models.SpectrumCNN`."""
    task: str = "notes"
    data: NotesDataConfig = field(default_factory=NotesDataConfig)


TASKS = {"digits": RunConfig, "notes": NotesRunConfig}


def _task(path, overrides) -> str:
    """The run's task: the last ``task=`` override, else the file's ``task``, else ``digits``."""
    task = "digits"
    if path is not None and Path(path).is_file():
        try:
            task = str(OmegaConf.load(path).get("task", task))
        except Exception:  # an unreadable file is reported by load_config
            pass
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "task":
            task = value.strip()
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not valid; valid: {sorted(TASKS)}")
    return task


LOGGER_KINDS = ("wandb", "tensorboard", "csv", "none")


def _error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    return ConfigError(f"{source}: {getattr(err, 'msg', str(err)).splitlines()[0]} (key: {key})")


# old name -> new name, still loaded for one release with a DeprecationWarning
RENAMED_KEYS = {"probe_seed": "seed", "mask_seed": "seed", "noise_seed": "seed", "perturbation_batch": "batch_size",
                "internal_batch_size": "batch_size"}
RENAMED_METRICS = {"randomisation_similarity": "model_parameter_randomisation"}


def _in_metrics(where: str) -> bool:
    """Whether ``where`` (``callbacks.<callback>.<key>...``) is the metrics list of a callback."""
    return where.split(".")[2:3] == ["metrics"]


def _renamed(value: Any, where: str) -> Any:
    """``value`` with deprecated keys (at any depth) and metric names replaced by their new names."""
    import warnings

    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            new = RENAMED_METRICS.get(k, k) if _in_metrics(where) else RENAMED_KEYS.get(k, k)
            if new != k:
                if new in value:
                    raise ConfigError(f"{where}: both {k!r} and its new name {new!r} are given; keep {new!r}")
                warnings.warn(f"{where}: {k!r} is deprecated, use {new!r}", DeprecationWarning, stacklevel=4)
            out[new] = _renamed(v, f"{where}.{new}")
        return out
    if isinstance(value, list):
        return [_renamed(v, where) for v in value]
    if isinstance(value, str) and value in RENAMED_METRICS and _in_metrics(where):
        warnings.warn(f"{where}: metric {value!r} is deprecated, use {RENAMED_METRICS[value]!r}", DeprecationWarning,
                      stacklevel=4)
        return RENAMED_METRICS[value]
    return value


def _check_callbacks(callbacks: DictConfig, source: str) -> dict[str, Any]:
    built = {}
    for name, values in callbacks.items():
        if name not in CALLBACKS:
            raise ConfigError(f"{source}: unknown callback 'callbacks.{name}'; valid: {sorted(CALLBACKS)}")
        if values is None:
            continue
        if isinstance(values, DictConfig):
            values = OmegaConf.create(_renamed(OmegaConf.to_container(values), f"callbacks.{name}"))
        schema = OmegaConf.structured(callback_config(_load_class(CALLBACKS[name])))
        try:
            built[name] = OmegaConf.to_container(OmegaConf.merge(schema, values))
        except OmegaConfBaseException as err:
            valid = sorted(schema.keys())
            raise ConfigError(f"{source}: in callbacks.{name}: {getattr(err, 'msg', err).splitlines()[0]} "
                              f"(key: callbacks.{name}.{getattr(err, 'full_key', '')}); valid keys: {valid}") from None
    return built


def _check_trainer(trainer: dict, source: str) -> None:
    import lightning.pytorch as pl

    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks"}
    bad = sorted(set(trainer) - valid)
    if bad:
        raise ConfigError(f"{source}: unknown trainer key(s) {bad}; valid: {sorted(valid)}")


def _override_source(section: str, path, overrides) -> str:
    """What set ``section`` (``callbacks.spray``, ``data``): the overrides touching it, else the file."""
    touching = [o for o in overrides if o.split("=", 1)[0].strip().lstrip("+~") == section
                or o.split("=", 1)[0].strip().lstrip("+~").startswith(section + ".")
                or section.startswith(o.split("=", 1)[0].strip().lstrip("+~") + ".")]
    if touching:
        return "override " + ", ".join(repr(o) for o in touching)
    return str(path) if path else "config"


def _validate(cfg: DictConfig, source: str) -> dict[str, Any]:
    from . import data

    if cfg.task == "notes":
        from .data.notes import NOTE_SHORTCUTS

        if cfg.data.shortcut is not None and cfg.data.shortcut not in NOTE_SHORTCUTS:
            raise ConfigError(f"{source}: data.shortcut={cfg.data.shortcut!r} is not valid; valid: "
                              f"{list(NOTE_SHORTCUTS)} or null")
    kinds = getattr(data, "ARTIFACT_KINDS", None)
    if cfg.task == "digits" and kinds and cfg.data.artifact_kind not in kinds:
        raise ConfigError(f"{source}: data.artifact_kind={cfg.data.artifact_kind!r} is not valid; valid: {list(kinds)}")
    if cfg.logger.kind not in LOGGER_KINDS:
        raise ConfigError(f"{source}: logger.kind={cfg.logger.kind!r} is not valid; valid: {list(LOGGER_KINDS)}")
    _check_trainer(cfg.trainer, source)
    return _check_callbacks(cfg.callbacks, source)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The run config from a YAML file (optional) and ``key=value`` overrides, validated.

    The file is checked first, then each override in turn, so an error names its source: the
    file, or the override (``override 'callbacks.attribution.methods=[saliency,gradcamm]'``).
    Each callback is also constructed once, so values its constructor rejects (an unknown
    attribution method) are caught here too.

    Args:
        path: YAML file (None: defaults and overrides only).
        overrides: dotlist overrides such as ``trainer.max_epochs=3``.

    Raises:
        ConfigError: a missing or unreadable file, a malformed override, an unknown key, a wrong
            type or a value a constructor rejects; the message names the source, the key and
            what is valid.
    """
    import yaml

    cfg = OmegaConf.structured(TASKS[_task(path, overrides)])
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist" if not Path(path).exists()
                              else f"config {path} is not a file")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _error(err, str(path)) from None
        except (yaml.YAMLError, ValueError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{path}: not a valid YAML run config ({first})") from None
    built = _validate(cfg, str(path) if path else "config")
    for o in overrides:
        source = f"override {o!r}"
        if "=" not in o or not o.split("=", 1)[0].strip():
            raise ConfigError(f"{source}: overrides look like key=value, e.g. trainer.max_epochs=3")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o]))
        except OmegaConfBaseException as err:
            raise _error(err, source) from None
        built = _validate(cfg, source)
    for name, kwargs in built.items():
        try:
            _load_class(CALLBACKS[name])(**kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{_override_source(f'callbacks.{name}', path, overrides)}: in callbacks.{name}: "
                              f"{err}") from None
    return cfg


def build_callbacks(callbacks: DictConfig | dict) -> list:
    """Callback objects from the ``callbacks`` section (validated)."""
    cfg = callbacks if isinstance(callbacks, DictConfig) else OmegaConf.create(callbacks)
    return [_load_class(CALLBACKS[name])(**kwargs) for name, kwargs in _check_callbacks(cfg, "callbacks").items()]


def _logger(cfg: LoggerConfig):
    from lightning.pytorch import loggers

    Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
    if cfg.kind == "wandb":
        return loggers.WandbLogger(project=cfg.project, save_dir=cfg.save_dir, name=cfg.name, offline=cfg.offline)
    if cfg.kind == "tensorboard":
        return loggers.TensorBoardLogger(save_dir=cfg.save_dir, name=cfg.name or cfg.project)
    if cfg.kind == "csv":
        return loggers.CSVLogger(save_dir=cfg.save_dir, name=cfg.name or cfg.project)
    return False


def build(cfg: DictConfig, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """``(trainer, module, datamodule)`` for a validated run config.

    Args:
        cfg: the config from :func:`load_config`.
        path, overrides: where ``cfg`` came from, only to name the source of an error.

    Raises:
        ConfigError: a value a constructor rejects (data, model, trainer, logger, callbacks),
            naming the section and the override or file that set it.
    """
    import lightning.pytorch as pl

    from .data import NoteSpectraDataModule, ShortcutDigitsDataModule
    from .data.notes import INSTRUMENTS
    from .models import Classifier, DemoCNN, SpectrumCNN

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    def make(section: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:
            raise ConfigError(f"{_override_source(section, path, overrides)}: in {section}: {err}") from None

    pl.seed_everything(cfg.seed, verbose=False)
    data = OmegaConf.to_container(cfg.data)
    if cfg.task == "notes":
        datamodule = make("data", NoteSpectraDataModule, **data)
        net = make("model", SpectrumCNN, in_channels=2, n_classes=len(INSTRUMENTS), width=cfg.model.width,
                   dropout=cfg.model.dropout)
    else:
        data["artifact_position"] = tuple(data["artifact_position"])
        datamodule = make("data", ShortcutDigitsDataModule, **data)
        net = make("model", DemoCNN, width=cfg.model.width, dropout=cfg.model.dropout, image_size=cfg.data.size)
    module = make("model", Classifier, net, lr=cfg.model.lr)
    trainer_args = OmegaConf.to_container(cfg.trainer)
    trainer_args.setdefault("default_root_dir", cfg.logger.save_dir)
    callbacks = make("callbacks", build_callbacks, cfg.callbacks)
    trainer = make("trainer", pl.Trainer, logger=make("logger", _logger, cfg.logger), callbacks=callbacks,
                   **trainer_args)
    return trainer, module, datamodule
