"""Audio demo figures: fill quality of the 1-D GAN against constant and blur fills on held-out
note spectra, and the class-wise magnitude-vs-phase importance (the paper's Table 1).

A SpectrumCNN and a per-channel GAN inpainter train side by side on the synthetic notes (no
Lightning, same batches); then, on the validation spectra:

* masked-region L1 of each fill (all channels, magnitude, phase) under the inpainter's own
  training-style masks (seeded), and under whole-channel removal (the masks of the class query);
* per class, ``rde(..., components="channels", shared=True)`` with each fill and a few ``l1``:
  the exact answer (``variant="exhaustive"``) next to the paper's concrete relaxation.

    python benchmarks/audio.py [--n-per-class 120] [--epochs 12] [--gan-steps 16] [--hypotheses 1] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from xai_callbacks.attribution import explain
from xai_callbacks.data.notes import make_note_spectra
from xai_callbacks.infill import get_infiller
from xai_callbacks.infill.gan import GANInpainter, masked_l1
from xai_callbacks.models import SpectrumCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-per-class", type=int, default=120)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--gan-steps", type=int, default=16, help="inpainter updates per classifier batch")
    ap.add_argument("--adv-weight", type=float, default=0.3, help="weight of the inpainter's adversarial loss")
    ap.add_argument("--channel-drop", type=float, default=0.5, help="share of training masks that remove a channel")
    ap.add_argument("--hypotheses", type=int, default=1, help="fills the inpainter proposes at once")
    ap.add_argument("--l1", type=float, nargs="+", default=[1.0, 2.0, 6.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train, val = make_note_spectra(n_per_class=args.n_per_class, shortcut=None, seed=args.seed)
    names = train.class_names
    net = SpectrumCNN(2, len(names), width=16)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gan = GANInpainter(channels=2, dims=1, per_channel=True, channel_drop=args.channel_drop,
                       adv_weight=args.adv_weight, warmup_steps=300, seed=args.seed, hypotheses=args.hypotheses)
    start = time.time()
    for epoch in range(args.epochs):
        net.train()
        for rows in torch.randperm(len(train.x)).split(32):
            loss = F.cross_entropy(net(train.x[rows]), train.targets[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            for _ in range(args.gan_steps):
                gan.train_step(train.x[rows])
    net.eval()
    with torch.no_grad():
        acc = (net(val.x).argmax(1) == val.targets).float().mean().item()
    print(f"trained in {time.time() - start:.0f} s: validation accuracy {acc:.3f}, {gan.steps} inpainter steps\n")
    fills = [gan.infiller(seed=1), get_infiller("constant"), get_infiller("blur")]
    masks = {"training-style": gan.masks(len(val.x), val.x.shape[2:], torch.Generator().manual_seed(5))}
    whole = torch.ones(len(val.x), 2, val.x.shape[2])
    whole[torch.arange(len(val.x)), torch.arange(len(val.x)) % 2] = 0     # magnitude or phase removed
    masks["whole channel"] = whole
    print("masked-region L1 on held-out spectra (lower is better)")
    print(f"{'masks':16s} {'fill':10s} {'all':>7s} {'magnitude':>10s} {'phase':>7s}")
    for kind, keep in masks.items():
        hole = (1 - keep).expand_as(val.x)
        for f in fills:
            with torch.no_grad():
                z = f(val.x, keep)
            parts = [masked_l1(z, val.x, hole)] + [masked_l1(z[:, c], val.x[:, c], hole[:, c]) for c in (0, 1)]
            print(f"{kind:16s} {f.name:10s} " + " ".join(f"{float(v):{w}.4f}" for v, w in zip(parts, (7, 10, 7))))
    print("\nclass-wise importance: whole magnitude | whole phase kept, exact (exhaustive) and concrete")
    agree = total = 0
    for f in fills:
        print(f"fill {f.name}\n{'class':10s} " + " ".join(f"{'l1=' + format(l1, 'g'):>22s}" for l1 in args.l1))
        for c, name in enumerate(names):
            x = val.x[val.targets == c][:24]
            cells = []
            for l1 in args.l1:
                keep = {v: explain(net, x, c, method="rde", variant=v, components="channels", shared=True, infiller=f,
                                   steps=100, l1=l1, seed=args.seed)[0, :, 0] for v in ("exhaustive", "concrete")}
                agree += int(torch.equal(keep["concrete"].round(), keep["exhaustive"]))
                total += 1
                cells.append("{:.0f}|{:.0f} {:.2f}|{:.2f}".format(*keep["exhaustive"], *keep["concrete"]))
            print(f"{name:10s} " + " ".join(f"{cell:>22s}" for cell in cells))
    print(f"\nconcrete (rounded) = exact in {agree} of {total} queries")


if __name__ == "__main__":
    main()
