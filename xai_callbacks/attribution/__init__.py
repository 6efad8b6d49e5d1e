"""Explainers: ``explain(model, x, target, method=NAME, **options) -> relevance shaped like x``.

Every method is registered under one name (see :func:`available_methods`) and called through
:func:`explain`, which validates the input, runs the method inside the do-no-harm
:func:`~xai_callbacks.guard.model_guard`, chunks the batch, and checks the result.

>>> from xai_callbacks.attribution import explain
>>> R = explain(model, x, target=y, method="lrp.epsilon_plus_flat")
>>> R.shape == x.shape
True
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from typing import Callable

import torch
from torch import nn

from ..guard import model_guard, unwrap_model
from ..scoring import Target, as_target, check_class_target, class_scores, logits_hint, one_logit, select, target_scores

__all__ = ["explain", "available_methods", "register_method", "method_options", "check_methods", "model_scores",
           "checked_scores", "ExplainerFn", "TargetModel", "TwoClassModel"]

ExplainerFn = Callable[..., torch.Tensor]
_METHODS: dict[str, ExplainerFn] = {}
_TARGET_FUNCTIONS: set[str] = set()  # methods that score a Target themselves


def register_method(name: str, target_functions: bool = False) -> Callable[[ExplainerFn], ExplainerFn]:
    """Register ``fn(model, x, target, **options) -> Tensor`` under ``name``.

    ``fn`` receives the unwrapped model in eval mode inside the guard, ``x`` as a detached fp32
    clone on the model's device and ``target`` as a LongTensor of shape (B,).

    Args:
        name: the registry key.
        target_functions: True if ``fn`` scores its outputs with
            :func:`~xai_callbacks.scoring.target_scores` and so also takes a
            :class:`~xai_callbacks.scoring.Target`; otherwise :func:`explain` hands it a
            :class:`TargetModel` (the selected score as a one-class output) and target 0.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: ExplainerFn) -> ExplainerFn:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = fn
        if target_functions:
            _TARGET_FUNCTIONS.add(name)
        return fn

    return deco


def available_methods() -> list[str]:
    """Names accepted by ``explain(..., method=...)``."""
    return sorted(_METHODS)


def method_options(method: str) -> dict[str, object]:
    """The options a method accepts, with their defaults."""
    return dict(_options(_lookup(method)))


def check_methods(methods, options=None) -> tuple[list[str], dict[str, dict]]:
    """Validated ``(methods, per-method options)`` for a callback: names must be registered and
    options must be ones the method takes; raises ``ValueError`` naming what is valid."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in _METHODS]
    if not methods or unknown:
        raise ValueError(f"unknown attribution method(s) {unknown or methods}; valid: {available_methods()}")
    options = {m: dict(o) for m, o in (options or {}).items()}
    for m, opts in options.items():
        if m not in methods:
            raise ValueError(f"method_options given for {m!r}, which is not in methods {methods}")
        bad = sorted(set(opts) - set(method_options(m)))
        if bad:
            raise ValueError(f"unknown option(s) {bad} for method {m!r}; valid: {sorted(method_options(m))}")
    return methods, options


@functools.lru_cache(maxsize=None)
def _options(fn: ExplainerFn) -> tuple[tuple[str, object], ...]:
    params = list(inspect.signature(fn).parameters.values())[3:]
    return tuple((p.name, p.default) for p in params if p.kind == p.KEYWORD_ONLY or p.default is not p.empty)


def _lookup(method: str) -> ExplainerFn:
    if method not in _METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid: {available_methods()}")
    return _METHODS[method]


def model_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward ``x`` and check the output is a (B, n_classes) tensor of scores (see :func:`checked_scores`)."""
    return checked_scores(model(x), x.shape[0])


def checked_scores(output, n: int) -> torch.Tensor:
    """``output`` of ``n`` inputs as (n, n_classes) class scores (a binary classifier's one logit
    read as two classes, :func:`~xai_callbacks.scoring.class_scores`), or a ValueError naming its shape."""
    out = class_scores(output)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return scores of shape (batch, n_classes) = ({n}, K); "
                         f"got {shape}{logits_hint(out)}; for other outputs pass target=<function (output, batch) "
                         "-> (B,) scores>")
    return out


class CheckedForward:
    """``model`` as a callable that validates its scores and the target on the first call."""

    def __init__(self, model: nn.Module, target: torch.Tensor):
        self.model, self.target, self.checked = model, target, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.check(out)
        return out

    def check(self, out: torch.Tensor) -> None:
        """Check ``out`` (the first time only)."""
        if not self.checked:
            check_class_target(out, self.target)
            self.checked = True


@contextlib.contextmanager
def output_checked(model: nn.Module, target: torch.Tensor):
    """While the body runs, ``model``'s first output is checked as :class:`CheckedForward` checks
    it, by a forward hook: for captum methods that need the module itself (their hooks go on its
    layers), without a forward pass of its own."""
    forward = CheckedForward(model, target)

    def hook(module, inputs, out) -> None:
        forward.check(out)

    handle = model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _OutputView(nn.Module):
    """``model`` with its output changed by :meth:`forward`. Its submodules are the model's own,
    under the model's own names (hooks, canonizers and layer names see the model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["inner"] = model  # not registered: named_modules below yields the model's own

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        return self.inner.named_modules(memo, prefix, remove_duplicate)

    def named_children(self):  # children() and apply() (captum's hooks) reach the model's own layers
        return self.inner.named_children()


class TargetModel(_OutputView):
    """``model`` followed by a target function: outputs the selected score as (N, 1), so methods
    written for class indices explain any target with class 0."""
    selects_score = True   # its one output column is the target's score, not a binary classifier's logit

    def __init__(self, model: nn.Module, target: Target):
        super().__init__(model)
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return target_scores(self.inner(x), self.target)[:, None]


class TwoClassModel(_OutputView):
    """A binary classifier with one logit as two classes (:func:`~xai_callbacks.scoring.class_scores`),
    so methods written for class indices explain class 0 and class 1 alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_scores(self.inner(x))


