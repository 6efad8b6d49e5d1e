"""Layer-wise relevance propagation through zennit's composites and canonizers.

Every model gets :class:`TracedMergeBatchNorm`, which merges a BatchNorm into the linear or
convolution layer before it only where one forward pass shows that the BatchNorm reads exactly
that layer's output.
A BatchNorm after a concatenation (DenseNet) or after a pooling layer is left as it is and gets
zennit's rule for BatchNorm (relevance passed through unchanged). Canonizers merge BatchNorm
running statistics, which is valid in eval mode only: the guard puts the model in eval mode
first; and the model's parameter and buffer values are copied before the canonizers run and put
back if anything raises (:func:`~xai_callbacks.guard.preserve_values`).

Transformers (attention, LayerNorm) have no zennit rules; the composites here refuse them before
touching the model and name the methods that apply (``lrp.cp``, see ``transformer.py``).
Additions and average pooling written as functions (a residual ``out += x``, ``x.mean((2, 3))``,
``F.adaptive_avg_pool2d``) get the norm rule of zennit's ``Sum`` and pooling layers during the
forward pass, and gates (``x * sigmoid(...)`` of squeeze-and-excitation) are held constant
(:class:`FunctionalRules`), so any model's residual additions and gates conserve relevance.
Convolutions get :class:`ZPlus`, zennit's z+ that does not drop the relevance of a unit without
positive contributions (a depthwise convolution feeding the next one without a ReLU between).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from zennit import canonizers, composites, core as zcore, rules as zrules
from zennit.types import BatchNorm, Convolution, Linear as ZennitLinear

from . import CheckedForward, TargetModel, register_method
from ..guard import input_gradient, preserve_values
from ..scoring import target_scores
from .transformer import _is_activation, refuse_transformer


class TracedMergeBatchNorm(canonizers.SequentialMergeBatchNorm):
    """Merge each BatchNorm into the linear / convolution layer whose output it reads, as found by
    one forward pass of ``example`` (identity of the tensors passed between the modules), not by
    the order of the modules in the model. A BatchNorm whose input is a concatenation, a sum, a
    pooled or otherwise transformed tensor is not merged; neither is one whose linear layer's
    output is also read by another module.

    Args:
        example: one input batch (a single sample suffices) to trace the data flow with; None
            until :func:`lrp` sets the batch being explained.
    """

    def __init__(self, example: torch.Tensor | None = None):
        super().__init__()
        self.example = example

    def copy(self):
        return canonizers.SequentialMergeBatchNorm()

    def apply(self, root_module: nn.Module) -> list:
        if self.example is None:
            raise ValueError("TracedMergeBatchNorm needs an example input to trace the model with")
        instances = []
        for linear, norm in traced_batchnorm_pairs(root_module, self.example):
            instance = self.copy()
            instance.register((linear,), norm)
            instances.append(instance)
        return instances


_STOCK_FORWARD = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}


class _WeightArgument(TorchFunctionMode):
    """Within this mode a convolution or dense function records the weight it is given and, with
    ``module``, gets ``module.weight`` instead (as zennit's rules modify it)."""

    _LINEAR = {F.conv1d, F.conv2d, F.conv3d, F.linear}

    def __init__(self, module: nn.Module | None = None):
        super().__init__()
        self.module, self.weight = module, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._LINEAR and len(args) >= 2:
            self.weight = args[1]
            if self.module is not None:
                args = (args[0], self.module.weight, *args[2:])
        return func(*args, **kwargs)


def _computed_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight ``module``'s forward passes to its convolution or dense function where that is
    not the stored one (weight standardisation computes it from the stored one), else None."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        shape = (1, module.in_features)
    else:
        shape = (1, module.in_channels, *((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation)))
    mode = _WeightArgument()
    with torch.no_grad(), mode:
        module(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
    computed = mode.weight
    if computed is None or computed is weight or computed.shape != weight.shape:
        return None
    return computed.detach().clone()


class ComputedWeightCanonizer(canonizers.Canonizer):
    """A convolution or dense layer whose forward computes the weight it convolves with from its
    stored one (weight standardisation: timm's ``StdConv2d`` / ``ScaledStdConv2d`` of BiT and NF
    ResNets). zennit's rules modify the stored weight, which such a layer would transform again
    (an NF-ResNet's LRP heatmaps were 0). While registered the stored weight is the computed one,
    and the forward convolves with the stored weight as the rules modify it; the layer's own
    forward still runs (its padding and the rest). Stock layers and layers whose forward convolves
    with the stored weight are left alone."""

    def __init__(self):
        super().__init__()
        self.module, self.weight = None, None

    def apply(self, root_module: nn.Module) -> list:
        instances = []
        for module in root_module.modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and type(module).forward not in _STOCK_FORWARD \
                    and (computed := _computed_weight(module)) is not None:
                instance = ComputedWeightCanonizer()
                instance.register(module, computed)
                instances.append(instance)
        return instances

    def register(self, module: nn.Module, computed: torch.Tensor) -> None:
        self.module, self.weight = module, module.weight
        module.weight = nn.Parameter(computed, requires_grad=self.weight.requires_grad)
        module.forward = self.forward

    def forward(self, *args, **kwargs):
        with _WeightArgument(self.module):
            return type(self.module).forward(self.module, *args, **kwargs)

    def remove(self) -> None:
        del self.module.forward
        self.module.weight = self.weight

    def copy(self):
        return ComputedWeightCanonizer()


def traced_batchnorm_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, nn.Module]]:
    """(linear, batchnorm) pairs where the BatchNorm's input is the linear layer's output and no
    other module reads that output, found by one forward pass of ``example`` without gradients."""
    outputs, readers = {}, {}  # id(tensor) -> producing linear layer; id(tensor) -> reading modules
    handles, alive = [], []  # every recorded tensor is kept alive so its id stays unique

    def record(module, inputs, output):
        for t in inputs:
            if isinstance(t, torch.Tensor):
                readers.setdefault(id(t), []).append(module)
                alive.append(t)
        if isinstance(module, ZennitLinear) and isinstance(output, torch.Tensor):
            outputs[id(output)] = module
            alive.append(output)

    try:
        for m in model.modules():
            if not list(m.children()):
                handles.append(m.register_forward_hook(record))
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for key, linear in outputs.items():
        mods = readers.get(key, [])
        if len(mods) == 1 and isinstance(mods[0], BatchNorm) and getattr(linear, "weight", None) is not None:
            pairs.append((linear, mods[0]))
    return pairs


