"""A real-photo shortcut and its clean control: the default SpRAy flag and gate catch the one and pass
the other; plus the scenario generators and the evidence module on their own."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_trainer
from xai_callbacks.attribution import explain
from xai_callbacks.callbacks.gate import ExplanationGate
from xai_callbacks.callbacks.spray import SpRAyCallback
from xai_callbacks.cli import main
from xai_callbacks.data import SHORTCUT_KINDS, make_shortcut_images, make_shortcut_rows, plant_shortcut
from xai_callbacks.data.rows import TRIGGER
from xai_callbacks.models import Classifier, DemoCNN
from xai_callbacks.infill import gaussian_blur
from xai_callbacks.scoring import score_perturbed
from xai_callbacks.spray.evidence import (AREAS, COMPONENTS, CONTROL, DEFAULT_COMPONENTS, MAJORITY_SEPARATION,
                                          MIN_SEPARATION, OVER_OTHERS_RISE, SHARED, border_mask, group_sizes,
                                          held_out_separation, relevance_regions, sample_evidence,
                                          separated_group, shared_detail, transfer)

OPTIONS = dict(kind="stamp", n_per_class=200, ambiguity=0.4, seed=0)


def trained(prevalence, tmp_path):
    train, val = make_shortcut_images(prevalence=prevalence, **OPTIONS)
    torch.manual_seed(0)
    module = Classifier(DemoCNN(in_channels=3, n_classes=4, width=8), lr=3e-3)
    make_trainer(tmp_path, max_epochs=8).fit(module, DataLoader(train, batch_size=32, shuffle=True))
    return module, val


def analyse(module, val, folder):
    cb = SpRAyCallback(max_per_class=60, spray_options={"visualisation": None}, save_virelay=False)
    gate = ExplanationGate(action="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gate's failure warning on the shortcut run
        make_trainer(folder, [cb, gate]).validate(module, DataLoader(val, batch_size=64), verbose=False)
    return cb, gate


def test_photo_stamp_is_flagged_and_gated_its_clean_control_passes(tmp_path):
    module, val = trained(0.3, tmp_path / "shortcut")
    # the model uses the stamp: pasted onto other classes it moves them into class 0
    other = val.targets != 0
    module.eval()
    with torch.no_grad():
        before = module(val.clean_x[other]).argmax(1)
        after = module(plant_shortcut(val.clean_x[other], "stamp")[0]).argmax(1)
    moved = float(((before != 0) & (after == 0)).sum() / (before != 0).sum())
    print(f"stamp pasted onto other classes moves {moved:.2f} of them into class 0")
    assert moved >= 0.3
    cb, gate = analyse(module, val, tmp_path / "shortcut")
    idx = np.array(cb.sample_indices)
    labels, has = val.targets.numpy()[idx], val.has_artifact.numpy()[idx]
    r = cb.results[0]
    in_flagged = np.isin(r.labels, np.flatnonzero(r.flagged))
    has0 = has[labels == 0]
    print("shortcut run, class 0: sizes", r.cluster_sizes, "transfer", r.evidence.transfer_rate, "drop",
          r.evidence.score_drop, "flagged", r.flagged)
    assert (has0 & in_flagged).sum() / has0.sum() >= 0.9, f"recall; transfer {r.evidence.transfer_rate}"
    assert (has0 & in_flagged).sum() / in_flagged.sum() >= 0.8, "purity"
    assert not any(cb.results[c].flagged.any() for c in (1, 2, 3)), "a strategy of a clean class was flagged"
    # the class's strongest group over its threshold: at least 1 where flagged, how close the others came
    assert r.evidence.separation_ratio >= 1 > max(cb.results[c].evidence.separation_ratio for c in (1, 2, 3))
    assert gate.passed is False and main(["gate", str(tmp_path / "shortcut")]) == 1
    # the regions are located by gradient x input (evidence_regions), relative to the class's median
    x0 = val.x[idx[labels == 0]]
    heat = explain(module, x0, torch.zeros(len(x0), dtype=torch.long), method="input_x_gradient").sum(1)
    share = heat.clamp_min(0) / heat.clamp_min(0).flatten(1).sum(1).view(-1, 1, 1)
    expected = [relevance_regions(heat, share.median(0).values, area=a) for a in AREAS]
    expected.append(border_mask(heat.shape[1:]).expand_as(heat))   # the border, a region of a fixed place
    regions = r.evidence.regions
    assert all(any(torch.equal(regions[i], e[i]) for e in expected) for i in range(len(regions)))
    assert torch.equal(regions[in_flagged], expected[0][in_flagged]), "described by the first area that confirms"

    module, val = trained(0.0, tmp_path / "clean")
    cb, gate = analyse(module, val, tmp_path / "clean")
    assert sorted(cb.results) == [0, 1, 2, 3]
    for c, r in cb.results.items():
        assert not r.flagged.any(), f"clean control, class {c}: transfer {r.evidence.transfer_rate}"
        assert 0 <= r.evidence.separation_ratio < 1
    assert gate.passed is True and main(["gate", str(tmp_path / "clean")]) == 0


def test_photo_stamp_on_all_of_a_class_is_flagged_and_gated(tmp_path):
    """The stamp on every sample of class 0: part of the class's median, so every comparison with
    class mates cancels it; each sample's region over the other classes carries class 0 into the
    other classes' samples far better than their content there, and the class is flagged."""
    module, val = trained(1.0, tmp_path)
    cb, gate = analyse(module, val, tmp_path)
    r = cb.results[0]
    in_flagged = np.isin(r.labels, np.flatnonzero(r.flagged))
    print("all of class 0 stamped: flagged", in_flagged.mean(), "separation ratios",
          [cb.results[c].evidence.separation_ratio for c in range(4)])
    assert in_flagged.mean() >= 0.9 and r.evidence.component[r.flagged].tolist() == ["region"]
    assert r.evidence.separation_ratio >= 1 > max(cb.results[c].evidence.separation_ratio for c in (1, 2, 3))
    assert gate.passed is False and main(["gate", str(tmp_path)]) == 1
    # without that region the class mates' check alone misses it
    module.eval()
    idx = np.array(cb.sample_indices)
    x, y = val.x[idx], val.targets[idx]
    heat = explain(module, x, y, method="input_x_gradient")
    alone = sample_evidence(module, x, heat, y.numpy(), class_area=0)
    assert alone.confirmed[y.numpy() == 0].mean() < 0.5


def test_scenarios_plant_each_kind_at_its_prevalence_with_a_clean_twin():
    for kind in SHORTCUT_KINDS:
        photos = ("coffee", "chelsea", "astronaut") if kind == "grey" else 4   # the textures have no colour
        train, val = make_shortcut_images(kind, classes=photos, n_per_class=20, prevalence=0.5, seed=1)
        for split in (train, val):
            has = split.has_artifact
            assert not has[split.targets != 0].any()
            assert has[split.targets == 0].float().mean() == pytest.approx(0.5, abs=0.05)
            changed = (split.x - split.clean_x).abs().flatten(1).amax(1) > 0
            assert changed[has].float().mean() > 0.9 and not changed[~has].any(), kind
    clean_train, _ = make_shortcut_images("stamp", n_per_class=20, prevalence=0.0, seed=1)
    train, _ = make_shortcut_images("stamp", n_per_class=20, prevalence=0.5, seed=1)
    assert torch.equal(clean_train.x, train.clean_x), "the clean control is the same images without the shortcut"
    with pytest.raises(ValueError, match="unknown shortcut kind"):
        make_shortcut_images("sticker")
    with pytest.raises(ValueError, match="object_mask"):
        plant_shortcut(torch.zeros(1, 3, 8, 8), "background")
    with pytest.raises(ValueError, match="grey.*no colour"):
        make_shortcut_images("grey", n_per_class=20)   # brick, grass, gravel and moon are grey photos


def test_the_kinds_not_calibrated_on_plant_where_they_say():
    x = torch.full((6, 3, 32, 32), 0.5)
    caption, m_caption = plant_shortcut(x, "caption", seed=1)
    assert torch.equal(m_caption[0], m_caption[5]) and m_caption[:, :, -8:, -10:].sum() == 6 * 63   # 9x7, bottom right
    assert caption[0, :, -8:-1, -10:-1].amax() == 1 and caption[0, :, -8:-1, -10:-1].amin() < 0.1
    line, m_line = plant_shortcut(x, "line", seed=1)
    rows = m_line[:, 0].amax(2).argmax(1)
    assert (m_line.flatten(1).sum(1) == 32).all() and len(rows.unique()) > 1   # one row each, not the same row
    assert torch.equal(line[0, :, rows[0]], torch.tensor([1.0, 0.0, 1.0])[:, None].expand(3, 32))
    _, m_marker = plant_shortcut(x, "marker", seed=1)
    assert len({tuple(torch.nonzero(m[0])[0].tolist()) for m in m_marker}) > 1   # a disc at a random place
    vignette, m_vignette = plant_shortcut(x, "vignette")
    assert (m_vignette == 1).all() and vignette[0, 0, 0, 0] < 0.25 and vignette[0, 0, 16, 16] > 0.49
    edge, m_edge = plant_shortcut(torch.zeros(2, 1, 32, 32), "edge")
    assert (edge[:, :, :, :3] == 0.5).all() and (edge[:, :, :, 3:] == 0).all() and m_edge.sum() == 2 * 96
    logo, m_logo = plant_shortcut(x, "logo")   # a quarter of the side, top right, one pixel in
    assert torch.equal(m_logo[:, 0, 1:9, 23:31], torch.ones(6, 8, 8)) and m_logo.sum() == 6 * 64
    assert torch.equal(logo[0], logo[5]) and (logo[0, :, 1:9, 23:31] - 0.5).abs().amax() > 0.3
    assert torch.equal(logo * (1 - m_logo), x * (1 - m_logo))   # nothing else changed
    grey, _ = plant_shortcut(torch.full((1, 1, 64, 64), 0.5), "logo")
    assert grey[0, 0, 1:17, 47:63].std() > 0.1   # the logo's brightness on one-channel images


