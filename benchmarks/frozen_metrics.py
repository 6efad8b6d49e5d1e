"""Would the metrics run better on a frozen copy of the weights in a background thread?

On the machine at hand, times a stretch of DemoCNN training steps alone (batch 64, 3x32x32), the
default metrics alone on a copy of the weights (saliency on 32 probe samples, pixel flipping in 16
steps, max-sensitivity over 5 perturbations), and the two at once with the metrics in a thread.
If "all done" at once is not shorter than training plus metrics inline, the copy only delays the
metric values by an epoch. On a GPU the thread's work runs on a second CUDA stream.

    python benchmarks/frozen_metrics.py [--steps 60] [--repeats 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import threading
import time

import torch
import torch.nn.functional as F

from xai_callbacks.attribution import explain
from xai_callbacks.metrics import get_metric
from xai_callbacks.models import DemoCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per stretch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = DemoCNN(in_channels=3).to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xb, yb = torch.rand(64, 3, 32, 32, device=dev), torch.randint(0, 10, (64,), device=dev)
    probe, py = torch.rand(32, 3, 32, 32, device=dev), torch.randint(0, 10, (32,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def train():
        model.train()
        for _ in range(args.steps):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()

    def metrics(net, stream=None):   # on a GPU, the thread's work goes to a second CUDA stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            rel = explain(net.eval(), probe, py, method="saliency")
            for name, opts in (("pixel_flipping", {"n_steps": 16}), ("max_sensitivity", {"n_samples": 5})):
                metric = get_metric(name, model=net, method="saliency", **opts).to(dev)
                metric.update(probe, py, rel)
                metric.compute()
        sync()

    print(f"DemoCNN, {args.steps} training steps, {args.device}, {args.threads} threads")
    for _ in range(args.repeats):
        start = time.perf_counter()
        train()
        alone = time.perf_counter() - start
        start = time.perf_counter()
        metrics(copy.deepcopy(model))
        scored = time.perf_counter() - start
        start = time.perf_counter()
        stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        worker = threading.Thread(target=metrics, args=(copy.deepcopy(model), stream))
        worker.start()
        train()
        trained = time.perf_counter() - start
        worker.join()
        both = time.perf_counter() - start
        print(f"train {alone:.2f} s + metrics {scored:.2f} s inline = {alone + scored:.2f} s | metrics on a copy in a "
              f"thread: training {trained:.2f} s, all done {both:.2f} s ({both / (alone + scored):.2f}x of inline)")


if __name__ == "__main__":
    main()
