"""COCO detection / instance segmentation: our backbones in any detector of ``vitlab.heads``.

The detector is ``module.head`` (a ``_target_`` in ``vitlab.heads``: RetinaNet, (Cascade) Mask
R-CNN, ATSS, GFL, Sparse R-CNN, DETR; those with ``with_masks`` also report mask AP), built
with the backbone, the dataset's class count and its normalisation statistics). Metrics are
``CocoEvaluator`` (faster-coco-eval's COCOeval, equal to pycocotools'),
on the original image sizes, crowd regions marked ``iscrowd``, with per-class AP. Masks come from
the detector's RoI masks, pasted at the original size and encoded box by box
(``detections_to_original``): no full-size mask is made. ``write_results`` writes the last
validation's detections as a COCO results JSON.

Validation loss (``val_loss: true``): torchvision's detectors compute their losses in training mode
only, so validation runs the detector's training-mode part a second time on the same images and
the features of the first pass (``detect_and_losses``): the backbone runs once, in evaluation mode.
"""
from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn
from torchmetrics import MeanMetric
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks, paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from vitlab.data.base import DatasetInfo, DetectionBatch, PredictBatch
from vitlab.runtime.build import build_backbone, instantiate
from vitlab.tasks.base import VitlabTask
from vitlab.tasks.visualize import Panel, render, to_rgb_array

# torchmetrics' result keys -> ours (``val/<prefix><name>``)
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large")


