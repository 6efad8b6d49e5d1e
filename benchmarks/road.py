"""ROAD's noisy linear imputation: our batched conjugate gradients (all images and removal
fractions at once, on the device) and our sparse direct solve (CPU) against Quantus' per-image
sparse solve, side by side in one run, with the largest difference of the imputed images (noise 0).

    PYTHONPATH=. python benchmarks/road.py [--n 16] [--size 32] [--device cpu|cuda] [--repeats 2]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from xai_callbacks.metrics.road import noisy_linear_imputation

from metrics import timed as best_of  # benchmarks/metrics.py: best of n wall times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="images")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_nli

    g = torch.Generator().manual_seed(0)
    percentages = [10, 30, 50, 70, 90]
    x = torch.rand(args.n, args.channels, args.size, args.size, generator=g)
    order = torch.rand(args.n, args.size * args.size, generator=g).argsort(1)
    pixels = args.size * args.size
    removed = torch.stack([torch.zeros(args.n, pixels, dtype=torch.bool).scatter_(1, order[:, :pixels * p // 100], True)
                           for p in percentages], 1).view(-1, 1, args.size, args.size)  # (n * P, 1, H, W)
    stacked = x.repeat_interleave(len(percentages), 0)

    xd, rd = stacked.to(args.device), removed.to(args.device)
    t_cg, ours = best_of(lambda: noisy_linear_imputation(xd, rd, noise=0.0, tol=1e-8, solver="cg"), args.repeats)
    t_direct, direct = best_of(lambda: noisy_linear_imputation(stacked, removed, noise=0.0, solver="direct"),
                               args.repeats)

    def reference():
        return np.stack([quantus_nli(stacked[i].double().numpy(), removed[i, 0].flatten().nonzero().flatten().numpy(),
                                     noise=0.0) for i in range(len(stacked))])

    t_ref, ref = best_of(reference, args.repeats)
    diff = float(np.abs(ours.cpu().double().numpy() - ref).max())
    diff_direct = float(np.abs(direct.double().numpy() - ref).max())
    print(f"{len(stacked)} imputations of {args.channels}x{args.size}x{args.size} (fractions {percentages})")
    print(f"batched CG on {args.device}: {t_cg * 1e3:.1f} ms (Quantus / CG {t_ref / t_cg:.2f}, "
          f"max |diff| {diff:.1e}); direct on cpu: {t_direct * 1e3:.1f} ms (Quantus / direct "
          f"{t_ref / t_direct:.2f}, max |diff| {diff_direct:.1e}); Quantus per image: {t_ref * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
