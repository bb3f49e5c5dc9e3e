"""ATSS (Zhang et al. 2020) and GFL (Li et al. 2020): the one-stage detectors of PVTv2 Table 4.

    backbone -> FPN over strides 8-32 + P6/P7 convs on P5 -> shared towers -> per-level outputs

Both follow mmdetection's ``ATSSHead`` / ``GFLHead`` with the settings of the configs PVTv2
used (whai362/PVT ``detection/configs/{atss,gfl}_pvt_v2_b2_fpn_3x_mstrain_fp16.py``):

* Neck: torchvision's FPN (256 channels) on strides 8-32, P6 and P7 by stride-2 3x3 convs from P5
  (mmdet ``add_extra_convs='on_output'``), P7 straight from P6 as mmdet's FPN
  (``relu_before_extra_convs=False``; torchvision's block has a ReLU there).
* Towers: 4 x (3x3 conv, GroupNorm 32, ReLU) for classification and 4 for regression, normal(0.01)
  init, the focal-loss prior (0.01) on the classifier's bias, a learnable scale per level on the
  regression output (mmdet ``Scale``). torchvision's ``FCOSHead`` has the same towers but fixes the
  regression output to 4 + 1 channels (no distribution bins, no scales), so the towers are ours.
* One square anchor per location, 8 x stride (torchvision's ``AnchorGenerator``, given the
  levels' strides: it would infer them from the padded image, wrong for P6/P7 on odd grids).
  Training uses only the anchors inside each image's own padded shape (mmdet ``valid_flags``,
  ``allowed_border=-1``): the ATSS candidates are drawn from them and the others are out of the
  classification loss.
* ATSS assignment (``topk`` 9): per level, the ``topk`` anchors whose centres are nearest a ground
  truth's centre are its candidates; positives are candidates whose IoU is at least the mean + std
  of the candidates' IoUs and whose centre lies inside the box; an anchor claimed by several boxes
  goes to the one it overlaps most.
* ATSS losses: sigmoid focal loss (alpha 0.25, gamma 2; torchvision) over all anchors / positives;
  GIoU loss (weight 2; torchvision) of the boxes decoded from (dx, dy, dw, dh) with stds
  (0.1, 0.1, 0.2, 0.2) (torchvision ``BoxCoder``), weighted by the centerness target and divided by
  its sum (at least 1); centerness BCE / positives.
* GFL losses: quality focal loss (beta 2) whose target at the true class is the IoU of the
  predicted box; the box as a distribution over ``reg_max + 1`` = 17 bins of each side's distance
  to the anchor centre (in strides), read out by its expectation; distribution focal loss
  (weight 0.25; targets clamped to ``reg_max`` - 0.1, mmdet's ``bbox2distance``) and GIoU (weight 2),
  both weighted by the anchor's best class score and divided by the sum of those weights.
* Normalisers averaged over the processes (mmdet ``reduce_mean``).
* Test (mmdet 2.13's ``get_bboxes`` + ``multiclass_nms``): per level the 1000 anchors whose best
  class probability (ATSS: times centerness) is highest; of those, every (anchor, class) pair whose
  class probability alone is above 0.05; its score the class probability (GFL: it already carries
  the quality) or, for ATSS, the class probability x centerness; class-wise NMS at 0.6, 100
  detections per image.

``flops_forward`` runs backbone, neck and heads (mmdet's ``forward_dummy``): what the papers count.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import Conv2dNormActivation, batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from vitlab.data.base import IMAGENET_MEAN, IMAGENET_STD
from vitlab.heads.detection import BackboneWithFPN, LastLevelP6P7NoReLU, _transform, valid_flags
from vitlab.heads.detector_utils import FlopsDetector, mean_over_processes


def tower(channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` x (3x3 conv, GroupNorm(32), ReLU), mmdet's ``stacked_convs`` with GN
    (fewer groups for the narrow test-sized heads)."""
    norm = partial(nn.GroupNorm, math.gcd(32, max(channels // 8, 1)))  # 32 groups at 256 channels
    return nn.Sequential(*(Conv2dNormActivation(channels, channels, 3, norm_layer=norm) for _ in range(num_convs)))


def atss_assign(anchors: torch.Tensor, num_per_level: list[int], gt_boxes: torch.Tensor, topk: int) -> torch.Tensor:
    """Index of each anchor's ground truth (-1: background), ATSS's adaptive IoU threshold."""
    if len(gt_boxes) == 0:
        return anchors.new_full((len(anchors),), -1, dtype=torch.int64)
    ious = box_iou(anchors, gt_boxes)  # A x G
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    distances = torch.cdist(centres, (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2)  # A x G
    starts = [0, *torch.tensor(num_per_level).cumsum(0).tolist()[:-1]]
    candidates = torch.cat([  # C x G: the topk nearest anchors of every level
        d.topk(min(topk, len(d)), dim=0, largest=False).indices + start
        for d, start in zip(distances.split(num_per_level), starts)])
    candidate_ious = ious.gather(0, candidates)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)
    c = centres[candidates]  # C x G x 2
    inside = torch.stack([c[..., 0] - gt_boxes[:, 0], c[..., 1] - gt_boxes[:, 1],
                          gt_boxes[:, 2] - c[..., 0], gt_boxes[:, 3] - c[..., 1]], -1).amin(-1) > 0.01
    positive = (candidate_ious >= threshold) & inside
    gt_index = torch.arange(len(gt_boxes), device=anchors.device).expand_as(candidates)
    claimed = torch.full_like(ious, -math.inf)
    claimed[candidates[positive], gt_index[positive]] = ious[candidates[positive], gt_index[positive]]
    best, assigned = claimed.max(1)
    return torch.where(best > -math.inf, assigned, -1)


def centerness(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """FCOS centerness of ``points`` inside ``boxes``: sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b))."""
    l, t = points[:, 0] - boxes[:, 0], points[:, 1] - boxes[:, 1]
    r, b = boxes[:, 2] - points[:, 0], boxes[:, 3] - points[:, 1]
    lr, tb = torch.stack([l, r], 1), torch.stack([t, b], 1)
    return torch.sqrt((lr.amin(1) / lr.amax(1)) * (tb.amin(1) / tb.amax(1))).clamp(min=0)


def quality_focal_loss(logits: torch.Tensor, quality: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """GFL's quality focal loss, summed: BCE towards a soft target (IoU at the true class, 0 elsewhere),
    scaled by |target - sigmoid|^beta. Written here: no library has it."""
    scale = (quality - logits.sigmoid()).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, quality, reduction="none") * scale).sum()


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GFL's distribution focal loss per distance: cross-entropy towards the two bins around the
    (continuous) target, weighted by nearness. Written here: no library has it."""
    left = target.long()
    w_left = left + 1 - target
    return (F.cross_entropy(logits, left, reduction="none") * w_left
            + F.cross_entropy(logits, left + 1, reduction="none") * (1 - w_left))


class _OneStage(nn.Module):
    """What ATSS and GFL share: neck, towers, anchors, ATSS assignment and test-time selection."""

    def __init__(self, backbone, num_classes, reg_channels, in_strides, fpn_channels, stacked_convs, anchor_scale,
                 topk, score_thresh, nms_thresh, detections_per_img, pre_nms_top_n, size_divisible, image_mean,
                 image_std):
        super().__init__()
        extra = LastLevelP6P7NoReLU(fpn_channels, fpn_channels)
        extra.use_P5 = True  # mmdet add_extra_convs='on_output' (torchvision infers it from channel counts)
        self.backbone = BackboneWithFPN(backbone, list(in_strides), fpn_channels, extra)
        self.strides = [*in_strides, in_strides[-1] * 2, in_strides[-1] * 4]
        self.anchor_generator = AnchorGenerator(tuple((anchor_scale * s,) for s in self.strides),
                                                ((1.0,),) * len(self.strides))
        self.num_classes, self.topk = num_classes, topk
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.pre_nms_top_n = detections_per_img, pre_nms_top_n
        self.size_divisible = size_divisible
        self.cls_tower, self.reg_tower = tower(fpn_channels, stacked_convs), tower(fpn_channels, stacked_convs)
        self.cls_logits = nn.Conv2d(fpn_channels, num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(fpn_channels, reg_channels, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        for m in [*self.cls_tower.modules(), *self.reg_tower.modules(), self.cls_logits, self.bbox_reg]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior
        self.transform = _transform(size_divisible, image_mean, image_std)

    # ---- network ----------------------------------------------------------------------
    def head(self, feats: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Per level: class logits, regression output (scaled) and extra outputs, each N x C x H x W."""
        out = {"cls": [], "reg": []}
        for k, x in enumerate(feats):
            reg_feat = self.reg_tower(x)
            out["cls"].append(self.cls_logits(self.cls_tower(x)))
            out["reg"].append(self.scales[k] * self.bbox_reg(reg_feat))
            self.extra_outputs(reg_feat, out)
        return out

    def extra_outputs(self, reg_feat: torch.Tensor, out: dict) -> None:
        pass

    def flops_forward(self, images: torch.Tensor):
        return self.head(list(self.backbone(images).values()))

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        image_list, targets = self.transform(images, targets)
        outputs = self.head(list(self.backbone(image_list.tensors).values()))
        grids = [o.shape[-2:] for o in outputs["cls"]]
        x = outputs["cls"][0]
        self.anchor_generator.set_cell_anchors(x.dtype, x.device)
        strides = [[torch.tensor(s, device=x.device)] * 2 for s in self.strides]
        per_level = self.anchor_generator.grid_anchors([list(g) for g in grids], strides)
        anchors = torch.cat(per_level)
        num_per_level = [len(a) for a in per_level]
        stride_of_anchor = torch.cat([a.new_full((len(a),), s) for a, s in zip(per_level, self.strides)])
        flat = {k: torch.cat([v.flatten(2) for v in vs], 2).transpose(1, 2) for k, vs in outputs.items()}  # N x A x C
        if self.training:
            valid = valid_flags(grids, [(s, s) for s in self.strides], [1] * len(grids), image_list.image_sizes,
                                self.size_divisible, x.device)
            assigned = [self.assign(anchors, num_per_level, v, t["boxes"]) for v, t in zip(valid, targets)]
            return self.losses(flat, anchors, stride_of_anchor, valid, assigned, targets)
        return self.detect(flat, anchors, stride_of_anchor, num_per_level, image_list.image_sizes)

    def assign(self, anchors, num_per_level, valid, gt_boxes) -> torch.Tensor:
        """ATSS over the image's valid anchors (mmdet's ``inside_flags``); the others stay unassigned."""
        per_level = torch.stack([v.sum() for v in valid.split(num_per_level)]).tolist()  # one sync
        assigned = anchors.new_full((len(anchors),), -1, dtype=torch.int64)
        assigned[valid] = atss_assign(anchors[valid], per_level, gt_boxes, self.topk)
        return assigned

    # ---- training ---------------------------------------------------------------------
    def targets_of(self, assigned, targets):
        """Positive mask (N x A), and per positive its ground-truth box and label."""
        positive = torch.stack(assigned) >= 0
        boxes = torch.cat([t["boxes"][a[a >= 0]] for a, t in zip(assigned, targets)])
        labels = torch.cat([t["labels"][a[a >= 0]] for a, t in zip(assigned, targets)])
        return positive, boxes, labels

    # ---- inference --------------------------------------------------------------------
    def score_factor(self, flat: dict) -> torch.Tensor | None:
        """N x A factors of the class probabilities in the test score (mmdet's ``score_factors``), or None."""
        return None

    def detect(self, flat, anchors, stride_of_anchor, num_per_level, image_sizes) -> list[dict]:
        probs, boxes = flat["cls"].float().sigmoid(), self.decode(flat, anchors, stride_of_anchor)
        factor = self.score_factor(flat)
        factor = torch.ones_like(probs[..., 0]) if factor is None else factor
        rank = (probs * factor[..., None]).amax(-1)  # N x A: what mmdet's per-level nms_pre ranks anchors by
        results = []
        for prob, fac, rnk, box, size in zip(probs, factor, rank, boxes, image_sizes):
            keep_boxes, keep_scores, keep_labels = [], [], []
            for p, f, r, b in zip(*(t.split(num_per_level) for t in (prob, fac, rnk, box))):  # per level
                top = r.topk(min(self.pre_nms_top_n, len(r))).indices
                anchor, label = torch.where(p[top] > self.score_thresh)  # the class probability alone
                anchor = top[anchor]
                keep_boxes.append(b[anchor])
                keep_scores.append(p[anchor, label] * f[anchor])  # the factor after the threshold
                keep_labels.append(label)
            b, s, l = (torch.cat(v) for v in (keep_boxes, keep_scores, keep_labels))
            b = clip_boxes_to_image(b, tuple(size))
            keep = batched_nms(b, s, l, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": l[keep]})
        return results


class _ATSS(_OneStage):
    def __init__(self, backbone, num_classes, focal_alpha, focal_gamma, giou_weight, **kw):
        super().__init__(backbone, num_classes, 4, **kw)
        channels = self.bbox_reg.in_channels
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.normal_(self.centerness.weight, std=0.01)
        nn.init.zeros_(self.centerness.bias)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))  # mmdet target_stds (0.1, 0.1, 0.2, 0.2)
        self.focal_alpha, self.focal_gamma, self.giou_weight = focal_alpha, focal_gamma, giou_weight

    def extra_outputs(self, reg_feat, out):
        out.setdefault("ctr", []).append(self.centerness(reg_feat))

    def decode(self, flat, anchors, stride_of_anchor):
        n = flat["reg"].shape[0]
        return self.box_coder.decode_single(flat["reg"].reshape(-1, 4).float(), anchors.repeat(n, 1)).view(n, -1, 4)

    def score_factor(self, flat):
        return flat["ctr"][..., 0].float().sigmoid()

    def losses(self, flat, anchors, stride_of_anchor, valid, assigned, targets):
        positive, gt_boxes, gt_labels = self.targets_of(assigned, targets)
        num_pos = mean_over_processes(positive.sum().float()).clamp(min=1)
        cls_target = torch.zeros_like(flat["cls"])
        cls_target[positive] = F.one_hot(gt_labels, self.num_classes).to(cls_target.dtype)
        loss_cls = sigmoid_focal_loss(flat["cls"][valid], cls_target[valid], self.focal_alpha, self.focal_gamma,
                                      "sum") / num_pos
        pos_anchors = anchors.expand(len(positive), -1, -1)[positive]
        pred = self.box_coder.decode_single(flat["reg"][positive].float(), pos_anchors)
        ctr_target = centerness((pos_anchors[:, :2] + pos_anchors[:, 2:]) / 2, gt_boxes)
        ctr_sum = mean_over_processes(ctr_target.sum()).clamp(min=1)  # mmdet's bbox_avg_factor
        loss_bbox = (generalized_box_iou_loss(pred, gt_boxes, reduction="none") * ctr_target).sum() / ctr_sum
        loss_ctr = F.binary_cross_entropy_with_logits(flat["ctr"][positive][:, 0], ctr_target, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_bbox": self.giou_weight * loss_bbox, "loss_centerness": loss_ctr}


class _GFL(_OneStage):
    def __init__(self, backbone, num_classes, reg_max, qfl_beta, dfl_weight, giou_weight, **kw):
        super().__init__(backbone, num_classes, 4 * (reg_max + 1), **kw)
        self.reg_max, self.qfl_beta, self.dfl_weight, self.giou_weight = reg_max, qfl_beta, dfl_weight, giou_weight
        self.register_buffer("bins", torch.arange(reg_max + 1, dtype=torch.float32), persistent=False)
        self.box_coder = BoxLinearCoder(normalize_by_size=False)  # (l, t, r, b) distances from the anchor centre

    def distances(self, reg: torch.Tensor) -> torch.Tensor:
        """Expected distance (in strides) of each side: softmax over the bins, weighted by the bin values."""
        probs = reg.float().unflatten(-1, (4, self.reg_max + 1)).softmax(-1)
        return (probs * self.bins).sum(-1)  # not a matmul: autocast would run that in half precision

    def decode(self, flat, anchors, stride_of_anchor):
        return self.box_coder.decode(self.distances(flat["reg"]) * stride_of_anchor[:, None], anchors)

    def losses(self, flat, anchors, stride_of_anchor, valid, assigned, targets):
        positive, gt_boxes, gt_labels = self.targets_of(assigned, targets)
        num_pos = mean_over_processes(positive.sum().float()).clamp(min=1)
        n = len(positive)
        pos_anchors = anchors.expand(n, -1, -1)[positive]
        pos_strides = stride_of_anchor.expand(n, -1)[positive][:, None]
        reg = flat["reg"][positive]
        pred = self.box_coder.decode(self.distances(reg) * pos_strides, pos_anchors)
        quality = torch.zeros_like(flat["cls"], dtype=torch.float32)
        quality[positive] = F.one_hot(gt_labels, self.num_classes).float() * box_iou(pred, gt_boxes).diagonal().detach()[:, None]
        loss_cls = quality_focal_loss(flat["cls"][valid].float(), quality[valid], self.qfl_beta) / num_pos
        weight = flat["cls"][positive].detach().float().sigmoid().amax(1)  # each positive's best class score
        weight_sum = mean_over_processes(weight.sum()).clamp(min=1)
        loss_bbox = (generalized_box_iou_loss(pred, gt_boxes, reduction="none") * weight).sum() / weight_sum
        target = (self.box_coder.encode(pos_anchors, gt_boxes) / pos_strides).clamp(0, self.reg_max - 0.1)  # mmdet eps
        dfl = distribution_focal_loss(reg.float().reshape(-1, self.reg_max + 1), target.flatten())
        loss_dfl = (dfl * weight.repeat_interleave(4)).sum() / 4 / weight_sum
        return {"loss_cls": loss_cls, "loss_bbox": self.giou_weight * loss_bbox, "loss_dfl": self.dfl_weight * loss_dfl}


class ATSSDetector(FlopsDetector):
    """ATSS: FPN, 4-conv GN towers, class / box / centerness outputs, ATSS assignment.

    Defaults are mmdetection's config. ``in_strides``: backbone levels into the FPN (P6/P7 are convs
    on P5); ``anchor_scale``: anchor side / stride (mmdet ``octave_base_scale``); ``topk``: ATSS
    candidates per level and ground truth; ``score_thresh`` ... ``pre_nms_top_n``: test-time selection.
    """

    loss_names = ("loss_cls", "loss_bbox", "loss_centerness")

    def __init__(self, backbone: nn.Module, num_classes: int, in_strides: list[int] = (8, 16, 32),
                 fpn_channels: int = 256, stacked_convs: int = 4, anchor_scale: int = 8, topk: int = 9,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, giou_weight: float = 2.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 pre_nms_top_n: int = 1000, size_divisible: int = 32, image_mean: list[float] = IMAGENET_MEAN,
                 image_std: list[float] = IMAGENET_STD):
        super().__init__()
        self.model = _ATSS(backbone, num_classes, focal_alpha, focal_gamma, giou_weight, in_strides=in_strides,
                           fpn_channels=fpn_channels, stacked_convs=stacked_convs, anchor_scale=anchor_scale, topk=topk,
                           score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                           pre_nms_top_n=pre_nms_top_n, size_divisible=size_divisible, image_mean=image_mean,
                           image_std=image_std)


class GFLDetector(FlopsDetector):
    """GFL: ATSS's neck, towers and assignment; quality focal loss (``qfl_beta``), each box side as a
    distribution over ``reg_max + 1`` bins (distribution focal loss, ``dfl_weight``). Other arguments
    as ``ATSSDetector``.
    """

    loss_names = ("loss_cls", "loss_bbox", "loss_dfl")

    def __init__(self, backbone: nn.Module, num_classes: int, in_strides: list[int] = (8, 16, 32),
                 fpn_channels: int = 256, stacked_convs: int = 4, anchor_scale: int = 8, topk: int = 9,
                 reg_max: int = 16, qfl_beta: float = 2.0, dfl_weight: float = 0.25, giou_weight: float = 2.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 pre_nms_top_n: int = 1000, size_divisible: int = 32, image_mean: list[float] = IMAGENET_MEAN,
                 image_std: list[float] = IMAGENET_STD):
        super().__init__()
        self.model = _GFL(backbone, num_classes, reg_max, qfl_beta, dfl_weight, giou_weight, in_strides=in_strides,
                          fpn_channels=fpn_channels, stacked_convs=stacked_convs, anchor_scale=anchor_scale, topk=topk,
                          score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                          pre_nms_top_n=pre_nms_top_n, size_divisible=size_divisible, image_mean=image_mean,
                          image_std=image_std)
