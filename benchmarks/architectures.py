"""Every registered method on torchvision architectures (random weights, small inputs, CPU).

    python benchmarks/architectures.py [--models resnet18 densenet121 ...] [--methods saliency ...]
                                       [--size 32] [--batch 2] [--threads 2]
    python benchmarks/architectures.py --models timm/vit_tiny_patch16_224 timm/convnext_atto ...   # timm's

Each cell either runs (relevance shaped like the input, finite, the model's ``state_dict``
bit-identical afterwards, no hooks left) or raises the named ``MethodNotApplicableError``;
anything else is a failure. Prints a markdown table of the outcome and the seconds per call, and
the cost of the guard's per-call model snapshot against a saliency call on the same model.
Iterative methods run with few steps (see ``FAST``): the table is about correctness, not speed.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from torch import nn

from xai_callbacks.attribution import available_methods, explain
from xai_callbacks.attribution.transformer import MethodNotApplicableError
from xai_callbacks.guard import ModelSnapshot, hook_count

warnings.filterwarnings("ignore")

FAST = {"integrated_gradients": {"n_steps": 8}, "smoothgrad": {"n_samples": 4}, "occlusion": {"window": 8},
        "rise": {"n_masks": 32}, "meaningful_perturbation": {"steps": 5}, "fido.ssr": {"steps": 5},
        "fido.sdr": {"steps": 5}, "rde": {"steps": 5}}


def models(size: int) -> dict:
    import torchvision.models as tv
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    def vit():
        m = VisionTransformer(image_size=size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
        nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
        return m

    return {
        "resnet18": lambda: tv.resnet18(num_classes=10),
        "vgg11_bn": lambda: tv.vgg11_bn(num_classes=10),
        "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
        "densenet121": lambda: tv.densenet121(num_classes=10),
        "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
        "vit_tiny": vit,
        "swin_tiny": lambda: SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                             window_size=[4, 4], num_classes=10),
    }


def timm_model(name: str, size: int) -> nn.Module:
    """timm's model ``timm/NAME`` with 10 classes, for ``size``-pixel inputs where it takes an
    image size (``pip install timm``)."""
    import timm

    if not name.startswith("timm/"):
        raise SystemExit(f"unknown model {name!r}: torchvision's {list(models(32))} or timm's as timm/NAME")
    try:
        return timm.create_model(name[5:], num_classes=10, img_size=size)
    except TypeError:   # a model without an image size (a CNN)
        return timm.create_model(name[5:], num_classes=10)


def randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a canonizer that is not undone would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def cell(model: nn.Module, x: torch.Tensor, method: str) -> str:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = time.perf_counter()
    outcome = None
    try:
        rel = explain(model, x, 1, method=method, **FAST.get(method, {}))
        if rel.shape != x.shape or not torch.isfinite(rel).all():
            outcome = f"FAIL: shape {tuple(rel.shape)} or non-finite"
    except MethodNotApplicableError:
        outcome = "n/a"
    except Exception as e:  # noqa: BLE001 - the table reports it
        outcome = f"FAIL: {type(e).__name__}: {str(e)[:60]}"
    seconds = time.perf_counter() - start
    after = model.state_dict()
    if after.keys() != before.keys() or any(not torch.equal(after[k], v) for k, v in before.items()):
        outcome = "FAIL: model changed"
    if hook_count(model):
        outcome = "FAIL: hooks left"
    return outcome or f"ok {seconds:.2f}s"


def snapshot_cost(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> tuple[float, float]:
    """(seconds per ModelSnapshot, seconds per saliency call) on ``model``."""
    start = time.perf_counter()
    for _ in range(repeats):
        ModelSnapshot(model).changed()
    snap = (time.perf_counter() - start) / repeats
    explain(model, x, 1, method="saliency")
    start = time.perf_counter()
    for _ in range(3):
        explain(model, x, 1, method="saliency")
    return snap, (time.perf_counter() - start) / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = models(args.size)
    names = args.models or list(builders)
    methods = args.methods or available_methods()
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    print(f"# {args.batch} x 3 x {args.size} x {args.size} inputs, random weights, CPU, {args.threads} threads\n")
    table = {}
    costs = {}
    for name in names:
        torch.manual_seed(0)
        model = randomise_batchnorm(builders[name]() if name in builders else timm_model(name, args.size)).eval()
        table[name] = {}
        for m in methods:
            table[name][m] = cell(model, x, m)
            print(f"{name} {m}: {table[name][m]}", file=sys.stderr, flush=True)
        costs[name] = snapshot_cost(model, x)
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for m in methods:
        print(f"| {m} | " + " | ".join(table[n][m] for n in names) + " |")
    print("\nguard's per-call snapshot (references, no copies) vs one saliency call:")
    for name, (snap, sal) in costs.items():
        print(f"  {name}: snapshot {snap * 1e3:.2f} ms, saliency {sal * 1e3:.1f} ms, ratio {snap / sal:.3f}")


if __name__ == "__main__":
    main()
