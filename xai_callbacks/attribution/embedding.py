"""Token models: attribution with respect to the output of the model's ``nn.Embedding``.

A batch of token ids (B, L) cannot be differentiated; the explained input is the embedding
output (B, L, D) instead. :func:`explain_tokens` runs any registered method on
:class:`EmbeddingInput` (the model with its embedding output replaced by the method's input) and
sums the relevance over the embedding dimension: one relevance per token, (B, L). An
``nn.EmbeddingBag`` (called with the ids (B, L)) is explained through its tokens' vectors (B, L, D),
which :class:`EmbeddingInput` reduces as the bag does (their sum, mean or max, padding left out).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingInput", "find_embedding", "explain_tokens", "token_methods"]

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop")


def token_methods(model: nn.Module) -> list[str]:
    """The registered methods that explain token ids through ``model``'s embedding."""
    from .transformer import applicable_methods

    return applicable_methods(model, tokens=True)


def find_embedding(model: nn.Module) -> nn.Embedding | nn.EmbeddingBag:
    """The model's first ``nn.Embedding`` or ``nn.EmbeddingBag`` (in module order); ``ValueError``
    if it has none."""
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return m
    raise ValueError(f"x holds integer token ids, so the model must embed them with an nn.Embedding or "
                     f"nn.EmbeddingBag; {type(model).__name__} has none: pass floating-point inputs "
                     f"(a floating-point tensor)")


def token_vectors(embedding: nn.Embedding | nn.EmbeddingBag, tokens: torch.Tensor) -> torch.Tensor:
    """Each token's vector (B, L, D): the embedding's output, or for a bag its vectors before the
    bag reduces them."""
    if isinstance(embedding, nn.Embedding):
        return embedding(tokens)
    return F.embedding(tokens, embedding.weight, None, embedding.max_norm, embedding.norm_type)


def _reduce_bag(bag: nn.EmbeddingBag, e: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """What ``bag``, called with ``args`` and ``kwargs``, makes of the token vectors ``e`` (B, L, D) of
    its ids (B, L): their sum (weighted by ``per_sample_weights`` where given), mean or max over the
    ids that are not its padding. Products with constants and a sum, so that the LRP rules see a sum
    pooling."""
    tokens, _, weights = (*args, *[None] * 3)[:3]
    weights = kwargs.get("per_sample_weights", weights)
    keep = torch.ones_like(tokens, dtype=e.dtype) if bag.padding_idx is None else (tokens != bag.padding_idx).to(e)
    if weights is not None:
        keep = keep * weights.to(e)
    if bag.mode == "max":
        return (e + (keep[..., None] - 1) * torch.finfo(e.dtype).max).amax(1) * keep.amax(1, keepdim=True)
    out = (e * keep[..., None]).sum(1)
    return out / keep.sum(1, keepdim=True).clamp(min=1) if bag.mode == "mean" else out


class EmbeddingInput(nn.Module):
    """``model`` as a function of its embedding output: ``forward(e)`` runs ``model(tokens)`` with
    ``embedding``'s output replaced by ``e``. When ``e`` holds k copies of the batch (SmoothGrad's
    noisy copies, integrated gradients' steps, stacked along the batch axis), the tokens are
    repeated k times to match; a smaller ``e`` is taken as the first samples (a check forward). An
    ``nn.EmbeddingBag``'s output is replaced by its reduction of ``e``.

    Args:
        model: the token model.
        embedding: the ``nn.Embedding`` or ``nn.EmbeddingBag`` inside ``model`` whose output is replaced.
        tokens: the token ids (B, L) being explained.
    """

    def __init__(self, model: nn.Module, embedding: nn.Embedding, tokens: torch.Tensor):
        super().__init__()
        self.model, self.tokens = model, tokens
        self.__dict__["embedding"] = embedding  # not a second registered copy of the submodule

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        b = self.tokens.shape[0]
        if e.shape[0] < b:
            tokens = self.tokens[:e.shape[0]]
        elif e.shape[0] % b == 0:
            tokens = self.tokens.repeat(e.shape[0] // b, *[1] * (self.tokens.dim() - 1))
        else:
            raise ValueError(f"embedding input batch {e.shape[0]} is neither a multiple of the token batch {b} "
                             "nor a prefix of it")

        def replace(m, args, kwargs, out):
            if args[0].shape != e.shape[:-1]:
                bag = " (an nn.EmbeddingBag given 1-D ids and offsets: give it the (batch, length) ids)" \
                    if args[0].dim() == 1 else ""
                raise ValueError(f"the model's {type(m).__name__} was called with ids of shape {tuple(args[0].shape)}, "
                                 f"not the explained ones {tuple(e.shape[:-1])}{bag}: token ids are explained where "
                                 f"the model embeds the ids it is given (a model that adds ids, such as a [CLS] "
                                 f"token, must get them in its input)")
            return (_reduce_bag(m, e, args, kwargs) if isinstance(m, nn.EmbeddingBag) else e).to(out.dtype)

        handle = self.embedding.register_forward_hook(replace, with_kwargs=True)
        try:
            return self.model(tokens)
        finally:
            handle.remove()


def explain_tokens(model: nn.Module, tokens: torch.Tensor, target, method: str, *,
                   batch_size: int | None = None, **options) -> torch.Tensor:
    """Relevance of each token, (B, L): ``method``'s relevance for the embedding output summed
    over the embedding dimension. Same arguments as :func:`~xai_callbacks.attribution.explain`,
    with ``tokens`` an integer tensor (B, L) of ids. Raises ``ValueError`` when the model has
    no ``nn.Embedding`` or the ids are out of its range, and
    :class:`~.transformer.MethodNotApplicableError` for methods that do not apply to tokens."""
    from . import explain, _lookup
    from ..guard import unwrap_model
    from .transformer import MethodNotApplicableError, _architecture

    _lookup(method)
    module = unwrap_model(model)
    embedding = find_embedding(module)
    if method not in GRADIENT_METHODS and not method.startswith("lrp."):
        raise MethodNotApplicableError(
            f"method {method!r} does not apply to token ids of {_architecture(module)}: it perturbs or upsamples "
            f"image regions. Methods that apply (relevance of each token through the embedding): "
            f"{token_methods(module)}")
    if tokens.dim() < 2:
        raise ValueError(f"token ids must have shape (batch, length), got {tuple(tokens.shape)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= embedding.num_embeddings):
        raise ValueError(f"token ids must be in 0..{embedding.num_embeddings - 1} (the embedding's size); "
                         f"got {int(tokens.min())}..{int(tokens.max())}")
    tokens = tokens.to(embedding.weight.device).clone()
    target = target.to(tokens.device) if isinstance(target, torch.Tensor) and target.numel() > 1 else target
    step = batch_size or tokens.shape[0]
    parts = []
    for i in range(0, tokens.shape[0], step):
        chunk = tokens[i:i + step]
        with torch.inference_mode(False), torch.no_grad():
            e = token_vectors(embedding, chunk).detach().clone()
        t = target[i:i + step] if isinstance(target, torch.Tensor) and target.numel() > 1 else target
        rel = explain(EmbeddingInput(module, embedding, chunk), e, t, method=method, **options)
        parts.append(rel.sum(dim=-1))
    return torch.cat(parts)
