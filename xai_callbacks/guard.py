"""The do-no-harm contract: explanations observe training, they never change it.

Every call into a model made by this library goes through :func:`model_guard`. It

* unwraps DDP / ``torch.compile`` wrappers and yields the original module (a LightningModule
  compiled by the Trainer runs its original, uncompiled ``forward`` inside the guard),
* switches to eval mode and restores every submodule's own ``training`` flag afterwards,
* leaves ``inference_mode`` and ``no_grad``, enables grad, disables autocast (fp32),
* forks and restores the global RNG states (torch CPU and CUDA, numpy, ``random``),
* checks on exit that no forward / backward hook was left behind on any submodule,
* restores the model's structure and tensors when the body raises (:class:`ModelSnapshot`):
  every module's attributes, parameters, buffers and submodules as they were (a bias a canonizer
  added to a convolution is removed, a weight whose ``.data`` it swapped is swapped back). Cheap
  (references only, no copies) on every call; methods that may write into parameter or buffer
  storage in place (LRP canonizers) also copy the values first with :func:`preserve_values`.

Gradients are taken with ``torch.autograd.grad`` w.r.t. inputs only (see
:func:`input_gradient`), so parameters' ``.grad`` stays untouched; eval mode means BatchNorm
running statistics are not updated.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch import nn

__all__ = ["unwrap_model", "model_guard", "rng_guard", "grad_fp32", "input_gradient", "hook_count",
           "ModelSnapshot", "allow_nondeterministic", "preserve_values"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the original module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def hook_count(model: nn.Module | list[nn.Module]) -> int:
    """Number of module hooks registered anywhere in ``model`` (forward, pre-forward, backward);
    ``model`` may also be the list of its modules."""
    n = 0
    for m in (model if isinstance(model, list) else model.modules()):
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
    return n


@contextlib.contextmanager
def rng_guard(seed: int | None = None, host: bool = True) -> Iterator[None]:
    """Fork the global torch (CPU and all CUDA devices) and, with ``host``, numpy and ``random`` states.

    Whatever the body draws (a DataLoader iterator's base seed, captum's noise, dropout) is
    forgotten on exit, so training sees the same random stream as without the callback.
    With ``seed`` the body itself runs from that seed (deterministic explanations; numpy and
    ``random`` are then seeded, and forked, whatever ``host`` says). Forking numpy's state costs
    about 0.1 ms; nothing in this library draws from numpy or ``random`` inside an explainer call,
    so :func:`model_guard` forks only torch's unless seeded, while the callbacks fork all three
    around their work.
    """
    host = host or seed is not None
    py_state, np_state = (random.getstate(), np.random.get_state()) if host else (None, None)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            if seed is not None:
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
            yield
        finally:
            if host:
                random.setstate(py_state)
                np.random.set_state(np_state)


_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


class ModelSnapshot:
    """What a failing method could leave behind on ``model``, taken cheaply and restored exactly.

    Always recorded (references, no tensor copies): every submodule's ``__dict__`` (attributes such
    as an instance-level ``forward`` override), its parameter, buffer, submodule and hook tables, and each
    parameter's and buffer's ``.data`` tensor (same storage). With ``values=True`` each parameter's
    and buffer's values are also copied, which protects against in-place writes into their storage.

    Args:
        model: the module to protect (or the list of its modules).
        values: also copy parameter and buffer values (costs one copy of the model's tensors).
    """

    def __init__(self, model: nn.Module | list[nn.Module], values: bool = False):
        modules = model if isinstance(model, list) else list(model.modules())
        self.modules = [(m, (d := m.__dict__).copy(), d["_parameters"].copy(), d["_buffers"].copy(),
                         d["_modules"].copy()) for m in modules]
        # hook tables are mostly empty: the non-empty ones are copied, every other one is empty on restore
        self.hooks = [(table, table.copy()) for m, attrs, *_ in self.modules for name in _HOOK_TABLES
                      if isinstance(table := attrs.get(name), dict) and table]
        # each tensor once, with whether it is a weight (a parameter or a normalisation statistic)
        tensors: dict[int, tuple[torch.Tensor, bool]] = {}
        for m, _, ps, bs, _ in self.modules:
            norm = isinstance(m, nn.modules.batchnorm._NormBase)
            for t, weight in [(t, True) for t in ps.values()] + [(t, norm) for t in bs.values()]:
                if t is not None and not tensors.get(id(t), (t, False))[1]:
                    tensors[id(t)] = (t, weight)
        self.tensors = [(t, t.data, t.detach().clone() if values else None, weight)
                        for t, weight in tensors.values()]

    def changed(self) -> list[str]:
        """What differs from the snapshot in the model's weights and structure: parameter and
        submodule tables, parameter and BatchNorm buffer storage, and (where copied) values.
        Attributes and other buffers are not compared: models may cache things there in forward
        (rotary tables, masks)."""
        out = []
        for m, _, params, _, children in self.modules:
            for what, now, before in (("parameters", m._parameters, params), ("submodules", m._modules, children)):
                if len(now) != len(before) or any(now.get(k, now) is not v for k, v in before.items()):
                    out.append(f"{type(m).__name__} {what} {sorted(set(now) ^ set(before)) or ''}")
        for t, data, value, weight in self.tensors:
            if not weight:
                continue
            if t.data_ptr() != data.data_ptr() or t.shape != data.shape or t.dtype != data.dtype:
                out.append(f"tensor of shape {tuple(data.shape)} replaced")
            elif value is not None and not torch.equal(t.data, value):
                out.append(f"tensor of shape {tuple(data.shape)} written in place")
        return out

    @torch.no_grad()
    def restore(self) -> None:
        """Put back every attribute, table entry, storage and (where copied) value."""
        for m, attrs, params, buffers, modules in self.modules:
            for table, before in ((m.__dict__, attrs), (m._parameters, params), (m._buffers, buffers),
                                  (m._modules, modules)):
                table.clear()
                table.update(before)
        for m, attrs, *_ in self.modules:
            for name in _HOOK_TABLES:
                if isinstance(table := attrs.get(name), dict):
                    table.clear()
        for table, before in self.hooks:
            table.update(before)
        for t, data, value, _ in self.tensors:
            if value is not None:
                data.copy_(value)
            t.data = data


@contextlib.contextmanager
def preserve_values(model: nn.Module) -> Iterator[None]:
    """Copy every parameter and buffer value of ``model`` before the body and restore them
    bit-exactly (with the structure) if the body raises. For explainers that modify the model
    temporarily (LRP canonizers merging BatchNorm); costs one copy of the model's tensors."""
    snapshot = ModelSnapshot(model, values=True)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


@contextlib.contextmanager
def grad_fp32() -> Iterator[None]:
    """Leave ``inference_mode`` and ``no_grad``, enable grad, and turn autocast off (fp32); each
    only where it is on (entering the five contexts regardless cost about 10 us per call)."""
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        if not torch.is_grad_enabled():
            stack.enter_context(torch.enable_grad())
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _cast_at_the_boundary(module: nn.Module) -> list:
    """For a model whose weights are not fp32 (Lightning's ``precision="bf16-true"``, ``"16-true"``,
    ``"64-true"``): hooks that cast the floating inputs of each call to the weights' dtype and its
    floating outputs to fp32, so the explainers' fp32 inputs, masks and baselines fit the model
    and gradients reach the fp32 inputs. Removed by the guard on exit; none for an fp32 model."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    if dtype == torch.float32:
        return []

    def cast(value, to):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(to)
        if isinstance(value, (tuple, list)):
            return type(value)(cast(v, to) for v in value)
        return value

    return [module.register_forward_pre_hook(lambda m, args, kwargs: (cast(args, dtype), cast(kwargs, dtype)),
                                             with_kwargs=True),
            module.register_forward_hook(lambda m, args, output: cast(output, torch.float32))]


@contextlib.contextmanager
def allow_nondeterministic() -> Iterator[None]:
    """Let operations without a deterministic kernel warn instead of raise while the body runs
    (``Trainer(deterministic=True)`` turns the global flag on; captum's DeepLIFT unpools max
    pooling, which has none); the flag is restored on exit."""
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True)


@contextlib.contextmanager
def model_guard(model: nn.Module, seed: int | None = None) -> Iterator[nn.Module]:
    """Context for one explainer call on ``model``; yields the unwrapped module in eval mode.

    It leaves ``inference_mode``, enables grad in fp32, forks the torch RNG (:func:`rng_guard`,
    seeded with ``seed``), switches to eval mode, casts each call's inputs to the dtype of a model
    whose weights are not fp32 and its outputs to fp32, and on exit restores every ``training`` flag,
    checks that the weights and hook tables are as before (restoring them and raising if not).
    """
    module = unwrap_model(model)
    modules = list(module.modules())   # walked once: the guard's cost per call grows with the model's size
    flags = [(m, m.training) for m in modules]
    training = any(flag for _, flag in flags)
    hooks_before = hook_count(modules)
    snapshot = ModelSnapshot(modules)
    with contextlib.ExitStack() as stack:
        stack.enter_context(grad_fp32())
        stack.enter_context(rng_guard(seed, host=False))
        if training:   # in validation the model is in eval mode already
            module.eval()
        # Lightning's compiled modules run a compiled forward; hooks added now would not run there
        compiled = getattr(module, "_compiler_ctx", None) or {}
        compiled_forward = module.__dict__.get("forward")
        if "original_forward" in compiled:
            module.forward = compiled["original_forward"]
        casts = _cast_at_the_boundary(module)
        try:
            yield module
        except BaseException:
            snapshot.restore()
            raise
        finally:
            for handle in casts:
                handle.remove()
            for m, flag in flags:   # also where the body switched a module to training
                if m.training is not flag:
                    m.training = flag
            if "original_forward" in compiled:
                module.forward = compiled_forward
    changed = snapshot.changed()
    if changed:
        snapshot.restore()
        raise RuntimeError(f"an explainer changed the model and did not undo it ({'; '.join(changed[:5])}); "
                           "the change was reverted. This is a bug in the explainer")
    left = hook_count(modules) - hooks_before   # a submodule added by the body is a change (above)
    if left:
        raise RuntimeError(f"an explainer left {left} hook(s) on the model; this is a bug in the explainer")


def input_gradient(outputs: torch.Tensor, inputs: torch.Tensor, grad_outputs: torch.Tensor | None = None,
                   create_graph: bool = False) -> torch.Tensor:
    """Gradient of ``outputs`` w.r.t. ``inputs`` only: parameters' ``.grad`` is never written."""
    if grad_outputs is None:
        grad_outputs = torch.ones_like(outputs)
    (grad,) = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, create_graph=create_graph)
    return grad
