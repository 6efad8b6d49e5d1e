"""Transformers: LRP for attention and LayerNorm (``lrp.cp``, ``lrp.attn``), Grad-CAM on token
grids, attention rollout, and the error a method raises on an architecture it does not apply to.

``lrp.cp`` is CP-LRP (Ali et al. 2022, "XAI for Transformers: better explanations through
conservative propagation") computed as gradient x input of a modified forward pass: the
attention weights (softmax) and LayerNorm's standard deviation are treated as constants, and
element-wise activations (GELU, SiLU) pass relevance unchanged (identity rule, as in AttnLRP).
Linear and convolution layers then get LRP-0. On a bias-free model relevance is conserved exactly.
The modification is a :class:`torch.overrides.TorchFunctionMode` active for one forward pass, so
it applies to any model built from ``F.layer_norm``, ``F.softmax``, ``F.gelu``,
``F.multi_head_attention_forward`` and ``F.scaled_dot_product_attention`` (torchvision ViT and
Swin, ``nn.TransformerEncoder``) and changes nothing outside that pass: no module or class is
patched. ``lrp.attn`` is AttnLRP (Achtibat et al. 2024) in the same way (:class:`AttentionLRP`).
Both agree with the lxt package's rules, which patch torchvision's classes process-wide instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from . import CheckedForward, register_method
from ..guard import input_gradient

__all__ = ["MethodNotApplicableError", "ConservativeTransformerLRP", "AttentionLRP", "transformer_layers",
           "attention_layers", "applicable_methods", "model_lrp", "refuse_transformer", "token_grid"]

_EPS = 1e-10
TRANSFORMER_LRP = ("lrp.cp", "lrp.attn")


class MethodNotApplicableError(ValueError):
    """A method was asked to explain an architecture it does not apply to; the message names the
    architecture, the method, why, and the methods that apply."""


def transformer_layers(model: nn.Module) -> list[str]:
    """Names of the layer types in ``model`` that make it a transformer (attention, LayerNorm)."""
    kinds = {type(m).__name__ for m in model.modules() if isinstance(m, nn.LayerNorm) or _is_attention(m)}
    return sorted(kinds)


def _is_attention(m: nn.Module) -> bool:
    """Attention between positions or tokens, by type: ``nn.MultiheadAttention`` or a class named
    "...Attention..." other than a channel or spatial gate (CBAM's ``ChannelAttention`` and
    ``SpatialAttention`` scale a CNN's features by a sigmoid: gates, which the LRP rules hold
    constant)."""
    name = type(m).__name__
    return isinstance(m, nn.MultiheadAttention) or "Attention" in name and not ("Channel" in name or "Spatial" in name)


def conv_after_attention(model: nn.Module) -> bool:
    """Whether ``model``'s last convolution comes after its last attention layer in module order:
    a hybrid's final convolution (MobileViT's), a spatial map of what the attention produced,
    unlike a ViT's patch embedding."""
    order = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) or _is_attention(m)]
    last_conv = max((i for i, m in enumerate(order) if isinstance(m, nn.modules.conv._ConvNd)), default=-1)
    last_attention = max((i for i, m in enumerate(order) if _is_attention(m)), default=-1)
    return last_conv > last_attention


def attention_layers(model: nn.Module) -> list[str]:
    """Names of the attention layer types in ``model`` (a CNN with LayerNorm, such as ConvNeXt,
    has none: its last convolution is a spatial map for Grad-CAM)."""
    return [k for k in transformer_layers(model) if "Attention" in k]


