"""Counterfactual explainers: learn which evidence must be kept or removed, with any infiller.

* ``meaningful_perturbation`` (Fong & Vedaldi 2017): a low-resolution mask, upsampled and
  jittered, in the deletion game (smallest deletion that drops the target probability) or the
  preservation game (smallest kept region that holds it), with L1 and total-variation penalties.
* ``fido.ssr`` / ``fido.sdr`` (Chang et al. 2019, FIDO): a Bernoulli-concrete mask (temperature
  0.1) whose keep / drop probabilities are learned: the smallest sufficient region (kept part
  keeps the target log-probability) and the smallest destroying region (removed part destroys it).
* ``rde`` (MacDonald et al. 2019; Heiss et al. 2020): rate-distortion explanation on pre-softmax
  scores, distortion 0.5 (f_c(x) - f_c(z))^2 plus L1 on the kept mask; the mask relaxed to
  [0, 1] (``variant="relaxed"``), Bernoulli-concrete (``"concrete"``), or grown greedily by
  matching pursuit over few components (``"matching_pursuit"``). Masks act on pixels or on
  user-given component groups (``components``).

Removed evidence is filled through :mod:`xai_callbacks.infill`; ``infiller="auto"`` uses the GAN
inpainter while an :class:`~xai_callbacks.callbacks.inpainter.InpainterCallback` trains one, blur
otherwise. Everything is batched over samples and Monte-Carlo mask samples; masks and noise come
from an own generator seeded with ``mask_seed``. Gradients are taken with
``torch.autograd.grad`` w.r.t. the mask parameters only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import CheckedForward, register_method
from ..infill import Infiller
from ..infill.gan import resolve_infiller

__all__ = ["meaningful_perturbation", "fido_ssr", "fido_sdr", "rde", "MaskSpace"]

_OUTPUTS = ("logit", "log_probability", "probability")


def _target_scores(out: torch.Tensor, target: torch.Tensor, output: str) -> torch.Tensor:
    if output == "log_probability":
        out = out.log_softmax(dim=1)
    elif output == "probability":
        out = out.softmax(dim=1)
    return out.gather(1, target[:, None])[:, 0]


class MaskSpace:
    """Where a mask lives and how it becomes a keep mask shaped like ``x``.

    * ``components`` given: an integer tensor shaped like one sample (or broadcastable to it, e.g.
      (H, W) for images) with ids 0..K-1; the mask has K entries per sample, one per group.
    * else, images (B, C, H, W): one mask over pixels shared by the channels, at ``mask_size``
      (an int or (h, w); None: full resolution), bilinearly upsampled to (H, W).
    * else: one mask entry per input element.
    """

    def __init__(self, x: torch.Tensor, components: torch.Tensor | None = None,
                 mask_size: int | tuple[int, int] | None = None):
        self.sample_shape = tuple(x.shape[1:])
        self.groups = None
        if components is not None:
            comp = torch.as_tensor(components, device=x.device)
            if comp.is_floating_point() or comp.is_complex():
                raise ValueError(f"components must be an integer tensor of group ids, got dtype {comp.dtype}")
            try:
                comp = comp.expand(self.sample_shape)
            except RuntimeError:
                raise ValueError(f"components of shape {tuple(comp.shape)} cannot broadcast to one sample of shape "
                                 f"{self.sample_shape}") from None
            ids = comp.unique()
            if ids.min() < 0 or not torch.equal(ids, torch.arange(len(ids), device=x.device)):
                raise ValueError(f"component ids must be 0..K-1 with every id used; got ids {ids.tolist()[:20]}")
            self.groups = comp.reshape(-1).long()
            self.shape = (len(ids),)
        elif x.dim() == 4:
            h, w = x.shape[2:]
            if mask_size is None:
                mask_size = (h, w)
            elif isinstance(mask_size, int):
                mask_size = (mask_size, mask_size)
            if not (1 <= mask_size[0] <= h and 1 <= mask_size[1] <= w):
                raise ValueError(f"mask_size must be between 1 and the image size {(h, w)}, got {mask_size}")
            self.shape = (1, *mask_size)
            self.image_size = (h, w)
        else:
            if mask_size is not None:
                raise ValueError(f"mask_size applies to images (B, C, H, W); got input of shape {(-1, *self.sample_shape)}"
                                 "; pass components= to group elements")
            self.shape = self.sample_shape

    @property
    def size(self) -> int:
        """Number of mask entries per sample."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def expand(self, m: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Mask (N, *shape) -> keep mask broadcastable to (N, *sample_shape)."""
        if self.groups is not None:
            return m[:, self.groups].view(m.shape[0], *self.sample_shape)
        if len(self.shape) == 3 and hasattr(self, "image_size"):
            size = size or self.image_size
            if tuple(m.shape[2:]) == tuple(size):
                return m
            return F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        return m

    def relevance(self, m: torch.Tensor) -> torch.Tensor:
        """Mask (B, *shape) -> relevance shaped like x."""
        return self.expand(m).expand(m.shape[0], *self.sample_shape).contiguous()


