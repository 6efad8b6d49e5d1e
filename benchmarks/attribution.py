"""Cost of each explainer per probe batch, as a ratio to one forward+backward of the same model
and batch, next to the same method called directly in captum / zennit, all measured in one run.

    python benchmarks/attribution.py                       # ResNet-18 (32x3x64x64) and DemoCNN (64x1x32x32)
    python benchmarks/attribution.py --models demo_cnn --methods saliency,lrp.epsilon_gamma_box --repeats 5

Columns: ``ours / fwd+bwd`` and ``direct / fwd+bwd`` are median times divided by the median time
of one forward pass plus one backward pass to the input (the same autograd call the gradient
explainers make); ``ours / direct`` is the overhead of ``explain`` (input checks, the do-no-harm
guard, target handling, batching) over calling captum / zennit directly; the goal is <= 1.10.
In each repeat the fwd+bwd, ours and the direct call run back to back in rotating order, and
the ratios are taken within the repeat, so that load on a shared machine hits all three alike;
the table reports the median over repeats. RISE has no captum / zennit counterpart.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import captum.attr as ca  # noqa: E402
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat  # noqa: E402

from xai_callbacks.attribution import explain  # noqa: E402
from xai_callbacks.models import DemoCNN  # noqa: E402

METHODS = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop", "gradcam",
           "lrp.epsilon_plus_flat", "lrp.epsilon_gamma_box", "lrp.epsilon_alpha2_beta1", "occlusion", "rise"]


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode and its probe batch."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "resnet18":
        from torchvision.models import resnet18
        return resnet18(weights=None, num_classes=10).eval(), torch.rand(32, 3, 64, 64, generator=g)
    if name == "demo_cnn":
        return DemoCNN().eval(), torch.rand(64, 1, 32, 32, generator=g)
    raise SystemExit(f"unknown model {name!r}; valid: resnet18, demo_cnn")


def options(method: str, x: torch.Tensor) -> dict:
    """Options used for both ours and the direct call: the defaults where they are cheap enough,
    fewer samples / windows / masks where they are not (the run stays near 5 minutes)."""
    return {
        "integrated_gradients": {"n_steps": 32},
        "smoothgrad": {"n_samples": 8, "noise_level": 0.15, "batch_size": 8 * 32},
        # 16 windows per image, so occlusion stays within the time budget at 64x64
        "occlusion": {"window": x.shape[-1] // 4, "batch_size": 256},
        "rise": {"n_masks": 32, "batch_size": 256},
    }.get(method, {})


def canonizers_for(name: str) -> list:
    if name == "resnet18":
        from zennit.torchvision import ResNetCanonizer
        return [ResNetCanonizer()]
    return [SequentialMergeBatchNorm()]


def direct_call(method: str, model_name: str, model: nn.Module, x: torch.Tensor,
                target: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """The same method through captum / zennit directly, with the same options; None if none exists."""
    opts = options(method, x)
    if method == "saliency":
        return lambda: ca.Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=False)
    if method == "input_x_gradient":
        return lambda: ca.InputXGradient(model).attribute(x.clone().requires_grad_(True), target=target)
    if method == "integrated_gradients":
        return lambda: ca.IntegratedGradients(model).attribute(x, baselines=0.0, target=target,
                                                               n_steps=opts["n_steps"])
    if method == "smoothgrad":
        def smoothgrad():
            flat = x.flatten(1)
            stdevs = float(opts["noise_level"] * (flat.amax(1) - flat.amin(1)).mean())
            return ca.NoiseTunnel(ca.Saliency(model)).attribute(
                x.clone().requires_grad_(True), nt_type="smoothgrad", nt_samples=opts["n_samples"],
                nt_samples_batch_size=opts["batch_size"] // len(x), stdevs=stdevs, target=target, abs=False)
        return smoothgrad
    if method == "guided_backprop":
        return lambda: ca.GuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=target)
    if method == "gradcam":
        layer = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]

        def gradcam():
            cam = ca.LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
            return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False).expand_as(x)
        return gradcam
    if method.startswith("lrp."):
        def lrp():
            canonizers = canonizers_for(model_name)
            composite = {
                "lrp.epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=canonizers),
                "lrp.epsilon_gamma_box": lambda: EpsilonGammaBox(  # each sample's own bounds, as ours
                    low=x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x),
                    high=x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x), canonizers=canonizers),
                "lrp.epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(canonizers=canonizers),
            }[method]()
            with Gradient(model=model, composite=composite) as attributor:
                return attributor(x, lambda out: out * F.one_hot(target, out.shape[1]))[1]
        return lrp
    if method == "occlusion":
        w, c = opts["window"], x.shape[1]
        per_eval = max(1, opts["batch_size"] // x.shape[0])  # same images per forward as ours
        return lambda: ca.Occlusion(model).attribute(x, sliding_window_shapes=(c, w, w), strides=(c, w, w),
                                                     baselines=0.0, target=target, perturbations_per_eval=per_eval)
    return None


def fwd_bwd(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward and one backward pass to the input: the unit of cost."""
    def run():
        xi = x.clone().requires_grad_(True)
        score = model(xi).gather(1, target[:, None]).sum()
        return torch.autograd.grad(score, xi)[0]
    return run


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_model(model_name: str, methods: list[str], repeats: int, warmup: int, device: str) -> list[dict]:
    """Per method: in each repeat, one fwd+bwd, one call of ours and one direct call, in rotating
    order; ratios are taken within a repeat (same load on the machine) and their median reported."""
    model, x = build(model_name)
    model, x = model.to(device), x.to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    base_fn = fwd_bwd(model, x, target)
    rows = []
    for method in methods:
        opts = options(method, x)
        fns = {"base": base_fn, "ours": lambda: explain(model, x, target, method=method, **opts)}  # noqa: B023
        direct_fn = direct_call(method, model_name, model, x, target)
        if direct_fn is not None:
            fns["direct"] = direct_fn
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(repeats):
            keys = list(fns)
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                times[k].append(seconds(fns[k]))

        def med(a: str, b: str) -> float | None:
            if a not in times or b not in times:
                return None
            return statistics.median(t / u for t, u in zip(times[a], times[b]))

        row = {"model": model_name, "shape": tuple(x.shape), "method": method,
               "base_ms": 1e3 * statistics.median(times["base"]), "ours": med("ours", "base"),
               "direct": med("direct", "base"), "overhead": med("ours", "direct")}
        rows.append(row)
        d = f"{row['direct']:6.2f}x" if row["direct"] is not None else "    --"
        print(f"  {model_name:9s} {method:25s} ours {row['ours']:6.2f}x  direct {d}", file=sys.stderr, flush=True)
    return rows


