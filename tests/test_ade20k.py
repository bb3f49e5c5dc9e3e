"""ADE20K: generated data, the mmseg-style pipeline, bad input, mIoU, inference modes, a short fit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitlab.api import backbone_config
from vitlab.data.ade20k import (
    IGNORE_INDEX, ADE20KDataModule, ADE20KDataset, CatMaxRandomCrop, LabelMapError,
)
from vitlab.data.base import DatasetInfo, DatasetLayoutError, SegmentationBatch
from vitlab.data.synthetic_dense import ADE_BACKGROUNDS, ADE_OBJECTS, make_ade20k
from vitlab.tasks.segmentation import SegmentationTask, iou_from_confmat

TINY = ["depths=[1,1,1,1]", "embed_dims=[16,32,48,64]", "num_heads=[1,1,2,2]", "drop_path_rate=0.0"]
SCHEDULE = {"optimizer": {"lr": 1e-3, "weight_decay": 1e-4}, "base_batch_size": 2, "epochs": None,
            "lr_policy": {"name": "poly", "power": 0.9}}


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory) -> Path:
    return make_ade20k(tmp_path_factory.mktemp("ade"), seed=0, num_train=12, num_val=6, size=96)


def datamodule(root, **kw) -> ADE20KDataModule:
    args = dict(root=str(root), batch_size=2, num_workers=0, img_scale=[256, 64], crop_size=[64, 64],
                test_scale=[256, 64])
    args.update(kw)
    dm = ADE20KDataModule(**args)
    dm.setup("fit")
    return dm


def ade_info(num_classes: int = 150) -> DatasetInfo:
    return ADE20KDataModule(root="unused", num_classes=num_classes, crop_size=[64, 64]).info


def task(head: str = "SemanticFPNHead", num_classes: int = 150, **kw) -> SegmentationTask:
    return SegmentationTask(backbone_config("pvt_v2_b0", TINY), SCHEDULE, ade_info(num_classes), num_vis_images=0,
                            head={"_target_": f"vitlab.heads.segmentation.{head}"}, **kw)


def test_generated_layout_and_labels(ade_root):
    base = ade_root / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", 12), ("validation", "ADE_val", 6)):
        images = sorted((base / "images" / split).glob("*.jpg"))
        assert len(images) == n and images[0].name == f"{prefix}_00000001.jpg"
        for img in images:
            label = Image.open(base / "annotations" / split / f"{img.stem}.png")
            assert label.mode == "L" and label.size == Image.open(img).size
            assert set(np.unique(np.asarray(label))) <= {0, *ADE_BACKGROUNDS, *ADE_OBJECTS}


def test_generator_is_deterministic(tmp_path):
    a = make_ade20k(tmp_path / "a", seed=5, num_train=2, num_val=1, size=48)
    b = make_ade20k(tmp_path / "b", seed=5, num_train=2, num_val=1, size=48)
    rel = "ADEChallengeData2016/annotations/training/ADE_train_00000002.png"
    assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_reduce_zero_label_and_pipeline(ade_root):
    dm = datamodule(ade_root)
    raw = np.asarray(Image.open(dm.val_set.label_dir / f"{dm.val_set.images[0].stem}.png")).astype(np.int64)
    image, label, name = dm.val_set[0]
    assert label.shape == raw.shape  # validation labels keep the original size
    expected = np.where(raw == 0, IGNORE_INDEX, raw - 1)
    assert (label.numpy() == expected).all()
    assert min(image.shape[-2:]) == 64  # resized into the test scale
    images, labels, names, skipped = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64) and skipped.item() == 0
    assert set(labels.unique().tolist()) <= {IGNORE_INDEX, *(c - 1 for c in (*ADE_BACKGROUNDS, *ADE_OBJECTS))}


def test_cat_max_ratio_crop_avoids_one_class_crops():
    torch.manual_seed(0)
    label = torch.zeros(100, 100, dtype=torch.int64)
    label[:, 80:] = 1  # class 0 covers 80% of the image
    crop = CatMaxRandomCrop((20, 20), cat_max_ratio=0.75)
    hits = sum(len(crop(torch.zeros(3, 100, 100), label)[1].unique()) > 1 for _ in range(50))
    plain = CatMaxRandomCrop((20, 20), cat_max_ratio=1.0)
    plain_hits = sum(len(plain(torch.zeros(3, 100, 100), label)[1].unique()) > 1 for _ in range(50))
    assert hits > plain_hits  # the criterion finds mixed crops far more often than chance


def _break(ade_root: Path, tmp_path: Path, change) -> ADE20KDataset:
    base = tmp_path / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (base / kind / "validation").mkdir(parents=True)
    src = ade_root / "ADEChallengeData2016"
    Image.open(src / "images/validation/ADE_val_00000001.jpg").save(base / "images/validation/ADE_val_00000001.jpg")
    label = np.asarray(Image.open(src / "annotations/validation/ADE_val_00000001.png"))
    Image.fromarray(change(label.copy())).save(base / "annotations/validation/ADE_val_00000001.png")
    return ADE20KDataset(base, "validation", transform=lambda x: x, train=False)


def test_bad_input_label_size_and_class_ids(ade_root, tmp_path):
    ds = _break(ade_root, tmp_path / "a", lambda lab: lab[:-3])
    with pytest.raises(LabelMapError, match=r"ADE_val_00000001.png: label map is \d+x\d+ but its image is"):
        ds[0]
    def out_of_range(lab):
        lab[0, 0] = 200
        return lab
    ds = _break(ade_root, tmp_path / "b", out_of_range)
    with pytest.raises(LabelMapError, match=r"ADE_val_00000001.png: class ids \[200\] out of range"):
        ds[0]


def test_missing_label_map_and_layout(ade_root, tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    (base / "images/validation").mkdir(parents=True)
    (base / "annotations/validation").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(base / "images/validation/x.jpg")
    with pytest.raises(DatasetLayoutError, match="x.jpg: no label map"):
        ADE20KDataset(base, "validation", None, train=False)
    with pytest.raises(DatasetLayoutError, match="annotations/training"):
        ADE20KDataModule(root=str(tmp_path / "empty"), num_workers=0).setup("fit")


def test_miou_perfect_and_constant_prediction():
    t = task(num_classes=5)
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 2, IGNORE_INDEX]])
    t.confmat.update(label.flatten(), label.flatten())
    iou, acc = iou_from_confmat(t.confmat.compute())
    assert float(iou.nanmean()) == 1.0 and float(acc) == 1.0
    assert iou[3:].isnan().all()  # classes in neither prediction nor label are left out of the mean
    t.confmat.reset()
    t.confmat.update(torch.full((8,), 2), label.flatten())  # always class 2
    iou, acc = iou_from_confmat(t.confmat.compute())
    # 7 valid pixels: class 2 has 3 -> IoU(2) = 3/7, IoU(0) = IoU(1) = 0; mean over the 3 present classes
    assert float(iou.nanmean()) == pytest.approx((3 / 7) / 3)
    assert float(acc) == pytest.approx(3 / 7)


class PointwiseModel(nn.Module):
    """A 1x1 conv 'segmentor': its logits at a pixel depend on that pixel only."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


