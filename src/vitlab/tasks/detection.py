"""COCO detection / instance segmentation: our backbones in any detector of ``vitlab.heads``.

The detector is ``module.head`` (a ``_target_`` in ``vitlab.heads``: RetinaNet, (Cascade) Mask
R-CNN, ATSS, GFL, Sparse R-CNN, DETR; those with ``with_masks`` also report mask AP), built
with the backbone, the dataset's class count and its normalisation statistics). Metrics are torchmetrics'
``MeanAveragePrecision`` with the pycocotools backend (COCO's own evaluation),
on the original image sizes, crowd regions marked ``iscrowd``. ``write_results``
writes the last validation's detections as a COCO results JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.transform import resize_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from vitlab.build import build_backbone, instantiate
from vitlab.data.base import DatasetInfo, DetectionBatch
from vitlab.tasks.base import VitlabTask, check_legacy_num_classes

# torchmetrics' result keys -> ours (``val/<prefix><name>``)
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large")


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
        num_classes: int | None = None,  # stored configs of vitlab < 0.2; the dataset decides now
    ):
        super().__init__(backbone, schedule, info)
        check_legacy_num_classes(num_classes, self.info)
        self.save_plain_hyperparameters(ignore=["num_classes"])
        if tta and (list(tta.get("scales", [1.0])) != [1.0] or tta.get("flip")):
            raise ValueError(f"test-time augmentation {tta} is implemented for segmentation only; use tta=none")
        self.num_classes = self.info.num_classes
        self.num_vis_images = num_vis_images
        self.vis_score_thresh = vis_score_thresh
        self.model = self.build_model(self.backbone_cfg, {"head": head}, self.info)
        self.with_masks = bool(getattr(self.model, "with_masks", False))
        if self.with_masks != self.info.with_masks:
            raise ValueError(f"data.with_masks={self.info.with_masks} does not match module.head "
                             f"({type(self.model).__name__}): (Cascade) Mask R-CNN needs masks, the box-only "
                             f"detectors none")
        iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        self.val_map = MeanAveragePrecision(backend="pycocotools", iou_type=iou_types)
        self.category_ids = list(self.info.category_ids or range(1, self.num_classes + 1))
        self.class_names = list(self.info.class_names)
        self.results: list[dict] = []  # COCO results of the last validation (for write_results)
        self._vis: list[torch.Tensor] = []

    @classmethod
    def build_model(cls, backbone: dict, module: dict, info: DatasetInfo) -> nn.Module:
        """The detector: ``module["head"]`` around the backbone, for the dataset's classes; images are
        normalised inside the model with the dataset's statistics."""
        return instantiate(module["head"], "module.head", backbone=build_backbone(backbone),
                           num_classes=info.num_classes, image_mean=list(info.mean), image_std=list(info.std))

    def forward(self, images: list[torch.Tensor]):
        return self.model(images)

    # ---- training -------------------------------------------------------------------
    def training_step(self, batch: DetectionBatch, batch_idx):
        images, targets, skipped = batch
        if skipped.item():
            self.log("data/skipped_corrupt", skipped.float(), reduce_fx="sum")
        if not images:
            return None  # every image of the batch was unreadable and skipped
        losses = self.model(images, targets)
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=len(images))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
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

    def on_validation_epoch_start(self) -> None:
        self.results, self._vis = [], []

    def validation_step(self, batch: DetectionBatch, batch_idx):
        images, targets = batch.images, batch.targets
        if not images:
            return
        detections = self.model(images)
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
            self._collect_results(int(tgt["image_id"]), pred)
            if len(self._vis) < self.num_vis_images:
                self._vis.append(self.draw(image, det, tgt, orig))
        self.val_map.update(preds, gts)

    def _collect_results(self, image_id: int, pred: dict) -> None:
        boxes = pred["boxes"].cpu().clone()
        boxes[:, 2:] -= boxes[:, :2]  # xyxy -> COCO's xywh
        rles = None
        if "masks" in pred:
            rles = mask_utils.encode(pred["masks"].cpu().numpy().transpose(1, 2, 0).astype("uint8", order="F"))
        for k in range(len(boxes)):
            res = {"image_id": image_id, "category_id": self.category_ids[int(pred["labels"][k])],
                   "bbox": [round(float(v), 2) for v in boxes[k]], "score": round(float(pred["scores"][k]), 4)}
            if rles is not None:
                res["segmentation"] = {"size": rles[k]["size"], "counts": rles[k]["counts"].decode("ascii")}
            self.results.append(res)

    def draw(self, image: torch.Tensor, det: dict, tgt: dict, orig) -> torch.Tensor:
        """Prediction (left) and ground truth (right) on the (resized) validation image."""
        canvas = (image.clamp(0, 1) * 255).to(torch.uint8).cpu()
        keep = det["scores"] >= self.vis_score_thresh
        names = [f"{self.class_names[int(l)]} {s:.2f}" for l, s in zip(det["labels"][keep], det["scores"][keep])]
        pred = canvas
        if self.with_masks and keep.any():
            pred = draw_segmentation_masks(pred, det["masks"][keep][:, 0].cpu() > 0.5, alpha=0.4)
        if keep.any():
            pred = draw_bounding_boxes(pred, det["boxes"][keep].cpu(), labels=names, colors="red")
        gt_boxes = resize_boxes(tgt["boxes"].as_subclass(torch.Tensor).float(), orig, image.shape[-2:])
        gt = canvas
        if len(gt_boxes):
            gt = draw_bounding_boxes(canvas, gt_boxes, labels=[self.class_names[int(l)] for l in tgt["labels"]],
                                     colors="lime")
        return torch.cat([pred, gt], dim=-1)

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()  # syncs across processes; runs pycocotools' COCOeval
        self.val_map.reset()
        for iou_type, prefix in (("bbox", ""), ("segm", "mask_")):
            for key in MAP_KEYS:
                value = result.get(f"{iou_type}_{key}", result.get(key) if iou_type == "bbox" else None)
                if value is not None:  # in percent, as the papers; pycocotools' -1 (no such objects) stays -1
                    value = float(value) * 100 if float(value) >= 0 else -1.0
                    self.log(f"val/{prefix}{key}", value, prog_bar=key == "map", sync_dist=False)
        self.log_images("val/predictions", self._vis)
        self._vis = []

    # ---- results --------------------------------------------------------------------
    def write_results(self, path: str | Path) -> Path:
        """The last validation's detections as a COCO results JSON (original category ids, xywh, RLE).

        Each process writes the images it evaluated; run ``eval.py`` on one device for one file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path

    write_coco_results = write_results
