"""Evaluation at full size: the COCO evaluator equals pycocotools' COCOeval (boxes and masks,
per class), the ADE20K confusion matrix equals a naive count, and ``--eval`` runs (tiny)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vitlab.tasks.detection import CocoEvaluator
from vitlab.tasks.segmentation import ConfusionMatrix
from vitlab.tools.eval_cost import coco_batch

CATS = [1, 3, 7, 8, 20]  # not contiguous: labels map to these ids


def reference_coco(preds, targets, iou_type):
    """pycocotools' own objects built straight from the tensors (xywh boxes, RLE masks), the
    detections of one IoU type's geometry only (as mmdet loads them)."""
    images, anns, dets = [], [], []
    for image_id, (pred, tgt) in enumerate(zip(preds, targets), 1):
        h, w = tgt["orig_size"].tolist()
        images.append({"id": image_id, "height": h, "width": w})
        for source, out in ((tgt, anns), (pred, dets)):
            for k in range(len(source["labels"])):
                x1, y1, x2, y2 = source["boxes"][k].tolist()
                entry = {"image_id": image_id, "category_id": CATS[int(source["labels"][k])]}
                if iou_type == "bbox":
                    entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
                else:
                    rle = mask_utils.encode(np.asfortranarray(source["masks"][k].numpy().astype(np.uint8)))
                    entry["segmentation"] = rle
                if source is tgt:
                    entry.update(id=len(anns) + 1, iscrowd=int(tgt["iscrowd"][k]), area=float(tgt["area"][k]))
                else:
                    entry["score"] = float(source["scores"][k])
                out.append(entry)
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in CATS]}
    gt.createIndex()
    return gt, gt.loadRes(dets)


def cocoeval(gt, dt, iou_type, cat_ids=None):
    ev = COCOeval(gt, dt, iou_type)
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco_evaluator_equals_pycocotools_boxes_and_masks():
    g = torch.Generator().manual_seed(0)
    preds, targets = coco_batch(g, 6, masks=True, num_classes=len(CATS), dets=40, objects=6)
    targets[0]["iscrowd"][0] = 1  # a crowd region: ignored, not a miss
    evaluator = CocoEvaluator(True, CATS)
    for image_id, (pred, tgt) in enumerate(zip(preds, targets), 1):
        evaluator.update(pred, tgt, image_id)
    result = evaluator.compute()
    for iou_type in ("bbox", "segm"):
        gt, dt = reference_coco(preds, targets, iou_type)
        stats = cocoeval(gt, dt, iou_type)
        assert 0.05 < stats[0] < 0.95  # a real, imperfect score
        keys = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
                "mar_small", "mar_medium", "mar_large")
        for key, value in zip(keys, stats):
            assert result[f"{iou_type}_{key}"] == pytest.approx(value, abs=1e-4), (iou_type, key)
        for k, cat in enumerate(CATS):  # per class: COCOeval restricted to the category
            expected = cocoeval(gt, dt, iou_type, [cat])
            assert result[f"{iou_type}_ap_per_class"][k] == pytest.approx(expected[0], abs=1e-4), (iou_type, cat)
            assert result[f"{iou_type}_ar100_per_class"][k] == pytest.approx(expected[8], abs=1e-4), (iou_type, cat)


def test_coco_evaluator_without_detections_or_images():
    """No images: -1 throughout (COCOeval's "none"); images but no detections (an untrained
    detector): AP 0 for the classes with ground truth, -1 for the others."""
    result = CocoEvaluator(False, CATS).compute()
    assert result["bbox_map"] == -1 and result["bbox_ap_per_class"] == [-1.0] * len(CATS)
    evaluator = CocoEvaluator(False, CATS)
    target = {"boxes": torch.tensor([[1.0, 1, 20, 20]]), "labels": torch.tensor([2]), "iscrowd": torch.tensor([0]),
              "area": torch.tensor([361.0]), "orig_size": torch.tensor([32, 32])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    evaluator.update(empty, target, 1)
    result = evaluator.compute()
    assert result["bbox_map"] == 0 and result["bbox_ap_per_class"] == [-1, -1, 0, -1, -1]


def test_confusion_matrix_equals_naive_count():
    g = torch.Generator().manual_seed(0)
    metric = ConfusionMatrix(7, ignore_index=255)
    expected = np.zeros((7, 7), dtype=np.int64)
    for size in ((13, 17), (20, 9)):  # images of different sizes, as validation's originals
        label = torch.randint(7, size, generator=g)
        label[torch.rand(size, generator=g) < 0.2] = 255
        pred = torch.randint(7, size, generator=g)
        metric.update(pred, label)
        for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
            if t != 255:
                expected[t, p] += 1
    assert (metric.compute().numpy() == expected).all() and expected.sum() > 0


def test_bench_eval_runs_tiny(capsys):
    from vitlab.tools.bench.cli import main

    main(["--eval", "coco", "--images", "2", "--masks"])
    main(["--eval", "ade20k", "--images", "3"])
    out = capsys.readouterr().out
    assert "coco box+mask" in out and "ade20k mIoU" in out and "peak RSS MB" in out
