"""The dense heads' rules against naive references written from mmdetection 2.13 / mmsegmentation 0.13
(the versions of the PVT configs): test-time selection, valid anchors, low-quality matches, mask
targets, anchor sizes, initialisation, losses and the small settings (issue 29). Tiny tensors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou, generalized_box_iou_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from support import TINY_PVT, StandIn
from vitlab.api import backbone_config
from vitlab.runtime.build import build_backbone
from vitlab.data.base import DatasetInfo
from vitlab.heads.cascade import CascadeMaskRCNNDetector
from vitlab.heads.detection import (LastLevelP6P7NoReLU, MaskRCNNDetector, RetinaNetDetector, binary_mask_targets,
                                    mask_targets_of, valid_flags)
from vitlab.heads.detr import DETRDetector
from vitlab.heads.one_stage import ATSSDetector, GFLDetector
from vitlab.heads.segmentation import FCNHead, SegFormerHead, Segmentor, SemanticFPNHead, UperNetHead
from vitlab.tasks.segmentation import SegmentationTask


# ---- 1. ATSS test-time selection ----------------------------------------------------------------
def mmdet_atss_select(cls, ctr, num_per_level, nms_pre, thr):
    """mmdet 2.13 ATSSHead.get_bboxes + multiclass_nms, before NMS, written as loops: per level the
    nms_pre anchors of highest max_c(cls x ctr); then every (anchor, class) with cls > thr, scored
    cls x ctr."""
    out, start = [], 0
    for n in num_per_level:
        level = range(start, start + n)
        top = sorted(level, key=lambda i: -max(cls[i][c] * ctr[i] for c in range(len(cls[i]))))[:nms_pre]
        out += [(i, c, cls[i][c] * ctr[i]) for i in top for c in range(len(cls[i])) if cls[i][c] > thr]
        start += n
    return sorted(out)


def test_atss_thresholds_the_class_score_alone_and_ranks_by_the_product():
    torch.manual_seed(0)
    model = ATSSDetector(StandIn(), num_classes=3, fpn_channels=16, stacked_convs=1, pre_nms_top_n=4,
                         score_thresh=0.3, detections_per_img=1000).model
    levels, a = [6, 5], 11
    anchors = torch.tensor([[20.0 * i, 0, 20.0 * i + 8, 8] for i in range(a)])  # disjoint: NMS keeps all
    flat = {"cls": torch.randn(1, a, 3) * 2, "ctr": torch.randn(1, a, 1) * 2, "reg": torch.zeros(1, a, 4)}
    det = model.detect(flat, anchors, torch.full((a,), 8.0), levels, [(100, 400)])[0]
    cls, ctr = flat["cls"][0].sigmoid().tolist(), flat["ctr"][0, :, 0].sigmoid().tolist()
    expected = mmdet_atss_select(cls, ctr, levels, 4, 0.3)
    got = sorted(zip((det["boxes"][:, 0] / 20).round().long().tolist(), det["labels"].tolist(),
                     det["scores"].tolist()))
    assert [(i, c) for i, c, _ in got] == [(i, c) for i, c, _ in expected]
    assert torch.allclose(torch.tensor([s for *_, s in got]), torch.tensor([s for *_, s in expected]))
    assert any(s <= 0.3 for *_, s in expected)  # kept on its class score although cls x ctr is below 0.3


# ---- 2. valid anchors (mmdet valid_flags) ---------------------------------------------------------
def test_valid_flags_are_mmdets():
    sizes, grids, strides = [(50, 70), (100, 130)], [(17, 20), (9, 10)], [(8, 8), (16, 16)]
    flags = valid_flags(grids, strides, [2, 1], sizes, 32, "cpu")
    for n, (h, w) in enumerate(sizes):
        expect = []
        for (gh, gw), (s, _), k in zip(grids, strides, [2, 1]):
            vh = min(math.ceil(math.ceil(h / 32) * 32 / s), gh)  # pad_shape, then mmdet's valid_feat_h
            vw = min(math.ceil(math.ceil(w / 32) * 32 / s), gw)
            expect += [y < vh and x < vw for y in range(gh) for x in range(gw) for _ in range(k)]
        assert flags[n].tolist() == expect


def _head_grads(detector, conv, images, targets):
    """Gradient of the training loss with respect to ``conv``'s per-level outputs."""
    outs = []

    def keep(module, args, out):
        out.retain_grad()
        outs.append(out)

    hook = conv.register_forward_hook(keep)
    detector.train()
    sum(detector(images, targets).values()).backward()
    hook.remove()
    return [o.grad for o in outs]


