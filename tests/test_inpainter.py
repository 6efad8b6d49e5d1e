"""GAN inpainter: mask mixture, generator, training quality, save/load, exact resume, and the
callback's do-no-harm contract with real Lightning Trainers."""
from __future__ import annotations

import types

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from xai_callbacks.callbacks.inpainter import InpainterCallback
from xai_callbacks.data import make_shortcut_digits
from xai_callbacks.guard import hook_count
from xai_callbacks.infill import get_infiller
from xai_callbacks.infill.gan import (GANInfiller, GANInpainter, InpaintGenerator, MaskSampler, load_generator,
                                      masked_l1, save_generator)
from xai_callbacks.models import Classifier, DemoCNN


@pytest.fixture(scope="module")
def digits():
    return make_shortcut_digits(artifact_class=None)


def test_mask_sampler_kinds_are_binary_seeded_and_never_empty():
    for kind in MaskSampler.KINDS:
        keep = MaskSampler(kinds=[kind])(64, 32, 24, torch.Generator().manual_seed(0))
        assert keep.shape == (64, 1, 32, 24)
        assert set(keep.unique().tolist()) <= {0.0, 1.0}
        assert (keep.flatten(1).amax(1) == 1).all(), "every mask keeps something"
        assert (keep == 0).any(), f"{kind} masks remove something"
    a = MaskSampler()(16, 32, 32, torch.Generator().manual_seed(3))
    b = MaskSampler()(16, 32, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    box = MaskSampler(kinds=["box"], box_size=(0.5, 0.5))(8, 32, 32, torch.Generator().manual_seed(1))
    assert ((1 - box).flatten(1).sum(1) == 256).all(), "a 0.5 x 0.5 box on 32 x 32 removes 16 x 16 pixels"
    with pytest.raises(ValueError, match="kinds"):
        MaskSampler(kinds=["circle"])
    with pytest.raises(ValueError, match="box_size"):
        MaskSampler(box_size=(0.5, 1.5))


def test_generator_any_size_and_infiller_keeps_known_pixels():
    g = InpaintGenerator(channels=3, width=4, value_range=(-1, 1))
    x = torch.rand(2, 3, 30, 27) * 2 - 1
    keep = MaskSampler()(2, 30, 27, torch.Generator().manual_seed(0))
    out = g(x, keep, torch.randn(2, 1, 30, 27))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    filled = GANInfiller(g)(x, keep)
    kept = keep.expand_as(x).bool()
    assert torch.equal(filled[kept], x[kept])
    assert not torch.equal(filled[~kept], x[~kept])
    with pytest.raises(ValueError, match="channels"):
        g(torch.rand(1, 1, 8, 8), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="trained generator"):
        get_infiller("gan")


def test_several_hypotheses_cover_both_answers_a_kept_part_leaves():
    """Signals whose second channel is +0.5 or -0.5 at random, whatever the first holds: with the
    second channel removed the expected answer is two-valued. Two proposals trained
    winner-takes-all settle on one value each, each is the closest half of the time, and the
    infiller draws both."""
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        first = torch.randn(n, 1, 16, generator=gen).cumsum(2) / 4
        sign = torch.randint(0, 2, (n, 1, 1), generator=gen) * 2 - 1
        return torch.cat([first, 0.5 * sign.expand(n, 1, 16)], 1)

    inp = GANInpainter(channels=2, width=8, dims=1, per_channel=True, channel_drop=1.0, adv_weight=0.0,
                       hypotheses=2, seed=0)
    for _ in range(200):
        inp.train_step(batch(64))
    x = batch(200)
    keep = torch.ones_like(x)
    keep[:, 1] = 0
    with torch.no_grad():
        proposed, logits = inp.generator.proposals(x, keep)
        filled = inp.infiller(seed=0)(x, keep)[:, 1].mean(-1)
        low, high = proposed[:, :, 1].mean((0, 2)).sort().values.tolist()
        assert abs(low + 0.5) < 0.1 and abs(high - 0.5) < 0.1, (low, high)
        chance = logits.softmax(1)           # either is the closest half of the time
        assert (chance - 0.5).abs().max() < 0.15, chance
        assert 0.3 < (filled > 0).float().mean() < 0.7 and (filled.abs() > 0.35).all()
        assert torch.equal(inp.generator(x, keep, head=torch.ones(200, dtype=torch.long)), proposed[:, 1])
    with pytest.raises(ValueError, match="hypotheses"):
        InpaintGenerator(hypotheses=0)
    with pytest.raises(ValueError, match="hypotheses"):
        InpainterCallback(hypotheses=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A few hundred steps on the training digits (about 15 s on one core)."""
    train, _ = digits
    torch.manual_seed(0)
    inp = GANInpainter(width=16, value_range=(0, 1), warmup_steps=150, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        idx = torch.randint(len(train), (16,), generator=gen)
        inp.train_step(train.x[idx])
    return inp


@pytest.mark.parametrize("masks", ["pixels", "small_boxes"])
def test_trained_inpainter_beats_mean_and_blur_on_held_out_digits(digits, trained, masks):
    _, val = digits
    x = val.x[:256]
    sampler = (MaskSampler(kinds=["pixels"]) if masks == "pixels"
               else MaskSampler(kinds=["box"], box_size=(0.1, 0.2)))
    keep = sampler(len(x), 32, 32, torch.Generator().manual_seed(5))
    with torch.no_grad():
        l1 = {name: float(masked_l1(get_infiller(spec, **opt)(x, keep), x, 1 - keep))
              for name, spec, opt in [("gan", GANInfiller(trained.generator), {}),
                                      ("mean", "constant", {"value": "mean"}), ("blur", "blur", {"sigma": 2.0})]}
    assert l1["gan"] < 0.85 * l1["blur"], l1
    assert l1["gan"] < 0.5 * l1["mean"], l1


def test_save_and_load_generator_alone(tmp_path, trained):
    path = save_generator(trained.generator, tmp_path / "g.pt")
    loaded = load_generator(path)
    x = torch.rand(4, 1, 32, 32)
    keep = MaskSampler()(4, 32, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(GANInfiller(path, seed=3)(x, keep), GANInfiller(trained.generator, seed=3)(x, keep))
    assert not loaded.training
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="save_generator"):
        load_generator(tmp_path / "bad.pt")


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_resume_restores_inpainter_exactly_core(tmp_path):
    x = torch.rand(6, 8, 1, 16, 16)
    a = GANInpainter(width=4, warmup_steps=2, seed=1)
    for i in range(3):
        a.train_step(x[i])
    torch.save(a.state_dict(), tmp_path / "state.pt")
    for i in range(3, 6):
        a.train_step(x[i])
    b = GANInpainter(width=4, warmup_steps=2, seed=7)
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for i in range(3, 6):
        b.train_step(x[i])
    for module in ("generator", "discriminator"):
        for p, q in zip(_params(getattr(a, module)), _params(getattr(b, module))):
            assert torch.equal(p, q)
    assert a.steps == b.steps == 6
    with pytest.raises(ValueError, match="generator config"):
        GANInpainter(width=8).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------- Lightning


def _loaders(digits, shuffle, n_train=96, n_val=48, batch_size=16):
    train, val = digits
    return (DataLoader(torch.utils.data.Subset(train, range(n_train)), batch_size=batch_size, shuffle=shuffle),
            DataLoader(torch.utils.data.Subset(val, range(n_val)), batch_size=batch_size))


def _fit(digits, callbacks, max_epochs=2, ckpt_path=None, root=None, checkpoint=False, shuffle=True):
    pl.seed_everything(0)
    model = Classifier(DemoCNN(width=8))
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=checkpoint,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                         num_sanity_val_steps=1)
    # shuffled training batches: the model's data order depends on the global RNG
    train_loader, val_loader = _loaders(digits, shuffle)
    trainer.fit(model, train_loader, val_loader, ckpt_path=ckpt_path)
    return model, trainer


def _callback(**kw):
    opts = dict(width=4, warmup_steps=3, value_range=(0, 1), probe_size=8, n_images=2, on_error="raise")
    opts.update(kw)
    return InpainterCallback(**opts)


def test_model_bit_identical_with_callback_and_logs(digits, tmp_path):
    plain, _ = _fit(digits, [], root=tmp_path / "a")
    cb = _callback()
    model, trainer = _fit(digits, [cb], root=tmp_path / "b")
    a, b = plain.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the callback changed the model's training"
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert hook_count(model) == 0
    assert cb.inpainter.steps == 12 and cb.batches == 12
    m = trainer.callback_metrics
    for fill in ("gan", "constant0", "blur2", "noise"):
        for metric in ("l1", "psnr", "agreement"):
            assert f"inpainter/{metric}/{fill}" in m
        assert 0 <= float(m[f"inpainter/agreement/{fill}"]) <= 1
    assert float(m["inpainter/l1/gan"]) < float(m["inpainter/l1/noise"])
    assert "inpainter/loss_d" in m and "inpainter/loss_g" in m
    pngs = sorted((tmp_path / "b").rglob("media/inpainter__examples/*.png"))
    assert len(pngs) == 2 * 2, pngs
    g = load_generator(next((tmp_path / "b").rglob("inpainter/generator.pt")))
    assert all(torch.equal(p, q) for p, q in zip(g.parameters(), cb.inpainter.generator.parameters()))
    assert cb.trained_infiller is cb.trained_infiller and cb.trained_infiller.generator is cb.inpainter.generator


def test_callback_resume_restores_inpainter_exactly(digits, tmp_path):
    full = _callback()
    _fit(digits, [full], max_epochs=2, root=tmp_path / "full", shuffle=False)
    first = _callback()
    _fit(digits, [first], max_epochs=1, root=tmp_path / "part", checkpoint=True, shuffle=False)
    ckpt = next((tmp_path / "part").rglob("*.ckpt"))
    resumed = _callback()
    _fit(digits, [resumed], max_epochs=2, root=tmp_path / "part", ckpt_path=ckpt, shuffle=False)
    assert resumed.inpainter.steps == full.inpainter.steps == 12
    # the inpainter sees only the inputs (here in a fixed order), so it continues exactly, even
    # though the model itself may differ after resume (its dropout draws differ)
    for module in ("generator", "discriminator"):
        for p, q in zip(_params(getattr(full.inpainter, module)), _params(getattr(resumed.inpainter, module))):
            assert torch.equal(p, q)
    sa, sb = full.inpainter.opt_g.state_dict()["state"], resumed.inpainter.opt_g.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_auto_infiller_is_the_gan_after_warmup_then_blur():
    assert get_infiller("auto").name.startswith("blur")
    cb = InpainterCallback(width=4, warmup_steps=1)
    assert cb.trained_infiller is None
    cb._train(torch.rand(2, 1, 16, 16), torch.device("cpu"))
    trainer = types.SimpleNamespace(callbacks=[cb])
    resolved = cb.resolve_infillers(trainer, {}, {"infiller": "auto"})["infiller"]
    assert resolved is cb.trained_infiller and resolved.name == "gan"
    assert cb.resolve_infillers(trainer, {"infiller": "noise"})["infiller"] == "noise"
    assert get_infiller("auto", gan=cb.trained_infiller) is cb.trained_infiller
    assert get_infiller("noise", gan=cb.trained_infiller).name == "noise"


def test_callback_errors_warn_and_training_goes_on(digits, tmp_path):
    cb = _callback(on_error="warn")
    cb.options["width"] = 0  # an invalid generator: every inpainter step fails
    with pytest.warns(UserWarning, match="InpainterCallback training step failed"):
        model, _ = _fit(digits, [cb], max_epochs=1, root=tmp_path)
    assert cb.errors == 6 and cb.inpainter is None
    with pytest.raises(ValueError, match="every_n_steps"):
        InpainterCallback(every_n_steps=0)


def test_gan_by_name_is_the_inpainter_being_trained():
    with pytest.raises(ValueError, match="needs a trained generator"):
        get_infiller("gan")
    trained = GANInpainter(width=4).infiller()
    assert get_infiller("gan", gan=trained) is trained
    assert isinstance(get_infiller("gan", generator=InpaintGenerator(1, width=4)), GANInfiller)


def test_fill_quality_scores_against_a_hand_computed_reference():
    from xai_callbacks.infill import ConstantInfiller
    from xai_callbacks.infill.quality import fill_quality

    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(6, 1, 8, 8)
    keep[:, :, :2] = 0
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        predicted = model(x).argmax(1)
        filled, scores = fill_quality(model, x, keep, ConstantInfiller(0.0), predicted, value_range=(0, 1))
        hole = x[:, :, :2]
        assert torch.equal(filled[:, :, 2:], x[:, :, 2:]) and (filled[:, :, :2] == 0).all()
        assert scores["l1"] == pytest.approx(float(hole.abs().mean()), rel=1e-5)
        assert scores["psnr"] == pytest.approx(float(-10 * torch.log10((hole ** 2).mean())), rel=1e-5)
        assert scores["agreement"] == pytest.approx(float((model(filled).argmax(1) == predicted).float().mean()))
        _, same = fill_quality(model, x, torch.ones_like(keep), ConstantInfiller(0.0), predicted)
    assert same["l1"] == 0 and same["agreement"] == 1
    with pytest.raises(ValueError, match="one class per sample"):
        fill_quality(model, x, keep, ConstantInfiller(0.0), predicted[:3])
