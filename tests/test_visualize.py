"""The shared figure renderer (vitlab.tasks.visualize): readable size, legend of the classes drawn, confusions."""
from __future__ import annotations

import numpy as np
import torch

from vitlab.tasks.visualize import PANEL_WIDTH, Panel, palette, render, to_rgb_array, top_confusions

NAMES = [f"class {i}" for i in range(12)]


def grey(h: int = 48, w: int = 64) -> np.ndarray:
    return np.full((h, w, 3), 128, dtype=np.uint8)


def has_colour(region: np.ndarray, rgb) -> bool:
    return bool((region == np.asarray(rgb, dtype=np.uint8)).all(-1).any())


def test_panels_are_readable_size_and_keep_the_aspect():
    one = render([Panel(grey(), "prediction")], NAMES)
    two = render([Panel(grey(), "prediction"), Panel(grey(), "ground truth")], NAMES)
    assert one.dtype == np.uint8 and one.shape[2] == 3
    assert one.shape[1] >= PANEL_WIDTH and two.shape[1] >= 2 * PANEL_WIDTH
    # a 64x48 image drawn 512 px wide: 384 px of image rows (plus title and margins)
    assert one.shape[0] >= PANEL_WIDTH * 48 // 64


def test_legend_lists_the_classes_drawn_and_only_those():
    colours = palette(len(NAMES))
    label_map = np.full((48, 64), 255)
    label_map[:20] = 3
    label_map[30:, 10:40] = 7
    boxes = np.array([[5.0, 5.0, 40.0, 30.0]])
    fig = render([Panel(grey(), "prediction", label_map=label_map, ignore_index=255),
                  Panel(grey(), "ground truth", boxes=boxes, box_classes=[9], box_texts=["class 9 0.80"])], NAMES)
    plain = render([Panel(grey(), "prediction"), Panel(grey(), "ground truth")], NAMES)
    legend = fig[plain.shape[0] - 8:]  # below the panels: the legend band the plain figure lacks
    for present in (3, 7, 9):
        assert has_colour(legend, colours[present]), present
    for absent in (0, 5, 11):
        assert not has_colour(fig, colours[absent]), absent
    assert not has_colour(plain, colours[3])  # no classes drawn: no legend


def test_panel_classes_order_label_maps_by_area():
    label_map = np.zeros((10, 10), dtype=np.int64)
    label_map[:, :7] = 4
    label_map[0, 0] = 255
    panel = Panel(grey(10, 10), "x", label_map=label_map, ignore_index=255, box_classes=[2])
    assert panel.classes() == [2, 4, 0]


def test_palette_is_distinct_and_images_convert():
    colours = palette(150)
    assert len({tuple(c) for c in colours}) == 150
    chw = torch.rand(3, 5, 7)
    assert np.array_equal(to_rgb_array(chw), (chw.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    assert to_rgb_array(torch.zeros(3, 5, 7, dtype=torch.uint8)).shape == (5, 7, 3)


def test_top_confusions_match_a_naive_count():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 6, 300), rng.integers(0, 6, 300)
    confmat = np.zeros((6, 6), dtype=np.int64)
    np.add.at(confmat, (true, pred), 1)
    pairs = top_confusions(confmat, NAMES[:6], top=5)
    naive = sorted(((int(((true == t) & (pred == p)).sum()), t, p) for t in range(6) for p in range(6) if t != p),
                   key=lambda x: -x[0])
    assert [p["count"] for p in pairs] == [n for n, _, _ in naive[:5]]
    first = pairs[0]
    t = NAMES.index(first["true"])
    assert first["share"] == round(first["count"] / int((true == t).sum()) * 100, 2)
