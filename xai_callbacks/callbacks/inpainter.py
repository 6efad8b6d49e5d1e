"""InpainterCallback: train a GAN inpainter on the batches the model already loads."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .. import render, sinks
from ..data import unpack_batch
from ..guard import model_guard
from ..infill import Infiller, get_infiller
from ..infill.gan import GANInfiller, GANInpainter, MaskSampler, save_generator
from ..infill.quality import fill_quality
from ..scoring import class_scores
from .base import ExplanationCallback, average_gradients

__all__ = ["InpainterCallback"]


class InpainterCallback(ExplanationCallback):
    """Train a GAN inpainter G(x, mask, noise) alongside the model, on the same training batches.

    Every ``every_n_steps`` training batches, the batch's inputs (detached) train the inpainter
    (:class:`~xai_callbacks.infill.gan.GANInpainter`: U-Net G, SN-PatchGAN D, hinge loss, L1
    warm-up) with its own optimizers and its own ``torch.Generator``, inside ``rng_guard``: the
    model's parameters, gradients, BatchNorm statistics and the global RNG streams are untouched,
    so the model trains bit-identically with or without this callback.

    At each scheduled validation epoch end it logs, on the probe set with fixed seeded masks:
    ``inpainter/l1/<fill>`` and ``inpainter/psnr/<fill>`` (masked-region L1 and PSNR) and
    ``inpainter/agreement/<fill>`` (share of probe samples whose predicted class is the same on
    the filled and the original input) for the GAN and each baseline; the epoch's mean training
    losses ``inpainter/loss_g``, ``inpainter/loss_d``, ``inpainter/l1_hole`` (and
    ``inpainter/chance``, the cross-entropy of G's chance head, with several ``hypotheses``); a panel
    ``inpainter/examples`` (input | mask | GAN fill | first baseline's fill; for signals (B, C, L),
    one plot per channel of the input and the fills with the removed positions shaded); and G alone
    in ``<run dir>/inpainter/generator.pt`` (load with ``xai_callbacks.infill.gan.load_generator``).

    Images (B, C, H, W) train a 2-D G and D, signals such as spectra (B, C, L) a 1-D pair (chosen
    from the first batch).

    Once G has finished its L1 warm-up, :attr:`trained_infiller` gives it, and the other explanation
    callbacks of the same trainer hand it to explainers and metrics whose ``infiller`` option is
    ``"auto"`` (the counterfactual explainers' default) or ``"gan"``: through that argument, never a
    global (see :meth:`ExplanationCallback.resolve_infillers`). :attr:`infiller` gives G at any time.
    G, D, both optimizers, the generator state and the step count are in ``state_dict``.

    Args:
        every_n_steps: train on every n-th training batch.
        steps_per_batch: inpainter updates on each such batch (fresh masks and noise each time),
            for data sets too small for G to learn in the classifier's few epochs.
        width: base width of G and D.
        value_range: (low, high) of the inputs; G's output is squashed into it. None: unbounded.
        warmup_steps: inpainter steps of L1-only training before the adversarial terms start.
        lr_g, lr_d: Adam learning rates of G and D.
        hole_weight, valid_weight, adv_weight: weights of the hole L1, kept-pixel L1 and hinge terms.
        mask_sampler: the :class:`~xai_callbacks.infill.gan.MaskSampler` (or a dict of its arguments)
            for training and evaluation masks (default: boxes, Bernoulli pixels and low-resolution grids).
        baselines: infillers compared with the GAN: names (``constant``, ``blur``, ``noise``) or
            Infiller instances.
        per_channel: one keep mask per channel (e.g. the magnitude of a spectrum kept, its phase
            removed), for explainers whose masks act on channels separately (``components``).
        channel_drop: with ``per_channel``, the share of training masks that remove one whole channel.
        hypotheses: fills G proposes at once, trained winner-takes-all; the infiller draws one per
            sample (for data where the kept part leaves several answers: see
            :class:`~xai_callbacks.infill.gan.GANInpainter`).
        n_images: probe samples shown in ``inpainter/examples``.
        save_generator: write G to the run directory at each scheduled epoch.
        seed: seeds G and D's initialisation, the training masks and noise, the probe set and the
            evaluation masks.
        every_n_epochs, probe_size, on_error: see :class:`ExplanationCallback`.

    Raises:
        ValueError: ``every_n_steps`` or ``hypotheses`` < 1, a bad mask sampler argument, an unknown baseline
            infiller or a bad base argument (the message names the valid ones); with
            ``on_error="raise"``, inputs that are not images (B, C, H, W) or a failing step.

    Example::

        from xai_callbacks import AttributionCallback, InpainterCallback

        inpainter = InpainterCallback(value_range=(0, 1), warmup_steps=200)
        explain = AttributionCallback(methods=["fido.ssr"])  # infiller="auto": the GAN once trained
        Trainer(callbacks=[inpainter, explain]).fit(model, datamodule=dm)
        fill = inpainter.trained_infiller  # an Infiller: fill(x, keep)
    """

    def __init__(self, every_n_steps: int = 1, steps_per_batch: int = 1, width: int = 16, value_range: tuple[float, float] | None = None,
                 warmup_steps: int = 200, lr_g: float = 2e-3, lr_d: float = 2e-3, hole_weight: float = 1.0,
                 valid_weight: float = 0.2, adv_weight: float = 0.01, mask_sampler: MaskSampler | Mapping | None = None,
                 baselines: Sequence[str | Infiller] = ("constant", "blur", "noise"), n_images: int = 8,
                 save_generator: bool = True, seed: int = 0, every_n_epochs: int = 1, probe_size: int = 64,
                 on_error: str = "warn", per_channel: bool = False, channel_drop: float = 0.0, hypotheses: int = 1):
        super().__init__(every_n_epochs=every_n_epochs, probe_size=probe_size, seed=seed,
                         on_error=on_error)
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not isinstance(steps_per_batch, int) or steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be an int >= 1, got {steps_per_batch!r}")
        if not isinstance(hypotheses, int) or hypotheses < 1:
            raise ValueError(f"hypotheses must be an int >= 1 (fills G proposes at once), got {hypotheses!r}")
        self.every_n_steps, self.steps_per_batch = every_n_steps, steps_per_batch
        self.options = dict(width=width, value_range=value_range, warmup_steps=warmup_steps, lr_g=lr_g, lr_d=lr_d,
                            hole_weight=hole_weight, valid_weight=valid_weight, adv_weight=adv_weight, seed=seed,
                            per_channel=per_channel, channel_drop=channel_drop, hypotheses=hypotheses)
        if not 0 <= channel_drop <= 1 or (channel_drop and not per_channel):
            raise ValueError(f"channel_drop must be in [0, 1] and needs per_channel=True; got channel_drop="
                             f"{channel_drop}, per_channel={per_channel}")
        if isinstance(mask_sampler, Mapping):
            mask_sampler = MaskSampler(**mask_sampler)
        self.mask_sampler = mask_sampler or MaskSampler()
        self.baselines = [get_infiller(b) for b in baselines]
        self.n_images, self.save_generator = n_images, save_generator
        self.inpainter: GANInpainter | None = None
        self.batches = 0
        self._pending: dict | None = None
        self._losses: dict[str, list[float]] = {}
        self._eval_keep: torch.Tensor | None = None
        self._trained: GANInfiller | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(seed=self.options["seed"])

    @property
    def infiller(self) -> GANInfiller | None:
        """The current G as a :class:`~xai_callbacks.infill.gan.GANInfiller` (None before the first batch)."""
        return None if self.inpainter is None else self.inpainter.infiller()

    @property
    def trained_infiller(self) -> GANInfiller | None:
        """G as an infiller once its L1 warm-up is done, else None: what ``"auto"`` resolves to in
        the other explanation callbacks of this trainer. The same object from call to call (so its
        noise stream continues), sharing G's parameters."""
        if self.inpainter is None or self.inpainter.steps < self.inpainter.warmup_steps:
            return None
        if self._trained is None:
            self._trained = self.inpainter.infiller()
        return self._trained

    # -- training ------------------------------------------------------------------------------
    def _build(self, x: torch.Tensor, device: torch.device) -> None:
        self.inpainter = GANInpainter(channels=x.shape[1], mask_sampler=self.mask_sampler, device=device,
                                      dims=x.dim() - 2,
                                      **self.options)
        if self._pending is not None:
            self.inpainter.load_state_dict(self._pending)
            self._pending = None

    def _train(self, x: torch.Tensor, device: torch.device) -> None:
        if x.dim() not in (3, 4):
            raise ValueError(f"InpainterCallback trains on images (B, C, H, W) or signals (B, C, L); got inputs of "
                             f"shape {tuple(x.shape)}")
        if self.inpainter is None:
            self._build(x, device)
        for _ in range(self.steps_per_batch):
            losses = self.inpainter.train_step(x, grad_sync=average_gradients)
            for k, v in losses.items():
                self._losses.setdefault(k, []).append(v)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if (self.batches - 1) % self.every_n_steps:
            return
        # not run_safely: xai/errors is logged per epoch, not per training batch
        self.guarded(f"training step failed at global step {trainer.global_step}",
                     lambda: self._train(unpack_batch(batch).x.detach(), pl_module.device))

    # -- evaluation ----------------------------------------------------------------------------
    def run(self, trainer, pl_module) -> None:
        if self.inpainter is None:
            return
        probe = self.probe(trainer, pl_module)
        x = probe.x.float()
        keep = self._evaluation_masks(x)
        fills = [self.inpainter.infiller(seed=self.seed)] + self.baselines
        values, filled = {}, {}
        with model_guard(pl_module) as model, torch.no_grad():
            predicted = class_scores(model(x.clone())).argmax(dim=1)
            for i, f in enumerate(fills):
                self.progress.update(advance=int(i > 0), status=f"evaluating the {f.name} infill",
                                     total=len(fills) if i == 0 else None)
                filled[f.name], scores = fill_quality(model, x, keep, f, predicted, self.options["value_range"])
                values.update({f"inpainter/{k}/{f.name}": v for k, v in scores.items()})
        values.update({f"inpainter/{k}": float(np.mean(v)) for k, v in self._losses.items()})
        self._losses = {}
        sinks.log_scalars(pl_module, values)
        if not trainer.is_global_zero:
            return
        shown = [f.name for f in fills[:2]]
        n = min(self.n_images, x.shape[0])
        if x.dim() == 3:
            axes = self.signal_axes(trainer)
            images = [render.signal_fills(x[i], keep[i], {k: filled[k][i] for k in shown}, **axes) for i in range(n)]
        else:
            images = [render.inpainting_row(x[i], keep[i], [filled[k][i] for k in shown]) for i in range(n)]
        captions = [f"#{probe.indices[i].item()} input | mask | {' | '.join(shown)}" for i in range(n)]
        sinks.log_images(trainer, "inpainter/examples", images, captions)
        if self.save_generator:
            save_generator(self.inpainter.generator, sinks.run_dir(trainer) / "inpainter" / "generator.pt")

    def _evaluation_masks(self, x: torch.Tensor) -> torch.Tensor:
        """The probe's keep masks, drawn once from :attr:`seed` (the same masks every epoch)."""
        if self._eval_keep is None or self._eval_keep.shape[0] != x.shape[0]:
            self._eval_keep = self.inpainter.masks(x.shape[0], x.shape[2:], torch.Generator().manual_seed(self.seed))
        return self._eval_keep.to(x.device)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["batches"] = self.batches
        state["inpainter"] = self.inpainter.state_dict() if self.inpainter is not None else self._pending
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.batches = state_dict.get("batches", 0)
        saved = state_dict.get("inpainter")
        if saved is not None and self.inpainter is not None:
            self.inpainter.load_state_dict(saved)
        else:
            self._pending = saved
