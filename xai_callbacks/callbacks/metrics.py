"""ExplanationMetricsCallback: explanation-quality metrics of a fixed probe set, every N epochs."""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import torch

from .. import sinks
from ..attribution import check_methods, explain, method_options
from ..metrics import ExplanationMetric, available_metrics, get_metric, metric_options
from ..scoring import select
from .base import ExplanationCallback, shard_indices

__all__ = ["ExplanationMetricsCallback", "DEFAULT_METRICS"]

# faithfulness, robustness and complexity, needing no masks (localisation metrics such as
# relevance_mass need the batch's masks: add them where you have them). Cheap enough for every
# epoch: pixel flipping in 16 steps (17 forward passes per probe sample instead of 65) and
# max-sensitivity over 5 perturbations (instead of 10) on 32 probe samples keep the metrics
# callback near 1 % of a 50k-sample epoch on the CPU (``benchmarks/overhead.py``); the metrics'
# own defaults are finer.
DEFAULT_METRICS = ({"name": "pixel_flipping", "n_steps": 16}, {"name": "max_sensitivity", "n_samples": 5},
                   "sparseness", "complexity")


def _metric_specs(metrics) -> list[tuple[str, dict]]:
    """``[(name, options)]`` from names, ``{"name": ..., **options}`` dicts, or a name -> options mapping."""
    if isinstance(metrics, str):
        metrics = [metrics]
    if isinstance(metrics, Mapping):
        metrics = [{"name": k, **dict(v or {})} for k, v in metrics.items()]
    specs = []
    for item in metrics:
        if isinstance(item, str):
            specs.append((item, {}))
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            specs.append((item["name"], {k: v for k, v in item.items() if k != "name"}))
        else:
            raise ValueError(f"a metric must be a name or a mapping with a 'name' key, got {item!r}")
    if not specs:
        raise ValueError(f"metrics is empty; valid names: {available_metrics()}")
    for name, opts in specs:
        bad = sorted(set(opts) - set(metric_options(name)))
        if bad:
            raise ValueError(f"unknown option(s) {bad} for metric {name!r}; valid: {metric_options(name)}")
    return specs


