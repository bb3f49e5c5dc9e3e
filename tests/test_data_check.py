"""Dataset pre-flight: broken copies of small generated datasets, every problem kind counted in one
pass, the run-start ``preflight()`` (stop, skip, none) and ``python -m vitlab.tools.check_data`` as typed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import run_script
from vitlab.data import report as kinds
from vitlab.data.ade20k import ADE20KDataModule, ADE20KDataset
from vitlab.data.base import MissingFileError
from vitlab.data.coco import CocoDataModule, CocoDetectionDataset
from vitlab.data.imagenet import ImageNetDataModule
from vitlab.data.report import DataCheckError
from vitlab.data.synthetic import make_imagenet
from vitlab.data.synthetic_dense import make_ade20k, make_coco

COCO_TRAIN, COCO_VAL = 12, 6
ADE_TRAIN, ADE_VAL = 6, 4


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("generated")
    return {
        "coco": make_coco(base / "coco", num_train=COCO_TRAIN, num_val=COCO_VAL, size=64),
        "ade20k": make_ade20k(base / "ade", num_train=ADE_TRAIN, num_val=ADE_VAL, size=64) / "ADEChallengeData2016",
        "imagenet": make_imagenet(base / "in", num_classes=3, num_train=4, num_val=2, size=32),
    }


def copy_of(generated, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(generated[name], tmp_path / name))


def counts(report) -> dict[str, int]:
    return {kind: len(v) for kind, v in {**report.problems, **report.warnings}.items()}


def garbage(path: Path) -> None:
    path.write_bytes(b"not an image at all")


def truncate(path: Path) -> None:
    """Keep the header (its size still reads) but cut the pixel data: only decoding notices."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


# ---- generated data passes --------------------------------------------------------------
@pytest.mark.parametrize("full", [False, True])
def test_generated_data_passes(generated, full):
    modules = [
        CocoDataModule(root=str(generated["coco"]), with_masks=True, num_workers=2),
        ADE20KDataModule(root=str(generated["ade20k"]), num_workers=2),
        ImageNetDataModule(root=str(generated["imagenet"]), num_workers=2),
    ]
    for dm in modules:
        report = dm.check(full=full)
        assert report.ok and not report.warnings, report.summary()
        assert dm.preflight().ok  # the run-start check passes (it would raise otherwise)
    checked = "\n".join(modules[0].check().checked)
    assert f"{COCO_TRAIN} images" in checked and f"{COCO_VAL} images" in checked
    assert modules[1].check().checked == [f"training: {ADE_TRAIN} images, {ADE_TRAIN} label maps",
                                          f"validation: {ADE_VAL} images, {ADE_VAL} label maps"]
    assert modules[2].check().checked == ["train/: 3 class folders, 12 images", "val/: 3 class folders, 6 images"]


# ---- COCO ----------------------------------------------------------------------------------
def break_coco(root: Path) -> tuple[dict[str, int], set[int]]:
    """One copy with every COCO problem kind: the expected count of each, and the ids of the train
    images that cannot be read as listed (missing, undecodable, truncated, of another size)."""
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    images, anns = data["images"], data["annotations"]
    for info in images[:2]:
        (root / "train2017" / info["file_name"]).unlink()
    garbage(root / "train2017" / images[2]["file_name"])
    truncate(root / "train2017" / images[3]["file_name"])
    images[4]["width"] += 10
    on_ok_images = [a for a in anns if a["image_id"] not in {i["id"] for i in images[:5]}]
    on_ok_images[0]["category_id"] = on_ok_images[1]["category_id"] = 12  # not a COCO category id
    on_ok_images[2]["image_id"] = 999
    w = next(i["width"] for i in images if i["id"] == on_ok_images[3]["image_id"])
    on_ok_images[3]["bbox"] = [w - 5.0, 1.0, 30.0, 10.0]
    on_ok_images[4]["bbox"][2] = 0.0
    on_ok_images[5]["bbox"][3] = 0.0
    path.write_text(json.dumps(data))
    expected = {kinds.MISSING: 2, kinds.UNDECODABLE: 1, kinds.SIZE_MISMATCH: 1, kinds.UNKNOWN_CATEGORY: 2,
                kinds.UNKNOWN_IMAGE: 1, kinds.BOX_OUTSIDE: 1, kinds.ZERO_AREA_BOX: 2}
    return expected, {i["id"] for i in images[:5]}


def test_coco_every_problem_counted_in_one_pass(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path)
    expected, _ = break_coco(root)
    dm = CocoDataModule(root=str(root), num_workers=2)
    assert counts(dm.check()) == expected
    # decoding everything also finds the truncated image, whose header was fine
    assert counts(dm.check(full=True)) == {**expected, kinds.UNDECODABLE: 2}
    summary = dm.check().summary()
    assert "missing file: 2" in summary and "unknown category id: 2" in summary
    assert "but not on disk" in summary and "category_id 12 is not one of the 80" in summary
    assert kinds.ZERO_AREA_BOX in dm.check().warnings  # a warning, not a problem


