"""SpRAyCallback: spectral relevance analysis of validation heatmaps per class, every N epochs."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import render, sinks
from ..attribution import check_methods, explain, method_options
from ..attribution.transformer import model_lrp
from ..concepts import concept_relevance, find_concept_layer
from ..guard import model_guard, unwrap_model
from ..scoring import class_probabilities, class_scores
from ..spray import SpRAyResult, StrategyTracker, check_heatmaps, spray, write_virelay
from ..spray.evidence import ROW_EVIDENCE, SampleEvidence, sample_evidence
from ..spray.report import (class_scalars, clusters_table, embedding_table, evidence_caption, prototype_caption,
                            region_words, sample_strategies, suspicious_share, usable_rows)
from .base import ExplanationCallback, Probe, read_samples, select_per_class, shard_map, val_dataloader

__all__ = ["SpRAyCallback", "select_per_class"]

_MASK_SUFFIX = "_mask"
FEATURES = ("heatmaps", "concepts")


class SpRAyCallback(ExplanationCallback):
    """Find each class's prediction strategies, and Clever-Hans candidates, while the model trains.

    Every ``every_n_epochs`` validation epochs: explain a fixed, seeded sample of the validation
    set (up to ``max_per_class`` per class, chosen once by dataset index and kept in
    ``state_dict``; each DDP rank explains its share, the heatmaps are gathered with
    ``trainer.strategy.all_gather``), confirm shortcuts causally (``evidence``; the ranks share
    its forward passes), run :func:`xai_callbacks.spray.spray` per class on rank 0,
    match the clusters to the strategies of earlier epochs (:class:`StrategyTracker`: a strategy
    keeps its id), and log per class:

    * ``spray/<class>/eigenvalues``: the Laplacian spectrum (line plot);
    * ``spray/<class>/embedding``: a table of the 2-D embedding (sample id, x, y, strategy,
      suspicion, mask shares) for W&B's interactive scatter, and ``spray/<class>/scatter``, the
      same as a picture coloured by strategy (flagged strategies ringed);
    * ``spray/<class>/prototypes``: each strategy's mean heatmap;
    * ``spray/<class>/clusters``: a table (strategy, size, share, suspicion, flagged, novelty,
      compactness, object / artifact share with masks, prototype, typical members);
    * ``spray/<class>/strategy_share``: each strategy's share of the class over epochs;
    * ``spray/<class>/evidence`` (with ``evidence=True``): per strategy its most confirmed member,
      the member with its region removed, an other-class sample, and that sample with the member's
      strongest component (region, detail, tone, saturation, shading or border) transferred into it; the
      clusters table gains ``component``, ``region_size``, ``score_drop``, ``transfer_rate``,
      ``score_rise``, ``score_excess``, ``z`` and the embedding table each sample's ``evidence`` score;
    * scalars ``spray/<class>/n_clusters``, ``spray/<class>/n_flagged`` (flagged strategies: what the
      default gate rule checks), ``spray/<class>/max_suspicion`` (heatmap shape alone),
      ``spray/<class>/suspicious_strategy`` (id of the flagged strategy, else of the one with the
      highest evidence score, or the highest suspicion without evidence), with evidence that strategy's
      ``spray/<class>/transfer_rate``, ``score_drop``, ``region_size`` and the class's
      ``spray/<class>/forward_passes`` (cost of the check) and ``spray/<class>/separation_ratio``
      (its best-separated group over the threshold: >= 1 flagged, below it how close it came), and
      ``spray/suspicious_share`` (share of analysed samples in flagged clusters) and
      ``spray/classes_skipped`` (classes not checked: too few usable heatmaps), logged on every
      rank so callbacks can monitor them;

    With ``features="concepts"`` SpRAy clusters each sample's *concept relevances* instead of its
    heatmap: the LRP relevance (zennit's EpsilonPlusFlat, :func:`~xai_callbacks.concepts.concept_relevance`)
    of each channel of ``concept_layer`` for the explained class, summed over positions and scaled
    by ``spray_options["normalize"]`` (l2). Strategies that put relevance on the same place through
    different features, or on one feature at varying places (a tag in any corner, a texture patch
    anywhere, a colour cast, a background), separate there, while pixel heatmaps mix them. Everything
    else stays: the eigengap, the clustering, the evidence, the prototypes, the logged panels and the
    ViRelAy files are those of the heatmaps; the strategy ids are matched by the clusters' concept
    distributions.

    The callback writes the epoch's ViRelAy databases to ``<run dir>/spray/epoch_NNNN/``. Signals
    (B, C, L), such as spectra, are analysed as one-row images (B, C, 1, L): clustering, the shape
    suspicion and the evidence regions work along L, the model sees the signals as they are, and
    prototypes, members and evidence are drawn as signal plots. Token ids and tabular rows (B, L)
    are analysed as one-channel signals; their evidence transfers each row's most relevant tokens or
    feature values, each position on its own, and asks a group to stand further apart
    (:data:`~xai_callbacks.spray.evidence.ROW_EVIDENCE`; the model gets the rows in their own type,
    token ids as integers). On the row benchmark (six seeds) it catches leak columns and sentinel
    values in 15 of 24 table MLPs and planted words in 5 of 12 text transformers (README, "SpRAy"). A class with
    too few usable heatmaps (NaN, constant, or not more than ``k``) is skipped with a warning
    counted in ``xai/errors``, and ``spray/classes_skipped`` counts such classes (a gate rule
    ``spray/classes_skipped < 1`` asks for every class to be checked); a model that gives every
    analysed sample the same output (a dead network) is named as the cause, last (the gate shows the
    last failure). The latest delivered results stay in :attr:`results` and :attr:`strategy_ids`
    (with ``asynchronous``, an epoch's results arrive at the end of the next validation epoch or of
    ``fit``; a checkpoint holds the trackers of delivered analyses).

    Args:
        method: attribution method (see ``xai_callbacks.attribution.available_methods``); None:
            the model's LRP, chosen at setup (:func:`~xai_callbacks.attribution.transformer.model_lrp`:
            ``lrp.epsilon_plus_flat`` on CNNs, ``lrp.epsilon_plus`` on MLPs, ``lrp.attn`` on transformers
            such as a ViT).
        method_options: options of the method (they need a named ``method``).
        classes: class ids to analyse; None: every class in the validation set.
        class_names: optional class id -> name used in logged keys (default: the id).
        max_per_class: validation samples explained per class (a shortcut needs 5 of them,
            ``min_members``, to be confirmed: raise it for shortcuts rarer than 10 % of a class; the
            check was calibrated at 50, and a class of fewer than 9 can confirm nothing).
        target: explain the ``"label"`` (true class, as SpRAy does), the ``"prediction"``, or a target
            function (see :class:`ExplanationCallback`); samples are grouped by their (first) label.
        spray_options: keyword arguments of :func:`~xai_callbacks.spray.spray` (``k``,
            ``n_eigval``, ``clustering``, ``threshold``, ``visualisation``, ...).
        features: what SpRAy clusters: ``"heatmaps"`` (the explanations, as in the paper) or
            ``"concepts"`` (the channel relevances of ``concept_layer``; needs class targets,
            ``target="label"`` or ``"prediction"``).
        concept_layer: with ``features="concepts"``, the module name (as in
            ``pl_module.named_modules()``, e.g. ``"model.features.9"``) whose output channels are
            the concepts; checked when the trainer sets up.
        min_similarity: prototype similarity needed to continue a strategy's id.
        batch_size: samples per explainer call (None: a rank's whole share at once).
        save_virelay: write the ViRelAy databases each time.
        evidence: confirm shortcuts causally (:func:`~xai_callbacks.spray.evidence.sample_evidence`):
            transfer each analysed sample's region (where its relevance exceeds its class's
            median), fine detail, (RGB) saturation and border (with ``evidence_options``
            ``components``, also its tone and shading) into other classes' analysed samples, against the
            same transfer from other samples of its class; a group of the class whose component
            carries the class far better than the rest's, separated from the rest by a gap,
            forms the class's flagged strategy; and, for what most of a class carries, each
            sample's content where its relevance most exceeds the other classes' and in its border,
            against other classes' content there. False: the heatmap-shape suspicion decides (no
            model calls after the explanations).
        infiller: how the evidence removes a region: ``"blur"`` (default), any
            :mod:`xai_callbacks.infill` name, or an infiller instance such as the trained GAN.
        evidence_regions: the attribution method whose relevance locates each sample's region
            for the evidence (one more explanation of the analysed samples); None: the heatmaps
            of ``method``. Gradient x input by default: LRP rules can move relevance away from
            what a model reads (on a ResNet-18 at 32x32 the LRP composites put a quarter of it
            into the top-left sixteenth and miss a planted frame the model uses; gradient x
            input finds it, ``benchmarks/shortcuts.py``). Token ids and tabular rows use the
            heatmaps of ``method``: on the small text transformers of ``benchmarks/row_shortcuts.py``
            (seeds 0 and 1, tag and trigger) gradient x input ranked the planted word below another
            token in 40 of the 72 rows that hold it, AttnLRP (the model's LRP there) and integrated
            gradients first in all 72.
        evidence_options: keyword arguments of ``sample_evidence`` (``components``, ``area``,
            ``pastes``, ``min_separation``, ``min_rise``, ``control``, ``floor``, ``min_members``, ``max_share``,
            ``screen``, ``search``, ``class_area``, ``compact``).
        n_typical: typical members shown per strategy.
        every_n_epochs: run on epochs where ``current_epoch % every_n_epochs == 0``, and on the
            last epoch of ``fit`` (so the gate decides on the final model). The defaults (50 per
            class, every 20 epochs) keep the default callback set near 3 % of a 50k-sample epoch
            on two CPU cores (``benchmarks/overhead.py``): the causal check costs 19-36 forward
            passes per analysed sample over the shortcut benchmark (19-28 on its clean controls).
            Analyse more often where the budget allows.
        seed: seed of the per-class sample and of SpRAy.
        asynchronous: while fitting, run everything after the model (clustering,
            embeddings, tracking, pictures, tables, ViRelAy files) in a background
            thread overlapped with the next epoch; its results are delivered at the end of the next
            validation epoch (training waits there if they are not ready: logged as
            ``xai/SpRAyCallback/waits`` and ``wait_s``) and at the end of ``fit``, logged with the
            ``epoch`` they belong to. The explanations (and ``evidence``) run inline on this epoch's
            weights. False: everything inline. The results are the same either way.
        on_error: ``"warn"`` (count in ``xai/errors``, training goes on) or ``"raise"``.
        vocab: how token ids are shown where the samples are token ids (``spray/<class>/evidence``
            is then an HTML page: per strategy the words its members' regions hold most often and
            its most confirmed member, removed and pasted, as texts): a sequence of strings indexed
            by id, a function id -> string, or None (the ids themselves).

    Raises:
        ValueError: an unknown method, method option, ``spray_options`` or ``evidence_options`` key,
            ``max_per_class`` < 2, ``features="concepts"`` without a
            ``concept_layer`` or with a target function (the message names the valid values); at
            setup, a ``concept_layer`` the model does not have (listing its module names); with
            ``on_error="raise"``, a validation set without samples of ``classes`` or without labels,
            and (as RuntimeError) a failing analysis.

    Example::

        from xai_callbacks import ExplanationGate, SpRAyCallback

        spray = SpRAyCallback(method="lrp.epsilon_plus_flat", classes=[0, 1], max_per_class=100)
        Trainer(callbacks=[spray, ExplanationGate(rules=["spray/*/n_flagged < 1"])]).fit(model, datamodule=dm)
        spray.results[0].flagged  # which of class 0's strategies are Clever-Hans shortcuts
        SpRAyCallback(features="concepts", concept_layer="model.features.9")  # concept-space SpRAy
    """

    def __init__(self, method: str | None = None, method_options: Mapping[str, Any] | None = None,
                 classes: Sequence[int] | None = None, class_names: Mapping[int, str] | None = None,
                 max_per_class: int = 50, target: Any = "label", spray_options: Mapping[str, Any] | None = None,
                 min_similarity: float = 0.8, batch_size: int | None = 256, save_virelay: bool = True,
                 n_typical: int = 5, every_n_epochs: int = 20, seed: int = 0, on_error: str = "warn",
                 evidence: bool = True, infiller: Any = "blur", evidence_options: Mapping[str, Any] | None = None,
                 evidence_regions: str | None = "input_x_gradient", features: str = "heatmaps",
                 concept_layer: str | None = None, asynchronous: bool = True, vocab=None):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=max(1, int(max_per_class)), seed=seed,
                         target=target, on_error=on_error)
        if method is None and method_options:
            raise ValueError(f"method_options {dict(method_options)} need a named method; method=None picks the "
                             f"model's LRP at setup")
        method_options = (check_methods([method], {method: method_options or {}})[1][method] if method is not None
                          else {})
        if not isinstance(max_per_class, int) or max_per_class < 2:
            raise ValueError(f"max_per_class must be an int >= 2, got {max_per_class!r}")
        options = dict(spray_options or {})
        own = {"masks", "n_typical", "features"}  # set by the callback itself
        bad = sorted(set(options) - set(spray.__kwdefaults__) | (own & set(options)))
        if bad:
            raise ValueError(f"unknown spray_options {bad}; valid: {sorted(set(spray.__kwdefaults__) - own)}")
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if features == "concepts" and (not isinstance(concept_layer, str) or not concept_layer):
            raise ValueError(f"features='concepts' needs concept_layer, the name of a module whose output channels "
                             f"are the concepts (e.g. 'model.features.9'); got {concept_layer!r}")
        if features == "concepts" and callable(self.target):
            raise ValueError("features='concepts' explains a class: use target='label' or 'prediction', "
                             "not a target function")
        self.features, self.concept_layer = features, concept_layer if features == "concepts" else None
        self.method, self.method_options, self._named_method = method, method_options, method
        self.classes = None if classes is None else [int(c) for c in classes]
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.max_per_class, self.spray_options, self.min_similarity = max_per_class, options, min_similarity
        self.batch_size, self.save_virelay, self.n_typical, self.seed = batch_size, save_virelay, n_typical, seed
        ev_options = dict(evidence_options or {})
        own = {"infiller", "batch_size", "probabilities"}  # the callback's own arguments
        bad = sorted(set(ev_options) - set(sample_evidence.__kwdefaults__) | (own & set(ev_options)))
        if bad:
            raise ValueError(f"unknown evidence_options {bad}; valid: "
                             f"{sorted(set(sample_evidence.__kwdefaults__) - own)}")
        if evidence_regions is not None:
            check_methods([evidence_regions])
        self.evidence, self.infiller, self.evidence_options = bool(evidence), infiller, ev_options
        self._regions = evidence_regions if evidence else None
        self.asynchronous, self.vocab = bool(asynchronous), vocab
        self.sample_indices: list[int] | None = None
        self._signals, self._rows = False, None
        self.trackers: dict[int, StrategyTracker] = {}
        self.results: dict[int, SpRAyResult] = {}
        self.strategy_ids: dict[int, list[int]] = {}

    @property
    def state_key(self) -> str:
        extra = {"concept_layer": self.concept_layer} if self.features == "concepts" else {}
        return self._generate_state_key(method=self.method, classes=self.classes, **extra)

    @property
    def evidence_regions(self) -> str | None:
        """The method that locates the evidence's regions where it is not ``method`` (None: the heatmaps)."""
        return self._regions if self._regions != self.method else None

    @property
    def explained_methods(self) -> tuple[str, ...]:
        return (self.method,) + ((self.evidence_regions,) if self.evidence_regions else ())

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Choose the method where it is None (the model's LRP), check it and ``concept_layer``
        against the model before any epoch runs.

        Raises:
            ValueError: the model has no module of that name (the message lists its module names).
            MethodNotApplicableError: with ``on_error="raise"``, a method that does not apply to
                the model (see :meth:`ExplanationCallback.setup`).
        """
        if self._named_method is None:
            self.method = model_lrp(pl_module)
        super().setup(trainer, pl_module, stage)
        if self.features == "concepts":
            find_concept_layer(unwrap_model(pl_module), self.concept_layer)

    def name_of(self, class_id: int) -> str:
        """The class's name in logged keys."""
        return self.class_names.get(class_id, str(class_id))

    # -- collection ----------------------------------------------------------------------------
    def _collect(self, trainer, pl_module) -> dict[str, torch.Tensor]:
        """Explain the per-class sample (split across DDP ranks, gathered on all), on the CPU."""
        loader = val_dataloader(trainer)
        if self.sample_indices is None:
            self.sample_indices = self.select_per_class(trainer, self.classes, self.max_per_class)
        if not self.sample_indices:
            raise ValueError(f"the validation set has no samples of classes {self.classes}")
        dev = pl_module.device

        dtypes = []   # the inputs' own type (token ids are integers), as x is gathered as float

        def explain_share(idx: torch.Tensor) -> dict[str, torch.Tensor]:
            x, y, masks = read_samples(loader, idx.tolist())
            dtypes.append(x.dtype)
            if y is None:
                raise ValueError("SpRAy needs labels: batches must be (x, y, ...) or dicts with 'y'")
            x, y, masks = x.to(dev), torch.as_tensor(y).to(dev), {k: v.to(dev) for k, v in masks.items()}
            with model_guard(pl_module) as model, torch.no_grad():
                scores = model(x.clone()).float()
            target = self.targets(pl_module, Probe(x, y, masks, idx))
            y = y.reshape(len(y), -1)[:, 0].long()  # grouped by class; the first label where labels are not ids
            heat = explain(pl_module, x, target, method=self.method, **{
                "batch_size": self.batch_size,
                **self.resolve_infillers(trainer, self.method_options, method_options(self.method))})
            out = {"x": x.float(), "heatmaps": heat, "labels": y, "scores": scores.detach(), "indices": idx}
            if self.evidence_regions and x.dim() > 2:   # rows: the heatmaps of `method` (see ROW_EVIDENCE)
                out["regions"] = explain(pl_module, x, target, method=self.evidence_regions,
                                         batch_size=self.batch_size)
            if self.features == "concepts":
                step = self.batch_size or len(x)
                out["concepts"] = torch.cat([concept_relevance(pl_module, x[s:s + step], target[s:s + step],
                                                               self.concept_layer).relevance
                                             for s in range(0, len(x), step)])
            out.update({f"mask:{k}": v.float() for k, v in masks.items()})
            return out

        self.progress.update(status=f"explaining {len(self.sample_indices)} samples ({self.method})")
        # each DDP rank explains its share; everything is gathered on every rank
        data = shard_map(trainer, explain_share, torch.tensor(self.sample_indices, device=dev))

        def new_axis(d: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
            """A new axis at ``dim`` in the inputs and in what is shaped like them."""
            return {k: v.unsqueeze(dim) if k in ("x", "heatmaps", "regions") or k.startswith("mask:") else v
                    for k, v in d.items()}

        # token ids or tabular rows (N, L): one-channel signals here; the model gets them in their own type
        self._rows = dtypes[0] if data["x"].dim() == 2 else None
        if self._rows is not None:
            data = new_axis(data, 1)
        self._signals = data["x"].dim() == 3
        if self._signals:  # one-row images (N, C, 1, L) for the 2-D analysis
            data = new_axis(data, 2)
        return {k: v.cpu() for k, v in data.items()}

    # -- one epoch -------------------------------------------------------------------------------
    def run(self, trainer, pl_module) -> None:
        data = self._collect(trainer, pl_module)
        evidence, failure = None, ""
        if self.evidence:  # the causal check needs this epoch's model: inline, its passes split across DDP ranks
            try:
                evidence = self._evidence(trainer, data)
            except Exception as err:  # delivered as the analysis's failure, so all ranks stay in step
                failure = f"{type(err).__name__}: {err}"
        trackers = {c: copy.deepcopy(t) for c, t in self.trackers.items()}  # the worker's own, kept at delivery
        self.analyse_later(trainer, self._analyse, data, evidence, trackers, failure=failure)

    def _usable(self, data: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[int], np.ndarray]:
        """Each sample's class, the analysed classes, and which samples can be analysed (finite,
        non-constant heatmaps; in concept space also finite, non-zero concept relevances)."""
        labels = data["labels"].numpy()
        classes = self.classes if self.classes is not None else sorted(set(labels.tolist()))
        usable = check_heatmaps(data["heatmaps"])
        concepts = data.get("concepts")
        if concepts is not None:  # a sample without concept relevance cannot be placed in concept space
            usable &= (torch.isfinite(concepts).all(1) & (concepts != 0).any(1)).numpy()
        return labels, classes, usable

    def _evidence(self, trainer, data: dict[str, torch.Tensor]) -> tuple[SampleEvidence, np.ndarray] | None:
        """Causal evidence for the usable analysed samples and their rows (None with one class only)."""
        labels, classes, usable = self._usable(data)
        rows = np.flatnonzero(usable & np.isin(labels, classes))
        values, counts = np.unique(labels[rows], return_counts=True)
        rows = rows[np.isin(labels[rows], values[counts >= 2])]   # a control needs a second sample of the class
        if len(np.unique(labels[rows])) < 2:  # one group only (e.g. regression): nothing to transfer into
            warnings.warn("SpRAyCallback: fewer than two analysed classes with two usable samples each, so no causal "
                          "evidence (nothing to transfer into); the heatmap-shape suspicion alone flags strategies",
                          stacklevel=2)
            return None
        self.progress.update(status=f"causal evidence for {len(rows)} samples")
        model = _OneRow(trainer.lightning_module, self._rows) if self._signals else trainer.lightning_module
        rows_in = self._rows is not None   # a row's most relevant tokens or features, removed with 0 (ROW_EVIDENCE)
        options = {"seed": self.seed, **(ROW_EVIDENCE if rows_in else {}), **self.evidence_options}
        infiller = "constant" if rows_in and self.infiller == "blur" else self.infiller
        scores = class_scores(data["scores"][rows].float())   # the explanation's forward pass: the check's first
        device = trainer.lightning_module.device
        return sample_evidence(model, data["x"][rows], data.get("regions", data["heatmaps"])[rows], labels[rows],
                               infiller=infiller, batch_size=self.batch_size or 256,
                               probabilities=class_probabilities(scores) if scores.dim() == 2 else None,
                               shard=lambda fn, n: shard_map(trainer, fn, torch.arange(n, device=device)),
                               **options), rows

    def _analyse(self, trainer, data: dict[str, torch.Tensor], evidence, trackers: dict[int, StrategyTracker]
                 ) -> tuple:
        """Everything after the model: SpRAy per class, its confirmation by ``evidence``, strategy
        tracking, scalars, pictures, tables and the ViRelAy files. Runs in the background worker
        (``trainer`` is the view of the analysed epoch) or inline; touches no model and no state of
        the callback (:meth:`deliver` keeps its results)."""
        labels, classes, usable = self._usable(data)
        masks = {k.split(":", 1)[1].removesuffix(_MASK_SUFFIX): v for k, v in data.items() if k.startswith("mask:")}
        concepts = data.get("concepts")
        options = {"seed": self.seed, **self.spray_options}
        position, inputs = np.full(len(labels), -1), None   # each row's index among the evidence's samples
        if evidence is not None:
            evidence, analysed = evidence
            position[analysed], inputs = np.arange(len(analysed)), data["x"][analysed]
        scalars, problems, results, rows_of, strategy_ids = {}, [], {}, {}, {}
        skipped = 0   # classes with too few usable heatmaps: not checked (a gate rule can ask for none)
        for i, c in enumerate(classes):
            name = self.name_of(c)
            self.progress.update(advance=int(i > 0), status=f"SpRAy class {name}", total=len(classes) if i == 0 else None)
            rows, found = usable_rows(labels, usable, c, options.get("k", spray.__kwdefaults__["k"]), name)
            problems += found
            if rows is None:
                skipped += 1
                continue
            result = spray(data["heatmaps"][rows], masks={m: v[rows] for m, v in masks.items()} or None,
                           features=None if concepts is None else concepts[rows], n_typical=self.n_typical,
                           **options)
            if concepts is not None:
                result.params["features"] = f"concepts of {self.concept_layer} ({concepts.shape[1]} channels)"
            if evidence is not None:
                result = result.confirm(evidence, position[rows], data["heatmaps"][rows],
                                        {m: v[rows] for m, v in masks.items()} or None,
                                        features=None if concepts is None else concepts[rows])
            tracker = trackers.setdefault(c, StrategyTracker(self.min_similarity))
            ids = tracker.update(result.signatures, result.factors["share"], trainer.current_epoch)
            results[c], rows_of[c], strategy_ids[c] = result, rows, ids
            scalars.update({f"spray/{name}/{k}": v for k, v in class_scalars(result, ids).items()})
            self._log_class(trainer, c, result, ids, tracker, data, rows, evidence, position, inputs)
        scalars["spray/classes_skipped"] = float(skipped)
        scores = data["scores"]
        if len(scores) > 1 and bool((scores == scores[:1]).all()):   # said last: the gate shows the last failure
            problems.append(f"the model gives all {len(scores)} analysed samples the same output, so no heatmap can "
                            "show how it decides (a dead model? e.g. a ReLU after its last layer that is 0 "
                            "everywhere)")
        if results:
            scalars["spray/suspicious_share"] = suspicious_share(list(results.values()))
        if self.save_virelay and results:
            write_virelay(sinks.run_dir(trainer) / "spray" / f"epoch_{trainer.current_epoch:04d}", data["heatmaps"],
                          labels, {c: (rows_of[c], r) for c, r in results.items()}, indices=data["indices"],
                          inputs=data["x"], predictions=data["scores"], class_names=self.class_names or None,
                          strategy_ids={**self.strategy_ids, **strategy_ids}, attribution_method=self.method,
                          target=self.target)
        return scalars, problems, results, strategy_ids, trackers

    def deliver(self, trainer, result: tuple) -> tuple[dict[str, float], list[str]]:
        scalars, problems, self.results, strategy_ids, self.trackers = result
        self.strategy_ids.update(strategy_ids)
        return scalars, problems

    # -- logging ---------------------------------------------------------------------------------
    def _log_class(self, trainer, c: int, r: SpRAyResult, ids: list[int], tracker: StrategyTracker,
                   data: dict[str, torch.Tensor], rows: np.ndarray, evidence: SampleEvidence | None,
                   position: np.ndarray, inputs: torch.Tensor | None) -> None:
        name = self.name_of(c)
        key = f"spray/{name}"
        x, heat, idx = data["x"][rows], data["heatmaps"][rows], data["indices"][rows].tolist()
        # the spectrum: a W&B chart (its title names the gap), elsewhere a picture with the gap marked
        if sinks.wandb_loggers(trainer):
            sinks.log_line_plot(trainer, f"{key}/eigenvalues", list(range(1, len(r.eigenvalues) + 1)),
                                {"eigenvalue": r.eigenvalues.tolist()}, title=f"class {name}: Laplacian spectrum, "
                                f"{r.n_clusters} strategies by the gap after eigenvalue {r.n_clusters}", xname="index")
        else:
            sinks.log_images(trainer, f"{key}/spectrum", [render.spectrum_picture(
                r.eigenvalues, r.n_clusters, f"class {name}: {r.n_clusters} strategies by the eigengap")],
                [f"class {name}"])
        if r.embedding is not None:
            sinks.log_table(trainer, f"{key}/embedding", *embedding_table(r, ids, idx))
            scatter = render.strategy_scatter(r.embedding, sample_strategies(r, ids),
                                              {ids[j] for j in np.flatnonzero(r.flagged)}, f"class {name}")
            sinks.log_images(trainer, f"{key}/scatter", [scatter], [f"class {name}, epoch {trainer.current_epoch}"])
        scale = max(1, 96 // heat.shape[-1])
        protos = [render.prototype_picture(p, ids[j], int(r.cluster_sizes[j]), float(r.factors["share"][j]),
                                           bool(r.flagged[j])) for j, p in enumerate(r.prototypes)]
        axes = self.signal_axes(trainer) if self._signals else {}
        if self._signals:  # prototypes over the class's mean input, as signal plots
            mean_x = x.mean(0)[:, 0]
            protos = [render.signal_panel(mean_x, p[:, 0] if p.ndim == 3 else p, title=f"strategy {ids[j]}: "
                                          f"{r.cluster_sizes[j]} samples ({r.factors['share'][j]:.0%})"
                                          f"{'  FLAGGED' if r.flagged[j] else ''} (mean input, prototype relevance)",
                                          **axes) for j, p in enumerate(r.prototypes)]
        sinks.log_images(trainer, f"{key}/prototypes", protos,
                         [prototype_caption(r, ids, j) for j in range(r.n_clusters)])
        ev = r.evidence
        if ev is not None:
            # per strategy, its most confirmed member: as it is, region removed, an other-class sample, pasted
            examples = [evidence.example(int(position[rows[ev.top[j]]]), inputs) for j in range(r.n_clusters)]
            if self._rows is not None and not self._rows.is_floating_point:   # token ids: the texts
                page = "".join(render.token_evidence_html(
                    evidence_caption(r, ids, j), examples[j], heat[ev.top[j]], ev.regions[ev.top[j]],
                    region_words(x[r.labels == j], ev.regions[r.labels == j], self.vocab), self.vocab)
                    for j in range(r.n_clusters))
                sinks.log_html(trainer, f"{key}/evidence", page)
            else:
                pictures = [render.tile_row_signals(ex[:, :, 0], **axes) if self._signals else
                            render.tile_row([render.upscale(render.input_rgb(im), scale) for im in ex], gap=0)
                            for ex in examples]
                sinks.log_images(trainer, f"{key}/evidence", pictures,
                                 [evidence_caption(r, ids, j) for j in range(r.n_clusters)])
        if self._signals:  # one typical member per strategy, as a signal plot
            strips = [render.signal_panel(x[m[0], :, 0], heat[m[0], :, 0], title=f"#{idx[m[0]]}", **axes)
                      if len(m) else np.full((8, 8, 3), 255, np.uint8) for m in r.typical]
        else:
            strips = [render.tile_row([render.upscale(render.overlay(x[i], heat[i]), scale) for i in members], gap=0)
                      for members in r.typical]
        sinks.log_table(trainer, f"{key}/clusters", *clusters_table(r, ids, idx, protos, strips))
        epochs, curves = tracker.share_curves()
        sinks.log_line_plot(trainer, f"{key}/strategy_share", epochs, curves,
                            title=f"class {name}: share of each strategy", xname="epoch")

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(sample_indices=self.sample_indices,
                     trackers={int(c): t.state_dict() for c, t in self.trackers.items()})
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.sample_indices = state_dict.get("sample_indices")
        self.trackers = {}
        for c, s in state_dict.get("trackers", {}).items():
            self.trackers[int(c)] = StrategyTracker(self.min_similarity)
            self.trackers[int(c)].load_state_dict(s)



class _OneRow(torch.nn.Module):
    """The model on one-row images (N, C, 1, L): it is called with the signals (N, C, L), or with
    the rows (N, L) in their ``dtype`` (token ids rounded) where one is given."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(x[:, :, 0])
        x = x[:, 0, 0]
        return self.model(x.to(self.dtype) if self.dtype.is_floating_point else x.round().to(self.dtype))
