"""Mixed precision: under bf16 autocast (CPU: the same autocast code path as GPU) the detectors decode
boxes, match and compute losses in float32 and return float32 boxes, and the segmentor's logits are
upsampled in float32. References: a hand-written delta decode in float32 on torchvision's anchors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from support import StandIn
from vitlab.heads.detection import MaskRCNNDetector, RetinaNetDetector
from vitlab.heads.segmentation import Segmentor, UperNetHead

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
SIZE = (600, 1000)  # coordinates past 512 px: bf16 would round them to 4 px steps (padded: 608 x 1024)


def decode(deltas: torch.Tensor, anchors: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The standard (R-CNN) delta decode, written out, in float32, clipped to the image."""
    deltas, anchors = deltas.float(), anchors.float()
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    dx, dy, dw, dh = (deltas / torch.tensor(weights)).unbind(-1)
    dw, dh = dw.clamp(max=math.log(1000 / 16)), dh.clamp(max=math.log(1000 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, dw.exp() * w, dh.exp() * h
    (h_max, w_max) = SIZE
    return torch.stack([(px - 0.5 * pw).clamp(0, w_max), (py - 0.5 * ph).clamp(0, h_max),
                        (px + 0.5 * pw).clamp(0, w_max), (py + 0.5 * ph).clamp(0, h_max)], dim=-1)


def fp32_anchors(generator: AnchorGenerator, features: list[torch.Tensor], padded) -> torch.Tensor:
    """The detector's anchors for these maps (its generator's sizes, ratios and strides), computed from
    float32 maps outside autocast by a fresh generator."""
    fresh = type(generator)(generator.sizes, generator.aspect_ratios)
    fresh.strides = generator.strides
    images = ImageList(torch.zeros(1, 3, *padded), [SIZE])
    return fresh(images, [f.float() for f in features])[0]


def distance_to_set(boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each box, the largest coordinate difference to its nearest reference box (L-inf)."""
    return torch.cat([torch.cdist(chunk, reference, p=float("inf")).amin(-1) for chunk in boxes.split(32)])


def capture(module: nn.Module, store: dict, key: str, pre: bool = False):
    if pre:
        module.register_forward_pre_hook(lambda _m, args: store.__setitem__(key, args))
    else:  # registered after the detector's own hook: sees the float32 outputs
        module.register_forward_hook(lambda _m, args, out: store.__setitem__(key, (args, out)))


def test_retinanet_boxes_are_float32_fp32_decodes_under_bf16_autocast():
    torch.manual_seed(0)
    detector = RetinaNetDetector(StandIn(), num_classes=3, fpn_channels=16, score_thresh=0.0, nms_thresh=1.0,
                                 detections_per_img=300).eval()
    nn.init.normal_(detector.model.head.regression_head.bbox_reg.weight, std=0.05)  # deltas of a trained head
    seen = {}
    capture(detector.model.head, seen, "head")
    with torch.no_grad(), torch.autocast(**BF16):
        (det,) = detector([torch.rand(3, *SIZE)])
    (features,), out = seen["head"]
    assert features[0].dtype == torch.bfloat16  # the convolutions did run in bf16
    assert out["bbox_regression"].dtype == torch.float32 and det["boxes"].dtype == det["scores"].dtype == torch.float32
    anchors = fp32_anchors(detector.model.anchor_generator, features, (608, 1024))
    reference = decode(out["bbox_regression"][0], anchors)
    assert len(det["boxes"]) == 300 and det["boxes"].max() > 512
    assert distance_to_set(det["boxes"], reference).max() < 1e-3
    # the same outputs decoded in bf16 land up to several pixels away: the check above can fail
    bf16 = decode(out["bbox_regression"][0].bfloat16(), anchors.bfloat16()).bfloat16().float()
    assert (bf16 - reference).abs().max() > 1.0


def test_maskrcnn_proposals_and_boxes_are_float32_fp32_decodes_under_bf16_autocast():
    torch.manual_seed(0)
    detector = MaskRCNNDetector(StandIn(), num_classes=3, fpn_channels=16, box_score_thresh=0.0,
                                box_nms_thresh=1.0, box_detections_per_img=200, roi_aligned=True,
                                roi_sampling_ratio=0).eval()
    nn.init.normal_(detector.model.rpn.head.bbox_pred.weight, std=0.05)  # deltas of trained heads
    nn.init.normal_(detector.model.roi_heads.box_predictor.bbox_pred.weight, std=0.05)
    seen = {}
    capture(detector.model.rpn.head, seen, "rpn")
    capture(detector.model.roi_heads, seen, "proposals", pre=True)
    capture(detector.model.roi_heads.box_predictor, seen, "box")
    with torch.no_grad(), torch.autocast(**BF16):
        (det,) = detector([torch.rand(3, *SIZE)])
    (features,), (objectness, deltas) = seen["rpn"]
    assert features[0].dtype == torch.bfloat16
    _, rpn_deltas = concat_box_prediction_layers(objectness, deltas)
    anchors = fp32_anchors(detector.model.rpn.anchor_generator, features, (608, 1024))
    (proposals,) = seen["proposals"][1]
    assert proposals.dtype == torch.float32
    assert distance_to_set(proposals, decode(rpn_deltas, anchors)).max() < 1e-3
    _, (class_logits, box_regression) = seen["box"]
    assert box_regression.dtype == class_logits.dtype == torch.float32
    per_class = box_regression.reshape(len(proposals), -1, 4)[:, 1:]  # foreground classes
    reference = decode(per_class.reshape(-1, 4), proposals.repeat_interleave(per_class.shape[1], 0),
                       weights=(10.0, 10.0, 5.0, 5.0))
    assert det["boxes"].dtype == torch.float32 and det["boxes"].max() > 512
    assert distance_to_set(det["boxes"], reference).max() < 1e-3


@pytest.mark.parametrize("cls", [RetinaNetDetector, MaskRCNNDetector])
def test_detector_losses_are_float32_under_bf16_autocast(cls):
    torch.manual_seed(0)
    detector = cls(StandIn(), num_classes=3, fpn_channels=16)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1]),
                "masks": torch.ones(1, 64, 80, dtype=torch.uint8)}]
    with torch.autocast(**BF16):
        losses = detector([torch.rand(3, 64, 80)], targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_segmentor_upsamples_float32_logits_under_bf16_autocast():
    torch.manual_seed(0)
    backbone = StandIn()
    model = Segmentor(backbone, UperNetHead(backbone.out_channels, backbone.strides, 5, channels=16))
    seen = {}
    capture(model.decode_head, seen, "head")
    with torch.autocast(**BF16):
        logits, _ = model(torch.rand(2, 3, 64, 96))
        loss = F.cross_entropy(logits, torch.randint(0, 5, (2, 64, 96)))
    head_out = seen["head"][1]
    assert head_out.dtype == torch.bfloat16 and logits.dtype == loss.dtype == torch.float32
    reference = F.interpolate(head_out.float(), size=(64, 96), mode="bilinear", align_corners=False)
    assert torch.equal(logits, reference)
