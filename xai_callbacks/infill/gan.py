"""GAN inpainter: fill removed evidence with plausible content instead of grey, noise or blur.

Pieces (Chang et al. 2019, FIDO; Heiss et al. 2020; SN-PatchGAN of Yu et al. 2019):

* :class:`InpaintGenerator` G(x, keep, noise): a small U-Net that sees the kept pixels, the mask
  and a noise channel; its output is composited into the known pixels by the infiller. Images
  (``dims=2``, (B, C, H, W)) or signals such as spectra (``dims=1``, (B, C, L)); with
  ``per_channel=True`` it sees one mask per channel (e.g. magnitude kept, phase removed). With
  ``hypotheses=K > 1`` it proposes K fills at once, trained winner-takes-all (multiple-choice
  learning, Guzman-Rivera et al. 2012; relaxed as in Rupprecht et al. 2017): where the kept part
  leaves several answers (a dark or a bright spectrum behind the same phase) the proposals
  cover them instead of collapsing onto one; a small head learns how likely each is the
  closest, and the infiller draws one per sample by that chance.
* :class:`PatchDiscriminator`: spectrally normalised convolutions scoring patches of
  (image, hole mask); trained with the hinge loss (:func:`hinge_d_loss`, :func:`hinge_g_loss`).
* :class:`MaskSampler`: keep masks from a mixture of boxes, Bernoulli pixels and low-resolution
  grids, the shapes that occlusion, RISE and mask-optimising explainers remove.
* :class:`GANInpainter`: G, D, their optimizers, the mask sampler and an own ``torch.Generator``;
  :meth:`GANInpainter.train_step` does one discriminator and one generator update on a batch.
  Its ``state_dict`` holds everything, so training resumes exactly.
* :class:`GANInfiller`: the trained G as an :class:`~xai_callbacks.infill.Infiller`, registered
  as ``gan``. :func:`save_generator` / :func:`load_generator` store G alone.

No Lightning, no wandb: tensors in, tensors out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from . import Infiller, register_infiller
from ..guard import grad_fp32, rng_guard

__all__ = ["InpaintGenerator", "PatchDiscriminator", "MaskSampler", "GANInpainter", "GANInfiller",
           "hinge_d_loss", "hinge_g_loss", "masked_l1", "save_generator", "load_generator"]


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d}
#: With several proposals, the share of a sample's hole L1 that the proposals other than the
#: closest one share (relaxed winner-takes-all: Rupprecht et al. 2017 use 0.05).
RELAXATION = 0.05
_DIMS = {1: "signals (B, C, L)", 2: "images (B, C, H, W)"}


def _check_dims(dims: int) -> None:
    if dims not in _CONVS:
        raise ValueError(f"dims must be 1 (signals (B, C, L)) or 2 (images (B, C, H, W)), got {dims!r}")


def _conv(cin: int, cout: int, dilation: int = 1, stride: int = 1, dims: int = 2) -> nn.Sequential:
    return nn.Sequential(_CONVS[dims](cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.2))


class InpaintGenerator(nn.Module):
    """U-Net G(x, keep, noise) -> an image shaped like ``x`` (the content proposed for the holes).

    Two stride-2 downsamplings, dilated convolutions at the bottleneck, skip connections; no
    normalisation layers (so eval and train mode compute the same). Inputs of any size are padded
    to a multiple of 4 and cropped back.

    Args:
        channels: channels of the inputs.
        width: channels of the first level (doubled at each downsampling).
        noise_channels: channels of the noise input.
        value_range: ``(low, high)`` of the data; the output is squashed into it with a sigmoid.
            None leaves the output unbounded.
        dims: 2 for images (B, C, H, W), 1 for signals (B, C, L) such as spectra.
        per_channel: G sees one mask per channel (a channel can be removed while another is
            kept); False: the mean of the channels' masks.
        hypotheses: fills proposed at once (:meth:`proposals`); :meth:`forward` returns one per
            sample.

    Raises:
        ValueError: a count below its minimum, a bad ``value_range`` or ``dims``.

    Example::

        G = InpaintGenerator(channels=2, dims=1, per_channel=True)
        proposal = G(x, keep)                    # x, keep: (B, 2, L)
        candidates = G.proposals(x, keep)        # (B, hypotheses, 2, L)
    """

    def __init__(self, channels: int = 1, width: int = 16, noise_channels: int = 1,
                 value_range: tuple[float, float] | None = None, dims: int = 2, per_channel: bool = False,
                 hypotheses: int = 1):
        super().__init__()
        if channels < 1 or width < 1 or noise_channels < 0 or hypotheses < 1:
            raise ValueError(f"InpaintGenerator needs channels >= 1, width >= 1, noise_channels >= 0, hypotheses >= 1; "
                             f"got channels={channels}, width={width}, noise_channels={noise_channels}, "
                             f"hypotheses={hypotheses}")
        if value_range is not None and not value_range[1] > value_range[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        _check_dims(dims)
        self.config = {"channels": channels, "width": width, "noise_channels": noise_channels,
                       "value_range": None if value_range is None else tuple(map(float, value_range)),
                       "dims": dims, "per_channel": bool(per_channel), "hypotheses": int(hypotheses)}
        w, d = width, dims
        self.enc1 = _conv(channels + (channels if per_channel else 1) + noise_channels, w, dims=d)
        self.enc2 = nn.Sequential(_conv(w, 2 * w, stride=2, dims=d), _conv(2 * w, 2 * w, dims=d))
        self.enc3 = _conv(2 * w, 4 * w, stride=2, dims=d)
        self.mid = nn.Sequential(_conv(4 * w, 4 * w, dilation=2, dims=d), _conv(4 * w, 4 * w, dilation=4, dims=d))
        self.dec2 = _conv(4 * w + 2 * w, 2 * w, dims=d)
        self.dec1 = _conv(2 * w + w, w, dims=d)
        self.out = _CONVS[d](w, channels * hypotheses, 3, padding=1)
        if hypotheses > 1:   # how likely each proposal is the closest, from the (detached) bottleneck
            self.chance = nn.Sequential(nn.Linear(4 * w, 4 * w), nn.LeakyReLU(0.2), nn.Linear(4 * w, hypotheses))

    def forward(self, x: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor | None = None,
                head: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x (B, C, H, W) (or (B, C, L) with ``dims=1``); keep (B, 1 or C, ...) in [0, 1],
        1 = known position; noise (B, noise_channels, ...) or None (zeros); head (B,) the
        proposal each sample gets, or None (the most likely)."""
        out, logits = self.proposals(x, keep, noise)
        if head is None:
            head = logits.argmax(1)
        return out[torch.arange(len(out), device=out.device), head.to(out.device)]

    def proposals(self, x: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every proposed fill (B, hypotheses, C, ...) and the log-odds (B, hypotheses) of each
        being the closest to the truth (arguments as :meth:`forward`)."""
        cfg = self.config
        dims = cfg["dims"]
        if x.dim() != dims + 2 or x.shape[1] != cfg["channels"]:
            raise ValueError(f"InpaintGenerator was built for {cfg['channels']} channels and dims={dims}: expects "
                             f"{_DIMS[dims].replace('C', str(cfg['channels']))}, got {tuple(x.shape)}")
        b, size = x.shape[0], x.shape[2:]
        keep = keep.to(x.dtype).expand(b, -1, *size)
        mask = keep.expand(b, x.shape[1], *size) if cfg["per_channel"] else keep.mean(dim=1, keepdim=True)
        if noise is None:
            noise = x.new_zeros(b, cfg["noise_channels"], *size)
        inp = torch.cat([x * keep, mask, noise], dim=1)
        pads = [p for n in reversed(size) for p in (0, (-n) % 4)]
        if any(pads):
            inp = F.pad(inp, pads, mode="replicate")
        e1 = self.enc1(inp)
        e2 = self.enc2(e1)
        e3 = self.mid(self.enc3(e2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode="nearest"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode="nearest"), e1], dim=1))
        out = self.out(d1)[(slice(None), slice(None), *(slice(0, n) for n in size))]
        out = out.view(b, cfg["hypotheses"], cfg["channels"], *size)
        logits = self.chance(e3.detach().flatten(2).mean(2)) if cfg["hypotheses"] > 1 else out.new_zeros(b, 1)
        if cfg["value_range"] is not None:
            low, high = cfg["value_range"]
            out = low + (high - low) * torch.sigmoid(out)
        return out, logits


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN discriminator: spectrally normalised stride-2 convolutions on (input, hole mask);
    returns a map of patch scores (B, 1, h, w) (or (B, 1, l) for signals), each scored with the
    hinge loss.

    Args:
        channels: channels of the inputs.
        width: channels of the first layer (doubled per layer, at most 8x).
        n_layers: number of stride-2 layers.
        dims: 2 for images (B, C, H, W), 1 for signals (B, C, L).
        per_channel: D sees one hole mask per channel (as G with ``per_channel=True``).

    Raises:
        ValueError: ``n_layers < 1`` or a bad ``dims``.
    """

    def __init__(self, channels: int = 1, width: int = 16, n_layers: int = 3, dims: int = 2,
                 per_channel: bool = False):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator n_layers must be >= 1, got {n_layers}")
        _check_dims(dims)
        self.per_channel = bool(per_channel)
        conv = _CONVS[dims]
        layers, cin = [], channels + (channels if per_channel else 1)
        for i in range(n_layers):
            cout = width * min(2 ** i, 8)
            layers += [spectral_norm(conv(cin, cout, 5, stride=2, padding=2)), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(spectral_norm(conv(cin, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        keep = keep.to(x.dtype).expand(x.shape[0], -1, *x.shape[2:])
        hole = 1 - (keep.expand_as(x) if self.per_channel else keep.mean(dim=1, keepdim=True))
        return self.net(torch.cat([x, hole], dim=1))


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def hinge_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -mean(D(fake))."""
    return -fake_scores.mean()


def masked_l1(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of ``a`` and ``b`` over ``region`` (weights in [0, 1], broadcastable)."""
    region = region.to(a.dtype).expand_as(a)
    return ((a - b).abs() * region).sum() / region.sum().clamp_min(1e-8)


class MaskSampler:
    """Keep masks (N, 1, H, W), 1 = kept, 0 = removed, from a mixture of three kinds.

    * ``box``: one rectangle removed, sides a uniform fraction ``box_size`` of the image sides;
    * ``pixels``: each pixel removed with probability p ~ U(``drop``);
    * ``grid``: cells of a ``g`` x ``g`` grid (g from ``grid_sizes``) removed with probability
      p ~ U(``drop``), upsampled nearest (occlusion / RISE-like patches).

    A drawn mask that keeps nothing is replaced by a ``box`` mask. Masks of height 1 are masks
    for signals (a box is an interval, a grid cell a segment): :meth:`draw` takes either.

    Args:
        kinds: the kinds in the mixture.
        weights: mixture weights of the kinds (default equal).
        box_size: (min, max) side of the box as a fraction of the image side.
        drop: (min, max) of the removal probability for ``pixels`` and ``grid``.
        grid_sizes: grid resolutions for ``grid``.
    """

    KINDS = ("box", "pixels", "grid")

    def __init__(self, kinds: Sequence[str] = KINDS, weights: Sequence[float] | None = None,
                 box_size: tuple[float, float] = (0.25, 0.6), drop: tuple[float, float] = (0.2, 0.8),
                 grid_sizes: Sequence[int] = (2, 4, 8)):
        bad = [k for k in kinds if k not in self.KINDS]
        if bad or not kinds:
            raise ValueError(f"MaskSampler kinds must be a non-empty subset of {self.KINDS}, got {list(kinds)}")
        weights = [1.0] * len(kinds) if weights is None else list(weights)
        if len(weights) != len(kinds) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"MaskSampler weights must be {len(kinds)} non-negative numbers with a positive sum, "
                             f"got {weights}")
        for name, (lo, hi) in (("box_size", box_size), ("drop", drop)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"MaskSampler {name} must be (min, max) with 0 < min <= max <= 1, got {(lo, hi)}")
        if not grid_sizes or min(grid_sizes) < 1:
            raise ValueError(f"MaskSampler grid_sizes must be positive integers, got {list(grid_sizes)}")
        self.kinds, self.box_size, self.drop, self.grid_sizes = tuple(kinds), box_size, drop, tuple(grid_sizes)
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def __call__(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` keep masks of size ``height`` x ``width`` drawn on the CPU from ``generator``."""
        g = generator
        kind = torch.multinomial(self.weights, n, replacement=True, generator=g)
        masks = torch.ones(n, 1, height, width)
        for k, name in enumerate(self.kinds):
            sel = (kind == k).nonzero().flatten()
            if len(sel):
                masks[sel] = getattr(self, f"_{name}")(len(sel), height, width, g)
        empty = (masks.flatten(1).amax(1) == 0).nonzero().flatten()
        if len(empty):  # nothing kept: nothing to inpaint from; remove a box instead
            masks[empty] = self._box(len(empty), height, width, g)
        return masks

    def draw(self, n: int, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``n`` keep masks (n, 1, *size) for images (``size`` (H, W)) or signals (``size`` (L,)).

        Raises:
            ValueError: ``size`` of another length.
        """
        size = tuple(size)
        if len(size) == 2:
            return self(n, size[0], size[1], generator)
        if len(size) == 1:
            return self(n, 1, size[0], generator)[:, :, 0]
        raise ValueError(f"masks are drawn for images (H, W) or signals (L,), got size {size}")

    def _uniform(self, n, lo, hi, g):
        return lo + (hi - lo) * torch.rand(n, generator=g)

    def _box(self, n, h, w, g):
        bh = (self._uniform(n, *self.box_size, g) * h).round().clamp(1, h)
        bw = (self._uniform(n, *self.box_size, g) * w).round().clamp(1, w)
        top = (torch.rand(n, generator=g) * (h - bh + 1)).floor()
        left = (torch.rand(n, generator=g) * (w - bw + 1)).floor()
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + bh).view(-1, 1, 1))
                  & (cols >= left.view(-1, 1, 1)) & (cols < (left + bw).view(-1, 1, 1)))
        return (~inside).float()[:, None]

    def _pixels(self, n, h, w, g):
        p = self._uniform(n, *self.drop, g).view(-1, 1, 1, 1)
        return (torch.rand(n, 1, h, w, generator=g) >= p).float()

    def _grid(self, n, h, w, g):
        size = torch.tensor(self.grid_sizes)[torch.randint(len(self.grid_sizes), (n,), generator=g)]
        p = self._uniform(n, *self.drop, g).view(-1, 1, 1, 1)
        out = torch.empty(n, 1, h, w)
        for s in self.grid_sizes:
            sel = (size == s).nonzero().flatten()
            if len(sel):
                cells = (torch.rand(len(sel), 1, s, s, generator=g) >= p[sel]).float()
                out[sel] = F.interpolate(cells, size=(h, w), mode="nearest")
        return out


class GANInpainter:
    """G, D, their Adam optimizers, a :class:`MaskSampler` and an own ``torch.Generator``.

    :meth:`train_step` takes a batch of images or signals (detached here), draws keep masks and
    noise from the own generator, and does one D and one G update: G minimises ``hole_weight`` * L1
    on the holes + ``valid_weight`` * L1 on the kept positions (of its raw output) + ``adv_weight``
    * hinge loss, the adversarial terms starting after ``warmup_steps`` L1-only steps. With
    ``hypotheses`` > 1 the hole L1 of each sample goes to its closest proposal (weight 1 -
    :data:`RELAXATION`, the others share the rest, so none is left untrained), the kept-position
    L1 and the adversarial terms to every proposal; G's chance head learns (cross-entropy, on
    detached features) which proposal is the closest.

    With ``per_channel=True`` each channel has its own keep mask (:meth:`masks`): half of the
    samples draw one mask per channel, the others one shared by the channels; then, with
    probability ``channel_drop``, one random channel is removed entirely. So G learns to fill a
    whole channel from the others (e.g. the phase of a spectrum from its magnitude).

    Args:
        channels: input channels.
        width: base width of G and D.
        value_range: (low, high) of the data for G's output, or None.
        noise_channels: channels of G's noise input.
        lr_g, lr_d: Adam learning rates of G and D (betas (0.5, 0.9)).
        hole_weight, valid_weight, adv_weight: loss weights.
        warmup_steps: steps of L1-only training before the adversarial terms start.
        mask_sampler: the :class:`MaskSampler` (default: the full mixture).
        seed: seeds the parameters' initialisation and the own generator (masks, noise).
        device: where G and D live.
        dims: 2 for images (B, C, H, W), 1 for signals (B, C, L).
        per_channel: one keep mask per channel (see above).
        channel_drop: with ``per_channel``, the probability that a training mask removes one whole channel.
        hypotheses: fills G proposes at once (see above and :class:`InpaintGenerator`).

    Raises:
        ValueError: a rate, weight or probability out of range, or ``channel_drop`` without ``per_channel``.

    Example::

        inpainter = GANInpainter(channels=2, dims=1, per_channel=True, channel_drop=0.3)
        losses = inpainter.train_step(spectra)   # (B, 2, L)
        fill = inpainter.infiller()              # an Infiller for explainers and metrics
    """

    def __init__(self, channels: int = 1, width: int = 16, value_range: tuple[float, float] | None = None,
                 noise_channels: int = 1, lr_g: float = 2e-3, lr_d: float = 2e-3, hole_weight: float = 1.0,
                 valid_weight: float = 0.2, adv_weight: float = 0.01, warmup_steps: int = 200,
                 mask_sampler: MaskSampler | None = None, seed: int = 0, device: torch.device | str = "cpu",
                 dims: int = 2, per_channel: bool = False, channel_drop: float = 0.0, hypotheses: int = 1):
        for name, v in (("lr_g", lr_g), ("lr_d", lr_d)):
            if not v > 0:
                raise ValueError(f"GANInpainter {name} must be > 0, got {v}")
        for name, v in (("hole_weight", hole_weight), ("valid_weight", valid_weight), ("adv_weight", adv_weight),
                        ("warmup_steps", warmup_steps)):
            if v < 0:
                raise ValueError(f"GANInpainter {name} must be >= 0, got {v}")
        if not 0 <= channel_drop <= 1 or (channel_drop and not per_channel):
            raise ValueError(f"GANInpainter channel_drop must be in [0, 1] and needs per_channel=True; got "
                             f"channel_drop={channel_drop}, per_channel={per_channel}")
        with rng_guard(seed):  # initialisation draws do not touch the global RNG streams
            self.generator = InpaintGenerator(channels, width, noise_channels, value_range, dims,
                                              per_channel, hypotheses).to(device)
            self.discriminator = PatchDiscriminator(channels, width, dims=dims, per_channel=per_channel).to(device)
        self.channel_drop = float(channel_drop)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr_g, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr_d, betas=(0.5, 0.9))
        self.weights = {"hole": float(hole_weight), "valid": float(valid_weight), "adv": float(adv_weight)}
        self.warmup_steps = int(warmup_steps)
        self.mask_sampler = mask_sampler or MaskSampler()
        self.rng = torch.Generator().manual_seed(seed)
        self.steps = 0

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def masks(self, n: int, size: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """``n`` training-style keep masks (n, 1 or C, *size) drawn on the CPU from ``generator``:
        the mask sampler's, per channel as described in the class docstring when ``per_channel``."""
        cfg = self.generator.config
        if not cfg["per_channel"]:
            return self.mask_sampler.draw(n, size, generator)
        c = cfg["channels"]
        own = self.mask_sampler.draw(n * c, size, generator).view(n, c, *size)
        shared = self.mask_sampler.draw(n, size, generator).expand(n, c, *size)
        keep = torch.where((torch.rand(n, generator=generator) < 0.5).view(n, *[1] * (1 + len(size))), own, shared)
        drop = torch.rand(n, generator=generator) < self.channel_drop
        which = torch.randint(c, (n,), generator=generator)
        whole = torch.ones(n, c, *[1] * len(size))
        whole[torch.arange(n), which] = 0.0
        return torch.where(drop.view(n, *[1] * (1 + len(size))), whole.expand_as(keep), keep).contiguous()

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep masks and noise for a batch ``x`` drawn from the own generator (on x's device)."""
        b, size = x.shape[0], x.shape[2:]
        keep = self.masks(b, size, self.rng).to(x.device)
        noise = torch.randn(b, self.generator.config["noise_channels"], *size, generator=self.rng).to(x.device)
        return keep, noise

    def train_step(self, x: torch.Tensor, grad_sync=None) -> dict[str, float]:
        """One D and one G update on images ``x`` (B, C, H, W) (signals (B, C, L) with ``dims=1``);
        returns the losses.

        ``grad_sync(module)``, if given, is called after each backward (e.g. to average gradients
        across DDP ranks)."""
        cfg = self.generator.config
        if x.dim() != cfg["dims"] + 2 or x.shape[1] != cfg["channels"]:
            raise ValueError(f"the inpainter expects {_DIMS[cfg['dims']].replace('C', str(cfg['channels']))}, "
                             f"got {tuple(x.shape)}")
        x = x.detach().to(self.device, torch.float32)
        keep, noise = self.sample(x)
        adversarial = self.steps >= self.warmup_steps and self.weights["adv"] > 0
        G, D = self.generator, self.discriminator
        G.train()
        D.train()
        k = cfg["hypotheses"]
        with grad_fp32():
            fakes, logits = G.proposals(x, keep, noise)              # (B, K, C, *S), (B, K)
            keep_k = keep.unsqueeze(1).expand(-1, k, *keep.shape[1:])
            fake, keep_all, x_all = fakes.flatten(0, 1), keep_k.flatten(0, 1), x.repeat_interleave(k, 0)
            comp = x_all * keep_all + fake * (1 - keep_all)
            losses = {}
            if adversarial:
                self.opt_d.zero_grad(set_to_none=True)
                loss_d = hinge_d_loss(D(x, keep), D(comp.detach(), keep_all))
                loss_d.backward()
                if grad_sync is not None:
                    grad_sync(D)
                self.opt_d.step()
                losses["loss_d"] = loss_d.item()
            self.opt_g.zero_grad(set_to_none=True)
            holes = (1 - keep_k).expand_as(fakes)
            error = ((fakes - x.unsqueeze(1)).abs() * holes).flatten(2).sum(2)   # (B, K) per proposal
            weight, chance = torch.ones_like(error), 0.0
            if k > 1:   # winner takes all, relaxed; the chance head learns which proposal wins
                winner = error.detach().argmin(1)
                weight = torch.full_like(error, RELAXATION / (k - 1))
                weight.scatter_(1, winner[:, None], 1 - RELAXATION)
                chance = F.cross_entropy(logits, winner)
                losses["chance"] = chance.item()
            hole = (weight * error).sum() / holes[:, 0].sum().clamp_min(1e-8)
            valid = masked_l1(fake, x_all, keep_all)
            loss_g = self.weights["hole"] * hole + self.weights["valid"] * valid + chance
            if adversarial:
                adv = hinge_g_loss(D(comp, keep_all))
                loss_g = loss_g + self.weights["adv"] * adv
                losses["loss_adv"] = adv.item()
            loss_g.backward()
            if grad_sync is not None:
                grad_sync(G)
            self.opt_g.step()
        self.steps += 1
        losses.update(loss_g=loss_g.item(), l1_hole=hole.item(), l1_valid=valid.item())
        return losses

    def infiller(self, seed: int = 0) -> "GANInfiller":
        """The current G as an infiller (shares G's parameters: it sees further training)."""
        return GANInfiller(self.generator, seed=seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "rng": self.rng.get_state(), "steps": self.steps, "generator_config": dict(self.generator.config)}

    def load_state_dict(self, state: dict) -> None:
        if _with_defaults(state.get("generator_config")) != self.generator.config:
            raise ValueError(f"the saved inpainter has generator config {state.get('generator_config')}, this one "
                             f"{self.generator.config}; construct it with the same channels/width/value_range")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.rng.set_state(state["rng"].cpu())
        self.steps = int(state["steps"])


def _with_defaults(config: dict | None) -> dict | None:
    """A generator config with the keys added after it was saved at their defaults (older files)."""
    return None if config is None else {"dims": 2, "per_channel": False, "hypotheses": 1, **config}


def save_generator(generator: InpaintGenerator, path: str | Path) -> Path:
    """Save G alone (its config and weights) to ``path``; load it with :func:`load_generator`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dict(generator.config), "state_dict": generator.state_dict()}, path)
    return path


def load_generator(path: str | Path, map_location: str | torch.device = "cpu") -> InpaintGenerator:
    """A G saved with :func:`save_generator`, in eval mode."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or "config" not in saved or "state_dict" not in saved:
        raise ValueError(f"{path} is not a generator saved with save_generator (needs 'config' and 'state_dict')")
    generator = InpaintGenerator(**_with_defaults(saved["config"]))
    generator.load_state_dict(saved["state_dict"])
    return generator.eval()


class GANInfiller(Infiller):
    """Fill removed pixels with a trained :class:`InpaintGenerator` (registered as ``gan``).

    The fill is G(x, keep, noise), composited into the kept pixels by :meth:`Infiller.__call__`;
    soft masks blend; a G of several proposals gives each sample one of them, drawn by its
    learned chance of being the closest. Noise (and that draw) comes from an own generator
    seeded with ``seed`` (one per device), so repeated calls draw fresh noise (Monte-Carlo
    samples) and a new infiller repeats them.
    Gradients flow to ``x`` and ``keep`` (mask-optimising explainers), never into G's ``.grad``
    when taken with ``torch.autograd.grad``.

    Args:
        generator: an :class:`InpaintGenerator`, or the path of one saved with :func:`save_generator`.
        seed: seed of the noise.
    """

    name = "gan"

    def __init__(self, generator: InpaintGenerator | str | Path | None = None, seed: int = 0):
        if generator is None:
            raise ValueError("the 'gan' infiller needs a trained generator: pass generator=<InpaintGenerator or "
                             "path saved with save_generator>, or train one with InpainterCallback")
        if isinstance(generator, (str, Path)):
            generator = load_generator(generator)
        if not isinstance(generator, InpaintGenerator):
            raise TypeError(f"generator must be an InpaintGenerator or a path, got {type(generator).__name__}")
        self.generator, self.seed = generator, seed
        self._rngs: dict[torch.device, torch.Generator] = {}

    def fill_masked(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        G = self.generator
        device = next(G.parameters()).device
        rng = self._rngs.get(x.device)
        if rng is None:
            rng = self._rngs[x.device] = torch.Generator(device=x.device).manual_seed(self.seed)
        noise = torch.randn(x.shape[0], G.config["noise_channels"], *x.shape[2:], generator=rng,
                            device=x.device, dtype=x.dtype)
        keep = keep.to(x.dtype).expand(x.shape[0], -1, *x.shape[2:])
        was_training = G.training
        G.eval()
        try:
            out, logits = G.proposals(x.to(device), keep.to(device), noise.to(device))
            head = torch.zeros(len(out), dtype=torch.long, device=device)
            if logits.shape[1] > 1:   # one proposal per sample, drawn by its chance of being the closest
                uniform = torch.rand(len(out), 1, generator=rng, device=x.device, dtype=logits.dtype).to(device)
                head = (logits.softmax(1).cumsum(1) < uniform).sum(1).clamp_max(logits.shape[1] - 1)
            out = out[torch.arange(len(out), device=device), head]
        finally:
            G.train(was_training)
        return out.to(x.device)

    def fill(self, x: torch.Tensor) -> torch.Tensor:
        return self.fill_masked(x, torch.zeros_like(x[:, :1]))


register_infiller("gan", GANInfiller)
