"""Targets: class indices or a target function (output, batch) -> (B,) scores, through explainers,
metrics and the callbacks (regression, multi-label, segmentation), against analytic answers."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conftest import make_trainer
from xai_callbacks.attribution import explain
from xai_callbacks.callbacks.attribution import AttributionCallback
from xai_callbacks.callbacks.base import select_probe
from xai_callbacks.callbacks.metrics import ExplanationMetricsCallback
from xai_callbacks.callbacks.spray import SpRAyCallback
from xai_callbacks.concepts import concept_relevance, conditional_heatmaps
from xai_callbacks.guard import hook_count
from xai_callbacks.metrics import pixel_flipping
from xai_callbacks.scoring import (Target, multilabel_target, regression_target, score_perturbed, segmentation_target,
                                   target_scores)


def test_target_scores_of_class_indices_and_functions():
    out = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    t = torch.tensor([1, 0])
    assert torch.equal(target_scores(out, t), torch.tensor([3.0, 2.0]))
    assert torch.allclose(target_scores(out, t, "probability"), out.softmax(1)[[0, 1], [1, 0]])
    assert torch.allclose(target_scores(out, t, "log_probability"), out.log_softmax(1)[[0, 1], [1, 0]])
    stacked = torch.cat([out, out + 10])  # two stacked copies of the two samples
    assert torch.equal(target_scores(stacked, t), torch.tensor([3.0, 2.0, 13.0, 12.0]))
    fn = Target(lambda o, batch: o[:, 0] * batch, torch.tensor([10.0, 100.0]))
    assert torch.equal(target_scores(out, fn), torch.tensor([10.0, 200.0]))
    assert torch.equal(target_scores(out[1:], fn.take([1])), torch.tensor([200.0]))
    with pytest.raises(ValueError, match=r"out of range.*2 classes"):
        target_scores(out, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="pass a target function"):
        target_scores(torch.zeros(2, 3, 4), t)
    with pytest.raises(ValueError, match="one score per sample"):
        target_scores(out, Target(lambda o, b: o, out))


def test_score_perturbed_maps_each_input_to_its_samples_target():
    model = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 3)
    sample_of = torch.arange(8) % 4
    t = torch.tensor([0, 1, 1, 0])
    got = score_perturbed(model, lambda idx: x[idx % 4] * 2, sample_of, t, batch_size=3)
    want = (model(x * 2).gather(1, t[:, None])[:, 0]).repeat(2)
    assert torch.allclose(got, want.detach())
    fn = Target(regression_target(1), x)
    got = score_perturbed(model, lambda idx: x[idx % 4], sample_of, fn, batch_size=5)
    assert torch.allclose(got, model(x)[:, 1].repeat(2).detach())


class _Layouts(nn.Module):
    """A convolution, then its output viewed as contiguous (or reshaped); records each input's layout."""

    def __init__(self, view: bool):
        super().__init__()
        self.conv, self.view, self.seen = nn.Conv2d(3, 4, 3), view, []

    def forward(self, x):
        self.seen.append(x.is_contiguous())
        h = self.conv(x)
        return (x.view(len(x), -1) if self.view else x.reshape(len(x), -1))[:, :2] + h.mean((2, 3))[:, :2]


@pytest.mark.parametrize("view", [False, True])
def test_score_perturbed_gives_the_same_scores_through_either_memory_layout(view):
    torch.manual_seed(0)
    model, x = _Layouts(view), torch.randn(10, 3, 8, 8)
    t = torch.arange(10) % 2
    want = model(x).gather(1, t[:, None])[:, 0].detach()
    model.seen.clear()
    got = score_perturbed(model, lambda idx: x[idx], torch.arange(10), t, batch_size=4)
    assert torch.allclose(got, want, atol=1e-6)
    # channels-last on the CPU; a model that views its input fails on that once, then gets it contiguous
    assert model.seen == ([False, True, True, True] if view else [False, False, False])


def test_one_channel_images_go_in_with_channels_last_strides():
    """A one-channel image is contiguous in either layout; the convolution reads its strides to
    choose one, so they must be the channels-last ones (channel stride 1), not the contiguous ones."""
    torch.manual_seed(0)
    conv, strides = nn.Conv2d(1, 4, 3), []
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(2))
    conv.register_forward_pre_hook(lambda m, args: strides.append(args[0].stride()))
    x, t = torch.randn(6, 1, 8, 8), torch.arange(6) % 2
    with torch.no_grad():
        want = model(x).gather(1, t[:, None])[:, 0]
    got = score_perturbed(model, lambda idx: x[idx], torch.arange(6), t, batch_size=6)
    assert torch.allclose(got, want, atol=1e-6)
    assert strides[0] == (64, 64, 8, 1) and strides[1] == (64, 1, 8, 1)