def _architecture(model: nn.Module) -> str:
    """The name of the network inside wrappers (a LightningModule's ``.model``, a target or
    embedding wrapper's ``.inner`` / ``.model``)."""
    for attr in ("inner", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _architecture(inner)
    return type(model).__name__


def applicable_methods(model: nn.Module, tokens: bool = False) -> list[str]:
    """The registered methods that apply to ``model``'s architecture; with ``tokens`` (or when
    ``model`` is an :class:`~.embedding.EmbeddingInput`) to token ids through its embedding."""
    from . import available_methods
    from .embedding import GRADIENT_METHODS, EmbeddingInput

    tokens = tokens or isinstance(model, EmbeddingInput)
    transformer = bool(transformer_layers(model))
    out = []
    for m in available_methods():
        if tokens and m not in GRADIENT_METHODS and not m.startswith("lrp."):
            continue
        if transformer and (m.startswith("lrp.") and m not in TRANSFORMER_LRP or m.startswith("excitation_backprop")):
            continue
        if m == "attention_rollout" and not _has_class_token_attention(model):
            continue
        if m == "gradcam" and attention_layers(model) and _token_layer(model) is None \
                and not conv_after_attention(model):
            continue
        out.append(m)
    return out


def model_lrp(model: nn.Module) -> str:
    """The LRP method for ``model``'s architecture: zennit's ``lrp.epsilon_plus_flat`` where the
    input meets a convolution first, ``lrp.epsilon_plus`` where it meets a dense layer first (the
    flat rule would give every input feature the same relevance there), ``lrp.attn`` (AttnLRP) on
    models with attention or LayerNorm, which zennit has no rules for; ``input_x_gradient`` where
    no LRP applies."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)
    zennit = "lrp.epsilon_plus" if isinstance(first, nn.Linear) else "lrp.epsilon_plus_flat"
    valid = applicable_methods(model)
    return next((m for m in (zennit, "lrp.attn") if m in valid), "input_x_gradient")


def not_applicable(model: nn.Module, method: str, reason: str) -> MethodNotApplicableError:
    """The error for ``method`` on ``model``: why, and the other methods that apply (never the
    refused one, also where the static check in :func:`applicable_methods` lets it pass)."""
    arch = _architecture(model)
    others = [m for m in applicable_methods(model) if m != method]
    return MethodNotApplicableError(f"method {method!r} does not apply to {arch}: {reason}. "
                                    f"Methods that apply to {arch}: {others}")


def refuse_transformer(model: nn.Module, method: str, reason: str) -> None:
    """Raise :class:`MethodNotApplicableError` if ``model`` is a transformer."""
    kinds = transformer_layers(model)
    if kinds:
        raise not_applicable(model, method, f"{reason} (found {', '.join(kinds)})")


# ---------------------------------------------------------------------------------------------
# CP-LRP as a forward-pass modification


class _IdentityRule(torch.autograd.Function):
    """``fn(x)`` forward; backward scales the gradient by ``fn(x) / x`` so that gradient x input
    passes relevance unchanged (the identity rule for element-wise activations)."""

    @staticmethod
    def forward(ctx, x, fn, kwargs):
        y = fn(x, **kwargs)
        ctx.save_for_backward(y / (x + _EPS))
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None, None


def _layer_norm_cp(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    std = (((x - mean) ** 2).mean(dim=dims, keepdim=True) + eps).sqrt()
    y = (x - mean) / std.detach()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _DivideGradient(torch.autograd.Function):
    """Identity forward; backward divides the gradient by ``factor`` (the uniform rule's share)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.factor, None


def _is_activation(t) -> bool:
    return isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.requires_grad


class ConservativeTransformerLRP(TorchFunctionMode):
    """Within this mode, gradient x input of a transformer is its CP-LRP relevance: softmax
    outputs and LayerNorm's standard deviation are constants (no gradient), query and key of
    fused attention get no gradient (so the attention weights are constant), GELU / SiLU use the
    identity rule. Forward values are unchanged."""

    _SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
    _ACTIVATIONS = {F.gelu, F.silu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm_cp(*args, **kwargs)
        if func in self._SOFTMAX:
            return func(*args, **kwargs).detach()
        if func in self._ACTIVATIONS:
            x, *rest = args
            if rest:
                raise TypeError(f"{func.__name__}: pass options by keyword under CP-LRP")
            # not in place: the rule's output must be a new tensor (torchvision's SiLU(inplace=True))
            return _IdentityRule.apply(x, func, {k: v for k, v in kwargs.items() if k != "inplace"})
        if func is F.multi_head_attention_forward or func is F.scaled_dot_product_attention:
            query, key, *rest = args
            return func(query.detach(), key.detach(), *rest, **kwargs)
        return func(*args, **kwargs)


class AttentionLRP(ConservativeTransformerLRP):
    """Within this mode, gradient x input of a transformer is its AttnLRP relevance (Achtibat et
    al. 2024): LayerNorm and activations as in CP-LRP; the softmax keeps its gradient (which, as
    gradient x input, is AttnLRP's softmax rule); each product of two activations (query x key,
    attention x value) gives each factor half of the relevance (uniform rule): queries and keys
    of fused attention get a quarter, values a half. Forward values are unchanged."""

    _MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm}  # both factors non-parameters

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SOFTMAX:
            return func(*args, **kwargs)
        if func in self._MATMUL and len(args) == 2 and all(map(_is_activation, args)):
            return func(*(_DivideGradient.apply(a, 2.0) for a in args), **kwargs)
        if func is F.multi_head_attention_forward or func is F.scaled_dot_product_attention:
            query, key, value, *rest = args
            return func(_DivideGradient.apply(query, 4.0), _DivideGradient.apply(key, 4.0),
                        _DivideGradient.apply(value, 2.0), *rest, **kwargs)
        return super().__torch_function__(func, types, args, kwargs)


def _gradient_x_input(rules, model, x, target) -> torch.Tensor:
    """Gradient x input of the target logit with ``rules`` (a context manager that swaps the
    backward passes, e.g. :class:`ConservativeTransformerLRP`) in place."""
    forward = CheckedForward(model, target)
    with rules:
        out = forward(x)
    onehot = torch.zeros_like(out).scatter_(1, target[:, None], 1.0)
    return x.detach() * input_gradient(out, x, grad_outputs=onehot)


@register_method("lrp.cp")
def conservative_lrp(model, x, target) -> torch.Tensor:
    """CP-LRP for transformers (attention weights and LayerNorm scale as constants, identity rule
    on GELU / SiLU, LRP-0 on linear and convolution layers), as gradient x input under
    :class:`ConservativeTransformerLRP`. The target logit is the relevance put in; on a bias-free
    model the relevance sums to it. On a network without attention this is LRP-0.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.

    Raises:
        ValueError: a target out of range or a model output that is not (B, n_classes) scores.

    Example: ``explain(model, x, y, method="lrp.cp")``.
    """
    return _gradient_x_input(ConservativeTransformerLRP(), model, x, target)


@register_method("lrp.attn")
def attention_lrp(model, x, target) -> torch.Tensor:
    """AttnLRP for transformers (uniform rule on products of activations, softmax rule through
    its gradient, LayerNorm scale constant, identity rule on GELU / SiLU, LRP-0 on linear and
    convolution layers), as gradient x input under :class:`AttentionLRP`. Not exactly
    conservative: the softmax rule keeps the share of its implicit bias.

    Arguments and errors as in ``lrp.cp``. Example: ``explain(model, x, y, method="lrp.attn")``.
    """
    return _gradient_x_input(AttentionLRP(), model, x, target)


# ---------------------------------------------------------------------------------------------
# token grids: Grad-CAM on vision transformers, attention rollout


def _prefix_tokens(model: nn.Module) -> int | None:
    """The number of tokens before the patch tokens of a ViT in ``model``: torchvision's
    ``VisionTransformer`` (a class token), or one built as timm's are (``blocks``, ``patch_embed``
    and ``num_prefix_tokens``: a class token, DeiT's distillation token, register tokens); None
    for other models (:func:`token_grid` then assumes a class token or none)."""
    from torchvision.models.vision_transformer import VisionTransformer

    for m in model.modules():
        if isinstance(m, VisionTransformer):
            return 1
        if isinstance(getattr(m, "blocks", None), nn.Module) and hasattr(m, "patch_embed") \
                and isinstance(getattr(m, "num_prefix_tokens", None), int):
            return m.num_prefix_tokens
    return None


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """A transformer's blocks in module order: the lowest modules with a LayerNorm child and an
    attention layer below them (torchvision's ``EncoderBlock``, timm's ``Block``, HuggingFace's
    ``ViTLayer``)."""
    found = [m for m in model.modules() if any(isinstance(c, nn.LayerNorm) for c in m.children())
             and any(_is_attention(d) for d in m.modules() if d is not m)]
    ids = {id(m) for m in found}
    return [m for m in found if not any(id(d) in ids for d in m.modules() if d is not m)]


def _token_layer(model: nn.Module) -> tuple[nn.Module, str, int | None] | None:
    """(layer, layout, prefix tokens) whose output Grad-CAM reads on a vision transformer, else
    None. Swin: the feature stages (B, h, w, C). Otherwise the last block's first LayerNorm
    (tokens (B, prefix + h*w, D); the last block's output only feeds the class token forward),
    with the prefix known for torchvision's and timm's ViTs (None: a class token or none)."""
    from torchvision.models.swin_transformer import SwinTransformer

    swin = next((m for m in model.modules() if isinstance(m, SwinTransformer)), None)
    if swin is not None:
        return swin.features, "channels_last", None
    blocks = _transformer_blocks(model)
    if not blocks:
        return None
    first_norm = next(c for c in blocks[-1].children() if isinstance(c, nn.LayerNorm))
    return first_norm, "tokens", _prefix_tokens(model)


def token_grid(act: torch.Tensor, layout: str, prefix: int | None = None) -> torch.Tensor:
    """Activations of a token layer as a (B, C, h, w) grid. ``layout``: "tokens" for (B, T, D)
    with T = prefix + h*w (``prefix`` tokens first, dropped; None: a class token or none, as the
    count makes a square), "channels_last" for (B, h, w, C). Raises ``ValueError`` when the tokens
    do not form a square grid."""
    if layout == "channels_last":
        if act.dim() != 4:
            raise ValueError(f"expected channels-last activations (B, h, w, C), got {tuple(act.shape)}")
        return act.permute(0, 3, 1, 2)
    if act.dim() != 3:
        raise ValueError(f"expected token activations (B, T, D), got {tuple(act.shape)}")
    t = act.shape[1]
    for drop in (1, 0) if prefix is None else (prefix,):
        side = math.isqrt(max(t - drop, 0))
        if side * side == t - drop and side > 0:
            return act[:, drop:].transpose(1, 2).reshape(act.shape[0], act.shape[2], side, side)
    raise ValueError(f"{t} tokens form no square grid after {'a class token or none' if prefix is None else prefix}"
                     f" prefix token(s)")


def gradcam_tokens(model, x, target, layer: nn.Module, layout: str, prefix: int | None = None,
                   relu: bool = True) -> torch.Tensor:
    """Grad-CAM on a token layer: channel weights are the gradient averaged over the token grid,
    the map is the weighted sum of the channels, upsampled to ``x``."""
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        out = CheckedForward(model, target)(x)
    finally:
        handle.remove()
    act = acts[-1]
    if layout == "tokens" and act.dim() == 4:   # a LayerNorm's (B, h, w, C): a windowed transformer's blocks
        layout = "channels_last"
    score = out.gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(score, act)
    a, g = token_grid(act.detach(), layout, prefix), token_grid(grad, layout, prefix)
    heat = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
    heat = heat.clamp(min=0) if relu else heat
    heat = F.interpolate(heat, size=x.shape[2:], mode="bilinear", align_corners=False)
    return heat.expand_as(x).contiguous()


def _has_class_token_attention(model: nn.Module) -> bool:
    """A transformer with a class token (a parameter named ``class_token`` or ``cls_token``)."""
    return bool(_transformer_blocks(model)) and any(
        name.rsplit(".", 1)[-1] in ("class_token", "cls_token") for name, _ in model.named_parameters())


class _RecordAttention(TorchFunctionMode):
    """Records the head-averaged attention weights of every ``nn.MultiheadAttention`` and every
    fused ``F.scaled_dot_product_attention`` call (timm's attention)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            kwargs = {**kwargs, "need_weights": True, "average_attn_weights": True}
            out, weights = func(*args, **kwargs)
            self.weights.append(weights.detach())
            return out, weights
        if func is F.scaled_dot_product_attention:
            self.weights.append(_attention_weights(*args, **kwargs).mean(1))
        return func(*args, **kwargs)


def _attention_weights(query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       **_) -> torch.Tensor:
    """The softmax weights ``F.scaled_dot_product_attention`` computes (B, heads, N, N), without
    dropout."""
    logits = query @ key.transpose(-2, -1) * (query.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        n, m = logits.shape[-2:]
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=logits.device).tril()
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1).detach()


@register_method("attention_rollout")
def attention_rollout(model, x, target, *, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) for vision transformers with a class token: the
    head-averaged attention of each layer mixed with the identity (``residual``: the share of the
    skip connection), rows renormalised, multiplied through the layers; the class token's row over
    the patch tokens is the map, upsampled to ``x``. Class-agnostic: ``target`` is not used.

    Args:
        model, x, target: as :func:`~xai_callbacks.attribution.explain` passes them.

    The attention weights are read from ``nn.MultiheadAttention`` (torchvision) and recomputed
    for fused ``F.scaled_dot_product_attention`` (timm, HuggingFace's ``sdpa``).

    Raises:
        MethodNotApplicableError: a model that is not a transformer with a class token (CNNs,
            Swin), one whose attention is neither of the above (an eager ``softmax(q k^T)``), or
            one whose token count changes between layers (PiT); the message lists the methods
            that apply.

    Example: ``explain(model, x, y, method="attention_rollout", residual=0.5)``.
    """
    if not _has_class_token_attention(model):
        raise not_applicable(model, "attention_rollout", "it needs a transformer with a class token (a "
                             "parameter named class_token or cls_token)")
    record = _RecordAttention()
    with torch.no_grad(), record:
        CheckedForward(model, target)(x)
    if len({w.shape[-1] for w in record.weights}) > 1:
        raise not_applicable(model, "attention_rollout", "its token count changes between layers (a pooling "
                             "transformer); rollout multiplies the layers' attention matrices")
    rollout = None
    for w in record.weights:
        eye = torch.eye(w.shape[-1], device=w.device, dtype=w.dtype)
        a = residual * eye + (1 - residual) * w
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise not_applicable(model, "attention_rollout", "no attention weights were recorded in its forward pass "
                             "(nn.MultiheadAttention or F.scaled_dot_product_attention; an attention computed as "
                             "softmax(q k^T) is not recorded: use the fused one, e.g. attn_implementation='sdpa')")
    grid = token_grid(rollout[:, :1, :].transpose(1, 2), "tokens", _prefix_tokens(model))
    heat = F.interpolate(grid, size=x.shape[2:], mode="bilinear", align_corners=False)
    return heat.expand_as(x).contiguous()
