"""COCO: the generated data, the DataModule, bad input, the metric and the results JSON.

Checked against pycocotools (the reference reader and evaluator), not against ourselves.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes
from torchvision.models.detection.transform import resize_boxes

from vitlab.api import backbone_config
from vitlab.data.base import DatasetLayoutError, DetectionBatch
from vitlab.data.coco import AnnotationError, CocoDataModule, CocoDetectionDataset, load_coco_json
from vitlab.data.synthetic_dense import make_coco
from vitlab.tasks import coco_masks

TINY = ["depths=[1,1,1,1]", "embed_dims=[16,32,48,64]", "num_heads=[1,1,2,2]", "drop_path_rate=0.0"]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"), seed=0, num_train=24, num_val=10, size=96)


def datamodule(root, **kw) -> CocoDataModule:
    args = dict(root=str(root), batch_size=4, num_workers=0, train_scales=[96], test_scale=96, max_size=160,
                with_masks=True)
    args.update(kw)
    dm = CocoDataModule(**args)
    dm.setup("fit")
    return dm


def test_generated_json_is_real_coco(coco_root):
    coco = COCO(str(coco_root / "annotations" / "instances_train2017.json"))
    assert len(coco.cats) == 80 and sorted(coco.cats)[-1] == 90  # COCO's ids, with its gaps
    anns = list(coco.anns.values())
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)  # uncompressed RLE
    assert any(isinstance(a["segmentation"], list) for a in anns)  # polygons
    assert any(isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str) for a in anns)
    assert any(not coco.getAnnIds(imgIds=i) for i in coco.imgs)  # images without annotations
    for a in anns:  # every mask decodes to the stated area, inside the stated box
        m = coco.annToMask(a)
        assert abs(int(m.sum()) - a["area"]) <= 1
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h


def test_generator_is_deterministic(tmp_path):
    a = make_coco(tmp_path / "a", seed=3, num_train=4, num_val=2, size=64)
    b = make_coco(tmp_path / "b", seed=3, num_train=4, num_val=2, size=64)
    for split in ("train", "val"):
        name = f"annotations/instances_{split}2017.json"
        assert (a / name).read_text() == (b / name).read_text()


def test_datamodule_pipeline(coco_root):
    dm = datamodule(coco_root)
    coco = dm.train_set.coco
    # training drops images with no (non-crowd) annotation; validation keeps every image
    assert len(dm.train_set) == sum(1 for i in coco.imgs if any(not a["iscrowd"] for a in coco.imgToAnns[i]))
    assert len(dm.val_set) == len(dm.val_set.coco.imgs)
    assert list(dm.info.category_ids) == sorted(coco.cats) and dm.info.class_names[0] == "person"
    for index in range(len(dm.train_set)):
        image, target = dm.train_set[index]
        image_id = dm.train_set.ids[index]
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        assert min(image.shape[-2:]) == 96 or max(image.shape[-2:]) == 160
        assert len(target["labels"]) == len(anns)  # crowd regions removed
        assert sorted(dm.info.category_ids[int(l)] for l in target["labels"]) == sorted(a["category_id"] for a in anns)
        assert target["masks"].shape == (len(anns), *image.shape[-2:])
    # validation: original coordinates, crowd kept and flagged
    crowd_seen = False
    for index in range(len(dm.val_set)):
        image, target = dm.val_set[index]
        anns = dm.val_set.coco.imgToAnns.get(dm.val_set.ids[index], [])
        assert len(target["boxes"]) == len(anns)
        assert tuple(target["masks"].shape[-2:]) == target["orig_size"]
        crowd_seen |= bool(target["iscrowd"].any())
    assert crowd_seen


def test_aspect_ratio_grouped_batches(coco_root):
    dm = datamodule(coco_root, batch_size=2)
    groups = dm.train_set.aspect_groups()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    seen = 0
    for batch in loader.sampler._batches():
        assert len({groups[i] for i in batch}) == 1
        seen += len(batch)
    assert seen == len(loader.sampler) >= len(dm.train_set)
    images, targets, skipped = next(iter(loader))
    assert len(images) == 2 and skipped.item() == 0


def _write_variant(root: Path, tmp_path: Path, edit) -> Path:
    """A copy of the generated val JSON with one edit, as the train and val file of a new root."""
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    edit(data)
    new = tmp_path / "coco"
    (new / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (new / split).symlink_to(root / "val2017")
        (new / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return new


def test_bad_input_malformed_json(tmp_path):
    path = tmp_path / "instances_val2017.json"
    path.write_text('{"images": [')
    with pytest.raises(AnnotationError, match="instances_val2017.json: not valid JSON"):
        load_coco_json(path)
    path.write_text('{"images": [], "annotations": [{"id": 1}], "categories": []}')
    with pytest.raises(AnnotationError, match=r"annotations\[0\] needs"):
        load_coco_json(path)


def test_bad_input_box_outside_image(coco_root, tmp_path):
    def edit(data):
        ann = data["annotations"][0]
        img = next(i for i in data["images"] if i["id"] == ann["image_id"])
        ann["bbox"] = [img["width"] - 5.0, 2.0, 40.0, 10.0]
        ann["id"] = 4242

    root = _write_variant(coco_root, tmp_path, edit)
    ann = root / "annotations" / "instances_val2017.json"
    with pytest.raises(AnnotationError, match=r"instances_val2017.json: annotation id 4242 .*outside"):
        CocoDetectionDataset(root / "val2017", ann, None, train=False, with_masks=False)
    with pytest.warns(UserWarning, match=r"box clipped to its image .*: 1\n"):
        ds = CocoDetectionDataset(root / "val2017", ann, None, train=False, with_masks=False, clip_boxes=True)
    assert ds.num_clipped == 1
    x, y, w, h = ds.coco.anns[4242]["bbox"]
    assert x + w <= ds.coco.imgs[ds.coco.anns[4242]["image_id"]]["width"]


def test_bad_input_unknown_category_and_image_size(coco_root, tmp_path):
    def unknown_category(data):
        data["annotations"][0]["category_id"] = 12  # not a COCO category id
        data["annotations"][0]["id"] = 77

    root = _write_variant(coco_root, tmp_path / "a", unknown_category)
    with pytest.raises(AnnotationError, match="annotation id 77 .*category_id 12 is not one of the 80"):
        CocoDetectionDataset(root / "val2017", root / "annotations/instances_val2017.json", None, False, False)

    def wrong_size(data):
        data["images"][0]["width"] += 10

    root = _write_variant(coco_root, tmp_path / "b", wrong_size)
    ds = CocoDetectionDataset(root / "val2017", root / "annotations/instances_val2017.json", lambda x: x,
                              train=False, with_masks=False, clip_boxes=True)
    with pytest.raises(AnnotationError, match="but the JSON says"):
        ds[ds.ids.index(ds.coco.dataset["images"][0]["id"])]


def test_missing_dataset_names_the_layout(tmp_path):
    dm = CocoDataModule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(DatasetLayoutError, match="train2017"):
        dm.setup("fit")


@pytest.mark.parametrize("paste_workers", [0, 2])
def test_ground_truth_as_predictions_scores_ap_1(paste_workers, coco_root, tmp_path, monkeypatch):
    """Through DetectionTask.validation_step (resize back, paste the RoI masks, encode: in the loop, or
    by ``module.paste_workers`` processes from the first image) and the results JSON: box AP 1; the
    masks are byte-equal to pycocotools' encoding of torchvision's paste at the original size, and
    their AP equals pycocotools' COCOeval of the JSON."""
    from vitlab.tasks.detection import DetectionTask

    dm = datamodule(coco_root, test_scale=128, max_size=200)  # validation images are upscaled
    schedule = {"optimizer": {"lr": 1e-4}, "lr_policy": {"name": "multistep", "milestones": [1]}}
    head = {"_target_": "vitlab.heads.detection.MaskRCNNDetector", "fpn_channels": 32}
    task = DetectionTask(backbone_config("pvt_v2_b0", TINY), schedule, dm.info, head=head, num_vis_images=0,
                         val_loss=False, paste_workers=paste_workers)  # the stand-in forward below only detects
    task.val_coco._paster.inline_first = 0
    # forked, as from a training process without other threads (a suite's process keeps some; forkserver's
    # start is test_eval_cost's)
    monkeypatch.setattr(coco_masks, "threading", SimpleNamespace(active_count=lambda: 1))
    expected_masks = []  # torchvision's paste at the original size, pycocotools' encoding

    def oracle(images, targets):  # masks as Mask R-CNN's RoI masks: its training targets, at 112 x 112
        dets = []
        for image, t in zip(images, targets):
            keep = t["iscrowd"] == 0
            size = image.shape[-2:]
            masks = F.interpolate(t["masks"][keep].float()[:, None], size=size, mode="nearest")[:, 0]
            boxes = resize_boxes(t["boxes"][keep].as_subclass(torch.Tensor), t["orig_size"], size)
            roi = project_masks_on_boxes(masks, boxes, torch.arange(len(boxes)), 112)[:, None]
            dets.append({"boxes": boxes, "labels": t["labels"][keep], "scores": torch.ones(int(keep.sum())), "masks": roi})
            orig = tuple(int(v) for v in t["orig_size"])
            pasted = paste_masks_in_image(roi, resize_boxes(boxes, size, orig), orig)[:, 0] > 0.5
            expected_masks.extend(mask_utils.encode(np.asfortranarray(pasted.numpy().transpose(1, 2, 0).astype(np.uint8))))
        return dets

    task.on_validation_epoch_start()
    for batch in dm.val_dataloader():
        images, targets, _ = batch
        task.model.forward = lambda ims, t=targets: oracle(ims, t)  # ground truth in, as detections
        task.validation_step(batch, 0)
    pasted_by_processes = task.val_coco._paster._pool is not None
    result = task.val_coco.compute()
    assert pasted_by_processes == (paste_workers > 0) and task.val_coco._paster._pool is None
    assert float(result["bbox_map"]) == pytest.approx(1.0)
    assert [r["segmentation"]["counts"] for r in task.results] == [m["counts"].decode() for m in expected_masks]
    assert float(result["segm_map"]) > 0.6  # small objects: 28 x 28-like RoI masks lose some pixels
    # the results JSON: original category ids, xywh boxes, RLE masks -> pycocotools' own evaluation
    path = task.write_results(tmp_path / "results.json")
    gt = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    res = gt.loadRes(str(path))
    assert {r["category_id"] for r in json.loads(path.read_text())} <= set(gt.cats)
    for iou_type in ("bbox", "segm"):
        ev = COCOeval(gt, res, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(result[f"{iou_type}_map"], abs=1e-4)


def test_images_leave_the_workers_as_uint8_and_reach_the_model_in_0_1(coco_root):
    """A worker hands over uint8 images (a quarter of float32's bytes); the DataModule's after-transfer
    hook gives the model what torchvision's ToDtype(float32, scale=True) gave in the workers before;
    predict.py's transform (no transfer hook) scales itself."""
    dm = datamodule(coco_root, num_workers=1)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert batch.images and all(im.dtype == torch.uint8 for im in batch.images)
        moved = dm.on_after_batch_transfer(batch, 0)
        assert moved.targets is batch.targets
        for raw, image in zip(batch.images, moved.images):
            assert image.dtype == torch.float32 and image.shape == raw.shape
            torch.testing.assert_close(image, raw.double().div(255).float(), atol=1e-7, rtol=0)
    image = dm.eval_image_transform()(Image.new("RGB", (40, 30), (255, 0, 51)))
    assert image.dtype == torch.float32 and image[:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])