class ZPlus(zrules.ZPlus):
    """zennit's z+ rule (alpha 1, beta 0), except where a unit has no positive contribution
    (``z+ = 0``: its value comes from negative contributions alone) and still receives relevance:
    there the relevance passes by the epsilon rule instead of being dropped. Such a unit is one read
    by the next layer without a ReLU between (a depthwise convolution feeding the next convolution,
    a branch of a sum): zennit's z+ loses its relevance (ShuffleNetV2 kept 0.30-0.48 of the logit)
    or, where a sum gave it negative relevance, inflates the total (MobileOne-S0 up to 13x).
    Elsewhere the same relevance as zennit's ``ZPlus``, bit for bit; where a layer's input has no
    negative value (it follows a ReLU) zennit's second pass, of negative inputs through negative
    weights, adds exactly 0 and is skipped (``benchmarks/attribution.py`` times it against zennit's).
    The epsilon pass runs only for a layer that has such units."""

    def __init__(self, stabilizer: float = 1e-6, zero_params=None):
        super().__init__(stabilizer=stabilizer, zero_params=zero_params)
        self.stabilizer, self.zero_params, self.unexplained = stabilizer, zero_params, None
        zplus = self.gradient_mapper

        def mapper(relevance, outputs):
            self.unexplained = (sum(outputs) == 0) & (relevance != 0)
            return zplus(relevance, outputs)

        self.gradient_mapper = mapper

    def copy(self):
        return ZPlus(self.stabilizer, self.zero_params)

    def backward(self, module, grad_input, grad_output):
        x = self.stored_tensors["input"][0]
        if (x < 0).any():
            result = super().backward(module, grad_input, grad_output)
        else:   # zennit's first pass alone: positive inputs through positive weights
            x = x.clone().requires_grad_()
            with zcore.ParamMod.ensure(self.param_modifiers[0])(module) as modified, torch.enable_grad():
                z = modified.forward(x)
            grad_z = self.gradient_mapper(grad_output[0], [z])[0]
            (grad,) = torch.autograd.grad(z, x, grad_z, create_graph=grad_output[0].requires_grad)
            relevance = x * grad
            result = tuple(relevance if g.shape == relevance.shape else None for g in grad_input)
        unexplained, self.unexplained = self.unexplained, None
        if not unexplained.any():
            return result
        x = self.stored_tensors["input"][0].clone().requires_grad_()
        with zrules.NoMod(zero_params=self.zero_params)(module) as modified, torch.enable_grad():
            z = modified.forward(x)
        weights = torch.where(unexplained, grad_output[0] / zcore.Stabilizer.ensure(self.stabilizer)(z), 0.0)
        (grad,) = torch.autograd.grad(z, x, weights)
        return tuple(None if r is None else r + x.detach() * grad for r in result)


