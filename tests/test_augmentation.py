"""The papers' ImageNet recipe runs with the installed libraries: timm's auto-augment policies
drawn many times, and 0-bit posterize a black image as on the Pillow the recipes were made with."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp, AugMixAugment, AutoAugment, RandAugment

from vitlab.data.imagenet import ImageNetDataModule, posterize

DRAWS = 20_000  # RandAugment's 2 ops a draw: 40,000 op applications
# AugMix applies width x depth = 4 x 2 ops a draw (and blends 4 chains): the same 40,000 ops in 5,000 draws
OPS_PER_DRAW = {"augmix-m5-w4-d2": 4}


def noise_image(size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def augment_ops(transform) -> list[AugmentOp]:
    """The AugmentOps inside a training transform (RandAugment / AugMix ops, AutoAugment policy)."""
    ops = []
    for t in transform.transforms:
        if isinstance(t, (RandAugment, AugMixAugment)):
            ops += t.ops
        elif isinstance(t, AutoAugment):
            ops += [op for sub_policy in t.policy for op in sub_policy]
    return ops


def count_posterize_bits(transform) -> list[int]:
    """Record the bits every posterize op of ``transform`` is asked for (a spy around our op)."""
    asked: list[int] = []

    def spy(img, bits, **kw):
        asked.append(bits)
        return posterize(img, bits, **kw)

    for op in augment_ops(transform):
        if op.name.startswith("Posterize"):
            assert op.aug_fn is posterize, f"{op.name} does not use vitlab's posterize"
            op.aug_fn = spy
    return asked


@pytest.mark.parametrize("bits", range(9))
def test_posterize_keeps_the_top_bits_and_zero_bits_is_black(bits):
    img = noise_image(16)
    # the reference: keep the `bits` most significant bits of every channel (Pillow < 13 for all 0..8)
    expected = np.asarray(img) & (0xFF & ~(2 ** (8 - bits) - 1))
    out = posterize(img, bits)
    assert out.mode == img.mode and out.size == img.size
    assert (np.asarray(out) == expected).all()
    if bits == 0:
        assert not np.asarray(out).any()


def test_default_training_transform_survives_many_draws():
    """The default recipe (conf/data/imagenet.yaml: rand-m9-mstd0.5-inc1, random erasing, ...)
    through the DataModule's own transform; its magnitude noise reaches 0-bit posterize."""
    transform = ImageNetDataModule(root="unused", img_size=16).train_transform()
    asked = count_posterize_bits(transform)
    random.seed(0)
    torch.manual_seed(0)
    img = noise_image(24)
    for _ in range(DRAWS):
        out = transform(img)
    assert out.shape == (3, 16, 16)
    assert asked.count(0) >= 5  # ~30 expected: the case Pillow 13 refuses was exercised


# (data.auto_augment, whether it asks posterize for 0 bits)
POLICIES = [
    ("rand-m10-inc1", True),        # RandAugment at full magnitude: PosterizeIncreasing at 0 bits
    ("rand-m10-mstd101", True),     # uniform magnitudes 0..10: every level of every op (Posterize < 2.5: 0 bits)
    ("rand-m9-n3-mstd0.5-tweights", True),  # weighted op choice (PosterizeIncreasing, m9 +- 0.5)
    ("augmix-m5-w4-d2", False),
    ("original", False), ("originalr", False), ("v0", True), ("v0r", False), ("3a", False),  # AutoAugment
]


@pytest.mark.parametrize("policy, reaches_zero_bits", POLICIES)
def test_every_auto_augment_policy_survives_many_draws(policy, reaches_zero_bits):
    """The augmentation step the DataModule builds for each ``data.auto_augment`` choice, drawn on
    a tiny image (the other steps of the transform do not depend on the choice)."""
    transform = ImageNetDataModule(root="unused", img_size=8, auto_augment=policy).train_transform()
    augment = next(t for t in transform.transforms if isinstance(t, (RandAugment, AugMixAugment, AutoAugment)))
    asked = count_posterize_bits(transform)
    random.seed(0)
    img = noise_image(8)
    for _ in range(DRAWS // OPS_PER_DRAW.get(policy, 1)):
        out = augment(img)
    assert out.size == (8, 8)
    assert (0 in asked) == reaches_zero_bits  # the case Pillow 13 refuses was exercised (or cannot occur)