#: per model, whether it outputs one logit per sample (a binary classifier): learnt from one sample's forward
#: pass the first time the model is explained with class indices, not on every call
_ONE_LOGIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _outputs_one_logit(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` outputs one logit per sample (see :data:`_ONE_LOGIT`). A forward pass that
    raises tells nothing: the method's own forward pass reports the error, on the whole batch."""
    if module not in _ONE_LOGIT:
        try:
            with torch.no_grad():
                _ONE_LOGIT[module] = one_logit(module(x[:1]))
        except Exception:
            return False
    return _ONE_LOGIT[module]


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def explain(model: nn.Module, x: torch.Tensor, target=None, method: str = "saliency", *,
            batch_size: int | None = None, **options) -> torch.Tensor:
    """Relevance of each input element for ``target``, shaped like ``x``, on the model's device.

    Args:
        model: the explained model; DDP / compiled wrappers are unwrapped. With class-index
            targets it must return scores of shape (batch, n_classes), or one logit per sample
            ((batch,) or (batch, 1)): a binary classifier, explained as two classes with logits
            ``-z / 2`` and ``z / 2`` (:func:`~xai_callbacks.scoring.class_scores`).
        x: a batch of inputs (B, ...); must be finite. Integer token ids (B, L) are explained
            through the model's ``nn.Embedding`` and give one relevance per token, (B, L).
        target: the explained class: an int, a LongTensor (B,), or None for the predicted class;
            or a target function ``fn(output, batch) -> (B,)`` scores (called with ``batch=x``) or
            a :class:`~xai_callbacks.scoring.Target` binding one to a batch, for any other output
            (see :mod:`xai_callbacks.scoring` for regression, multi-label and segmentation).
        method: a name from :func:`available_methods`.
        batch_size: at most this many inputs per forward pass: samples per call to the method,
            and perturbed inputs per forward for methods with a ``batch_size`` option (a method's
            own ``batch_size`` in ``options`` wins there).
        **options: the method's options, see :func:`method_options`.

    Raises:
        ValueError: unknown method, bad input, bad target (out of range, wrong shape), or a
            model output that does not fit the target.
        TypeError: an option the method does not take.

    Example::

        R = explain(model, x, target=y, method="lrp.epsilon_plus_flat")
        R = explain(regressor, x, target=regression_target(), method="integrated_gradients")
    """
    if isinstance(x, torch.Tensor) and x.dtype in (torch.int32, torch.int64):  # token ids: see embedding.py
        from .embedding import explain_tokens
        return explain_tokens(model, x, target, method, batch_size=batch_size, **options)
    fn = _lookup(method)
    valid = {name for name, _ in _options(fn)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {method!r}; valid: {sorted(valid)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape (batch, ...), got "
                         f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if not torch.isfinite(x).all():
        raise ValueError(f"x contains {int((~torch.isfinite(x)).sum())} non-finite value(s) (NaN or inf); "
                         "attributions need finite inputs")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    if batch_size is not None and "batch_size" in valid:
        options.setdefault("batch_size", batch_size)
    device = model_device(unwrap_model(model))
    with model_guard(model) as module:
        # cloned inside the guard: under an outer inference_mode a clone taken outside would be an
        # inference tensor, which autograd refuses
        x = x.detach().to(device=device, dtype=torch.float32).clone()
        if target is None:
            with torch.no_grad():
                out = module(x)
            _ONE_LOGIT[module] = one_logit(out)
            target = checked_scores(out, x.shape[0]).argmax(dim=1)
        if not (isinstance(target, Target) or callable(target)) and _outputs_one_logit(module, x):
            module = TwoClassModel(module)   # class indices of a binary classifier with one logit
        target = as_target(target, x.shape[0], x.device, batch=x)
        step = min(batch_size or x.shape[0], x.shape[0])
        parts = []
        for i in range(0, x.shape[0], step):
            end = min(i + step, x.shape[0])
            part_target, part_model = target if step == x.shape[0] else select(target, torch.arange(i, end)), module
            if isinstance(part_target, Target) and method not in _TARGET_FUNCTIONS:
                part_model = TargetModel(module, part_target)
                part_target = torch.zeros(end - i, dtype=torch.long, device=x.device)
            parts.append(fn(part_model, x[i:i + step].detach().requires_grad_(True), part_target, **options))
    relevance = (parts[0] if len(parts) == 1 else torch.cat(parts)).detach().float()
    if relevance.shape != x.shape:
        raise RuntimeError(f"method {method!r} returned shape {tuple(relevance.shape)} for input "
                           f"{tuple(x.shape)}; this is a bug in the method")
    return relevance


# Register the built-in methods (imports at the end: they use register_method).
from . import gradient, cam, lrp, perturbation, counterfactual  # noqa: E402,F401
from . import backprop, surrogate, extremal  # noqa: E402,F401
