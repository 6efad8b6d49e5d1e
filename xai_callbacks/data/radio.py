"""Synthetic radio maps: the second setting of Heiss et al. (2020), without download.

A map is a square city block of ``size`` x ``size`` cells: a few rectangular buildings, one
transmitter and a handful of measurements of the received strength. The strength everywhere
(:class:`RadioSimulator`, also usable as the model with the known answer) falls with the distance
to the transmitter and with every cell of building the straight line to the transmitter crosses
(a log-distance law with wall loss; 0 inside buildings):

    strength(p) = clip(1 - (20 log10(1 + |p - t|) + WALL_LOSS * walls(p, t)) / RANGE, 0, 1)

A sample's input has four channels (:data:`RADIO_CHANNELS`): the buildings (1 inside), the
transmitter (1 at its cell), the measured strengths (at the measured cells, 0 elsewhere) and where
was measured (1 at the measured cells); its target is the strength map (1, size, size). A model
estimates the map from the input (an image-to-image regression); its explanation for an area of
interest keeps the buildings and measurements the estimate there relies on
(:func:`radio_components`: one component per building and per measurement, for
``rde(..., variant="matching_pursuit")`` with :class:`RadioInfiller`: a removed building is open
ground, a removed measurement was never taken, the transmitter stays).

>>> maps = make_radio_maps(256, seed=0)
>>> maps.x.shape, maps.y.shape, maps.buildings.max()
(torch.Size([256, 4, 32, 32]), torch.Size([256, 1, 32, 32]), tensor(5))
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..infill import Infiller

__all__ = ["RADIO_CHANNELS", "WALL_LOSS", "RANGE", "RadioMaps", "RadioSimulator", "RadioInfiller",
           "make_radio_maps", "radio_components", "area_of_interest"]

RADIO_CHANNELS = ("buildings", "transmitter", "measured", "measured_at")
WALL_LOSS = 6.0    # strength units x RANGE lost per cell of building the line of sight crosses
RANGE = 60.0       # path loss at which the strength reaches 0
_STEPS = 64        # points per line of sight


class RadioSimulator(nn.Module):
    """The strength map of a radio-map input (N, 4, S, S) -> (N, 1, S, S), from its buildings
    (channel 0, a cell counts as building in proportion to its value) and its transmitter (the
    cell of channel 1's largest value; no transmitter, every value 0: strength 0 everywhere).
    Measurements are ignored: this is the physics the data are drawn from."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != len(RADIO_CHANNELS) or x.shape[2] != x.shape[3]:
            raise ValueError(f"radio maps are (N, {len(RADIO_CHANNELS)}, S, S) with channels {RADIO_CHANNELS}; "
                             f"got {tuple(x.shape)}")
        n, _, s, _ = x.shape
        buildings, tx = x[:, 0:1], x[:, 1].flatten(1)
        at = tx.argmax(1)
        t = torch.stack([at // s, at % s], 1).to(x.dtype)                       # (N, 2) row, col
        rows, cols = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        p = torch.stack([rows, cols], -1).reshape(1, -1, 1, 2).to(x)            # (1, S*S, 1, 2)
        f = (torch.arange(_STEPS, device=x.device, dtype=x.dtype) + 0.5) / _STEPS
        line = t[:, None, None] + (p - t[:, None, None]) * f[None, None, :, None]  # (N, S*S, steps, 2)
        grid = (line.flip(-1) + 0.5) / s * 2 - 1                                # x, y in [-1, 1]
        inside = F.grid_sample(buildings, grid, mode="nearest", align_corners=False)[:, 0]  # (N, S*S, steps)
        distance = (p[..., 0, :] - t[:, None]).norm(dim=-1)                      # (N, S*S)
        walls = inside.mean(-1) * distance
        loss = 20 * torch.log10(1 + distance) + WALL_LOSS * walls
        strength = (1 - loss / RANGE).clamp(0, 1) * (tx.amax(1, keepdim=True) > 0)
        return (strength.view(n, 1, s, s) * (1 - buildings.clamp(0, 1)))


@dataclass
class RadioMaps:
    """Radio maps (:func:`make_radio_maps`).

    Attributes:
        x: (N, 4, S, S) inputs, channels :data:`RADIO_CHANNELS`.
        y: (N, 1, S, S) the strength maps.
        buildings: (N, S, S) int64: 0 for open ground, k = 1..K for the cells of building k.
        measured: (N, M, 2) int64 row and column of each measurement.
    """

    x: torch.Tensor
    y: torch.Tensor
    buildings: torch.Tensor
    measured: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_radio_maps(n: int, size: int = 32, n_buildings: tuple[int, int] = (2, 5), n_measured: int = 8,
                    seed: int = 0) -> RadioMaps:
    """``n`` maps of ``size`` x ``size`` cells: ``n_buildings`` (low, high) rectangles of 3 to
    ``size // 4`` cells a side (overlaps merge into the first), a transmitter and ``n_measured``
    measurements on open ground.

    Raises:
        ValueError: for ``size`` < 16, a bad building range or a negative measurement count.
    """
    if size < 16 or not 1 <= n_buildings[0] <= n_buildings[1] or n_measured < 0:
        raise ValueError(f"need size >= 16, 1 <= n_buildings[0] <= n_buildings[1] and n_measured >= 0; got size "
                         f"{size}, n_buildings {n_buildings}, n_measured {n_measured}")
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, size, size), np.int64)
    tx = np.zeros((n, 2), np.int64)
    measured = np.zeros((n, n_measured, 2), np.int64)
    for i in range(n):
        k = 0
        for _ in range(rng.integers(n_buildings[0], n_buildings[1] + 1)):
            h, w = rng.integers(3, size // 4 + 1, 2)
            r, c = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
            block = ids[i, r:r + h, c:c + w]
            if (block == 0).any():
                k += 1
                block[block == 0] = k
        open_cells = np.flatnonzero(ids[i].reshape(-1) == 0)
        picks = rng.choice(open_cells, 1 + n_measured, replace=False)
        tx[i] = divmod(int(picks[0]), size)
        measured[i] = np.stack(np.divmod(picks[1:], size), 1)
    x = torch.zeros(n, len(RADIO_CHANNELS), size, size)
    x[:, 0] = torch.from_numpy(ids > 0).float()
    rows = torch.arange(n)
    x[rows, 1, tx[:, 0], tx[:, 1]] = 1.0
    y = RadioSimulator()(x)
    m = torch.from_numpy(measured)
    for j in range(n_measured):
        x[rows, 2, m[:, j, 0], m[:, j, 1]] = y[rows, 0, m[:, j, 0], m[:, j, 1]]
        x[rows, 3, m[:, j, 0], m[:, j, 1]] = 1.0
    return RadioMaps(x=x, y=y, buildings=torch.from_numpy(ids), measured=m)


class RadioInfiller(Infiller):
    """Removal on radio maps: removed buildings become open ground and removed measurements were
    never taken (0), the transmitter stays (a map without one has nothing to explain)."""

    name = "radio"

    def fill(self, x):
        out = torch.zeros_like(x)
        out[:, 1] = x[:, 1]
        return out


def radio_components(maps: RadioMaps, i: int) -> torch.Tensor:
    """(4, S, S) component ids of map ``i`` for ``rde(..., components=...)``: 0..K-1 building k + 1
    (its cells of the buildings channel), K..K+M-1 measurement j + 1 (its cell of the two
    measurement channels), K+M everything else (the transmitter, open ground, unmeasured cells;
    with :class:`RadioInfiller` removing it changes nothing)."""
    ids = maps.buildings[i]
    k, m = int(ids.max()), maps.measured.shape[1]
    comp = torch.full((len(RADIO_CHANNELS), *ids.shape), k + m, dtype=torch.long)
    comp[0][ids > 0] = ids[ids > 0] - 1
    for j, (r, c) in enumerate(maps.measured[i].tolist()):
        comp[2:, r, c] = k + j
    return comp


def area_of_interest(size: int, row: int, col: int, side: int = 5) -> torch.Tensor:
    """(size, size) float mask of the ``side`` x ``side`` square at ``row``, ``col`` (its top left),
    for :func:`~xai_callbacks.scoring.segmentation_target` (the estimate summed over the area)."""
    if not (0 <= row <= size - side and 0 <= col <= size - side):
        raise ValueError(f"an area of {side}x{side} at ({row}, {col}) does not fit a map of {size}x{size}")
    mask = torch.zeros(size, size)
    mask[row:row + side, col:col + side] = 1.0
    return mask
