"""What evaluation at full size costs: seconds and peak memory of the COCO and ADE20K metrics.

    python -m vitlab.tools.bench --eval coco --images 5000 [--masks]
    python -m vitlab.tools.bench --eval ade20k --images 2000

Generated predictions and ground truth at the real sizes (COCO: 640 x 480 images, ~7 objects
and 100 detections each over 80 classes, optionally with masks; ADE20K: 512 x 512 label maps of
150 classes) go through the same code the tasks run (``DetectionTask``'s ``detections_to_original`` and
``CocoEvaluator`` with per-class AP, ``SegmentationTask``'s confusion matrix), timed in two phases:
``update`` (what each validation step adds after the network: detections in the detector's own form,
boxes on the 800 x 1067 network input and Mask R-CNN's 28 x 28 RoI masks, taken to the original image
as COCO entries and RLE masks; the confusion-matrix bincount) and ``compute`` (the evaluation at the
epoch's end), each in wall seconds and CPU seconds (this process's and its forked mask evaluation's:
on a shared machine the CPU seconds say what a dedicated one would take). Peak RSS is the process's
high-water mark (``ru_maxrss``), plus the forked mask evaluation's.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COCO_SIZE = (480, 640)  # height, width: COCO's typical image
COCO_INPUT = (800, 1067)  # the network's input for it: shorter side 800 (COCO's test scale)
ROI_MASK = 28  # Mask R-CNN's RoI mask resolution
ADE_SIZE = (512, 512)


@dataclass
class EvalCost:
    name: str
    images: int
    update_s: float
    compute_s: float
    peak_rss_mb: float
    result: dict
    update_cpu_s: float = 0.0
    compute_cpu_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.update_s + self.compute_s


def peak_rss_mb(forked: bool = False) -> float:
    """This process's high-water mark, plus its children's when it forked an evaluation (both live at
    once; pages they share are counted twice, so it is an upper bound)."""
    usage = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)[:1 + forked]]
    return sum(usage) / 1024  # Linux: KiB


def cpu_s() -> float:
    """CPU seconds of this process and its finished children so far."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def coco_batch(g: torch.Generator, images: int, masks: bool, num_classes: int = 80, dets: int = 100,
               objects: int = 7) -> tuple[list[dict], list[dict]]:
    """``images`` (detections, targets) pairs. Targets on the original image (``COCO_SIZE``): ground-truth
    boxes, their masks the boxes filled. Detections as the detector returns them (``_Detector.roi_masks``)
    on the network input (``COCO_INPUT``): jittered copies of the ground truth (some with the wrong class)
    plus random boxes, random scores, RoI masks: smooth 28 x 28 probabilities (an ellipse in the box
    plus low-frequency noise, about as many runs per column as a real object's)."""
    h, w = COCO_SIZE
    scale = torch.tensor([COCO_INPUT[1] / w, COCO_INPUT[0] / h] * 2)
    preds, targets = [], []
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None]
    grid = (torch.arange(ROI_MASK) + 0.5) / ROI_MASK * 2 - 1  # -1..1 across the box

    def fill(boxes):  # boxes -> N x H x W bool masks (rectangles), one broadcast
        b = boxes.round().long()
        return ((ys >= b[:, 1, None, None]) & (ys < b[:, 3, None, None]) &
                (xs >= b[:, 0, None, None]) & (xs < b[:, 2, None, None]))

    def roi_masks(n):  # n x 1 x 28 x 28 probabilities
        ellipse = 1 - grid[:, None] ** 2 - grid[None] ** 2
        noise = F.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(ROI_MASK, ROI_MASK), mode="bilinear")
        return torch.sigmoid(6 * ellipse + 2 * noise)

    for _ in range(images):
        xy = torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 8 + torch.rand(objects, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        gt_boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], 1)
        gt_labels = torch.randint(num_classes, (objects,), generator=g)
        copies = gt_boxes.repeat(dets // (2 * objects) + 1, 1)[: dets // 2]
        copies = copies + torch.randn(copies.shape, generator=g) * 4
        rand_xy = torch.rand(dets - len(copies), 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        boxes = torch.cat([copies, torch.cat([rand_xy, rand_xy + 8 + torch.rand(len(rand_xy), 2, generator=g) * 100], 1)])
        boxes = boxes.clamp(min=0).minimum(torch.tensor([w - 1.0, h - 1.0, w - 1.0, h - 1.0]))
        labels = gt_labels.repeat(dets // objects + 1)[:dets].clone()
        wrong = torch.rand(dets, generator=g) < 0.3
        labels[wrong] = torch.randint(num_classes, (int(wrong.sum()),), generator=g)
        pred = {"boxes": boxes * scale, "labels": labels, "scores": torch.rand(dets, generator=g)}
        area = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(1)
        target = {"boxes": gt_boxes, "labels": gt_labels, "iscrowd": torch.zeros(objects, dtype=torch.long),
                  "area": area, "orig_size": torch.tensor([h, w])}
        if masks:
            pred["masks"] = roi_masks(dets)
            target["masks"] = fill(gt_boxes)
        preds.append(pred)
        targets.append(target)
    return preds, targets


def coco_cost(images: int, masks: bool = False, seed: int = 0, chunk: int = 16, paste_workers: int = 2) -> EvalCost:
    """The detection task's evaluation path over ``images`` generated images (made ``chunk`` at a time;
    generation is not timed): each validation step's ``detections_to_original`` + ``CocoEvaluator.update``
    (masks pasted by ``paste_workers`` processes, as ``module.paste_workers``; each chunk's pastes are
    waited for inside its timing, so none runs during the untimed generation), then ``compute``."""
    from concurrent.futures import Future, wait

    from vitlab.tasks.detection import CocoEvaluator, detections_to_original

    evaluator = CocoEvaluator(masks, list(range(1, 81)), paste_workers)
    g = torch.Generator().manual_seed(seed)
    update_s = update_cpu = 0.0
    for start in range(0, images, chunk):
        preds, targets = coco_batch(g, min(chunk, images - start), masks)
        t0, c0 = time.perf_counter(), cpu_s()
        pending = []
        for k, (det, target) in enumerate(zip(preds, targets)):
            pred = detections_to_original(det, COCO_INPUT, COCO_SIZE, rle=True, paste=evaluator.paste)
            if isinstance(pred.get("segmentation"), Future):
                pending.append(pred["segmentation"])
            evaluator.update(pred, target, start + k + 1)
        wait(pending)
        if start + chunk >= images:
            evaluator.finish_pastes()  # the processes ended: their CPU time is counted
        update_s, update_cpu = update_s + time.perf_counter() - t0, update_cpu + cpu_s() - c0
    t0, c0 = time.perf_counter(), cpu_s()
    result = evaluator.compute()
    compute_s, compute_cpu = time.perf_counter() - t0, cpu_s() - c0
    return EvalCost(f"coco {'box+mask' if masks else 'box'}", images, update_s, compute_s, peak_rss_mb(masks), result,
                    update_cpu, compute_cpu)


def ade20k_cost(images: int, num_classes: int = 150, seed: int = 0, device: str = "cpu") -> EvalCost:
    """The segmentation task's confusion matrix over ``images`` generated 512 x 512 label maps and
    predictions (70 % of the pixels right, 5 % ignored), one update per image as validation does (a pool of
    8 maps, cycled)."""
    from vitlab.tasks.segmentation import ConfusionMatrix, iou_from_confmat

    confmat = ConfusionMatrix(num_classes, 255).to(device)
    g = torch.Generator().manual_seed(seed)
    pairs = []  # a pool of 8 generated (prediction, label) maps, cycled: generating 2,000 is not the point
    for _ in range(min(images, 8)):
        label = torch.randint(num_classes, ADE_SIZE, generator=g)
        label[torch.rand(ADE_SIZE, generator=g) < 0.05] = 255
        pred = torch.where(torch.rand(ADE_SIZE, generator=g) < 0.7, label.clamp(max=num_classes - 1),
                           torch.randint(num_classes, ADE_SIZE, generator=g))
        pairs.append((pred.to(device), label.to(device)))
    update_s = update_cpu = 0.0
    for k in range(images):
        pred, label = pairs[k % len(pairs)]
        t0, c0 = time.perf_counter(), cpu_s()
        confmat.update(pred, label)
        update_s, update_cpu = update_s + time.perf_counter() - t0, update_cpu + cpu_s() - c0
    t0, c0 = time.perf_counter(), cpu_s()
    iou, acc = iou_from_confmat(confmat.compute())
    result = {"miou": float(iou.nanmean()), "acc": float(acc)}
    compute_s, compute_cpu = time.perf_counter() - t0, cpu_s() - c0
    return EvalCost(f"ade20k mIoU ({device})", images, update_s, compute_s, peak_rss_mb(), result,
                    update_cpu, compute_cpu)


def format_costs(costs: list[EvalCost]) -> str:
    head = (f"{'evaluation':<26} {'images':>7} {'update s':>9} {'compute s':>10} {'total s':>8} {'update CPU s':>13} "
            f"{'compute CPU s':>14} {'peak RSS MB':>12}")
    lines = [head, "-" * len(head)]
    for c in costs:
        lines.append(f"{c.name:<26} {c.images:>7} {c.update_s:>9.2f} {c.compute_s:>10.2f} {c.total_s:>8.2f} "
                     f"{c.update_cpu_s:>13.2f} {c.compute_cpu_s:>14.2f} {c.peak_rss_mb:>12.0f}")
    return "\n".join(lines) + f"\n(load average while measured: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"


def run(kind: str, images: int, masks: bool = False) -> str:
    cost = coco_cost(images, masks) if kind == "coco" else ade20k_cost(images)
    return format_costs([cost])
