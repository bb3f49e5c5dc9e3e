"""data.gpu_decode=true on the CPU (the same code path as on a GPU): equal, draw for draw, to the
CPU pipeline with the same crop / flip / normalisation (timm's, PIL-decoded); clear errors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vitlab.data.gpu_decode import collate_bytes
from vitlab.data.imagenet import ImageNetDataModule
from vitlab.data.synthetic import make_imagenet

PLAIN = dict(auto_augment=None, color_jitter=0, reprob=0.0, img_size=32, num_workers=0, batch_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("gd"), num_classes=2, num_train=4, num_val=1, size=80, height=60)


def seeded(seed):
    random.seed(seed), torch.manual_seed(seed), np.random.seed(seed)


def test_same_draws_as_the_cpu_pipeline(folder):
    cpu = ImageNetDataModule(str(folder), **PLAIN)
    gpu = ImageNetDataModule(str(folder), gpu_decode=True, **PLAIN)
    cpu.setup("fit"), gpu.setup("fit")
    std = torch.tensor(cpu.info.std).view(3, 1, 1) * 255
    flips = 0
    for seed in range(16):
        i = seed % len(cpu.train_set)
        seeded(seed)
        expected, label = cpu.train_set[i]
        seeded(seed)
        batch = gpu.on_after_batch_transfer(collate_bytes([gpu.train_set[i]]), 0)
        assert batch.targets.tolist() == [label]
        got = batch.images[0]
        assert got.shape == expected.shape == (3, 32, 32) and got.dtype == torch.float32
        grey = ((got - expected) * std).abs()  # in grey levels: torch's resize vs PIL's bicubic
        assert grey.mean() < 1.0 and grey.max() <= 8, (seed, float(grey.mean()), float(grey.max()))
        mirrored = ((got.flip(-1) - expected) * std).abs().mean()
        flips += bool(mirrored < grey.mean())  # never: the flip is drawn as the CPU draws it
    assert flips == 0


def test_batch_of_different_sizes_and_options(folder, tmp_path):
    make_imagenet(tmp_path / "mixed", num_classes=2, num_train=2, num_val=1, size=50, height=70)
    gpu = ImageNetDataModule(str(folder), gpu_decode=True, **{**PLAIN, "reprob": 0.25})
    gpu.setup("fit")
    other = ImageNetDataModule(str(tmp_path / "mixed"), gpu_decode=True, **PLAIN)
    other.setup("fit")
    batch = collate_bytes([gpu.train_set[0], other.train_set[0], gpu.train_set[1], None])
    assert int(batch.skipped) == 1
    out = gpu.on_after_batch_transfer(batch, 0)
    assert out.images.shape == (3, 3, 32, 32) and out.images.dtype == torch.float32
    with pytest.raises(ValueError, match="data.auto_augment=null data.color_jitter=0"):
        ImageNetDataModule(str(folder), gpu_decode=True)


def test_undecodable_file_named_or_skipped(folder, tmp_path):
    import shutil

    bad_root = tmp_path / "bad"
    shutil.copytree(folder, bad_root)
    victim = sorted((bad_root / "train").rglob("*.JPEG"))[0]
    victim.write_bytes(b"not a jpeg")
    dm = ImageNetDataModule(str(bad_root), gpu_decode=True, **PLAIN)
    dm.setup("fit")
    batch = collate_bytes([dm.train_set[0], dm.train_set[1]])
    with pytest.raises(Exception, match="image 0 of a training batch cannot be decoded.*skip_corrupt"):
        dm.on_after_batch_transfer(batch, 0)
    dm = ImageNetDataModule(str(bad_root), gpu_decode=True, skip_corrupt=True, **PLAIN)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="skipping"):
        out = dm.on_after_batch_transfer(collate_bytes([dm.train_set[0], dm.train_set[1]]), 0)
    assert out.images.shape[0] == 1 and out.targets.shape == (1,) and int(out.skipped) == 1