class CocoEvaluator:
    """COCO evaluation of one validation pass: detections and ground truth kept as COCO entries
    (xywh boxes, RLE masks: each mask encoded once, as the results JSON needs it anyway), evaluated
    at the epoch's end by faster-coco-eval's COCOeval (C++; equal to pycocotools' COCOeval, tested),
    once per IoU type. Per-class AP / AR100 are read from that one evaluation's precision and recall
    arrays (mmdet's ``classwise``) instead of one more evaluation per class (torchmetrics'
    ``class_metrics``: 80 more passes). The ground truth's ``area`` is the annotation's (as in
    COCO's own files) for boxes and masks alike.

    It replaces torchmetrics' ``MeanAveragePrecision`` here: that one re-encodes every predicted
    mask on each update (the results JSON encoded them again) and reruns COCOeval per class, which
    made box+mask evaluation of COCO val take many minutes.
    """

    def __init__(self, with_masks: bool, category_ids: list[int]):
        self.iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        self.category_ids = list(category_ids)
        self.reset()

    def reset(self) -> None:
        self.images: list[dict] = []
        self.ground_truth: list[dict] = []
        self.results: list[dict] = []

    def update(self, pred: dict, target: dict, image_id: int) -> list[dict]:
        """One image: ``pred`` (boxes xyxy, labels, scores, and RLEs ``segmentation`` from
        ``detections_to_original`` or masks N x H x W) and ``target`` (boxes, labels, iscrowd, area,
        masks) on the original image of ``target["orig_size"]`` (H, W). Returns the image's results entries."""
        height, width = (int(v) for v in target["orig_size"])
        self.images.append({"id": image_id, "height": height, "width": width})
        entries = coco_results(pred, self.category_ids, image_id=image_id)
        self.results.extend(entries)
        gt = coco_results({"boxes": target["boxes"], "labels": target["labels"],
                           "scores": torch.ones(len(target["labels"])),
                           **({"masks": target["masks"]} if "segm" in self.iou_types else {})},
                          self.category_ids, image_id=image_id, precise=True)
        for entry, crowd, area in zip(gt, target["iscrowd"].tolist(), target["area"].tolist()):
            del entry["score"]
            entry.update(iscrowd=int(crowd), area=float(area), id=len(self.ground_truth) + 1)
            self.ground_truth.append(entry)
        return entries

    def gather(self) -> None:
        """Every process's images on every process, in image-id order (exact evaluation gives the
        processes different numbers of images, so the entries travel as Python objects)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.images, self.ground_truth, self.results))
        self.images = sorted((im for p in parts for im in p[0]), key=lambda im: im["id"])
        self.ground_truth = sorted((a for p in parts for a in p[1]), key=lambda a: a["image_id"])
        self.results = sorted((r for p in parts for r in p[2]), key=lambda r: r["image_id"])
        for k, entry in enumerate(self.ground_truth, 1):
            entry["id"] = k

    def compute(self) -> dict[str, float | list[float]]:
        """``{iou_type}_{key}`` for the 12 COCO numbers (fractions; -1 where COCOeval has none) and
        ``{iou_type}_ap_per_class`` / ``{iou_type}_ar100_per_class`` (one per category id, in order;
        -1: no ground truth of that class). With masks, a second core and no other Python thread, the
        mask evaluation runs in a forked process while this one evaluates the boxes: the two share
        nothing, each takes tens of seconds on COCO val, and a fork reads the entries without copying
        or pickling them."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1  # elsewhere than Linux: one process
        # forking a process with other Python threads (a pin-memory thread, a logger's) can copy a lock
        # one of them holds: then the one process, ~7 s more at COCO val's size
        alone = threading.active_count() == 1
        if len(self.iou_types) == 1 or not self.images or cores < 2 or not alone:
            return {k: v for iou_type in self.iou_types for k, v in self.evaluate(iou_type).items()}
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=self._evaluate_to, args=("segm", send), daemon=True)
        child.start()
        send.close()
        out = self.evaluate("bbox")
        try:
            segm = receive.recv()
        except EOFError:  # the process died without a word (killed: out of memory?)
            segm = RuntimeError(f"the mask evaluation's process ended with exit code {child.exitcode}")
        finally:
            child.join()
        if isinstance(segm, BaseException):
            raise segm
        return {**out, **segm}

    def _evaluate_to(self, iou_type: str, send) -> None:
        """In the forked process: ``evaluate(iou_type)`` (or its error) sent back."""
        try:
            send.send(self.evaluate(iou_type))
        except BaseException as error:  # the parent raises it
            send.send(error)

    def evaluate(self, iou_type: str) -> dict[str, float | list[float]]:
        """One IoU type's ``compute`` entries (faster-coco-eval's COCOeval over every image)."""
        from faster_coco_eval import COCO, COCOeval_faster
        from faster_coco_eval.core import mask as coco_mask

        out: dict = {}
        cats = [{"id": c, "name": str(c)} for c in self.category_ids]
        if not self.images:
            out.update({f"{iou_type}_{k}": -1.0 for k in MAP_KEYS})
            out[f"{iou_type}_ap_per_class"] = out[f"{iou_type}_ar100_per_class"] = [-1.0] * len(cats)
            return out
        # each type's own geometry only (as mmdet's CocoMetric): with both, loadRes would take a
        # segm detection's area from its box; copies, as loadRes writes into the entries
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        gt = COCO({"images": self.images, "categories": cats,
                   "annotations": [{k: v for k, v in a.items() if k != drop} for a in self.ground_truth]})
        dets = [{k: v for k, v in r.items() if k != drop} for r in self.results]
        if not dets:  # none at all (an early, untrained detector): AP 0 where there is ground truth
            dt = COCO({"images": self.images, "annotations": [], "categories": cats})
        elif iou_type == "segm":
            # loadRes' own work for masks (each mask's area, as it computes it), for all masks in one
            # call rather than one per detection. loadRes also sets each mask's box, which a mask
            # evaluation never reads (COCOeval: IoUs from the masks, area ranges from the areas; equal to
            # pycocotools' with loadRes, tested): a placeholder instead of ~2 s at COCO val's size
            rles = [d["segmentation"] for d in dets]
            for k, (d, area) in enumerate(zip(dets, coco_mask.area(rles)), 1):
                d.update(area=area, bbox=[0.0, 0.0, 0.0, 0.0], id=k, iscrowd=0)
            dt = COCO({"images": self.images, "annotations": dets, "categories": cats})
        with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its summary table
            if iou_type == "bbox" and dets:
                dt = gt.loadRes(dets)
            ev = COCOeval_faster(gt, dt, iou_type)
            ev.params.catIds = self.category_ids  # every category, in our label order
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        out.update({f"{iou_type}_{k}": float(v) for k, v in zip(MAP_KEYS, ev.stats)})
        precision = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]  # T x R x K, all areas, 100 dets
        recall = np.asarray(ev.eval["recall"])[:, :, 0, -1]  # T x K
        out[f"{iou_type}_ap_per_class"] = [_mean_valid(precision[:, :, k]) for k in range(len(cats))]
        out[f"{iou_type}_ar100_per_class"] = [_mean_valid(recall[:, k]) for k in range(len(cats))]
        return out