class ExplanationMetricsCallback(ExplanationCallback):
    """Score the explanations of a fixed probe set with explanation-quality metrics.

    Every ``every_n_epochs`` epochs, for each method: explain the probe set, update each metric
    and log ``xai/<method>/<metric key>`` through ``pl_module.log(..., sync_dist=True)`` (so
    EarlyStopping and ModelCheckpoint can monitor it); the curves of pixel flipping, region
    perturbation, insertion, deletion and parameter randomisation go to line plots
    ``xai/curves/<metric key>`` with one line per method; the run summary holds the last values.
    The scalars are logged inline (a gate or EarlyStopping sees them at once); while fitting, the
    line plots are drawn in a background thread beside the next epoch (``asynchronous``) and
    delivered at the end of the next validation epoch and of ``fit``, labelled with their epoch.
    A metric that fails warns and is counted in ``xai/errors`` (``on_error="warn"``), the others
    still run. Latest values stay in :attr:`values`.

    Args:
        methods: attribution method names (see ``xai_callbacks.attribution.available_methods``).
        metrics: metric names (see ``xai_callbacks.metrics.available_metrics``), or mappings
            ``{"name": <metric>, **options}`` (e.g. ``{"name": "pixel_flipping", "order": "lerf",
            "infiller": "blur"}``), or one mapping name -> options.
        method_options: per-method options, e.g. ``{"integrated_gradients": {"n_steps": 64}}``.
        mask_key: which ground-truth mask of the batch the localisation metrics use (the demo
            data has ``object_mask`` and ``artifact_mask``).
        batch_size: perturbed inputs per forward pass / explainer call, for every metric
            (a metric's own ``batch_size`` option wins).
        asynchronous: while fitting, draw the curves in a background thread (False: inline, as in
            ``validate``; the logged content is the same).
        every_n_epochs, probe_size, seed, target, on_error: see :class:`ExplanationCallback`
            (32 probe samples by default, see ``DEFAULT_METRICS``; ``target`` also accepts a
            target function, e.g. for multi-label or regression models).

    Under DDP each rank scores its share of the probe set and the metrics' states are summed across
    ranks; a metric is computed only if it was scored on every rank (else it is skipped everywhere).

    Raises:
        ValueError: unknown methods, metrics or options (the message names the valid ones).

    Example::

        trainer = Trainer(callbacks=[ExplanationMetricsCallback(methods=["saliency"],
                                                                metrics=["pixel_flipping", "sparseness"])])
    """

    def __init__(self, methods: Sequence[str] = ("saliency",), metrics: Any = DEFAULT_METRICS,
                 method_options: Mapping[str, Mapping] | None = None, mask_key: str = "object_mask",
                 batch_size: int = 256, every_n_epochs: int = 1, probe_size: int = 32, seed: int = 0,
                 target: Any = "label", on_error: str = "warn", asynchronous: bool = True):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=probe_size, seed=seed, target=target,
                         on_error=on_error)
        self.asynchronous = bool(asynchronous)
        methods, self.method_options = check_methods(methods, method_options)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.methods, self.specs, self.mask_key, self.batch_size = methods, _metric_specs(metrics), mask_key, batch_size
        self.values: dict[str, float] = {}
        self._metrics: dict[tuple[str, int], ExplanationMetric] = {}

    @property
    def explained_methods(self) -> tuple[str, ...]:
        return tuple(self.methods)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods, metrics=[n for n, _ in self.specs])

    def _metric(self, trainer, pl_module, method: str, i: int) -> ExplanationMetric:
        if (method, i) not in self._metrics:
            name, opts = self.specs[i]
            if "batch_size" in metric_options(name):
                opts = {"batch_size": self.batch_size, **opts}
            self._metrics[method, i] = get_metric(name, model=pl_module, method=method,
                                                  method_options=self.method_options.get(method),
                                                  **self.resolve_infillers(trainer, opts))
        metric = self._metrics[method, i]
        if self.specs[i][1].get("infiller") in ("auto", "gan"):  # the GAN may have finished its warm-up since
            metric.infiller = self.resolve_infillers(trainer, self.specs[i][1])["infiller"]
        return metric.to(pl_module.device)

    def run(self, trainer, pl_module) -> None:
        probe = self.probe(trainer, pl_module)
        target = self.targets(pl_module, probe)
        # each DDP rank scores its share of the probe set; the metrics' sum states add the shares up
        mine = shard_indices(trainer, len(probe.indices), probe.x.device)
        x, t = probe.x[mine], select(target, mine)
        masks = {k: v[mine] for k, v in probe.masks.items()}
        values: dict[str, float] = {}
        curves: dict[str, tuple[list[float], dict[str, list[float]], str]] = {}
        epoch = trainer.current_epoch
        # metric states must not be inference tensors: standalone validate runs under inference_mode
        with torch.inference_mode(False), torch.no_grad():
            for method in self.methods:
                options = self.resolve_infillers(trainer, self.method_options.get(method, {}), method_options(method))
                ok, relevance = True, None
                if len(x):  # a rank's share may be empty on a tiny probe set
                    ok, relevance = self.guarded(f"explaining with {method!r} failed at epoch {epoch}",
                                                 partial(explain, method=method,
                                                         **{"batch_size": self.batch_size, **options}), pl_module, x, t)
                for i, (name, _) in enumerate(self.specs):
                    self.progress.update(status=f"{method}: {name}")
                    what = f"metric {name!r} of {method!r} failed at epoch {epoch}"
                    scored = ok and self.guarded(what, self._update, trainer, pl_module, method, i, x, t, relevance,
                                                 masks)[0]
                    if self.all_ranks_ok(trainer, scored):  # compute() syncs: all ranks or none
                        self.guarded(what, self._compute, self._metrics[method, i], method, values, curves)
        self.values = values
        sinks.log_scalars(pl_module, values)
        sinks.log_summary(trainer, values)
        if curves:  # drawing needs no model: in the background worker while fitting
            self.analyse_later(trainer, self._plot, curves)

    @staticmethod
    def _plot(trainer, curves: dict[str, tuple[list[float], dict[str, list[float]], str]]) -> None:
        for key, (fractions, ys, axis) in curves.items():
            sinks.log_line_plot(trainer, f"xai/curves/{key}", fractions, ys, title=key, xname=axis)

    def deliver(self, trainer, result: None) -> tuple[dict[str, float], list[str]]:
        return {}, []

    def _update(self, trainer, pl_module, method, i, x, target, relevance, masks) -> None:
        metric = self._metric(trainer, pl_module, method, i)
        mask = None
        if metric.needs_masks:
            if self.mask_key not in masks:
                raise ValueError(f"metric {metric.name!r} needs masks {self.mask_key!r}, but the probe batch has "
                                 f"masks {sorted(masks)}; set mask_key or provide '<name>_mask' in batches")
            mask = masks[self.mask_key]
        metric.reset()
        if len(x):
            metric.update(x, target, relevance, mask)

    @staticmethod
    def _compute(metric: ExplanationMetric, method: str, values: dict, curves: dict) -> None:
        values[f"xai/{method}/{metric.key}"] = float(metric.compute())
        if metric.n_curve_points:
            fractions, curve = metric.compute_curve()
            _, ys, _ = curves.setdefault(metric.key, (fractions.tolist(), {}, metric.curve_axis))
            ys[method] = curve.tolist()
