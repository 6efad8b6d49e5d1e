"""Modified-backpropagation methods: DeepLIFT and deconvnet (computed by captum), excitation
backprop and its contrastive variant (zennit rules).

Excitation backprop (Zhang et al. 2016) passes *marginal winning probabilities* (MWP) down the
network, starting from probability 1 at the target output. Through a linear map (dense,
convolution) with input activations ``a`` and positive weights ``w+ = max(w, 0)``, bias left out:

    P(a_j) = sum_i  a+_j w+_ij / (sum_k a+_k w+_ik)  P(a_i),    a+ = max(a, 0)

Average pooling and residual sums share the same normalised rule (their weights are positive);
element-wise activations and BatchNorm pass the signal unchanged, max pooling like the gradient.
On a ReLU network with non-negative inputs this is the definition TorchRay implements (its
``ExcitationBackpropContext``; the normaliser gets ``1e-20`` added). Where activations go negative
(linear bottlenecks, a depthwise convolution feeding the next one, SiLU / GELU, inputs normalised
to signed values) a negative unit counts as not excited (``a+``), as the paper's probabilistic
reading has it; with the signed values themselves in the rule the "probabilities" go negative
and unbounded (MobileNetV3 10^11, EfficientNet not finite); with ``a+`` they stay non-negative
and sum to at most 1 (the probability of a unit whose inputs are all unexcited is lost).
An activation written as a function (``F.silu(x)``) passes the signal like its gradient; only
``F.relu``'s gradient is the same as passing it unchanged.

The contrastive variant subtracts the MWP of the target's *dual* unit, the classifier layer with
its weights negated; as the propagation is linear in the signal from above, subtracting at any
intermediate layer (TorchRay's contrast layer) or at the end gives the same map. TorchRay keeps its
positive part, summed over channels.
"""
from __future__ import annotations

import warnings

import captum.attr as ca
import torch
import torch.nn.functional as F
from torch import nn
from zennit.composites import LayerMapComposite, NameLayerMapComposite
from zennit.core import BasicHook, ParamMod
from zennit.layer import Sum
from zennit.rules import Pass
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear

from . import CheckedForward, output_checked, register_method
from ..guard import allow_nondeterministic
from .lrp import ComputedWeightCanonizer, FunctionalRules
from .transformer import refuse_transformer

__all__ = ["deeplift", "deconvnet", "excitation_backprop", "contrastive_excitation_backprop", "Excitation"]


@register_method("deeplift")
def deeplift(model, x, target, *, baseline: float | torch.Tensor = 0.0) -> torch.Tensor:
    """DeepLIFT (Shrikumar et al. 2017) with the rescale rule, by captum: contributions of
    ``x - baseline`` that sum to ``f(x) - f(baseline)``. ReLUs must be modules (not
    ``torch.relu`` calls) and each used once, as captum requires.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        baseline: the reference input: a number or a tensor like one sample.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.
        MethodNotApplicableError: a nonlinearity module called more than once per forward (as
            torchvision's ResNet calls its ``relu``), naming the modules and the other methods.
        AssertionError: (captum) a ``baseline`` that does not broadcast to ``x``.

    Example: ``explain(model, x, y, method="deeplift", baseline=0.0)``.
    """
    with warnings.catch_warnings(), allow_nondeterministic(), output_checked(model, target):
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks")
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation")
        try:
            return ca.DeepLift(model).attribute(x, baselines=baseline, target=target)
        except RuntimeError as err:
            reused = _reused_nonlinearities(model, x[:1])
            if not reused:
                raise
            from .transformer import not_applicable

            calls = ", ".join(f"{n!r} is called {k} times" for n, k in reused[:5])
            raise not_applicable(model, "deeplift", f"captum's DeepLift keeps one input per nonlinearity module, "
                                 f"and {calls} per forward (give each call its own module to use it)") from err


def _reused_nonlinearities(model: nn.Module, x: torch.Tensor) -> list[tuple[str, int]]:
    """(name, calls) of the modules captum's DeepLift treats as nonlinearities that one forward
    pass of ``x`` calls more than once."""
    try:
        from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
    except ImportError:   # a captum without this table: report captum's own error
        return []
    calls: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
               for name, m in model.named_modules() if type(m) in SUPPORTED_NON_LINEAR]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [(name or type(model).__name__, k) for name, k in calls.items() if k > 1]


@register_method("deconvnet")
def deconvnet(model, x, target) -> torch.Tensor:
    """Deconvnet (Zeiler & Fergus 2014), by captum: ReLUs pass the positive part of the signal
    from above, whatever the forward activation.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="deconvnet")``.
    """
    with warnings.catch_warnings(), output_checked(model, target):
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        return ca.Deconvolution(model).attribute(x, target=target)


class Excitation(BasicHook):
    """The excitation-backprop rule for a dense, convolution, sum or average-pooling layer, as a
    zennit hook: ``a+ * W+^T (p / (W+ a+ + 1e-20))`` (a sum or pooling has only positive weights);
    ``dual=True`` uses the negated weights ``(-W)+``."""

    def __init__(self, dual: bool = False):
        sign = -1.0 if dual else 1.0
        super().__init__(
            input_modifiers=[lambda a: a.clamp(min=0)],
            param_modifiers=[ParamMod(lambda p, name: (sign * p).clamp(min=0), zero_params=["bias"],
                                      require_params=False)],
            output_modifiers=[lambda z: z],
            gradient_mapper=lambda p, outputs: [p / (outputs[0] + 1e-20)],
            reducer=lambda inputs, gradients: inputs[0] * gradients[0],
        )