def fixed_cost(repeats: int = 200) -> tuple[float, float]:
    """Per-call cost in ms of ``explain`` vs captum directly (saliency) on a model whose compute is
    negligible (a 16->4 linear layer, batch 4): what the checks, guard and wrapping add to every
    call. Minimum over ``repeats`` calls, so that load on the machine does not count."""
    model, x = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval(), torch.rand(4, 1, 4, 4)
    target = torch.tensor([0, 1, 2, 3])
    ours = lambda: explain(model, x, target, method="saliency")  # noqa: E731
    direct = lambda: ca.Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=False)  # noqa: E731
    times: dict[str, list[float]] = {"ours": [], "direct": []}
    for _ in range(repeats):
        times["ours"].append(seconds(ours))
        times["direct"].append(seconds(direct))
    return 1e3 * min(times["ours"]), 1e3 * min(times["direct"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,demo_cnn", help="comma list of resnet18, demo_cnn")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median of ratios)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per method before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; valid: {METHODS}")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        rows += bench_model(name, methods, args.repeats, args.warmup, args.device)

    print(f"torch {torch.__version__}, {args.threads} threads, {args.device}, {args.repeats} repeats (warm-up {args.warmup}), "
          "median of per-repeat ratios; unit: one forward+backward of the same model and batch; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs\n")
    print("| model | batch | method | fwd+bwd (ms) | ours / fwd+bwd | direct / fwd+bwd | ours / direct |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        shape_s = "x".join(map(str, row["shape"]))
        d = f"{row['direct']:.2f}" if row["direct"] is not None else "--"
        o = f"{row['overhead']:.2f}" if row["overhead"] is not None else "--"
        print(f"| {row['model']} | {shape_s} | {row['method']} | {row['base_ms']:.0f} | {row['ours']:.2f} | {d} | {o} |")
    ours_ms, direct_ms = fixed_cost()
    print(f"\nfixed cost per call (saliency, 16->4 linear model, batch 4, min of 200): ours {ours_ms:.2f} ms, "
          f"captum directly {direct_ms:.2f} ms")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
