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
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from vitlab.data.base import DatasetInfo, DetectionBatch, PredictBatch
from vitlab.runtime.build import build_backbone, instantiate
from vitlab.tasks.base import VitlabTask
from vitlab.tasks.coco_masks import PastePool, die_with_parent, encode_masks, paste_masks_rle
from vitlab.tasks.visualize import Panel, render, to_rgb_array

# torchmetrics' result keys -> ours (``val/<prefix><name>``)
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large")


class CocoEvaluator:
    """COCO evaluation of one validation pass: detections and ground truth kept per image as columns
    (category ids, xywh boxes, scores, RLE masks: each mask encoded once, as the results JSON needs it
    anyway), made into COCO entries and evaluated at the epoch's end by faster-coco-eval's COCOeval
    (C++; equal to pycocotools' COCOeval, tested), once per IoU type. Per-class AP / AR100 are read
    from that one evaluation's precision and recall arrays (mmdet's ``classwise``) instead of one more
    evaluation per class (torchmetrics' ``class_metrics``: 80 more passes). The ground truth's ``area``
    is the annotation's (as in COCO's own files) for boxes and masks alike.

    It replaces torchmetrics' ``MeanAveragePrecision`` here: that one re-encodes every predicted
    mask on each update (the results JSON encoded them again) and reruns COCOeval per class, which
    made box+mask evaluation of COCO val take many minutes. Columns, not an entry dict per
    detection: COCO val's 500,000 detections as dicts (each with a box list and an RLE dict) were
    ~2 million objects the garbage collector went through again and again during the pass.
    """

    def __init__(self, with_masks: bool, category_ids: list[int], paste_workers: int = 0):
        self.iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        self.category_ids = list(category_ids)
        self._paster = PastePool(paste_workers)
        self.reset()

    def paste(self, masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]):
        """``paste_masks_rle``, in the pool's processes when it has some (``detections_to_original``'s
        ``paste``): the RLEs, or a ``Future`` of them that ``finish_pastes`` waits for."""
        return self._paster.paste(masks, boxes, size)

    def finish_pastes(self) -> None:
        """Every mask pasted (the pool's processes ended): before the entries are read."""
        self._paster.close()
        for k, (image_id, (cats, boxes, scores, rles)) in enumerate(self._results):
            if isinstance(rles, Future):
                self._results[k] = (image_id, (cats, boxes, scores, rles.result()))

    def reset(self) -> None:
        self._paster.close()
        self.images: list[dict] = []
        self._ground_truth: list[tuple] = []  # per image: image id, _columns(...), is-crowd flags, areas
        self._results: list[tuple] = []  # per image: image id, _columns(...)

    def update(self, pred: dict, target: dict, image_id: int) -> None:
        """One image: ``pred`` (boxes xyxy, labels, scores, and RLEs ``segmentation`` from
        ``detections_to_original`` or masks N x H x W) and ``target`` (boxes, labels, iscrowd, area,
        masks) on the original image of ``target["orig_size"]`` (H, W)."""
        height, width = (int(v) for v in target["orig_size"])
        self.images.append({"id": image_id, "height": height, "width": width})
        self._results.append((image_id, _columns(pred, self.category_ids)))
        gt = {"boxes": target["boxes"], "labels": target["labels"],
              **({"masks": target["masks"]} if "segm" in self.iou_types else {})}
        self._ground_truth.append((image_id, _columns(gt, self.category_ids, precise=True),
                                   target["iscrowd"].tolist(), target["area"].tolist()))

    @property
    def results(self) -> list[dict]:
        """Every detection as a COCO results entry (image id order after ``gather``)."""
        self.finish_pastes()
        return [entry for image_id, columns in self._results for entry in _entries(columns, image_id)]

    def ground_truth(self, iou_type: str | None = None) -> list[dict]:
        """Every ground-truth object as a COCO annotation (ids from 1, in image order), with one IoU type's
        geometry only (``bbox``: no masks; ``segm``: no boxes) or both."""
        out = []
        for image_id, columns, crowds, areas in self._ground_truth:
            entries = _entries(columns, image_id, with_masks=iou_type != "bbox", with_boxes=iou_type != "segm")
            for entry, crowd, area in zip(entries, crowds, areas):
                del entry["score"]
                entry.update(iscrowd=int(crowd), area=float(area), id=len(out) + 1)
                out.append(entry)
        return out

    def gather(self) -> None:
        """Every process's images on every process, in image-id order (exact evaluation gives the
        processes different numbers of images, so the columns travel as Python objects)."""
        self.finish_pastes()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self.images, self._ground_truth, self._results))
        self.images = sorted((im for p in parts for im in p[0]), key=lambda im: im["id"])
        self._ground_truth = sorted((g for p in parts for g in p[1]), key=lambda g: g[0])
        self._results = sorted((r for p in parts for r in p[2]), key=lambda r: r[0])

    def compute(self) -> dict[str, float | list[float]]:
        """``{iou_type}_{key}`` for the 12 COCO numbers (fractions; -1 where COCOeval has none) and
        ``{iou_type}_ap_per_class`` / ``{iou_type}_ar100_per_class`` (one per category id, in order;
        -1: no ground truth of that class). With masks, a second core and no other Python thread, the
        mask evaluation runs in a forked process while this one evaluates the boxes: the two share
        nothing, each takes tens of seconds on COCO val, and a fork reads the entries without copying
        or pickling them."""
        self.finish_pastes()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1  # elsewhere than Linux: one process
        # forking a process with other Python threads (a pin-memory thread, a logger's) can copy a lock
        # one of them holds: then the one process, ~7 s more at COCO val's size
        alone = threading.active_count() == 1
        if len(self.iou_types) == 1 or not self.images or cores < 2 or not alone:
            return {k: v for iou_type in self.iou_types for k, v in self.evaluate(iou_type).items()}
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=self._evaluate_to, args=("segm", send, os.getpid()), daemon=True)
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

    def _evaluate_to(self, iou_type: str, send, parent: int) -> None:
        """In the forked process: ``evaluate(iou_type)`` (or its error) sent back; killed with its parent."""
        die_with_parent(parent)
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
        # segm detection's area from its box
        masks = iou_type == "segm"
        gt = COCO({"images": self.images, "categories": cats, "annotations": self.ground_truth(iou_type)})
        dets = [entry for image_id, columns in self._results for entry in _entries(columns, image_id, masks, not masks)]
        if not dets:  # none at all (an early, untrained detector): AP 0 where there is ground truth
            dt = COCO({"images": self.images, "annotations": [], "categories": cats})
        elif iou_type == "segm":
            # loadRes' own work for masks (each mask's area, as it computes it), for all masks in one
            # call rather than one per detection. loadRes also sets each mask's box, which a mask
            # evaluation never reads (COCOeval: IoUs from the masks, area ranges from the areas; equal to
            # pycocotools' with loadRes, tested): a placeholder instead of ~2 s at COCO val's size
            for k, (d, area) in enumerate(zip(dets, coco_mask.area([d["segmentation"] for d in dets])), 1):
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


