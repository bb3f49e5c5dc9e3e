"""Image classification: any backbone + its family's head, the DeiT-style recipe via timm."""
from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vitlab.data.base import DatasetInfo, ImageBatch, PredictBatch
from vitlab.runtime.build import build_classifier
from vitlab.tasks.base import VitlabTask
from vitlab.tasks.visualize import Panel, confusion_figure, render, to_rgb_array, top_confusions


class ClassificationTask(VitlabTask):
    fixed_input_size = True  # training crops and evaluation images share one size
    def __init__(
        self,
        backbone: dict,
        schedule: dict,
        info: DatasetInfo | dict,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        ema_decay: float | None = None,
        compile: bool | str = False,
    ):
        super().__init__(backbone, schedule, info, compile)
        self.save_plain_hyperparameters()
        num_classes = self.info.num_classes
        self.model = self.build_model(self.backbone_cfg, {}, self.info)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing, num_classes=num_classes,
            )
            self.train_loss = SoftTargetCrossEntropy()  # mixup makes soft targets (smoothing included)
        elif label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.init_ema(ema_decay)
        top5 = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.val_loss = MeanMetric()  # weighted by images, synced once at the end (uneven ranks are fine)
        # per-class accuracy and the confusions: one C x C count matrix (8 MB for ImageNet's 1000)
        self.val_confmat = MulticlassConfusionMatrix(num_classes, validate_args=False)
        self.last_confmat: torch.Tensor | None = None
        self.predict_topk = 5  # predict.py's topk=

    @classmethod
    def build_model(cls, backbone: dict, module: dict, info: DatasetInfo) -> nn.Module:
        return build_classifier(backbone, info.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: ImageBatch, batch_idx):
        images, targets = batch.images, batch.targets
        if self.mixup is not None:
            if images.shape[0] % 2:  # timm's batch mixup pairs samples: needs an even batch
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self.model(images), targets)
        self.log("train/loss", loss, batch_size=images.shape[0])
        self.log_lr(batch_size=images.shape[0])
        self.log_skipped(batch.skipped)
        return loss

    def validation_step(self, batch: ImageBatch, batch_idx):
        logits = self.eval_model(batch.images)
        self.val_loss.update(nn.functional.cross_entropy(logits, batch.targets), weight=len(batch.targets))
        self.val_top1.update(logits, batch.targets)
        self.val_top5.update(logits, batch.targets)
        self.val_confmat.update(logits.argmax(1), batch.targets)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics syncs the states across processes before compute()
        self.log("val/loss", self.val_loss.compute())
        self.log("val/top1", self.val_top1.compute() * 100, prog_bar=True)
        self.log("val/top5", self.val_top5.compute() * 100)
        self.last_confmat = self.val_confmat.compute().cpu()
        for metric in (self.val_loss, self.val_top1, self.val_top5, self.val_confmat):
            metric.reset()
        names = self.info.class_names
        per_class = self.per_class_accuracy()
        self.log_table("val/per_class", ["class", "top1", "images"],
                       [[n, per_class[n], int(c)] for n, c in zip(names, self.last_confmat.sum(1))])
        self.log_images("val/confusion", [confusion_figure(
            self.last_confmat, names, f"validation confusion matrix, epoch {self.current_epoch}")])

    def per_class_accuracy(self) -> dict[str, float | None]:
        """Top-1 (%) of each class in the last validation (None: no image of that class)."""
        confmat = self.last_confmat.double()
        images = confmat.sum(1)
        return {n: (round(float(confmat[i, i] / images[i]) * 100, 2) if images[i] else None)
                for i, n in enumerate(self.info.class_names)}

    def extra_summary(self) -> dict:
        """Per-class top-1 and the most frequent confusions of the last validation."""
        if self.last_confmat is None:
            return {}
        return {"per_class_top1": self.per_class_accuracy(),
                "top_confusions": top_confusions(self.last_confmat, self.info.class_names)}

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict]:
        """Top-k classes with their probabilities; the figure shows the image and the top-k as bars."""
        probs = self.eval_model(torch.stack(batch.images)).softmax(1)
        scores, labels = probs.topk(min(self.predict_topk, self.info.num_classes), dim=1)
        records = []
        for original, score, label in zip(batch.originals, scores.tolist(), labels.tolist()):
            topk = [{"label": l, "class": self.info.class_names[l], "score": round(s, 6)} for l, s in zip(label, score)]
            rgb = to_rgb_array(original)
            bars = Panel(rgb, f"prediction: top-{len(topk)}", bars=[(f"{t['class']}  {t['score']:.3f}", t["score"])
                                                                     for t in topk])
            records.append({"topk": topk, "figure": render([Panel(rgb, "input"), bars], self.info.class_names)})
        return records