def _mean_valid(values: np.ndarray) -> float:
    """COCOeval's summary rule: the mean over the entries that exist (-1 marks none), else -1."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def detections_to_original(det: dict, image_size, orig_size, rle: bool = False) -> dict:
    """A detector's output on the (resized) network input -> the original image, where COCO's ground
    truth lives: boxes rescaled; RoI masks (``_Detector.roi_masks``) pasted straight at the original
    size as torchvision's ``paste_masks_in_image`` does, as RLEs (``rle``: ``segmentation``, the
    evaluation's form, never making full-size masks) or N x H x W bool ``masks``."""
    orig_size = tuple(int(v) for v in orig_size)
    boxes = resize_boxes(det["boxes"], tuple(image_size), orig_size)
    out = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
    if "masks" in det:
        if rle:
            out["segmentation"] = paste_masks_rle(det["masks"], boxes, orig_size)
        else:
            out["masks"] = paste_masks_in_image(det["masks"], boxes, orig_size)[:, 0] > 0.5
    return out


def paste_masks_rle(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> list[dict]:
    """Mask R-CNN's RoI masks (N x 1 x M x M probabilities) pasted into their boxes (N x 4 xyxy) on an
    image of ``size`` (H, W) and thresholded, as COCO RLEs: byte-equal to ``pycocotools.mask.encode`` of
    torchvision's ``paste_masks_in_image(masks, boxes, size)[:, 0] > threshold`` (tested), without
    making the full-size masks: each mask is resized to its box as torchvision does (its padding, box
    expansion and the same ``F.interpolate``) and encoded from the part inside the image
    (``crops_to_rle``). torchvision pastes each mask on a zeroed full image and pycocotools encodes whole
    images: 100 full-size masks per image made that the dominant cost of validating Mask R-CNN."""
    height, width = size
    crops, corners = [], []
    # F.interpolate's own kernel for a 4-D input and an output size (what it calls): its Python checks
    # cost more than resizing a box's mask (~17 us of ~45 per mask, measured)
    resize = torch._C._nn.upsample_bilinear2d
    with one_thread():
        masks, scale = expand_masks(masks.detach().float().cpu(), padding=1)
        boxes = expand_boxes(boxes.detach().float().cpu(), scale).to(torch.int64).tolist()
        for mask, (x0, y0, x1, y1) in zip(masks.unbind(0), boxes):
            local = resize(mask[None], (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)), False)[0, 0]
            top, left = max(y0, 0), max(x0, 0)
            bottom, right = max(min(y1 + 1, height), top), max(min(x1 + 1, width), left)
            # thresholded here: crops_to_rle then copies bytes rather than floats into column order
            crops.append(local[top - y0:bottom - y0, left - x0:right - x0].gt(threshold).numpy())
            corners.append((top, left))
    return crops_to_rle(crops, corners, size)


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads off for a while: each box's resize is too small to share, yet torch
    starts its thread team for it, which made the pasting 10x slower on two busy cores (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """N x H x W masks -> COCO RLEs, byte-equal to ``pycocotools.mask.encode`` (tested): each mask
    encoded from its bounding crop (``crops_to_rle``), which spares pycocotools' column-major copy of
    every whole image."""
    masks = masks.detach().cpu().numpy().astype(bool, copy=False)
    rows, cols = masks.any(2), masks.any(1)  # N x H, N x W: where each mask has pixels
    top, bottom = rows.argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)
    left, right = cols.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1)
    bottom, right = np.where(rows.any(1), bottom, top), np.where(rows.any(1), right, left)  # empty: 0 x 0
    crops = [m[t:b, l:r] for m, t, b, l, r in zip(masks, top.tolist(), bottom.tolist(), left.tolist(), right.tolist())]
    return crops_to_rle(crops, list(zip(top.tolist(), left.tolist())), masks.shape[1:])