def _stabilized(z: torch.Tensor, stabilizer: float) -> torch.Tensor:
    return z + stabilizer * torch.where(z >= 0, 1.0, -1.0).to(z)


def _weights(t: torch.Tensor, positive: bool) -> torch.Tensor:
    return t.clamp(min=0) if positive else t


class _NormAdd(torch.autograd.Function):
    """``a + b`` forward; backward splits the relevance above in proportion to ``a`` and ``b``
    (zennit's norm rule of a ``Sum`` layer), or to their positive parts."""

    @staticmethod
    def forward(ctx, a, b, stabilizer, positive):
        ctx.stabilizer, ctx.positive = stabilizer, positive
        ctx.save_for_backward(a, b)   # not the sum: an in-place activation may write into it
        return a + b

    @staticmethod
    def backward(ctx, relevance):
        a, b = (_weights(t, ctx.positive) for t in ctx.saved_tensors)
        ratio = relevance / _stabilized(a + b, ctx.stabilizer)
        return a * ratio, b * ratio, None, None


class _NormPool(torch.autograd.Function):
    """``pool(x)`` forward (a mean or a sum over positions); backward the norm rule: the relevance above
    over the output, through the pooling's gradient, times the input."""

    @staticmethod
    def forward(ctx, x, pool, stabilizer, positive):
        ctx.pool, ctx.stabilizer, ctx.positive = pool, stabilizer, positive
        ctx.save_for_backward(x)
        return pool(x)

    @staticmethod
    def backward(ctx, relevance):
        x = _weights(ctx.saved_tensors[0], ctx.positive)
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = ctx.pool(leaf)
            (grad,) = torch.autograd.grad(out, leaf, relevance / _stabilized(out.detach(), ctx.stabilizer))
        return x * grad, None, None, None


class _Scaled(torch.autograd.Function):
    """``scale(signal)`` forward (a product with or division by a constant, element-wise);
    backward passes the relevance above to the signal unchanged (each output element is one input
    element's: LRP-0 of an element-wise linear map)."""

    @staticmethod
    def forward(ctx, signal, scale):
        return scale(signal)

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None


class _Gated(torch.autograd.Function):
    """``signal * gate`` forward; backward passes the relevance above to the signal unchanged and
    none to the gate (the gate is a constant: the gated signal takes all of the relevance)."""

    @staticmethod
    def forward(ctx, signal, gate):
        ctx.gate_shape = gate.shape
        return signal * gate

    @staticmethod
    def backward(ctx, relevance):   # zeros, not None: the rules of the gate's own layers expect a gradient
        return relevance, relevance.new_zeros(ctx.gate_shape)