def _total_variation(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample mean of |dm/dy|^beta + |dm/dx|^beta over a (B, 1, h, w) mask."""
    if m.dim() != 4 or min(m.shape[2:]) < 2:
        return m.new_zeros(m.shape[0])
    dy = (m[:, :, 1:, :] - m[:, :, :-1, :]).abs().pow(beta).flatten(1).mean(1)
    dx = (m[:, :, :, 1:] - m[:, :, :, :-1]).abs().pow(beta).flatten(1).mean(1)
    return dy + dx


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.repeat(n, *([1] * (t.dim() - 1)))


def _check_common(name: str, steps: int, lr: float, n_samples: int, output: str | None = None) -> None:
    if steps < 1 or n_samples < 1 or not lr > 0:
        raise ValueError(f"{name} needs steps >= 1, n_samples >= 1 and lr > 0; got steps={steps}, "
                         f"n_samples={n_samples}, lr={lr}")
    if output is not None and output not in _OUTPUTS:
        raise ValueError(f"{name} output must be one of {_OUTPUTS}, got {output!r}")


def _concrete(logits: torch.Tensor, temperature: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` relaxed Bernoulli(sigmoid(logits)) samples, stacked as (n * B, ...)."""
    u = torch.rand((n, *logits.shape), generator=gen, device=gen.device).to(logits.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    return s.reshape(n * logits.shape[0], *logits.shape[1:])


def _optimize(param: torch.Tensor, loss_fn, steps: int, lr: float, clamp: bool) -> torch.Tensor:
    """Adam on ``param`` (gradients by ``torch.autograd.grad``); clamps to [0, 1] if asked."""
    param = param.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    for _ in range(steps):
        (param.grad,) = torch.autograd.grad(loss_fn(param), [param])
        opt.step()
        if clamp:
            with torch.no_grad():
                param.clamp_(0, 1)
    return param.detach()


# ----------------------------------------------------------------------------- meaningful perturbation

@register_method("meaningful_perturbation")
def meaningful_perturbation(model, x, target, *, game: str = "deletion", infiller: str | Infiller = "auto",
                            steps: int = 50, lr: float = 0.1, l1: float = 0.5, tv: float = 0.2,
                            tv_beta: float = 3.0, mask_size: int | tuple[int, int] = 8, jitter: int = 2,
                            n_samples: int = 1, output: str = "probability", mask_seed: int = 0) -> torch.Tensor:
    """Meaningful perturbation (Fong & Vedaldi 2017) on images (B, C, H, W).

    A mask m in [0, 1] (1 = keep) at ``mask_size``, bilinearly upsampled and shifted by a random
    jitter of up to ``jitter`` pixels per Monte-Carlo sample, starts at 1 and is learned with Adam:

    * ``game="deletion"``: minimise ``l1`` * mean(1 - m) + ``tv`` * TV_beta(m) + E[score(x with 1 - m removed)];
      relevance = 1 - m (what must be deleted);
    * ``game="preservation"``: minimise ``l1`` * mean(m) + ``tv`` * TV_beta(m) - E[score(x with m kept)];
      relevance = m (what must be kept).

    Args:
        game: ``deletion`` or ``preservation``.
        infiller: fills removed pixels: a name, an Infiller, or ``auto`` (GAN if one is trained, else blur).
        steps: Adam steps; lr: Adam learning rate.
        l1: weight of the mask area term; tv: weight of the total variation; tv_beta: its exponent.
        mask_size: side (or (h, w)) of the learned mask before upsampling.
        jitter: maximum shift in pixels of the upsampled mask (0: none).
        n_samples: Monte-Carlo samples (jitter, infiller noise) per step.
        output: ``probability``, ``log_probability`` or ``logit`` of the target.
        mask_seed: seed of the own generator for jitter.
    """
    _check_common("meaningful_perturbation", steps, lr, n_samples, output)
    if game not in ("deletion", "preservation"):
        raise ValueError(f"meaningful_perturbation game must be 'deletion' or 'preservation', got {game!r}")
    if x.dim() != 4:
        raise ValueError(f"meaningful_perturbation needs images (B, C, H, W), got shape {tuple(x.shape)}")
    if jitter < 0:
        raise ValueError(f"meaningful_perturbation jitter must be >= 0, got {jitter}")
    space = MaskSpace(x, mask_size=mask_size)
    fill, forward = resolve_infiller(infiller), CheckedForward(model, target)
    gen = torch.Generator().manual_seed(mask_seed)
    b, (h, w) = x.shape[0], x.shape[2:]
    x_rep, t_rep = _repeat(x.detach(), n_samples), _repeat(target, n_samples)
    sign = 1.0 if game == "deletion" else -1.0

    def loss_fn(m):
        big = space.expand(m, size=(h + jitter, w + jitter))
        dy = torch.randint(0, jitter + 1, (n_samples,), generator=gen).tolist()
        dx = torch.randint(0, jitter + 1, (n_samples,), generator=gen).tolist()
        keep = torch.cat([big[:, :, a:a + h, c:c + w] for a, c in zip(dy, dx)])
        score = _target_scores(forward(fill(x_rep, keep)), t_rep, output).view(n_samples, b).mean(0)
        area = (1 - m) if game == "deletion" else m
        per_sample = sign * score + l1 * area.flatten(1).mean(1) + tv * _total_variation(m, tv_beta)
        return per_sample.sum()

    m = _optimize(torch.ones(b, *space.shape, device=x.device), loss_fn, steps, lr, clamp=True)
    return space.relevance(1 - m if game == "deletion" else m)


# ----------------------------------------------------------------------------- FIDO

def _fido(model, x, target, game, infiller, steps, lr, l1, tv, temperature, n_samples, mask_size, components,
          output, mask_seed):
    name = f"fido.{game}"
    _check_common(name, steps, lr, n_samples, output)
    if not temperature > 0:
        raise ValueError(f"{name} temperature must be > 0, got {temperature}")
    space = MaskSpace(x, components=components, mask_size=mask_size)
    fill, forward = resolve_infiller(infiller), CheckedForward(model, target)
    gen = torch.Generator().manual_seed(mask_seed)
    b = x.shape[0]
    x_rep, t_rep = _repeat(x.detach(), n_samples), _repeat(target, n_samples)

    def loss_fn(theta):
        s = _concrete(theta, temperature, n_samples, gen)      # 1 = selected region
        keep = space.expand(s if game == "ssr" else 1 - s)
        score = _target_scores(forward(fill(x_rep, keep)), t_rep, output).view(n_samples, b).mean(0)
        p = torch.sigmoid(theta)
        per_sample = (-score if game == "ssr" else score) + l1 * p.flatten(1).mean(1)
        if tv:
            per_sample = per_sample + tv * _total_variation(p, 2.0)
        return per_sample.sum()

    theta = _optimize(torch.zeros(b, *space.shape, device=x.device), loss_fn, steps, lr, clamp=False)
    return space.relevance(torch.sigmoid(theta))


@register_method("fido.ssr")
def fido_ssr(model, x, target, *, infiller: str | Infiller = "auto", steps: int = 50, lr: float = 0.1,
             l1: float = 2.0, tv: float = 0.0, temperature: float = 0.1, n_samples: int = 2,
             mask_size: int | tuple[int, int] | None = None, components: torch.Tensor | None = None,
             output: str = "log_probability", mask_seed: int = 0) -> torch.Tensor:
    """FIDO smallest sufficient region (Chang et al. 2019): learn keep probabilities p = sigmoid(theta)
    of a Bernoulli-concrete mask s (1 = keep) so that E[score(x with s kept, rest infilled)] stays
    high while ``l1`` * mean(p) (+ ``tv`` * TV(p)) stays small. Relevance = p.

    Args:
        infiller: fills the dropped part: a name, an Infiller, or ``auto`` (GAN if trained, else blur).
        steps: Adam steps on theta (initialised at p = 0.5); lr: Adam learning rate.
        l1: weight of the mean keep probability; tv: weight of the total variation of p (images).
        temperature: temperature of the concrete relaxation.
        n_samples: Monte-Carlo mask samples per step.
        mask_size: side (or (h, w)) of the mask for images, bilinearly upsampled; None: full size.
        components: integer group ids shaped like one sample (or broadcastable): one mask entry per group.
        output: ``log_probability``, ``probability`` or ``logit`` of the target.
        mask_seed: seed of the own generator for the concrete samples.
    """
    return _fido(model, x, target, "ssr", infiller, steps, lr, l1, tv, temperature, n_samples, mask_size,
                 components, output, mask_seed)


@register_method("fido.sdr")
def fido_sdr(model, x, target, *, infiller: str | Infiller = "auto", steps: int = 50, lr: float = 0.1,
             l1: float = 2.0, tv: float = 0.0, temperature: float = 0.1, n_samples: int = 2,
             mask_size: int | tuple[int, int] | None = None, components: torch.Tensor | None = None,
             output: str = "log_probability", mask_seed: int = 0) -> torch.Tensor:
    """FIDO smallest destroying region (Chang et al. 2019): learn drop probabilities p = sigmoid(theta)
    of a Bernoulli-concrete mask s (1 = drop) so that E[score(x with s infilled)] falls while
    ``l1`` * mean(p) (+ ``tv`` * TV(p)) stays small. Relevance = p. Arguments as in ``fido.ssr``."""
    return _fido(model, x, target, "sdr", infiller, steps, lr, l1, tv, temperature, n_samples, mask_size,
                 components, output, mask_seed)


# ----------------------------------------------------------------------------- RDE

@register_method("rde")
def rde(model, x, target, *, variant: str = "relaxed", infiller: str | Infiller = "auto", steps: int = 50,
        lr: float | None = None, l1: float = 1.0, temperature: float = 0.1, n_samples: int = 2,
        mask_size: int | tuple[int, int] | None = None, components: torch.Tensor | None = None,
        max_components: int = 8, perturbation_batch: int = 512, mask_seed: int = 0) -> torch.Tensor:
    """Rate-distortion explanation (MacDonald et al. 2019; Heiss et al. 2020) on pre-softmax scores.

    Distortion D(s) = 0.5 E[(f_c(x) - f_c(z))^2] with z = x on the kept part (s = 1) and infilled
    elsewhere; the rate is the mask's L1 norm (per-sample mean, weight ``l1``).

    * ``variant="relaxed"``: s in [0, 1], initialised at 1, Adam with clamping; relevance = s.
    * ``variant="concrete"``: s ~ Bernoulli-concrete(sigmoid(theta), ``temperature``); relevance = sigmoid(theta).
    * ``variant="matching_pursuit"``: s binary, grown greedily: each round adds the component whose
      addition lowers the distortion most, for ``max_components`` rounds (every component is
      tested each round, so use it with few components: ``components`` or a small ``mask_size``).
      Relevance of a chosen component = the distortion it removed when added; 0 for the others.

    To explain in a transformed domain (e.g. magnitude and phase of a spectrum), explain the
    model composed with the inverse transform on the transformed input, and pass the groups as
    ``components``.

    Args:
        variant: ``relaxed``, ``concrete`` or ``matching_pursuit``.
        infiller: fills the dropped part: a name, an Infiller, or ``auto`` (GAN if trained, else blur).
        steps: Adam steps (relaxed / concrete); lr: Adam learning rate (None: 0.05 on s for relaxed,
            0.5 on theta for concrete).
        l1: weight of the rate term (relaxed / concrete).
        temperature: temperature of the concrete relaxation.
        n_samples: Monte-Carlo samples of the infiller (and concrete mask) per evaluation.
        mask_size: side (or (h, w)) of the mask for images, bilinearly upsampled; None: full size.
        components: integer group ids shaped like one sample (or broadcastable): one mask entry per group.
        max_components: matching pursuit: how many components to add.
        perturbation_batch: matching pursuit: inputs per forward pass.
        mask_seed: seed of the own generator for concrete samples.
    """
    lr = lr if lr is not None else (0.5 if variant == "concrete" else 0.05)
    _check_common("rde", steps, lr, n_samples)
    if variant not in ("relaxed", "concrete", "matching_pursuit"):
        raise ValueError(f"rde variant must be 'relaxed', 'concrete' or 'matching_pursuit', got {variant!r}")
    space = MaskSpace(x, components=components, mask_size=mask_size)
    fill, forward = resolve_infiller(infiller), CheckedForward(model, target)
    b = x.shape[0]
    with torch.no_grad():
        reference = _target_scores(forward(x), target, "logit")
    if variant == "matching_pursuit":
        return _matching_pursuit(forward, fill, space, x, target, reference, n_samples, max_components,
                                 perturbation_batch)
    if not temperature > 0:
        raise ValueError(f"rde temperature must be > 0, got {temperature}")
    gen = torch.Generator().manual_seed(mask_seed)
    x_rep, t_rep, ref_rep = _repeat(x.detach(), n_samples), _repeat(target, n_samples), _repeat(reference, n_samples)

    def distortion(keep_param):
        keep = space.expand(keep_param)
        scores = _target_scores(forward(fill(x_rep, keep)), t_rep, "logit")
        return (0.5 * (ref_rep - scores) ** 2).view(n_samples, b).mean(0)

    if variant == "relaxed":
        def loss_fn(s):
            return (distortion(_repeat(s, n_samples)) + l1 * s.flatten(1).mean(1)).sum()

        s = _optimize(torch.ones(b, *space.shape, device=x.device), loss_fn, steps, lr, clamp=True)
        return space.relevance(s)

    def loss_fn(theta):
        p = torch.sigmoid(theta)
        return (distortion(_concrete(theta, temperature, n_samples, gen)) + l1 * p.flatten(1).mean(1)).sum()

    theta = _optimize(torch.full((b, *space.shape), 2.0, device=x.device), loss_fn, steps, lr, clamp=False)
    return space.relevance(torch.sigmoid(theta))


def _matching_pursuit(forward, fill, space, x, target, reference, n_samples, max_components, perturbation_batch):
    k = space.size
    if k > 256:
        raise ValueError(f"rde matching pursuit tests every one of the {k} mask entries per round; pass "
                         "components= or a small mask_size (at most 256 entries)")
    if max_components < 1:
        raise ValueError(f"rde max_components must be >= 1, got {max_components}")
    b = x.shape[0]
    selected = torch.zeros(b, k, dtype=torch.bool, device=x.device)
    gain = torch.zeros(b, k, device=x.device)
    eye = torch.eye(k, dtype=torch.bool, device=x.device)

    def distortion(sel):  # sel (N, B, K) bool -> (N, B)
        n = sel.shape[0]
        flat = sel.reshape(n * b, k)
        idx = torch.arange(b, device=x.device).repeat(n)
        out = torch.empty(n_samples, n * b, device=x.device)
        with torch.no_grad():
            for r in range(n_samples):
                for start in range(0, n * b, perturbation_batch):
                    part = slice(start, start + perturbation_batch)
                    keep = space.expand(flat[part].float().view(-1, *space.shape))
                    scores = _target_scores(forward(fill(x[idx[part]], keep)), target[idx[part]], "logit")
                    out[r, part] = 0.5 * (reference[idx[part]] - scores) ** 2
        return out.mean(0).view(n, b)

    current = distortion(selected[None])[0]
    for _ in range(min(max_components, k)):
        candidates = selected[None] | eye[:, None, :]               # (K, B, K): add component j
        d = distortion(candidates)                                   # (K, B)
        d = d.masked_fill(selected.T, float("inf"))
        best = d.argmin(0)                                           # (B,)
        rows = torch.arange(b, device=x.device)
        gain[rows, best] = current - d[best, rows]
        selected[rows, best] = True
        current = d[best, rows]
    return space.relevance(gain.view(b, *space.shape))
