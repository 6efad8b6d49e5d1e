"""Randomisation: does the heatmap depend on what the model learned? Lower similarity is better.

* model parameter randomisation test (Adebayo et al. 2018), cascading: on a deep copy of the
  model, re-initialise the layers one after another (``top_down`` from the output layer, or
  ``bottom_up``) and after each step compare the heatmap with the original one (Spearman rank
  correlation by default). The score is the mean similarity over the steps; the curve is the
  similarity after 1..L randomised layers. The trained model is never touched.
* random logit (Sixt et al. 2020): similarity between the heatmap of the explained class and the
  heatmap of a random other class.

Re-initialisation uses each layer's ``reset_parameters`` (or a normal draw for layers without
one) from a fixed seed, inside :func:`~xai_callbacks.guard.rng_guard`, so the global RNG is
untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from ..attribution import model_scores
from ..guard import model_guard, rng_guard, unwrap_model
from ..scoring import Target
from .base import SIMILARITIES, CurveResult, ExplanationMetric, check_choice, copy_model, explain_stacked, prepare

__all__ = ["parameter_layers", "model_parameter_randomisation", "random_logit", "ModelParameterRandomisation",
           "RandomLogit"]

ORDERS = ("top_down", "bottom_up")


def parameter_layers(model: nn.Module, order: str = "top_down") -> list[str]:
    """Names of the submodules that own parameters, in randomisation order."""
    check_choice(order, ORDERS, "layer_order", "model_parameter_randomisation")
    names = [n for n, m in unwrap_model(model).named_modules() if any(True for _ in m.parameters(recurse=False))]
    if not names:
        raise ValueError("model_parameter_randomisation: the model has no parameters to randomise")
    return names[::-1] if order == "top_down" else names


def _randomise(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    else:
        for p in module.parameters(recurse=False):
            nn.init.normal_(p, std=0.1)


def model_parameter_randomisation(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *,
                                  method: str, method_options: dict | None = None, layer_order: str = "top_down",
                                  similarity: str = "spearman", batch_size: int = 256, seed: int = 0) -> CurveResult:
    """Cascading model parameter randomisation: mean similarity (B,) and similarity per step (B, L).

    Args:
        model: the classifier (copied; the original is not modified).
        x: images (B, C, H, W).
        target: explained class, int or (B,); None for the predicted class.
        relevance: heatmaps of ``x`` for ``target`` by ``method`` on the trained model.
        method: the explainer that re-explains on the randomised copies.
        method_options: options of ``method``.
        layer_order: ``top_down`` (output layer first) or ``bottom_up``.
        similarity: ``spearman``, ``pearson`` or ``cosine`` between flattened pixel heatmaps.
        batch_size: samples explained per call.
        seed: seed of the re-initialisation.
    """
    compare = SIMILARITIES[check_choice(similarity, SIMILARITIES, "similarity", "model_parameter_randomisation")]
    x, target, r = prepare(model, x, target, relevance, "model_parameter_randomisation")
    names = parameter_layers(model, layer_order)
    randomised = copy_model(model)
    steps = []
    for i, name in enumerate(names):
        with rng_guard(seed + i), torch.no_grad():
            _randomise(randomised.get_submodule(name))
        rr = explain_stacked(randomised, x, target, method, method_options, batch_size)
        steps.append(compare(r.flatten(1), rr.flatten(1)))
    curves = torch.stack(steps, 1)
    fractions = torch.arange(1, len(names) + 1, dtype=torch.float64)
    return CurveResult(curves.mean(1), curves, fractions)


def random_logit(model: nn.Module, x: torch.Tensor, target, relevance: torch.Tensor, *, method: str,
                 method_options: dict | None = None, similarity: str = "spearman", batch_size: int = 256,
                 seed: int = 0) -> torch.Tensor:
    """Random-logit similarity (B,) between the heatmap of ``target`` and that of a random other
    class (drawn from ``seed``). Arguments as in :func:`model_parameter_randomisation`."""
    compare = SIMILARITIES[check_choice(similarity, SIMILARITIES, "similarity", "random_logit")]
    x, target, r = prepare(model, x, target, relevance, "random_logit")
    if isinstance(target, Target):
        raise ValueError("random_logit compares the heatmaps of two classes and needs class-index targets "
                         "(an int or a LongTensor (B,)); got a target function")
    with model_guard(model) as module, torch.no_grad():
        n_classes = model_scores(module, x[:1]).shape[1]
    if n_classes < 2:
        raise ValueError("random_logit needs a model with at least 2 classes")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    other = (target + torch.randint(1, n_classes, target.shape, generator=gen, device=x.device)) % n_classes
    rr = explain_stacked(model, x, other, method, method_options, batch_size)
    return compare(r.flatten(1), rr.flatten(1))


class ModelParameterRandomisation(ExplanationMetric):
    """Model parameter randomisation, logged as ``model_parameter_randomisation`` (the mean
    similarity to the original heatmap; lower is better); the per-layer curve via
    :meth:`compute_curve`, over ``curve_axis`` "randomised layers". Arguments as in
    :func:`model_parameter_randomisation`.

    Args:
        model, method, method_options, layer_order, similarity, batch_size, seed, **kwargs: as in
            :func:`model_parameter_randomisation`.

    Raises:
        ValueError: an unknown ``layer_order`` or ``similarity`` (the message names the valid values).

    Example: ``metric = ModelParameterRandomisation(model, method="saliency")``, updated and computed like
        any metric; ``compute_curve()`` over the randomised layers.
    """

    name = "model_parameter_randomisation"
    curve_axis = "randomised layers"
    needs_method = True
    higher_is_better = False

    def __init__(self, model: nn.Module, method: str, method_options: dict | None = None,
                 layer_order: str = "top_down", similarity: str = "spearman", batch_size: int = 256, seed: int = 0,
                 **kwargs):
        n_layers = len(parameter_layers(model, layer_order)) if isinstance(model, nn.Module) else 0
        super().__init__(model, n_curve_points=n_layers, **kwargs)
        check_choice(similarity, SIMILARITIES, "similarity", self.name)
        self.method, self.method_options = method, dict(method_options or {})
        self.layer_order, self.similarity, self.batch_size, self.seed = layer_order, similarity, batch_size, seed

    def scores(self, x, target, relevance, masks=None):
        return model_parameter_randomisation(self.model, x, target, relevance, method=self.method,
                                             method_options=self.method_options, layer_order=self.layer_order,
                                             similarity=self.similarity, batch_size=self.batch_size, seed=self.seed)


class RandomLogit(ExplanationMetric):
    """Random-logit similarity, logged as ``random_logit_similarity`` (lower is better).

    Args:
        model, method, method_options, similarity, batch_size, seed, **kwargs: as in
            :func:`random_logit`.

    Raises:
        ValueError: an unknown ``similarity`` (the message names the valid values).

    Example: ``metric = RandomLogit(model, method="saliency", similarity="pearson")``, updated and
        computed like any metric; explains a random other class.
    """

    name = "random_logit_similarity"
    needs_method = True
    higher_is_better = False

    def __init__(self, model: nn.Module, method: str, method_options: dict | None = None,
                 similarity: str = "spearman", batch_size: int = 256, seed: int = 0, **kwargs):
        super().__init__(model, **kwargs)
        check_choice(similarity, SIMILARITIES, "similarity", self.name)
        self.method, self.method_options = method, dict(method_options or {})
        self.similarity, self.batch_size, self.seed = similarity, batch_size, seed

    def scores(self, x, target, relevance, masks=None):
        return random_logit(self.model, x, target, relevance, method=self.method, method_options=self.method_options,
                            similarity=self.similarity, batch_size=self.batch_size, seed=self.seed)