def test_coco_preflight_stops_or_skips(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path)
    _, unreadable = break_coco(root)
    with pytest.raises(DataCheckError, match=r"(?s)missing file: 2.*unknown category id: 2.*skip_corrupt=true"):
        CocoDataModule(root=str(root), num_workers=0).preflight()
    assert CocoDataModule(root=str(root), verify="none").preflight() is None
    dm = CocoDataModule(root=str(root), num_workers=0, skip_corrupt=True, train_scales=[64], max_size=100)
    with pytest.warns(UserWarning, match="missing file: 2"):
        dm.preflight()
    with pytest.warns(UserWarning):
        dm.setup("fit")
    train = dm.train_set
    # the invalid annotations are left out, the images that cannot be read are skipped (None)
    assert not any(a["category_id"] == 12 or a["image_id"] == 999 for a in train.coco.dataset["annotations"])
    with pytest.warns(UserWarning, match="file is missing"):
        skipped = {train.ids[i] for i in range(len(train)) if train[i] is None}
    assert skipped == unreadable & set(train.ids) and skipped


def test_coco_zero_area_boxes_are_counted_warned_and_not_learned(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    target = next(a for a in data["annotations"] if not a["iscrowd"])
    target["bbox"][2] = 0.0  # zero width, as annotation 918 of the real COCO train2017
    path.write_text(json.dumps(data))
    dm = CocoDataModule(root=str(root), num_workers=0, train_scales=[64], max_size=100)
    with pytest.warns(UserWarning, match=r"zero-area box .*: 1\n.*annotation id {}".format(target["id"])):
        report = dm.preflight()  # a warning: the run goes on
    assert report.ok
    with pytest.warns(UserWarning, match="zero-area box"):
        dm.setup("fit")
    index = dm.train_set.ids.index(target["image_id"])
    non_crowd = [a for a in data["annotations"] if a["image_id"] == target["image_id"] and not a["iscrowd"]]
    _, item = dm.train_set[index]
    assert len(item["labels"]) == len(non_crowd) - 1


def test_coco_malformed_boxes_and_segmentations(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    anns = data["annotations"]
    anns[0]["bbox"] = [1.0, 2.0, -3.0, 4.0]
    anns[1]["bbox"] = "oops"
    del anns[2]["segmentation"]
    anns[3]["segmentation"] = [[1, 2, 3]]                          # not a polygon: only decoding tells
    anns[4]["segmentation"] = {"counts": [100], "size": [10, 10]}  # an RLE of another size
    path.write_text(json.dumps(data))
    dm = CocoDataModule(root=str(root), num_workers=0, with_masks=True)
    assert counts(dm.check()) == {kinds.BAD_BOX: 2, kinds.BAD_SEGMENTATION: 1}
    assert counts(dm.check(full=True)) == {kinds.BAD_BOX: 2, kinds.BAD_SEGMENTATION: 3}
    assert "segmentation is 10x10, its image" in dm.check(full=True).summary()


def test_coco_missing_image_is_missing_not_undecodable(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path)
    ds = CocoDetectionDataset(root / "val2017", root / "annotations/instances_val2017.json", lambda x: x,
                              train=False, with_masks=False)
    (root / "val2017" / ds.coco.imgs[ds.ids[0]]["file_name"]).unlink()
    with pytest.raises(MissingFileError, match=r"\.jpg: file is missing\. Set data.skip_corrupt=true"):
        ds[0]


def test_coco_unreadable_json_and_category_mismatch_cannot_be_skipped(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path)
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:-1]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 90]
    path.write_text(json.dumps(data))
    dm = CocoDataModule(root=str(root), num_workers=0, skip_corrupt=True)
    assert counts(dm.check()) == {kinds.CATEGORIES_DIFFER: 1}
    with pytest.raises(DataCheckError, match=r"train and val categories differ: 1(?s:.*)Fix the data\.$"):
        dm.preflight()
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    assert counts(dm.check()) == {kinds.BAD_ANNOTATION_FILE: 1}
    path.write_text(json.dumps({**data, "images": [], "annotations": []}))
    assert counts(dm.check()) == {kinds.BAD_ANNOTATION_FILE: 1, kinds.EMPTY: 1}


# ---- ADE20K --------------------------------------------------------------------------------
def edit_label(path: Path, change) -> None:
    label = np.asarray(Image.open(path)).copy()
    Image.fromarray(change(label)).save(path)


def set_pixel(value):
    def change(label):
        label[0, 0] = value
        return label
    return change


