"""GAN inpainter: fill removed evidence with plausible content instead of grey, noise or blur.

Pieces (Chang et al. 2019, FIDO; Heiss et al. 2020; SN-PatchGAN of Yu et al. 2019):

* :class:`InpaintGenerator` G(x, keep, noise): a small U-Net that sees the kept pixels, the mask
  and a noise channel; its output is composited into the known pixels by the infiller.
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


def _conv(cin: int, cout: int, dilation: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.LeakyReLU(0.2))


class InpaintGenerator(nn.Module):
    """U-Net G(x, keep, noise) -> an image shaped like ``x`` (the content proposed for the holes).

    Two stride-2 downsamplings, dilated convolutions at the bottleneck, skip connections; no
    normalisation layers (so eval and train mode compute the same). Inputs of any size are padded
    to a multiple of 4 and cropped back.

    Args:
        channels: channels of the images.
        width: channels of the first level (doubled at each downsampling).
        noise_channels: channels of the noise input.
        value_range: ``(low, high)`` of the data; the output is squashed into it with a sigmoid.
            None leaves the output unbounded.
    """

    def __init__(self, channels: int = 1, width: int = 16, noise_channels: int = 1,
                 value_range: tuple[float, float] | None = None):
        super().__init__()
        if channels < 1 or width < 1 or noise_channels < 0:
            raise ValueError(f"InpaintGenerator needs channels >= 1, width >= 1, noise_channels >= 0; got "
                             f"channels={channels}, width={width}, noise_channels={noise_channels}")
        if value_range is not None and not value_range[1] > value_range[0]:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.config = {"channels": channels, "width": width, "noise_channels": noise_channels,
                       "value_range": None if value_range is None else tuple(map(float, value_range))}
        w = width
        self.enc1 = _conv(channels + 1 + noise_channels, w)
        self.enc2 = nn.Sequential(_conv(w, 2 * w, stride=2), _conv(2 * w, 2 * w))
        self.enc3 = _conv(2 * w, 4 * w, stride=2)
        self.mid = nn.Sequential(_conv(4 * w, 4 * w, dilation=2), _conv(4 * w, 4 * w, dilation=4))
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv(2 * w + w, w)
        self.out = nn.Conv2d(w, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x (B, C, H, W); keep (B, 1 or C, H, W) in [0, 1], 1 = known pixel;
        noise (B, noise_channels, H, W) or None (zeros)."""
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg["channels"]:
            raise ValueError(f"InpaintGenerator was built for {cfg['channels']} channels: expects images "
                             f"(B, {cfg['channels']}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        keep = keep.to(x.dtype).expand(b, -1, h, w)
        mask = keep.mean(dim=1, keepdim=True)
        if noise is None:
            noise = x.new_zeros(b, cfg["noise_channels"], h, w)
        inp = torch.cat([x * keep, mask, noise], dim=1)
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            inp = F.pad(inp, (0, pw, 0, ph), mode="replicate")
        e1 = self.enc1(inp)
        e2 = self.enc2(e1)
        e3 = self.mid(self.enc3(e2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, size=e2.shape[2:], mode="nearest"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode="nearest"), e1], dim=1))
        out = self.out(d1)[:, :, :h, :w]
        if cfg["value_range"] is not None:
            low, high = cfg["value_range"]
            out = low + (high - low) * torch.sigmoid(out)
        return out


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN discriminator: spectrally normalised stride-2 convolutions on (image, hole mask);
    returns a map of patch scores (B, 1, h, w), each scored with the hinge loss.

    Args:
        channels: channels of the images.
        width: channels of the first layer (doubled per layer, at most 8x).
        n_layers: number of stride-2 layers.
    """

    def __init__(self, channels: int = 1, width: int = 16, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator n_layers must be >= 1, got {n_layers}")
        layers, cin = [], channels + 1
        for i in range(n_layers):
            cout = width * min(2 ** i, 8)
            layers += [spectral_norm(nn.Conv2d(cin, cout, 5, stride=2, padding=2)), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(spectral_norm(nn.Conv2d(cin, 1, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hole = 1 - keep.to(x.dtype).expand(x.shape[0], -1, *x.shape[2:]).mean(dim=1, keepdim=True)
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

    A drawn mask that keeps nothing is replaced by a ``box`` mask.

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

    :meth:`train_step` takes a batch of images (detached here), draws keep masks and noise from the
    own generator, and does one D and one G update: G minimises ``hole_weight`` * L1 on the holes
    + ``valid_weight`` * L1 on the kept pixels (of its raw output) + ``adv_weight`` * hinge loss,
    the adversarial terms starting after ``warmup_steps`` L1-only steps.

    Args:
        channels: image channels.
        width: base width of G and D.
        value_range: (low, high) of the data for G's output, or None.
        noise_channels: channels of G's noise input.
        lr_g, lr_d: Adam learning rates of G and D (betas (0.5, 0.9)).
        hole_weight, valid_weight, adv_weight: loss weights.
        warmup_steps: steps of L1-only training before the adversarial terms start.
        mask_sampler: the :class:`MaskSampler` (default: the full mixture).
        seed: seeds the parameters' initialisation and the own generator (masks, noise).
        device: where G and D live.
    """

    def __init__(self, channels: int = 1, width: int = 16, value_range: tuple[float, float] | None = None,
                 noise_channels: int = 1, lr_g: float = 2e-3, lr_d: float = 2e-3, hole_weight: float = 1.0,
                 valid_weight: float = 0.2, adv_weight: float = 0.01, warmup_steps: int = 200,
                 mask_sampler: MaskSampler | None = None, seed: int = 0, device: torch.device | str = "cpu"):
        for name, v in (("lr_g", lr_g), ("lr_d", lr_d)):
            if not v > 0:
                raise ValueError(f"GANInpainter {name} must be > 0, got {v}")
        for name, v in (("hole_weight", hole_weight), ("valid_weight", valid_weight), ("adv_weight", adv_weight),
                        ("warmup_steps", warmup_steps)):
            if v < 0:
                raise ValueError(f"GANInpainter {name} must be >= 0, got {v}")
        with rng_guard(seed):  # initialisation draws do not touch the global RNG streams
            self.generator = InpaintGenerator(channels, width, noise_channels, value_range).to(device)
            self.discriminator = PatchDiscriminator(channels, width).to(device)
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

    def sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep masks and noise for a batch ``x`` drawn from the own generator (on x's device)."""
        b, _, h, w = x.shape
        keep = self.mask_sampler(b, h, w, self.rng).to(x.device)
        noise = torch.randn(b, self.generator.config["noise_channels"], h, w, generator=self.rng).to(x.device)
        return keep, noise

    def train_step(self, x: torch.Tensor, grad_sync=None) -> dict[str, float]:
        """One D and one G update on images ``x`` (B, C, H, W); returns the losses.

        ``grad_sync(module)``, if given, is called after each backward (e.g. to average gradients
        across DDP ranks)."""
        if x.dim() != 4 or x.shape[1] != self.generator.config["channels"]:
            raise ValueError(f"the inpainter expects images (B, {self.generator.config['channels']}, H, W), "
                             f"got {tuple(x.shape)}")
        x = x.detach().to(self.device, torch.float32)
        keep, noise = self.sample(x)
        adversarial = self.steps >= self.warmup_steps and self.weights["adv"] > 0
        G, D = self.generator, self.discriminator
        G.train()
        D.train()
        with grad_fp32():
            fake = G(x, keep, noise)
            comp = x * keep + fake * (1 - keep)
            losses = {}
            if adversarial:
                self.opt_d.zero_grad(set_to_none=True)
                loss_d = hinge_d_loss(D(x, keep), D(comp.detach(), keep))
                loss_d.backward()
                if grad_sync is not None:
                    grad_sync(D)
                self.opt_d.step()
                losses["loss_d"] = loss_d.item()
            self.opt_g.zero_grad(set_to_none=True)
            hole = masked_l1(fake, x, 1 - keep)
            valid = masked_l1(fake, x, keep)
            loss_g = self.weights["hole"] * hole + self.weights["valid"] * valid
            if adversarial:
                adv = hinge_g_loss(D(comp, keep))
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
        if state.get("generator_config") != self.generator.config:
            raise ValueError(f"the saved inpainter has generator config {state.get('generator_config')}, this one "
                             f"{self.generator.config}; construct it with the same channels/width/value_range")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.rng.set_state(state["rng"].cpu())
        self.steps = int(state["steps"])


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
    cfg = dict(saved["config"])
    generator = InpaintGenerator(**cfg)
    generator.load_state_dict(saved["state_dict"])
    return generator.eval()


class GANInfiller(Infiller):
    """Fill removed pixels with a trained :class:`InpaintGenerator` (registered as ``gan``).

    The fill is G(x, keep, noise), composited into the kept pixels by :meth:`Infiller.__call__`;
    soft masks blend. Noise comes from an own generator seeded with ``seed`` (one per device), so
    repeated calls draw fresh noise (Monte-Carlo samples) and a new infiller repeats them.
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
            out = G(x.to(device), keep.to(device), noise.to(device))
        finally:
            G.train(was_training)
        return out.to(x.device)

    def fill(self, x: torch.Tensor) -> torch.Tensor:
        return self.fill_masked(x, torch.zeros_like(x[:, :1]))


register_infiller("gan", GANInfiller)