def crops_to_rle(crops: list[np.ndarray], corners: list[tuple[int, int]], size: tuple[int, int]) -> list[dict]:
    """Boolean crops (h x w, each inside the image) placed at ``corners`` (top, left) on an otherwise
    empty image of ``size`` (H, W) -> COCO's compressed RLEs of those images (the runs of the
    column-major image; pycocotools encodes whole images only, so the runs are hand-made and
    pycocotools compresses them)."""
    if not crops:
        return []
    height, width = (int(v) for v in size)
    # every crop column-major with a zero row above and below, one after the other: a run of ones
    # never crosses a column's end there, so the runs of all crops are found in one pass
    heights = np.array([c.shape[0] + 2 for c in crops], dtype=np.int64)
    widths = np.array([c.shape[1] for c in crops], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(heights * widths)])
    flat = np.zeros(int(starts[-1]) + 1, dtype=bool)  # one more zero: every run ends inside
    for crop, start, h, w in zip(crops, starts.tolist(), heights.tolist(), widths.tolist()):
        flat[start:start + h * w].reshape(w, h)[:, 1:-1] = crop.T
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # starts and ends of the runs of ones, in turn
    run_starts, run_ends = changes[0::2], changes[1::2]
    det = np.searchsorted(starts, run_starts, side="right") - 1  # the crop of each run
    top, left = np.array(corners, dtype=np.int64).reshape(-1, 2).T
    column, row = np.divmod(run_starts - starts[det], heights[det])
    run_ends = run_ends - run_starts  # lengths for a moment
    run_starts = (left[det] + column) * height + top[det] + row - 1  # index in the column-major image
    run_ends = run_starts + run_ends
    # a crop as tall as the image: a run ending at a column's bottom goes on at the next one's top
    joined = np.r_[False, (det[1:] == det[:-1]) & (run_starts[1:] == run_ends[:-1])]
    run_starts, det, run_ends = run_starts[~joined], det[~joined], run_ends[np.r_[~joined[1:], True]]
    previous_end = np.r_[0, run_ends[:-1]]
    previous_end[np.r_[True, det[1:] != det[:-1]]] = 0  # a crop's first run follows zeros from 0
    # the counts: (zeros, ones) per run, then the zeros after a crop's last run unless there are none
    bounds = np.searchsorted(det, np.arange(len(crops) + 1))
    tail = height * width - np.where(bounds[1:] > bounds[:-1], run_ends[bounds[1:] - 1], 0)
    counts = np.insert(np.stack([run_starts - previous_end, run_ends - run_starts], 1).ravel(), 2 * bounds[1:], tail)
    ends = 2 * bounds[1:] + np.arange(1, len(crops) + 1)  # where each crop's counts end, its tail included
    keep = np.ones(len(counts), dtype=bool)
    keep[ends - 1] = tail > 0
    per_crop = np.split(counts[keep], np.cumsum(keep)[ends - 1][:-1])
    return mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in per_crop], height, width)


