"""Bad input gets a clear error naming the file, field or option and what was expected."""
from __future__ import annotations


import pytest
import torch

import vitlab
from support import TINY_PVT, run_script
from vitlab.data.base import CorruptImageError, DatasetLayoutError
from vitlab.data.imagenet import ImageNetDataModule, collate_skipping
from vitlab.data.synthetic import make_imagenet
from vitlab.runtime.checkpoints import CheckpointMismatchError


def test_missing_imagenet_names_path_layout_and_ways_out(tmp_path, data_dir):
    proc = run_script("train.py", [*TINY_PVT, "debug=smoke", f"hydra.run.dir={tmp_path / 'run'}"], data_dir,
                      check=False, env={"HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr
    assert "Error (DatasetLayoutError)" in message
    assert f"{data_dir}/imagenet/train is missing" in message
    assert "<root>/train/<wnid>/*.JPEG" in message
    assert "data.root=" in message and "data.synthetic=true" in message
    assert not (data_dir / "synthetic").exists() or "imagenet_" not in message  # no silent fallback
    assert not (tmp_path / "run").exists()  # a failed command leaves no run directory


def test_wrongly_laid_out_root(tmp_path):
    (tmp_path / "train" / "n01").mkdir(parents=True)
    (tmp_path / "val").mkdir()  # no class folders
    dm = ImageNetDataModule(root=str(tmp_path))
    with pytest.raises(DatasetLayoutError, match=r"val has no class folders"):
        dm.data_root()


def _dataset_with_corrupt_file(tmp_path):
    root = make_imagenet(tmp_path / "in", num_classes=2, num_train=4, num_val=2, size=32)
    bad = root / "train" / "n00000001" / "broken.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    return root, bad


def test_corrupt_image_names_the_file(tmp_path):
    root, bad = _dataset_with_corrupt_file(tmp_path)
    dm = ImageNetDataModule(root=str(root), img_size=32, num_workers=0, batch_size=20)
    dm.setup()
    index = [p for p, _ in dm.train_set.samples].index(str(bad))
    with pytest.raises(CorruptImageError, match="broken.JPEG.*skip_corrupt"):
        dm.train_set[index]


def test_corrupt_image_skipped_and_counted(tmp_path):
    root, bad = _dataset_with_corrupt_file(tmp_path)
    dm = ImageNetDataModule(root=str(root), img_size=32, num_workers=0, skip_corrupt=True)
    dm.setup()
    with pytest.warns(UserWarning, match="broken.JPEG"):
        images, targets, skipped = collate_skipping([dm.train_set[i] for i in range(len(dm.train_set))])
    assert skipped.item() == 1 and images.shape[0] == len(dm.train_set) - 1


def test_unknown_config_option_lists_choices(tmp_path, data_dir):
    proc = run_script("train.py", ["backbone=no_such_net", f"hydra.run.dir={tmp_path}"], data_dir, check=False)
    assert proc.returncode == 1
    message = proc.stderr
    assert "no_such_net" in message and "Available options" in message and "pvt_v2_b2" in message


def test_unknown_backbone_name_in_api_lists_available():
    with pytest.raises(ValueError, match=r"unknown backbone 'nope'; available: .*pvt_v2_b0"):
        vitlab.create_backbone("nope")


def test_checkpoint_from_a_different_backbone_names_the_mismatch(tmp_path):
    small = vitlab.create_model("pvt_v2_b0", num_classes=10, overrides=["depths=[1,1,1,1]"])
    torch.save(small.state_dict(), tmp_path / "b0.pth")
    with pytest.raises(CheckpointMismatchError, match=r"b0.pth does not match .*missing keys \[.*shape mismatches"):
        vitlab.create_model("pvt_v2_b1", num_classes=10, pretrained=str(tmp_path / "b0.pth"))


def test_checkpoint_classes_must_match_the_evaluation_data(tmp_path, data_dir, smoke_sweep):
    """The class count comes from the dataset; evaluating a checkpoint (10 generated classes) on
    data with other classes is an error naming both counts."""
    root = make_imagenet(tmp_path / "in", num_classes=3, num_train=2, num_val=2, size=32)
    proc = run_script("eval.py", [f"ckpt_path={smoke_sweep / '0' / 'checkpoints' / 'last.ckpt'}",
                                  "+overrides.data.synthetic=false", f"+overrides.data.root={root}",
                                  f"hydra.run.dir={tmp_path / 'eval'}"], data_dir, check=False, env={"HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Error (CheckpointMismatchError)" in proc.stderr and "trained on 10 classes but the data has 3" in proc.stderr
    assert not (tmp_path / "eval").exists()  # a failed command leaves no run directory


def test_a_generated_run_says_the_data_root_it_does_not_read(tmp_path, caplog):
    """data.synthetic=true (experiment=demo sets it) wins over data.root: a run given a root that holds
    data (a directory other than the generated one, or a bucket) says it reads the generated dataset
    instead; an absent root, or the generated dataset's own folder, is nothing to say."""
    import logging

    real = tmp_path / "real"
    real.mkdir()
    generated = tmp_path / "data" / "synthetic"
    for root, said in ((real, True), ("s3://my-bucket/inet", True), (tmp_path / "absent", False),
                       (tmp_path / "data", False)):
        caplog.clear()
        dm = ImageNetDataModule(root=str(root), synthetic=True, synthetic_root=str(generated), synthetic_classes=2,
                                synthetic_size=16)
        with caplog.at_level(logging.WARNING, logger="vitlab"):
            assert dm.data_root() == generated
            dm.data_root()
        text = f"data.synthetic=true: this run reads the generated dataset at {generated}, not data.root={root}"
        assert caplog.text.count(text) == int(said), (root, caplog.text)
