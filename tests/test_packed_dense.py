"""data.format=litdata for COCO and ADE20K: python -m vitlab.data.pack coco|ade20k, the packed readers
item for item against the folder / JSON readers (targets included), the shard checks, resumable
packing, and evaluation through both formats giving the same metrics."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from vitlab.data.ade20k import ADE20KDataModule
from vitlab.data.base import CorruptImageError
from vitlab.data.coco import CocoDataModule
from vitlab.data.streaming import PackedSplit, ShardError, check_packed
from vitlab.data.synthetic_dense import make_ade20k, make_coco


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Generated COCO (12 + 7 images) and ADE20K (6 + 5), each packed into 16 KB chunks."""
    from vitlab.data.pack import main

    base = tmp_path_factory.mktemp("pack_dense")
    folders = {"coco": make_coco(base / "coco", num_train=12, num_val=7, size=64),
               "ade20k": make_ade20k(base / "ade20k", num_train=6, num_val=5, size=48) / "ADEChallengeData2016"}
    for kind, folder in folders.items():
        main([kind, "--root", str(folder), "--out", str(base / f"{kind}_packed"), "--shard-size", "16KB",
              "--workers", "1"])
    return {kind: (folder, base / f"{kind}_packed") for kind, folder in folders.items()}


MODULES = {"coco": lambda root, fmt, **kw: CocoDataModule(str(root), num_workers=0, format=fmt, with_masks=True,
                                                          smoke_scale=48, smoke=True, smoke_images=99, **kw),
           "ade20k": lambda root, fmt, **kw: ADE20KDataModule(str(root), num_workers=0, format=fmt, smoke=True,
                                                              smoke_scale=32, smoke_images=99, **kw)}


def module(kind: str, root: Path, fmt: str, **kw):
    dm = MODULES[kind](root, fmt, **kw)
    dm.setup("fit")
    return dm


def seeded(dataset, i: int):
    torch.manual_seed(i), random.seed(i), np.random.seed(i)
    return dataset[i]


def assert_same(a, b) -> None:
    """Equal samples: tensors, target dicts (boxes, labels, iscrowd, area, masks, ids), names."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("kind", ["coco", "ade20k"])
def test_packed_items_equal_the_folder_reader(packed, kind):
    """The same DatasetInfo, the same items per split (images, every target field; training
    samples under the same seeds through the augmentation), the same aspect-ratio groups."""
    folder, out = packed[kind]
    fd, ld = module(kind, folder, "folder"), module(kind, out, "litdata")
    assert fd.info == ld.info
    for split in ("train_set", "val_set"):
        a, b = getattr(fd, split), getattr(ld, split)
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            assert_same(seeded(a, i), seeded(b, i))
    if kind == "coco":  # the training filter dropped the images without learnable annotations: 11 of 12 remain
        assert len(fd.train_set) == 11 and fd.train_set.aspect_groups() == ld.train_set.aspect_groups()
        assert len(set(fd.train_set.aspect_groups())) == 2
        assert any(t["iscrowd"].any() for _, t in (fd.val_set[i] for i in range(len(fd.val_set))))


def test_coco_items_hold_the_files_and_the_json(packed):
    """Independently of the readers: each item holds its image file's bytes and exactly the JSON's
    annotations for its image id (pycocotools' index); the val JSON is kept beside the chunks."""
    folder, out = packed["coco"]
    for split in ("train2017", "val2017"):
        gt = COCO(str(folder / "annotations" / f"instances_{split}.json"))
        items = PackedSplit(out / split)
        assert [int(items[k]["image_id"]) for k in range(len(items))] == sorted(gt.imgs)
        for k in range(len(items)):
            item = items[k]
            info = gt.imgs[int(item["image_id"])]
            assert bytes(item["jpeg"]) == (folder / split / info["file_name"]).read_bytes()
            fields = ("file_name", "width", "height")
            assert [item[k] for k in fields] == [info[k] for k in fields]
            assert json.loads(item["annotations"]) == gt.imgToAnns.get(info["id"], [])
    kept = out / "annotations" / "instances_val2017.json"
    assert kept.read_bytes() == (folder / "annotations" / "instances_val2017.json").read_bytes()
    manifest = json.loads((out / "vitlab_pack.json").read_text())
    assert [tuple(c) for c in manifest["categories"]] == sorted((c["id"], c["name"]) for c in gt.dataset["categories"])
    assert len(manifest["splits"]["train2017"]["chunks"]) > 1  # several shards at 16 KB
    items = PackedSplit(packed["ade20k"][1] / "training")
    label_dir = packed["ade20k"][0] / "annotations" / "training"
    assert [items[k]["name"] for k in range(len(items))] == sorted(p.stem for p in label_dir.glob("*.png"))
    assert bytes(items[2]["label"]) == (label_dir / f"{items[2]['name']}.png").read_bytes()


def test_packing_resumes_and_skips_what_is_done(packed, tmp_path, capsys):
    """A re-run finds both splits packed and verified (nothing rewritten); a split whose manifest
    entry is gone (the run stopped after writing it) is written again with the same chunks."""
    from vitlab.data.pack import main

    folder, out = packed["ade20k"]
    copy = tmp_path / "ade20k_packed"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "vitlab_pack.json").read_text())
    capsys.readouterr()
    main(["ade20k", "--root", str(folder), "--out", str(copy), "--shard-size", "16KB", "--workers", "1"])
    assert capsys.readouterr().out.count("already packed") == 2
    del manifest["splits"]["validation"]
    (copy / "vitlab_pack.json").write_text(json.dumps(manifest))
    main(["ade20k", "--root", str(folder), "--out", str(copy), "--shard-size", "16KB", "--workers", "1"])
    assert "validation: 5 items in 1 chunks, verified" in capsys.readouterr().out
    assert json.loads((copy / "vitlab_pack.json").read_text()) == json.loads((out / "vitlab_pack.json").read_text())
    with pytest.raises(SystemExit, match="already holds another packed dataset"):
        main(["coco", "--root", str(packed["coco"][0]), "--out", str(copy), "--workers", "1"])