def _broadcasts_to(shape, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


class FunctionalRules(TorchFunctionMode):
    """Within this mode (the forward pass of the zennit-based methods) what a model writes as
    functions, which no zennit rule sees, passes relevance as LRP would:

    - an addition of two activations of one shape (``a + b``, ``a += b``, ``torch.add``,
      ``a.add_(b)``) and an average or sum pooling (``x.mean(...)``, ``x.sum(...)``,
      ``F.adaptive_avg_pool2d``, ...): the norm rule of zennit's ``Sum`` and pooling layers (the
      gradient passed the full relevance into both addends, doubling a residual network's relevance
      at each block, and a mean or a sum spread it evenly, a sum of tokens' embeddings the whole
      logit to every token);
    - a product of two activations where one is a gate (a sigmoid's output or a reshape of one,
      else the factor that broadcasts over the other: squeeze-and-excitation, spatial attention):
      the gate is a constant and the gated signal takes all of the relevance (the gradient scaled
      it by the gate and sent part of it into the gate's branch);
    - a product with or a division by a constant (``x * alpha``, ``x / 6``, a layer scale) and a
      group normalisation: the relevance passes unchanged (LRP-0 of an element-wise map; zennit's
      rule for BatchNorm), where the gradient scaled it.

    Forward values are unchanged. ``stabilizer`` is added to each norm rule's denominator with its
    sign (zennit's default: 1e-6); ``positive=True`` weighs by the inputs' positive parts
    (excitation backprop's rule, under which only excited units win)."""

    _ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__}
    _MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__}
    _POOL = {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
             F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
    _DIV = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__itruediv__}
    _IN_PLACE = {torch.Tensor.mul_, torch.Tensor.div_}
    _SIGMOID = {torch.sigmoid, torch.Tensor.sigmoid, F.hardsigmoid, torch.special.expit}
    _RESHAPE = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.expand, torch.Tensor.expand_as,
                torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.flatten, torch.flatten, torch.Tensor.squeeze,
                torch.squeeze, torch.Tensor.permute, torch.permute, torch.Tensor.contiguous, torch.Tensor.__getitem__}

    def __init__(self, stabilizer: float = 1e-6, positive: bool = False):
        super().__init__()
        self.stabilizer, self.positive = stabilizer, positive
        self._sigmoids = {}   # id -> tensor (kept alive, so ids stay unique) of sigmoid outputs and their reshapes

    def _scaled(self, func, a, b) -> int | None:
        """Which argument of a product or quotient is an activation scaled element-wise by a
        constant (a parameter, a buffer, a number: ``x * alpha``, ``x / 6``, a layer scale), or
        None. The quotient's activation must be the numerator; the result has its shape."""
        active = [_is_activation(a), _is_activation(b)]
        if active[0] == active[1] or (func in self._DIV or func is torch.Tensor.div_) and not active[0]:
            return None
        signal, other = (a, b) if active[0] else (b, a)
        return (0 if active[0] else 1) if _broadcasts_to(getattr(other, "shape", ()), signal.shape) else None

    def _gate(self, a: torch.Tensor, b: torch.Tensor) -> int | None:
        """Which factor of ``a * b`` is a gate (0 or 1), or None: the one that is a sigmoid's output
        (or a reshape of one) where the other is not, else the one with fewer elements that
        broadcasts to the other's shape (a channel gate (B, C, 1, 1), a spatial one (B, 1, H, W), a
        normaliser's (B, N, 1)). The gate must broadcast to the signal's shape."""
        sigmoid = [id(t) in self._sigmoids for t in (a, b)]
        if sigmoid[0] != sigmoid[1]:
            index = 0 if sigmoid[0] else 1
        elif a.numel() != b.numel():
            index = 0 if a.numel() < b.numel() else 1
        else:
            return None
        gate, signal = (a, b) if index == 0 else (b, a)
        return index if _broadcasts_to(gate.shape, signal.shape) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self._ADD or func is torch.Tensor.add_) and len(args) == 2 and not kwargs \
                and all(map(_is_activation, args)) and args[0].shape == args[1].shape:
            # ``a += b`` takes the new tensor as ``a``; ``a.add_(b)`` must change ``a`` itself
            if func is torch.Tensor.add_:
                return args[0].copy_(_NormAdd.apply(args[0].clone(), args[1], self.stabilizer, self.positive))
            return _NormAdd.apply(*args, self.stabilizer, self.positive)
        if (func in self._MUL or func is torch.Tensor.mul_) and len(args) == 2 and not kwargs \
                and all(map(_is_activation, args)) and (index := self._gate(*args)) is not None:
            gate, signal = args[index], args[1 - index]
            if func is torch.Tensor.mul_:   # ``a.mul_(b)`` must change ``a`` itself
                return args[0].copy_(_Gated.apply(signal.clone(), gate))
            return _Gated.apply(signal, gate)
        if (func in self._MUL or func in self._DIV or func in self._IN_PLACE) and len(args) == 2 and not kwargs \
                and (index := self._scaled(func, *args)) is not None:
            signal, other = args[index], args[1 - index]
            scale = (lambda t: func(t, other)) if index == 0 else (lambda t: func(other, t))
            if func in self._IN_PLACE:   # ``a.mul_(c)`` must change ``a`` itself
                return args[0].copy_(_Scaled.apply(signal.clone(), scale))
            return _Scaled.apply(signal, scale)
        if func is F.group_norm and args and _is_activation(args[0]):   # as zennit's pass rule for BatchNorm
            rest = args[1:]
            return _Scaled.apply(args[0], lambda t: func(t, *rest, **kwargs))
        if func in self._POOL and args and _is_activation(args[0]):
            rest = args[1:]
            return _NormPool.apply(args[0], lambda t: func(t, *rest, **kwargs), self.stabilizer, self.positive)
        out = func(*args, **kwargs)
        if func in self._SIGMOID or (func in self._RESHAPE and args and id(args[0]) in self._sigmoids):
            self._sigmoids[id(out)] = out
        return out


