"""AttributionCallback: heatmaps of a fixed probe set, every N epochs, to W&B and disk."""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .. import render, sinks
from ..attribution import check_methods, explain, method_options
from ..attribution.transformer import model_lrp
from ..guard import model_guard
from ..scoring import class_probabilities, class_scores, select
from .base import ExplanationCallback, Probe, shard_map, val_dataloader

__all__ = ["AttributionCallback", "explanation_kept"]


def explanation_kept(relevance: torch.Tensor, share: float) -> torch.Tensor:
    """(B, 1, L) 0/1 mask of each signal's top ``share`` of positions by channel-summed relevance.

    Args:
        relevance: (B, C, L) relevance.
        share: kept share of positions, in (0, 1].

    Raises:
        ValueError: relevance that is not (B, C, L).
    """
    if relevance.dim() != 3:
        raise ValueError(f"explanation_kept needs signal relevance (B, C, L), got shape {tuple(relevance.shape)}")
    r = relevance.float().sum(1)
    k = max(1, int(round(share * r.shape[1])))
    top = r.topk(k, dim=1).indices
    return torch.zeros_like(r).scatter_(1, top, 1.0)[:, None]


class AttributionCallback(ExplanationCallback):
    """Compute attributions on a fixed probe set and log them.

    Per method, a panel ``xai/heatmaps/<method>`` of input / overlay pairs (signed relevance,
    red positive, blue negative; caption: dataset index, label, prediction, its probability), one
    table ``xai/heatmap_table`` (sample id, label, prediction, method, image), and all heatmaps
    of the epoch in ``<run dir>/xai/heatmaps/epoch_NNNN.npz``. Token models (integer ids (B, L) as
    input, explained through their ``nn.Embedding``: one relevance per token) get, per method, an
    HTML panel ``xai/tokens/<method>`` of the probe texts with each token highlighted by its
    relevance (an ``.html`` file under ``<run dir>/media`` without W&B). Signals (B, C, L) are drawn
    one plot per channel with the relevance as bars (a spectrum's magnitude and phase over its
    frequencies on a log axis, when the dataset has ``frequencies`` and ``channel_names``); when the
    validation dataset can play its samples (``to_audio(x) -> waveform`` and ``sample_rate``), W&B
    also gets ``xai/audio/<method>``: each shown sample's sound and the sound of its
    explanation-kept part (the input with every position outside the top ``audio_keep`` share of
    channel-summed relevance set to 0). The latest heatmaps stay in
    :attr:`heatmaps` for other callbacks and notebooks. Under DDP each rank explains its share
    of the probe set and the heatmaps are gathered; only rank 0 logs and writes. While fitting,
    the explanations run inline (they need this epoch's weights) and what follows them (pictures,
    PNG encoding, tables, audio, the ``.npz`` file) runs in a background thread beside the next
    epoch (``asynchronous``), delivered like SpRAy's analysis: at the end of the next validation
    epoch and at the end of ``fit``, labelled with the epoch it belongs to.

    Args:
        methods: attribution method names (see ``xai_callbacks.attribution.available_methods``);
            None: saliency and the model's LRP, chosen at setup
            (:func:`~xai_callbacks.attribution.transformer.model_lrp`: ``lrp.epsilon_plus_flat`` on
            CNNs, ``lrp.epsilon_plus`` on MLPs, ``lrp.attn`` on transformers such as a ViT).
        method_options: per-method options, e.g. ``{"integrated_gradients": {"n_steps": 64}}``
            (they need named ``methods``).
        n_images: how many probe samples are rendered per method (all are saved to disk).
        batch_size: samples per explainer call (None: the whole probe set at once).
        save_heatmaps: write the ``.npz`` file each time.
        vocab: how token ids are shown in token panels: a sequence of strings indexed by id, a
            function id -> string, or None (the ids themselves).
        n_audio: samples whose sound is logged per method (signals of datasets with ``to_audio``).
        audio_keep: share of positions in the explanation-kept part of a sound, in (0, 1].
        asynchronous: while fitting, render, encode and write in a background thread (False:
            inline, as in ``validate``; the logged content is the same).
        every_n_epochs, probe_size, seed, target, on_error: see :class:`ExplanationCallback`
            (32 probe samples by default, 16 of them shown).

    Raises:
        ValueError: an unknown method or method option, or a bad base argument (the message names
            the valid ones); with ``on_error="raise"``, a failing explainer during ``fit`` /
            ``validate``.

    Example::

        from xai_callbacks import AttributionCallback

        cb = AttributionCallback(methods=["saliency", "integrated_gradients"],
                                 method_options={"integrated_gradients": {"n_steps": 16}}, probe_size=32)
        Trainer(callbacks=[cb], logger=WandbLogger()).fit(model, datamodule=dm)
        cb.heatmaps["saliency"]  # (32, C, H, W), the last epoch's heatmaps
    """

    def __init__(self, methods: Sequence[str] | None = None,
                 method_options: Mapping[str, Mapping] | None = None, n_images: int = 16,
                 batch_size: int | None = None, save_heatmaps: bool = True, every_n_epochs: int = 1,
                 probe_size: int = 32, seed: int = 0, target: Any = "label", on_error: str = "warn", vocab=None,
                 n_audio: int = 2, audio_keep: float = 0.2, asynchronous: bool = True):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=probe_size, seed=seed, target=target,
                         on_error=on_error)
        if methods is None and method_options:
            raise ValueError(f"method_options {dict(method_options)} need named methods; methods=None picks saliency "
                             f"and the model's LRP at setup")
        self._named_methods = methods
        methods, self.method_options = check_methods(["saliency"] if methods is None else methods, method_options)
        self.methods, self.n_images, self.batch_size, self.save_heatmaps = methods, n_images, batch_size, save_heatmaps
        self.vocab = vocab
        if not 0 < audio_keep <= 1 or n_audio < 0:
            raise ValueError(f"audio_keep must be in (0, 1] and n_audio >= 0; got audio_keep={audio_keep}, "
                             f"n_audio={n_audio}")
        self.n_audio, self.audio_keep = n_audio, audio_keep
        self.asynchronous = bool(asynchronous)
        self.heatmaps: dict[str, torch.Tensor] = {}

    @property
    def explained_methods(self) -> tuple[str, ...]:
        return tuple(self.methods)

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Choose the methods where they are None (saliency and the model's LRP), then check them
        against the model (:meth:`ExplanationCallback.setup`)."""
        if self._named_methods is None:
            self.methods = ["saliency", model_lrp(pl_module)]
        super().setup(trainer, pl_module, stage)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(methods=self.methods)

    def run(self, trainer, pl_module) -> None:
        probe = self.probe(trainer, pl_module)
        with model_guard(pl_module) as model, torch.no_grad():
            out = model(probe.x.clone())
        # class scores: the prediction and its probability; other outputs (regression, maps): none
        out = class_scores(out) if not callable(self.target) else out
        score, pred = class_probabilities(out).max(dim=1) if out.dim() == 2 else (
            out.new_full((len(out),), float("nan")), out.new_full((len(out),), -1))
        target = self.targets(pl_module, probe)

        def explain_share(method, rows):
            return explain(pl_module, probe.x[rows], select(target, rows), method=method, **{
                "batch_size": self.batch_size,
                **self.resolve_infillers(trainer, self.method_options.get(method, {}), method_options(method))})

        rows = torch.arange(len(probe.x), device=probe.x.device)
        self.heatmaps = {m: shard_map(trainer, partial(explain_share, m), rows) for m in self.methods}
        # everything after the explanations needs no model: CPU copies go to the background worker
        cpu = Probe(probe.x.cpu(), probe.y.cpu(), {}, probe.indices.cpu())
        self.analyse_later(trainer, self._publish, cpu, {m: h.cpu() for m, h in self.heatmaps.items()},
                           pred.cpu(), score.cpu())

    def _publish(self, trainer, probe: Probe, heatmaps: dict[str, torch.Tensor], pred: torch.Tensor,
                 score: torch.Tensor) -> None:
        """Pictures, tables, audio and the ``.npz`` file of one epoch's heatmaps (CPU tensors)."""
        n = min(self.n_images, len(probe.y))
        idx, y, pred, score = (probe.indices.tolist(), probe.y.tolist(), pred.tolist(), score.tolist())
        y = [v if isinstance(v, (int, float)) else str(v)[:24] for v in y]  # multi-label, maps: short text
        captions = [f"#{idx[i]} label {y[i]} pred {pred[i]} ({score[i]:.2f})" for i in range(n)]
        if probe.x.is_floating_point():
            self._log_images(trainer, probe, heatmaps, n, idx, y, pred, captions)
        else:
            self._log_tokens(trainer, probe.x[:n], heatmaps, captions)
        if self.save_heatmaps:
            sinks.save_npz(trainer, f"xai/heatmaps/epoch_{trainer.current_epoch:04d}.npz",
                           indices=probe.indices.numpy(), labels=probe.y.numpy(),
                           predictions=np.asarray(pred), **{m: h.numpy() for m, h in heatmaps.items()})

    def deliver(self, trainer, result: None) -> tuple[dict[str, float], list[str]]:
        return {}, []

    def _log_images(self, trainer, probe, heatmaps, n: int, idx: list, y: list, pred: list, captions: list[str]
                    ) -> None:
        rows = []
        signals = probe.x.dim() == 3
        axes = self.signal_axes(trainer) if signals else {}
        for method, heat in heatmaps.items():
            if signals:
                images = [render.signal_panel(probe.x[i], heat[i], title=f"{method}: {captions[i]}", **axes)
                          for i in range(n)]
                self._log_audio(trainer, method, probe.x[:min(n, self.n_audio)], heat, captions)
            else:
                images = [render.panel(probe.x[i], heat[i]) for i in range(n)]
            sinks.log_images(trainer, f"xai/heatmaps/{method}", images, captions)
            rows += [[idx[i], y[i], pred[i], method, images[i]] for i in range(n)]
        sinks.log_table(trainer, "xai/heatmap_table", ["sample_id", "label", "prediction", "method", "image"], rows)

    def _log_audio(self, trainer, method: str, x: torch.Tensor, heat: torch.Tensor, captions: list[str]) -> None:
        """Each sample's sound and the sound of its explanation-kept part, if the dataset can play."""
        dataset = val_dataloader(trainer).dataset
        play, rate = getattr(dataset, "to_audio", None), getattr(dataset, "sample_rate", None)
        if play is None or rate is None or not len(x):
            return
        kept = x * explanation_kept(heat[:len(x)], self.audio_keep)
        waves, names = [], []
        for i in range(len(x)):
            waves += [play(x[i]), play(kept[i])]
            names += [f"{captions[i]}: input", f"{captions[i]}: kept by {method} (top {self.audio_keep:.0%})"]
        sinks.log_audio(trainer, f"xai/audio/{method}", waves, int(rate), names)

    def _log_tokens(self, trainer, tokens: torch.Tensor, heatmaps, captions: list[str]) -> None:
        """One HTML panel per method: each probe text's tokens highlighted by their relevance."""
        texts = [render.token_names(row, self.vocab) for row in tokens.tolist()]
        for method, heat in heatmaps.items():
            page = "".join(f"<p><b>{c}</b></p>{render.tokens_html(t, heat[i])}"
                           for i, (c, t) in enumerate(zip(captions, texts)))
            sinks.log_html(trainer, f"xai/tokens/{method}", page)