@pytest.mark.parametrize("make", ["vit", "mobilenet"])
def test_score_perturbed_on_torchvision_models_equals_their_forward(make):
    import torchvision

    torch.manual_seed(0)
    model = (torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=3) if make == "vit"
             else torchvision.models.mobilenet_v3_small(num_classes=3)).eval()
    x, t = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    got = score_perturbed(model, lambda idx: x[idx], torch.arange(12), t, batch_size=5)
    with torch.no_grad():
        assert torch.allclose(got, model(x).gather(1, t[:, None])[:, 0], atol=1e-5)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad",
                                    "guided_backprop", "occlusion"])
def test_regression_attributions_of_a_linear_model_are_analytic(method):
    torch.manual_seed(0)
    model = nn.Linear(12, 1)
    x = torch.randn(3, 12)
    opts = {"occlusion": {"window": 1}, "smoothgrad": {"noise_level": 0.0, "n_samples": 2}}.get(method, {})
    r = explain(model, x, regression_target(), method=method, **opts)
    w = model.weight[0].detach()
    times_x = method in ("input_x_gradient", "integrated_gradients", "occlusion")
    assert torch.allclose(r, w * x if times_x else w.expand_as(x), atol=1e-5)
    assert hook_count(model) == 0


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "gradcam", "lrp.epsilon_plus_flat",
                                    "lrp.epsilon_gamma_box", "lrp.composite", "excitation_backprop"])