def default_canonizers(model: nn.Module, example: torch.Tensor | None = None) -> list:
    """The canonizers for ``model``: :class:`ComputedWeightCanonizer` and :class:`TracedMergeBatchNorm`
    traced with ``example`` (without it, :func:`lrp` traces with the explained batch). Residual
    additions, pooling and gates written as functions are not canonized: the forward pass runs
    under :class:`FunctionalRules` (on torchvision's ResNets the same relevance, bit for bit, as
    zennit's ``ResNetCanonizer``)."""
    return [ComputedWeightCanonizer(), TracedMergeBatchNorm(None if example is None else example[:1].detach())]


def lrp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, composite, method: str = "lrp") -> torch.Tensor:
    """Relevance of ``x`` for ``target`` under ``composite``: a zennit composite, or a function
    ``canonizers -> composite`` that gets :func:`default_canonizers`. The target logit is the
    relevance put into the output, so relevance sums to it where the rules conserve.
    Raises :class:`~.transformer.MethodNotApplicableError` (naming ``method``) for models with
    layers the composites have no rule for (attention, LayerNorm), before anything on the model
    is changed."""
    refuse_transformer(model, method, "zennit's composites have no rules for attention and LayerNorm")
    forward = CheckedForward(model, target)
    if not isinstance(composite, composites.Composite):
        composite = composite(default_canonizers(model, x))
    for c in composite.canonizers:
        if isinstance(c, TracedMergeBatchNorm) and c.example is None:
            c.example = x[:1].detach()
    with preserve_values(model):
        with composite.context(model) as modified:
            x = x.requires_grad_(True)
            if isinstance(modified, TargetModel):  # a target function: relevance starts at the model's own output,
                with FunctionalRules():             # R = output * d score / d output (sums to a linear score)
                    out = modified.inner(x)
                score = target_scores(out, modified.target)
            else:
                forward.model = modified
                with FunctionalRules():
                    out = forward(x)
                score = out.gather(1, target[:, None])
            (d_score,) = torch.autograd.grad(score.sum(), out, retain_graph=True)
            return input_gradient(out, x, grad_outputs=d_score * out.detach())


