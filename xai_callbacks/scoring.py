"""What is explained and how perturbed inputs are scored: one place for both.

* :func:`target_scores` is the one function that turns a model output into the score(s) a target
  selects: a class index per sample (the output is then a (N, n_classes) tensor of scores), or a
  target function ``fn(output, batch) -> (N,)`` for any other output (regression, multi-label,
  segmentation; see :func:`regression_target`, :func:`multilabel_target`,
  :func:`segmentation_target`).
* :func:`class_scores` reads a binary classifier with one logit (output (N,) or (N, 1)) as the two
  classes it stands for, wherever class indices meet a model's output.
* :func:`score_perturbed` is the one function that scores stacked perturbed inputs: it builds
  them in chunks of ``batch_size`` on the model's device and scores each with
  :func:`target_scores`, inside the do-no-harm :func:`~xai_callbacks.guard.model_guard`.

Explainers, metrics and the callbacks all call these two. A target function is bound to the
batch it explains by :class:`Target`; ``select(target, rows)`` picks the targets of some samples
(for a class-index target that is ``target[rows]``), so a stack of perturbed copies scores each
copy against its own sample's target.

>>> from xai_callbacks.attribution import explain
>>> from xai_callbacks.scoring import Target, multilabel_target
>>> labels = torch.nn.functional.one_hot(y, 10)            # multi-hot labels, (N, classes)
>>> target = Target(multilabel_target(), batch=(x, labels))   # sum of the logits of the positive labels
>>> R = explain(model, x, target=target, method="saliency")
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["OUTPUTS", "Target", "TargetFn", "as_target", "select", "target_scores", "check_class_target",
           "score_perturbed", "index_batch", "regression_target", "multilabel_target", "segmentation_target",
           "one_logit", "class_scores", "class_probabilities"]

#: How a class-index target reads a (N, n_classes) output: the logit, the softmax probability, or
#: its log. A target function's score is used as it is.
OUTPUTS = ("logit", "probability", "log_probability")

TargetFn = Callable[[Any, Any], torch.Tensor]


def index_batch(batch: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of a batch: tensors with a leading batch dimension are indexed, tuples,
    lists, dicts and named tuples recursively; anything else (numbers, strings) is kept."""
    if isinstance(batch, torch.Tensor):
        return batch[rows.to(batch.device)] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: index_batch(v, rows) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(index_batch(v, rows) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(index_batch(v, rows) for v in batch)
    return batch


class Target:
    """A target function bound to the batch it explains.

    ``Target(fn, batch)`` scores sample ``i`` of ``batch`` as ``fn(output, batch)[i]``, where
    ``output`` is the model's output on that batch (or on perturbed copies of it). Calling it on
    the output of ``N`` inputs whose samples are ``rows`` (see :meth:`take`) hands ``fn`` the
    matching rows of the batch. An output with ``k * len(self)`` rows is read as ``k`` stacked
    copies of the samples (copy-major, as captum and SmoothGrad stack them); one with fewer rows
    as the first samples.

    Args:
        fn: ``fn(output, batch) -> (N,)`` tensor, one score per sample; differentiable where
            gradients are wanted.
        batch: what ``fn`` needs besides the output: the inputs, a ``(x, y, ...)`` tuple, a dict
            or :class:`~xai_callbacks.data.Batch`; indexed along its first dimension.
        rows: the samples of ``batch`` this target stands for (default: all).
    """

    def __init__(self, fn: TargetFn, batch: Any = None, rows: torch.Tensor | None = None):
        if not callable(fn):
            raise TypeError(f"a target function must be callable (output, batch) -> (B,) scores, got {fn!r:.80}")
        self.fn, self.batch = fn, batch
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()

    def __len__(self) -> int:
        if self.rows is not None:
            return len(self.rows)
        n = _batch_size(self.batch)
        if n is None:
            raise ValueError("a Target without rows needs a batch with a leading batch dimension")
        return n

    def take(self, rows: torch.Tensor | Sequence[int] | slice) -> "Target":
        """The targets of samples ``rows`` (indices into this target's samples)."""
        mine = self.rows if self.rows is not None else torch.arange(len(self))
        return Target(self.fn, self.batch, mine[rows] if isinstance(rows, slice) else mine[torch.as_tensor(rows).cpu()])

    def __call__(self, output: Any) -> torch.Tensor:
        n_out = _batch_size(output)
        n = len(self)
        batch = self.batch if self.rows is None else index_batch(self.batch, self.rows)
        if n_out is not None and n_out != n:
            if n_out > n and n_out % n:
                raise ValueError(f"the model output has {n_out} rows for {n} explained samples; a target function "
                                 "needs one output row per sample (or whole stacked copies)")
            batch = index_batch(batch, torch.arange(n_out) % n)  # fewer rows: the first samples
        scores = self.fn(output, batch)
        if not isinstance(scores, torch.Tensor) or scores.shape != (n_out if n_out is not None else n,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"the target function {getattr(self.fn, '__name__', self.fn)!r} must return one score "
                             f"per sample, shape ({n_out},); got {got}")
        return scores

    def __repr__(self) -> str:
        return f"Target({getattr(self.fn, '__name__', self.fn)!r}, n={len(self)})"


def _batch_size(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.dim() else None
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            n = _batch_size(v)
            if n is not None:
                return n
    return None


def as_target(target: Any, n: int, device: torch.device | str, batch: Any = None) -> torch.Tensor | Target:
    """``target`` for ``n`` samples: an int or integer tensor becomes a LongTensor (n,) on
    ``device``; a :class:`Target` is checked to cover ``n`` samples; a plain function becomes
    ``Target(fn, batch)``. Raises ValueError naming what is valid."""
    if isinstance(target, Target):
        if len(target) != n:
            raise ValueError(f"the target covers {len(target)} samples, the batch has {n}")
        return target
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.full((n,), target, dtype=torch.long, device=device)
    if isinstance(target, torch.Tensor) and not target.is_floating_point() and not target.is_complex() \
            and target.dtype != torch.bool:
        target = target.to(device=device, dtype=torch.long).reshape(-1).clone()  # may be an inference tensor
        if target.numel() == 1:
            return target.expand(n).clone()
        if target.numel() == n:
            return target
    elif callable(target) and not isinstance(target, (torch.Tensor, str)):
        return Target(target, batch)
    raise ValueError(f"target must be an int, a LongTensor of shape ({n},), a target function "
                     f"(output, batch) -> ({n},) scores, or None (the predicted class); got {target!r:.80}")


def select(target: torch.Tensor | Target, rows: torch.Tensor) -> torch.Tensor | Target:
    """The targets of samples ``rows`` (a LongTensor): ``target[rows]`` or :meth:`Target.take`."""
    if isinstance(target, Target):
        return target.take(rows)
    return target[rows.to(target.device)]


def one_logit(output: Any) -> bool:
    """Whether ``output`` is one score per sample, (N,) or (N, 1): with class indices, a binary
    classifier's logit (see :func:`class_scores`)."""
    return isinstance(output, torch.Tensor) and output.is_floating_point() and (
        output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1))


def class_scores(output: Any) -> Any:
    """A classifier's (N, n_classes) scores. A binary classifier with one logit ``z`` per sample
    ((N,) or (N, 1), trained with ``BCEWithLogitsLoss``) is read as two classes with logits
    ``(-z / 2, z / 2)``: their softmax is ``(1 - sigmoid(z), sigmoid(z))``, the probabilities it was
    trained to give, class 1's score grows with ``z`` and class 0's falls. Written as products
    with constants, which LRP passes relevance through unchanged
    (:class:`~xai_callbacks.attribution.lrp.FunctionalRules`). Any other output is returned as it is.

    Example:
        >>> class_scores(torch.tensor([[2.0], [-1.0]])).softmax(1)[:, 1]   # sigmoid(z)
        tensor([0.8808, 0.2689])
    """
    if not one_logit(output):
        return output
    z = output.reshape(-1, 1)
    return torch.cat([z * -0.5, z * 0.5], 1)


def class_probabilities(scores: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(N, n_classes) probabilities of class scores (their logs with ``log``): their softmax, or the
    scores themselves where they already are probabilities, every row non-negative and summing to 1,
    as from a model that ends in a softmax (a second softmax would squeeze them towards uniform,
    0.17-0.48 for four classes; logits practically never are). Decided on the device, without
    waiting for it (this runs in optimisation loops)."""
    soft = scores.log_softmax(dim=1) if log else scores.softmax(dim=1)
    if scores.shape[1] < 2:
        return soft
    with torch.no_grad():
        already = (scores >= 0).all() & ((scores.sum(1) - 1).abs() < 1e-4).all()
    return torch.where(already, scores.clamp_min(1e-30).log() if log else scores, soft)


def logits_hint(output: Any) -> str:
    """A hint for an output that carries its scores as ``.logits`` (HuggingFace's ModelOutput)."""
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return (" (its scores are its .logits: explain a module whose forward returns model(x).logits, as a "
                "LightningModule's forward does)")
    return ""


def check_class_target(output: Any, target: torch.Tensor) -> None:
    """Raise a ValueError unless ``output`` is (N, n_classes) scores and ``target`` valid classes."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"the model must return scores of shape (batch, n_classes) = ({len(target)}, K) for a "
                         f"class-index target; got {shape}{logits_hint(output)}. For other outputs (regression, "
                         "multi-label, segmentation) pass a target function (output, batch) -> (B,) scores")
    n_classes = output.shape[1]
    low, high = torch.stack(torch.aminmax(target)).tolist() if target.numel() else (0, 0)   # one device sync
    if low < 0 or high >= n_classes:
        bad = (target < 0) | (target >= n_classes)
        raise ValueError(f"target {target[bad].tolist()} out of range: the model has {n_classes} classes, "
                         f"valid targets are 0..{n_classes - 1}")


def target_scores(output: Any, target: torch.Tensor | Target, output_kind: str = "logit",
                  check: bool = True) -> torch.Tensor:
    """The score (N,) that ``target`` selects from a model ``output``.

    Args:
        output: the model's output on N inputs.
        target: a LongTensor (N,) of class indices (or (n,) with N = k * n stacked copies), or a
            :class:`Target`.
        output_kind: for class indices, read the ``logit``, the softmax ``probability`` or the
            ``log_probability`` (of a model that ends in a softmax, its output and the output's log);
            a target function's score is used as it is.
        check: validate the output's shape and the class range (first call of a loop suffices).

    Raises:
        ValueError: the output is not (N, n_classes) for a class-index target, a class is out of
            range, ``output_kind`` is unknown, or a target function returns the wrong shape.
    """
    if output_kind not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output_kind!r}")
    if isinstance(target, Target):
        return target(output)
    if check:
        check_class_target(output, target)
    if output.shape[0] != target.shape[0]:
        target = target.repeat(output.shape[0] // target.shape[0])
    if output_kind != "logit":
        output = class_probabilities(output, log=output_kind == "log_probability")
    return output.gather(1, target[:, None])[:, 0]


def score_perturbed(model: nn.Module, make_inputs: Callable[[torch.Tensor], torch.Tensor], sample_of: torch.Tensor,
                    target: torch.Tensor | Target, *, output: str = "logit", batch_size: int = 256) -> torch.Tensor:
    """Target scores (n,) of ``n`` perturbed inputs, built and scored ``batch_size`` at a time.

    Args:
        model: the explained model (unwrapped and run inside the guard, under ``no_grad``).
        make_inputs: ``make_inputs(idx)`` returns the perturbed inputs of the flat indices ``idx``
            (a LongTensor on the model's device).
        sample_of: LongTensor (n,): the sample each perturbed input was made from; its target is
            ``select(target, sample_of[idx])``.
        target: the samples' targets: LongTensor (B,) of classes (a model with one logit is read
            by :func:`class_scores`) or a :class:`Target`.
        output: ``logit``, ``probability`` or ``log_probability`` (class-index targets).
        batch_size: perturbed inputs per forward pass.

    Returns:
        The scores on the model's device.

    Raises:
        ValueError: ``batch_size < 1``, or as :func:`target_scores`.
    """
    from .guard import model_guard, unwrap_model  # the guard imports nothing of ours; lazy for clarity

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    module = unwrap_model(model)
    device = next((t.device for t in module.parameters()), None) or next(
        (t.device for t in module.buffers()), torch.device("cpu"))
    n = sample_of.shape[0]
    with model_guard(model) as module, torch.no_grad():
        # allocated inside the guard: under an outer inference_mode it would be an inference
        # tensor, which the guard's normal mode may not write into
        scores = torch.empty(n, device=device)
        sample_of = sample_of.to(device)
        layout = [device.type == "cpu"]   # channels-last images while the model accepts them
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size), device=device)
            out = _forward(module, make_inputs(idx), layout)
            if not isinstance(target, Target) and not getattr(module, "selects_score", False):
                out = class_scores(out)   # a binary classifier's one logit as two classes
            scores[start:start + len(idx)] = target_scores(out, select(target, sample_of[idx]), output,
                                                           check=start == 0)
    return scores


def _forward(module: nn.Module, x: torch.Tensor, layout: list[bool]) -> torch.Tensor:
    """``module(x)``; while ``layout[0]``, 4-D inputs go in channels-last. The values are the same
    and convolutions on the CPU run faster (``benchmarks/layout.py``, two cores, 2026-12-05: 1.2-1.5x
    over seven models at 32 and 64 pixels, the digits demo's one-channel small CNN included; made
    with ``Tensor.to(memory_format=...)``, as ``contiguous(memory_format=...)`` leaves one-channel
    images in strides read as the contiguous layout). A model that views its input as contiguous
    (``x.view(n, -1)``) raises on it: then ``layout[0]`` turns False and ``x`` goes in as it is."""
    if layout[0] and x.dim() == 4:
        try:
            return module(x.to(memory_format=torch.channels_last))
        except RuntimeError:
            layout[0] = False
    return module(x)


# ------------------------------------------------------------------------------ target helpers
def _labels(batch: Any) -> torch.Tensor:
    if isinstance(batch, tuple) and hasattr(batch, "y"):
        y = batch.y
    elif isinstance(batch, dict) and "y" in batch:
        y = batch["y"]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1]
    else:
        raise ValueError("this target function needs the batch's labels: bind it with Target(fn, batch=(x, y)) "
                         f"or a dict with 'y'; got a batch of type {type(batch).__name__}")
    return torch.as_tensor(y)


def regression_target(index: int = 0) -> TargetFn:
    """Target function of a regression model: output ``index`` of a (N, n_outputs) output, or the
    output itself when it is (N,) or (N, 1). Positive relevance raises the predicted value."""

    def regression(output: torch.Tensor, batch: Any) -> torch.Tensor:
        if output.dim() == 1:
            return output
        if output.dim() != 2 or not 0 <= index < output.shape[1]:
            raise ValueError(f"regression_target(index={index}) needs an output of shape (N,) or (N, K) with "
                             f"K > {index}; got {tuple(output.shape)}")
        return output[:, index]

    return regression


def multilabel_target(label: int | None = None) -> TargetFn:
    """Target function of a multi-label model with (N, n_labels) logits.

    Args:
        label: explain this one label's logit; None: the sum of the logits of each sample's
            positive labels, read from the batch's multi-hot labels ``y`` (N, n_labels).
    """

    def multilabel(output: torch.Tensor, batch: Any) -> torch.Tensor:
        if output.dim() != 2:
            raise ValueError(f"multilabel_target needs (N, n_labels) logits, got shape {tuple(output.shape)}")
        if label is not None:
            if not 0 <= label < output.shape[1]:
                raise ValueError(f"multilabel_target label {label} out of range: the model has {output.shape[1]} "
                                 f"labels, valid 0..{output.shape[1] - 1}")
            return output[:, label]
        y = _labels(batch).to(output.device)
        if y.shape != output.shape:
            raise ValueError(f"multilabel_target(label=None) needs multi-hot labels shaped like the output "
                             f"{tuple(output.shape)}; got labels {tuple(y.shape)}")
        return (output * (y > 0).to(output.dtype)).sum(1)

    return multilabel


def segmentation_target(class_index: int, region: str | torch.Tensor | None = None) -> TargetFn:
    """Target function of a segmentation model with (N, n_classes, *spatial) logits: the class's
    logits summed over a region.

    Args:
        class_index: the explained class.
        region: None: every position; ``"predicted"``: where the class is the argmax; a mask name:
            the batch's mask of that name (a key of a dict batch, or of ``Batch.masks``); a tensor:
            a fixed mask (*spatial) or per-sample masks (N, *spatial).
    """

    def segmentation(output: torch.Tensor, batch: Any) -> torch.Tensor:
        if output.dim() < 3 or not 0 <= class_index < output.shape[1]:
            raise ValueError(f"segmentation_target(class_index={class_index}) needs logits (N, n_classes, ...) "
                             f"with n_classes > {class_index}; got {tuple(output.shape)}")
        logits = output[:, class_index]
        if region is None:
            mask = torch.ones_like(logits)
        elif isinstance(region, str) and region == "predicted":
            mask = (output.detach().argmax(1) == class_index).to(logits.dtype)
        elif isinstance(region, str):
            masks = batch.masks if hasattr(batch, "masks") else batch if isinstance(batch, dict) else {}
            if region not in masks:
                raise ValueError(f"segmentation_target region {region!r} is not a mask of the batch; masks: "
                                 f"{sorted(masks)}")
            mask = torch.as_tensor(masks[region]).to(logits.device, logits.dtype)
            mask = mask.reshape(mask.shape[0], *logits.shape[1:]) if mask.numel() == logits.numel() else mask
        else:
            mask = region.to(logits.device, logits.dtype)
        try:
            mask = mask.expand_as(logits)
        except RuntimeError:
            raise ValueError(f"segmentation_target region of shape {tuple(mask.shape)} does not fit the class map "
                             f"{tuple(logits.shape)}") from None
        return (logits * mask).flatten(1).sum(1)

    return segmentation
