"""Shortcut benchmark: does the default SpRAy flag and gate catch real Clever-Hans shortcuts?

Scenarios (``xai_callbacks.data.make_shortcut_images``): crops of real photographs from scikit-image
(4 classes, 32x32 RGB) with a shortcut on ``--prevalence`` of class 0, one per kind (stamp, tags,
patch, frame, colour, watermark, blur, noise, grey, background, caption, line, marker, vignette,
edge, logo; grey only on colour photos such as ``--photos coffee chelsea astronaut rocket``), and
their clean controls (the same images without the shortcut: one for plain crops, one for the
object-on-background composites); plus the digits with a stamp and their clean control.
Architectures, trained from scratch (on ``--device``: a GPU where there is one): a small CNN
(``DemoCNN``), torchvision's ResNet-18, VGG-11-BN (its classifier replaced by one linear layer: at
32x32 the features end at 1x1) and MobileNetV3-small (the calibration's, the default), and eleven the
check was not calibrated on: ``resnet18-cifar`` (the usual 32-pixel ResNet-18: a 3x3 stem at stride 1, no max-pool), ``vit``
(a torchvision VisionTransformer of 4 layers on 4x4 patches; SpRAy explains it with AttnLRP),
``mlp`` (no convolution: two hidden layers of 256 and 128 ReLU units on the flattened image), and
torchvision's ``shufflenet`` (ShuffleNetV2 x1.0), ``densenet`` (DenseNet-121), ``efficientnet``
(EfficientNet-B0), ``mobilenetv2`` (MobileNetV2), ``regnet`` (RegNetY-400MF), ``convnext``
(ConvNeXt-T), ``squeezenet`` (SqueezeNet 1.1) and ``resnet50`` (ResNet-50) as they come (at 32 pixels they learn the photos
poorly in a few epochs: see "Architectures the check never saw" in docs/shortcut-benchmark.md).

For each scenario x architecture:

1. train (Adam, ``--epochs``);
2. **intervention** (shortcut scenarios): paste the shortcut onto other classes' validation
   images (share newly predicted as the shortcut class) and remove it from the shortcut samples
   (share of those predicted as the class that no longer are). The model *uses* the shortcut
   when either share is >= 0.2; otherwise the scenario is **void** (not counted as a miss);
3. run ``SpRAyCallback`` and ``ExplanationGate`` at their defaults in ``Trainer.validate``, then
   ``xai-callbacks gate RUN`` (its exit code);
4. score the flag against the truth: recall (share of the analysed shortcut samples in flagged
   strategies), purity (share of the flagged strategies' samples that carry the shortcut),
   flagged strategies in the shortcut class, false flags (flagged strategies of other classes,
   or of any class on a clean control), the ROC AUC of the per-sample suspicion within the
   shortcut class, the forward passes of the causal check (and per analysed sample), and how
   close each side came to the threshold: the separation ratio (best-separated group over its
   threshold, >= 1 flagged) of the shortcut class (``sep0``) and the largest of the other classes
   (``sep_rest``);
   and, whatever is flagged, how well the clustering isolates the shortcut samples: purity and
   recall of the shortcut class's best cluster (the one with the highest F1 for them).

The run ends with a summary line over its rows (the counts of the README's tables).

``--features heatmaps concepts`` analyses each trained model twice: SpRAy on the pixel heatmaps
and on the concept relevances of ``CONCEPT_LAYERS[arch]`` (``SpRAyCallback(features="concepts")``).
``--cache DIR`` keeps the trained weights, so a second run skips training. ``--photos`` takes the
classes from other photographs (the calibration used the default four; scikit-learn's ``china`` and
``flower`` as well as scikit-image's). ``--stamp-side`` sets the
side of the stamp and the tags (a share of the image side; 3/16 by default). ``--evidence-options JSON``
replaces the callback's default ``evidence_options`` (e.g. ``'{"area": 0.125}'``: the eighth alone),
``--evidence-regions METHOD`` its ``evidence_regions`` (the method whose relevance locates each
sample's region; ``heatmaps``: the heatmaps SpRAy clusters).
``--one-logit`` (two classes) trains binary classifiers with one logit and ``BCEWithLogitsLoss``,
which the callbacks read as two classes (``xai_callbacks.scoring.class_scores``).

    nice -n 10 python benchmarks/shortcuts.py                         # everything (~25 min on 2 cores)
    nice -n 10 python benchmarks/shortcuts.py --archs cnn --kinds stamp clean
    nice -n 10 python benchmarks/shortcuts.py --cost                  # + default SpRAy epoch time with / without the check
    nice -n 10 python benchmarks/shortcuts.py --cost 5                # the same, the fastest of 5 alternate runs each
    nice -n 10 python benchmarks/shortcuts.py --archs cnn --features heatmaps concepts --cache /tmp/shortcut-models
    nice -n 10 python benchmarks/shortcuts.py --archs cnn --photos coffee chelsea astronaut rocket
    nice -n 10 python benchmarks/shortcuts.py --archs cnn --photos coffee chelsea --one-logit --kinds stamp clean
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("WANDB_MODE", "offline")

from xai_callbacks.data import SHORTCUT_KINDS, make_shortcut_images, plant_shortcut  # noqa: E402
from xai_callbacks.data.shortcuts import STAMP_SIDE  # noqa: E402
from xai_callbacks.models import classification_loss  # noqa: E402
from xai_callbacks.scoring import class_scores  # noqa: E402

# torchvision models as torchvision builds them (grey inputs through a 1x1 convolution), never calibrated on:
# name -> its builder in torchvision.models
AS_BUILT = {"shufflenet": "shufflenet_v2_x1_0", "densenet": "densenet121", "efficientnet": "efficientnet_b0",
            "mobilenetv2": "mobilenet_v2", "regnet": "regnet_y_400mf", "convnext": "convnext_tiny",
            "squeezenet": "squeezenet1_1", "resnet50": "resnet50"}
ARCHS = ("cnn", "resnet18", "vgg11", "mobilenet", "resnet18-cifar", "vit", "mlp", *AS_BUILT)
CALIBRATED = ARCHS[:4]   # the architectures the check's thresholds were calibrated on (the default)
FEATURES = ("heatmaps", "concepts")
# concept-space SpRAy: the layer whose channels are the concepts (names inside models.Classifier)
CONCEPT_LAYERS = {"cnn": "model.features.9", "resnet18": "model.layer4", "resnet18-cifar": "model.layer4",
                  "vgg11": "model.features.27",
                  "mobilenet": "model.features.12"}
SHORTCUT_CLASS = 0
GLOBAL_KINDS = ("colour", "watermark", "blur", "noise", "grey", "vignette")   # kinds that change the whole image
RELIED = 0.2   # a sample's shortcut is relied on when pasting it moves this share of other samples (as for void)


def build(arch: str, channels: int, classes: int, seed: int, size: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "cnn":
        from xai_callbacks.models import DemoCNN

        return DemoCNN(in_channels=channels, n_classes=classes, width=16, image_size=size)
    if arch == "mlp":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, 256), torch.nn.ReLU(),
                                   torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, classes))
    import torchvision

    if arch == "resnet18":
        model = torchvision.models.resnet18(num_classes=classes)
        if channels != 3:
            model.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        return model
    if arch == "resnet18-cifar":
        model = torchvision.models.resnet18(num_classes=classes)
        model.conv1, model.maxpool = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False), torch.nn.Identity()
        return model
    if arch == "vit":
        model = torchvision.models.VisionTransformer(image_size=size, patch_size=4, num_layers=4, num_heads=4,
                                                     hidden_dim=96, mlp_dim=192, num_classes=classes)
        if channels != 3:
            model.conv_proj = torch.nn.Conv2d(channels, 96, 4, 4)
        return model
    if arch == "vgg11":   # VGG-11-BN for 32x32 inputs: the five pools leave 1x1, so one linear layer on top
        model = torchvision.models.vgg11_bn(num_classes=classes)
        model.avgpool, model.classifier = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(512, classes)
        if channels != 3:
            model.features[0] = torch.nn.Conv2d(channels, 64, 3, padding=1)
        return model
    if arch == "mobilenet":
        model = torchvision.models.mobilenet_v3_small(num_classes=classes)
        if channels != 3:
            model.features[0][0] = torch.nn.Conv2d(channels, 16, 3, 2, 1, bias=False)
        return model
    if arch in AS_BUILT:
        model = getattr(torchvision.models, AS_BUILT[arch])(num_classes=classes)
        return model if channels == 3 else torch.nn.Sequential(torch.nn.Conv2d(channels, 3, 1), model)
    raise ValueError(f"unknown architecture {arch!r}; valid: {ARCHS}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def train(model, data, epochs: int, lr: float, seed: int, batch_size: int = 64) -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    device = _device(model)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(batch_size):
            if len(idx) < 2:
                continue
            loss = classification_loss(model(data.x[idx].to(device)), data.targets[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def predict(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([class_scores(model(part.to(_device(model)))).argmax(1).cpu() for part in x.split(256)])


def intervention(model, val) -> tuple[float, float]:
    """(paste rate, removal rate) of the planted shortcut on the validation split."""
    c = SHORTCUT_CLASS
    other = val.targets != c
    x = val.clean_x[other]
    before = predict(model, x)
    planted, _ = plant_shortcut(x, val.kind, val.object_mask[other], seed=99, stamp_side=val.stamp_side)
    after = predict(model, planted)
    paste = float(((before != c) & (after == c)).sum() / max(int((before != c).sum()), 1))
    has = val.has_artifact
    with_it = predict(model, val.x[has])
    without = predict(model, val.clean_x[has])
    removal = float(((with_it == c) & (without != c)).sum() / max(int((with_it == c).sum()), 1))
    return paste, removal


@torch.no_grad()
def reliance(model, val, rows: np.ndarray, partners: int = 32, seed: int = 0) -> np.ndarray:
    """(len(rows),) per shortcut sample: the share of ``partners`` other-class validation images the
    model does not give the shortcut class that it does once this sample's own shortcut is pasted in
    (its artifact pixels; for the global kinds the same shift, pattern or filter)."""
    c = SHORTCUT_CLASS
    other = torch.nonzero((val.targets != c) & (predict(model, val.clean_x) != c)).flatten()
    pick = other[torch.randperm(len(other), generator=torch.Generator().manual_seed(seed))[:partners]]
    into = val.clean_x[pick]

    def moved(pasted: torch.Tensor) -> float:
        return float((predict(model, pasted) == c).float().mean())

    if val.kind in GLOBAL_KINDS:   # a change of the whole image: the same shift, pattern or filter
        return np.full(len(rows), moved(plant_shortcut(into, val.kind, seed=seed)[0]))
    masks = val.artifact_mask[rows]
    return np.array([moved(into * (1 - m) + val.x[i:i + 1] * m) for i, m in zip(rows, masks)])


def analyse(model, val, folder: str, evidence: bool = True, concept_layer: str | None = None,
            evidence_options: dict | None = None, pictures: bool = False, evidence_regions: str | None = None
            ) -> dict:
    """SpRAyCallback + ExplanationGate (defaults) in Trainer.validate; the CLI gate's exit code.
    Without ``pictures`` the t-SNE embedding and the ViRelAy files, which decide nothing, are skipped;
    ``evidence_regions``, where given, replaces the callback's (``heatmaps``: None, its method's heatmaps)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from xai_callbacks.callbacks.gate import ExplanationGate
    from xai_callbacks.callbacks.spray import SpRAyCallback
    from xai_callbacks.cli import main
    from xai_callbacks.models import Classifier

    options = {} if pictures else {"spray_options": {"visualisation": None}, "save_virelay": False}
    if evidence_regions is not None:
        options["evidence_regions"] = None if evidence_regions == "heatmaps" else evidence_regions
    cb = SpRAyCallback(**options, evidence=evidence,
                       evidence_options=evidence_options, features="concepts" if concept_layer else "heatmaps",
                       concept_layer=concept_layer)
    gate = ExplanationGate(action="warn")
    device = _device(model)
    trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                         callbacks=[cb, gate], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=folder)
    module = Classifier(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(module, DataLoader(val, batch_size=128), verbose=False)
    seconds = time.perf_counter() - start
    model.to(device)   # Lightning's teardown moves the module to the CPU
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["gate", folder])
    return {"cb": cb, "gate": code, "seconds": seconds}