@pytest.mark.parametrize("cls", [RetinaNetDetector, ATSSDetector, GFLDetector])
def test_one_stage_training_ignores_anchors_beyond_the_images_padded_shape(cls):
    torch.manual_seed(0)
    kw = {} if cls is RetinaNetDetector else {"stacked_convs": 1}
    detector = cls(StandIn(), num_classes=3, fpn_channels=16, **kw)
    conv = detector.model.head.classification_head.cls_logits if cls is RetinaNetDetector else detector.model.cls_logits
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 160)]  # the batch: 64 x 160; image 0 padded: 64 x 64
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 56.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[100.0, 10.0, 150.0, 50.0]]), "labels": torch.tensor([2])}]
    for grad, stride in zip(_head_grads(detector, conv, images, targets), [8, 16, 32, 64, 128]):
        inside = math.ceil(64 / stride)  # mmdet: the columns of image 0's padded shape
        assert grad[0, :, :, inside:].abs().sum() == 0  # out of every loss
        if grad.shape[-1] > inside:
            assert grad[1, :, :, inside:].abs().sum() > 0  # the same columns of the wide image train


# ---- 2, 3, 5. RPN anchor targets -------------------------------------------------------------------
def mmdet_rpn_labels(anchors, gt, inside, pos=0.7, neg=0.3, min_pos_iou=0.3):
    """mmdet MaxIoUAssigner (match_low_quality, gt_max_assign_all) on the inside anchors; 1 / 0 / -1."""
    iou = box_iou(anchors, gt)
    labels = torch.full((len(anchors),), -1.0)
    idx = torch.where(inside)[0]
    best, _ = iou[idx].max(1)
    labels[idx[best < neg]] = 0.0
    labels[idx[best >= pos]] = 1.0
    for g in range(len(gt)):  # mmdet's loop over the ground truths
        best_g = iou[idx, g].max()
        if best_g >= min_pos_iou:
            labels[idx[iou[idx, g] == best_g]] = 1.0
    return labels


