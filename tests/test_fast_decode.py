"""``data.fast_decode`` against the default ImageNet training pipeline (timm's DeiT transforms on PIL).

The default pipeline hands uint8 images over and normalises after the transfer: equal to timm's
own float pipeline. The fast pipeline must draw the same augmentation (crop box, flip, RandAugment ops: with the same
seeds it consumes the random streams exactly as the default does) and give statistically the same
pixels, not bit-equal ones: reduced-scale JPEG decoding and torch's resize only change resampling.
The device-side half (normalisation, random erasing) is checked against torchvision's Normalize.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import JpegImagePlugin
from torchvision.transforms import Normalize

from support import FAST, pil_rgb, timm_float_pipeline
from vitlab.data.base import IMAGENET_MEAN, IMAGENET_STD, ImageBatch
from vitlab.data.imagenet import ImageNetDataModule, normalise_uint8
from vitlab.data.synthetic import make_imagenet

STD_255 = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # normalised units -> grey levels


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Photos of 640 x 480: crops of at least 448 x 448 (2 x the output) decode at half scale."""
    return make_imagenet(tmp_path_factory.mktemp("photos"), num_classes=2, num_train=4, num_val=1, size=640, height=480)


def _module(root, fast: bool, **kwargs):
    dm = ImageNetDataModule(str(root), num_workers=0, fast_decode=fast, reprob=0.0, **kwargs)
    dm.setup("fit")
    return dm


def _train_set(root, fast: bool, **kwargs):
    return _module(root, fast, **kwargs).train_set


@pytest.mark.parametrize("options", [{}, dict(auto_augment=None, color_jitter=0.4)])
def test_default_pipeline_is_timms_float_pipeline_with_the_normalisation_after_the_transfer(photos, options):
    """The default training pipeline hands uint8 images over (timm's prefetcher form): the worker's
    part, then the DataModule's after-transfer normalisation, gives timm's own float pipeline's
    pixels (ToTensor + Normalize in the transform) draw for draw: RandAugment (the default) or colour
    jitter, crop and flip, the same random streams."""
    dm = _module(photos, False, img_size=64, **options)
    reference = timm_float_pipeline(dm)
    for i in range(len(dm.train_set)):
        for s in range(6):
            _seed(s)
            image, label = dm.train_set[i]
            _seed(s)
            expected = reference(pil_rgb(dm.train_set.samples[i][0]))
            assert image.dtype == torch.uint8 and label == dm.train_set.samples[i][1]
            got = dm.on_after_batch_transfer(ImageBatch(image[None], torch.tensor([label]), torch.tensor(0)), 0)
            torch.testing.assert_close(got.images[0], expected, atol=1e-5, rtol=0)


def _seed(s: int) -> None:  # the streams timm's pipeline draws from: crop (random), flip (torch), RandAugment (numpy, random)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.6, 1.0)])
def test_same_draws_give_the_default_pixels_up_to_resampling(photos, scale, monkeypatch):
    reduced = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.size
        out = draft(self, mode, size)
        reduced.append(self.size != before)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    default, fast = _train_set(photos, False, scale=scale), _train_set(photos, True, scale=scale)
    reference = timm_float_pipeline(_module(photos, False, scale=scale))  # timm's float pipeline on PIL
    diffs, pixels_default, pixels_fast = [], [], []
    for i in range(len(default)):
        for s in range(10):
            _seed(s)
            path, label = default.samples[i]
            expected = reference(pil_rgb(path))
            _seed(s)
            image, fast_label = fast[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 224, 224) and fast_label == label
            got = normalise_uint8(image[None], IMAGENET_MEAN, IMAGENET_STD)[0]
            diffs.append(((got - expected).abs() * STD_255).mean().item())  # grey levels
            pixels_default.append(expected)
            pixels_fast.append(got)
    assert any(reduced) and not all(reduced)  # both paths ran: half-scale decodes and full ones
    # a different crop, flip or RandAugment op would differ by tens of grey levels
    assert np.median(diffs) < 0.5 and max(diffs) < 12
    a, b = torch.stack(pixels_default), torch.stack(pixels_fast)
    torch.testing.assert_close(b.mean((0, 2, 3)), a.mean((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(b.std((0, 2, 3)), a.std((0, 2, 3)), atol=0.01, rtol=0)


def test_device_side_normalisation_and_erasing(photos):
    dm = ImageNetDataModule(str(photos), num_workers=0, fast_decode=True, reprob=0.0)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    batch = ImageBatch(images, torch.arange(4), torch.tensor(0))
    out = dm.on_after_batch_transfer(batch, 0)
    reference = Normalize(IMAGENET_MEAN, IMAGENET_STD)(images.float() / 255)  # what ToTensor + Normalize give
    torch.testing.assert_close(out.images, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.targets, batch.targets)
    dm.reprob = 1.0  # every image gets timm's pixel-mode erasing: a block of fresh normal noise
    erased = dm.on_after_batch_transfer(batch, 0).images
    assert all((erased[k] != reference[k]).any() for k in range(4))
    floats = ImageBatch(reference, batch.targets, batch.skipped)  # validation batches: untouched
    assert dm.on_after_batch_transfer(floats, 0) is floats


def test_erasing_probability_is_the_configured_one(photos):
    dm = ImageNetDataModule(str(photos), num_workers=0, fast_decode=True, reprob=0.25)
    random.seed(0)
    images = torch.full((800, 3, 8, 8), 128, dtype=torch.uint8)
    out = dm.on_after_batch_transfer(ImageBatch(images, torch.zeros(800), torch.tensor(0)), 0).images
    clean = normalise_uint8(images[:1], IMAGENET_MEAN, IMAGENET_STD)
    share = (out != clean).flatten(1).any(1).float().mean().item()
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / 800) ** 0.5  # binomial, 4 sigma


def test_training_run_with_fast_decode(tmp_path, train_run):
    """Through Lightning: the DataModule's hook turns the uint8 batches into the model's input (a
    uint8 batch reaching the model would stop the run: convolutions take no integer images)."""
    summary = train_run(tmp_path / "run", *FAST, "data.fast_decode=true", "schedule.epochs=1")
    assert summary["status"] == "finished"