@register_method("lrp.epsilon_plus_flat")
def epsilon_plus_flat(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule on dense layers, z+ on convolutions, flat rule on the first layer.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        epsilon: stabiliser of the epsilon rule.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.
        MethodNotApplicableError: a transformer (attention, LayerNorm): zennit's composites have no
            rules for them; use ``lrp.cp`` or ``lrp.attn``.

    Example: ``explain(model, x, y, method="lrp.epsilon_plus_flat")``.
    """
    return lrp(model, x, target, lambda c: epsilon_plus_flat_composite(c, epsilon), "lrp.epsilon_plus_flat")


def epsilon_plus_flat_composite(canonizers: list, epsilon: float = 1e-6) -> composites.Composite:
    """zennit's ``EpsilonPlusFlat`` with the conserving :class:`ZPlus` on convolutions."""
    return composites.EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizers, layer_map=[(Convolution, ZPlus())])


@register_method("lrp.epsilon_plus")
def epsilon_plus(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon rule on dense layers, z+ on convolutions, nothing special on the first layer: the
    model's LRP where the input meets a dense layer first (an MLP on features, an embedding and
    dense layers), on which the flat rule of ``lrp.epsilon_plus_flat`` spreads the relevance evenly
    over every input feature (each heatmap constant). Arguments and errors as in
    ``lrp.epsilon_plus_flat``.

    Example: ``explain(mlp, rows, y, method="lrp.epsilon_plus")``.
    """
    return lrp(model, x, target, lambda c: composites.EpsilonPlus(epsilon=epsilon, canonizers=c,
                                                                   layer_map=[(Convolution, ZPlus())]),
               "lrp.epsilon_plus")


@register_method("lrp.epsilon_gamma_box")
def epsilon_gamma_box(model, x, target, *, low: float | None = None, high: float | None = None,
                      epsilon: float = 1e-6, gamma: float = 0.25) -> torch.Tensor:
    """Epsilon on dense, gamma on convolutions, z^B (box) on the first layer with the input
    bounds ``low`` / ``high`` (default: each sample's own minimum and maximum).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        low, high: the input bounds of the z^B rule (None: each sample's own minimum and maximum).
        epsilon: stabiliser of the epsilon rule.
        gamma: weight of the positive part in the gamma rule.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.
        MethodNotApplicableError: a transformer (attention, LayerNorm): zennit's composites have no
            rules for them; use ``lrp.cp`` or ``lrp.attn``.

    Example: ``explain(model, x, y, method="lrp.epsilon_gamma_box", low=0.0, high=1.0)``.
    """
    dims = tuple(range(1, x.dim()))
    low = x.detach().amin(dim=dims, keepdim=True).expand_as(x) if low is None else low
    high = x.detach().amax(dim=dims, keepdim=True).expand_as(x) if high is None else high
    return lrp(model, x, target, lambda c: composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon,
                                                                       gamma=gamma, canonizers=c),
               "lrp.epsilon_gamma_box")


@register_method("lrp.epsilon_alpha2_beta1")
def epsilon_alpha2_beta1(model, x, target, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon on dense layers, alpha=2 beta=1 on convolutions, flat rule on the first layer.
    Arguments and errors as in ``lrp.epsilon_plus_flat``.

    Example: ``explain(model, x, y, method="lrp.epsilon_alpha2_beta1", epsilon=1e-6)``.
    """
    return lrp(model, x, target, lambda c: composites.EpsilonAlpha2Beta1(epsilon=epsilon, canonizers=c),
               "lrp.epsilon_alpha2_beta1")


# ----------------------------------------------------------------------------- user-defined composites
# ``lrp.composite``: a zennit composite built from a config of layer -> rule.

from zennit import rules as _zrules, types as _ztypes  # noqa: E402
from zennit.composites import LayerMapComposite, NameMapComposite, MixedComposite, layer_map_base  # noqa: E402

