"""Counterfactual explainers: learn which evidence must be kept or removed, with any infiller.

* ``meaningful_perturbation`` (Fong & Vedaldi 2017): a low-resolution mask, upsampled and
  jittered, in the deletion game (smallest deletion that drops the target probability) or the
  preservation game (smallest kept region that holds it), with L1 and total-variation penalties.
* ``fido.ssr`` / ``fido.sdr`` (Chang et al. 2019, FIDO): a Bernoulli-concrete mask (temperature
  0.1) whose keep / drop probabilities are learned: the smallest sufficient region (kept part
  keeps the target log-probability) and the smallest destroying region (removed part destroys it).
* ``rde`` (MacDonald et al. 2019; Heiss et al. 2020): rate-distortion explanation on pre-softmax
  scores, distortion 0.5 (f_c(x) - f_c(z))^2 plus L1 on the kept mask; the mask relaxed to
  [0, 1] (``variant="relaxed"``), Bernoulli-concrete (``"concrete"``), grown greedily by
  matching pursuit over few components (``"matching_pursuit"``), or binary and exact over at most
  ten (``"exhaustive"``). Masks act on pixels or on
  user-given component groups (``components``; ``"channels"``: one entry per channel,
  ``"elements"``: one per input element). ``shared=True`` optimises one mask for the whole batch
  (the class-wise query of Heiss et al.: pass the samples of one class).

Inputs are images (B, C, H, W) or signals (B, C, L) (a mask over positions shared by the
channels, optionally at a lower resolution ``mask_size`` and upsampled), or any shape with one
mask entry per element (tabular rows (B, F)) or per ``components`` group. Removed evidence is
filled through :mod:`xai_callbacks.infill`; ``infiller="auto"`` is blur unless an Infiller is
passed (the callbacks pass the GAN an :class:`~xai_callbacks.callbacks.inpainter.InpainterCallback`
trains). Targets are scored by :func:`~xai_callbacks.scoring.target_scores` (class indices or a
target function). Everything is batched over samples and Monte-Carlo mask samples; masks and
noise come from an own generator seeded with ``seed``. Gradients are taken with
``torch.autograd.grad`` w.r.t. the mask parameters only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register_method
from ..infill import Infiller, get_infiller
from ..scoring import score_perturbed, target_scores

__all__ = ["meaningful_perturbation", "fido_ssr", "fido_sdr", "rde", "MaskSpace"]

_OUTPUTS = ("logit", "log_probability", "probability")
RDE_VARIANTS = ("relaxed", "concrete", "matching_pursuit", "exhaustive")
MAX_EXHAUSTIVE = 10     # rde variant "exhaustive" tries all 2^K masks of K <= this many entries


def linear_resize(m: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *size), (bi)linear as ``F.interpolate(..., align_corners=False)``,
    as one matrix product per axis: the same values, and a backward pass that is deterministic on
    CUDA (``interpolate``'s has no deterministic kernel: a mask optimised under
    ``Trainer(deterministic=True)`` on a GPU would raise)."""
    for d, n in enumerate(size):
        dim = 2 + d
        if m.shape[dim] != n:
            unit = torch.eye(m.shape[dim], device=m.device, dtype=m.dtype)[:, None]
            weights = F.interpolate(unit, size=n, mode="linear", align_corners=False)[:, 0]   # (in, out)
            m = (m.movedim(dim, -1) @ weights).movedim(-1, dim)
    return m