def test_validation_loss_on_images_without_objects(coco_root):
    """Mask R-CNN's validation with ``val_loss`` on an image without annotations (COCO val has 48) and
    one with only a crowd region: the loss terms are finite, and the images are evaluated (their
    detections count as false positives). ``F.interpolate`` of the empty mask stack used to raise."""
    from vitlab.tasks.detection import DetectionTask

    dm = datamodule(coco_root)
    schedule = {"optimizer": {"lr": 1e-4}, "lr_policy": {"name": "multistep", "milestones": [1]}}
    head = {"_target_": "vitlab.heads.detection.MaskRCNNDetector", "fpn_channels": 16}
    task = DetectionTask(backbone_config("pvt_v2_b0", TINY), schedule, dm.info, head=head, num_vis_images=0)
    batches = iter(dm.val_dataloader())
    (image_a, *_), (target_a, *_), skipped = next(batches)
    (image_b, *_), (target_b, *_), _ = next(batches)
    empty, crowd = dict(target_a), dict(target_b)
    for key in ("boxes", "labels", "iscrowd", "area", "masks"):
        empty[key] = empty[key][:0]
        crowd[key] = crowd[key][:1]
    crowd["iscrowd"] = torch.ones_like(crowd["iscrowd"])
    task.eval()
    task.on_validation_epoch_start()
    with torch.no_grad():
        batch = dm.on_after_batch_transfer(DetectionBatch([image_a, image_b], [empty, crowd], skipped), 0)  # as Lightning
        task.validation_step(batch, 0)
    losses = {name: metric.compute() for name, metric in task.val_losses.items()}
    assert set(losses) == set(task.model.loss_names) and all(torch.isfinite(v) for v in losses.values())
    assert [im["id"] for im in task.val_coco.images] == [int(empty["image_id"]), int(crowd["image_id"])]