#: rule names of ``lrp.composite`` -> zennit rule classes
LRP_RULES = {
    "zero": _zrules.Epsilon, "epsilon": _zrules.Epsilon, "gamma": _zrules.Gamma, "alpha_beta": _zrules.AlphaBeta,
    "zplus": ZPlus, "zbox": _zrules.ZBox, "wsquare": _zrules.WSquare, "flat": _zrules.Flat,
    "pass": _zrules.Pass, "norm": _zrules.Norm,
}
#: layer groups a config key may name (besides module names, ``first`` and torch.nn class names)
LRP_LAYER_GROUPS = {
    "Convolution": _ztypes.Convolution, "Dense": nn.Linear, "AvgPool": _ztypes.AvgPool,
    "MaxPool": _ztypes.MaxPool, "BatchNorm": _ztypes.BatchNorm, "Activation": _ztypes.Activation,
}
DEFAULT_LRP_RULES = {"first": "flat", "Convolution": "zplus", "Dense": "epsilon"}
LRP_OUTPUTS = ("logit", "log_odds")


def make_rule(spec, x: torch.Tensor | None = None):
    """A zennit rule from ``"name"`` or ``{"rule": name, **parameters}``.

    ``zero`` is LRP-0 (epsilon 1e-12, a guard against division by zero only); ``zbox`` without
    ``low`` / ``high`` takes each sample's own minimum and maximum of ``x`` (first layer only).

    Raises:
        ValueError: unknown rule name or parameter (the valid ones are named).
    """
    import inspect

    params = dict(spec) if isinstance(spec, dict) else {"rule": spec}
    name = params.pop("rule", None)
    if name not in LRP_RULES:
        raise ValueError(f"unknown LRP rule {name!r} in {spec!r}; valid: {sorted(LRP_RULES)}")
    cls = LRP_RULES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    bad = sorted(set(params) - set(valid))
    if bad:
        raise ValueError(f"unknown parameter(s) {bad} for LRP rule {name!r}; valid: {valid}")
    if name == "zero":
        params.setdefault("epsilon", 1e-12)
    if name == "zbox":
        if x is None and ("low" not in params or "high" not in params):
            raise ValueError("LRP rule 'zbox' needs low and high")
        dims = tuple(range(1, x.dim())) if x is not None else ()
        for key, reduce in (("low", torch.amin), ("high", torch.amax)):
            value = params.get(key)
            params[key] = (reduce(x.detach(), dim=dims, keepdim=True).expand_as(x) if value is None
                           else torch.as_tensor(value, dtype=torch.float32))
    return cls(**params)


def config_composite(model: nn.Module, rules: dict, x: torch.Tensor | None = None, canonizers=()):
    """A zennit composite from ``rules``: ``{key: rule}`` where ``key`` is a module name of
    ``model``, ``first`` (the first dense or convolution layer), a layer group (one of
    ``LRP_LAYER_GROUPS``) or a ``torch.nn`` class name (``Conv2d``, ``Linear``), and ``rule`` as in
    :func:`make_rule`. Names match before types; types match in the order given. Activations,
    BatchNorm (after canonizing) and residual sums pass relevance, average pooling normalises it,
    unless the config says otherwise; layers matched by nothing propagate the gradient.
    ``x`` is the input batch (for ``zbox`` without bounds); ``canonizers`` are zennit canonizers.

    Raises:
        ValueError: a key that is neither a module name nor a known layer type, or a bad rule.
    """
    if not isinstance(rules, dict) or not rules:
        raise ValueError(f"lrp.composite rules must be a non-empty dict of layer -> rule, got {rules!r:.80}")
    modules = dict(model.named_modules())
    name_map, layer_map = [], []
    for key, spec in rules.items():
        rule = make_rule(spec, x)
        if key == "first":
            first = next((n for n, m in modules.items() if isinstance(m, _ztypes.Linear)), None)
            if first is None:
                raise ValueError("lrp.composite rule for 'first': the model has no dense or convolution layer")
            name_map.append(((first,), rule))
        elif key in modules and key:
            name_map.append(((key,), rule))
        elif key in LRP_LAYER_GROUPS:
            layer_map.append((LRP_LAYER_GROUPS[key], rule))
        elif isinstance(getattr(nn, key, None), type) and issubclass(getattr(nn, key), nn.Module):
            layer_map.append((getattr(nn, key), rule))
        else:
            raise ValueError(f"lrp.composite key {key!r} is neither a module name of the model nor a layer type; "
                             f"valid: 'first', {sorted(LRP_LAYER_GROUPS)}, torch.nn class names, or module names "
                             f"{[n for n in modules if n][:30]}")
    return MixedComposite([NameMapComposite(name_map), LayerMapComposite(layer_map + layer_map_base())],
                          canonizers=list(canonizers))