def score(cb, val, shortcut: bool, model=None) -> dict:
    idx = np.array(cb.sample_indices)
    labels = val.targets.numpy()[idx]
    has_all = val.has_artifact.numpy()[idx]
    out = {"recall": np.nan, "recall_relied": np.nan, "relied": 0, "purity": np.nan, "auc": np.nan, "flagged": 0,
           "false": 0, "passes": 0, "n": len(idx)}
    for c, r in cb.results.items():
        ev = r.evidence
        out["passes"] += ev.forward_passes if ev is not None else 0
        n_flag = int(r.flagged.sum())
        if shortcut and c == SHORTCUT_CLASS:
            has = has_all[labels == c]
            in_flag = np.isin(r.labels, np.flatnonzero(r.flagged))
            out["flagged"] = n_flag
            out["recall"] = float((has & in_flag).sum() / max(has.sum(), 1))
            if model is not None:   # recall over the shortcut samples whose own shortcut the model relies on
                relied = np.zeros_like(has)
                relied[has] = reliance(model, val, idx[labels == c][has]) >= RELIED
                out["relied"] = int(relied.sum())
                out["recall_relied"] = float((relied & in_flag).sum() / relied.sum()) if relied.any() else np.nan
            out["purity"] = float((has & in_flag).sum() / in_flag.sum()) if in_flag.any() else np.nan
            susp = ev.sample_suspicion if ev is not None else r.suspicion
            out["auc"] = float(roc_auc_score(has, susp)) if 0 < has.sum() < len(has) else np.nan
            hits = np.array([(has & (r.labels == j)).sum() for j in range(r.n_clusters)])
            best = int(np.argmax(2 * hits / (r.cluster_sizes + has.sum())))  # the best cluster by F1
            out["best_purity"] = float(hits[best] / r.cluster_sizes[best])
            out["best_recall"] = float(hits[best] / max(has.sum(), 1))
            out["clusters"] = [(int(r.cluster_sizes[j]), round(float(has[r.labels == j].mean()), 2),
                                round(float(r.cluster_suspicion[j]), 2),
                                round(float(ev.transfer_rate[j]), 2) if ev is not None else np.nan,
                                round(float(ev.score_drop[j]), 2) if ev is not None else np.nan)
                               for j in range(r.n_clusters)]
        else:
            out["false"] += n_flag
            out["shape_false"] = out.get("shape_false", 0) + int((r.cluster_suspicion >= 0.25).sum())
        if ev is not None:
            if c == SHORTCUT_CLASS:
                out["sep0"] = ev.separation_ratio
            else:
                out["sep_rest"] = max(out.get("sep_rest", 0.0), ev.separation_ratio)
            out.setdefault("max_other", 0.0)
            if not (shortcut and c == SHORTCUT_CLASS):
                out["max_other"] = max(out["max_other"], float(ev.transfer_rate.max(initial=0)))
    return out


