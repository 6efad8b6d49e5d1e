"""ConceptRelevanceCallback: per class, the concepts (channels of a layer) the model relies on."""
from __future__ import annotations

import torch

from .. import render, sinks
from ..concepts import concept_relevance, conditional_heatmaps, reference_samples, top_concepts
from .base import ExplanationCallback

__all__ = ["ConceptRelevanceCallback"]


class ConceptRelevanceCallback(ExplanationCallback):
    """Concept relevance (CRP) on the probe set every ``every_n_epochs``.

    For each class in the probe set: the ``n_concepts`` channels of ``layer`` with the highest mean
    relevance over the class's probe samples (explaining their labels), and per concept one row
    logged to ``xai/concepts/<class>``: the conditional heatmap of the class's first probe sample
    (input and overlay) followed by the ``n_references`` probe samples where the concept is most
    relevant (relevance maximisation). The channel relevances of all probe samples stay in
    :attr:`relevance` (probe size, channels), the top concepts in :attr:`concepts`. Runs on rank 0.

    Args:
        layer: module name whose output channels are the concepts.
        n_concepts: concepts shown per class.
        n_references: reference samples per concept.
        every_n_epochs, probe_size, seed, on_error: see :class:`ExplanationCallback`.

    Raises:
        ValueError: ``n_concepts`` < 1, ``n_references`` < 0 or a bad base argument; with
            ``on_error="raise"``, a ``layer`` the model does not have (the message lists its
            modules) during ``fit`` / ``validate``.

    Example::

        from xai_callbacks import ConceptRelevanceCallback

        cb = ConceptRelevanceCallback(layer="features.3", n_concepts=3, n_references=4)
        Trainer(callbacks=[cb]).fit(model, datamodule=dm)
        cb.concepts  # {class: the channels of features.3 it relies on most}
    """

    def __init__(self, layer: str, n_concepts: int = 4, n_references: int = 4, every_n_epochs: int = 1,
                 probe_size: int = 64, seed: int = 0, on_error: str = "warn"):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=probe_size, seed=seed, on_error=on_error)
        if n_concepts < 1 or n_references < 0:
            raise ValueError(f"n_concepts must be >= 1 and n_references >= 0, got {n_concepts}, {n_references}")
        self.layer, self.n_concepts, self.n_references = layer, n_concepts, n_references
        self.relevance: torch.Tensor | None = None
        self.concepts: dict[int, torch.Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(layer=self.layer)

    def run(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        probe = self.probe(trainer, pl_module)
        res = concept_relevance(pl_module, probe.x, probe.y, self.layer)
        self.relevance = res.relevance.cpu()
        self.concepts = {c: ch.cpu() for c, ch in top_concepts(res.relevance, probe.y, self.n_concepts).items()}
        for c, channels in self.concepts.items():
            first = int((probe.y == c).nonzero()[0])
            heat = conditional_heatmaps(pl_module, probe.x[first:first + 1], probe.y[first:first + 1], self.layer,
                                        channels)[0]
            refs = reference_samples(res.relevance, channels.to(res.relevance.device), self.n_references)
            rows, captions = [], []
            for k, ch in enumerate(channels.tolist()):
                tiles = [render.panel(probe.x[first], heat[k], scale=2)]
                tiles += [render.upscale(render.input_rgb(probe.x[i]), 2) for i in refs[k].tolist()]
                rows.append(render.tile_row(tiles, gap=4))
                captions.append(f"class {c} concept {ch} (R={float(res.relevance[first, ch]):.3g}); references "
                                f"#{[int(probe.indices[i]) for i in refs[k].tolist()]}")
            sinks.log_images(trainer, f"xai/concepts/{c}", rows, captions)