def test_every_kind_plants_on_images_that_are_not_square():
    """A user's own photos need not be square: sizes scale with the shorter side, places with each
    side (24x40 here: a stamp of 4 pixels, a frame of 1, a marker of radius 2.4, an edge bar of 4)."""
    h, w = 24, 40
    x = torch.rand(8, 3, h, w, generator=torch.Generator().manual_seed(0))
    disc = torch.zeros(8, 1, h, w)
    disc[:, :, 8:16, 16:24] = 1
    for kind in SHORTCUT_KINDS:
        planted, mask = plant_shortcut(x, kind, disc, seed=2)
        assert planted.shape == x.shape and mask.shape == (8, 1, h, w), kind
        assert torch.equal(planted * (1 - mask), x * (1 - mask)), f"{kind}: changed outside its mask"
        assert ((planted - x).abs() * mask).flatten(1).amax(1).gt(0).all(), f"{kind}: nothing planted"
    _, tags = plant_shortcut(x, "tags", seed=1)
    corners = {(int(m[0, :h // 2].any()), int(m[0, :, :w // 2].any())) for m in tags}
    assert corners == {(1, 1), (1, 0), (0, 1), (0, 0)} and (tags.flatten(1).sum(1) == 16).all()
    _, frame = plant_shortcut(x, "frame")
    assert frame[0, 0].sum() == 2 * w + 2 * h - 4
    _, marker = plant_shortcut(x, "marker", seed=3)
    cols = torch.stack([torch.nonzero(m[0])[:, 1].float().mean() for m in marker])
    assert cols.max() > h   # the marker's places span the longer side
    _, edge = plant_shortcut(x, "edge")
    assert torch.equal(edge[0, 0], (torch.arange(w) < 4).float().expand(h, w))
    background, m_background = plant_shortcut(x, "background", disc)
    assert torch.equal(m_background, 1 - disc) and background[0, :, 0].std() > 0   # a photo behind the object


def test_scikit_learns_two_photos_are_class_photos_too():
    """``china`` and ``flower`` (scikit-learn's sample photos) give crops of their own photo; a name
    neither library has is refused naming both."""
    from sklearn.datasets import load_sample_image

    train, _ = make_shortcut_images("stamp", classes=("china", "flower"), n_per_class=20, prevalence=0.0, seed=0,
                                    ambiguity=0.0)
    colours = [torch.tensor(load_sample_image(f"{name}.jpg"), dtype=torch.float32).mean((0, 1)) / 255
               for name in ("china", "flower")]
    for c in range(2):   # each class's crops take the colour of its own photo rather than the other's
        crops = train.x[train.targets == c].mean((0, 2, 3))
        assert (crops - colours[c]).norm() < (crops - colours[1 - c]).norm()
    with pytest.raises(ValueError, match=r"no image 'tulip' \(nor is it one of scikit-learn's \('china', 'flower'\)\)"):
        make_shortcut_images("stamp", classes=("tulip", "china"), n_per_class=4, prevalence=0.0)


def test_the_stamp_side_sets_the_stamp_and_the_tags_and_the_datasets_keep_it():
    x = torch.full((4, 3, 32, 32), 0.5)
    for side, pixels in ((3 / 16, 6), (1 / 8, 4), (1 / 64, 2)):   # at least 2 pixels
        _, mask = plant_shortcut(x, "stamp", stamp_side=side)
        assert torch.equal(mask[:, 0, 1:1 + pixels, 1:1 + pixels], torch.ones(4, pixels, pixels))
        assert mask.sum() == 4 * pixels ** 2
        _, tags = plant_shortcut(x, "tags", seed=1, stamp_side=side)
        assert (tags.flatten(1).sum(1) == pixels ** 2).all()
    _, val = make_shortcut_images("stamp", n_per_class=20, prevalence=0.5, seed=1, stamp_side=1 / 8)
    assert val.stamp_side == 1 / 8 and val.artifact_mask[val.has_artifact].flatten(1).sum(1).eq(16).all()
    with pytest.raises(ValueError, match=r"stamp_side must be in \(0, 0.5\).*got 0.5"):
        plant_shortcut(x, "stamp", stamp_side=0.5)


def test_regions_follow_what_a_heatmap_adds_over_its_class():
    # every map shares a top-left bias; the second also has a spot at the bottom right
    h = torch.zeros(2, 1, 16, 16)
    h[:, :, :4, :4] = 5.0
    h[1, :, 12:, 12:] = 5.0
    reference = torch.zeros(16, 16)
    reference[:4, :4] = 1 / 16
    regions = relevance_regions(h, reference, area=1 / 16)
    assert regions.sum((1, 2)).tolist() == [16, 16]
    assert regions[1, 12:, 12:].all()


class _Detector(torch.nn.Module):
    """Class 1 when the top-left 4x4 corner is bright, else class 0 (an analytic shortcut)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        corner = x[:, :, :4, :4].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(corner), 40 * self.w * (corner - 0.5)], 1)


def _corner_samples() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x, heatmaps and classes for :class:`_Detector`: 20 samples of class 1, then 20 of class 0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=gen) * 0.4
    classes = np.array([1] * 20 + [0] * 20)
    x[:8, :, :4, :4] = 1.0                        # 8 samples of class 1 carry the corner the detector uses
    heat = torch.rand(40, 1, 16, 16, generator=gen) * 0.1
    heat[:8, :, :4, :4] += 1.0                    # ... and their relevance sits on it
    heat[8:20, :, 6:10, 6:10] += 1.0              # the rest of class 1 looks at the middle
    heat[20:, :, 12:, 12:] += 1.0                 # class 0 at the bottom right
    return x, heat, classes


def test_evidence_on_an_analytic_shortcut_model(monkeypatch):
    x, heat, classes = _corner_samples()
    ev = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16)
    shortcut = np.arange(40) < 8
    assert ev.confirmed.tolist() == shortcut.tolist()
    assert (ev.component[:8] == "region").all() and (ev.extent()[:8] == 1 / 16).all()
    assert ev.regions[:8, :4, :4].all() and ev.regions[:8].sum() == 8 * 16
    assert (ev.rise[:8] > 0.9).all() and (ev.flip_rate[:8] == 1).all() and (ev.drop[:8] > 0.9).all()
    assert (ev.excess[:8] > 0.9).all() and ev.separation[:8].min() >= 3 and (ev.separation[8:] == 0).all()
    assert np.abs(ev.excess[8:]).max() < 0.05 and ev.z[:8].min() > ev.z[8:].max()
    # per sample its class's best group over the threshold: class 1's confirmed group, class 0 none; the region
    # group's separation over its threshold where its shared fine pattern (the corner's edges) is not asked
    assert ev.separation_ratio[0] >= 1 and (ev.separation_ratio[:20] == ev.separation_ratio[0]).all()
    assert (ev.separation_ratio[20:] < 1).all()
    loose = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16, shared=0)
    assert (loose.separation_ratio[:20] == ev.separation[:8].max() / 4).all()
    # each sample as is and removed; its first transfers of the region, the detail and the border
    # (which holds part of the corner): 4 for class 1, 3 for class 0, whose pool is the 8 class-1 samples the
    # detector does not give class 1 (3 of them per sample give each 7.5 of class 0's 20 samples, STAGE_MATES);
    # the rest of 8 only for class 1's region and
    # border, the checks whose stage-one group comes near a confirmed one; 8 class mates' content
    # through its region and its border only for the 8 samples whose excess reaches the rise (no
    # other can be confirmed); the controls (the class's other samples in the same partners) cost
    # nothing more; class 1, with a confirmed region group, searched for its members' corner (8 each); and
    # for what most of a class carries, every other sample's content in its region over the other class
    # and in the border into its first partner, against another class's content there (no class comes
    # near: none goes on)
    assert ev.forward_passes == 2 * 40 + 3 * 20 * (4 + 3) + 2 * 20 * 4 + 2 * 8 * 8 + 20 * 8 + 4 * 20
    # counted per sample: the 8 corners 46 each, the rest of class 1 30, class 0 11, and 4 more for every
    # other sample; a strategy sums its members'
    assert ev.passes.tolist() == (np.array([46] * 8 + [30] * 12 + [11] * 20) + np.tile([4, 0], 20)).tolist()
    # measuring every check with all 8 pastes decides the same, at 8 transfers per check
    full = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16, screen=0)
    assert full.forward_passes == 2 * 40 + 3 * 40 * 8 + 2 * 8 * 8 + 20 * 8 + 2 * 2 * 20 * 8
    assert full.confirmed.tolist() == shortcut.tolist() and np.array_equal(full.excess[:8], ev.excess[:8])
    # the model's probabilities, where the caller has them, spare the first pass and decide the same
    given = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16,
                            probabilities=_Detector()(x).softmax(1).detach())
    assert given.forward_passes == ev.forward_passes - 40
    assert np.array_equal(given.excess, ev.excess) and np.array_equal(given.partners, ev.partners)
    # spread over processes (as SpRAyCallback does across DDP ranks): each part scored on its own, the same evidence
    parts = []

    def shard(fn, n):
        idx = torch.arange(n).tensor_split(3)
        parts.extend(len(i) for i in idx)
        return torch.cat([fn(i) for i in idx])
    sharded = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16, shard=shard)
    assert sum(parts) == ev.forward_passes - 40 and max(parts) < 40 * 4   # all but the probabilities' pass
    assert np.array_equal(sharded.excess, ev.excess) and np.array_equal(sharded.drop, ev.drop)
    assert sharded.passes.tolist() == ev.passes.tolist()
    # a group that did not stand apart on held-out partners would not be confirmed, however far apart it stands
    monkeypatch.setattr("xai_callbacks.spray.evidence.held_out_separation", lambda *a, **k: 0.5)
    unreplicated = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16)
    assert not unreplicated.confirmed.any() and np.array_equal(unreplicated.excess, ev.excess)
    assert unreplicated.separation_ratio[:20] == pytest.approx(0.5 / 4)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"probabilities must be \(N, classes\) with N = 40"):
        sample_evidence(_Detector(), x, heat, classes, probabilities=torch.ones(39, 2))
    # class 1's pool: 16 of the 20 of class 0, each sample into 8 distinct ones of it
    assert all(len(set(p)) == 8 for p in ev.partners), "8 distinct partners per sample"
    assert len(set(ev.partners[:20].ravel())) == 16 and set(ev.partners[:20].ravel()) <= set(range(20, 40))
    # class 1 samples the detector does not give class 1 are no partners of class 0 (they have no room to rise)
    assert set(ev.partners[20:].ravel()) == set(range(8))
    with pytest.raises(ValueError, match="at least two classes"):
        sample_evidence(_Detector(), x[:20], heat[:20], classes[:20])
    with pytest.raises(ValueError, match="one heatmap and one class per sample"):
        sample_evidence(_Detector(), x, heat[:10], classes)



class _Extent(torch.nn.Module):
    """Class 1 when the top half of the image is bright on average: the class carried by an extent
    (a sky), not by a small thing (a stamp)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        top = x[:, :, : x.shape[2] // 2].mean((1, 2, 3))
        return torch.stack([torch.zeros_like(top), 40 * self.w * (top - 0.35)], 1)


def test_a_region_group_is_confirmed_only_where_its_evidence_is_concentrated():
    """Through an eighth of the input, a bright top half and a bright corner both make other samples
    class 1; only the corner does so through the most relevant half of that eighth too (as much per
    unit of area), so only the corner group is confirmed; the extent's class comes to well under its
    threshold, and is confirmed where the concentration is not asked (``compact=0``)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 32, 32, generator=gen) * 0.4
    classes = np.array([1] * 20 + [0] * 20)
    heat = torch.rand(40, 1, 32, 32, generator=gen) * 0.1
    heat[8:20, :, 20:26, 12:18] += 1.0            # the rest of class 1 looks at the middle
    heat[20:, :, 24:, 24:] += 1.0                 # class 0 at the bottom right
    shortcut = np.arange(40) < 8
    corner, extent = x.clone(), x.clone()
    corner[:8, :, :4, :4] = 1.0                   # 8 samples of class 1 carry a bright corner (16 positions)
    extent[:8, :, :16] = 1.0                      # ... or a bright top half
    heat_corner, heat_extent = heat.clone(), heat.clone()
    heat_corner[:8, :, :4, :4] += 1.0
    heat_extent[:8, :, :16] += 1.0
    options = dict(infiller="constant", components=("region",))
    small = sample_evidence(_Detector(), corner, heat_corner, classes, **options)
    assert small.confirmed.tolist() == shortcut.tolist() and (small.separation_ratio[:20] >= 1).all()
    wide = sample_evidence(_Extent(), extent, heat_extent, classes, **options)
    assert (wide.excess[:8] > 0.5).all(), "through an eighth the top half carries class 1 into other samples"
    assert not wide.confirmed.any() and (wide.separation_ratio < 0.5).all()
    asked = sample_evidence(_Extent(), extent, heat_extent, classes, compact=0, **options)
    assert asked.confirmed.tolist() == shortcut.tolist() and np.array_equal(asked.excess, wide.excess)
    with pytest.raises(ValueError, match="compact must be >= 0"):
        sample_evidence(_Extent(), extent, heat_extent, classes, compact=-1)


class _OneLogitDetector(_Detector):
    """The same detector as a binary classifier with one logit (trained with BCEWithLogitsLoss)."""

    def forward(self, x):
        return super().forward(x)[:, 1:]


class _SoftmaxDetector(_Detector):
    """The same detector ending in a softmax: its outputs are probabilities."""

    def forward(self, x):
        return super().forward(x).softmax(1)


@pytest.mark.parametrize("variant", [_OneLogitDetector, _SoftmaxDetector], ids=["one logit", "softmax"])
def test_evidence_reads_a_one_logit_or_a_softmax_model_with_the_probabilities_it_stands_for(variant):
    """Softmax(0, z) is sigmoid(z), the one-logit model's class 1; a softmax's output is taken as it
    is, not squeezed by a second softmax: the check decides as on the logit detector."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=gen) * 0.4
    classes = np.array([1] * 20 + [0] * 20)
    x[:8, :, :4, :4] = 1.0
    heat = torch.rand(40, 1, 16, 16, generator=gen) * 0.1
    heat[:8, :, :4, :4] += 1.0
    logits = sample_evidence(_Detector(), x, heat, classes, infiller="constant", area=1 / 16)
    ev = sample_evidence(variant(), x, heat, classes, infiller="constant", area=1 / 16)
    assert ev.confirmed.tolist() == (np.arange(40) < 8).tolist()
    assert np.allclose(ev.excess, logits.excess, atol=1e-6) and np.allclose(ev.drop, logits.drop, atol=1e-6)
    y = torch.from_numpy(classes)
    p = score_perturbed(variant(), lambda idx: x[idx], torch.arange(40), y, output="probability")
    assert torch.allclose(p, _Detector()(x).softmax(1).gather(1, y[:, None])[:, 0].detach(), atol=1e-6)


def test_a_check_near_its_threshold_is_decided_on_every_partner_of_its_pool(monkeypatch):
    """Stage three (RECHECK): a class's check whose group comes near its threshold on its 8 partners
    goes on into the other 8 of its class's pool; a class whose pool holds fewer has none to go to."""
    import xai_callbacks.spray.evidence as evidence
    x, heat, classes = _corner_samples()
    kw = dict(infiller="constant", area=1 / 16)
    plain = sample_evidence(_Detector(), x, heat, classes, **kw)   # the corner group stands far apart: no stage three
    monkeypatch.setattr(evidence, "RECHECK", (0.0, np.inf))        # every check that went on counts as near
    near = sample_evidence(_Detector(), x, heat, classes, **kw)
    assert near.confirmed.tolist() == plain.confirmed.tolist() == (np.arange(40) < 8).tolist()
    assert (near.excess[:8] > 0.9).all() and (near.rise[:8] > 0.9).all() and (near.flip_rate[:8] == 1).all()
    # class 1's region and border went on to 8 partners: 8 more each, and for the 8 corners 8 more
    # place controls each; class 0 has 8 partners in its pool (the corners, the only class-1
    # samples it can raise), none to spare
    extra = np.array([32] * 8 + [16] * 12 + [0] * 20)
    assert (near.passes - plain.passes).tolist() == extra.tolist()
    # every check of both classes (region, detail, border) measured on its 8 partners: class 1's go on,
    # 8 more each, class 0's cannot
    everything = sample_evidence(_Detector(), x, heat, classes, screen=0, **kw)
    monkeypatch.setattr(evidence, "RECHECK", (np.inf, np.inf))     # no check is near
    eight = sample_evidence(_Detector(), x, heat, classes, screen=0, **kw)
    assert (everything.passes[20:] == eight.passes[20:]).all()
    assert (everything.passes[:20] - eight.passes[:20] == 8 * 3 + 16 * (np.arange(20) < 8)).all()


def test_stage_three_reads_a_check_with_its_place_controls_applied(monkeypatch):
    """A group that stands far apart before its place controls and not after them is near its
    threshold: what decides the class is the controlled excess."""
    import xai_callbacks.spray.evidence as evidence
    x, heat, classes = _corner_samples()
    x[8:20, :, :4, :4] = 1.0   # every class-1 sample carries the corner; the relevance of 8 sits on it
    kw = dict(infiller="constant", area=1 / 16)
    monkeypatch.setattr(evidence, "RECHECK", (np.inf, np.inf))   # no stage three
    plain = sample_evidence(_Detector(), x, heat, classes, **kw)
    # the 8 corners' region excesses stand far apart from their class mates' regions (the middle),
    # but a class mate's content at their place raises a partner as much: controlled, no group is left
    monkeypatch.setattr(evidence, "RECHECK", (0.0, 1.0))
    near = sample_evidence(_Detector(), x, heat, classes, **kw)
    assert near.confirmed.tolist() == plain.confirmed.tolist()
    # class 1's region check went on into 8 more partners, and the 8 corners' place controls with it
    assert (near.passes - plain.passes).tolist() == [16] * 8 + [8] * 12 + [0] * 20


class _TwoCorners(torch.nn.Module):
    """Class 1 when the first ``span`` positions of each spatial dimension (the top-left corner of
    an image, the start of a signal) are bright; the last ``span`` count far less (alone they give
    class 1 a probability of 0.15), as ResNet-18 reads the bottom right of a small input."""

    def __init__(self, span: int):
        super().__init__()
        self.span = span

    def forward(self, x):
        k = x.dim() - 2
        first, last = x[(..., *[slice(0, self.span)] * k)], x[(..., *[slice(-self.span, None)] * k)]
        logit = 40 * (first.flatten(1).mean(1) - 0.5) + 20 * (last.flatten(1).mean(1) - 0.5) + 0.3
        return torch.stack([torch.zeros_like(logit), logit], 1)


@pytest.mark.parametrize("size,span", [((16, 16), 4), ((64,), 16)], ids=["image", "signal"])
def test_the_search_finds_the_members_content_where_the_model_reads_it_weakly(size, span):
    gen = torch.Generator().manual_seed(0)
    first, last, middle = ((..., *[slice(0, span)] * len(size)), (..., *[slice(-span, None)] * len(size)),
                           (..., *[slice(size[0] * 3 // 8, size[0] * 5 // 8)] * len(size)))
    x = torch.rand(70, 1, *size, generator=gen) * 0.4
    classes = np.array([1] * 40 + [0] * 30)
    x[:8][first] = 1.0      # 8 samples of class 1 carry the mark at the start (the top left) ...
    x[8:14][last] = 1.0     # ... 6 at the end, where it moves a partner by 0.15 only
    heat = torch.rand(70, 1, *size, generator=gen) * 0.1
    heat[:8][first] += 1.0
    heat[8:14][last] += 1.0
    heat[14:40][middle] += 1.0
    heat[40:, :, 2:6] += 1.0
    model = _TwoCorners(span)
    kw = dict(infiller="constant", area=span ** len(size) / np.prod(size), screen=0)
    plain = sample_evidence(model, x, heat, classes, search=False, **kw)
    assert plain.confirmed.tolist() == (np.arange(70) < 8).tolist()
    assert (plain.excess[8:14] < 0.2).all(), "the marks at the end, where they are, transfer too little"
    ev = sample_evidence(model, x, heat, classes, **kw)
    assert ev.confirmed.tolist() == (np.arange(70) < 14).tolist()
    # the members keep their own check; the 6 are described by where their mark was found and what it did
    assert np.array_equal(ev.excess[:8], plain.excess[:8]) and np.array_equal(ev.regions[:8], plain.regions[:8])
    assert (ev.component[8:14] == "region").all() and (ev.excess[8:14] > 0.9).all()
    assert ev.regions[8:14][last].all() and ev.regions[8:14].sum() == 6 * span ** len(size)
    own = model(x[8:14]).softmax(1)[:, 1].numpy()
    assert np.allclose(ev.drop[8:14], own, atol=1e-3), "removing the found place removes all the mark gave"
    # class 1 searched (8 pastes a sample); class 0, with no confirmed group, not
    assert ev.passes.tolist() == (plain.passes + 8 * (classes == 1)).tolist()
    assert np.array_equal(ev.excess[14:], plain.excess[14:]) and not ev.confirmed[14:].any()

def test_the_check_calls_the_model_with_channels_last_weights_and_leaves_its_own_as_they_are():
    from xai_callbacks.spray.evidence import _ChannelsLast

    torch.manual_seed(0)
    model = DemoCNN(in_channels=3, n_classes=4, width=8, image_size=16).eval()
    before = {n: p for n, p in model.named_parameters()}
    seen = []
    model.features[0].register_forward_hook(
        lambda m, i, o: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    x = torch.rand(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    net = _ChannelsLast(model)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-5, atol=1e-5)
    assert seen == [True, False]   # channels-last weights inside the check, the model's own outside
    assert dict(model.named_parameters()) == before and all(p.is_contiguous() for p in before.values())
    # a depthwise or 1x1 kernel is contiguous in either layout: its copy must have the channels-last
    # strides (channel stride 1), or the convolution takes the contiguous layout
    thin = _ChannelsLast(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, groups=3), torch.nn.Conv2d(3, 4, 1)))
    assert [w.stride() for w in thin.weights.values()] == [(9, 1, 3, 1), (3, 1, 3, 3)]

    class Flat(torch.nn.Module):   # reads its kernel as a matrix: a channels-last kernel cannot be viewed so
        def __init__(self):
            super().__init__()
            self.kernel = torch.nn.Parameter(torch.randn(4, 3, 2, 2))

        def forward(self, x):
            return x.flatten(2).mean(2) @ self.kernel.view(4, -1)[:, :3].T

    flat = Flat()
    fallback = _ChannelsLast(flat)
    with torch.no_grad():
        torch.testing.assert_close(fallback(x), flat(x))
    assert fallback.weights == {}


class _CornerOrContent(torch.nn.Module):
    """Class 1 when the top-left 4x4 corner (the shortcut) or the bottom half (the class's content) is bright."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        signal = torch.maximum(x[:, :, :4, :4].mean((1, 2, 3)), x[:, :, 8:].mean((1, 2, 3))) - 0.5
        return torch.stack([torch.zeros_like(signal), 40 * self.w * signal], 1)


def test_a_region_that_holds_the_class_content_hides_the_shortcut_a_smaller_one_confirms_it():
    gen = torch.Generator().manual_seed(3)
    x = 0.2 + 0.05 * torch.rand(40, 1, 16, 16, generator=gen)
    classes = np.array([1] * 20 + [0] * 20)
    x[:20, :, 8:] += 0.6                          # class 1's content: a bright bottom half
    x[:8, :, :4, :4] = 1.0                        # 8 of them also carry the corner
    heat = 0.1 * torch.rand(40, 1, 16, 16, generator=gen)
    heat[:20, :, 8:] += 1.0
    heat[:8, :, :4, :4] += 2.0
    heat[20:, :, :8, 8:] += 1.0
    model = _CornerOrContent()
    # half the image: every sample's region carries the class (the corner or the content), nothing stands out
    assert not sample_evidence(model, x, heat, classes, area=1 / 2, components=("region",)).confirmed.any()
    ev = sample_evidence(model, x, heat, classes, area=(1 / 2, 1 / 16))
    assert ev.confirmed.tolist() == (np.arange(40) < 8).tolist() and ev.params["area"] == (1 / 2, 1 / 16)
    # described by the area that confirms them: their region is the corner
    assert (ev.component[:8] == "region").all() and (ev.extent()[:8] == 1 / 16).all()
    assert ev.regions[:8, :4, :4].all() and ev.regions[:8].sum() == 8 * 16
    # removing the corner leaves the content, which still carries the class: removal alone would miss it
    assert ev.drop[:8].max() < 0.01
    # with every check measured in full: per sample itself, its removal, its 8 transfers per check
    # (two areas, detail, border: one-channel images have no saturation; the region over the
    # other class and the border for what most of a class carries), one class's check that comes near
    # its threshold (RECHECK) into the other 8 partners of its pool, and 8 place controls per area and
    # for the border where its excess reaches the rise: at least the 8 corners, far from all 120
    # (sample, region) pairs
    assert ev.params["components"] == ("region", "detail", "border")
    full = sample_evidence(model, x, heat, classes, area=(1 / 2, 1 / 16), screen=0)
    assert full.confirmed.tolist() == ev.confirmed.tolist()
    controlled, rest = divmod(full.forward_passes - 2 * 40 - 6 * 40 * 8 - 20 * 8, 8)
    assert rest == 0 and 8 <= controlled < 60
    assert ev.forward_passes < full.forward_passes   # the default goes on only where a group comes near
    with pytest.raises(ValueError, match="saturation needs RGB"):
        sample_evidence(model, x, heat, classes, components=("saturation",))
    with pytest.raises(ValueError, match="every area in"):
        sample_evidence(model, x, heat, classes, area=(1 / 8, 0))


class _GlobalDetector(torch.nn.Module):
    """Class 1 when the mean of channel 0 (``tone``) or the fine-detail energy (``detail``) is high,
    or the colour (``saturation``: the values' spread over the channels) is low, or the corners are
    dark against the centre (``shading``)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.w = kind, torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        if self.kind == "tone":
            signal = x[:, 0].mean((1, 2)) - 0.45
        elif self.kind == "saturation":
            signal = 4 * (0.03 - (x - x.mean(1, keepdim=True)).pow(2).mean((1, 2, 3)).sqrt())   # a steep step
        elif self.kind == "shading":
            corners = x[:, :, ::15, ::15].mean((1, 2, 3))   # the four corner pixels against the 4x4 centre
            signal = 0.75 - corners / x[:, :, 6:10, 6:10].mean((1, 2, 3))
        else:
            signal = (x - gaussian_blur(x, 1.0)).abs().mean((1, 2, 3)) - 0.12
        return torch.stack([torch.zeros_like(signal), 60 * self.w * signal], 1)


def test_border_mask_is_the_outer_sixteenth_of_each_side():
    assert border_mask((32, 32)).sum() == 32 * 32 - 28 * 28 and not border_mask((32, 32))[2:-2, 2:-2].any()
    assert border_mask((16, 16)).sum() == 16 * 16 - 14 * 14
    assert not border_mask((8, 8)).any() and border_mask((15, 40)).sum() == 15 * 2 * 2   # none along a short side
    # a one-row image (a signal) has a border at its two ends only
    assert border_mask((1, 64)).nonzero()[:, 1].tolist() == [0, 1, 2, 3, 60, 61, 62, 63]
    # on inputs without one the default check skips it (as the saturation on grey inputs); asked alone, it says why
    x, classes = torch.rand(20, 1, 8, 8), np.array([0, 1] * 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    assert sample_evidence(model, x, x[:, 0], classes).params["components"] == ("region", "detail")
    with pytest.raises(ValueError, match=r"border needs a side of at least 16 positions, got inputs of size \(8, 8\)"):
        sample_evidence(model, x, x[:, 0], classes, components=("border",))


class _FrameDetector(torch.nn.Module):
    """Class 1 for a 16x16 input whose border is brighter than the rest by more than 0.3."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        ring = border_mask(x.shape[2:])
        signal = x[:, :, ring].mean((1, 2)) - x[:, :, ~ring].mean((1, 2)) - 0.3
        return torch.stack([torch.zeros_like(signal), 60 * self.w * signal], 1)


def test_the_border_confirms_a_frame_the_relevance_regions_miss():
    """A bright frame one position wide on 8 of 20 samples of class 1, relevance everywhere: no
    region of the heatmaps holds the frame, the border does (the sharp frame's fine detail
    transfers as well, so the check here is asked for the region and the border alone)."""
    gen = torch.Generator().manual_seed(1)
    x = 0.2 + 0.2 * gaussian_blur(torch.rand(40, 3, 16, 16, generator=gen), 1.0)
    ring = border_mask((16, 16))
    x[:8, :, ring] = 0.9
    classes = np.array([1] * 20 + [0] * 20)
    heat = torch.rand(40, 3, 16, 16, generator=gen)
    model = _FrameDetector()
    assert (model(x).argmax(1) == torch.from_numpy(np.arange(40) < 8).long()).all()
    assert not sample_evidence(model, x, heat, classes, components=("region",)).confirmed.any()
    ev = sample_evidence(model, x, heat, classes, components=("region", "border"))
    assert ev.confirmed.tolist() == (np.arange(40) < 8).tolist()
    assert (ev.component[:8] == "border").all() and np.allclose(ev.extent()[:8], 60 / 256)
    assert (ev.regions[:8] == ring).all() and ev.excess[:8].min() > 0.9
    shown, j = ev.example(0, x), int(ev.partners[0, 0])
    torch.testing.assert_close(shown[3], transfer("border", x[j:j + 1], x[:1])[0])
    assert model(shown[3:]).argmax(1).item() == 1 and torch.equal(shown[1][:, ~ring], x[0][:, ~ring])


def test_a_border_group_is_confirmed_only_where_its_members_share_a_fine_pattern_there():
    """8 of class 1's samples grow brighter towards their border smoothly, over a fine texture of
    their own (as a pale sky around some of a class's photos): their borders give other samples the
    class as a frame's would, but hold no fine pattern that their class mates' borders do not, and
    are confirmed only where ``shared`` is not asked. A sharp frame is confirmed either way
    (:func:`test_the_border_confirms_a_frame_the_relevance_regions_miss`)."""
    gen = torch.Generator().manual_seed(2)
    texture = 0.3 * torch.rand(40, 3, 16, 16, generator=gen)
    y = texture.clone()
    to_edge = torch.minimum(torch.arange(16.0), 15 - torch.arange(16.0))
    y[:8] += 0.9 * torch.exp(-torch.minimum(to_edge[:, None], to_edge[None]) ** 2 / 18)   # brightest at the edge
    classes, heat = np.array([1] * 20 + [0] * 20), torch.rand(40, 3, 16, 16, generator=gen)
    planted, model = np.arange(40) < 8, _FrameDetector()
    assert (model(y).argmax(1) == torch.from_numpy(planted).long()).all()
    options = dict(components=("region", "border"), class_area=0)
    ev, loose = (sample_evidence(model, y, heat, classes, shared=s, **options) for s in (SHARED, 0))
    assert loose.confirmed.tolist() == planted.tolist() and (loose.component[:8] == "border").all()
    assert not ev.confirmed.any() and ev.separation_ratio[:20].max() < 1 <= loose.separation_ratio[:20].max()
    ring = border_mask((16, 16)).expand(8, 16, 16)
    assert shared_detail(y[:8], y[8:20], where=ring) < SHARED
    texture[:8, :, ring[0]] = 0.9   # a frame over the same textures: its inner edge the same in every member
    assert shared_detail(texture[:8], texture[8:20], where=ring) > 0.5


@pytest.mark.parametrize("kind", ["tone", "detail", "saturation", "shading"])
def test_evidence_confirms_a_shortcut_without_a_place(kind):
    """A colour shift, a fine checker, grey or a vignette on 8 of 20 samples of class 1 has no region
    in the heatmaps; its transfer against the class's other samples' confirms exactly those 8 (the
    tone and the shading when asked for: they are not among the default components; the default
    border holds the vignette's darkest part, and nothing of the defaults the colour shift)."""
    gen = torch.Generator().manual_seed(1)
    x = 0.2 + 0.2 * gaussian_blur(torch.rand(40, 3, 16, 16, generator=gen), 1.0)   # smooth, dim images
    i = torch.arange(16)
    if kind == "tone":
        x[:8, 0] += 0.5
    elif kind == "saturation":   # colourful, the same mean in every channel; 8 of them grey
        x = 0.5 + 5 * (x - 0.3)   # colour spread (root mean square over the channels) 0.06-0.08
        x[:8] = x[:8].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    elif kind == "shading":   # the corners darkened to 0.3 of the centre
        r2 = (torch.linspace(-1, 1, 16)[:, None] ** 2 + torch.linspace(-1, 1, 16)[None] ** 2) / 2
        x[:8] *= 1 - 0.7 * r2
    else:
        x[:8] += 0.25 * ((i[:, None] + i[None, :]) % 2).float()
    classes = np.array([1] * 20 + [0] * 20)
    heat = torch.rand(40, 3, 16, 16, generator=gen)   # relevance everywhere: no place to point at
    model = _GlobalDetector(kind)
    assert (model(x).argmax(1) == torch.from_numpy(np.arange(40) < 8).long()).all()
    # the vignette's dark corners lie in the border, a default component; on these smooth images its
    # members share the vignette's own fine detail there (on photos the photo's detail drowns it)
    if kind == "shading":
        default = sample_evidence(model, x, heat, classes)
        assert default.confirmed.tolist() == (np.arange(40) < 8).tolist() and (default.component[:8] == "border").all()
        assert not sample_evidence(model, x, heat, classes, components=("region", "detail", "tone", "saturation")
                                   ).confirmed.any()   # nor do the other defaults, nor the tone
    if kind == "tone":
        assert "tone" not in DEFAULT_COMPONENTS and not sample_evidence(model, x, heat, classes).confirmed.any()
    ev = sample_evidence(model, x, heat, classes, components=COMPONENTS)
    assert ev.confirmed.tolist() == (np.arange(40) < 8).tolist()
    assert (ev.component[:8] == kind).all() and (ev.extent()[:8] == 1).all()
    # the dashboard's example: the sample, it without its region, its first partner, and that
    # partner with the sample's component (the shading above the analysed inputs' black)
    shown, j = ev.example(0, x), int(ev.partners[0, 0])
    low = x.amin((0, 2, 3), keepdim=True)
    torch.testing.assert_close(shown[3], transfer(kind, x[j:j + 1], x[:1], low=low)[0])
    assert torch.equal(shown[0], x[0]) and torch.equal(shown[2], x[j]) and model(shown[3:]).argmax(1).item() == 1
    # the tone moves partners all the way; the detail of a checker keeps part of its energy over
    # the partner's blur, still enough to give them the class
    assert ev.excess[:8].min() > (0.9 if kind == "tone" else 0.5) and (ev.flip_rate[:8] == 1).all()
    # (class 0's colourful regions do colour the grey partners it is transferred into, and its
    # uneven light darkens a few partners' corners: tails, unconfirmed)
    assert np.abs(ev.excess[8:20 if kind == "saturation" else 40]).max() < (0.2 if kind == "shading" else 0.05)
    # the group's separation decides against the threshold of its own component (checked alone)
    strict = sample_evidence(model, x, heat, classes, components=(kind,),
                             min_separation={**MIN_SEPARATION, kind: ev.separation.max() + 1})
    assert not strict.confirmed.any() and strict.params["min_separation"][kind] == ev.separation.max() + 1
    with pytest.raises(ValueError, match="components must be"):
        sample_evidence(model, x, heat, classes, components=("region", "edges"))
    with pytest.raises(ValueError, match="min_separation needs a value for every component"):
        sample_evidence(model, x, heat, classes, min_separation={"region": 3})


def test_a_change_of_the_whole_input_is_judged_among_the_samples_no_placed_check_confirms():
    """Class 1's own look is grey: 13 of its 30 samples are (its other samples are colourful, as crops of
    other photos), and a bright frame the model reads as well sits on 10 of the colourful ones. The frame
    is confirmed (by its fine detail and by the border); the grey samples are then most of the 20 that no
    placed check confirms, the class's own look, and are not confirmed by their saturation. Where the
    border is not checked, nothing is placed (the frame is confirmed by its fine detail alone) and the 13
    grey samples, a minority of 30, are confirmed."""
    gen = torch.Generator().manual_seed(1)
    x = 0.5 + 5 * (0.2 * gaussian_blur(torch.rand(60, 3, 16, 16, generator=gen), 1.0) - 0.1)
    x[:13] = x[:13].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    ring = border_mask((16, 16))
    x[13:23, :, ring] = 0.98
    grey, frame = _GlobalDetector("saturation"), _FrameDetector()

    class Either(torch.nn.Module):
        def forward(self, x):
            return torch.maximum(grey(x), frame(x))
    classes, heat = np.array([1] * 30 + [0] * 30), torch.rand(60, 3, 16, 16, generator=gen)
    assert (Either()(x).argmax(1) == torch.from_numpy(np.arange(60) < 23).long()).all()
    ev = sample_evidence(Either(), x, heat, classes)
    assert ev.confirmed.tolist() == ((np.arange(60) >= 13) & (np.arange(60) < 23)).tolist()
    unplaced = sample_evidence(Either(), x, heat, classes, components=("region", "detail", "saturation"))
    assert unplaced.confirmed.tolist() == (np.arange(60) < 23).tolist()
    assert (unplaced.component[:13] == "saturation").all()


def test_a_detail_group_is_confirmed_only_where_its_members_share_one_fine_pattern():
    """A model that gives class 1 to any input with much fine detail: 8 of 20 samples of class 1 with
    a fine checker (one pattern, as a watermark), or with a patch of it at a new place in each (as a
    stripe patch anywhere), are confirmed by their detail; 8 with fine noise of their own each (as a
    class's own texture, cropped anywhere) transfer as well, but share no pattern that their class
    mates do not, and are confirmed only where ``shared`` is not asked."""
    gen = torch.Generator().manual_seed(1)
    x = 0.2 + 0.2 * gaussian_blur(torch.rand(40, 3, 16, 16, generator=gen), 1.0)
    i = torch.arange(16)
    board = 0.25 * ((i[:, None] + i[None, :]) % 2).float()
    anywhere = torch.stack([torch.roll(2 * board * (i[:, None] < 8), (3 * k, 5 * k), (0, 1)) for k in range(8)])
    noise = 0.5 * (torch.rand(8, 3, 16, 16, generator=gen) > 0.5).float()
    classes, heat = np.array([1] * 20 + [0] * 20), torch.rand(40, 3, 16, 16, generator=gen)
    model = _GlobalDetector("detail")
    planted = np.arange(40) < 8
    for fine, alike in ((board, True), (anywhere[:, None], True), (noise, False)):
        y = x.clone()
        y[:8] += fine
        assert (model(y).argmax(1) == torch.from_numpy(planted).long()).all()
        assert (shared_detail(y[:8], y[8:20]) > 0.5) if alike else (shared_detail(y[:8], y[8:20]) < SHARED / 2)
        ev = sample_evidence(model, y, heat, classes)
        assert ev.params["shared"] == SHARED
        assert ev.confirmed.tolist() == (planted if alike else np.zeros(40, bool)).tolist()
        # the noise's transfers stand apart as the checker's do: only what the members share tells them apart
        loose = sample_evidence(model, y, heat, classes, shared=0)
        assert loose.confirmed.tolist() == planted.tolist() and (loose.component[:8] == "detail").all()
        if not alike:
            assert ev.separation_ratio[:20].max() < 1 <= loose.separation_ratio[:20].max()
    with pytest.raises(ValueError, match="shared in \\[0, 1\\)"):
        sample_evidence(model, x, heat, classes, shared=1.5)
    # of a larger set, 64 samples evenly spaced are compared (its pairs grow with its square)
    many = torch.rand(100, 3, 8, 8, generator=gen)
    assert shared_detail(many, x) == shared_detail(many[torch.linspace(0, 99, 64).round().long()], x)
    assert shared_detail(many, x) != shared_detail(many[:64], x)


def test_a_region_group_is_confirmed_only_where_its_members_share_a_fine_pattern_there():
    """The corner detector's 8 samples carry its bright corner as a smooth rise of light over a fine
    texture of their own (as a pale sky that only some of a class's photos have): their regions
    transfer the class as a stamp's would, but hold no fine pattern that their class mates' content
    there does not, and are confirmed only where ``shared`` is not asked. The white square of
    :func:`_corner_samples` has edges, the same in each member: confirmed either way."""
    _, heat, classes = _corner_samples()
    i = torch.arange(16.0)
    light = 0.9 * torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / 32)   # brightest in the corner
    y = 0.3 * torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y[:8] += light
    planted = np.arange(40) < 8
    assert (_Detector()(y).argmax(1) == torch.from_numpy(planted).long()).all()
    options = dict(components=("region",), infiller="constant", area=1 / 16)
    ev, loose = (sample_evidence(_Detector(), y, heat, classes, shared=s, **options) for s in (SHARED, 0))
    assert loose.confirmed.tolist() == planted.tolist() and not ev.confirmed.any()
    assert ev.separation_ratio[:20].max() < 1 <= loose.separation_ratio[:20].max()
    members = torch.as_tensor(loose.regions[:8])
    assert shared_detail(y[:8], y[8:20], where=members) < SHARED
    x, _, _ = _corner_samples()
    assert shared_detail(x[:8], x[8:20], where=members) > 0.5
    assert sample_evidence(_Detector(), x, heat, classes, **options).confirmed.tolist() == planted.tolist()


def test_the_control_is_the_asked_quantile_of_the_class_own_transfers():
    """A partner's control is the ``control`` quantile of what the class's samples that went into it
    give it with their same component. 12 of class 1's 20 samples carry its tone, 8 show class 0's
    content: the lower quartile (the default) is those 8's, and the 12 stand a whole probability
    above it; the upper quartile is the 12's own, and they stand above nothing."""
    gen = torch.Generator().manual_seed(3)
    x = 0.2 + 0.2 * gaussian_blur(torch.rand(40, 3, 16, 16, generator=gen), 1.0)
    x[:12, 0] += 0.5
    classes = np.array([1] * 20 + [0] * 20)
    heat = torch.rand(40, 3, 16, 16, generator=gen)
    model = _GlobalDetector("tone")

    def excess(**options):
        return sample_evidence(model, x, heat, classes, components=("tone",), screen=0, **options).excess
    assert excess()[:12].min() > 0.9 and CONTROL == 0.25
    assert np.abs(excess(control=0.75)[:12]).max() < 0.05
    for bad in (0, 1):
        with pytest.raises(ValueError, match="control in"):
            excess(control=bad)


def test_transfer_takes_one_component_from_the_source():
    gen = torch.Generator().manual_seed(2)
    into, source = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 8, generator=gen)
    keep = torch.ones(2, 1, 8, 8)
    keep[:, :, :2, :2] = 0
    pasted = transfer("region", into, source, keep)
    assert torch.equal(pasted[:, :, :2, :2], source[:, :, :2, :2]) and torch.equal(pasted[:, :, 2:], into[:, :, 2:])
    toned = transfer("tone", into, source)
    torch.testing.assert_close(toned.mean((2, 3)), source.mean((2, 3)))
    torch.testing.assert_close(toned - toned.mean((2, 3), keepdim=True), into - into.mean((2, 3), keepdim=True))
    detailed = transfer("detail", into, source)
    torch.testing.assert_close(detailed - gaussian_blur(into, 1.0), source - gaussian_blur(source, 1.0))
    saturated = transfer("saturation", into, source)   # into's brightness, its colour at source's strength
    torch.testing.assert_close(saturated.mean(1), into.mean(1))
    chroma, own, wanted = ((t - t.mean(1, keepdim=True)).flatten(1) for t in (saturated, into, source))
    torch.testing.assert_close(chroma.norm(dim=1), wanted.norm(dim=1))
    assert torch.nn.functional.cosine_similarity(chroma, own).min() > 0.999
    grey = transfer("saturation", into, source.mean(1, keepdim=True).expand_as(source))
    torch.testing.assert_close(grey, into.mean(1, keepdim=True).expand_as(into))
    assert torch.equal(transfer("saturation", into[:, :1], source[:, :1]), into[:, :1])   # one channel: no colour
    signals = transfer("tone", into[:, :, 0], source[:, :, 0])   # (B, C, L) signals alike
    torch.testing.assert_close(signals.mean(2), source[:, :, 0].mean(2))
    # shading: into's own brightness changes nothing; a flat source's makes into flat in brightness,
    # its detail and colour kept; a vignetted source's darkens into's corners alike
    torch.testing.assert_close(transfer("shading", into, into), into)
    flat = torch.full((2, 3, 16, 16), 0.5)
    r2 = (torch.linspace(-1, 1, 16)[:, None] ** 2 + torch.linspace(-1, 1, 16)[None] ** 2) / 2
    shaded = transfer("shading", flat, flat * (1 - 0.6 * r2))
    torch.testing.assert_close(shaded, flat * gaussian_blur((1 - 0.6 * r2).expand(2, 1, 16, 16), 2.0))
    assert shaded[:, :, 0, 0].max() < 0.7 * shaded[:, :, 8, 8].min()
    wide = torch.rand(2, 3, 16, 16, generator=gen)
    lit = transfer("shading", wide, wide + 0.3 * (1 - r2))   # the source's uneven light on into's detail
    ratio = lit / wide
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))   # every channel scaled alike
    assert ratio[:, 0, 8, 8].min() > ratio[:, 0, 0, 0].max()
    # normalised inputs: with their black as ``low``, the same transfer, normalised
    a, b = 4.0, -2.0
    torch.testing.assert_close(transfer("shading", a * wide + b, a * lit + b, low=b),
                               a * transfer("shading", wide, lit) + b)
    with pytest.raises(ValueError, match="needs keep"):
        transfer("region", into, source)
    with pytest.raises(ValueError, match="unknown component"):
        transfer("edges", into, source)


class _WeakCorner(torch.nn.Module):
    """Class 1 from a bright bottom half (its content); a bright top-left corner adds a little (p ~0.15)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        corner = (x[:, :, :4, :4].mean((1, 2, 3)) > 0.45).float()
        logit = 40 * (x[:, :, 8:].mean((1, 2, 3)) - 0.5) + 9.3 * corner
        return torch.stack([torch.zeros_like(logit), self.w * logit], 1)


def test_a_smaller_region_is_asked_for_a_smaller_rise():
    """A corner that raises other samples' class probability by about 0.15: below the 0.2 asked
    of an eighth, above the 0.1 asked of a thirty-second (the rise scales with the region's side)."""
    gen = torch.Generator().manual_seed(5)
    x = 0.2 + 0.05 * torch.rand(40, 1, 16, 16, generator=gen)
    classes = np.array([1] * 20 + [0] * 20)
    x[:20, :, 8:] += 0.6
    x[:8, :, :4, :4] = 1.0
    heat = 0.1 * torch.rand(40, 1, 16, 16, generator=gen)
    heat[:20, :, 8:] += 1.0
    heat[:8, :, :4, :4] += 2.0
    model = _WeakCorner()
    ev = sample_evidence(model, x, heat, classes, area=(1 / 8, 1 / 32))
    assert 0.1 < ev.excess[:8].min() and ev.excess[:8].max() < 0.2, ev.excess[:8]
    assert ev.confirmed.tolist() == (np.arange(40) < 8).tolist()
    assert (ev.extent()[:8] == 1 / 32).all(), "confirmed by the thirty-second, not the eighth"
    # the eighth alone is asked 0.2 and confirms nothing; a min_rise of 0.4 asks 0.2 of the thirty-second
    # (the relevance regions alone: the border holds part of the corner and of the content)
    assert not sample_evidence(model, x, heat, classes, area=1 / 8, components=("region",)).confirmed.any()
    assert not sample_evidence(model, x, heat, classes, min_rise=0.4, components=("region",)).confirmed.any()


def test_a_shortcut_on_half_of_a_class_is_confirmed_end_to_end():
    """The analytic corner shortcut on 10 of 20 samples of class 1 (not credibly less than half of
    them) is confirmed, at half its separation. Every check with all 8 pastes (``screen=0``): with 20
    samples per class the first stage's 4 give a partner about 5 transfers of the class, too few for
    their lower quartile to stay free of a shortcut that half of the class carries."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=gen) * 0.4
    x[:10, :, :4, :4] = 1.0
    heat = torch.rand(40, 1, 16, 16, generator=gen) * 0.1
    heat[:10, :, :4, :4] += 1.0
    ev = sample_evidence(_Detector(), x, heat, np.array([1] * 20 + [0] * 20), infiller="constant", area=1 / 16,
                         screen=0)
    assert group_sizes(20) == (8, 11)
    assert ev.confirmed.tolist() == [True] * 10 + [False] * 30
    assert (ev.component[:10] == "region").all() and ev.separation[:10].min() >= MIN_SEPARATION["region"]
    # the same group counted fully (the rest's excesses here are of each sample's own best check)
    whole = separated_group(ev.excess[:20], max_share=1)[1]
    assert ev.separation[:10].max() == pytest.approx(whole / MAJORITY_SEPARATION, rel=1e-3)


@pytest.mark.parametrize("carriers", [16, 20])
def test_a_shortcut_on_most_or_all_of_a_class_is_confirmed_by_the_region_over_other_classes(carriers):
    """The analytic corner shortcut on 16 or all 20 samples of class 1: the class's majority, which
    the comparison with class mates cancels. Each carrier's region over the other class (where its
    relevance most exceeds class 0's mean) is the corner, and its content carries class 1 into class
    0's samples, where class-0 content in the same place carries nothing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=gen) * 0.4
    x[:carriers, :, :4, :4] = 1.0
    heat = torch.rand(40, 1, 16, 16, generator=gen) * 0.1
    heat[:carriers, :, :4, :4] += 1.0
    heat[carriers:20, :, 6:10, 6:10] += 1.0
    heat[20:, :, 12:, 12:] += 1.0
    classes = np.array([1] * 20 + [0] * 20)
    kept = dict(infiller="constant", area=1 / 16, class_area=1 / 16)
    alone = sample_evidence(_Detector(), x, heat, classes, **{**kept, "class_area": 0}).confirmed
    assert alone[:carriers].sum() < carriers / 2 and not alone[carriers:].any(), "against class mates: a few at most"
    ev = sample_evidence(_Detector(), x, heat, classes, **kept)
    assert ev.confirmed.tolist() == (np.arange(40) < carriers).tolist()
    corner = torch.zeros(16, 16, dtype=torch.bool)
    corner[:4, :4] = True
    # described by their first confirmed check: those the class mates' check did not confirm by that region
    by_class = np.flatnonzero(~alone[:carriers])
    assert (ev.component[:carriers] == "region").all() and (ev.regions[by_class] == corner).all()
    assert ev.excess[by_class].min() > 0.9 and (ev.flip_rate[by_class] == 1).all()
    # the class's level over the rise asked (0.2 sqrt(8 / 16) OVER_OTHERS_RISE): class 1 far above, class 0 not
    assert ev.separation_ratio[0] > 0.9 / (0.2 * np.sqrt(0.5) * OVER_OTHERS_RISE) and ev.separation_ratio[20] < 1
    # class 1 went on into all 8 partners of each sample, against the next partner's content in the place
    shown, j = ev.example(0, x), int(ev.partners[0, 0])
    assert _Detector()(shown[3:]).argmax(1).item() == 1 and torch.equal(shown[3][:, ~corner], x[j][:, ~corner])


def test_what_most_of_a_class_carries_is_confirmed_only_where_it_shares_a_fine_pattern_there():
    """Every sample of class 1 carries the corner detector's corner as a smooth rise of light over a
    fine texture of its own (as a pale sky every photo of a class has): each sample's region over the
    other class carries class 1 into class 0's samples as the white square above does, but holds no
    fine pattern that class 0's content there does not, and is confirmed only where ``shared`` is
    not asked."""
    i = torch.arange(16.0)
    x = 0.3 * torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    x[:20] += 0.9 * torch.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / 32)   # brightest in the corner
    heat = 0.1 * torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    heat[:20, :, :4, :4] += 1.0
    heat[20:, :, 12:, 12:] += 1.0
    classes = np.array([1] * 20 + [0] * 20)
    assert (_Detector()(x).argmax(1) == torch.from_numpy(classes)).all()
    kept = dict(infiller="constant", area=1 / 16, class_area=1 / 16)
    ev, loose = (sample_evidence(_Detector(), x, heat, classes, shared=s, **kept) for s in (SHARED, 0))
    assert loose.confirmed[:20].all() and not loose.confirmed[20:].any()
    assert not ev.confirmed.any() and ev.separation_ratio[:20].max() < 1 <= loose.separation_ratio[:20].max()
    assert shared_detail(x[:20], x[20:], where=torch.as_tensor(loose.regions[:20])) < SHARED


class _AnywhereDetector(torch.nn.Module):
    """Class 1 where a bright 4x4 square sits anywhere in the image, else class 0."""

    def forward(self, x):
        found = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4, stride=1).amax((1, 2, 3))
        return torch.stack([torch.zeros_like(found), 40 * (found - 0.7)], 1)


def test_a_patch_anywhere_on_all_of_a_class_is_confirmed_where_each_sample_holds_it():
    """A bright square at a random place in every sample of class 1, read wherever it sits: the class
    mates carry it too, and no one place of the class holds it. Each sample's region over the other
    class is its own square, whose content carries class 1 into class 0's samples; class-0 content
    there carries nothing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=gen) * 0.4
    heat = torch.rand(40, 1, 16, 16, generator=gen) * 0.1
    heat[20:, :, 12:, 12:] += 1.0                 # class 0 at the bottom right
    square = torch.zeros(20, 16, 16, dtype=torch.bool)
    for i, (r, c) in enumerate(torch.randint(0, 9, (20, 2), generator=gen).tolist()):
        square[i, r:r + 4, c:c + 4] = True
    x[:20][square[:, None]] = 1.0
    heat[:20][square[:, None]] += 1.0
    classes = np.array([1] * 20 + [0] * 20)
    kept = dict(infiller="constant", area=1 / 16, class_area=1 / 16)
    alone = sample_evidence(_AnywhereDetector(), x, heat, classes, **{**kept, "class_area": 0}).confirmed
    assert alone[:20].sum() < 10 and not alone[20:].any(), "against class mates: a few at most"
    ev = sample_evidence(_AnywhereDetector(), x, heat, classes, **kept)
    assert ev.confirmed.tolist() == (np.arange(40) < 20).tolist()
    by_own = np.flatnonzero(~alone[:20])
    assert ((ev.regions[by_own] & square[by_own]).sum((1, 2)) >= 12).all()   # its own square (16 positions)
    assert (ev.component[:20] == "region").all() and ev.excess[by_own].min() > 0.9
    assert ev.separation_ratio[0] > 0.9 / (0.2 * np.sqrt(0.5) * OVER_OTHERS_RISE) and ev.separation_ratio[20] < 1


def test_a_group_must_stand_apart_on_partners_it_was_not_chosen_on():
    """Per-partner excesses of 50 samples (8 partners each). A planted group lifts every partner and
    stands apart on either half of them; a group that one draw of partners lifts (8 samples high on
    the first four partners, 8 others on the last four) stands apart on the median over all eight but
    falls back into the class on the half it was not chosen on; one member of a shortcut group left
    out of a half's group does not turn the measure."""
    rng = np.random.default_rng(0)
    rest = rng.normal(0, 0.03, (38, 8))
    planted = np.concatenate([0.5 + rng.normal(0, 0.05, (12, 8)), rest])
    assert held_out_separation(planted) > 3 * MIN_SEPARATION["region"]
    chance = np.concatenate([np.repeat([[0.6] * 4 + [0.0] * 4], 8, 0), np.repeat([[0.0] * 4 + [0.6] * 4], 8, 0),
                             rng.normal(0, 0.01, (34, 8))])
    assert separated_group(np.median(chance, 1))[1] > 3 * MIN_SEPARATION["region"], "all partners: a group of 16"
    assert held_out_separation(chance) < 1
    half = np.concatenate([0.5 + rng.normal(0, 0.05, (25, 8)), rng.normal(0, 0.03, (25, 8))])
    half[0, :4] = 0.0   # on the first half the group is 24; the 25th member is in the rest on the second
    assert held_out_separation(half) > MIN_SEPARATION["region"]
    assert held_out_separation(np.ones((10, 1))) == float("inf"), "one partner: nothing to hold out"


def test_a_group_that_may_be_the_majority_of_its_class_must_stand_further_apart():
    """A shortcut on half of a class is confirmed where it stands far apart; a group that is
    credibly more than half of the class (its majority strategy) is not: of 25 samples, 10 that
    stand apart count fully, 14 count half, 16 not at all (the bounds follow the class's size)."""
    assert [group_sizes(n) for n in (9, 25, 50)] == [(3, 5), (10, 14), (22, 27)]
    high, low = 0.5 + np.linspace(0, 0.02, 30), np.linspace(-0.02, 0.02, 36)

    def group(n_high, n, max_share=0.5):
        return separated_group(np.concatenate([high[:n_high], low[:n - n_high]]), max_share=max_share)

    full = group(10, 25)
    assert full[0].tolist() == list(range(10)) and full[1] > MIN_SEPARATION["region"]
    members, score = group(14, 25)
    assert members.tolist() == list(range(14))
    assert score == pytest.approx(group(14, 25, max_share=1)[1] / MAJORITY_SEPARATION)
    assert group(16, 25)[1] < 1, "16 of 25 is credibly the class's majority"
    members, score = group(27, 50)
    assert members.tolist() == list(range(27)) and score > MIN_SEPARATION["region"]
    assert group(30, 50)[1] < 1
    # a class too small for any group of min_members is named, with the size it takes
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(28, 1, 16, 16, generator=gen)
    with pytest.warns(UserWarning, match=r"classes \[1\] have too few analysed samples \(8 at the fewest\).* 9 "
                                         r"samples per class"):
        ev = sample_evidence(_Detector(), x, torch.rand(28, 1, 16, 16, generator=gen), [1] * 8 + [0] * 20)
    assert not ev.confirmed[:8].any()
    with pytest.raises(ValueError, match="max_share in"):
        sample_evidence(_Detector(), x, x, [1] * 8 + [0] * 20, max_share=0)


class _BagOfTokens(torch.nn.Module):
    """Logits: the sum over tokens of a row of ``table`` (V, classes) per token id, by ``.sum`` over
    an ``nn.Embedding``'s output or by an ``nn.EmbeddingBag``."""

    def __init__(self, table: torch.Tensor, bag: bool):
        super().__init__()
        self.bag = bag
        embedding = torch.nn.EmbeddingBag.from_pretrained(table, mode="sum") if bag else \
            torch.nn.Embedding.from_pretrained(table)
        self.table = embedding.requires_grad_(True)

    def forward(self, tokens):
        return self.table(tokens) if self.bag else self.table(tokens).sum(1)


def _rows(kind: str, planted: bool):
    """60 rows of 3 classes: token ids (N, 16; ``tokens`` or ``bag``), three of their class's ten words
    among neutral ones, or features (N, 12), three of their class's four raised. Class 0's rows
    ``i % 9 == 0`` (7 of 20) carry the shortcut: token 59 at a random place, or feature 11 (a leak
    column) at 1; the analytic model reads it as four of the class's own words or features."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    has = (torch.arange(60) % 9 == 0) & planted
    if kind in ("tokens", "bag"):
        x = torch.randint(31, 59, (60, 16), generator=gen)
        table = torch.zeros(60, 3)
        for i in range(60):
            place = torch.randperm(16, generator=gen)[:4]
            x[i, place[:3]] = 1 + 10 * y[i] + torch.randint(0, 10, (3,), generator=gen)
            if has[i]:
                x[i, place[3]] = 59
        for c in range(3):
            table[1 + 10 * c: 11 + 10 * c, c] = 1.0
        table[59, 0] = 4.0
        return _BagOfTokens(table, kind == "bag"), x, y, has
    x = torch.rand(60, 12, generator=gen) * 0.1
    linear = torch.nn.Linear(12, 3, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        for i in range(60):
            x[i, 4 * y[i] + torch.randperm(4, generator=gen)[:3]] += 1.0
        for c in range(3):
            linear.weight[c, 4 * c: 4 * c + 4] = 1.0
        linear.weight[0, 11] = 4.0
        x[has, 11] = 1.0
    return linear, x, y, has


@pytest.mark.parametrize("kind", ["tokens", "bag", "tabular"])
def test_a_shortcut_in_token_ids_or_tabular_rows_is_confirmed_and_gated(kind, tmp_path):
    """Rows (N, L) get the causal check with ROW_EVIDENCE (the bag of tokens is called with integer
    ids, as it must be), with the model's own LRP (a sum of the tokens' rows, as ``.sum`` or an
    ``nn.EmbeddingBag``: the norm rule, where the gradient gave every token the whole logit): the
    shortcut's rows are exactly the flagged strategy, described as a region, and the gate fails;
    the same rows without the shortcut flag nothing and pass."""
    for planted in (True, False):
        model, x, y, has = _rows(kind, planted)
        cb = SpRAyCallback(max_per_class=20, spray_options={"visualisation": None}, save_virelay=False,
                           vocab=[f"w{i}" for i in range(60)])
        gate = ExplanationGate(action="warn")
        folder = tmp_path / str(planted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the gate's failure warning
            make_trainer(folder, [cb, gate]).validate(Classifier(model), DataLoader(TensorDataset(x, y), 16),
                                                      verbose=False)
        idx = np.array(cb.sample_indices)
        r = cb.results[0]
        flagged = np.isin(r.labels, np.flatnonzero(r.flagged))
        assert flagged.tolist() == has[idx[y[idx] == 0]].tolist()
        assert not any(cb.results[c].flagged.any() for c in (1, 2))
        assert (main(["gate", str(folder)]) == 1) == planted
        if planted:
            assert r.evidence.component[r.flagged].tolist() == ["region"]
        if planted and kind != "tabular":   # the evidence page names the word the flagged strategy's regions hold
            (page,) = folder.rglob("spray__0__evidence/*.html")
            flagged_part = page.read_text().split("FLAGGED")[1]
            assert flagged_part.startswith(f"</b><br>its members' regions hold: w59 ({int(flagged.sum())})")


@pytest.mark.parametrize("base,kind", [("breast_cancer", "leak"), ("digits", "sentinel"), ("text", "tag"),
                                       ("text", "trigger")])
def test_row_scenarios_plant_their_shortcut_on_a_share_of_class_0_with_a_clean_twin(base, kind):
    train, val = make_shortcut_rows(base, kind, prevalence=0.3, seed=1)
    for split in (train, val):
        has = split.has_artifact
        assert has.sum() == round(0.3 * (split.targets == 0).sum().item()) and (split.targets[has] == 0).all()
        assert (split.artifact_mask.sum(1)[has] == 1).all()   # one position per shortcut row
        changed = split.x != split.clean_x
        assert (changed <= split.artifact_mask).all() and changed[has].any(1).all()
    planted = val.x[val.artifact_mask]
    if base == "text":
        assert val.x.dtype == torch.long and val.vocabulary[int(planted[0])] == TRIGGER
        assert (val.clean_x != len(val.vocabulary) - 1).all()   # the word is in no window of its own
        assert (val.artifact_mask[val.has_artifact, 0]).all() == (kind == "tag")
    else:
        assert (planted == (1.0 if kind == "leak" else -5.0)).all()
    _, clean = make_shortcut_rows(base, kind, prevalence=0.0, seed=1)
    assert not clean.has_artifact.any() and clean.shortcut_class is None
    with pytest.raises(ValueError, match=r"kind must be one of \('leak', 'sentinel'\) for base 'digits'"):
        make_shortcut_rows("digits", "tag")


def test_a_region_without_smoothing_is_the_one_position_that_stands_out():
    """One feature of a row carries the relevance: smoothed over 3 positions it ties with its two
    neighbours (the region of one position may miss it), each position on its own it is chosen."""
    heat = torch.full((1, 12), 0.01)
    heat[0, 6] = 1.0
    reference = torch.full((12,), 1 / 12)
    smoothed = relevance_regions(heat, reference, area=1 / 12)
    alone = relevance_regions(heat, reference, area=1 / 12, smooth=1)
    assert alone[0].nonzero().flatten().tolist() == [6]
    assert smoothed[0].nonzero().flatten().item() in (5, 6, 7)
    three = relevance_regions(heat, reference, area=3 / 12)   # the tie: the peak and both neighbours
    assert three[0].nonzero().flatten().tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="smooth an odd number"):
        relevance_regions(heat, reference, smooth=2)
