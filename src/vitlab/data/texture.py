"""The textured background of the generated datasets, shared by ``synthetic`` (ImageNet) and
``synthetic_dense`` (COCO, ADE20K): below both, so neither imports the other for it."""
from __future__ import annotations

import numpy as np
from PIL import Image


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-frequency colour noise plus fine grain: a texture, not a flat colour."""
    coarse = rng.integers(0, 120, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
    grain = rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