def test_slide_inference_matches_whole_for_a_pointwise_model():
    t = task(num_classes=6, test_mode="slide", crop_size=[24, 24], stride=[16, 16], size_divisor=1)
    t.model = PointwiseModel(6)
    t.eval()
    image = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        assert torch.allclose(t.predict_slide(image), t.predict_whole(image), atol=1e-5)
        t.tta_scales, t.tta_flip = [1.0], True  # flip TTA of a pointwise model changes nothing
        ref = t.predict_whole(image).softmax(1)
        assert torch.allclose(t.inference(image, (50, 70)), ref, atol=1e-5)
        t.tta_scales = [0.5, 1.0, 1.5]
        assert t.inference(image, (50, 70)).shape == (1, 6, 50, 70)


def test_validation_loss_is_the_cross_entropy_per_labelled_pixel():
    """val/loss over images of different sizes, with ignored pixels, against torch's cross-entropy
    summed over all labelled pixels of the set."""
    t = task(num_classes=6, size_divisor=1)
    t.model = PointwiseModel(6)
    t.eval()
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 20, 30, generator=g), torch.randn(3, 16, 12, generator=g)]
    labels = [torch.randint(0, 6, im.shape[-2:], generator=g) for im in images]
    labels[0][:5] = IGNORE_INDEX
    with torch.no_grad():
        t.validation_step(SegmentationBatch(images, labels, ["a", "b"], torch.tensor(0)), 0)
        total = sum(F.cross_entropy(t.model(im[None]), lab[None], ignore_index=IGNORE_INDEX, reduction="sum")
                    for im, lab in zip(images, labels))
    pixels = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels)
    assert float(t.val_loss.compute()) == pytest.approx(float(total) / pixels, rel=1e-5)


def test_tta_config_group():
    from hydra import compose, initialize_config_dir

    from vitlab.runtime.resources import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["task=ade20k_upernet", "schedule=160k", "tta=ms_flip"])
    assert cfg.module.tta.scales == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg.module.tta.flip
    assert cfg.module.auxiliary_head.in_index == 2 and cfg.schedule.lr_policy.power == 1.0


def test_segmentation_task_fits_and_reports_per_class_iou(ade_root, tmp_path):
    import lightning as L

    torch.manual_seed(0)  # "flag" is absent from the predictions of this seed's model (any test order)
    dm = datamodule(ade_root)
    t = SegmentationTask(backbone_config("pvt_v2_b0", TINY), SCHEDULE, dm.info, num_vis_images=2,
                         head={"_target_": "vitlab.heads.segmentation.UperNetHead", "channels": 32},
                         auxiliary_head={"_target_": "vitlab.heads.segmentation.FCNHead", "channels": 16})
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(t, datamodule=dm)
    assert {"val/miou", "val/acc", "val/loss", "train/loss_aux"} <= set(trainer.callback_metrics)
    per_class = t.extra_summary()["per_class_iou"]
    assert len(per_class) == 150 and "wall" in per_class and per_class["flag"] is None
    assert len(list((tmp_path / "predictions" / "epoch_000").glob("*.png"))) == 2
