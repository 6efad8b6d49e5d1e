"""Radio maps: the simulator's physics, the generator, and the area query with buildings and
measurements as matching-pursuit components."""
from __future__ import annotations

import pytest
import torch

from xai_callbacks.attribution import explain
from xai_callbacks.data.radio import (RADIO_CHANNELS, RadioInfiller, RadioSimulator, area_of_interest,
                                      make_radio_maps, radio_components)
from xai_callbacks.models import RadioUNet
from xai_callbacks.scoring import segmentation_target


def _street(size: int = 32) -> torch.Tensor:
    """A transmitter on the left, building A between it and the right, building B behind it."""
    x = torch.zeros(1, len(RADIO_CHANNELS), size, size)
    x[0, 1, 16, 3] = 1.0
    x[0, 0, 12:21, 12:16] = 1.0      # A
    x[0, 0, 26:32, 0:4] = 1.0        # B
    x[0, 2, 16, 28], x[0, 3, 16, 28] = 0.3, 1.0   # a measurement inside the area
    return x


def test_strength_falls_with_distance_and_behind_walls():
    x = _street()
    y = RadioSimulator()(x)[0, 0]
    open_x = x.clone()
    open_x[0, 0] = 0
    y_open = RadioSimulator()(open_x)[0, 0]
    # open ground: 1 - 20 log10(1 + d) / RANGE, falling along the street
    d = torch.arange(20, 30, dtype=torch.float32) - 3
    torch.testing.assert_close(y_open[16, 20:30], 1 - 20 * torch.log10(1 + d) / 60)
    # behind A the four cells of wall cost 4 x 6 / 60 (up to the 64 points each line is read at:
    # +-24/64 of a cell at these distances); beside it nothing changes; inside buildings 0
    torch.testing.assert_close(y[16, 20:30], y_open[16, 20:30] - 0.4, atol=0.04, rtol=0)
    torch.testing.assert_close(y[2, 20:30], y_open[2, 20:30])
    assert (y[12:21, 12:16] == 0).all() and (y[26:, :4] == 0).all()
    no_transmitter = x.clone()
    no_transmitter[0, 1] = 0
    assert (RadioSimulator()(no_transmitter) == 0).all()
    with pytest.raises(ValueError, match="radio maps are"):
        RadioSimulator()(torch.zeros(1, 3, 32, 32))


def test_generated_maps_hold_one_transmitter_and_true_measurements():
    maps = make_radio_maps(64, n_measured=6, seed=3)
    assert maps.x.shape == (64, 4, 32, 32) and maps.y.shape == (64, 1, 32, 32)
    assert (maps.x[:, 1].flatten(1).sum(1) == 1).all()
    assert torch.equal(maps.x[:, 0] > 0, maps.buildings > 0)
    assert (maps.x[:, 3].flatten(1).sum(1) == 6).all()
    measured_at = maps.x[:, 3] > 0
    assert torch.equal(maps.x[:, 2][measured_at], maps.y[:, 0][measured_at])
    assert not (measured_at & (maps.buildings > 0)).any()
    assert torch.equal(make_radio_maps(8, seed=3).x, make_radio_maps(8, seed=3).x)
    comp = radio_components(maps, 0)
    k = int(maps.buildings[0].max())
    assert int(comp.max()) == k + 6 and torch.equal(comp[0] < k, maps.buildings[0] > 0)
    with pytest.raises(ValueError, match="size >= 16"):
        make_radio_maps(4, size=8)


def test_the_area_query_keeps_the_building_that_shadows_it_and_nothing_else():
    """With the physics as the model the answer is known: A shadows the area, B and the
    measurement (which the physics ignores) change nothing there."""
    x = _street()
    comp = torch.full((4, 32, 32), 3)
    comp[0, 12:21, 12:16], comp[0, 26:32, 0:4], comp[2:, 16, 28] = 0, 1, 2
    target = segmentation_target(0, area_of_interest(32, 14, 25))
    rel = explain(RadioSimulator(), x, target, method="rde", variant="matching_pursuit", components=comp,
                  infiller=RadioInfiller(), max_components=4)[0]
    gain = [float(rel[comp == k][0]) for k in range(4)]
    # without A the area is 0.4 brighter in each of its 25 cells (minus its wall-free corner rays)
    assert gain[0] > 0.5 * 0.5 * (25 * 0.4) ** 2 and gain[1] == gain[2] == gain[3] == 0
    # a removed building is open ground, a removed measurement never taken; the transmitter stays
    filled = RadioInfiller()(x, torch.zeros(1, 1, 32, 32))
    assert torch.equal(filled[:, 1], x[:, 1]) and (filled[:, [0, 2, 3]] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        area_of_interest(32, 30, 0)


def test_radio_unet_maps_inputs_to_a_map_of_their_size():
    net = RadioUNet()
    assert net(torch.zeros(2, 4, 32, 32)).shape == (2, 1, 32, 32)
    assert RadioUNet(depth=3)(torch.zeros(1, 4, 20, 20)).shape == (1, 1, 20, 20)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 4, 20, 20))
