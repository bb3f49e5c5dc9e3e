"""COCO detection / instance segmentation: our backbones in any detector of ``vitlab.heads``.

The detector is ``module.head`` (a ``_target_`` in ``vitlab.heads``: RetinaNet, (Cascade) Mask
R-CNN, ATSS, GFL, Sparse R-CNN, DETR; those with ``with_masks`` also report mask AP), built
with the backbone, the dataset's class count and its normalisation statistics). Metrics are torchmetrics'
``MeanAveragePrecision`` with the pycocotools backend (COCO's own evaluation),
on the original image sizes, crowd regions marked ``iscrowd``, with per-class AP. ``write_results``
writes the last validation's detections as a COCO results JSON.

Validation loss (``val_loss: true``): torchvision's detectors compute their losses in training mode
only, so validation runs the detector's training-mode part a second time on the same images and
the features of the first pass (``detect_and_losses``): the backbone runs once, in evaluation mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.transform import resize_boxes

from vitlab.data.base import DatasetInfo, DetectionBatch, PredictBatch
from vitlab.runtime.build import build_backbone, instantiate
from vitlab.tasks.base import VitlabTask
from vitlab.tasks.visualize import Panel, render, to_rgb_array

# torchmetrics' result keys -> ours (``val/<prefix><name>``)
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large")


def gather_per_image_states(metric: MeanAveragePrecision, image_ids: list[int], results: list[dict]) -> list[dict]:
    """Every process's per-image mAP states (and COCO results) on every process, in image-id order.

    torchmetrics syncs MeanAveragePrecision's per-image lists one tensor at a time, which needs the
    same number of images on every process; exact evaluation (each image once, no padding) gives
    the processes different counts, so the states travel as Python objects instead. Sorting by
    image id makes the result identical to a single process's, whatever the number of processes.
    Returns the gathered results (the metric's states are replaced in place).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return results
    states = {k: [v.cpu() if isinstance(v, torch.Tensor) else v for v in vals] for k, vals in metric.metric_state.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"ids": image_ids, "states": states, "results": results})
    order = sorted((image_id, rank, i) for rank, part in enumerate(gathered) for i, image_id in enumerate(part["ids"]))
    for key, values in states.items():
        if len(values) == len(image_ids):  # per-image lists (the mask lists stay empty for boxes only)
            setattr(metric, key, [gathered[rank]["states"][key][i] for _, rank, i in order])
    return sorted((r for part in gathered for r in part["results"]), key=lambda r: r["image_id"])


