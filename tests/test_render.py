"""Pictures that explain themselves: labelled prototypes, flagged ones framed red, heatmap panels
with a colour scale, the Laplacian spectrum with the chosen gap."""
from __future__ import annotations

import numpy as np

from xai_callbacks import render


def reddish(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 180) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)


def test_prototype_is_large_labelled_and_a_flagged_one_is_framed_red():
    proto = np.zeros((1, 16, 16), np.float32)
    proto[0, 2:5, 2:5] = 1.0
    flagged = render.prototype_picture(proto, 3, 42, 0.35, True)
    plain = render.prototype_picture(proto, 1, 80, 0.65, False)
    assert flagged.dtype == np.uint8 and min(plain.shape[:2]) >= 192
    border = np.concatenate([flagged[:5].reshape(-1, 3), flagged[-5:].reshape(-1, 3),
                             flagged[:, :5].reshape(-1, 3), flagged[:, -5:].reshape(-1, 3)])
    assert reddish(border).all() and not reddish(plain[:1]).any()
    # the label differs with the strategy's id, size and share (text is drawn above the heatmap)
    other = render.prototype_picture(proto, 1, 79, 0.64, False)
    header = plain.shape[0] - 16 * (192 // 16) - 2
    assert header >= 24 and (plain[:header] != other[:header]).any()
    assert (plain[header + 1:-1] == other[header + 1:-1]).all()  # same heatmap below


def test_panel_has_a_colour_scale_matching_the_heatmap():
    x = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    r = np.zeros((1, 32, 32), np.float32)
    r[0, :4, :4], r[0, -4:, -4:] = 2.0, -2.0
    img = render.panel(x, r)
    assert img.shape[0] == 128 and img.shape[1] > 2 * 128 + 14
    heat = render.heatmap_rgb(r)
    bar = render.colour_scale(128, 2.0)
    top, bottom = bar[0, :14].mean(0), bar[-1, :14].mean(0)
    np.testing.assert_allclose(top, heat[0, 0], atol=8)  # the scale's top is the colour of +max
    np.testing.assert_allclose(bottom, heat[-1, -1], atol=8)
    assert (img[:, -bar.shape[1]:] == bar).all()
    assert (bar[:, 16:] < 128).any()  # its values are written beside it


def test_spectrum_marks_the_chosen_gap():
    ev = np.r_[0.0, 0.001, 0.002, 0.3, 0.35, 0.4, 0.5]
    three, four = render.spectrum_picture(ev, 3), render.spectrum_picture(ev, 4)
    assert three.ndim == 3 and three.shape[2] == 3 and three.dtype == np.uint8
    shaded = lambda img: np.flatnonzero(((img[..., 0] > 240) & (img[..., 1] < 230) & (img[..., 1] > 200)).any(0))
    assert len(shaded(three)) > 5 and shaded(four).mean() > shaded(three).mean()  # the gap moves right with K


def test_tile_row_pads_to_the_tallest_tile_and_upscale_repeats_pixels():
    a = np.zeros((4, 3, 3), np.uint8)
    b = np.full((2, 5, 3), 7, np.uint8)
    row = render.tile_row([a, b], gap=2)
    assert row.shape == (4, 3 + 2 + 5, 3)
    assert (row[:, 3:5] == 255).all() and (row[:2, 5:] == 7).all() and (row[2:, 5:] == 255).all()
    big = render.upscale(b, 3)
    assert big.shape == (6, 15, 3) and (big[::3, ::3] == b).all() and render.upscale(b, 1) is b


def test_inpainting_row_shows_removed_pixels_black_and_shares_the_input_scale():
    x = np.linspace(0, 2, 64, dtype=np.float32).reshape(1, 8, 8)
    keep = np.ones((1, 8, 8), np.float32)
    keep[0, :4] = 0
    fill = np.full((1, 8, 8), 2.0, np.float32)  # the input's maximum: white on the input's scale
    row = render.inpainting_row(x, keep, [fill], gap=2, side=16)
    assert row.shape == (16, 2 * (3 * 8 + 2 * 2), 3)
    mask = row[:, 2 * 10:2 * 18]
    assert (mask[:8] == 0).all() and (mask[8:] == 255).all()
    assert (row[:, 2 * 20:] == 255).all()
    assert row[0, 0, 0] == 0 and row[-1, 2 * 8 - 1, 0] == 255  # the input from its min to its max


def test_line_plot_without_wandb_is_a_png(tmp_path):
    from PIL import Image

    from conftest import make_trainer
    from xai_callbacks import sinks

    trainer = make_trainer(tmp_path)
    sinks.log_line_plot(trainer, "spray/0/strategy_share", [0, 1, 2], {"strategy 0": [1.0, 0.5, 0.25]}, xname="epoch")
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert pngs == ["media/spray__0__strategy_share/epoch0000.png"]
    picture = np.asarray(Image.open(tmp_path / pngs[0]).convert("L"))
    assert picture.shape == (280, 400) and (picture < 128).mean() > 0.01   # 5 x 3.5 inches at 80 dpi, drawn
