"""Cascade Mask R-CNN (Cai & Vasconcelos 2018) from torchvision's Mask R-CNN parts.

    backbone -> FPN (strides 4-32 + max-pooled P6) -> RPN -> 3 box stages (IoU 0.5 / 0.6 / 0.7)
             -> 3 mask heads

torchvision has no cascade; every piece is still torchvision's: ``MaskRCNNDetector``'s Mask R-CNN
(transform, backbone + FPN, RPN, ``MultiScaleRoIAlign``, mask pasting) whose RoI heads are replaced
by one ``RoIHeads`` per stage for matching (``Matcher``), sampling
(``BalancedPositiveNegativeSampler``), box coding and test-time post-processing, with
``FastRCNNConvFCHead`` / ``FastRCNNPredictor``, ``MaskRCNNHeads`` / ``MaskRCNNPredictor``,
``maskrcnn_loss`` / ``maskrcnn_inference``. ``CascadeRoIHeads`` only chains the stages, as
mmdetection's ``CascadeRoIHead``:

* Training: each stage adds the ground truths to its proposals, matches at its IoU threshold,
  samples 512 RoIs (25% positive), and is trained with loss weight 1 / 0.5 / 0.25; its boxes,
  decoded with the assigned class (the predicted class for background RoIs), detached and without
  the added ground truths, are the next stage's proposals. Each stage's mask head learns from that
  stage's positives.
* Test: stage k refines the boxes of stage k-1 with its predicted class; the class score is the
  mean of the three stages' logits (mmdet averages logits, then softmax), boxes are the last
  stage's; masks are the mean of the three mask heads' probabilities.
* Box targets: per-stage deltas with stds (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
  (0.033, 0.033, 0.067, 0.067) (``BoxCoder`` weights = 1 / std).

The defaults are the configuration behind PVTv2 Table 4 (whai362/PVT
``detection/configs/cascade_mask_rcnn_pvt_v2_b2_fpn_3x_mstrain_fp16.py``, Swin's setting): per stage
a 4-conv + 1-FC box head with norm layers (BatchNorm; SyncBN with ``trainer.sync_batchnorm``),
class-specific regression, GIoU loss (weight 10) on the decoded boxes, 2,000 RPN proposals in training. Differences from mmdet's
default ``cascade_mask_rcnn_r50_fpn`` (2-FC heads, class-agnostic regression, smooth-L1 with
beta 1): ``box_convs=0 box_fcs=2 box_norm=none box_loss=smooth_l1 box_loss_weight=1`` gives
those heads and loss, but regression stays class-specific (torchvision's predictor). RoIAlign is
Mask R-CNN's: torchvision's default (``aligned=False``, sampling ratio 2) unless ``roi_aligned`` /
``roi_sampling_ratio`` ask for mmcv's (aligned, adaptive sampling 0: experiment=pvtv2_cascade_maskrcnn_3x
does). The RPN and mask targets follow mmdet's cascade config (conf/head/cascade_maskrcnn.yaml):
low-quality RPN matches from IoU 0.3 (``rpn_min_pos_iou``), border-crossing anchors out of RPN
training (``rpn_allowed_border=0``), binary aligned mask targets (``mask_target=mmdet``).
Differences from mmdet in any setting: the predictor also regresses the background class
(4 x 1024 weights more per stage). Initialisation as mmdet: box convs Kaiming normal (fan-out, as
mmcv's ConvModule and torchvision's FastRCNNConvFCHead), the FC Xavier.

``flops_forward`` counts as mmdetection's ``forward_dummy`` (``tools/analysis_tools/get_flops.py``)
does: backbone, FPN, RPN head, the three box stages on 1,000 RoIs and the three mask heads on 100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference, maskrcnn_loss
from torchvision.ops import clip_boxes_to_image, generalized_box_iou_loss

from vitlab.heads.detection import MaskRCNNDetector, init_box_predictor, mask_targets_of
from vitlab.heads.detector_utils import fixed_rois

NORMS = {"batch": nn.BatchNorm2d, "none": None}
BOX_LOSSES = ("giou", "smooth_l1")


class CascadeRoIHeads(nn.Module):
    """Box stages (torchvision ``RoIHeads``, each with its mask head) chained as in Cascade R-CNN."""

    def __init__(self, stages: list[RoIHeads], stage_loss_weights: list[float], box_loss: str, box_loss_weight: float,
                 mask_target: str = "torchvision"):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = list(stage_loss_weights)
        self.box_loss, self.box_loss_weight = box_loss, box_loss_weight
        self.mask_target = mask_target  # torchvision | mmdet (vitlab.heads.detection.mask_targets_of)

    # ---- one stage --------------------------------------------------------------------
    @staticmethod
    def box_outputs(stage: RoIHeads, features, proposals, image_sizes):
        x = stage.box_head(stage.box_roi_pool(features, proposals, image_sizes))
        return stage.box_predictor(x)  # class logits (R x K+1), class-specific deltas (R x 4(K+1))

    @staticmethod
    def refine(stage: RoIHeads, logits, deltas, proposals, image_sizes, labels=None) -> list[torch.Tensor]:
        """Each RoI's box regressed with its class (the assigned one, else the predicted foreground)."""
        predicted = logits[:, 1:].argmax(1) + 1
        labels = predicted if labels is None else torch.where(labels > 0, labels, predicted)
        deltas = deltas.reshape(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels]
        boxes = stage.box_coder.decode_single(deltas.float(), torch.cat(proposals).float())
        return [clip_boxes_to_image(b, size).detach() for b, size in zip(boxes.split([len(p) for p in proposals]),
                                                                         image_sizes)]

    @staticmethod
    def sample(stage: RoIHeads, proposals, targets):
        """torchvision's ground truth-added proposals, matching and sampling, keeping which RoIs are ground truths."""
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        is_gt = [torch.arange(len(p) + len(g), device=p.device) >= len(p) for p, g in zip(proposals, gt_boxes)]
        proposals = stage.add_gt_proposals(proposals, gt_boxes)
        matched, labels = stage.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        keep = stage.subsample(labels)
        pick = lambda values: [v[k] for v, k in zip(values, keep)]  # noqa: E731
        return pick(proposals), pick(matched), pick(labels), pick(is_gt)

    def stage_losses(self, stage, logits, deltas, proposals, matched, labels, targets) -> dict[str, torch.Tensor]:
        labels_all = torch.cat(labels)
        loss_cls = F.cross_entropy(logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        gt = torch.cat([t["boxes"][m] if len(t["boxes"]) else t["boxes"].new_zeros((len(m), 4))
                        for t, m in zip(targets, matched)])[pos].float()
        props = torch.cat(proposals)[pos].float()
        pred = deltas.reshape(len(deltas), -1, 4)[pos, labels_all[pos]].float()
        if self.box_loss == "giou":  # mmdet reg_decoded_bbox: GIoU of the decoded box
            box = generalized_box_iou_loss(stage.box_coder.decode_single(pred, props), gt, reduction="sum")
        else:
            box = F.smooth_l1_loss(pred, stage.box_coder.encode_single(gt, props), beta=1.0, reduction="sum")
        return {"loss_cls": loss_cls, "loss_bbox": self.box_loss_weight * box / max(len(labels_all), 1)}

    def mask_loss(self, stage, features, proposals, matched, labels, targets, image_sizes) -> torch.Tensor:
        pos = [torch.where(l > 0)[0] for l in labels]
        pos_proposals = [p[k] for p, k in zip(proposals, pos)]
        logits = stage.mask_predictor(stage.mask_head(stage.mask_roi_pool(features, pos_proposals, image_sizes)))
        with mask_targets_of(self.mask_target):
            return maskrcnn_loss(logits, pos_proposals, [t["masks"] for t in targets],
                                 [t["labels"] for t in targets], [m[k] for m, k in zip(matched, pos)])

    # ---- the cascade ------------------------------------------------------------------
    def forward(self, features, proposals, image_sizes, targets=None):
        if self.training:
            return [], self.losses(features, proposals, image_sizes, targets)
        all_logits = []
        for k, stage in enumerate(self.stages):
            logits, deltas = self.box_outputs(stage, features, proposals, image_sizes)
            all_logits.append(logits)
            if k < len(self.stages) - 1:
                proposals = self.refine(stage, logits, deltas, proposals, image_sizes)
        last = self.stages[-1]
        boxes, scores, labels = last.postprocess_detections(torch.stack(all_logits).float().mean(0), deltas.float(),
                                                            proposals, image_sizes)
        masks = self.masks(features, boxes, labels, image_sizes)
        return [{"boxes": b, "scores": s, "labels": l, "masks": m}
                for b, s, l, m in zip(boxes, scores, labels, masks)], {}

    def losses(self, features, proposals, image_sizes, targets) -> dict[str, torch.Tensor]:
        losses = {}
        for k, (stage, weight) in enumerate(zip(self.stages, self.stage_loss_weights)):
            proposals, matched, labels, is_gt = self.sample(stage, [p.detach() for p in proposals], targets)
            logits, deltas = self.box_outputs(stage, features, proposals, image_sizes)
            stage_losses = self.stage_losses(stage, logits, deltas, proposals, matched, labels, targets)
            stage_losses["loss_mask"] = self.mask_loss(stage, features, proposals, matched, labels, targets, image_sizes)
            losses.update({f"s{k}_{name}": weight * value for name, value in stage_losses.items()})
            if k < len(self.stages) - 1:
                refined = self.refine(stage, logits, deltas, proposals, image_sizes, torch.cat(labels))
                proposals = [b[~g] for b, g in zip(refined, is_gt)]  # the next stage adds the ground truths again
        return losses

    def masks(self, features, boxes, labels, image_sizes) -> list[torch.Tensor]:
        """Per image, N x 1 x M x M mask probabilities: the mean of the stages' mask heads."""
        x = self.stages[0].mask_roi_pool(features, boxes, image_sizes)
        probs = [maskrcnn_inference(s.mask_predictor(s.mask_head(x)), labels) for s in self.stages]
        return [torch.stack(per_image).float().mean(0) for per_image in zip(*probs)]


class CascadeMaskRCNNDetector(MaskRCNNDetector):
    """Cascade Mask R-CNN: ``MaskRCNNDetector`` (FPN, RPN, RoI pooling and sampling, test-time
    selection: its arguments, passed on) with its RoI heads replaced by ``len(stage_iou_thresholds)``
    stages, each with its own box and mask head. The RPN keeps 2,000 proposals per image in training
    (the cascade configs; Mask R-CNN's 1,000).

    Per stage: ``stage_iou_thresholds`` (foreground = background threshold, no low-quality matches),
    ``stage_loss_weights``, ``stage_box_stds`` (delta stds). Box head: ``box_convs`` 3x3 convs then
    ``box_fcs`` FCs (``box_fc_channels``), ``box_norm`` after each conv (batch | none); ``box_loss``
    giou | smooth_l1 times ``box_loss_weight``. Mask heads: 4 convs of ``mask_channels``, a 2x
    deconvolution, a 1x1 classifier (28 x 28 masks).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        rpn_post_nms_top_n_train: int = 2000,
        stage_iou_thresholds: list[float] = (0.5, 0.6, 0.7),
        stage_loss_weights: list[float] = (1.0, 0.5, 0.25),
        stage_box_stds: list[list[float]] = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                             (0.033, 0.033, 0.067, 0.067)),
        box_positive_fraction: float = 0.25,
        box_convs: int = 4,
        box_fcs: int = 1,
        box_fc_channels: int = 1024,
        box_norm: str = "batch",
        box_loss: str = "giou",
        box_loss_weight: float = 10.0,
        mask_channels: int = 256,
        **mask_rcnn,
    ):
        if box_norm not in NORMS:
            raise ValueError(f"module.head.box_norm={box_norm!r}: expected one of {sorted(NORMS)}")
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"module.head.box_loss={box_loss!r}: expected one of {list(BOX_LOSSES)}")
        if not len(stage_iou_thresholds) == len(stage_loss_weights) == len(stage_box_stds):
            raise ValueError(f"module.head: stage_iou_thresholds {list(stage_iou_thresholds)}, stage_loss_weights "
                             f"{list(stage_loss_weights)} and stage_box_stds need one entry per stage")
        super().__init__(backbone, num_classes, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train, **mask_rcnn)
        single = self.model.roi_heads  # Mask R-CNN's: its RoI pooling, sampling size and test settings serve every stage
        channels = self.model.backbone.out_channels
        stages = []
        for iou, stds in zip(stage_iou_thresholds, stage_box_stds):
            box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * box_convs, [box_fc_channels] * box_fcs,
                                          norm_layer=NORMS[box_norm])
            for m in box_head.modules():
                if isinstance(m, nn.Linear):  # mmdet's Xavier for the shared FCs
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            predictor = FastRCNNPredictor(box_fc_channels, num_classes + 1)
            init_box_predictor(predictor)
            stages.append(RoIHeads(
                single.box_roi_pool, box_head, predictor, iou, iou, single.fg_bg_sampler.batch_size_per_image,
                box_positive_fraction, tuple(1.0 / s for s in stds), single.score_thresh, single.nms_thresh,
                single.detections_per_img, single.mask_roi_pool, MaskRCNNHeads(channels, [mask_channels] * 4, 1),
                MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1),
            ))
        self.model.roi_heads = CascadeRoIHeads(stages, stage_loss_weights, box_loss, box_loss_weight, single.mask_target)
        self.loss_names = (*(f"s{k}_{n}" for k in range(len(stages)) for n in ("loss_cls", "loss_bbox", "loss_mask")),
                           "loss_objectness", "loss_rpn_box_reg")

    def flops_forward(self, images: torch.Tensor, num_rois: int = 1000, num_mask_rois: int = 100):
        feats = self.model.backbone(images)
        outputs = [self.model.rpn.head(list(feats.values()))]
        channels = self.model.backbone.out_channels
        box_rois, mask_rois = fixed_rois(images, num_rois, channels, 7), fixed_rois(images, num_mask_rois, channels, 14)
        for stage in self.model.roi_heads.stages:
            outputs.append(stage.box_predictor(stage.box_head(box_rois)))
            outputs.append(stage.mask_predictor(stage.mask_head(mask_rois)))
        return outputs
