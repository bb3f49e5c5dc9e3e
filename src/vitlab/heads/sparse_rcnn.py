"""Sparse R-CNN (Sun et al. 2021): learnable proposals refined by dynamic instance-interactive heads.

    backbone -> FPN (strides 4-32, no extra level) -> N learnable boxes + N learnable features
             -> 6 x [RoIAlign of the boxes, self-attention among proposals, dynamic conv, FFN,
                     class + box deltas -> refined boxes]

As mmdetection's ``SparseRCNN`` (``EmbeddingRPNHead``, ``SparseRoIHead``, ``DIIHead``,
``DynamicConv``) with the settings of the config behind PVTv2 Table 4 (whai362/PVT
``detection/configs/sparse_rcnn_pvt_v2_b2_fpn_300_proposals_crop_mstrain_480-800_3x_coco.py``):

* Proposals: an ``nn.Embedding`` of boxes (cx, cy, w, h relative to the image, initialised to the
  whole image) and one of 256-d features.
* Each stage (``DynamicInstanceHead``): RoIAlign 7x7 (torchvision ``MultiScaleRoIAlign``, sampling
  ratio 2) of the current boxes; multi-head self-attention (8 heads) over the proposal features
  (+ residual, LayerNorm); a dynamic convolution whose two 1x1 kernels (256->64->256) are generated
  from each proposal's feature and applied to its RoI (LayerNorm + ReLU after each, then an FC of
  the flattened 7x7x256 map); FFN 2048; 1 FC-LN-ReLU then the classifier, 3 then the box deltas
  (stds 0.5, 0.5, 1, 1 on the current boxes; torchvision ``BoxCoder``). Boxes are detached between
  stages, features are not.
* Training: every stage is matched to the ground truth one-to-one (Hungarian, SciPy) with cost
  2 x focal + 5 x L1 (boxes normalised by the image size) + 2 x (-GIoU), and trained with the same
  three losses and weights (focal: torchvision ``sigmoid_focal_loss``, alpha 0.25, gamma 2; GIoU:
  torchvision), each divided by the number of ground truths (averaged over processes).
* Test: the last stage's class probabilities over (proposal, class) pairs, the top
  ``detections_per_img``, no NMS; boxes clipped to the image.
* Initialisation: Xavier for every weight matrix, the focal-loss prior (0.01) on the class bias.

Differences: mmdet's default config has 100 proposals; PVTv2 Table 4 uses 300 (``num_proposals``;
conf/head/sparse_rcnn.yaml). mmdet does not clip the final boxes (COCO AP is the same).

``flops_forward`` runs backbone, FPN and the six stages on ``num_proposals`` proposals (RoIAlign
itself is not a multiply-add layer).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign, box_convert, clip_boxes_to_image, generalized_box_iou
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from vitlab.data.base import IMAGENET_MEAN, IMAGENET_STD
from vitlab.heads.detection import BackboneWithFPN, _transform
from vitlab.heads.detector_utils import FlopsDetector, fixed_rois, hungarian_match, mean_over_processes


def fc_ln_relu(channels: int, num: int) -> nn.Sequential:
    """``num`` x (Linear without bias, LayerNorm, ReLU): DIIHead's class and box branches."""
    layers = []
    for _ in range(num):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DynamicInstanceHead(nn.Module):
    """One Sparse R-CNN stage (mmdet ``DIIHead`` with ``DynamicConv``): no library has it."""

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = 8, ffn_channels: int = 2048,
                 dynamic_channels: int = 64, pooler_size: int = 7, dropout: float = 0.0, num_cls_fcs: int = 1,
                 num_reg_fcs: int = 3):
        super().__init__()
        self.channels, self.dynamic_channels = channels, dynamic_channels
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(channels)
        self.dynamic_layer = nn.Linear(channels, 2 * channels * dynamic_channels)
        self.norm_in, self.norm_out = nn.LayerNorm(dynamic_channels), nn.LayerNorm(channels)
        self.fc_layer = nn.Linear(channels * pooler_size ** 2, channels)
        self.fc_norm = nn.LayerNorm(channels)
        self.interact_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_channels), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_channels, channels), nn.Dropout(dropout))
        self.ffn_norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.cls_fcs, self.reg_fcs = fc_ln_relu(channels, num_cls_fcs), fc_ln_relu(channels, num_reg_fcs)
        self.fc_cls, self.fc_reg = nn.Linear(channels, num_classes), nn.Linear(channels, 4)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.fc_reg.bias)
        nn.init.constant_(self.fc_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, rois: torch.Tensor, features: torch.Tensor):
        """``rois``: (B*N) x C x S x S, ``features``: B x N x C -> class logits B x N x K,
        box deltas B x N x 4, updated features B x N x C."""
        b, n, c = features.shape
        features = self.attention_norm(features + self.dropout(self.attention(features, features, features,
                                                                               need_weights=False)[0]))
        obj = features.reshape(b * n, c)
        params = self.dynamic_layer(obj)
        kernel_in = params[:, : c * self.dynamic_channels].view(-1, c, self.dynamic_channels)
        kernel_out = params[:, c * self.dynamic_channels:].view(-1, self.dynamic_channels, c)
        x = rois.flatten(2).transpose(1, 2)  # (B*N) x S*S x C
        x = F.relu(self.norm_in(torch.bmm(x, kernel_in)))
        x = F.relu(self.norm_out(torch.bmm(x, kernel_out)))
        x = F.relu(self.fc_norm(self.fc_layer(x.flatten(1))))
        obj = self.interact_norm(obj + self.dropout(x))
        obj = self.ffn_norm(obj + self.ffn(obj))
        logits, deltas = self.fc_cls(self.cls_fcs(obj)), self.fc_reg(self.reg_fcs(obj))
        return logits.view(b, n, -1), deltas.view(b, n, 4), obj.view(b, n, c)