@pytest.mark.parametrize("allowed_border", [-1, 0])
def test_rpn_targets_follow_mmdets_assigner(allowed_border):
    detector = MaskRCNNDetector(StandIn(), 3, fpn_channels=16, rpn_min_pos_iou=0.3, rpn_allowed_border=allowed_border)
    rpn = detector.model.rpn
    tensors = torch.zeros(2, 3, 64, 128)
    feats = [torch.zeros(2, 16, 64 // s, 128 // s) for s in (4, 8, 16, 32, 64)]
    anchors = rpn.anchor_generator(ImageList(tensors, [(64, 60), (64, 128)]), feats)
    gt = torch.tensor([[4.0, 4.0, 40.0, 50.0], [20.0, 30.0, 23.0, 34.0],  # the second: best IoU < 0.3
                       [70.0, 10.0, 120.0, 60.0]])
    labels, _ = rpn.assign_targets_to_anchors(anchors, [{"boxes": gt}, {"boxes": gt}])
    grids, strides = [f.shape[-2:] for f in feats], [(s, s) for s in (4, 8, 16, 32, 64)]
    valid = valid_flags(grids, strides, [3] * 5, [(64, 60), (64, 128)], 32, "cpu")  # checked above
    assert not valid[0].all() and valid[1].all()  # image 0 is padded to 64 x 64 in a 64 x 128 batch
    for n, width in enumerate([60, 128]):
        a, inside = anchors[n], valid[n]
        if allowed_border >= 0:  # mmdet anchor_inside_flags, on the unpadded image
            inside = inside & (a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] < width) & (a[:, 3] < 64)
        assert torch.equal(labels[n], mmdet_rpn_labels(a, gt, inside))
    # torchvision's rule would make the small box's best anchors positive at any IoU
    assert box_iou(gt[1:2], anchors[1]).max() < 0.3


# ---- 4. mask targets ---------------------------------------------------------------------------------
def test_mask_targets_are_an_aligned_binary_crop_and_resize():
    torch.manual_seed(0)
    masks = (torch.rand(2, 40, 48) > 0.5).to(torch.uint8)
    boxes = torch.tensor([[5.0, 3.0, 12.0, 10.0], [10.0, 6.0, 24.0, 20.0]])  # 7 x 7 (1:1) and 14 x 14 (2:1)
    got = binary_mask_targets(masks, boxes, torch.tensor([0, 1]), 7)
    crop = masks[0, 3:10, 5:12].float()  # mmdet: the pixels themselves
    block = masks[1, 6:20, 10:24].float().reshape(7, 2, 7, 2).mean((1, 3))  # 2 x 2 means, binarised at 0.5
    assert torch.equal(got[0], crop) and torch.equal(got[1], (block >= 0.5).float())
    soft = tv_roi_heads.project_masks_on_boxes(masks, boxes, torch.tensor([0, 1]), 7)
    assert not torch.equal(soft[0], crop)  # torchvision's unaligned RoIAlign samples between pixels
    logits = torch.randn(2, 4, 7, 7)
    with mask_targets_of("mmdet"):
        loss = tv_roi_heads.maskrcnn_loss(logits, [boxes], [masks], [torch.tensor([1, 3])], [torch.tensor([0, 1])])
    naive = F.binary_cross_entropy_with_logits(torch.stack([logits[0, 1], logits[1, 3]]),
                                               torch.stack([crop, (block >= 0.5).float()]))
    assert torch.allclose(loss, naive)
    assert tv_roi_heads.project_masks_on_boxes is not binary_mask_targets  # restored after the call


def test_cascade_takes_the_rpn_and_mask_options():
    det = CascadeMaskRCNNDetector(StandIn(), 3, fpn_channels=16, box_fc_channels=32, mask_channels=16,
                                  rpn_min_pos_iou=0.3, rpn_allowed_border=0, mask_target="mmdet")
    assert det.model.rpn.allowed_border == 0 and det.model.rpn.proposal_matcher.min_pos_iou == 0.3
    assert det.model.roi_heads.mask_target == "mmdet"
    with pytest.raises(ValueError, match="module.head.mask_target='soft'"):
        MaskRCNNDetector(StandIn(), 3, fpn_channels=16, mask_target="soft")


# ---- 6. RetinaNet anchors --------------------------------------------------------------------------
def test_retinanet_base_anchors_are_mmdets_unrounded():
    gen = RetinaNetDetector(StandIn(), 3, fpn_channels=16).model.anchor_generator
    gen.set_cell_anchors(torch.float32, torch.device("cpu"))
    for base, cell in zip([32, 64, 128, 256, 512], gen.cell_anchors):
        expect = []
        for ratio in (0.5, 1.0, 2.0):  # mmdet: ratio-major, octave scales 2^(k/3) inner, centre 0
            for k in range(3):
                w, h = base * 2 ** (k / 3) / math.sqrt(ratio), base * 2 ** (k / 3) * math.sqrt(ratio)
                expect.append([-w / 2, -h / 2, w / 2, h / 2])
        assert torch.allclose(cell, torch.tensor(expect), atol=1e-4)
    assert abs((gen.cell_anchors[0][4, 2] - gen.cell_anchors[0][4, 0]).item() - 40.3175) < 1e-3


# ---- 7. segmentation heads: init and loss ----------------------------------------------------------
def test_segmentation_heads_initialise_as_mmcv_conv_modules():
    torch.manual_seed(0)
    backbone = StandIn(channels=(64, 64, 64, 64))
    heads = [UperNetHead(backbone.out_channels, backbone.strides, 5, channels=64),
             SemanticFPNHead(backbone.out_channels, backbone.strides, 5, fpn_channels=64, channels=64),
             SegFormerHead(backbone.out_channels, backbone.strides, 5, channels=64),
             FCNHead(backbone.out_channels, backbone.strides, 5, channels=64)]
    for head in heads:
        fpn = set(head.fpn.modules()) if isinstance(head, SemanticFPNHead) else set()
        for m in head.modules():
            if isinstance(m, nn.Conv2d) and m is not head.classifier and m not in fpn and m.weight.numel() >= 4096:
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                assert abs(m.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.1  # kaiming normal, fan-out
                assert m.bias is None or not m.bias.any()
            if isinstance(m, nn.BatchNorm2d):
                assert (m.weight == 1).all() and not m.bias.any()
        assert abs(head.classifier.weight.std().item() - 0.01) < 0.003 and not head.classifier.bias.any()
    fpn_conv = heads[1].fpn.layer_blocks[0][0]  # mmseg's FPN neck: Xavier uniform
    bound = math.sqrt(6 / (64 * 9 + 64 * 9))
    assert fpn_conv.weight.abs().max() <= bound and fpn_conv.weight.abs().max() > 0.9 * bound


def test_a_pretrained_backbone_is_untouched_by_the_heads_init(tmp_path):
    cfg = backbone_config("pvt_v2_b0", [o.removeprefix("backbone.") for o in TINY_PVT[1:]])
    torch.manual_seed(1)
    weights = build_backbone(cfg).state_dict()
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, tmp_path / "backbone.pt")  # a dense model's file
    info = DatasetInfo(class_names=("a", "b", "c"), input_size=(64, 64), ignore_index=255)
    head = {"_target_": "vitlab.heads.segmentation.UperNetHead", "channels": 32}
    aux = {"_target_": "vitlab.heads.segmentation.FCNHead", "channels": 16}
    torch.manual_seed(2)
    model = SegmentationTask.build_model({**cfg, "pretrained": str(tmp_path / "backbone.pt")},
                                         {"head": head, "auxiliary_head": aux}, info)
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in weights.items() if k in got) and len(got) > 10