def named_module(model: nn.Module, name: str, what: str) -> nn.Module:
    """The submodule ``name`` of ``model``; a ValueError listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ValueError(f"{what} {name!r} not found in the model; module names: {[n for n in modules if n][:40]}")
    return modules[name]


def classifier_layer_name(model: nn.Module) -> str:
    """Name of the last dense or convolution layer (the classifier layer)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not names:
        raise ValueError(f"excitation_backprop needs a dense or convolution layer, and {type(model).__name__} has none")
    return names[-1]


_NO_RULES = "excitation backprop has no rules for attention and LayerNorm"


def _composite(dual_layer: str | None):
    """The MWP rules; residual additions and pooling written as functions (torchvision's ResNet
    blocks among them) get the same rule, and gates (squeeze-and-excitation) are constants, from the
    forward pass under :class:`~xai_callbacks.attribution.lrp.FunctionalRules`."""
    layer_map = [(Activation, Pass()), (BatchNorm, Pass()),
                 (Sum, Excitation()), (AvgPool, Excitation()), (Convolution, Excitation()), (Linear, Excitation())]
    if dual_layer is None:
        return LayerMapComposite(layer_map=layer_map, canonizers=[ComputedWeightCanonizer()])
    return NameLayerMapComposite(name_map=[((dual_layer,), Excitation(dual=True))], layer_map=layer_map,
                                 canonizers=[ComputedWeightCanonizer()])


def _mwp(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: str | None, dual_layer: str | None):
    """MWP (B, C_l, ...) at the input (``layer`` None) or at the output of the module ``layer``."""
    forward = CheckedForward(model, target)
    captured = []
    with _composite(dual_layer).context(model) as modified:
        handle = None
        if layer is not None:
            handle = named_module(modified, layer, "excitation_backprop layer").register_forward_hook(
                lambda module, inputs, output: captured.append(output.clone()) or captured[-1])
        try:
            forward.model = modified
            with FunctionalRules(stabilizer=1e-20, positive=True):   # as the composite's sums and pooling
                out = forward(x)
        finally:
            if handle is not None:
                handle.remove()
        onehot = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
        wrt = captured[-1] if layer is not None else x
        (mwp,) = torch.autograd.grad(out, wrt, grad_outputs=onehot)
    return mwp


def _to_input(saliency: torch.Tensor, x: torch.Tensor, layer: str | None) -> torch.Tensor:
    if layer is None:
        return saliency
    if saliency.dim() != x.dim():
        raise ValueError(f"excitation_backprop layer {layer!r} has output shape {tuple(saliency.shape)}, not "
                         f"spatial like the input {tuple(x.shape)}; choose a convolution-stage layer")
    heat = saliency.sum(1, keepdim=True)
    heat = F.interpolate(heat, size=x.shape[2:], mode="bilinear" if x.dim() == 4 else "linear", align_corners=False)
    return heat.expand_as(x).contiguous()


@register_method("excitation_backprop")
def excitation_backprop(model, x, target, *, layer: str | None = None) -> torch.Tensor:
    """Excitation backprop (Zhang et al. 2016): marginal winning probabilities of the target.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        layer: None for the MWP of every input element (non-negative; sums to 1 where every
            unit with a winning probability has an excited input, to less where a unit's value
            comes from negative inputs alone; a negative input element gets none), or a module
            name: the MWP of its output summed over channels (TorchRay's saliency layer),
            bilinearly upsampled to the input size and repeated over its channels.

    Raises:
        ValueError: a ``layer`` the model does not have (the message lists its modules), a target
            out of range or a model output that is not (B, n_classes) scores.
        MethodNotApplicableError: a model with attention or LayerNorm (no MWP rule for them).

    Example: ``explain(model, x, y, method="excitation_backprop", layer="features.4")``.
    """
    refuse_transformer(model, "excitation_backprop", _NO_RULES)
    return _to_input(_mwp(model, x, target, layer, None), x, layer)


@register_method("excitation_backprop.contrastive")
def contrastive_excitation_backprop(model, x, target, *, layer: str | None = None,
                                    classifier_layer: str | None = None, positive: bool = True) -> torch.Tensor:
    """Contrastive excitation backprop (Zhang et al. 2016): MWP of the target minus MWP of its dual
    unit (``classifier_layer``'s weights negated; default: the last dense or convolution layer).

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.
        layer: as in :func:`excitation_backprop`; at a layer the channel sum is taken before the
            positive part (TorchRay's order).
        classifier_layer: module name of the classifier layer.
        positive: keep only the positive part (TorchRay's map); False returns the signed difference.

    Raises:
        ValueError: a ``layer`` or ``classifier_layer`` the model does not have (the message lists
            its modules), a target out of range or a model output that is not (B, n_classes) scores.
        MethodNotApplicableError: a model with attention or LayerNorm (no MWP rule for them).

    Example: ``explain(model, x, y, method="excitation_backprop.contrastive", layer="features.4")``.
    """
    refuse_transformer(model, "excitation_backprop.contrastive", _NO_RULES)
    name = classifier_layer or classifier_layer_name(model)
    named_module(model, name, "excitation_backprop.contrastive classifier_layer")
    diff = _mwp(model, x, target, layer, None) - _mwp(model, x, target, layer, name)
    if layer is not None:
        diff = diff.sum(1, keepdim=True)
    if positive:
        diff = diff.clamp(min=0)
    return _to_input(diff, x, layer)