class MaskSpace:
    """Where a mask lives and how it becomes a keep mask shaped like ``x``.

    * ``components`` given: an integer tensor shaped like one sample (or broadcastable to it, e.g.
      (H, W) for images) with ids 0..K-1; the mask has K entries per sample, one per group.
      ``"channels"``: one group per channel (e.g. the magnitude and the phase of a spectrum);
      ``"elements"``: one group per element of a sample (e.g. each frequency bin of each channel).
    * else, images (B, C, H, W) or signals (B, C, L): one mask over positions shared by the
      channels, at ``mask_size`` (an int, or (h, w) for images; None: full resolution), upsampled
      (bilinear / linear) to the input's positions.
    * else (tabular rows (B, F), ...): one mask entry per input element.

    Args:
        x: the explained batch.
        components: optional group ids, see above.
        mask_size: optional mask resolution for images and signals.

    Raises:
        ValueError: bad components, or a ``mask_size`` that does not fit the input.
    """

    def __init__(self, x: torch.Tensor, components: torch.Tensor | str | None = None,
                 mask_size: int | tuple[int, int] | None = None):
        self.sample_shape = tuple(x.shape[1:])
        self.groups = None
        self.positions: tuple[int, ...] | None = None  # upsampled to these (images, signals)
        if isinstance(components, str):
            components = _named_components(components, self.sample_shape)
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
        elif x.dim() in (3, 4):
            size = tuple(x.shape[2:])
            if mask_size is None:
                mask_size = size
            elif isinstance(mask_size, int):
                mask_size = (mask_size,) * len(size)
            mask_size = tuple(mask_size)
            if len(mask_size) != len(size) or not all(1 <= m <= n for m, n in zip(mask_size, size)):
                raise ValueError(f"mask_size must be between 1 and the input's positions {size}, got {mask_size}")
            self.shape = (1, *mask_size)
            self.positions = size
        else:
            if mask_size is not None:
                raise ValueError(f"mask_size applies to images (B, C, H, W) and signals (B, C, L); got input of shape "
                                 f"{(-1, *self.sample_shape)}; pass components= to group elements")
            self.shape = self.sample_shape

    @property
    def size(self) -> int:
        """Number of mask entries per sample."""
        n = 1
        for s in self.shape:
            n *= s
        return n

    def expand(self, m: torch.Tensor, size: tuple[int, ...] | None = None) -> torch.Tensor:
        """Mask (N, *shape) -> keep mask broadcastable to (N, *sample_shape) (or to ``size``
        positions, for jitter)."""
        if self.groups is not None:
            return m[:, self.groups].view(m.shape[0], *self.sample_shape)
        if self.positions is not None:
            size = tuple(size or self.positions)
            if tuple(m.shape[2:]) == size:
                return m
            return linear_resize(m, size)
        return m

    def relevance(self, m: torch.Tensor) -> torch.Tensor:
        """Mask (B, *shape) -> relevance shaped like x."""
        return self.expand(m).expand(m.shape[0], *self.sample_shape).contiguous()


COMPONENTS = ("channels", "elements")


def _named_components(name: str, sample_shape: tuple[int, ...]) -> torch.Tensor:
    """Group ids for a named grouping of one sample's elements (see :class:`MaskSpace`)."""
    if name == "channels":
        if len(sample_shape) < 2:
            raise ValueError(f"components='channels' needs inputs with a channel axis (B, C, ...), got one sample of "
                             f"shape {sample_shape}")
        return torch.arange(sample_shape[0]).view(-1, *[1] * (len(sample_shape) - 1)).expand(sample_shape)
    if name == "elements":
        n = 1
        for d in sample_shape:
            n *= d
        return torch.arange(n).view(sample_shape)
    raise ValueError(f"components must be a tensor of group ids or one of {COMPONENTS}, got {name!r}")


