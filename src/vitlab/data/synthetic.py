"""Small generated datasets in the real on-disk formats, for tests and the demo runs.

    python -m vitlab.data.synthetic imagenet OUT [--seed 0] [--num-classes 10]
    python -m vitlab.data.synthetic coco OUT
    python -m vitlab.data.synthetic ade20k OUT

ImageNet: ``OUT/{train,val}/<wnid>/<wnid>_<i>.JPEG``. Each class is a coloured
shape drawn at a random position, scale and rotation over a noisy textured
background, so a model must learn shape and colour (not one pixel) to tell
classes apart. Everything is deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from vitlab.data.texture import background

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bar", "diamond", "star")
PALETTE = (
    (230, 60, 50), (50, 170, 70), (60, 90, 230), (240, 200, 40), (160, 60, 200),
    (40, 200, 210), (250, 130, 30), (240, 240, 240), (120, 70, 40), (250, 120, 190),
)


def wnid(index: int) -> str:
    return f"n{index + 1:08d}"


def class_style(index: int) -> tuple[str, tuple[int, int, int]]:
    """Class ``index`` -> (shape, colour); distinct pairs for the first 80 classes."""
    return SHAPES[index % len(SHAPES)], PALETTE[(index // len(SHAPES) + index) % len(PALETTE)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    def rotated(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        draw.polygon(rotated([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=fill)
    elif shape == "diamond":
        draw.polygon(rotated([(0, -r), (r * 0.6, 0), (0, r), (-r * 0.6, 0)]), fill=fill)
    elif shape == "triangle":
        draw.polygon(rotated([(0, -r), (r * 0.87, r * 0.5), (-r * 0.87, r * 0.5)]), fill=fill)
    elif shape == "bar":
        draw.polygon(rotated([(-r, -r * 0.3), (r, -r * 0.3), (r, r * 0.3), (-r, r * 0.3)]), fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.polygon(rotated([(-r, -w), (r, -w), (r, w), (-r, w)]), fill=fill)
        draw.polygon(rotated([(-w, -r), (w, -r), (w, r), (-w, r)]), fill=fill)
    elif shape == "star":
        pts = [((r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5),
                (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5)) for k in range(10)]
        draw.polygon(rotated(pts), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def make_imagenet(
    out: str | Path, seed: int = 0, num_classes: int = 10, num_train: int = 80, num_val: int = 20, size: int = 64,
    height: int | None = None,
) -> Path:
    """Write ``num_train``/``num_val`` images per class in the ImageNet folder layout: ``size`` x
    ``size`` pixels, or ``size`` wide and ``height`` high (ImageNet's typical photo: 500 x 375)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    width, height = size, height or size
    for split, per_class in (("train", num_train), ("val", num_val)):
        for c in range(num_classes):
            shape, colour = class_style(c)
            folder = out / split / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = background(rng, max(width, height)).crop((0, 0, width, height))
                r = min(width, height) * rng.uniform(0.18, 0.32)
                cx, cy = rng.uniform(r, (width - r, height - r))  # the same draws as before for squares
                jitter = rng.integers(-25, 26, size=3)
                fill = tuple(int(v) for v in np.clip(np.array(colour) + jitter, 0, 255))
                draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, rng.uniform(0, math.pi), fill)
                img.save(folder / f"{wnid(c)}_{i}.JPEG", quality=90)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["imagenet", "coco", "ade20k"])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=None, help="images (per class for imagenet)")
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None, help="imagenet only")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    args = parser.parse_args(argv)
    kwargs = {k: v for k, v in dict(num_train=args.num_train, num_val=args.num_val, size=args.size).items() if v}
    if args.dataset == "imagenet":
        if args.num_classes:
            kwargs["num_classes"] = args.num_classes
        make_imagenet(args.out, seed=args.seed, **kwargs)
    else:
        from vitlab.data import synthetic_dense

        getattr(synthetic_dense, f"make_{args.dataset}")(args.out, seed=args.seed, **kwargs)
    print(f"wrote a generated {args.dataset} dataset to {args.out}")


if __name__ == "__main__":
    main()
