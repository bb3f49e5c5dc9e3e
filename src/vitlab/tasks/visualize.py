"""Figures of predictions and per-class results, one look for training and ``predict.py``.

Validation images logged during training (``VitlabTask.log_images``: W&B or PNG files) and the
images ``predict.py`` writes are drawn here: a row of panels at least ``PANEL_WIDTH`` pixels
wide, each with a title (prediction / ground truth), boxes with class names and scores, masks
and label maps in one colour per class, and a legend of the classes shown. Drawing is
matplotlib's (Agg, no display); a figure becomes an H x W x 3 uint8 array.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

PANEL_WIDTH = 512  # pixels: box labels and legends stay readable on 64 px validation images
MAX_PANEL_HEIGHT = 768
MAX_LEGEND = 24  # legend entries before "+N more"
DPI = 100
_MARGIN, _GAP, _TITLE, _LEGEND_ROW = 8, 8, 30, 22  # pixels


def palette(num_classes: int) -> np.ndarray:
    """One colour per class (K x 3 uint8): hues spaced by the golden ratio, so neighbouring class
    ids differ clearly; lightness alternates to separate the hues that come back round."""
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    colours = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.95, 0.95 if i % 3 else 0.7) for i, h in enumerate(hues)]
    return (np.array(colours).reshape(-1, 3) * 255).round().astype(np.uint8)


def to_rgb_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CHW tensor (uint8, or float in [0, 1]) or an HWC array -> H x W x 3 uint8."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        image = image.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


@dataclass
class Panel:
    """One image of a figure and what is drawn on it (coordinates in the image's pixels)."""

    image: np.ndarray  # H x W x 3 uint8
    title: str
    boxes: np.ndarray | None = None  # N x 4 (x1, y1, x2, y2)
    box_classes: Sequence[int] = ()  # class of each box (its colour)
    box_texts: Sequence[str] = ()  # text at each box (class name, score)
    masks: np.ndarray | None = None  # N x H x W bool, instance masks in their box's colour
    label_map: np.ndarray | None = None  # H x W class per pixel; ``ignore_index`` stays uncoloured
    ignore_index: int | None = None
    bars: Sequence[tuple[str, float]] = field(default_factory=tuple)  # (text, length in [0, 1]): a bar chart

    def classes(self) -> list[int]:
        """Classes drawn in this panel, the largest areas first for label maps."""
        found = [int(c) for c in self.box_classes]
        if self.label_map is not None:
            ids, counts = np.unique(self.label_map, return_counts=True)
            keep = ids != self.ignore_index if self.ignore_index is not None else np.ones_like(ids, dtype=bool)
            found += [int(c) for c in ids[keep][np.argsort(-counts[keep], kind="stable")]]
        return list(dict.fromkeys(found))


def overlay(image: np.ndarray, colours: np.ndarray, where: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` with ``colours`` (H x W x 3) blended in where ``where`` (H x W bool) holds."""
    out = image.astype(np.float32)
    out[where] = (1 - alpha) * out[where] + alpha * colours[where]
    return out.round().astype(np.uint8)


def _coloured(panel: Panel, colours: np.ndarray) -> np.ndarray:
    image = panel.image
    if panel.label_map is not None:
        labels = panel.label_map.astype(np.int64)
        valid = labels != panel.ignore_index if panel.ignore_index is not None else np.ones(labels.shape, bool)
        image = overlay(image, colours[np.where(valid, labels, 0) % len(colours)], valid, alpha=0.55)
    if panel.masks is not None and len(panel.masks):
        painted, covered = np.zeros_like(image), np.zeros(image.shape[:2], dtype=bool)
        for mask, cls in reversed(list(zip(panel.masks.astype(bool), panel.box_classes))):  # the first on top
            painted[mask] = colours[cls % len(colours)]
            covered |= mask
        image = overlay(image, painted, covered, alpha=0.45)
    return image


def _text_colour(rgb: np.ndarray) -> str:
    return "black" if float(np.dot(rgb, (0.299, 0.587, 0.114))) > 150 else "white"


def _draw_panel(ax, panel: Panel, colours: np.ndarray) -> None:
    from matplotlib.patches import Rectangle

    ax.set_title(panel.title, fontsize=12, pad=4)
    ax.set_xticks([])
    ax.set_yticks([])
    if panel.bars:
        _draw_bars(ax, panel.bars)
        return
    ax.imshow(_coloured(panel, colours), interpolation="nearest")
    height = panel.image.shape[0]
    if panel.boxes is None:
        return
    for (x1, y1, x2, y2), cls, text in zip(np.asarray(panel.boxes, dtype=float), panel.box_classes, panel.box_texts):
        colour = colours[int(cls) % len(colours)]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour / 255, linewidth=2))
        inside = y1 < 0.08 * height  # near the top edge: write the label inside the box
        ax.text(x1, y1, text, fontsize=9, color=_text_colour(colour), va="top" if inside else "bottom", ha="left",
                clip_on=True, bbox=dict(facecolor=colour / 255, alpha=0.85, pad=1.5, edgecolor="none"))


def _draw_bars(ax, bars: Sequence[tuple[str, float]]) -> None:
    """Horizontal bars, the first on top, their text written on them (long class names fit)."""
    n = len(bars)
    ax.barh(np.arange(n)[::-1], [v for _, v in bars], color="#9ecae1", height=0.8)
    for i, (text, value) in enumerate(bars):
        ax.text(0.01, n - 1 - i, text, va="center", ha="left", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, n - 0.4)


def figure_to_array(fig) -> np.ndarray:
    """A matplotlib figure rendered by Agg -> H x W x 3 uint8 (the figure is closed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    array = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    fig.clear()
    return array


def render(panels: Sequence[Panel], class_names: Sequence[str], title: str | None = None) -> np.ndarray:
    """Panels side by side (``PANEL_WIDTH`` px wide each), titled, with a legend of the classes
    drawn in any of them; H x W x 3 uint8."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = palette(len(class_names))
    h, w = panels[0].image.shape[:2]
    scale = min(PANEL_WIDTH / w, MAX_PANEL_HEIGHT / h)
    pw, ph = round(w * scale), round(h * scale)
    top = _TITLE + (_TITLE if title else 0)
    width = max(2 * _MARGIN + len(panels) * pw + (len(panels) - 1) * _GAP, PANEL_WIDTH)
    classes = list(dict.fromkeys(c for p in panels for c in p.classes()))
    handles = [Patch(color=colours[c % len(colours)] / 255, label=str(class_names[c])) for c in classes[:MAX_LEGEND]]
    if len(classes) > MAX_LEGEND:
        handles.append(Patch(color="none", label=f"+{len(classes) - MAX_LEGEND} more"))
    ncol = max(1, width // 170)
    legend = (math.ceil(len(handles) / ncol) + 1) * _LEGEND_ROW + 2 * _MARGIN if handles else _MARGIN
    height = top + ph + legend
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    if title:
        fig.text(0.5, 1 - (_TITLE / 2) / height, title, ha="center", va="center", fontsize=13, weight="bold")
    for i, panel in enumerate(panels):
        x = _MARGIN + i * (pw + _GAP)
        ax = fig.add_axes((x / width, legend / height, pw / width, ph / height))
        _draw_panel(ax, panel, colours)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=10, frameon=False, title="classes",
                   title_fontsize=10, bbox_to_anchor=(0.5, _MARGIN / height / 2))
    return figure_to_array(fig)


def confusion_figure(confmat: torch.Tensor | np.ndarray, class_names: Sequence[str], title: str,
                     max_matrix: int = 30, top: int = 20) -> np.ndarray:
    """A row-normalised confusion matrix (rows: true class) for up to ``max_matrix`` classes;
    for more (ImageNet's 1000), the ``top`` most frequent confusions as bars."""
    from matplotlib.figure import Figure

    confmat = np.asarray(confmat, dtype=np.float64)
    n = len(class_names)
    if n <= max_matrix:
        rows = confmat / np.maximum(confmat.sum(1, keepdims=True), 1)
        side = max(6.0, 0.28 * n + 2.5)
        fig = Figure(figsize=(side + 1.2, side), dpi=DPI, facecolor="white", layout="constrained")
        ax = fig.add_subplot()
        im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
        names = [str(c)[:24] for c in class_names]
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=12)
        fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
        return figure_to_array(fig)
    pairs = top_confusions(confmat, class_names, top)
    fig = Figure(figsize=(PANEL_WIDTH * 1.6 / DPI, (len(pairs) + 3) * 0.3), dpi=DPI, facecolor="white",
                 layout="constrained")
    ax = fig.add_subplot()
    largest = max((p["count"] for p in pairs), default=1)
    _draw_bars(ax, [(f"{p['true']} -> {p['predicted']} ({p['count']})", p["count"] / largest) for p in pairs])
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}: the {len(pairs)} most frequent confusions (true -> predicted, images)", fontsize=11)
    return figure_to_array(fig)


def top_confusions(confmat: torch.Tensor | np.ndarray, class_names: Sequence[str], top: int = 20) -> list[dict]:
    """The largest off-diagonal cells: true class, predicted class, images, share of the true class."""
    confmat = np.asarray(confmat, dtype=np.int64)
    off = confmat.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    totals = confmat.sum(1)
    pairs = []
    for t, p in zip(*np.unravel_index(flat, off.shape)):
        if off[t, p] == 0:
            break
        pairs.append({"true": str(class_names[t]), "predicted": str(class_names[p]), "count": int(off[t, p]),
                      "share": round(float(off[t, p] / totals[t]) * 100, 2)})
    return pairs