def test_per_class_ap_matches_pycocotools(coco_root, tmp_path):
    """Noisy detections (jittered boxes, random scores, some wrong labels) through the task: its
    per-class AP (read from CocoEvaluator's one evaluation) equals pycocotools' COCOeval restricted to each category,
    run on the results JSON against the original annotation file."""
    from vitlab.tasks.detection import DetectionTask

    dm = datamodule(coco_root, with_masks=False)
    schedule = {"optimizer": {"lr": 1e-4}, "lr_policy": {"name": "multistep", "milestones": [1]}}
    head = {"_target_": "vitlab.heads.detection.RetinaNetDetector", "fpn_channels": 16}
    task = DetectionTask(backbone_config("pvt_v2_b0", TINY), schedule, dm.info, head=head, num_vis_images=0,
                         val_loss=False)
    g = torch.Generator().manual_seed(0)

    def noisy(images, targets):
        dets = []
        for image, t in zip(images, targets):
            boxes = resize_boxes(t["boxes"].as_subclass(torch.Tensor), t["orig_size"], image.shape[-2:])
            boxes = boxes + torch.randn(boxes.shape, generator=g) * 3
            labels = t["labels"].clone()
            wrong = torch.rand(len(labels), generator=g) < 0.3
            labels[wrong] = (labels[wrong] + 1) % 80
            dets.append({"boxes": boxes, "labels": labels, "scores": torch.rand(len(labels), generator=g)})
        return dets

    task.on_validation_epoch_start()
    for batch in dm.val_dataloader():
        task.model.forward = lambda ims, t=batch.targets: noisy(ims, t)
        task.validation_step(batch, 0)
    per_class = task.per_class_ap(task.val_coco.compute())["ap"]
    gt = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    res = gt.loadRes(str(task.write_results(tmp_path / "results.json")))
    checked = 0
    for label, cat in enumerate(dm.info.category_ids):
        name = dm.info.class_names[label]
        if not gt.getAnnIds(catIds=[cat]):
            assert per_class[name] is None, name  # no ground truth: no AP
            continue
        ev = COCOeval(gt, res, "bbox")
        ev.params.catIds = [cat]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert per_class[name] == pytest.approx(ev.stats[0] * 100, abs=0.01), name
        checked += 1
    assert checked >= 3 and len({v for v in per_class.values() if v is not None}) > 1  # several, not all equal