def coco_results(pred: dict, category_ids: list[int], image_id: int | None = None) -> list[dict]:
    """Detections on an original image -> COCO results entries (category ids, xywh boxes, RLE masks)."""
    boxes = pred["boxes"].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> COCO's xywh
    rles = None
    if "masks" in pred:
        rles = mask_utils.encode(pred["masks"].cpu().numpy().transpose(1, 2, 0).astype("uint8", order="F"))
    entries = []
    for k in range(len(boxes)):
        entry = {} if image_id is None else {"image_id": image_id}
        entry.update(category_id=category_ids[int(pred["labels"][k])], bbox=[round(float(v), 2) for v in boxes[k]],
                     score=round(float(pred["scores"][k]), 4))
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
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        # class_metrics: per-class AP and AR100 (one more COCOeval pass, restricted to each class in turn).
        # Synced by gather_per_image_states (see there), not by torchmetrics itself.
        self.val_map = MeanAveragePrecision(backend="pycocotools", iou_type=iou_types, class_metrics=True,
                                            sync_on_compute=False)
        self._val_image_ids: list[int] = []  # the image of each entry in val_map's per-image states
        self.compute_val_loss = val_loss
        self.val_losses = nn.ModuleDict({name: MeanMetric() for name in self.model.loss_names})
        self.category_ids = list(self.info.category_ids or range(1, self.num_classes + 1))
        self.class_names = list(self.info.class_names)
        self.results: list[dict] = []  # COCO results of the last validation (for write_results)
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
    def to_original_size(self, det: dict, image_size, orig_size) -> dict:
        """Detections on the resized image -> the original image (where COCO's ground truth lives)."""
        out = {"boxes": resize_boxes(det["boxes"], image_size, orig_size), "scores": det["scores"],
               "labels": det["labels"]}
        if "masks" in det:
            masks = det["masks"]
            if masks.numel():
                masks = F.interpolate(masks, size=tuple(orig_size), mode="bilinear", align_corners=False)
            else:
                masks = masks.new_zeros((0, 1, *orig_size))
            out["masks"] = masks[:, 0] > 0.5
        return out

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
        self.results, self._vis, self._val_image_ids = [], [], []

    def validation_step(self, batch: DetectionBatch, batch_idx):
        images, targets = batch.images, batch.targets
        if not images:
            return
        if self.compute_val_loss:
            detections, losses = self.eval_model.detect_and_losses(
                images, [self.loss_target(t, im.shape[-2:]) for im, t in zip(images, targets)])
            for name, value in losses.items():
                self.val_losses[name].update(value, weight=len(images))
        else:
            detections = self.eval_model(images)
        preds, gts = [], []
        for image, det, tgt in zip(images, detections, targets):
            orig = tuple(int(v) for v in tgt["orig_size"])
            pred = self.to_original_size(det, image.shape[-2:], orig)
            gt = {"boxes": tgt["boxes"].as_subclass(torch.Tensor).to(self.device),
                  "labels": tgt["labels"].to(self.device), "iscrowd": tgt["iscrowd"].to(self.device),
                  "area": tgt["area"].to(self.device)}
            if self.with_masks:
                gt["masks"] = tgt["masks"].as_subclass(torch.Tensor).bool().to(self.device)
            preds.append(pred)
            gts.append(gt)
            self.results.extend(coco_results(pred, self.category_ids, image_id=int(tgt["image_id"])))
            self._val_image_ids.append(int(tgt["image_id"]))
            if len(self._vis) < self.num_vis_images:
                self._vis.append(self.draw(image, det, tgt, orig))
        self.val_map.update(preds, gts)

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
        if "masks" in pred:
            pred["masks"] = pred["masks"][:, 0] > 0.5
        size = tuple(image.shape[-2:])
        gt = {"boxes": resize_boxes(tgt["boxes"].as_subclass(torch.Tensor).float(), orig, size), "labels": tgt["labels"]}
        if self.with_masks and len(tgt["masks"]):
            gt["masks"] = F.interpolate(tgt["masks"].as_subclass(torch.Tensor)[None].float(), size=size)[0] > 0
        return render([self.panel(image, pred, f"prediction (score >= {self.vis_score_thresh:g})"),
                       self.panel(image, gt, "ground truth")], self.class_names)

    def on_validation_epoch_end(self) -> None:
        self.results = gather_per_image_states(self.val_map, self._val_image_ids, self.results)
        result = self.val_map.compute()  # runs pycocotools' COCOeval on every process's images
        self.val_map.reset()
        for iou_type, prefix in (("bbox", ""), ("segm", "mask_")):
            for key in MAP_KEYS:
                value = result.get(f"{iou_type}_{key}", result.get(key) if iou_type == "bbox" else None)
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
        """COCO AP (%) per class from torchmetrics' ``class_metrics`` (None: class in neither the
        predictions nor the ground truth, or in the predictions only)."""
        classes = result["classes"].flatten().tolist()
        out = {}
        for iou_type, key in (("bbox", "ap"), ("segm", "mask_ap")):
            values = result.get(f"{iou_type}_map_per_class", result.get("map_per_class") if iou_type == "bbox" else None)
            if values is None:
                continue
            found = dict(zip(classes, values.flatten().tolist()))
            out[key] = {n: (round(found[i] * 100, 2) if found.get(i, -1) >= 0 else None)
                        for i, n in enumerate(self.class_names)}
        return out

    def extra_summary(self) -> dict:
        """Per-class box (and mask) AP of the last validation, by class name."""
        return {f"per_class_{k}": v for k, v in self.last_per_class.items()}

    # ---- prediction -----------------------------------------------------------------
    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict]:
        """Detections scoring at least ``vis_score_thresh`` on the original image, as COCO results
        entries (xywh boxes, RLE masks) with their class names; the figure draws them."""
        records = []
        for image, det, original in zip(batch.images, self.eval_model(batch.images), batch.originals):
            pred = self.to_original_size(det, image.shape[-2:], original.shape[-2:])
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
    def write_results(self, path: str | Path) -> Path:
        """The last validation's detections (of every process) as a COCO results JSON (original
        category ids, xywh boxes, RLE masks)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path

    write_coco_results = write_results
