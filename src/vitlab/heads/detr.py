"""DETR (Carion et al. 2020): a transformer encoder-decoder on the backbone's last map, set prediction.

    backbone (last level) -> 1x1 conv to 256 -> + sine positions -> 6 encoder layers
    -> 6 decoder layers over 100 learned queries -> class (K + "no object") and box (cx, cy, w, h) per query

PVT v1 Sec. 5.4 / Table 6 combine PVT-Small with DETR (whai362/PVT
``detection/configs/detr_pvt_s_8x2_50ep_coco.py``: mmdetection's ``DETRHead``, which follows the
paper's code). As there:

* Post-norm layers (attention -> add -> LayerNorm -> FFN 2048 -> add -> LayerNorm), 8 heads,
  dropout 0.1; positions (sine, normalised by the unpadded extent, 128 + 128 features) are added
  to queries and keys of every attention, never to values; padded pixels are masked out of every
  key set. torch's ``nn.TransformerEncoderLayer`` cannot add positions to queries and keys only,
  so the layers are written here around ``nn.MultiheadAttention`` (which runs
  ``F.scaled_dot_product_attention``).
* Decoder: 100 query embeddings as query positions, zero initial targets, a shared final
  LayerNorm on every layer's output; class (linear) and box (3-layer MLP, sigmoid) heads on all
  six outputs (auxiliary losses).
* Losses per decoder layer after Hungarian matching (SciPy) with cost 1 x (-probability of the
  class) + 5 x L1 (normalised cx, cy, w, h) + 2 x (-GIoU): cross-entropy with weight 0.1 on
  "no object", L1 x 5 and GIoU x 2 (torchvision) divided by the number of ground truths
  (averaged over processes).
* Test: per query the best non-background class and its probability; 100 detections.
* Losses are named ``loss_ce`` / ``loss_bbox`` / ``loss_giou`` (last layer) and ``d<k>_...``
  (auxiliary, decoder layer k).

Initialisation of the transformer as mmdet's ``Transformer.init_weights``: Xavier-uniform weights,
zero biases (``xavier_init``). Differences: none in the model. The official recipe's backbone lr x 0.1 is an optimiser setting:
experiment=pvt_detr_50e (conf/paramwise/detr.yaml).

``flops_forward`` runs every layer on an unpadded image (all positions valid).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MLP, box_convert, clip_boxes_to_image, generalized_box_iou, generalized_box_iou_loss

from vitlab.data.base import IMAGENET_MEAN, IMAGENET_STD
from vitlab.heads.detection import _transform, select_levels
from vitlab.heads.detector_utils import FlopsDetector, hungarian_match, mean_over_processes


def sine_positions(mask: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's sine position encoding of the valid (``~mask``) area, normalised to [0, 2 pi]: B x 2F x H x W."""
    valid = (~mask).float()
    y, x = valid.cumsum(1), valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    dim = temperature ** (2 * (torch.arange(num_feats, device=mask.device) // 2) / num_feats)
    pos = [(v[..., None] / dim) for v in (y, x)]
    pos = [torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], -1).flatten(3) for p in pos]
    return torch.cat(pos, -1).permute(0, 3, 1, 2)


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x, pos, pad):
        q = x + pos
        x = self.norm1(x + self.drop1(self.attn(q, q, x, key_padding_mask=pad, need_weights=False)[0]))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))

    def forward(self, tgt, query_pos, memory, pos, pad):
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.drops[0](self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=pad, need_weights=False)[0]
        tgt = self.norms[1](tgt + self.drops[1](attended))
        return self.norms[2](tgt + self.drops[2](self.ffn(tgt)))


