"""The behaviours of the installed libraries that vitlab's code relies on, and the record of the
tested versions. A failure here means a dependency changed under us: each test names the vitlab
code that relies on the behaviour; adapt it, then rerun tools/freeze_constraints.py."""
from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from support import REPO
from vitlab.data.imagenet import posterize
from vitlab.data.synthetic import make_imagenet


def noise_image(size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_constraints_pin_the_whole_stack():
    """constraints.txt (used by `make install`) pins every package vitlab[dev,cluster] pulls in,
    except what the Makefile's TORCH line installs."""
    pytest.importorskip("tomllib")
    spec = importlib.util.spec_from_file_location("freeze_constraints", REPO / "tools" / "freeze_constraints.py")
    freeze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(freeze)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "constraints.txt").read_text(), re.M))
    unpinned = sorted(set(freeze.constraints()) - set(pins))
    assert not unpinned, f"not in constraints.txt: {unpinned}; rerun tools/freeze_constraints.py"
    assert not {"torch", "torchvision", "vitlab"} & set(pins)
    assert {"pillow", "timm", "pycocotools", "lightning", "hydra-core", "numpy"} <= set(pins)


def test_pillow_posterize():
    """vitlab.data.imagenet.posterize hands 1..8 bits to Pillow (through timm) and answers 0 bits
    itself: Pillow keeps the top bits, and refuses 0 bits (13.0) or gives black (< 13)."""
    img = noise_image()
    for bits in range(1, 9):
        assert (np.asarray(ImageOps.posterize(img, bits)) == np.asarray(img) & (0xFF << (8 - bits) & 0xFF)).all()
    try:
        zero = ImageOps.posterize(img, 0)
    except ValueError:
        return
    assert not np.asarray(zero).any()


def test_timm_builds_its_ops_from_the_table_vitlab_registers_into():
    """timm's AugmentOp takes its function from NAME_TO_OP when built (vitlab.data.imagenet puts
    its posterize there), and RandAugment inc1 at magnitude 10 asks for 0 bits (the recipe's case)."""
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    assert op.aug_fn is posterize
    assert auto_augment.LEVEL_TO_ARG["PosterizeIncreasing"](10, {}) == (0,)
    assert not np.asarray(op(noise_image())).any()


def test_pillow_open_reads_the_header_only(tmp_path):
    """The cheap data check reads sizes with Image.open (vitlab.data.imagenet.read_header) and
    only the full check decodes: a truncated JPEG has its size but no pixels."""
    path = tmp_path / "cut.jpg"
    noise_image(64).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
        with pytest.raises(OSError):
            img.load()


def test_imagefolder_class_order_and_empty_folders(tmp_path):
    """ImageNetDataModule.info names the sorted class folders, ImageFolder's label order; a class
    folder without images stops ImageFolder unless allow_empty (data.skip_corrupt=true)."""
    root = make_imagenet(tmp_path / "in", num_classes=3, num_train=1, num_val=1, size=8)
    (root / "train" / "n00000000").mkdir()  # sorts first, holds nothing
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(root / "train"))
    folder = ImageFolder(str(root / "train"), allow_empty=True)
    assert folder.classes == sorted(p.name for p in (root / "train").iterdir())
    assert [t for _, t in folder.samples] == [1, 2, 3]


def test_sanitize_drops_squashed_boxes_with_their_labels():
    """The COCO training pipeline (vitlab.data.coco) relies on SanitizeBoundingBoxes(min_size=1)
    to drop boxes a resize squashed below one pixel, with their labels."""
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0, 0, 0.5, 10], [2, 2, 9, 9.0]]), format="XYXY",
                                     canvas_size=(16, 16))
    _, target = v2.SanitizeBoundingBoxes(min_size=1)(torch.zeros(3, 16, 16),
                                                     {"boxes": boxes, "labels": torch.tensor([4, 7])})
    assert target["labels"].tolist() == [7] and target["boxes"].tolist() == [[2, 2, 9, 9]]