def log_odds_weights(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weights g (B, K) such that ``g * logits`` is the relevance put into the logits to explain
    the log-odds of the target (Montavon et al., chapter 10 of the Explainable AI book).

    The log-odds ``eta_c = -log sum_{c' != c} exp(-(z_c - z_c'))`` is a reverse log-sum-exp pooling
    over ``d_c' = z_c - z_c'``; min-take-most gives ``R_cc' = d_c' s_c'`` with ``s = softmin(d)``.
    Through the difference layer with LRP-0 this puts ``z_c`` on the target logit and
    ``-s_c' z_c'`` on each other one: ``g = onehot(c) - s``, equal to merging the difference into
    the last layer when that layer uses LRP-0 or epsilon.
    """
    onehot = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
    d = out.gather(1, target[:, None]) - out
    s = torch.softmax((-d).masked_fill(onehot.bool(), float("-inf")), dim=1)
    return onehot - s


@register_method("lrp.composite")
def lrp_composite(model, x, target, *, rules: dict | None = None, output: str = "logit") -> torch.Tensor:
    """LRP with a user-defined composite (zennit rules per layer type or module name).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        rules: ``{key: rule}`` (see :func:`config_composite`); rules are ``zero`` (LRP-0),
            ``epsilon``, ``gamma``, ``alpha_beta``, ``zplus``, ``zbox`` (z^B, ``low`` / ``high``),
            ``wsquare``, ``flat``, ``pass``, ``norm``, given as a name or as
            ``{"rule": name, **zennit parameters}``, e.g. ``{"first": {"rule": "zbox", "low": -1,
            "high": 1}, "Convolution": {"rule": "gamma", "gamma": 0.25}, "Dense": "epsilon"}``.
            Default: flat on the first layer, z+ on convolutions, epsilon on dense layers
            (zennit's EpsilonPlusFlat).
        output: ``logit`` (relevance of the target logit) or ``log_odds``: relevance of
            ``log(p_c / (1 - p_c))``, which makes evidence for competing classes negative.

    Raises:
        ValueError: an unknown rule, rule parameter or ``rules`` key, or an unknown ``output`` (each
            message names the valid values).
        MethodNotApplicableError: a transformer (attention, LayerNorm): zennit's composites have no
            rules for them; use ``lrp.cp`` or ``lrp.attn``.

    Example: ``explain(model, x, y, method="lrp.composite",
                       rules={"Convolution": {"rule": "gamma", "gamma": 0.25}, "Dense": "epsilon"})``.
    """
    if output not in LRP_OUTPUTS:
        raise ValueError(f"lrp.composite output must be one of {list(LRP_OUTPUTS)}, got {output!r}")
    from . import TargetModel

    # a target function's model (TargetModel) calls the model itself: rules and canonizers go there
    root = model.inner if isinstance(model, TargetModel) else model
    refuse_transformer(root, "lrp.composite", "zennit's composites have no rules for attention and LayerNorm")
    forward = CheckedForward(model, target)
    with preserve_values(root):
        composite = config_composite(root, DEFAULT_LRP_RULES if rules is None else rules, x,
                                     canonizers=default_canonizers(root, x))
        with composite.context(root):
            x = x.requires_grad_(True)
            with FunctionalRules():
                out = forward(x)
            if output == "logit":
                weights = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
            else:
                weights = log_odds_weights(out.detach(), target)
            return input_gradient(out, x, grad_outputs=weights * out.detach())