class _DETR(nn.Module):
    def __init__(self, backbone, num_classes, in_stride, hidden_dim, num_heads, num_encoder_layers, num_decoder_layers,
                 ffn_dim, dropout, num_queries, cls_weight, l1_weight, giou_weight, no_object_weight, size_divisible,
                 image_mean, image_std):
        super().__init__()
        self.backbone = backbone
        (self.level,) = select_levels(backbone, [in_stride])
        self.input_proj = nn.Conv2d(backbone.out_channels[self.level], hidden_dim, 1)
        self.encoder = nn.ModuleList(EncoderLayer(hidden_dim, num_heads, ffn_dim, dropout)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(hidden_dim, num_heads, ffn_dim, dropout)
                                     for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        for layer in [*self.encoder, *self.decoder]:  # DETR's Xavier init of the transformer
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            for m in layer.modules():  # mmdet's xavier_init also zeroes the biases (FFN; attention's already are)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)  # the last class is "no object"
        self.bbox_embed = MLP(hidden_dim, [hidden_dim, hidden_dim, 4])
        self.num_classes = num_classes
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.transform = _transform(size_divisible, image_mean, image_std)

    def predict(self, images: torch.Tensor, pad: torch.Tensor):
        """Class logits and (cx, cy, w, h) boxes in [0, 1] of every decoder layer: L x B x Q x (K+1), L x B x Q x 4."""
        x = self.input_proj(self.backbone(images)[self.level])
        pad = F.interpolate(pad[None].float(), size=x.shape[-2:])[0].bool()
        pos = sine_positions(pad, x.shape[1] // 2).flatten(2).transpose(1, 2)
        memory, pad = x.flatten(2).transpose(1, 2), pad.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, pos, pad)
        # repeat, not expand: torch's FLOP counter rejects views of parameters made under no_grad
        query_pos = self.query_embed.weight[None].repeat(len(x), 1, 1)
        tgt, outputs = torch.zeros_like(query_pos), []
        for layer in self.decoder:
            tgt = layer(tgt, query_pos, memory, pos, pad)
            outputs.append(self.decoder_norm(tgt))
        hs = torch.stack(outputs)
        return self.class_embed(hs), self.bbox_embed(hs).sigmoid()

    def flops_forward(self, images: torch.Tensor):
        return self.predict(images, images.new_zeros((len(images), *images.shape[-2:]), dtype=torch.bool))

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        detections, losses = self.run(images, targets if self.training else None, detect=not self.training)
        return losses if self.training else detections

    def run(self, images: list[torch.Tensor], targets: list[dict] | None, detect: bool):
        """One pass: detections (if ``detect``) and the losses of every decoder layer (if ``targets``)."""
        image_list, targets = self.transform(images, targets)
        x = image_list.tensors
        pad = torch.ones((len(x), *x.shape[-2:]), dtype=torch.bool, device=x.device)
        for mask, (h, w) in zip(pad, image_list.image_sizes):
            mask[:h, :w] = False
        logits, boxes = self.predict(x, pad)
        sizes = [tuple(s) for s in image_list.image_sizes]
        detections = self.detect(logits[-1], boxes[-1], sizes) if detect else None
        if targets is None:
            return detections, None
        losses = {}
        for k, (layer_logits, layer_boxes) in enumerate(zip(logits, boxes)):
            prefix = "" if k == len(logits) - 1 else f"d{k}_"
            losses.update({prefix + n: v for n, v in self.losses(layer_logits, layer_boxes, targets, sizes).items()})
        return detections, losses

    def losses(self, logits, boxes, targets, sizes) -> dict[str, torch.Tensor]:
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        pred, gt = [], []
        for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
            gt_boxes = box_convert(t["boxes"].float(), "xyxy", "cxcywh") / boxes.new_tensor([w, h, w, h])
            q, g = self.match(logits[i], boxes[i], gt_boxes, t["labels"])
            classes[i, q] = t["labels"][g]
            pred.append(boxes[i, q])
            gt.append(gt_boxes[g])
        pred, gt = torch.cat(pred).float(), torch.cat(gt)
        num_gt = mean_over_processes(torch.tensor(float(len(gt)), device=logits.device)).clamp(min=1)
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), classes, self.class_weights)
        loss_l1 = F.l1_loss(pred, gt, reduction="sum") / num_gt
        loss_giou = generalized_box_iou_loss(box_convert(pred, "cxcywh", "xyxy"), box_convert(gt, "cxcywh", "xyxy"),
                                             reduction="sum") / num_gt
        return {"loss_ce": self.cls_weight * loss_ce, "loss_bbox": self.l1_weight * loss_l1,
                "loss_giou": self.giou_weight * loss_giou}

    @torch.no_grad()
    def match(self, logits, boxes, gt_boxes, gt_labels):
        if len(gt_boxes) == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        prob = logits.float().softmax(-1)[:, gt_labels]
        boxes = boxes.float()
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
        cost = -self.cls_weight * prob + self.l1_weight * torch.cdist(boxes, gt_boxes, p=1) - self.giou_weight * giou
        return hungarian_match(cost)

    def detect(self, logits, boxes, sizes) -> list[dict]:
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        results = []
        for s, l, b, (h, w) in zip(scores, labels, boxes.float(), sizes):
            xyxy = box_convert(b, "cxcywh", "xyxy") * b.new_tensor([w, h, w, h])
            results.append({"boxes": clip_boxes_to_image(xyxy, (h, w)), "scores": s, "labels": l})
        return results


class DETRDetector(FlopsDetector):
    """DETR on the backbone's ``in_stride`` map (default 32: the last): ``hidden_dim``, ``num_heads``,
    ``num_encoder_layers`` / ``num_decoder_layers``, ``ffn_dim``, ``dropout``, ``num_queries``;
    ``cls_weight`` / ``l1_weight`` / ``giou_weight`` for both matching cost and losses,
    ``no_object_weight`` in the cross-entropy.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, in_stride: int = 32, hidden_dim: int = 256,
                 num_heads: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6, ffn_dim: int = 2048,
                 dropout: float = 0.1, num_queries: int = 100, cls_weight: float = 1.0, l1_weight: float = 5.0,
                 giou_weight: float = 2.0, no_object_weight: float = 0.1, size_divisible: int = 32,
                 image_mean: list[float] = IMAGENET_MEAN, image_std: list[float] = IMAGENET_STD):
        super().__init__()
        self.model = _DETR(backbone, num_classes, in_stride, hidden_dim, num_heads, num_encoder_layers,
                           num_decoder_layers, ffn_dim, dropout, num_queries, cls_weight, l1_weight, giou_weight,
                           no_object_weight, size_divisible, image_mean, image_std)
        names = ("loss_ce", "loss_bbox", "loss_giou")
        self.loss_names = (*(f"d{k}_{n}" for k in range(num_decoder_layers - 1) for n in names), *names)

    def detect_and_losses(self, images: list[torch.Tensor], targets: list[dict]) -> tuple[list[dict], dict]:
        """Detections and losses of the same images from one pass in the current (evaluation) mode,
        for a validation loss: DETR samples nothing, so no training-mode pass is needed."""
        return self.model.run(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets], True)
