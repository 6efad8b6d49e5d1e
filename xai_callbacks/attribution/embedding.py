"""Token models: attribution with respect to the output of the model's ``nn.Embedding``.

A batch of token ids (B, L) cannot be differentiated; the explained input is the embedding
output (B, L, D) instead. :func:`explain_tokens` runs any registered method on
:class:`EmbeddingInput` (the model with its embedding output replaced by the method's input) and
sums the relevance over the embedding dimension: one relevance per token, (B, L).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmbeddingInput", "find_embedding", "explain_tokens", "token_methods"]

GRADIENT_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop")


def token_methods(model: nn.Module) -> list[str]:
    """The registered methods that explain token ids through ``model``'s embedding."""
    from .transformer import applicable_methods

    return applicable_methods(model, tokens=True)


def find_embedding(model: nn.Module) -> nn.Embedding:
    """The model's first ``nn.Embedding`` (in module order); ``ValueError`` if it has none."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m
    raise ValueError(f"x holds integer token ids, so the model must embed them with an nn.Embedding; "
                     f"{type(model).__name__} has none: pass floating-point inputs (a floating-point tensor)")


class EmbeddingInput(nn.Module):
    """``model`` as a function of its embedding output: ``forward(e)`` runs ``model(tokens)`` with
    ``embedding``'s output replaced by ``e``. When ``e`` holds k copies of the batch (SmoothGrad's
    noisy copies, integrated gradients' steps, stacked along the batch axis), the tokens are
    repeated k times to match; a smaller ``e`` is taken as the first samples (a check forward).

    Args:
        model: the token model.
        embedding: the ``nn.Embedding`` inside ``model`` whose output is replaced.
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
        handle = self.embedding.register_forward_hook(lambda m, i, o: e.to(o.dtype))
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
            e = embedding(chunk).detach().clone()
        t = target[i:i + step] if isinstance(target, torch.Tensor) and target.numel() > 1 else target
        rel = explain(EmbeddingInput(module, embedding, chunk), e, t, method=method, **options)
        parts.append(rel.sum(dim=-1))
    return torch.cat(parts)