def test_segmentation_loss_is_averaged_over_all_pixels_as_mmseg_0_13():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 4, 5, 6), torch.randint(0, 4, (2, 5, 6))
    labels[0, :2] = 255
    loss = SegmentationTask.pixel_loss(SimpleNamespace(ignore_index=255), logits, labels)
    logp = logits.log_softmax(1)
    total = sum(-logp[n, labels[n, y, x], y, x] for n in range(2) for y in range(5) for x in range(6)
                if labels[n, y, x] != 255)
    assert torch.allclose(loss, total / labels.numel())  # ignored pixels in the denominator


# ---- 8. the small ones -----------------------------------------------------------------------------
def test_atss_box_loss_divides_by_the_centerness_sum_at_least_one():
    model = ATSSDetector(StandIn(), 3, fpn_channels=16, stacked_convs=1).model
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[4.0, 4.0, 20.0, 20.0]])
    flat = {"cls": torch.zeros(1, 2, 3), "reg": torch.zeros(1, 2, 4), "ctr": torch.zeros(1, 2, 1)}
    losses = model.losses(flat, anchors, torch.full((2,), 8.0), torch.ones(1, 2, dtype=torch.bool),
                          [torch.tensor([0, -1])], [{"boxes": gt, "labels": torch.tensor([1])}])
    ctr = math.sqrt((1 / 15) * (1 / 15))  # l = t = 1, r = b = 15 from the anchor centre (5, 5)
    giou = generalized_box_iou_loss(anchors[:1], gt)  # zero deltas: the anchor itself
    assert torch.allclose(losses["loss_bbox"], 2.0 * giou * ctr / 1.0)  # mmdet: sum / max(ctr sum, 1)


def test_gfl_dfl_targets_stop_0_1_below_reg_max():
    torch.manual_seed(0)
    model = GFLDetector(StandIn(), 3, fpn_channels=16, stacked_convs=1).model
    anchors = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    gt = torch.tensor([[1.0, 2.0, 300.0, 7.0]])  # right side 296 px = 37 strides: beyond reg_max 16
    reg = torch.randn(1, 1, 68)
    flat = {"cls": torch.zeros(1, 1, 3), "reg": reg}
    losses = model.losses(flat, anchors, torch.full((1,), 8.0), torch.ones(1, 1, dtype=torch.bool),
                          [torch.tensor([0])], [{"boxes": gt, "labels": torch.tensor([0])}])
    dist = [3 / 8, 2 / 8, 16 - 0.1, 3 / 8]  # l, t, r (clamped at reg_max - eps, mmdet eps 0.1), b
    logp = reg.view(4, 17).log_softmax(-1)
    dfl = [-(math.floor(d) + 1 - d) * logp[k, math.floor(d)] - (d - math.floor(d)) * logp[k, math.floor(d) + 1]
           for k, d in enumerate(dist)]
    weight = 0.5  # sigmoid of the best class logit (0); mmdet divides by max(sum of weights, 1)
    assert torch.allclose(losses["loss_dfl"], 0.25 * weight * torch.stack(dfl).mean() / 1.0, atol=1e-5)


def test_detr_transformer_linears_have_zero_biases():
    det = DETRDetector(StandIn(), 3, hidden_dim=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                       ffn_dim=32)
    linears = [m for layer in [*det.model.encoder, *det.model.decoder] for m in layer.modules()
               if isinstance(m, nn.Linear)]
    assert len(linears) >= 4 and all(not m.bias.any() for m in linears)  # mmdet xavier_init: bias 0


def test_trans2seg_upsamples_with_aligned_corners():
    from vitlab.heads.trans2seg import Trans2SegHead
    backbone = StandIn()
    head = Trans2SegHead(backbone.out_channels, backbone.strides, 3, embed_dim=16, depth=1, num_heads=2,
                         hidden_channels=8, img_size=[64, 64])
    model = Segmentor(backbone, head).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        small = head(backbone(x))
        assert torch.allclose(model(x), F.interpolate(small, (64, 64), mode="bilinear", align_corners=True))


def test_p7_is_a_conv_of_p6_without_relu():
    torch.manual_seed(0)
    block = LastLevelP6P7NoReLU(8, 8)
    block.use_P5 = True
    p5 = torch.randn(1, 8, 8, 8)
    _, p6, p7 = block([p5], [p5], ["p5"])[0]
    assert (p6 < 0).any()
    assert torch.allclose(p7, F.conv2d(p6, block.p7.weight, block.p7.bias, stride=2, padding=1))
    tv = LastLevelP6P7(8, 8)
    tv.load_state_dict(block.state_dict())
    tv.use_P5 = True
    assert not torch.allclose(tv([p5], [p5], ["p5"])[0][2], p7)  # torchvision's ReLU in between
