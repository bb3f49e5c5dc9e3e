"""Small generated COCO and ADE20K datasets in the real on-disk formats.

Called by ``python -m vitlab.data.synthetic {coco,ade20k} OUT`` and by the
DataModules when ``data.synthetic=true``.

COCO (``make_coco``)::

    OUT/train2017/*.jpg  OUT/val2017/*.jpg
    OUT/annotations/instances_{train,val}2017.json

The JSON lists the 80 real COCO categories (ids 1..90 with the real gaps), so
the contiguous-label mapping is exercised; objects use four of them, each a
shape with its own colour over a textured background. Objects never overlap,
so polygon masks are exact. Some annotations are crowd regions (uncompressed
RLE, as in COCO), some non-crowd masks are compressed RLE, and some images have
no annotation at all (COCO has such images too).

ADE20K (``make_ade20k``)::

    OUT/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_%08d.jpg
    OUT/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_%08d.png

Label maps are 8-bit PNGs, 0 = "other" (ignored) and 1..150 the ADE classes. A
handful of classes appear as textured regions (a class is a colour plus a stripe
pattern), plus patches of label 0 filled with noise.

Both are deterministic for a given seed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from vitlab.data.texture import background

# The 80 COCO 2017 categories with their original (non-contiguous) ids.
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
]

# COCO category id -> (shape, colour) of the generated objects.
COCO_OBJECTS = {
    1: ("bar", (230, 60, 50)),        # person: an upright bar
    3: ("square", (60, 90, 230)),     # car
    37: ("disc", (240, 200, 40)),     # sports ball
    38: ("triangle", (50, 170, 70)),  # kite
}

# ADE20K label value -> (colour, stripe period in px or 0, stripe angle) of the generated regions.
ADE_REGIONS = {
    1: ((150, 150, 140), 0, 0.0),      # wall (background)
    3: ((90, 150, 230), 0, 0.0),       # sky (background, top)
    4: ((140, 100, 60), 8, 0.0),       # floor (background, bottom)
    5: ((40, 140, 50), 6, 0.8),        # tree
    13: ((220, 60, 60), 0, 0.0),       # person
    21: ((60, 60, 200), 10, 1.57),     # car
    16: ((230, 200, 60), 5, 2.3),      # table
}
ADE_BACKGROUNDS = (1, 3, 4)
ADE_OBJECTS = (5, 13, 21, 16)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a generated object (discs as 24-gons, so a polygon annotation is exact)."""
    if shape == "disc":
        pts = [(r * math.cos(2 * math.pi * k / 24), r * math.sin(2 * math.pi * k / 24)) for k in range(24)]
    elif shape == "square":
        pts = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        pts = [(0, -r), (r * 0.87, r * 0.5), (-r * 0.87, r * 0.5)]
    elif shape == "bar":
        pts = [(-r * 0.4, -r), (r * 0.4, -r), (r * 0.4, r), (-r * 0.4, r)]
        angle = angle * 0.2  # stays roughly upright
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths of a column-major mask, starting with a run of zeros.

    pycocotools only writes compressed RLE; real COCO crowd annotations are uncompressed.
    """
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # the first run counts zeros
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    """(width, height): landscape, portrait or square, so aspect-ratio grouping has work to do."""
    short = int(size * 0.75)
    return [(size, short), (short, size), (size, size)][int(rng.integers(0, 3))]


def _coco_image(rng: np.random.Generator, width: int, height: int, num_objects: int, crowd: bool):
    side = max(width, height)
    img = background(rng, side).crop((0, 0, width, height))
    draw = ImageDraw.Draw(img)
    anns, placed = [], []
    for _ in range(num_objects):
        cat = int(rng.choice(list(COCO_OBJECTS)))
        shape, colour = COCO_OBJECTS[cat]
        for _attempt in range(20):  # rejection sampling: objects do not overlap
            r = min(width, height) * rng.uniform(0.1, 0.22)
            cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in placed):
                break
        else:
            continue
        placed.append(box)
        pts = _polygon(shape, cx, cy, r, rng.uniform(0, math.pi))
        fill = tuple(int(v) for v in np.clip(np.array(colour) + rng.integers(-25, 26, size=3), 0, 255))
        draw.polygon(pts, fill=fill)
        anns.append({"category_id": cat, "polygon": [round(v, 2) for p in pts for v in p]})
    if crowd:  # a crowd: many small discs of one class, annotated as one RLE region
        cat = int(rng.choice(list(COCO_OBJECTS)))
        colour = COCO_OBJECTS[cat][1]
        canvas = Image.new("L", (width, height), 0)
        cdraw = ImageDraw.Draw(canvas)
        x0, y0 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
        for _ in range(8):
            x, y, rr = x0 + rng.uniform(0, width * 0.3), y0 + rng.uniform(0, height * 0.3), rng.uniform(2, 5)
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=colour)
            cdraw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=1)
        anns.append({"category_id": cat, "crowd_mask": np.asarray(canvas, dtype=np.uint8)})
    return img, anns


def make_coco(
    out: str | Path, seed: int = 0, num_train: int = 96, num_val: int = 24, size: int = 160
) -> Path:
    """Write a generated COCO-format dataset (images up to ``size`` px on the longer side)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count, first_id in (("train2017", num_train, 100000), ("val2017", num_val, 900000)):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = first_id + 7 * i  # non-contiguous ids, like COCO's
            width, height = _image_size(rng, size)
            empty = i % 10 == 9  # every tenth image has no annotation
            num_objects = 0 if empty else int(rng.integers(1, 4))
            crowd = not empty and i % 8 == 3
            img, anns = _coco_image(rng, width, height, num_objects, crowd)
            file_name = f"{image_id:012d}.jpg"
            img.save(out / split / file_name, quality=92)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for k, ann in enumerate(anns):
                if "crowd_mask" in ann:
                    m = ann["crowd_mask"]
                    segmentation, iscrowd = _uncompressed_rle(m), 1
                else:
                    # area and box from pycocotools' own rasterisation: what readers of the JSON see
                    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([ann["polygon"]], height, width)))
                    iscrowd = 0
                    if k == 1:  # some non-crowd masks as compressed RLE (string counts)
                        rle = mask_utils.encode(np.asfortranarray(m))
                        segmentation = {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}
                    else:
                        segmentation = [ann["polygon"]]
                ys, xs = np.nonzero(m)
                if len(xs) == 0:
                    continue
                x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": ann["category_id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()),
                    "iscrowd": iscrowd, "segmentation": segmentation,
                })
                ann_id += 1
        data = {
            "info": {"description": f"vitlab generated COCO-format data (seed {seed})"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": n, "supercategory": "generated"} for c, n in COCO_CATEGORIES],
        }
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return out


def _texture(rng: np.random.Generator, h: int, w: int, label: int) -> np.ndarray:
    """Colour of class ``label`` with its stripe pattern and noise (float HxWx3)."""
    colour, period, angle = ADE_REGIONS[label]
    img = np.broadcast_to(np.array(colour, dtype=np.float32), (h, w, 3)).copy()
    if period:
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
        img += 35 * np.sin(phase)[..., None]
    return img + rng.normal(0, 10, size=(h, w, 3))


def _ade_sample(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    label = np.empty((height, width), dtype=np.uint8)
    top, bottom = rng.choice(ADE_BACKGROUNDS, size=2, replace=False)
    horizon = int(height * rng.uniform(0.3, 0.7))
    label[:horizon], label[horizon:] = top, bottom
    canvas = Image.fromarray(label)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.choice(ADE_OBJECTS))
        r = min(width, height) * rng.uniform(0.12, 0.3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        shape = ("disc", "square", "triangle", "bar")[ADE_OBJECTS.index(cls)]
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, math.pi)), fill=cls)
    if rng.random() < 0.5:  # a patch of "other" (label 0, ignored in training and evaluation)
        x, y = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        draw.rectangle([x, y, x + width * 0.15, y + height * 0.15], fill=0)
    label = np.asarray(canvas).copy()
    img = np.zeros((height, width, 3), dtype=np.float32)
    for cls in np.unique(label):
        where = label == cls
        if cls == 0:
            img[where] = rng.uniform(0, 255, size=(int(where.sum()), 3))
        else:
            img[where] = _texture(rng, height, width, int(cls))[where]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), label


def make_ade20k(
    out: str | Path, seed: int = 0, num_train: int = 96, num_val: int = 24, size: int = 128
) -> Path:
    """Write a generated ADE20K-format dataset under ``out/ADEChallengeData2016``."""
    root = Path(out) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    for split, prefix, count in (("training", "ADE_train", num_train), ("validation", "ADE_val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            width, height = _image_size(rng, size)
            img, label = _ade_sample(rng, width, height)
            name = f"{prefix}_{i + 1:08d}"
            img.save(root / "images" / split / f"{name}.jpg", quality=92)
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return Path(out)
