"""Evaluation at full size: masks pasted and encoded box by box equal pycocotools' encoding of
torchvision's pasted masks, the COCO evaluator equals pycocotools' COCOeval (boxes and masks, per
class), the ADE20K confusion matrix equals a naive count, and ``--eval`` runs (tiny)."""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from support import Command
from vitlab.tasks import coco_masks
from vitlab.tasks.coco_masks import encode_masks, paste_masks_rle
from vitlab.tasks.detection import CocoEvaluator, detections_to_original
from vitlab.tasks.segmentation import ConfusionMatrix
from vitlab.tools.eval_cost import COCO_INPUT, COCO_SIZE, coco_batch

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


def encode(masks: torch.Tensor) -> list[dict]:
    return mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))


def naive_paste(roi_masks, boxes, size):
    """Each RoI mask resized to its expanded box as torchvision does, put on a canvas far larger than the
    image, the image cut out: defined for boxes anywhere (torchvision's loop fails on boxes well outside)."""
    height, width = size
    padded, scale = expand_masks(roi_masks, padding=1)
    out = []
    for mask, (x0, y0, x1, y1) in zip(padded, expand_boxes(boxes, scale).long().tolist()):
        local = F.interpolate(mask[None], size=(max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)), mode="bilinear",
                              align_corners=False)[0, 0]
        pad = 2 * max(height, width, local.shape[0], local.shape[1]) + abs(x0) + abs(y0)
        canvas = torch.zeros(height + 2 * pad, width + 2 * pad)
        canvas[pad + y0:pad + y0 + local.shape[0], pad + x0:pad + x0 + local.shape[1]] = local
        out.append(canvas[pad:pad + height, pad:pad + width] > 0.5)
    return torch.stack(out)


@pytest.mark.parametrize("size", [(48, 64), (13, 9)])
def test_masks_pasted_box_by_box_encode_as_pycocotools(size):
    """RoI masks (noise: many runs; smooth) in boxes inside, across the border, wider / taller than the
    image, under a pixel and wholly outside: the same bytes as pycocotools' encoding of the pasted masks
    (torchvision's own paste where it is defined)."""
    h, w = size
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])], 1)
    boxes[:6] = torch.tensor([[0.0, 0, w - 1, h - 1], [-3, -2, w + 4, h + 3], [2, 0, 3, h - 1],  # a column, full height
                              [1, 1, 1.4, 1.2], [w + 5, 1, w + 9, 4], [-20, -20, -9, -9]])  # tiny, right of, above-left
    roi = torch.rand(60, 1, 28, 28, generator=g)
    roi[30:] = F.interpolate(torch.rand(30, 1, 4, 4, generator=g), size=(28, 28), mode="bilinear")
    roi[:3] = 1.0
    expected = encode(naive_paste(roi, boxes, size))
    assert mask_utils.area(expected[1]) == h * w  # all of it: runs that go on from column to column
    assert paste_masks_rle(roi, boxes, size) == expected
    inside = slice(0, 4)  # torchvision's paste equals the naive one where it works
    assert torch.equal(paste_masks_in_image(roi[inside], boxes[inside], size)[:, 0] > 0.5, naive_paste(roi[inside], boxes[inside], size))
    assert any(r["counts"] != expected[-1]["counts"] for r in expected) and paste_masks_rle(roi[:0], boxes[:0], size) == []


