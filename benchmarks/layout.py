"""Memory layout of the perturbed inputs' forward passes on the CPU: the model as it is, its images
in channels-last (what :func:`xai_callbacks.scoring.score_perturbed` does on the CPU), and the
causal check's channels-last copies of the 4-D weights on top (``_ChannelsLast`` in
:mod:`xai_callbacks.spray.evidence`); milliseconds per image (best of the interleaved repeats)
and the ratios, all in one run. ``democnn_grey`` is the digits demo's model, on one channel.

    PYTHONPATH=. python benchmarks/layout.py [--sizes 32 64] [--n 256] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from xai_callbacks.models import DemoCNN
from xai_callbacks.spray.evidence import _ChannelsLast

ARCHS = {"democnn": lambda size: DemoCNN(in_channels=3, n_classes=4, width=16, image_size=size),
         "democnn_grey": lambda size: DemoCNN(in_channels=1, n_classes=10, width=16, image_size=size),
         "resnet18": lambda size: torchvision.models.resnet18(num_classes=4),
         "vgg11_bn": lambda size: torchvision.models.vgg11_bn(num_classes=4),
         "mobilenet_v3_small": lambda size: torchvision.models.mobilenet_v3_small(num_classes=4),
         "efficientnet_b0": lambda size: torchvision.models.efficientnet_b0(num_classes=4),
         "densenet121": lambda size: torchvision.models.densenet121(num_classes=4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--n", type=int, default=256, help="images per measurement, in batches of 128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def last(t):
        return t.to(memory_format=torch.channels_last)

    print(f"{'model':20s} {'size':>4s} | {'as is':>7s} {'cl in':>7s} {'cl w':>7s} ms/image | "
          f"{'as is / cl in':>13s} {'cl in / cl w':>12s} | copy of the weights")
    for size in args.sizes:
        for name, make in ARCHS.items():
            model = make(size).eval()
            x = torch.randn(args.n, 1 if name.endswith("grey") else 3, size, size)
            start = time.perf_counter()
            weights = _ChannelsLast(model)
            copy_ms = (time.perf_counter() - start) * 1000
            ways = {"as is": model, "cl in": lambda b: model(last(b)), "cl w": lambda b: weights(last(b))}
            best = dict.fromkeys(ways, float("inf"))
            with torch.no_grad():
                for forward in ways.values():   # warm-up
                    forward(x[:64])
                for _ in range(args.repeats):
                    for way, forward in ways.items():
                        start = time.perf_counter()
                        for batch in x.split(128):
                            forward(batch)
                        best[way] = min(best[way], (time.perf_counter() - start) * 1000 / args.n)
            print(f"{name:20s} {size:4d} | {best['as is']:7.3f} {best['cl in']:7.3f} {best['cl w']:7.3f}          | "
                  f"{best['as is'] / best['cl in']:13.2f} {best['cl in'] / best['cl w']:12.2f} | {copy_ms:.1f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