def summary(rows: list[dict]) -> str:
    """One line over the printed rows: shortcut models that used their shortcut, how many of them are
    caught (recall >= 0.9 at purity >= 0.8) and gated, clean controls that flag, and shortcut models
    with a class flagged where nothing was planted."""
    used = [r for r in rows if r["used"] == "yes"]
    void = sum(r["used"] == "VOID" for r in rows)
    controls = [r for r in rows if r["used"] == "-"]
    caught = sum(r["recall"] >= 0.9 and r["purity"] >= 0.8 for r in used)
    gated = sum(r["gate"] == 1 for r in used)
    flagging = sum(r["false"] > 0 or r["gate"] != 0 for r in controls)
    return (f"summary: {len(used)} shortcut models used their shortcut ({void} void), {caught} caught, {gated} "
            f"gated; {flagging} of {len(controls)} clean controls flag; "
            f"{sum(r['false'] > 0 for r in used)} shortcut models with another class flagged")


def scenarios(kinds, base_options) -> list[tuple[str, str, str, float]]:
    """(name, base, kind, prevalence) for the requested kinds and their clean controls."""
    out = []
    for kind in kinds:
        if kind == "clean":
            out.append(("clean", "photos", "stamp", 0.0))
        elif kind == "clean-background":
            out.append(("clean-background", "photos", "background", 0.0))
        elif kind == "digits":
            out.append(("digits-stamp", "digits", "stamp", base_options["prevalence"]))
        elif kind == "clean-digits":
            out.append(("clean-digits", "digits", "stamp", 0.0))
        else:
            out.append((kind, "photos", kind, base_options["prevalence"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(CALIBRATED), choices=ARCHS)
    ap.add_argument("--kinds", nargs="+", default=list(SHORTCUT_KINDS) + ["clean", "clean-background", "digits",
                                                                         "clean-digits"])
    ap.add_argument("--prevalence", type=float, default=0.3)
    ap.add_argument("--ambiguity", type=float, default=0.4)
    ap.add_argument("--n-per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=32, help="side of the square images")
    ap.add_argument("--stamp-side", type=float, default=STAMP_SIDE,
                    help="side of the stamp and the tags, a share of the image side")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", nargs="+", default=None, metavar="NAME",
                    help="skimage.data photos of the classes (default: brick grass gravel moon), e.g. coffee chelsea "
                         "astronaut rocket, or scikit-learn's china and flower: other real images for the same "
                         "scenarios")
    ap.add_argument("--one-logit", action="store_true",
                    help="two classes only: binary classifiers with one logit, trained with BCEWithLogitsLoss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the models are trained and analysed (the cached weights are the same on either)")
    ap.add_argument("--cost", type=int, nargs="?", const=3, default=0, metavar="REPEATS",
                    help="also time the default SpRAy epoch (t-SNE, ViRelAy files) with / without the causal "
                         "check, alternately REPEATS times (default 3); the ratio of the fastest of each")
    ap.add_argument("--cache", default=None, help="folder for trained weights: reruns load them instead of training")
    ap.add_argument("--verbose", action="store_true", help="print the shortcut class's clusters")
    ap.add_argument("--features", nargs="+", default=["heatmaps"], choices=FEATURES,
                    help="what SpRAy clusters; several: each trained model is analysed once per choice")
    ap.add_argument("--evidence-options", type=json.loads, default=None, metavar="JSON",
                    help='SpRAyCallback evidence_options instead of the defaults, e.g. \'{"area": [0.125, 0.03125]}\'')
    ap.add_argument("--evidence-regions", default=None, metavar="METHOD",
                    help="SpRAyCallback evidence_regions instead of its default (input_x_gradient): an attribution "
                         "method, or 'heatmaps' for the heatmaps SpRAy clusters")
    args = ap.parse_args(argv)
    for name in ("lightning.pytorch", "xai_callbacks"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    rows = []
    head = (f"{'scenario':<17} {'arch':<11} {'features':<8} {'acc':>5} {'paste':>5} {'remov':>5} {'used':>5} {'recall':>6} "
            f"{'relied':>9} {'purity':>6} {'flag':>4} {'false':>5} {'auc':>5} {'gate':>4} {'fwd/smp':>7} {'s':>5} {'best_p':>6} {'best_r':>6} "
            f"{'sep0':>5} {'sep_rest':>8}")
    print(head, flush=True)
    t0 = time.perf_counter()
    for name, base, kind, prev in scenarios(args.kinds, vars(args)):
        photos = tuple(args.photos) if args.photos and base == "photos" else 4
        try:
            train_set, val = make_shortcut_images(kind, base=base, classes=photos, n_per_class=args.n_per_class,
                                                  size=args.size, prevalence=prev, seed=args.seed,
                                                  stamp_side=args.stamp_side,
                                                  ambiguity=args.ambiguity if base == "photos" else 0.0)
        except ValueError as err:   # e.g. grey on photos without colour
            print(f"{name:<17} skipped: {err}", flush=True)
            continue
        for arch in args.archs:
            start = time.perf_counter()
            classes = int(train_set.targets.max()) + 1
            if args.one_logit and classes != 2:
                raise SystemExit(f"--one-logit needs two classes (e.g. --photos coffee chelsea), got {classes}")
            model = build(arch, train_set.x.shape[1], 1 if args.one_logit else classes, args.seed, args.size
                          ).to(args.device)
            other = "-" + "_".join(args.photos) if args.photos and base == "photos" else ""
            other += f"-{args.size}px" if args.size != 32 else ""
            small = args.stamp_side != STAMP_SIDE and kind in ("stamp", "tags") and prev > 0
            other += f"-side{args.stamp_side:g}" if small else ""
            other += "-onelogit" if args.one_logit else ""
            cached = args.cache and os.path.join(args.cache, f"{name}{other}-{arch}-p{prev}-a{args.ambiguity}"
                                                             f"-n{args.n_per_class}-e{args.epochs}-lr{args.lr}"
                                                             f"-s{args.seed}.pt")
            if cached and os.path.exists(cached):
                model.load_state_dict(torch.load(cached, map_location=args.device))
                model.eval()
            else:
                train(model, train_set, args.epochs, args.lr, args.seed)
                if cached:
                    os.makedirs(args.cache, exist_ok=True)
                    torch.save(model.state_dict(), cached)
            acc = float((predict(model, val.x) == val.targets).float().mean())
            shortcut = prev > 0
            paste, removal = intervention(model, val) if shortcut else (np.nan, np.nan)
            used = shortcut and max(paste, removal) >= 0.2
            for features in args.features:
                layer = CONCEPT_LAYERS.get(arch) if features == "concepts" else None
                if features == "concepts" and layer is None:
                    print(f"{name:<17} {arch:<11} concepts skipped: no concept layer for {arch}", flush=True)
                    continue
                with tempfile.TemporaryDirectory() as folder:
                    res = analyse(model, val, folder, concept_layer=layer, evidence_options=args.evidence_options,
                                  evidence_regions=args.evidence_regions)
                    s = score(res["cb"], val, shortcut, model)
                    if args.cost:  # the default SpRAy epoch (t-SNE, ViRelAy files) with / without the check,
                        # alternately; the fastest of each: a shared machine only ever adds time
                        seconds = {check: [] for check in (True, False)}
                        for r in range(args.cost):
                            for check in seconds:
                                seconds[check].append(analyse(model, val, f"{folder}/{r}-{check}", evidence=check,
                                                              concept_layer=layer, pictures=True,
                                                              evidence_options=args.evidence_options,
                                                              evidence_regions=args.evidence_regions)["seconds"])
                        s["cost"] = min(seconds[True]) / min(seconds[False])
                row = dict(scenario=name, arch=arch, features=features, acc=acc, paste=paste, removal=removal,
                           used=("yes" if used else "VOID") if shortcut else "-", gate=res["gate"],
                           seconds=time.perf_counter() - start, **s)
                rows.append(row)
                print(f"{name:<17} {arch:<11} {features:<8} {acc:5.2f} {paste:5.2f} {removal:5.2f} {row['used']:>5} "
                      f"{s['recall']:6.2f} {s['recall_relied']:4.2f}/{s['relied']:<4d} {s['purity']:6.2f} "
                      f"{s['flagged']:4d} {s['false']:5d} {s['auc']:5.2f} "
                      f"{res['gate']:4d} {s['passes'] / s['n']:7.1f} {row['seconds']:5.0f} "
                      f"{s.get('best_purity', np.nan):6.2f} {s.get('best_recall', np.nan):6.2f} "
                      f"{s.get('sep0', np.nan):5.2f} {s.get('sep_rest', np.nan):8.2f}"
                      + (f" cost x{s['cost']:.2f}" if "cost" in s else "")
                      + (f"  clusters {s.get('clusters')} max_other {s.get('max_other', 0):.2f} shape_false {s.get('shape_false', 0)}" if args.verbose else ""),
                      flush=True)
    print(summary(rows))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