def coco_results(pred: dict, category_ids: list[int], image_id: int | None = None,
                 precise: bool = False) -> list[dict]:
    """Detections on an original image -> COCO results entries (category ids, xywh boxes, RLE masks:
    ``segmentation`` RLEs as they are or ``masks`` N x H x W encoded); boxes and scores rounded as
    results files are written (``precise``: not rounded)."""
    boxes = pred["boxes"].detach().cpu().double().clone()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> COCO's xywh
    rles = pred.get("segmentation")  # RLEs already (``detections_to_original``); else N x H x W masks
    if rles is None and "masks" in pred:
        rles = encode_masks(pred["masks"])
    entries = []
    scores, labels = pred["scores"].detach().cpu().float().tolist(), pred["labels"].tolist()
    for k, box in enumerate(boxes.tolist()):
        entry = {} if image_id is None else {"image_id": image_id}
        score = scores[k]
        if not precise:
            box, score = [round(v, 2) for v in box], round(score, 4)
        entry.update(category_id=category_ids[int(labels[k])], bbox=box, score=score)
        if rles is not None:
            entry["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        entries.append(entry)
    return entries


class DetectionTask(VitlabTask):
    def __init__(
        self,
        backbone: dict,
        schedule: dict,
        info: DatasetInfo | dict,
        head: dict,
        num_vis_images: int = 4,
        vis_score_thresh: float = 0.3,
        tta: dict | None = None,
        val_loss: bool = True,
        ema_decay: float | None = None,
        compile: bool | str = False,
    ):
        super().__init__(backbone, schedule, info, compile)
        self.save_plain_hyperparameters()
        if tta and (list(tta.get("scales", [1.0])) != [1.0] or tta.get("flip")):
            raise ValueError(f"test-time augmentation {tta} is implemented for segmentation only; use tta=none")
        self.num_classes = self.info.num_classes
        self.num_vis_images = num_vis_images
        self.vis_score_thresh = vis_score_thresh
        self.model = self.build_model(self.backbone_cfg, {"head": head}, self.info)
        self.init_ema(ema_decay)
        self.with_masks = bool(getattr(self.model, "with_masks", False))
        if self.with_masks != self.info.with_masks:
            raise ValueError(f"data.with_masks={self.info.with_masks} does not match module.head "
                             f"({type(self.model).__name__}): (Cascade) Mask R-CNN needs masks, the box-only "
                             f"detectors none")
        self.compute_val_loss = val_loss
        self.val_losses = nn.ModuleDict({name: MeanMetric() for name in self.model.loss_names})
        self.category_ids = list(self.info.category_ids or range(1, self.num_classes + 1))
        self.class_names = list(self.info.class_names)
        # synced by its gather(); holds the last validation's COCO results (for write_results)
        self.val_coco = CocoEvaluator(self.with_masks, self.category_ids)
        self._vis: list[np.ndarray] = []
        self.last_per_class: dict[str, dict] = {}

    @classmethod
    def build_model(cls, backbone: dict, module: dict, info: DatasetInfo) -> nn.Module:
        """The detector: ``module["head"]`` around the backbone, for the dataset's classes; images are
        normalised inside the model with the dataset's statistics."""
        return instantiate(module["head"], "module.head", backbone=build_backbone(backbone, dense=True),
                           num_classes=info.num_classes, image_mean=list(info.mean), image_std=list(info.std))

    def forward(self, images: list[torch.Tensor]):
        return self.model(images)

    # ---- training -------------------------------------------------------------------
    def training_step(self, batch: DetectionBatch, batch_idx):
        images, targets, skipped = batch
        self.log_skipped(skipped)
        if not images:
            return None  # every image of the batch was unreadable and skipped
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log("train/loss", loss, batch_size=len(images))
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        self.log_lr()
        return loss

    # ---- evaluation -----------------------------------------------------------------
    def loss_target(self, tgt: dict, size) -> dict:
        """A validation target as training sees it: crowd regions dropped, boxes and masks resized to
        the network's input ``size``, boxes under a pixel dropped (training's SanitizeBoundingBoxes)."""
        orig = tuple(int(v) for v in tgt["orig_size"])
        keep = tgt["iscrowd"] == 0
        boxes = resize_boxes(tgt["boxes"].as_subclass(torch.Tensor)[keep].float(), orig, size)
        keep_boxes = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)
        out = {"boxes": boxes[keep_boxes], "labels": tgt["labels"][keep][keep_boxes]}
        if self.with_masks:
            masks = tgt["masks"].as_subclass(torch.Tensor)[keep][keep_boxes]
            out["masks"] = F.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0].to(torch.uint8)
        return {k: v.to(self.device) for k, v in out.items()}

    def on_validation_epoch_start(self) -> None:
        self.val_coco.reset()
        self._vis = []

    def validation_step(self, batch: DetectionBatch, batch_idx):
        images, targets = batch.images, batch.targets
        if not images:
            return
        with self.roi_masks():  # pasted at the original size below, box by box
            if self.compute_val_loss:
                detections, losses = self.eval_model.detect_and_losses(
                    images, [self.loss_target(t, im.shape[-2:]) for im, t in zip(images, targets)])
                for name, value in losses.items():
                    self.val_losses[name].update(value, weight=len(images))
            else:
                detections = self.eval_model(images)
        for image, det, tgt in zip(images, detections, targets):
            orig = tuple(int(v) for v in tgt["orig_size"])
            pred = detections_to_original(det, image.shape[-2:], orig, rle=True)
            gt = {k: torch.as_tensor(tgt[k]).as_subclass(torch.Tensor)
                  for k in ("boxes", "labels", "iscrowd", "area", "orig_size", *(("masks",) if self.with_masks else ()))}
            self.val_coco.update(pred, gt, int(tgt["image_id"]))
            if len(self._vis) < self.num_vis_images:
                self._vis.append(self.draw(image, det, tgt, orig))

    def roi_masks(self):
        """The detector's masks left as RoI masks (N x 1 x M x M) while this is open (mask detectors)."""
        return self.eval_model.roi_masks() if self.with_masks else contextlib.nullcontext()

    def panel(self, image: torch.Tensor, det: dict, title: str) -> Panel:
        """Detections (boxes xyxy, labels, scores, optional masks N x H x W) drawn on ``image``."""
        labels = [int(l) for l in det["labels"]]
        scores = det["scores"].tolist() if "scores" in det else [None] * len(labels)
        masks = det.get("masks")
        return Panel(to_rgb_array(image), title, boxes=det["boxes"].detach().cpu().numpy(), box_classes=labels,
                     box_texts=[self.class_names[l] + ("" if s is None else f" {s:.2f}") for l, s in zip(labels, scores)],
                     masks=None if masks is None else masks.cpu().numpy())

    def draw(self, image: torch.Tensor, det: dict, tgt: dict, orig) -> np.ndarray:
        """Prediction (left) and ground truth (right) on the (resized) validation image."""
        keep = det["scores"] >= self.vis_score_thresh
        pred = {k: v[keep] for k, v in det.items()}
        size = tuple(image.shape[-2:])
        if "masks" in pred:  # RoI masks, pasted on the shown image
            pred["masks"] = paste_masks_in_image(pred["masks"], pred["boxes"], size)[:, 0] > 0.5
        gt = {"boxes": resize_boxes(tgt["boxes"].as_subclass(torch.Tensor).float(), orig, size), "labels": tgt["labels"]}
        if self.with_masks and len(tgt["masks"]):
            gt["masks"] = F.interpolate(tgt["masks"].as_subclass(torch.Tensor)[None].float(), size=size)[0] > 0
        return render([self.panel(image, pred, f"prediction (score >= {self.vis_score_thresh:g})"),
                       self.panel(image, gt, "ground truth")], self.class_names)

    def on_validation_epoch_end(self) -> None:
        self.val_coco.gather()
        result = self.val_coco.compute()  # every process evaluates all images (the same result)
        for iou_type, prefix in (("bbox", ""), ("segm", "mask_")):
            for key in MAP_KEYS:
                value = result.get(f"{iou_type}_{key}")
                if value is not None:  # in percent, as the papers; pycocotools' -1 (no such objects) stays -1
                    value = float(value) * 100 if float(value) >= 0 else -1.0
                    self.log(f"val/{prefix}{key}", value, prog_bar=key == "map", sync_dist=False)
        if self.compute_val_loss:  # torchmetrics syncs; the sum of the terms' means is the mean of the total
            means = {name: metric.compute() for name, metric in self.val_losses.items()}
            for name, value in means.items():
                self.log(f"val/{name}", value, sync_dist=False)
            self.log("val/loss", sum(means.values()), sync_dist=False)
            for metric in self.val_losses.values():
                metric.reset()
        self.last_per_class = self.per_class_ap(result)
        self.log_table("val/per_class", ["class", *self.last_per_class],
                       [[n, *(v[n] for v in self.last_per_class.values())] for n in self.class_names
                        if any(v[n] is not None for v in self.last_per_class.values())])
        self.log_images("val/predictions", self._vis)
        self._vis = []

    def per_class_ap(self, result: dict) -> dict[str, dict[str, float | None]]:
        """COCO AP (%) per class from ``CocoEvaluator.compute`` (None: no ground truth of the class)."""
        out = {}
        for iou_type, key in (("bbox", "ap"), ("segm", "mask_ap")):
            values = result.get(f"{iou_type}_ap_per_class")
            if values is not None:
                out[key] = {n: (round(v * 100, 2) if v >= 0 else None) for n, v in zip(self.class_names, values)}
        return out

    def extra_summary(self) -> dict:
        """Per-class box (and mask) AP of the last validation, by class name."""
        return {f"per_class_{k}": v for k, v in self.last_per_class.items()}

    # ---- prediction -----------------------------------------------------------------
    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict]:
        """Detections scoring at least ``vis_score_thresh`` on the original image, as COCO results
        entries (xywh boxes, RLE masks) with their class names; the figure draws them."""
        records = []
        with self.roi_masks():
            detections = self.eval_model(batch.images)
        for image, det, original in zip(batch.images, detections, batch.originals):
            pred = detections_to_original(det, image.shape[-2:], original.shape[-2:])
            keep = pred["scores"] >= self.vis_score_thresh
            pred = {k: v[keep] for k, v in pred.items()}
            entries = coco_results(pred, self.category_ids)
            for entry, label in zip(entries, pred["labels"].tolist()):
                entry["label"], entry["class"] = label, self.class_names[label]
            title = f"prediction (score >= {self.vis_score_thresh:g})"
            records.append({"detections": entries,
                            "figure": render([self.panel(original, pred, title)], self.class_names)})
        return records

    # ---- results --------------------------------------------------------------------
    @property
    def results(self) -> list[dict]:
        """The last validation's detections (of every process) as COCO results entries."""
        return self.val_coco.results

    def write_results(self, path: str | Path) -> Path:
        """The last validation's detections (of every process) as a COCO results JSON (original
        category ids, xywh boxes, RLE masks)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path

    write_coco_results = write_results
