"""Conservation of LRP and excitation backprop on torchvision architectures: the input's
relevance summed, over the explained logit, and the marginal winning probabilities summed
(random weights, CPU).

    PYTHONPATH=. python benchmarks/lrp_conservation.py [--models mobilenet_v2 ...] [--size 64] [--n 3]
    PYTHONPATH=. python benchmarks/lrp_conservation.py --models timm/efficientnet_b0 ...   # timm's models
    PYTHONPATH=. python benchmarks/lrp_conservation.py --timm    # TIMM_MODELS (needs ``pip install timm``)

Each model gets BatchNorm statistics of random inputs (so activations keep their scale through
depth), then every bias and BatchNorm shift is zeroed: there LRP-epsilon and z+ conserve, and the
printed ratio is 1 up to what a rule cannot pass on. Printed per model: the ratio for each of
``n`` random inputs under ``lrp.epsilon_plus_flat``, then the total of ``excitation_backprop``'s
winning probabilities for the same inputs (at most 1 and never negative for a distribution) and
their smallest element.
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torchvision.models as tv

from xai_callbacks.attribution import explain

TIMM_MODELS = ("timm/efficientnet_b0", "timm/mobilenetv3_small_100", "timm/rexnet_100", "timm/ghostnet_100",
               "timm/lcnet_050", "timm/tf_mixnet_s", "timm/ese_vovnet19b_dw", "timm/fastvit_t8", "timm/mobileone_s0",
               "timm/xception41", "timm/hgnetv2_b0", "timm/nf_resnet26", "timm/resnetv2_50x1_bit", "timm/resnet50d",
               "timm/dla34")
MODELS = ("resnet18", "vgg11_bn", "densenet121", "googlenet", "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small",
          "efficientnet_b0", "mnasnet0_5", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0")


def bias_free(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """``model`` with BatchNorm statistics of random inputs, then every bias and BatchNorm shift
    zeroed, in eval mode (also used by ``tests/test_architectures.py``)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.rand(32, 3, size, size))
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor):
                m.bias.zero_()
        for m in norms:
            m.running_mean.zero_()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help="torchvision model names; timm's as timm/NAME")
    parser.add_argument("--timm", action="store_true", help="run TIMM_MODELS instead")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"{'model':20s} relevance sum / logit | MWP sum | smallest MWP ({args.n} inputs of 3x{args.size}x{args.size})")
    for name in TIMM_MODELS if args.timm else args.models:
        torch.manual_seed(0)
        if name.startswith("timm/"):
            import timm

            model = timm.create_model(name[5:], num_classes=4)
        else:
            kwargs = dict(aux_logits=False, init_weights=True) if name == "googlenet" else {}
            model = getattr(tv, name)(num_classes=4, **kwargs)
        model = bias_free(model, args.size)
        x = torch.rand(args.n, 3, args.size, args.size)
        with torch.no_grad():
            out = model(x)
        target = out.argmax(1)
        logit = out.gather(1, target[:, None])[:, 0]
        relevance = explain(model, x, target, method="lrp.epsilon_plus_flat")
        ratios = relevance.flatten(1).sum(1) / logit
        mwp = explain(model, x, target, method="excitation_backprop")
        print(f"{name:20s} " + " ".join(f"{r:9.3g}" for r in ratios.tolist()) + " | "
              + " ".join(f"{p:9.3g}" for p in mwp.flatten(1).sum(1).tolist()) + f" | {mwp.min().item():9.3g}", flush=True)


if __name__ == "__main__":
    main()
