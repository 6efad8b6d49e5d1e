"""ClassImportanceCallback: which components (e.g. magnitude or phase) each class relies on."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .. import sinks
from ..attribution import explain
from .base import ExplanationCallback, val_dataloader

__all__ = ["ClassImportanceCallback"]


class ClassImportanceCallback(ExplanationCallback):
    """The class-wise rate-distortion query of Heiss et al. (2020), their Table 1.

    Every ``every_n_epochs`` validation epochs, for each class: one mask over the ``components``
    (default ``"channels"``: for spectra, one entry for the whole magnitude and one for the whole
    phase), chosen for up to ``max_per_class`` validation samples of the class at once
    (:func:`~xai_callbacks.attribution.counterfactual.rde` with ``shared=True``) to minimise the
    distortion of the class's pre-softmax score, averaged over the samples, plus ``l1`` times the
    mask's mean keep probability. ``variant="exhaustive"`` (the default, for at most 10
    components) tries every binary mask and returns the exact minimiser (0 or 1 per component);
    ``"concrete"`` optimises the paper's Bernoulli-concrete relaxation (keep probabilities), whose
    noisy gradients can settle on either of two masks of nearly equal cost (on the audio
    benchmark's models its rounded answer differed from the exact one in 13 and 17 of 54 queries).
    The removed components are filled by ``infiller``
    (``"auto"``: the GAN of an :class:`~xai_callbacks.callbacks.inpainter.InpainterCallback` of
    the same trainer once trained, else blur). A keep probability near 1 means the class needs
    that component; near 0, the component can be replaced by the infiller's guess without
    changing the score (as the paper notes, the values depend on ``l1`` relative to the scores).

    Logs the table ``rde/class_importance`` (class, one column per component) and the scalars
    ``rde/<class>/<component>``. The latest values stay in :attr:`importance` (class -> list).

    Args:
        components: ``"channels"``, ``"elements"`` or an integer tensor of group ids shaped like one
            sample (see :class:`~xai_callbacks.attribution.counterfactual.MaskSpace`).
        component_names: names of the components in logged keys (default: the validation
            dataset's ``channel_names`` for ``"channels"``, else ``component<k>``).
        classes: class ids to query; None: every class in the validation set.
        class_names: class id -> name in logged keys (default: the dataset's ``class_names``, else the id).
        max_per_class: validation samples per class the mask is optimised over.
        variant: ``exhaustive`` or ``concrete`` (see above).
        steps: Adam steps (concrete); lr: Adam learning rate on the mask's logits (None: rde's default).
        l1: weight of the rate (mean keep probability).
        temperature: temperature of the concrete relaxation (the paper: 0.1).
        n_samples: infiller (and concrete mask) samples per evaluated mask.
        infiller: what fills removed components: ``"auto"``, ``"gan"``, another infiller name or instance.
        every_n_epochs, seed, on_error: see :class:`ExplanationCallback`.

    Raises:
        ValueError: an option out of range.

    Example::

        trainer = pl.Trainer(callbacks=[InpainterCallback(per_channel=True, channel_drop=0.3),
                                        ClassImportanceCallback(l1=4.0)])
    """

    def __init__(self, components: Any = "channels", component_names: Sequence[str] | None = None,
                 classes: Sequence[int] | None = None, class_names: Mapping[int, str] | None = None,
                 max_per_class: int = 32, variant: str = "exhaustive", steps: int = 150, lr: float | None = None,
                 l1: float = 4.0, temperature: float = 0.1, n_samples: int = 2, infiller: Any = "auto",
                 every_n_epochs: int = 1, seed: int = 0, on_error: str = "warn"):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=max(1, int(max_per_class)), seed=seed,
                         on_error=on_error)
        if not isinstance(max_per_class, int) or max_per_class < 1:
            raise ValueError(f"max_per_class must be an int >= 1, got {max_per_class!r}")
        if steps < 1 or l1 < 0 or not temperature > 0 or n_samples < 1:
            raise ValueError(f"ClassImportanceCallback needs steps >= 1, l1 >= 0, temperature > 0 and n_samples >= 1; "
                             f"got steps={steps}, l1={l1}, temperature={temperature}, n_samples={n_samples}")
        self.components, self.component_names = components, None if component_names is None else list(component_names)
        self.classes = None if classes is None else [int(c) for c in classes]
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.max_per_class = max_per_class
        if variant not in ("exhaustive", "concrete"):
            raise ValueError(f"ClassImportanceCallback variant must be 'exhaustive' or 'concrete', got {variant!r}")
        self.options = dict(variant=variant, steps=steps, lr=lr, l1=l1, temperature=temperature,
                            n_samples=n_samples, infiller=infiller, seed=seed)
        self.sample_indices: list[int] | None = None
        self.importance: dict[int, list[float]] = {}

    def _names(self, trainer, k: int) -> tuple[list[str], dict[int, str]]:
        dataset = self.signal_axes(trainer)
        names = self.component_names
        if names is None and self.components == "channels" and dataset["channel_names"] is not None:
            names = list(dataset["channel_names"])
        if names is None:
            names = [f"component{j}" for j in range(k)]
        if len(names) != k:
            raise ValueError(f"component_names has {len(names)} names for {k} components")
        found = getattr(val_dataloader(trainer).dataset, "class_names", None)
        class_names = {**({i: str(n) for i, n in enumerate(found)} if found is not None else {}), **self.class_names}
        return names, class_names

    def run(self, trainer, pl_module) -> None:
        if self.sample_indices is None:
            self.sample_indices = self.select_per_class(trainer, self.classes, self.max_per_class)
        samples = self.load_samples(trainer, pl_module, self.sample_indices)
        y = samples.y.reshape(len(samples.y), -1)[:, 0].long()
        classes = self.classes if self.classes is not None else sorted(set(y.tolist()))
        options = self.resolve_infillers(trainer, self.options)
        importance, names, class_names = {}, None, {}
        for i, c in enumerate(classes):
            rows = (y == c).nonzero().flatten()
            if not len(rows):
                continue
            self.progress.update(advance=int(i > 0), status=f"class {c}", total=len(classes) if i == 0 else None)
            x = samples.x[rows]
            # one call for all of the class's samples: the mask is shared by them
            keep = explain(pl_module, x, torch.full((len(rows),), int(c), device=x.device), method="rde",
                           components=self.components, shared=True, **options)
            values = _component_values(keep[0], self.components, x.shape[1:])
            if names is None:
                names, class_names = self._names(trainer, len(values))
            importance[int(c)] = values
        self.importance = importance
        if not importance:
            return
        label = {c: class_names.get(c, str(c)) for c in importance}
        sinks.log_scalars(pl_module, {f"rde/{label[c]}/{n}": v for c, vs in importance.items()
                                      for n, v in zip(names, vs)})
        sinks.log_table(trainer, "rde/class_importance", ["class"] + [f"{n} importance" for n in names],
                        [[label[c]] + [round(v, 3) for v in vs] for c, vs in importance.items()])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["sample_indices"] = self.sample_indices
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.sample_indices = state_dict.get("sample_indices")


def _component_values(keep: torch.Tensor, components: Any, sample_shape) -> list[float]:
    """One sample's keep mask (shaped like the sample) -> the keep probability of each component."""
    from ..attribution.counterfactual import MaskSpace

    space = MaskSpace(keep[None], components=components)
    groups = space.groups
    flat = keep.reshape(-1)
    return [float(flat[groups == j].mean()) for j in range(space.size)]
