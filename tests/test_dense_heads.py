"""Dense heads: output shapes, torchvision detector wiring, and full-model parameter counts vs the papers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from support import StandIn
from vitlab.heads.detection import MaskRCNNDetector, RetinaNetDetector
from vitlab.heads.segmentation import FCNHead, SegFormerHead, Segmentor, SemanticFPNHead, UperNetHead

TABLE = Path(__file__).resolve().parents[1] / "src" / "vitlab" / "tools" / "paper_tables" / "dense.yaml"
CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"


@pytest.mark.parametrize("strides", [(4, 8, 16, 32), (8, 8, 8, 8)])  # the second: GPViT's official seg input
@pytest.mark.parametrize("head", [SemanticFPNHead, UperNetHead, SegFormerHead])
def test_segmentation_heads_shapes(head, strides):
    backbone = StandIn(strides=strides)
    model = Segmentor(backbone, head(backbone.out_channels, backbone.strides, 7),
                      FCNHead(backbone.out_channels, backbone.strides, 7))
    x = torch.randn(2, 3, 64, 96)
    stride0 = strides[0]
    assert model.decode_head(backbone(x)).shape == (2, 7, 64 // stride0, 96 // stride0)
    logits, aux = model(x)
    assert logits.shape == aux.shape == (2, 7, 64, 96)
    model.eval()
    assert model(torch.randn(1, 3, 50, 70)).shape == (1, 7, 50, 70)  # sizes that are not multiples of 32


def test_semantic_fpn_head_structure():
    backbone = StandIn()
    head = SemanticFPNHead(backbone.out_channels, backbone.strides, 150)
    convs = [sum(isinstance(m, nn.Conv2d) for m in h.modules()) for h in head.scale_heads]
    ups = [sum(isinstance(m, nn.Upsample) for m in h.modules()) for h in head.scale_heads]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]  # each level brought to stride 4
    assert all(m.out_channels in (128, 150) for h in head.scale_heads for m in h.modules() if isinstance(m, nn.Conv2d))


def test_head_index_error_is_clear():
    backbone = StandIn(channels=(8,), strides=(8,))
    with pytest.raises(ValueError, match=r"in_index \[0, 1, 2, 3\] but the backbone returns 1 maps"):
        UperNetHead(backbone.out_channels, backbone.strides, 5)
    with pytest.raises(ValueError, match=r"strides \[8\].*needs \[4, 8, 16, 32\].*out_strides"):
        MaskRCNNDetector(backbone, 5)


def _targets(num_classes):
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]),
             "labels": torch.tensor([0, num_classes - 1]),
             "masks": torch.zeros(2, 64, 80, dtype=torch.uint8).index_fill_(1, torch.arange(10, 40), 1)}]


@pytest.mark.parametrize("cls", [RetinaNetDetector, MaskRCNNDetector])
def test_detectors_train_and_predict(cls):
    torch.manual_seed(0)
    detector = cls(StandIn(), num_classes=5, fpn_channels=16)
    losses = detector([torch.rand(3, 64, 80)], _targets(5))
    expected = {"classification", "bbox_regression"} if cls is RetinaNetDetector else {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    detector.eval()
    with torch.no_grad():
        (det,) = detector([torch.rand(3, 50, 70)])  # no resize inside: outputs live on the input image
    assert det["boxes"].shape[1] == 4 and (det["boxes"][:, 2] <= 70).all() and (det["boxes"][:, 3] <= 50).all()
    assert ((det["labels"] >= 0) & (det["labels"] < 5)).all()  # Mask R-CNN's background shift undone
    if cls is MaskRCNNDetector:
        assert det["masks"].shape[-2:] == (50, 70)
    features = detector.model.backbone(torch.rand(1, 3, 64, 64))
    names = ["0", "1", "2", "p6", "p7"] if cls is RetinaNetDetector else ["0", "1", "2", "3", "pool"]
    assert list(features) == names


@pytest.mark.parametrize("cls", [RetinaNetDetector, MaskRCNNDetector])
def test_validation_losses_are_the_training_losses(cls):
    """detect_and_losses (backbone run once, for validation) = a plain evaluation pass + a plain
    training-mode pass under the same seed (the stand-in backbone has no dropout or norm, so its modes
    agree); training's RNG stream and the module's mode are left as they were."""
    torch.manual_seed(0)
    detector = cls(StandIn(), num_classes=5, fpn_channels=16).eval()
    images, targets = [torch.rand(3, 64, 80)], _targets(5)
    calls = []
    hook = detector.model.backbone.body.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        rng = torch.get_rng_state()
        detections, losses = detector.detect_and_losses(images, targets)
        assert torch.equal(torch.get_rng_state(), rng) and not detector.training
        assert len(calls) == 1  # the backbone ran once
        hook.remove()
        expected_detections = detector(images)
        torch.manual_seed(0)
        expected_losses = detector.train()(images, targets)
    assert set(losses) == set(cls.loss_names) == set(expected_losses)
    for name in losses:
        torch.testing.assert_close(losses[name], expected_losses[name])
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(detections[0][key], expected_detections[0][key])


def test_detector_internals_follow_the_recipe():
    backbone = StandIn(channels=(8, 16, 24, 256))  # C5 with 256 channels: torchvision would pick P5
    retina = RetinaNetDetector(backbone, 80)
    fpn = retina.model.backbone.fpn
    assert fpn.extra_blocks.use_P5 is False and fpn.extra_blocks.p6.in_channels == 256
    assert retina.model.anchor_generator.num_anchors_per_location() == [9] * 5
    assert len(fpn.inner_blocks) == 3  # strides 8-32 only
    w = fpn.layer_blocks[0][0].weight  # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (256 * 9 + 256 * 9)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    cls_conv = retina.model.head.classification_head.conv[0][0].weight
    assert abs(float(cls_conv.detach().std()) - 0.01) < 0.002
    mask_rcnn = MaskRCNNDetector(StandIn(), 80)
    assert mask_rcnn.model.roi_heads.box_predictor.cls_score.out_features == 81  # + background
    # the internal transform normalises and pads to 32 but does not resize
    images, _ = mask_rcnn.model.transform([torch.rand(3, 50, 70)])
    assert images.tensors.shape[-2:] == (64, 96) and images.image_sizes == [(50, 70)]


# One backbone per family here (every row is checked by the zoo's own test, tests/test_zoo.py).
CHECKED = ("pvt_tiny", "pvt_v2_b0", "pale_t", "scalablevit_s")


def _rows():
    rows = yaml.safe_load(TABLE.read_text())
    return [pytest.param(r, id=f"{r['name']}-{r['task']}") for r in rows
            if r.get("check_task", True) and r["name"] in CHECKED]


@pytest.mark.parametrize("row", _rows())
def test_full_model_params_match_the_papers(row):
    if not (CONF / f"{row['name']}.yaml").is_file():
        pytest.skip(f"backbone config {row['name']} not there yet")
    from vitlab.runtime.flops import count_params
    from vitlab.tools.zoo import build_task_model

    with torch.device("meta"):
        model = build_task_model(row["name"], row["set"], row["task"])
    params = count_params(model) / 1e6
    assert params == pytest.approx(row["paper_params_m"], rel=0.03), f"{row['source']}: {params:.2f}M"


# ---- mmdetection / mmsegmentation options (defaults: torchvision's behaviour) ----------------
def test_maskrcnn_shared4conv1fc_box_head_with_syncbn_and_fpn_norm():
    detector = MaskRCNNDetector(StandIn(), 80, box_head="4conv1fc", box_head_norm="SyncBN", fpn_norm="SyncBN")
    head = detector.model.roi_heads.box_head
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)  # bias-free before norm
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in head.modules()) == 4
    assert [m.out_features for m in head.modules() if isinstance(m, nn.Linear)] == [1024]
    # mmdet's Shared4Conv1FCBBoxHead: 4 x (3x3x256x256 + BN 2x256) + FC 256*7*7 -> 1024
    assert sum(p.numel() for p in head.parameters()) == 4 * (9 * 256 * 256 + 2 * 256) + 256 * 49 * 1024 + 1024
    fpn = detector.model.backbone.fpn
    assert all(isinstance(b[1], nn.SyncBatchNorm) and b[0].bias is None for b in [*fpn.inner_blocks, *fpn.layer_blocks])
    losses = detector([torch.rand(3, 64, 80)], _targets(80))  # SyncBN is plain BN in one process
    assert all(torch.isfinite(v) for v in losses.values())


def test_dense_head_option_errors_name_the_key():
    with pytest.raises(ValueError, match=r"module.head.fpn_norm='LN': expected one of BN, SyncBN, GN, none"):
        RetinaNetDetector(StandIn(), 5, fpn_norm="LN")
    with pytest.raises(ValueError, match=r"module.head.box_loss='giou': expected one of smooth_l1, l1"):
        MaskRCNNDetector(StandIn(), 5, box_loss="giou")
    with pytest.raises(ValueError, match=r"box_head_norm='BN' needs box_head=4conv1fc"):
        MaskRCNNDetector(StandIn(), 5, box_head_norm="BN")
    with pytest.raises(ValueError, match=r"module.head.norm='batch'"):
        UperNetHead([8, 16, 24, 32], [4, 8, 16, 32], 5, norm="batch")


def test_aligned_roi_align_is_mmdets_per_level_roi_align():
    from torchvision.ops import MultiScaleRoIAlign, roi_align

    from vitlab.heads.detection import LevelRoIAlign

    torch.manual_seed(0)
    feats = {str(k): torch.randn(2, 3, 64 // 2 ** k, 96 // 2 ** k) for k in range(4)}  # strides 4..32 of 256x384
    xy = torch.rand(2, 40, 2) * torch.tensor([300.0, 200.0])
    wh = torch.rand(2, 40, 2) * 250 + 4
    boxes = list(torch.cat([xy, xy + wh], -1))
    shapes = [(256, 384)] * 2
    ours = LevelRoIAlign(list(feats), 7, 0, aligned=True)(feats, boxes, shapes)
    # mmdet's SingleRoIExtractor: level floor(log2(sqrt(area) / 56)) in 0..3, RoIAlign(aligned, sampling 0)
    for i, image_boxes in enumerate(boxes):
        scale = ((image_boxes[:, 2] - image_boxes[:, 0]) * (image_boxes[:, 3] - image_boxes[:, 1])).sqrt()
        level = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
        for j, (box, lvl) in enumerate(zip(image_boxes, level.tolist())):
            ref = roi_align(feats[str(lvl)][i:i + 1], [box[None]], 7, 1 / 2 ** (lvl + 2), 0, aligned=True)
            torch.testing.assert_close(ours[i * 40 + j], ref[0])
    # aligned=False is torchvision's own pooler
    torch.testing.assert_close(LevelRoIAlign(list(feats), 7, 2, aligned=False)(feats, boxes, shapes),
                               MultiScaleRoIAlign(list(feats), 7, 2)(feats, boxes, shapes))


def test_l1_box_losses_match_a_naive_l1():
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from vitlab.heads.detection import fastrcnn_l1_loss

    torch.manual_seed(0)
    labels = [torch.tensor([0, 2, 1, 0, 3]), torch.tensor([1, 0, 0])]
    targets = [torch.randn(5, 4), torch.randn(3, 4)]
    logits, regression = torch.randn(8, 4), torch.randn(8, 16)
    _, loss = fastrcnn_l1_loss(logits, regression, labels, targets)
    flat_labels, flat_targets = torch.cat(labels), torch.cat(targets)
    naive = sum((regression[i, 4 * c:4 * c + 4] - flat_targets[i]).abs().sum() for i, c in enumerate(flat_labels.tolist())
                if c > 0) / 8
    torch.testing.assert_close(loss, naive)
    # the RPN: same sampling as torchvision's compute_loss; smooth L1 reproduces it, L1 is the plain sum
    detector = MaskRCNNDetector(StandIn(), 5, rpn_box_loss="l1")
    rpn = detector.model.rpn
    anchor_labels = [(torch.rand(300) > 0.7).float() - (torch.rand(300) > 0.9).float()]  # 1 fg, 0 bg, -1 ignored
    objectness, deltas, reg_targets = torch.randn(300, 1), torch.randn(300, 4), [torch.randn(300, 4)]
    torch.manual_seed(1)
    _, ours = rpn.compute_loss(objectness, deltas, anchor_labels, reg_targets)
    torch.manual_seed(1)
    pos, neg = rpn.fg_bg_sampler(anchor_labels)
    pos, sampled = torch.where(pos[0])[0], torch.where(pos[0] | neg[0])[0]
    torch.testing.assert_close(ours, (deltas[pos] - reg_targets[0][pos]).abs().sum() / len(sampled))
    rpn.box_loss_kind = "smooth_l1"
    torch.manual_seed(1)
    ours = rpn.compute_loss(objectness, deltas, anchor_labels, reg_targets)
    torch.manual_seed(1)
    torch.testing.assert_close(ours, RegionProposalNetwork.compute_loss(rpn, objectness, deltas, anchor_labels,
                                                                        reg_targets))


@pytest.mark.parametrize("norm,layer", [("SyncBN", nn.SyncBatchNorm), ("GN", nn.GroupNorm), ("none", None)])
def test_segmentation_head_norm_option(norm, layer):
    backbone = StandIn()
    head = UperNetHead(backbone.out_channels, backbone.strides, 5, channels=64, norm=norm)
    norms = [m for m in head.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm))]
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d) and m is not head.classifier]
    if layer is None:
        assert not norms and all(c.bias is not None for c in convs)
    else:
        assert norms and all(type(m) is layer for m in norms) and all(c.bias is None for c in convs)
    assert head(backbone(torch.rand(2, 3, 64, 64))).shape == (2, 5, 16, 16)
