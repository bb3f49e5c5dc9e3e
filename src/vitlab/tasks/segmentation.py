"""ADE20K semantic segmentation: backbone + decode head (+ auxiliary head), mmseg's recipe.

Loss: cross-entropy (ignore 255) on logits upsampled to the crop, reduced as mmseg 0.x does (summed
over the labelled pixels, divided by all pixels of the batch, ignored ones included), plus
``aux_weight`` x the auxiliary head's (UperNet: FCN on stage 3, 0.4).
Evaluation: whole-image or sliding-window inference on the validation image
(shorter side 512), optional multi-scale + flip TTA (softmax averaged), logits
resized to the label map's original size; one confusion matrix
(``ConfusionMatrix``, on the device) accumulated over the whole validation set gives mIoU, per-class
IoU and pixel accuracy exactly as mmseg computes them (classes absent from both
prediction and ground truth are left out of the mean). ``val/loss``: the decode head's
cross-entropy of the evaluated class probabilities per labelled pixel (no auxiliary head); compare it
with ``train/loss_decode`` divided by the labelled fraction of the training crops.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric

from vitlab.data.base import DatasetInfo, PredictBatch, SegmentationBatch
from vitlab.heads.segmentation import Segmentor
from vitlab.runtime.build import build_backbone, instantiate
from vitlab.tasks.base import VitlabTask
from vitlab.tasks.visualize import Panel, render, to_rgb_array

# module.test_mode: one forward on the whole image, or mmseg's sliding window (crop_size / stride)
TEST_MODES = ("whole", "slide")

def iou_from_confmat(confmat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU (NaN where a class is in neither prediction nor label) and pixel accuracy."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = tp.sum() / confmat.sum().clamp(min=1)
    return iou, acc


class ConfusionMatrix(Metric):
    """``num_classes`` x ``num_classes`` counts (rows: label, columns: prediction), pixels labelled
    ``ignore_index`` left out, summed over processes. Hand-written (10 lines) instead of torchmetrics'
    ``MulticlassConfusionMatrix`` because that one drops ignored pixels by boolean indexing and
    ``bincount``, both of which wait for the device on every image; here ignored pixels go to a
    spare bin of a ``scatter_add_``, which stays on the device (ADE20K val: 2,000 images)."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confmat", torch.zeros(num_classes * num_classes + 1, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        pred, label = pred.flatten().long(), label.flatten().long()
        index = label * self.num_classes + pred
        if self.ignore_index is not None:
            index = torch.where(label == self.ignore_index, self.num_classes ** 2, index)
        self.confmat.scatter_add_(0, index, torch.ones_like(index))

    def compute(self) -> torch.Tensor:
        return self.confmat[:-1].view(self.num_classes, self.num_classes)


class SegmentationTask(VitlabTask):
    def __init__(
        self,
        backbone: dict,
        schedule: dict,
        info: DatasetInfo | dict,
        head: dict | None = None,
        auxiliary_head: dict | None = None,
        aux_weight: float = 0.4,
        test_mode: str = "whole",
        crop_size: list[int] = (512, 512),
        stride: list[int] = (341, 341),
        size_divisor: int = 32,
        tta: dict | None = None,
        num_vis_images: int = 4,
        ema_decay: float | None = None,
        compile: bool | str = False,
    ):
        super().__init__(backbone, schedule, info, compile)
        if head is None:
            raise ValueError("module.head is missing: the segmentation task needs a decode head (conf/head/)")
        self.save_plain_hyperparameters()
        if test_mode not in TEST_MODES:
            raise ValueError(f"module.test_mode={test_mode!r}: expected one of {', '.join(TEST_MODES)}")
        self.num_classes = self.info.num_classes
        self.ignore_index = self.info.ignore_index if self.info.ignore_index is not None else -100
        self.aux_weight = aux_weight
        self.test_mode = test_mode
        self.crop_size, self.stride = tuple(crop_size), tuple(stride)
        self.size_divisor = size_divisor
        tta = dict(tta or {})
        self.tta_scales = [float(s) for s in tta.get("scales", [1.0])]
        self.tta_flip = bool(tta.get("flip", False))
        self.num_vis_images = num_vis_images
        self.register_buffer("mean", torch.tensor(self.info.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.info.std).view(3, 1, 1), persistent=False)
        self.model = self.build_model(self.backbone_cfg, {"head": head, "auxiliary_head": auxiliary_head}, self.info)
        self.init_ema(ema_decay)
        self.confmat = ConfusionMatrix(self.num_classes, ignore_index=self.info.ignore_index)
        self.val_loss = MeanMetric()  # cross-entropy per labelled pixel over the validation set
        self.class_names = list(self.info.class_names)
        self.last_iou: list[float] | None = None
        self._vis: list[np.ndarray] = []

    @classmethod
    def build_model(cls, backbone: dict, module: dict, info: DatasetInfo) -> nn.Module:
        """Backbone + ``module["head"]`` (+ ``module["auxiliary_head"]``) for the dataset's classes."""
        backbone = build_backbone(backbone, dense=True)

        def head(cfg, where):
            if not cfg:
                return None
            return instantiate(cfg, where, in_channels=list(backbone.out_channels), strides=list(backbone.strides),
                               num_classes=info.num_classes)

        return Segmentor(backbone, head(module["head"], "module.head"),
                         head(module.get("auxiliary_head"), "module.auxiliary_head"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    # ---- training -------------------------------------------------------------------
    def training_step(self, batch: SegmentationBatch, batch_idx):
        images, labels, skipped = batch.images, batch.labels, batch.skipped
        self.log_skipped(skipped)
        logits, aux = self.model(images)
        loss = self.pixel_loss(logits, labels)
        self.log("train/loss_decode", loss, batch_size=len(images))
        if aux is not None:
            aux_loss = self.pixel_loss(aux, labels)
            self.log("train/loss_aux", aux_loss, batch_size=len(images))
            loss = loss + self.aux_weight * aux_loss
        self.log("train/loss", loss, batch_size=len(images))
        self.log_lr()
        return loss

    def pixel_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy as mmsegmentation 0.x's ``CrossEntropyLoss`` reduces it: summed over the labelled
        pixels, divided by all pixels, ignored ones included (``avg_non_ignore=False``, its default)."""
        return F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum") / labels.numel()

    # ---- inference ------------------------------------------------------------------
    def predict_whole(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for a 1x3xHxW image: pad to ``size_divisor`` (zeros after normalisation), crop back."""
        h, w = image.shape[-2:]
        d = self.size_divisor
        padded = F.pad(image, (0, (-w) % d, 0, (-h) % d))
        return self.eval_model(padded)[..., :h, :w]

    def predict_slide(self, image: torch.Tensor) -> torch.Tensor:
        """mmseg's sliding-window inference: overlapping crops, logits averaged where they overlap.

        Neither torchvision nor timm has it (MONAI's sliding_window_inference would be a new dependency).
        """
        (h, w), (ch, cw), (sh, sw) = image.shape[-2:], self.crop_size, self.stride
        rows = max(h - ch + sh - 1, 0) // sh + 1
        cols = max(w - cw + sw - 1, 0) // sw + 1
        logits = image.new_zeros((1, self.num_classes, h, w))
        count = image.new_zeros((1, 1, h, w))
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
                y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
                logits[..., y1:y2, x1:x2] += self.predict_whole(image[..., y1:y2, x1:x2])
                count[..., y1:y2, x1:x2] += 1
        return logits / count

    def inference(self, image: torch.Tensor, out_size) -> torch.Tensor:
        """Class probabilities (1xCxHxW at ``out_size``), averaged over TTA scales and flips."""
        predict = self.predict_slide if self.test_mode == "slide" else self.predict_whole
        h, w = image.shape[-2:]
        probs, n = 0.0, 0
        for scale in self.tta_scales:
            x = image if scale == 1.0 else F.interpolate(
                image, size=(int(h * scale + 0.5), int(w * scale + 0.5)), mode="bilinear", align_corners=False)
            for flip in ([False, True] if self.tta_flip else [False]):
                logits = predict(x.flip(-1) if flip else x)
                logits = logits.flip(-1) if flip else logits
                logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
                probs = probs + logits.softmax(1)
                n += 1
        return probs / n

    # ---- evaluation -----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._vis = []

    def validation_step(self, batch: SegmentationBatch, batch_idx):
        for image, label in zip(batch.images, batch.labels):
            probs = self.inference(image[None], label.shape[-2:])
            pred = probs.argmax(1)[0]
            self.confmat.update(pred.flatten(), label.flatten())
            valid = label != self.ignore_index
            if valid.any():  # -log p(true class) per labelled pixel: cross-entropy of the evaluated logits
                nll = F.nll_loss(probs.clamp_min(1e-12).log(), label[None], ignore_index=self.ignore_index)
                self.val_loss.update(nll, weight=int(valid.sum()))
            if len(self._vis) < self.num_vis_images:
                self._vis.append(self.draw(image, pred, label))

    def draw(self, image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor) -> np.ndarray:
        """Image | prediction | ground truth, at the label map's size."""
        rgb = (image * self.std + self.mean).clamp(0, 1)[None]
        rgb = to_rgb_array(F.interpolate(rgb, size=label.shape[-2:], mode="bilinear", align_corners=False)[0])
        ignore = self.info.ignore_index
        return render([Panel(rgb, "image"), Panel(rgb, "prediction", label_map=pred.cpu().numpy(), ignore_index=ignore),
                       Panel(rgb, "ground truth", label_map=label.cpu().numpy(), ignore_index=ignore)],
                      self.class_names)

    def on_validation_epoch_end(self) -> None:
        iou, acc = iou_from_confmat(self.confmat.compute())  # compute() syncs across processes
        self.confmat.reset()
        self.last_iou = iou.tolist()
        self.log("val/miou", float(iou.nanmean()) * 100, prog_bar=True)
        self.log("val/acc", float(acc) * 100)
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        per_class = self.extra_summary()["per_class_iou"]
        self.log_table("val/per_class", ["class", "iou"], [[n, v] for n, v in per_class.items() if v is not None])
        self.log_images("val/predictions", self._vis)
        self._vis = []

    def extra_summary(self) -> dict:
        """Per-class IoU (%) of the last validation, by class name (None: class absent from it)."""
        if self.last_iou is None:
            return {}
        return {"per_class_iou": {n: (None if v != v else round(v * 100, 2))  # v != v: NaN
                                  for n, v in zip(self.class_names, self.last_iou)}}

    # ---- prediction -----------------------------------------------------------------
    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict]:
        """The class map at the original size (evaluation's inference: whole or sliding window, TTA),
        each class's share of the pixels, and the image | prediction figure."""
        records = []
        for image, original in zip(batch.images, batch.originals):
            pred = self.inference(image[None], original.shape[-2:]).argmax(1)[0].cpu().numpy()
            ids, counts = np.unique(pred, return_counts=True)
            order = np.argsort(-counts, kind="stable")
            shares = {self.class_names[int(ids[i])]: round(float(counts[i] / pred.size) * 100, 2) for i in order}
            rgb = to_rgb_array(original)
            figure = render([Panel(rgb, "image"), Panel(rgb, "prediction", label_map=pred)], self.class_names)
            records.append({"classes": shares, "label_map": pred, "figure": figure})
        return records