def test_a_target_function_selecting_one_logit_equals_that_class_index(method):
    """Rule-based methods modify the model's own layers (captum's ReLU hooks, zennit's rules); a
    target function must reach them exactly as a class index does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).eval()
    x = torch.randn(3, 1, 8, 8)
    by_function = explain(model, x, regression_target(1), method=method)
    by_index = explain(model, x, torch.ones(3, dtype=torch.long), method=method)
    assert by_function.abs().max() > 0 and torch.allclose(by_function, by_index, atol=1e-6)
    assert hook_count(model) == 0


def test_multilabel_one_label_and_all_positive_labels():
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    x = torch.randn(3, 6)
    y = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    w = model.weight.detach()
    assert torch.allclose(explain(model, x, multilabel_target(2), method="saliency"), w[2].expand_as(x))
    r = explain(model, x, Target(multilabel_target(), (x, y)), method="saliency")
    assert torch.allclose(r, y.float() @ w)
    # LRP (zennit) with the target as the output: relevance sums to the explained score (bias-free, eps)
    net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    r = explain(net, x, Target(multilabel_target(), (x, y)), method="lrp.epsilon_gamma_box")
    score = (net(x) * y).sum(1).detach()
    assert torch.allclose(r.sum(1), score, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        explain(model, x, multilabel_target(), method="saliency")


def test_segmentation_class_logits_summed_over_a_region():
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 1, bias=False)
    x = torch.randn(2, 2, 5, 5)
    region = torch.zeros(5, 5)
    region[1:3, 1:4] = 1
    w = model.weight[1, :, 0, 0].detach().view(1, 2, 1, 1)
    r = explain(model, x, segmentation_target(1, region), method="saliency")
    assert torch.allclose(r, (w * region).expand_as(x))
    r = explain(model, x, segmentation_target(1, region), method="occlusion", window=1)
    assert torch.allclose(r, ((w * x).sum(1, keepdim=True) * region).expand_as(x), atol=1e-5)
    masks = {"object_mask": region.expand(2, 5, 5)}
    r = explain(model, x, Target(segmentation_target(1, "object_mask"), {"x": x, "object_mask": masks["object_mask"]}),
                method="saliency")
    assert torch.allclose(r, (w * region).expand_as(x))


def test_metric_with_a_regression_target_is_the_analytic_removal_curve():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False))
    x = torch.rand(2, 1, 4, 4)
    contributions = (model[1].weight.view(1, 1, 4, 4) * x).detach()
    res = pixel_flipping(model, x, regression_target(), contributions, n_steps=None, output="logit")
    order = contributions.flatten(1).argsort(1, descending=True)
    remaining = contributions.flatten(1).sum(1, keepdim=True) - torch.cat(
        [torch.zeros(2, 1), contributions.flatten(1).gather(1, order).cumsum(1)], 1)
    assert torch.allclose(res.curves, remaining, atol=1e-5)


# --------------------------------------------------------------------------- callbacks, real Trainer
class Tensors(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class Module(pl.LightningModule):
    def __init__(self, n_out, loss):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, n_out))
        self.loss = loss

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return self.loss(self(batch["x"]), batch["y"])

    def validation_step(self, batch, _):
        self.log("val_loss", self.loss(self(batch["x"]), batch["y"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data(kind, n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 8, 8, generator=g)
    if kind == "multilabel":
        y = (torch.rand(n, 3, generator=g) > 0.5).float()
        y[y.sum(1) == 0, 2] = 1.0  # every sample has a positive label: no all-zero heatmaps
        return x, y, Module(3, nn.functional.binary_cross_entropy_with_logits), multilabel_target()
    y = x.mean((1, 2, 3))[:, None]
    return x, y, Module(1, nn.functional.mse_loss), regression_target()


@pytest.mark.parametrize("kind", ["multilabel", "regression"])
def test_callbacks_explain_and_score_multilabel_and_regression_models(tmp_path, kind):
    x, y, module, target = _data(kind)
    loader = DataLoader(Tensors(x, y), batch_size=16)
    callbacks = [AttributionCallback(methods=["saliency", "occlusion"], method_options={"occlusion": {"window": 4}},
                                     probe_size=8, target=target, on_error="raise"),
                 ExplanationMetricsCallback(methods=["saliency"], probe_size=8, target=target, on_error="raise",
                                            metrics=[{"name": "pixel_flipping", "n_steps": 4, "output": "logit"},
                                                     "sparseness"]),
                 SpRAyCallback(method="saliency", max_per_class=12, target=target, save_virelay=False, evidence=False,
                               spray_options={"k": 3, "visualisation": None}, on_error="raise")]
    with pytest.warns(UserWarning, match="stratified by each sample's first label value"):
        trainer = make_trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=2)
        trainer.fit(module, loader, loader)
    assert all(cb.errors == 0 for cb in callbacks)
    assert callbacks[0].heatmaps["occlusion"].shape == (8, 1, 8, 8)
    assert torch.isfinite(torch.tensor(callbacks[1].values["xai/saliency/pixel_flipping_morf_aopc.constant0"]))
    assert callbacks[2].results, "SpRAy analysed at least one group"


def test_probe_of_multilabel_labels_is_stratified_by_the_first_label():
    _, y, _, _ = _data("multilabel", n=40)
    data = Tensors(torch.zeros(40, 1), y)
    picked = select_probe(data, 10, seed=0)
    first = y[picked, 0]
    assert len(picked) == 10 and abs(int(first.sum()) - 5) <= 1


def test_label_target_with_non_class_labels_names_the_fix(tmp_path):
    x, y, module, _ = _data("regression")
    cb = AttributionCallback(methods=["saliency"], probe_size=4, on_error="raise")
    loader = DataLoader(Tensors(x, y), batch_size=16)
    with pytest.raises(ValueError, match="needs class ids.*regression_target"):
        make_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1).fit(module, loader, loader)


def test_a_huggingface_dict_batch_is_refused_with_what_to_rename():
    from xai_callbacks.data import unpack_batch

    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4), "labels": [0, 1]}
    with pytest.raises(ValueError, match=r"missing \['x', 'y'\]\); got keys \['attention_mask', 'input_ids', "
                                         r"'labels'\]; a HuggingFace batch .* renamed in the DataLoader's collate_fn"):
        unpack_batch(batch)
    with pytest.raises(ValueError, match=r"missing \['y'\]\); got keys \['x'\]$"):
        unpack_batch({"x": torch.zeros(2)})


# --------------------------------------------------------------------------- binary classifiers with one logit
class _OneLogit(nn.Module):
    """A binary classifier with one logit per sample, (N, 1), or squeezed to (N,)."""

    def __init__(self, squeeze: bool = False, n_out: int = 1):
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 8 * 8, n_out)
        self.squeeze = squeeze

    def forward(self, x):
        out = self.fc(self.relu(self.conv(x)).flatten(1))
        return out[:, 0] if self.squeeze else out


def _two_class_twin(model: _OneLogit) -> _OneLogit:
    """The same network with two outputs, -z / 2 and z / 2: the two-class classifier it stands for."""
    twin = _OneLogit(n_out=2)
    twin.conv.load_state_dict(model.conv.state_dict())
    with torch.no_grad():
        twin.fc.weight.copy_(torch.cat([model.fc.weight * -0.5, model.fc.weight * 0.5]))
        twin.fc.bias.copy_(torch.cat([model.fc.bias * -0.5, model.fc.bias * 0.5]))
    return twin.eval()


@pytest.mark.parametrize("squeeze", [False, True], ids=["(N, 1)", "(N,)"])
def test_a_binary_classifier_with_one_logit_is_explained_as_its_two_class_twin(squeeze):
    torch.manual_seed(0)
    model = _OneLogit(squeeze).eval()
    twin = _two_class_twin(model)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 1, 0])
    for method, options in [("saliency", {}), ("integrated_gradients", {}), ("lrp.epsilon_plus_flat", {}),
                            ("occlusion", {"window": 2}), ("gradcam", {"layer": "conv"})]:
        got, want = (explain(m, x, y, method=method, **options) for m in (model, twin))
        assert want.abs().max() > 0 and torch.allclose(got, want, atol=1e-6), method
    z = model(x).detach().reshape(-1)
    predicted = explain(model, x, None, method="input_x_gradient")   # the predicted class: the sign of z
    assert torch.equal(predicted, explain(model, x, (z > 0).long(), method="input_x_gradient"))
    assert not torch.allclose(predicted, explain(model, x, (z <= 0).long(), method="input_x_gradient"))
    # probabilities are the sigmoid the model was trained for: sigmoid(z) for class 1, 1 - sigmoid(z) for class 0
    p = score_perturbed(model, lambda idx: x[idx], torch.arange(6), y, output="probability")
    assert torch.allclose(p, torch.where(y == 1, z.sigmoid(), 1 - z.sigmoid()), atol=1e-6)
    # concept relevance (LRP at a layer) reads it the same way
    got, want = (concept_relevance(m, x, y, "conv") for m in (model, twin))
    assert torch.allclose(got.relevance, want.relevance, atol=1e-6) and torch.allclose(got.heatmap, want.heatmap,
                                                                                       atol=1e-6)
    assert torch.allclose(conditional_heatmaps(model, x, y, "conv", torch.tensor([0, 2])),
                          conditional_heatmaps(twin, x, y, "conv", torch.tensor([0, 2])), atol=1e-6)
    # a target function sees the model's own output: the logit itself
    r = explain(model, x, regression_target(), method="input_x_gradient")
    assert torch.allclose(r, 2 * explain(twin, x, torch.ones(6, dtype=torch.long), method="input_x_gradient"),
                          atol=1e-6)
    assert hook_count(model) == 0


def test_callbacks_read_a_binary_classifier_with_one_logit_and_float_labels(tmp_path):
    """A classifier trained with BCEWithLogitsLoss: one logit, float labels 0. / 1."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).float()
    module = Module(1, lambda out, t: nn.functional.binary_cross_entropy_with_logits(out[:, 0], t))
    loader = DataLoader(Tensors(x, y), batch_size=32)
    callbacks = [AttributionCallback(methods=["input_x_gradient"], probe_size=8, on_error="raise"),
                 ExplanationMetricsCallback(methods=["saliency"], probe_size=8, on_error="raise",
                                            metrics=[{"name": "pixel_flipping", "n_steps": 4}]),
                 SpRAyCallback(method="saliency", max_per_class=40, save_virelay=False,
                               spray_options={"k": 3, "visualisation": None}, on_error="raise")]
    make_trainer(tmp_path, callbacks, max_epochs=1).fit(module, loader, loader)
    assert all(cb.errors == 0 for cb in callbacks)
    probe = callbacks[0].probe(None, module)
    assert probe.y.dtype == torch.float32 and set(probe.y.tolist()) == {0.0, 1.0}
    twin = nn.Sequential(module.net, nn.Linear(1, 2)).eval()   # -z / 2, z / 2 as an explicit layer
    with torch.no_grad():
        twin[1].weight.copy_(torch.tensor([[-0.5], [0.5]]))
        twin[1].bias.zero_()
    want = explain(twin, probe.x, probe.y.long(), method="input_x_gradient")
    assert torch.allclose(callbacks[0].heatmaps["input_x_gradient"], want, atol=1e-6)
    assert torch.isfinite(torch.tensor(callbacks[1].values["xai/saliency/pixel_flipping_morf_aopc.constant0"]))
    spray = callbacks[2]
    assert sorted(spray.results) == [0, 1] and spray.results[0].evidence is not None


def test_a_binary_token_classifier_with_one_logit_is_explained_per_token_as_two_classes():
    class Bag(nn.Module):   # one logit from the mean of its tokens' vectors (a binary sentiment model)
        def __init__(self, n_out):
            super().__init__()
            self.embedding, self.head = nn.Embedding(30, 4), nn.Linear(4, n_out)

        def forward(self, tokens):
            return self.head(self.embedding(tokens).mean(1))

    torch.manual_seed(0)
    model, twin = Bag(1).eval(), Bag(2).eval()
    twin.embedding.load_state_dict(model.embedding.state_dict())
    with torch.no_grad():
        twin.head.weight.copy_(torch.cat([model.head.weight * -0.5, model.head.weight * 0.5]))
        twin.head.bias.copy_(torch.cat([model.head.bias * -0.5, model.head.bias * 0.5]))
    tokens, y = torch.randint(0, 30, (4, 6)), torch.tensor([0, 1, 1, 0])
    for method in ("input_x_gradient", "lrp.epsilon_plus_flat"):
        got, want = explain(model, tokens, y, method=method), explain(twin, tokens, y, method=method)
        assert got.shape == (4, 6) and want.abs().max() > 0 and torch.allclose(got, want, atol=1e-6), method