KILLED_MID_PACK = """
import os, signal, sys
import vitlab.data.ade20k as ade
from vitlab.data.pack import main

read = ade._ade20k_item
def dying(source):  # the job is killed (SIGKILL, the whole process group) at the 5th training image
    if source[0].endswith("_00000005.jpg"):
        os.killpg(0, signal.SIGKILL)
    return read(source)
ade._ade20k_item = dying
main(["ade20k", "--root", sys.argv[1], "--out", sys.argv[2], "--shard-size", "4KB", "--workers", "1"])
"""


@pytest.mark.slow  # a subprocess that imports the data stack: ~10 s
def test_packing_killed_midway_resumes_to_the_same_pack(packed, tmp_path, capsys):
    """A pack killed mid-split (chunks and LitData's checkpoint on disk, no manifest) continues
    from its checkpoint when re-run, and ends with the chunks of an uninterrupted pack."""
    import subprocess
    import sys

    from vitlab.data.pack import main

    folder = packed["ade20k"][0]
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_PACK, str(folder), str(tmp_path / "killed")],
                          start_new_session=True, capture_output=True, timeout=300)
    assert proc.returncode == -9 and (tmp_path / "killed" / "training" / "chunk-0-0.bin").exists()
    assert not (tmp_path / "killed" / "vitlab_pack.json").exists()
    args = ["--shard-size", "4KB", "--workers", "1"]
    capsys.readouterr()
    main(["ade20k", "--root", str(folder), "--out", str(tmp_path / "killed"), *args])
    assert "Checkpoints loaded successfully" in capsys.readouterr().out  # continued, not started again
    main(["ade20k", "--root", str(folder), "--out", str(tmp_path / "straight"), *args])
    resumed, straight = (json.loads((tmp_path / d / "vitlab_pack.json").read_text()) for d in ("killed", "straight"))
    assert resumed == straight and len(straight["splits"]["training"]["chunks"]) > 1


