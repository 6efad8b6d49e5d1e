"""Radio maps: which buildings and measurements does an estimate for an area rely on?

The second setting of Heiss et al. (2020) on synthetic maps (``xai_callbacks.data.radio``): a
``RadioUNet`` learns the strength map from buildings, transmitter and a few measurements; then,
for held-out maps and a 5 x 5 area of interest each, ``rde(..., variant="matching_pursuit")``
with one component per building and per measurement (``radio_components``, ``RadioInfiller``)
and the target function "estimate summed over the area" (``segmentation_target``) ranks them by
their gain. The same query with the simulator the data come from as the model gives the physical
answer: only buildings that cross a line of sight from the transmitter into the area matter, and
measurements not at all. Printed: the network's error against the mean map, the share of maps whose
top building agrees, the gain the network gives buildings the physics says are irrelevant, and the
measurements' share of the network's gain.

    python benchmarks/radio.py [--n-train 2000] [--epochs 15] [--maps 40] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from xai_callbacks.attribution import explain
from xai_callbacks.data.radio import (RadioInfiller, RadioSimulator, area_of_interest, make_radio_maps,
                                      radio_components)
from xai_callbacks.models import RadioUNet
from xai_callbacks.scoring import segmentation_target


def gains(model, maps, i: int, aoi: torch.Tensor) -> np.ndarray:
    """(K + M,) matching-pursuit gain of each building and measurement of map ``i`` (the rest last, dropped)."""
    comp = radio_components(maps, i)
    rel = explain(model, maps.x[i:i + 1], segmentation_target(0, aoi), method="rde", variant="matching_pursuit",
                  components=comp, infiller=RadioInfiller(), max_components=int(comp.max()) + 1)[0]
    return np.array([float(rel[comp == k][0]) for k in range(int(comp.max()))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--maps", type=int, default=40, help="held-out maps explained")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train, val = make_radio_maps(args.n_train, seed=args.seed), make_radio_maps(200, seed=args.seed + 1000)
    net = RadioUNet()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    start = time.time()
    for _ in range(args.epochs):
        for rows in torch.randperm(len(train)).split(32):
            loss = F.mse_loss(net(train.x[rows]), train.y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        mse = F.mse_loss(net(val.x), val.y).item()
    baseline = F.mse_loss(train.y.mean(0, keepdim=True).expand_as(val.y), val.y).item()
    print(f"trained in {time.time() - start:.0f} s: held-out MSE {mse:.4f} (mean map {baseline:.4f})")

    sim, rng = RadioSimulator(), np.random.default_rng(args.seed)
    agree, irrelevant, relevant, measured_share, n = 0, [], [], [], 0
    for i in range(args.maps):
        k = int(val.buildings[i].max())
        r, c = rng.integers(0, 28, 2)
        aoi = area_of_interest(32, int(r), int(c))
        physics, learnt = gains(sim, val, i, aoi), gains(net, val, i, aoi)
        b_phys, b_net = physics[:k], learnt[:k]
        if b_phys.max() <= 0:   # no building shadows this area: nothing to rank
            continue
        n += 1
        agree += int(b_net.argmax() == b_phys.argmax())
        total = learnt.clip(min=0).sum()
        irrelevant += [g / total for g, p in zip(b_net, b_phys) if p == 0] if total > 0 else []
        relevant += [g / total for g, p in zip(b_net, b_phys) if p > 0] if total > 0 else []
        measured_share.append(learnt[k:].clip(min=0).sum() / total if total > 0 else 0.0)
    print(f"{n} of {args.maps} maps have a building that shadows the area (physics gain > 0)")
    print(f"top building the same as the physics': {agree} of {n}")
    print(f"share of the network's gain per building: physics-relevant {np.mean(relevant):.3f} (n {len(relevant)}), "
          f"physics-irrelevant {np.mean(irrelevant):.3f} (n {len(irrelevant)})")
    print(f"measurements' share of the network's gain: median {np.median(measured_share):.3f}, "
          f"max {np.max(measured_share):.3f}")


if __name__ == "__main__":
    main()