def break_ade(base: Path) -> None:
    labels = sorted((base / "annotations" / "training").glob("*.png"))
    images = sorted((base / "images" / "training").glob("*.jpg"))
    labels[0].unlink()                                          # missing label map
    edit_label(labels[1], lambda lab: lab[:-3])                 # 3 rows short
    edit_label(labels[2], set_pixel(200))                       # class id 200 of 150
    Image.open(labels[3]).convert("RGB").save(labels[3])        # colour, not class ids
    garbage(images[4])                                          # undecodable image
    edit_label(sorted((base / "annotations" / "validation").glob("*.png"))[0], set_pixel(255))  # ignored: fine


def test_ade20k_every_problem_counted_in_one_pass(generated, tmp_path):
    base = copy_of(generated, "ade20k", tmp_path)
    break_ade(base)
    dm = ADE20KDataModule(root=str(base), num_workers=2)
    cheap = {kinds.MISSING: 1, kinds.LABEL_SIZE: 1, kinds.LABEL_FORMAT: 1, kinds.UNDECODABLE: 1}
    assert counts(dm.check()) == cheap
    assert counts(dm.check(full=True)) == {**cheap, kinds.LABEL_IDS: 1}  # ids need the pixels
    assert "class ids [200] out of range (0 = other (ignored), 1..150, 255 = ignored)" in dm.check(True).summary()


def test_ade20k_ignore_value_255_is_accepted_and_ignored(generated, tmp_path):
    base = copy_of(generated, "ade20k", tmp_path)
    label_path = sorted((base / "annotations" / "validation").glob("*.png"))[0]
    edit_label(label_path, set_pixel(255))
    dm = ADE20KDataModule(root=str(base), num_workers=0, img_scale=[128, 32], crop_size=[32, 32],
                          test_scale=[128, 32])
    assert dm.check(full=True).ok
    dm.setup("validate")
    _, label, _ = dm.val_set[0]
    assert dm.val_set.images[0].stem == label_path.stem
    assert label[0, 0] == 255  # still ignored, not class 254


def test_ade20k_skip_leaves_bad_pairs_out(generated, tmp_path):
    base = copy_of(generated, "ade20k", tmp_path)
    break_ade(base)
    with pytest.raises(DataCheckError, match="label map of the wrong size: 1"):
        ADE20KDataModule(root=str(base), num_workers=0).preflight()
    with pytest.warns(UserWarning, match="no label map"):
        ds = ADE20KDataset(base, "training", transform=lambda x, y: (x, y), train=True, skip_corrupt=True)
    assert len(ds) == ADE_TRAIN - 1
    with pytest.warns(UserWarning, match="skipping"):
        items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 4  # wrong size, id 200, RGB label, undecodable image


# ---- ImageNet -----------------------------------------------------------------------------
def test_imagenet_problems_and_a_cheap_check_that_opens_no_file(generated, tmp_path, monkeypatch):
    root = copy_of(generated, "imagenet", tmp_path)
    first = sorted((root / "train").iterdir())[0]
    for f in first.iterdir():
        f.unlink()                                           # a class folder without images
    second = sorted((root / "val").iterdir())[1]
    garbage(next(second.iterdir()))                           # undecodable
    (second / "notes.txt").write_text("not an image")         # ignored by ImageFolder, as here
    dm = ImageNetDataModule(root=str(root), num_workers=2)

    def no_open(*args, **kwargs):
        raise AssertionError("the cheap check opened a file")

    with monkeypatch.context() as m:  # listings only: fast on 1.28M files
        m.setattr(Image, "open", no_open)
        m.setattr("builtins.open", no_open)
        cheap = dm.check()
    assert counts(cheap) == {kinds.EMPTY: 1, kinds.IGNORED_FILE: 1}
    assert counts(dm.check(full=True)) == {kinds.EMPTY: 1, kinds.IGNORED_FILE: 1, kinds.UNDECODABLE: 1}


# ---- run start and the command line -------------------------------------------------------
def test_verify_value_is_checked():
    with pytest.raises(ValueError, match=r"data.verify='fast': expected one of cheap, full, none"):
        ImageNetDataModule(root="unused", verify="fast")


def test_cli_as_typed_from_another_directory(generated, tmp_path):
    root = copy_of(generated, "coco", tmp_path / "work")
    break_coco(root)
    proc = run_script("-m", ["vitlab.tools.check_data", "task=coco_retinanet", "data.root=coco", "data.verify=full"],
                      None, cwd=tmp_path / "work", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith(f"COCO at coco (full: every image decoded)\n  train2017: {COCO_TRAIN} images")
    for line in ("9 problems:", "missing file: 2", "undecodable file: 2",
                 "image size differs from its annotation: 1", "unknown category id: 2",
                 "annotation of an unknown image id: 1", "box outside its image: 1", "2 warnings:",
                 "zero-area box (left out of training targets): 2"):
        assert line in out, out
    assert "creating index" not in out  # pycocotools' prints do not mix into the report
