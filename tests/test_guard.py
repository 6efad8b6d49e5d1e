"""The do-no-harm guard when a method fails half-way: every parameter, buffer, attribute and
submodule of the model is as it was, bit for bit, and its forward output is identical."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm

from xai_callbacks.attribution import explain, lrp as lrp_module
from xai_callbacks.guard import ModelSnapshot, hook_count, model_guard


def bn_net() -> nn.Module:
    """Bias-free convolutions followed by BatchNorms with non-trivial statistics: merging the
    BatchNorms changes the weights and adds a bias to each convolution."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return net


def state(model: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "objects": {k: v for k, v in model.state_dict(keep_vars=True).items()},
        "attrs": {n: set(m.__dict__) for n, m in model.named_modules()},
        "params": {n: set(m._parameters) for n, m in model.named_modules()},
    }


def assert_same(model: nn.Module, before: dict, x: torch.Tensor, out_before: torch.Tensor):
    now = model.state_dict(keep_vars=True)
    assert now.keys() == before["tensors"].keys(), "parameters or buffers added or removed"
    for k, v in before["tensors"].items():
        assert now[k] is before["objects"][k], f"{k} is another object"
        assert torch.equal(now[k].detach(), v.detach()), f"{k} changed"
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == before["attrs"], "attributes left behind"
    assert {n: set(m._parameters) for n, m in model.named_modules()} == before["params"]
    assert hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), out_before), "forward output changed"


class FailHalfway(SequentialMergeBatchNorm):
    """Merges the first BatchNorm (zennit swaps the conv's weight and adds a bias), writes into
    another weight in place, puts an attribute on a module, then fails."""

    def apply(self, root_module):
        instances = super().apply(root_module)[:1]
        root_module[3].weight.data.mul_(2.0)
        root_module[4].running_var.data.add_(1.0)
        root_module[3].forward = lambda x: x
        raise RuntimeError("canonizer failed half-way")


def explain_with_failing_canonizer(monkeypatch, model: nn.Module, x: torch.Tensor, canonizer, method: str,
                                   match: str) -> None:
    """Explain with ``canonizer`` as the only LRP canonizer, expect it to fail with ``match``, and
    check the model is exactly as it was (tensors, attributes, hooks, forward output)."""
    with torch.no_grad():
        out = model(x)
    before = state(model)
    monkeypatch.setattr(lrp_module, "default_canonizers", lambda model, example: [canonizer])
    with pytest.raises(RuntimeError, match=match):
        explain(model, x, 1, method=method)
    assert_same(model, before, x, out)


@pytest.mark.parametrize("method", ["lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box", "lrp.epsilon_alpha2_beta1"])
def test_canonizer_failing_halfway_leaves_nothing_behind(monkeypatch, method):
    model = bn_net().eval()
    explain_with_failing_canonizer(monkeypatch, model, torch.rand(2, 1, 8, 8), FailHalfway(), method, "failed half-way")
    assert model[0].bias is None and model[3].bias is None, "a merged bias was left on a convolution"


def test_order_based_merge_on_densenet_fails_and_is_undone(monkeypatch):
    """zennit's order-based merge pairs a DenseNet layer's last convolution with the next layer's
    BatchNorm, which reads a concatenation: it fails half-way with a shape error."""
    tv = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = tv.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3).eval()
    explain_with_failing_canonizer(monkeypatch, model, torch.rand(2, 3, 16, 16), SequentialMergeBatchNorm(),
                                   "lrp.epsilon_plus_flat", "size of tensor")


def test_guard_restores_structure_without_value_copies():
    """The per-call snapshot holds references only; it undoes swapped ``.data``, added
    parameters, buffers, submodules, attributes and hooks."""
    model = bn_net().train()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        out = model.eval()(x)
    model.train()
    before = state(model)
    with pytest.raises(KeyError):
        with model_guard(model) as m:
            m[0].weight.data = torch.zeros_like(m[0].weight)
            m[0].bias = nn.Parameter(torch.ones(4))
            m[1].register_buffer("extra", torch.ones(1))
            m[2].extra_module = nn.Linear(1, 1)
            m[5].forward = lambda t: t * 0
            m[4].running_mean = torch.zeros(4)
            m[3].register_forward_hook(lambda *a: None)
            m[3].register_full_backward_hook(lambda *a: None)
            raise KeyError("fail")
    assert all(m.training for m in model.modules())
    model.eval()
    assert_same(model, before, x, out)


def test_guard_reverts_and_reports_a_change_a_method_did_not_undo():
    model = bn_net().eval()
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        out = model(x)
    before = state(model)
    with pytest.raises(RuntimeError, match="changed the model"):
        with model_guard(model) as m:
            m[0].bias = nn.Parameter(torch.ones(4))
    assert_same(model, before, x, out)
    # a submodule left behind (with a hook on it) is reverted as well
    with pytest.raises(RuntimeError, match="changed the model.*submodules"):
        with model_guard(model) as m:
            m[2].probe = nn.Identity()
            m[2].probe.register_forward_hook(lambda *a: None)
    assert "probe" not in model[2]._modules
    assert_same(model, before, x, out)


def test_guard_restores_training_flags_an_explainer_switched_on_a_model_in_eval_mode():
    model = bn_net().eval()   # as in validation: the guard does not switch it
    with model_guard(model) as m:
        m[4].train()
    assert not any(m.training for m in model.modules())


def test_snapshot_with_values_sees_in_place_writes():
    model = bn_net()
    snap = ModelSnapshot(model, values=True)
    assert snap.changed() == []
    with torch.no_grad():
        model[3].weight.mul_(3.0)
    assert any("in place" in c for c in snap.changed())
    snap.restore()
    assert snap.changed() == []


def test_training_goes_on_unchanged_after_a_canonizer_fails_in_the_callback(tmp_path, monkeypatch):
    """The reported failure: LRP on a DenseNet with an order-based BatchNorm merge failed half-way
    inside AttributionCallback and left the model broken, so the next training step crashed even
    with on_error='warn'. Now the failure is counted and the weights equal a run without it."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import make_trainer
    from xai_callbacks import AttributionCallback
    from xai_callbacks.models import Classifier

    tv = pytest.importorskip("torchvision.models")
    monkeypatch.setattr(lrp_module, "default_canonizers", lambda model, example=None: [SequentialMergeBatchNorm()])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(24, 3, 16, 16, generator=g), torch.arange(24) % 3)

    def fit(callbacks):
        pl.seed_everything(0, verbose=False)
        module = Classifier(tv.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                        num_classes=3))
        trainer = make_trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
        return module.state_dict()

    cb = AttributionCallback(methods=["lrp.epsilon_plus_flat"], probe_size=6, save_heatmaps=False)
    with pytest.warns(UserWarning, match="size of tensor"):
        with_cb = fit([cb])
    assert cb.errors == 2
    without = fit([])
    assert with_cb.keys() == without.keys()
    for k, v in without.items():
        assert torch.equal(with_cb[k], v), f"{k} differs from the run without the callback"
