"""The names the docstring examples of ``xai_callbacks`` use (``--doctest-modules``): a small
CNN, a batch of real digits (two classes, half of class 0 watermarked), their labels, a keep mask
and the model's relevance. Built once, only for the examples."""
from __future__ import annotations

import functools

import pytest


@pytest.fixture(autouse=True)
def _example_names(request, doctest_namespace):
    if isinstance(request.node, pytest.DoctestItem):
        doctest_namespace.update(_names())


@functools.cache
def _names() -> dict:
    import torch

    from xai_callbacks.attribution import explain
    from xai_callbacks.data import make_shortcut_digits
    from xai_callbacks.models import DemoCNN
    from xai_callbacks.spray.evidence import sample_evidence

    torch.manual_seed(0)
    model = DemoCNN(width=8).eval()
    _, val = make_shortcut_digits(artifact_fraction=0.5)
    rows = torch.cat([torch.nonzero(val.targets == c)[:20, 0] for c in (0, 1)])
    x, y = val.x[rows], val.targets[rows]
    keep = torch.ones_like(x)
    keep[..., 8:24, 8:24] = 0          # the centre removed
    relevance = explain(model, x, y, method="input_x_gradient")
    return dict(torch=torch, model=model, x=x, y=y, labels=y.numpy(), keep=keep, relevance=relevance,
                heatmaps=relevance, heatmaps_of_one_class=relevance[y == 0],
                evidence=sample_evidence(model, x, relevance, y.numpy()), rows=torch.arange(20).numpy())