def test_bad_packed_dense_data_is_named(packed, tmp_path):
    """A truncated shard, a missing or replaced file kept beside the chunks, another dataset's pack:
    errors naming the file; a corrupt image inside a chunk names its item, or is skipped."""
    _, out = packed["coco"]
    bad = tmp_path / "coco_bad"
    shutil.copytree(out, bad)
    shard = sorted((bad / "train2017").glob("*.bin"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ShardError, match=shard.name + ".*truncated"):
        module("coco", bad, "litdata")
    shard.write_bytes(data.replace(b"\xff\xd8\xff", b"\x00\x00\x00", 1))  # same size, the first JPEG broken
    with pytest.raises(ShardError, match=shard.name + ".*SHA-256"):
        check_packed(bad, "coco", full=True)
    dm = module("coco", bad, "litdata")
    with pytest.raises(CorruptImageError, match="train2017 item 0 .*skip_corrupt"):
        dm.train_set[0]
    assert module("coco", bad, "litdata", skip_corrupt=True).train_set[0] is None
    shard.write_bytes(data)
    kept = bad / "annotations" / "instances_val2017.json"
    kept.write_text(kept.read_text().replace('"person"', '"persoN"'))
    with pytest.raises(ShardError, match="instances_val2017.json: differs"):
        check_packed(bad, "coco", full=True)
    (bad / "val2017" / "images.json").unlink()
    with pytest.raises(ShardError, match="val2017/images.json is missing"):
        module("coco", bad, "litdata")
    with pytest.raises(ShardError, match="'ade20k' dataset, expected 'coco'"):
        module("coco", packed["ade20k"][1], "litdata")
    ade = tmp_path / "ade_bad"
    shutil.copytree(packed["ade20k"][1], ade)
    (ade / "validation" / "index.json").unlink()
    with pytest.raises(ShardError, match="validation/index.json is missing"):
        ADE20KDataModule(str(ade), format="litdata").setup("validate")


def test_packed_label_map_errors_name_the_item(packed, tmp_path):
    """A label map the folder reader would refuse (here: of the wrong size) is refused from the
    packed split too, naming the item and its file."""
    from vitlab.data.pack import main

    folder = tmp_path / "ade"
    shutil.copytree(packed["ade20k"][0], folder)
    label = sorted((folder / "annotations" / "validation").glob("*.png"))[1]
    Image.open(label).resize((20, 20)).save(label)
    main(["ade20k", "--root", str(folder), "--out", str(tmp_path / "packed"), "--shard-size", "16KB", "--workers", "1"])
    dm = module("ade20k", tmp_path / "packed", "litdata")
    with pytest.raises(Exception, match=f"validation item 1 \\({label.stem} label map\\): label map is 20x20"):
        dm.val_set[1]


def evaluations_through_both_formats(run: Path, tmp_path: Path, eval_run) -> tuple[dict, dict]:
    """eval.py on a dense smoke run's checkpoint, once over the generated folder layout and once over
    the same data packed (``+overrides.data.format=litdata``): the ``val/*`` results of each."""
    ckpt = run / "checkpoints" / "last.ckpt"
    common = ("trainer.accelerator=cpu", "trainer.enable_progress_bar=false")
    folder = eval_run(tmp_path / "folder", ckpt, *common)
    packed = eval_run(tmp_path / "packed", ckpt, *common, "+overrides.data.format=litdata")
    assert (run.parent / "data_litdata" / "vitlab_pack.json").exists()  # it read the packed copy
    return ({k: v for k, v in folder.items() if k.startswith("val/")},
            {k: v for k, v in packed.items() if k.startswith("val/")})


def test_detection_evaluation_equal_through_both_formats(detection_run, tmp_path, eval_run):
    """Box and mask AP / AR and the validation losses (which read every target field: boxes,
    labels, masks) are equal through both formats."""
    folder, packed = evaluations_through_both_formats(detection_run, tmp_path, eval_run)
    assert {"val/map", "val/mask_map", "val/loss_mask", "val/loss_box_reg"} <= folder.keys()
    assert packed == folder and folder["val/loss_mask"] > 0


def test_segmentation_evaluation_equal_through_both_formats(segmentation_run, tmp_path, eval_run):
    folder, packed = evaluations_through_both_formats(segmentation_run, tmp_path, eval_run)
    assert "val/miou" in folder and packed == folder and folder["val/miou"] > 0


def test_clip_boxes_needs_a_pack_that_clipped(packed, tmp_path):
    """Boxes are checked (and clipped or not) when packing: data.clip_boxes=true on a pack made
    without --clip-boxes stops, saying how to re-pack; on one made with it, it reads."""
    from vitlab.data.coco import AnnotationError
    from vitlab.data.pack import main

    folder, out = packed["coco"]
    with pytest.raises(AnnotationError, match=r"data.clip_boxes=true: .* packed without --clip-boxes.*--clip-boxes"):
        module("coco", out, "litdata", clip_boxes=True)
    clipped = tmp_path / "coco_clipped"
    main(["coco", "--root", str(folder), "--out", str(clipped), "--shard-size", "16KB", "--workers", "1", "--clip-boxes"])
    assert len(module("coco", clipped, "litdata", clip_boxes=True).val_set) == 7