def test_masks_encode_as_pycocotools():
    g = torch.Generator().manual_seed(2)
    for h, w in ((30, 40), (1, 1), (5, 3)):
        masks = torch.zeros(9, h, w, dtype=torch.bool)  # 0: empty
        masks[1] = True
        masks[2, 0, 0] = masks[3, -1, -1] = True
        masks[4, :, 0] = True  # the whole first column
        masks[5, :, w // 2:] = True  # full-height columns: one run
        masks[6, h // 3:, w // 3:] = True
        masks[7] = torch.rand(h, w, generator=g) > 0.5
        masks[8, 0] = True
        assert encode_masks(masks) == encode(masks), (h, w)


def test_coco_evaluator_equals_pycocotools_boxes_and_masks():
    """The whole path from the detector's output (boxes on the network input, RoI masks) to the
    numbers, against torchvision's rescaling and paste, pycocotools' encoding and its COCOeval."""
    g = torch.Generator().manual_seed(0)
    dets, targets = coco_batch(g, 6, masks=True, num_classes=len(CATS), dets=40, objects=6)
    targets[0]["iscrowd"][0] = 1  # a crowd region: ignored, not a miss
    evaluator = CocoEvaluator(True, CATS)
    preds = []
    for image_id, (det, tgt) in enumerate(zip(dets, targets), 1):
        evaluator.update(detections_to_original(det, COCO_INPUT, COCO_SIZE, rle=True), tgt, image_id)
        boxes = resize_boxes(det["boxes"], COCO_INPUT, COCO_SIZE)
        preds.append({**det, "boxes": boxes, "masks": paste_masks_in_image(det["masks"], boxes, COCO_SIZE)[:, 0] > 0.5})
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


@pytest.mark.parametrize("other_thread", [False, True])
def test_mask_evaluation_error_reaches_the_caller(other_thread, monkeypatch):
    """The mask evaluation runs in a forked process (two cores, no other Python thread; with one, in
    this process): its error is raised by ``compute`` either way."""
    import multiprocessing

    import vitlab.tasks.detection as detection

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: never forked")
    monkeypatch.setattr(detection.threading, "active_count", lambda: 2 if other_thread else 1)
    contexts, get_context = [], multiprocessing.get_context
    monkeypatch.setattr(detection.multiprocessing, "get_context", lambda kind: contexts.append(kind) or get_context(kind))
    g = torch.Generator().manual_seed(0)
    dets, targets = coco_batch(g, 2, masks=True, num_classes=len(CATS), dets=5, objects=2)
    evaluator = CocoEvaluator(True, CATS)
    for image_id, (det, tgt) in enumerate(zip(dets, targets), 1):
        evaluator.update(detections_to_original(det, COCO_INPUT, COCO_SIZE, rle=True), tgt, image_id)
    image_id, (cats, boxes, scores, rles) = evaluator._results[1]
    evaluator._results[1] = (image_id, (cats, boxes, scores, rles[:-1]))  # a mask short: an error in evaluate("segm")
    with pytest.raises(IndexError):
        evaluator.compute()
    assert contexts == ([] if other_thread else ["fork"])


@pytest.mark.parametrize("other_thread", [False, True])
def test_masks_pasted_in_worker_processes_equal_the_inline_ones(other_thread, monkeypatch):
    """``module.paste_workers``: masks pasted by the pool's processes are the inline ones, byte for byte,
    in image order, and evaluate the same; the queue holds at most ``max_pending`` pastes a process; the processes are forked when this process has no other
    thread, else started by forkserver; once the entries are read, no process or thread of the pool is
    left (``compute`` forks its mask evaluation only then)."""
    contexts, get_context = [], coco_masks.multiprocessing.get_context
    monkeypatch.setattr(coco_masks.multiprocessing, "get_context", lambda kind: contexts.append(kind) or get_context(kind))
    if not other_thread:  # as alone (a suite's process keeps threads of earlier tests): the fork path
        monkeypatch.setattr(coco_masks, "threading", SimpleNamespace(active_count=lambda: 1))
    g = torch.Generator().manual_seed(3)
    dets, targets = coco_batch(g, 5, masks=True, num_classes=len(CATS), dets=30, objects=4)
    # forkserver's processes each import torch: one of them is enough to test
    inline, pooled = CocoEvaluator(True, CATS), CocoEvaluator(True, CATS, paste_workers=1 if other_thread else 2)
    pooled._paster.inline_first = 1  # the first image pasted here, the other four in the processes
    pooled._paster.max_pending = 1  # one queued paste a process: the loop waits for the oldest
    threads_before = threading.active_count()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    if other_thread:
        thread.start()
    try:
        for image_id, (det, tgt) in enumerate(zip(dets, targets), 1):
            for evaluator in (inline, pooled):
                pred = detections_to_original(det, COCO_INPUT, COCO_SIZE, rle=True, paste=evaluator.paste)
                evaluator.update(pred, tgt, image_id)
        assert [isinstance(rles, Future) for _, (*_, rles) in pooled._results] == [False, True, True, True, True]
        assert len(pooled._paster._pending) == pooled._paster.workers
        assert all(rles.done() for _, (*_, rles) in pooled._results[1:-pooled._paster.workers])
        assert contexts == ["forkserver" if other_thread else "fork"]
        assert pooled.results == inline.results and len(inline.results) == 5 * 30
    finally:
        stop.set()
        if other_thread:
            thread.join()
    assert threading.active_count() == threads_before and pooled._paster._pool is None
    assert pooled.compute() == inline.compute()


def test_a_paste_that_fails_in_a_worker_fails_the_evaluation():
    """The error of a paste in a pool process is raised by ``compute``, and the processes are ended."""
    g = torch.Generator().manual_seed(4)
    dets, targets = coco_batch(g, 2, masks=True, num_classes=len(CATS), dets=5, objects=2)
    evaluator = CocoEvaluator(True, CATS, paste_workers=1)
    evaluator._paster.inline_first = 0
    dets[1]["masks"] = dets[1]["masks"][:, 0]  # N x M x M: not RoI masks
    for image_id, (det, tgt) in enumerate(zip(dets, targets), 1):
        evaluator.update(detections_to_original(det, COCO_INPUT, COCO_SIZE, rle=True, paste=evaluator.paste), tgt, image_id)
    with pytest.raises(RuntimeError, match="input_size equals to 4"):  # torch's, raised in the process
        evaluator.compute()
    assert evaluator._paster._pool is None


def test_paste_processes_end_with_a_killed_parent_and_free_its_run_lock(tmp_path):
    """A training process killed (kill -9) while its paste processes run: they end with it, and the run
    directory's lock it held (``fcntl.flock``, which forked processes inherit) is free for the same
    command run again. Forked, they used to live on, waiting on their queue, holding the lock."""
    lock, pids = tmp_path / ".lock", tmp_path / "pids"
    code = (f"import fcntl, os, signal, torch\nfrom vitlab.tasks.coco_masks import PastePool\n"
            f"fcntl.flock(os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            f"pool = PastePool(2, inline_first=0)\n"
            f"pool.paste(torch.rand(3, 1, 28, 28), torch.tensor([[0.0, 0, 9, 9]] * 3), (16, 16)).result()\n"
            f"open({str(pids)!r}, 'w').write(' '.join(map(str, pool._pool._processes)))\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    command = Command(["-c", code], tmp_path, dict(os.environ), log=tmp_path / "log")
    assert command.wait() == -9, (tmp_path / "log").read_text()[-2000:]
    workers = [int(p) for p in pids.read_text().split()]

    def alive(pid: int) -> bool:  # a zombie is not: it only waits to be reaped
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2 and not any(map(alive, workers))
    fcntl.flock(os.open(lock, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while one holds it


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