class _SparseRCNN(nn.Module):
    def __init__(self, backbone, num_classes, in_strides, fpn_channels, num_proposals, num_stages, num_heads,
                 ffn_channels, dynamic_channels, pooler_size, sampling_ratio, dropout, focal_alpha, focal_gamma,
                 cls_weight, l1_weight, giou_weight, detections_per_img, size_divisible, image_mean, image_std):
        super().__init__()
        self.backbone = BackboneWithFPN(backbone, list(in_strides), fpn_channels)
        self.roi_pool = MultiScaleRoIAlign([str(k) for k in range(len(in_strides))], pooler_size, sampling_ratio)
        self.proposal_boxes = nn.Embedding(num_proposals, 4)  # cx, cy, w, h relative to the image
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.proposal_features = nn.Embedding(num_proposals, fpn_channels)
        self.stages = nn.ModuleList(
            DynamicInstanceHead(num_classes, fpn_channels, num_heads, ffn_channels, dynamic_channels, pooler_size,
                                dropout) for _ in range(num_stages))
        self.box_coder = BoxCoder((2.0, 2.0, 1.0, 1.0))  # mmdet target_stds (0.5, 0.5, 1, 1)
        self.num_classes, self.pooler_size = num_classes, pooler_size
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.detections_per_img = detections_per_img
        self.transform = _transform(size_divisible, image_mean, image_std)

    def run_stages(self, feats, image_sizes, rois_of=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(class logits, boxes) of every stage; ``rois_of(boxes)`` overrides RoIAlign (FLOP counting)."""
        b = len(image_sizes)
        whwh = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32,
                            device=self.proposal_boxes.weight.device)
        boxes = box_convert(self.proposal_boxes.weight, "cxcywh", "xyxy")[None] * whwh[:, None]  # B x N x 4
        # repeat, not expand: torch's FLOP counter rejects views of parameters made under no_grad
        features = self.proposal_features.weight[None].repeat(b, 1, 1)
        outputs = []
        for stage in self.stages:
            rois = rois_of(boxes) if rois_of else self.roi_pool(feats, list(boxes), image_sizes)
            logits, deltas, features = stage(rois, features)
            boxes = self.box_coder.decode_single(deltas.reshape(-1, 4).float(), boxes.reshape(-1, 4)).view(b, -1, 4)
            outputs.append((logits, boxes))
            boxes = boxes.detach()
        return outputs

    def flops_forward(self, images: torch.Tensor):
        feats = self.backbone(images)
        n, c = self.proposal_features.weight.shape
        size = tuple(images.shape[-2:])
        return self.run_stages(feats, [size] * len(images),
                               rois_of=lambda boxes: fixed_rois(images, len(boxes) * n, c, self.pooler_size))

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        image_list, targets = self.transform(images, targets)
        sizes = [tuple(s) for s in image_list.image_sizes]
        outputs = self.run_stages(self.backbone(image_list.tensors), sizes)
        if self.training:
            losses = {}
            for k, (logits, boxes) in enumerate(outputs):
                losses.update({f"s{k}_{name}": v for name, v in self.losses(logits, boxes, targets, sizes).items()})
            return losses
        return self.detect(*outputs[-1], sizes)

    def losses(self, logits, boxes, targets, sizes) -> dict[str, torch.Tensor]:
        cls_target = torch.zeros_like(logits, dtype=torch.float32)
        pred_boxes, gt_boxes, scales = [], [], []
        for i, (t, size) in enumerate(zip(targets, sizes)):
            whwh = boxes.new_tensor([size[1], size[0], size[1], size[0]])
            q, g = self.match(logits[i], boxes[i], t["boxes"], t["labels"], whwh)
            cls_target[i, q, t["labels"][g]] = 1.0
            pred_boxes.append(boxes[i, q])
            gt_boxes.append(t["boxes"][g].float())
            scales.append(whwh.expand(len(q), 4))
        pred, gt, scale = torch.cat(pred_boxes), torch.cat(gt_boxes), torch.cat(scales)
        num_gt = mean_over_processes(torch.tensor(float(len(gt)), device=logits.device)).clamp(min=1)
        loss_cls = sigmoid_focal_loss(logits.float(), cls_target, self.focal_alpha, self.focal_gamma, "sum") / num_gt
        loss_l1 = F.l1_loss(pred / scale, gt / scale, reduction="sum") / num_gt
        loss_giou = generalized_box_iou_loss(pred, gt, reduction="sum") / num_gt
        return {"loss_cls": self.cls_weight * loss_cls, "loss_bbox": self.l1_weight * loss_l1,
                "loss_giou": self.giou_weight * loss_giou}

    @torch.no_grad()
    def match(self, logits, boxes, gt_boxes, gt_labels, whwh):
        """Hungarian matching with mmdet's costs: focal (on the ground truth's class), L1 of
        normalised boxes, -GIoU."""
        if len(gt_boxes) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        prob = logits.float().sigmoid()[:, gt_labels]  # N x G
        a, g = self.focal_alpha, self.focal_gamma
        focal = a * (1 - prob) ** g * -(prob + 1e-8).log() - (1 - a) * prob ** g * -(1 - prob + 1e-8).log()
        l1 = torch.cdist(boxes.float() / whwh, gt_boxes.float() / whwh, p=1)
        cost = self.cls_weight * focal + self.l1_weight * l1 - self.giou_weight * generalized_box_iou(boxes.float(),
                                                                                                   gt_boxes.float())
        return hungarian_match(cost)

    def detect(self, logits, boxes, sizes) -> list[dict]:
        results = []
        for score, box, size in zip(logits.float().sigmoid(), boxes, sizes):
            top, index = score.flatten().topk(min(self.detections_per_img, score.numel()))
            results.append({"boxes": clip_boxes_to_image(box[index // self.num_classes], size), "scores": top,
                            "labels": index % self.num_classes})
        return results


class SparseRCNNDetector(FlopsDetector):
    """Sparse R-CNN: FPN on strides 4-32, ``num_proposals`` learnable proposals, ``num_stages``
    dynamic instance-interactive stages (``num_heads``, ``ffn_channels``, ``dynamic_channels``,
    RoIAlign ``pooler_size`` / ``sampling_ratio``); focal / L1 / GIoU loss weights for both the
    matching cost and the losses; ``detections_per_img`` (default: every proposal) at test time.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, in_strides: list[int] = (4, 8, 16, 32),
                 fpn_channels: int = 256, num_proposals: int = 100, num_stages: int = 6, num_heads: int = 8,
                 ffn_channels: int = 2048, dynamic_channels: int = 64, pooler_size: int = 7, sampling_ratio: int = 2,
                 dropout: float = 0.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0, cls_weight: float = 2.0,
                 l1_weight: float = 5.0, giou_weight: float = 2.0, detections_per_img: int | None = None,
                 size_divisible: int = 32, image_mean: list[float] = IMAGENET_MEAN,
                 image_std: list[float] = IMAGENET_STD):
        super().__init__()
        self.model = _SparseRCNN(backbone, num_classes, in_strides, fpn_channels, num_proposals, num_stages, num_heads,
                                 ffn_channels, dynamic_channels, pooler_size, sampling_ratio, dropout, focal_alpha,
                                 focal_gamma, cls_weight, l1_weight, giou_weight, detections_per_img or num_proposals,
                                 size_divisible, image_mean, image_std)
        self.loss_names = tuple(f"s{k}_{n}" for k in range(num_stages) for n in ("loss_cls", "loss_bbox", "loss_giou"))