def _total_variation(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample mean of |dm/dy|^beta + |dm/dx|^beta over a (B, 1, h, w) mask (|dm/dt|^beta
    over a (B, 1, l) signal mask); 0 for other masks."""
    if m.dim() not in (3, 4) or min(m.shape[2:]) < 2:
        return m.new_zeros(m.shape[0])
    total = m.new_zeros(m.shape[0])
    for axis in range(2, m.dim()):
        total = total + m.diff(dim=axis).abs().pow(beta).flatten(1).mean(1)
    return total


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

@register_method("meaningful_perturbation", target_functions=True)
def meaningful_perturbation(model, x, target, *, game: str = "deletion", infiller: str | Infiller = "auto",
                            steps: int = 50, lr: float = 0.1, l1: float = 0.5, tv: float = 0.2,
                            tv_beta: float = 3.0, mask_size: int | tuple[int, int] = 8, jitter: int = 2,
                            n_samples: int = 1, output: str = "probability", seed: int = 0) -> torch.Tensor:
    """Meaningful perturbation (Fong & Vedaldi 2017) on images (B, C, H, W) or signals (B, C, L).

    A mask m in [0, 1] (1 = keep) at ``mask_size``, upsampled and shifted by a random jitter of up
    to ``jitter`` positions per axis and Monte-Carlo sample, starts at 1 and is learned with Adam:

    * ``game="deletion"``: minimise ``l1`` * mean(1 - m) + ``tv`` * TV_beta(m) + E[score(x with 1 - m removed)];
      relevance = 1 - m (what must be deleted);
    * ``game="preservation"``: minimise ``l1`` * mean(m) + ``tv`` * TV_beta(m) - E[score(x with m kept)];
      relevance = m (what must be kept).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        game: ``deletion`` or ``preservation``.
        infiller: fills removed positions: a name, an Infiller, or ``auto`` (blur unless the GAN is passed).
        steps: Adam steps; lr: Adam learning rate.
        l1: weight of the mask area term; tv: weight of the total variation; tv_beta: its exponent.
        mask_size: side (or (h, w)) of the learned mask before upsampling (clipped to the input).
        jitter: maximum shift in positions of the upsampled mask (0: none).
        n_samples: Monte-Carlo samples (jitter, infiller noise) per step.
        output: ``probability``, ``log_probability`` or ``logit`` of a class target.
        seed: seed of the own generator for jitter.

    Raises:
        ValueError: bad options, or an input that is not images or signals.

    Example: ``explain(model, x, y, method="meaningful_perturbation", game="preservation", mask_size=8)``.
    """
    _check_common("meaningful_perturbation", steps, lr, n_samples, output)
    if game not in ("deletion", "preservation"):
        raise ValueError(f"meaningful_perturbation game must be 'deletion' or 'preservation', got {game!r}")
    if x.dim() not in (3, 4):
        raise ValueError(f"meaningful_perturbation needs images (B, C, H, W) or signals (B, C, L), got shape "
                         f"{tuple(x.shape)}; for tabular rows use fido.ssr, fido.sdr or rde")
    if jitter < 0:
        raise ValueError(f"meaningful_perturbation jitter must be >= 0, got {jitter}")
    size = tuple(x.shape[2:])
    if isinstance(mask_size, int):
        mask_size = tuple(min(mask_size, n) for n in size)
    space = MaskSpace(x, mask_size=mask_size)
    fill = get_infiller(infiller)
    gen = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    x_rep = _repeat(x.detach(), n_samples)
    sign = 1.0 if game == "deletion" else -1.0

    def loss_fn(m):
        big = space.expand(m, size=tuple(n + jitter for n in size))
        shifts = [torch.randint(0, jitter + 1, (n_samples,), generator=gen).tolist() for _ in size]
        keep = torch.cat([big[(slice(None), slice(None), *(slice(s[k], s[k] + n) for s, n in zip(shifts, size)))]
                          for k in range(n_samples)])
        score = target_scores(model(fill(x_rep, keep)), target, output).view(n_samples, b).mean(0)
        area = (1 - m) if game == "deletion" else m
        per_sample = sign * score + l1 * area.flatten(1).mean(1) + tv * _total_variation(m, tv_beta)
        return per_sample.sum()

    m = _optimize(torch.ones(b, *space.shape, device=x.device), loss_fn, steps, lr, clamp=True)
    return space.relevance(1 - m if game == "deletion" else m)


# ----------------------------------------------------------------------------- FIDO

def _fido(model, x, target, *, game: str, infiller, steps: int, lr: float, l1: float, tv: float,
          temperature: float, n_samples: int, mask_size, components, output: str, seed: int) -> torch.Tensor:
    """FIDO's two games (``game``: ``ssr`` or ``sdr``); arguments as in :func:`fido_ssr`."""
    name = f"fido.{game}"
    _check_common(name, steps, lr, n_samples, output)
    if not temperature > 0:
        raise ValueError(f"{name} temperature must be > 0, got {temperature}")
    space = MaskSpace(x, components=components, mask_size=mask_size)
    fill = get_infiller(infiller)
    gen = torch.Generator().manual_seed(seed)
    b = x.shape[0]
    x_rep = _repeat(x.detach(), n_samples)

    def loss_fn(theta):
        s = _concrete(theta, temperature, n_samples, gen)      # 1 = selected region
        keep = space.expand(s if game == "ssr" else 1 - s)
        score = target_scores(model(fill(x_rep, keep)), target, output).view(n_samples, b).mean(0)
        p = torch.sigmoid(theta)
        per_sample = (-score if game == "ssr" else score) + l1 * p.flatten(1).mean(1)
        if tv:
            per_sample = per_sample + tv * _total_variation(p, 2.0)
        return per_sample.sum()

    theta = _optimize(torch.zeros(b, *space.shape, device=x.device), loss_fn, steps, lr, clamp=False)
    return space.relevance(torch.sigmoid(theta))


@register_method("fido.ssr", target_functions=True)
def fido_ssr(model, x, target, *, infiller: str | Infiller = "auto", steps: int = 50, lr: float = 0.1,
             l1: float = 2.0, tv: float = 0.0, temperature: float = 0.1, n_samples: int = 2,
             mask_size: int | tuple[int, int] | None = None, components: torch.Tensor | None = None,
             output: str = "log_probability", seed: int = 0) -> torch.Tensor:
    """FIDO smallest sufficient region (Chang et al. 2019): learn keep probabilities p = sigmoid(theta)
    of a Bernoulli-concrete mask s (1 = keep) so that E[score(x with s kept, rest infilled)] stays
    high while ``l1`` * mean(p) (+ ``tv`` * TV(p)) stays small. Relevance = p. Images, signals,
    tabular rows (one entry per feature) or ``components`` groups.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        infiller: fills the dropped part: a name, an Infiller, or ``auto`` (blur unless the GAN is passed).
        steps: Adam steps on theta (initialised at p = 0.5); lr: Adam learning rate.
        l1: weight of the mean keep probability; tv: weight of the total variation of p (images, signals).
        temperature: temperature of the concrete relaxation.
        n_samples: Monte-Carlo mask samples per step.
        mask_size: side (or (h, w)) of the mask for images / length for signals, upsampled; None: full size.
        components: integer group ids shaped like one sample (or broadcastable): one mask entry per group.
        output: ``log_probability``, ``probability`` or ``logit`` of a class target.
        seed: seed of the own generator for the concrete samples.

    Raises:
        ValueError: ``steps`` or ``n_samples`` < 1, ``lr`` or ``temperature`` <= 0, an unknown
            ``output``, bad ``components`` or ``mask_size``, an unknown ``infiller`` (the message
            names the valid ones).

    Example: ``explain(model, x, y, method="fido.ssr", l1=2.0, mask_size=8)``.
    """
    return _fido(model, x, target, game="ssr", infiller=infiller, steps=steps, lr=lr, l1=l1, tv=tv,
                 temperature=temperature, n_samples=n_samples, mask_size=mask_size, components=components,
                 output=output, seed=seed)


@register_method("fido.sdr", target_functions=True)
def fido_sdr(model, x, target, *, infiller: str | Infiller = "auto", steps: int = 50, lr: float = 0.1,
             l1: float = 2.0, tv: float = 0.0, temperature: float = 0.1, n_samples: int = 2,
             mask_size: int | tuple[int, int] | None = None, components: torch.Tensor | None = None,
             output: str = "log_probability", seed: int = 0) -> torch.Tensor:
    """FIDO smallest destroying region (Chang et al. 2019): learn drop probabilities p = sigmoid(theta)
    of a Bernoulli-concrete mask s (1 = drop) so that E[score(x with s infilled)] falls while
    ``l1`` * mean(p) (+ ``tv`` * TV(p)) stays small. Relevance = p. Arguments and errors as in
    ``fido.ssr``.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        infiller, steps, lr, l1, tv, temperature, n_samples, mask_size, components, output, seed: as
            in ``fido.ssr``.

    Raises:
        ValueError: as in ``fido.ssr``.

    Example: ``explain(model, x, y, method="fido.sdr", l1=1.0, steps=100)``.
    """
    return _fido(model, x, target, game="sdr", infiller=infiller, steps=steps, lr=lr, l1=l1, tv=tv,
                 temperature=temperature, n_samples=n_samples, mask_size=mask_size, components=components,
                 output=output, seed=seed)


# ----------------------------------------------------------------------------- RDE

@register_method("rde", target_functions=True)
def rde(model, x, target, *, variant: str = "relaxed", infiller: str | Infiller = "auto", steps: int = 50,
        lr: float | None = None, l1: float = 1.0, temperature: float = 0.1, n_samples: int = 2,
        mask_size: int | tuple[int, int] | None = None, components: torch.Tensor | str | None = None,
        max_components: int = 8, batch_size: int = 512, shared: bool = False, seed: int = 0) -> torch.Tensor:
    """Rate-distortion explanation (MacDonald et al. 2019; Heiss et al. 2020) on pre-softmax scores.

    Distortion D(s) = 0.5 E[(f_c(x) - f_c(z))^2] with z = x on the kept part (s = 1) and infilled
    elsewhere; the rate is the mask's L1 norm (per-sample mean, weight ``l1``). ``f_c`` is the
    target's logit, or a target function's score.

    * ``variant="relaxed"``: s in [0, 1], initialised at 1, Adam with clamping; relevance = s.
    * ``variant="concrete"``: s ~ Bernoulli-concrete(sigmoid(theta), ``temperature``); relevance = sigmoid(theta).
    * ``variant="matching_pursuit"``: s binary, grown greedily: each round adds the component whose
      addition lowers the distortion most, for ``max_components`` rounds (every component is
      tested each round, so use it with few components: ``components`` or a small ``mask_size``).
      Relevance of a chosen component = the distortion it removed when added; 0 for the others.
    * ``variant="exhaustive"``: s binary, the exact minimiser of distortion + rate over all 2^K
      masks of K <= 10 entries (each distortion averaged over ``n_samples`` fills). For a few
      components, e.g. the class-wise magnitude-vs-phase query, where the concrete relaxation's
      noisy gradients can settle on either of two nearly equal masks. Relevance = the binary mask.

    To explain in a transformed domain (e.g. magnitude and phase of a spectrum), explain the
    model composed with the inverse transform on the transformed input, and pass the groups as
    ``components``.

    ``shared=True`` (not matching pursuit): one mask for the whole batch, minimising the batch's mean
    distortion plus the rate: which components a set of samples (e.g. all samples of a class)
    relies on. With ``components="channels"`` on spectra (magnitude, phase) this is the paper's
    magnitude-vs-phase query; every sample's relevance is the same mask.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        variant: ``relaxed``, ``concrete``, ``matching_pursuit`` or ``exhaustive``.
        infiller: fills the dropped part: a name, an Infiller, or ``auto`` (blur unless the GAN is passed).
        steps: Adam steps (relaxed / concrete); lr: Adam learning rate (None: 0.05 on s for relaxed,
            0.5 on theta for concrete).
        l1: weight of the rate term (not matching pursuit).
        temperature: temperature of the concrete relaxation.
        n_samples: Monte-Carlo samples of the infiller (and concrete mask) per evaluation.
        mask_size: side (or (h, w)) of the mask for images / length for signals, upsampled; None: full size.
        components: integer group ids shaped like one sample (or broadcastable): one mask entry per
            group; or ``"channels"`` / ``"elements"`` (see :class:`MaskSpace`).
        max_components: matching pursuit: how many components to add.
        batch_size: matching pursuit: inputs per forward pass.
        shared: one mask for the whole batch (not matching pursuit; see above).
        seed: seed of the own generator for concrete samples.

    Raises:
        ValueError: bad options, components or mask_size; exhaustive over more than 10 entries;
            matching pursuit over more than 256 entries or with ``shared``.

    Example::

        # which of magnitude and phase do the samples of class 2 rely on (one mask for all of them)?
        keep = rde(model, x[y == 2], 2, variant="exhaustive", components="channels", shared=True,
                   infiller=gan, l1=6.0)
        magnitude, phase = keep[0, :, 0]
    """
    lr = lr if lr is not None else (0.5 if variant == "concrete" else 0.05)
    _check_common("rde", steps, lr, n_samples)
    if variant not in RDE_VARIANTS:
        raise ValueError(f"rde variant must be one of {RDE_VARIANTS}, got {variant!r}")
    space = MaskSpace(x, components=components, mask_size=mask_size)
    fill = get_infiller(infiller)
    b = x.shape[0]
    with torch.no_grad():
        reference = target_scores(model(x), target, "logit")
    if variant == "matching_pursuit":
        if shared:
            raise ValueError("rde shared=True needs variant 'relaxed', 'concrete' or 'exhaustive', "
                             "not matching pursuit")
        return _matching_pursuit(model, fill, space, x, target, reference, n_samples, max_components, batch_size)
    if not temperature > 0:
        raise ValueError(f"rde temperature must be > 0, got {temperature}")
    gen = torch.Generator().manual_seed(seed)
    x_rep, ref_rep = _repeat(x.detach(), n_samples), _repeat(reference, n_samples)

    rows = 1 if shared else b              # one mask, or one per sample
    reduce = torch.mean if shared else torch.sum

    def distortion(keep_param):            # keep_param (n_samples * rows, ...) -> (b,), per sample
        if shared:
            keep_param = keep_param.repeat_interleave(b, dim=0)
        keep = space.expand(keep_param)
        scores = target_scores(model(fill(x_rep, keep)), target, "logit", check=False)
        return (0.5 * (ref_rep - scores) ** 2).view(n_samples, b).mean(0)

    if variant == "exhaustive":
        return _exhaustive(distortion, space, b, rows, l1, n_samples, shared, x.device)

    if variant == "relaxed":
        def loss_fn(s):
            return reduce(distortion(_repeat(s, n_samples)) + l1 * s.flatten(1).mean(1))

        s = _optimize(torch.ones(rows, *space.shape, device=x.device), loss_fn, steps, lr, clamp=True)
        return space.relevance(s.expand(b, *space.shape))

    def loss_fn(theta):
        p = torch.sigmoid(theta)
        return reduce(distortion(_concrete(theta, temperature, n_samples, gen)) + l1 * p.flatten(1).mean(1))

    theta = _optimize(torch.full((rows, *space.shape), 2.0, device=x.device), loss_fn, steps, lr, clamp=False)
    return space.relevance(torch.sigmoid(theta).expand(b, *space.shape))


def _exhaustive(distortion, space, b, rows, l1, n_samples, shared, device):
    k = space.size
    if k > MAX_EXHAUSTIVE:
        raise ValueError(f"rde variant 'exhaustive' tries all 2^K binary masks; K = {k} mask entries here, at most "
                         f"{MAX_EXHAUSTIVE}: pass components= with fewer groups, or variant='concrete'")
    masks = ((torch.arange(2 ** k, device=device)[:, None] >> torch.arange(k, device=device)) & 1).float()  # (2^K, K)
    with torch.no_grad():
        cost = []
        for m in masks:
            d = distortion(m.view(1, *space.shape).expand(n_samples * rows, *space.shape))   # (b,)
            cost.append((d.mean(0, keepdim=True) if shared else d) + l1 * m.mean())
        best = masks[torch.stack(cost).argmin(0)]                                      # (rows, K)
    return space.relevance(best.view(-1, *space.shape).expand(b, *space.shape))


def _matching_pursuit(model, fill, space, x, target, reference, n_samples, max_components, batch_size):
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

    def distortion(sel):  # sel (N, B, K) bool -> (N, B); n_samples passes over the N * B inputs
        flat = sel.reshape(-1, k)
        nb = flat.shape[0]
        sample_of = torch.arange(n_samples * nb, device=x.device) % b

        def make(idx):
            keep = space.expand(flat[idx % nb].float().view(-1, *space.shape))
            return fill(x[idx % b], keep)

        scores = score_perturbed(model, make, sample_of, target, output="logit", batch_size=batch_size)
        d = 0.5 * (reference[sample_of] - scores) ** 2
        return d.view(n_samples, nb).mean(0).view(sel.shape[0], b)

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