def test_a_random_detector_scores_near_zero(coco_root):
    """The metric is not trivially 1: shuffled labels on the true boxes score (almost) nothing."""
    from torchmetrics.detection import MeanAveragePrecision

    dm = datamodule(coco_root)
    metric = MeanAveragePrecision(backend="pycocotools", iou_type="bbox")
    g = torch.Generator().manual_seed(0)
    for index in range(len(dm.val_set)):
        _, t = dm.val_set[index]
        boxes = t["boxes"].as_subclass(torch.Tensor)
        labels = (t["labels"] + 1 + torch.randint(0, 78, t["labels"].shape, generator=g)) % 80  # always wrong
        metric.update([{"boxes": boxes, "labels": labels, "scores": torch.ones(len(boxes))}],
                      [{"boxes": boxes, "labels": t["labels"], "iscrowd": t["iscrowd"], "area": t["area"]}])
    assert float(metric.compute()["map"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("head", ["RetinaNetDetector", "MaskRCNNDetector"])
def test_detection_task_trains_and_validates(coco_root, head, tmp_path):
    import lightning as L

    from vitlab.tasks.detection import DetectionTask

    dm = CocoDataModule(root=str(coco_root), batch_size=2, num_workers=0, train_scales=[96], test_scale=96,
                        max_size=160, with_masks=head == "MaskRCNNDetector")
    schedule = {"optimizer": {"lr": 1e-4, "weight_decay": 1e-4}, "base_batch_size": 2,
                "lr_policy": {"name": "multistep", "milestones": [1], "warmup_iters": 1}, "epochs": 1}
    task = DetectionTask(backbone_config("pvt_v2_b0", TINY), schedule, dm.info, num_vis_images=2,
                         head={"_target_": f"vitlab.heads.detection.{head}", "fpn_channels": 32})
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    metrics = trainer.callback_metrics
    assert "val/map" in metrics and ("val/mask_map" in metrics) == (head == "MaskRCNNDetector")
    assert torch.isfinite(metrics["train/loss"])
    names = set(task.model.loss_names)
    assert {f"val/{n}" for n in names} <= set(metrics)
    assert float(metrics["val/loss"]) == pytest.approx(sum(float(metrics[f"val/{n}"]) for n in names), rel=1e-5)
    extra = task.extra_summary()
    assert set(extra) == ({"per_class_ap", "per_class_mask_ap"} if head == "MaskRCNNDetector" else {"per_class_ap"})
    assert len(extra["per_class_ap"]) == 80 and any(v is not None for v in extra["per_class_ap"].values())
    assert len(list((tmp_path / "predictions" / "epoch_000").glob("*.png"))) == 2


def test_detr_crop_policy_and_max_crop():
    """The 3x policy of the official PVTv2 / GPViT configs: resize | resize(400-600) -> crop(384-600) -> resize."""
    from torchvision import tv_tensors

    from vitlab.data.coco import RandomSizeCrop

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.rand(3, 700, 1000))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 10.0, 200.0, 300.0], [600.0, 400.0, 990.0, 690.0]]),
                                     format="XYXY", canvas_size=(700, 1000))
    crop = RandomSizeCrop(384, 600)
    sizes = set()
    for _ in range(50):
        out_image, out_boxes = crop(image, boxes)
        h, w = out_image.shape[-2:]
        sizes.add((h, w))
        assert 384 <= h <= 600 and 384 <= w <= 600 and out_boxes.canvas_size == (h, w)
        assert (out_boxes[:, 0::2] <= w).all() and (out_boxes[:, 1::2] <= h).all() and (out_boxes >= 0).all()
    assert len(sizes) > 10  # height and width drawn independently
    small = RandomSizeCrop(384, 600)(torch.rand(3, 300, 350))
    assert small.shape[-2:] == (300, 350)  # never larger than the image
    dm = CocoDataModule(root="unused", train_scales=[480, 800], crop_policy="detr", max_crop=512)
    target = {"boxes": boxes, "labels": torch.tensor([0, 1])}
    outputs = [dm.train_transforms()(image, target) for _ in range(30)]
    assert all(im.shape[-2] <= 512 and im.shape[-1] <= 512 for im, _ in outputs)
    assert any(len(t["boxes"]) < 2 for _, t in outputs)  # crops cut boxes away (and keep empty crops)
    with pytest.raises(ValueError, match="data.crop_policy='mmdet': expected none or detr"):
        CocoDataModule(root="unused", crop_policy="mmdet")