def detections_to_original(det: dict, image_size, orig_size, rle: bool = False, paste=paste_masks_rle) -> dict:
    """A detector's output on the (resized) network input -> the original image, where COCO's ground
    truth lives: boxes rescaled; RoI masks (``_Detector.roi_masks``) pasted straight at the original
    size as torchvision's ``paste_masks_in_image`` does, as RLEs (``rle``: ``segmentation``, the
    evaluation's form, never making full-size masks; by ``paste``, e.g. ``CocoEvaluator.paste``) or
    N x H x W bool ``masks``."""
    orig_size = tuple(int(v) for v in orig_size)
    boxes = resize_boxes(det["boxes"], tuple(image_size), orig_size)
    out = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
    if "masks" in det:
        if rle:
            out["segmentation"] = paste(det["masks"], boxes, orig_size)
        else:
            out["masks"] = paste_masks_in_image(det["masks"], boxes, orig_size)[:, 0] > 0.5
    return out


def _columns(pred: dict, category_ids: list[int], precise: bool = False) -> tuple:
    """Detections on an original image -> (category ids, N x 4 xywh boxes, scores, RLE masks or None),
    the columns of their COCO results entries (``_entries``): ``segmentation`` RLEs as they are, or
    ``masks`` N x H x W encoded; boxes and scores rounded as results files are written (``precise``:
    not rounded)."""
    boxes = pred["boxes"].detach().cpu().double().numpy().copy()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> COCO's xywh
    scores = pred["scores"].detach().cpu().float().double().numpy() if "scores" in pred else np.ones(len(boxes))
    if not precise:
        boxes, scores = boxes.round(2), scores.round(4)
    rles = pred.get("segmentation")  # RLEs already (``detections_to_original``); else N x H x W masks
    if rles is None and "masks" in pred:
        rles = encode_masks(pred["masks"])
    cats = np.asarray(category_ids)[pred["labels"].cpu().numpy().astype(np.int64)]
    return cats, boxes, scores, rles


def _entries(columns: tuple, image_id: int | None = None, with_masks: bool = True, with_boxes: bool = True) -> list[dict]:
    """``_columns``' detections as COCO results entries (``image_id`` first when given)."""
    cats, boxes, scores, rles = columns
    with_masks = with_masks and rles is not None
    entries = []
    for k, (cat, box, score) in enumerate(zip(cats.tolist(), boxes.tolist(), scores.tolist())):
        entry = {} if image_id is None else {"image_id": image_id}
        entry["category_id"] = cat
        if with_boxes:
            entry["bbox"] = box
        entry["score"] = score
        if with_masks:
            entry["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
        entries.append(entry)
    return entries


def coco_results(pred: dict, category_ids: list[int], image_id: int | None = None,
                 precise: bool = False) -> list[dict]:
    """Detections on an original image -> COCO results entries (category ids, xywh boxes, RLE masks:
    ``segmentation`` RLEs as they are or ``masks`` N x H x W encoded); boxes and scores rounded as
    results files are written (``precise``: not rounded)."""
    return _entries(_columns(pred, category_ids, precise), image_id)


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
        paste_workers: int = 2,
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
        self.val_coco = CocoEvaluator(self.with_masks, self.category_ids, paste_workers if self.with_masks else 0)
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
            if len(masks):
                out["masks"] = F.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0].to(torch.uint8)
            else:  # an image without objects (COCO val has 48): interpolate refuses an empty tensor
                out["masks"] = torch.zeros((0, *size), dtype=torch.uint8)
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
            pred = detections_to_original(det, image.shape[-2:], orig, rle=True, paste=self.val_coco.paste)
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
