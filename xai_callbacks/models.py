"""The demos' small networks and a LightningModule that trains any classifier on (x, y) batches."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from zennit.layer import Sum

from .data import unpack_batch
from .scoring import class_scores, one_logit

__all__ = ["DemoCNN", "SpectrumCNN", "RadioUNet", "ResidualBlock", "Classifier", "classification_loss"]


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the identity; the addition is a zennit ``Sum`` so LRP sees it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.sum = Sum()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.sum(torch.stack([h, x], dim=-1)))


class DemoCNN(nn.Module):
    """A small CNN with BatchNorm, in-place ReLUs, a residual block and Dropout (32x32 inputs)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16, image_size: int = 32,
                 dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True),
            ResidualBlock(2 * width),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True),
            nn.AvgPool2d(image_size // 4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width, n_classes))

    def forward(self, x):
        return self.head(self.features(x))


class SpectrumCNN(nn.Module):
    """A small 1-D CNN for spectra and other signals (B, C, L): three conv-BN-ReLU stages (the first
    two max-pooled), average-pooled to ``pooled`` positions, Dropout and a linear head.

    Args:
        in_channels: input channels (2 for magnitude and phase spectra).
        n_classes: outputs.
        width: channels of the first stage (doubled at each stage).
        pooled: positions kept by the final adaptive average pooling (a coarse frequency layout).
        dropout: dropout before the head.

    Example::

        net = SpectrumCNN(in_channels=2, n_classes=6)
        logits = net(torch.randn(8, 2, 128))       # (8, 6)
    """

    def __init__(self, in_channels: int = 2, n_classes: int = 6, width: int = 16, pooled: int = 4,
                 dropout: float = 0.2):
        super().__init__()
        if min(in_channels, n_classes, width, pooled) < 1:
            raise ValueError(f"SpectrumCNN needs in_channels, n_classes, width and pooled >= 1; got {in_channels}, "
                             f"{n_classes}, {width}, {pooled}")
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.MaxPool1d(2),
            nn.Conv1d(width, 2 * width, 5, padding=2), nn.BatchNorm1d(2 * width), nn.ReLU(inplace=True),
            nn.MaxPool1d(2),
            nn.Conv1d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm1d(4 * width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool1d(pooled),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * width * pooled, n_classes))

    def forward(self, x):
        if x.dim() != 3:
            raise ValueError(f"SpectrumCNN expects signals (B, C, L), got shape {tuple(x.shape)}")
        return self.head(self.features(x))


class RadioUNet(nn.Module):
    """A small U-Net for image-to-image regression, such as radio maps (N, 4, S, S) -> (N, 1, S, S)
    (:mod:`xai_callbacks.data.radio`): ``depth`` max-pooled stages of two conv-ReLU layers
    (``width`` channels, doubled per stage), nearest upsampling with skip connections and a 1x1
    output convolution. The sides must be divisible by ``2 ** (depth - 1)``; at 32 x 32 and
    ``depth`` 4 the coarsest stage sees the whole map."""

    def __init__(self, in_channels: int = 4, out_channels: int = 1, width: int = 16, depth: int = 4):
        super().__init__()
        if min(in_channels, out_channels, width, depth) < 1:
            raise ValueError(f"RadioUNet needs in_channels, out_channels, width and depth >= 1; got {in_channels}, "
                             f"{out_channels}, {width}, {depth}")

        def stage(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        widths = [width * 2 ** k for k in range(depth)]
        self.down = nn.ModuleList(stage(i, o) for i, o in zip([in_channels] + widths[:-1], widths))
        self.up = nn.ModuleList(stage(widths[k + 1] + widths[k], widths[k]) for k in reversed(range(depth - 1)))
        self.out = nn.Conv2d(width, out_channels, 1)
        self.factor = 2 ** (depth - 1)

    def forward(self, x):
        if x.dim() != 4 or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"RadioUNet expects images (N, C, H, W) with H and W divisible by {self.factor}, got "
                             f"{tuple(x.shape)}")
        skips = []
        for k, stage in enumerate(self.down):
            x = stage(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for stage, skip in zip(self.up, reversed(skips[:-1])):
            x = stage(torch.cat([F.interpolate(x, scale_factor=2.0), skip], 1))
        return self.out(x)


def classification_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class ids ``y``; for a binary classifier with one logit ((N,) or (N, 1)),
    the binary cross-entropy of its logit."""
    if one_logit(logits):
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), y.float())
    return F.cross_entropy(logits, y)


class Classifier(pl.LightningModule):
    """Trains ``model`` with :func:`classification_loss` and Adam (a model with one output is a
    binary classifier of its logit); logs ``train/loss``, ``val/loss``, ``val/acc``."""

    def __init__(self, model: nn.Module | None = None, lr: float = 1e-3):
        super().__init__()
        self.model = model if model is not None else DemoCNN()
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = unpack_batch(batch)
        loss = classification_loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = unpack_batch(batch)
        logits = self(x)
        self.log("val/loss", classification_loss(logits, y), sync_dist=True)
        self.log("val/acc", (class_scores(logits).argmax(1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
