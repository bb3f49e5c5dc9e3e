"""Dense heads: output shapes, torchvision detector wiring, and full-model parameter counts vs the papers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from vitlab.heads.detection import MaskRCNNDetector, RetinaNetDetector
from vitlab.heads.segmentation import FCNHead, SegFormerHead, Segmentor, SemanticFPNHead, UperNetHead

TABLE = Path(__file__).resolve().parents[1] / "src" / "vitlab" / "paper_tables" / "dense.yaml"
CONF = Path(__file__).resolve().parents[1] / "conf" / "backbone"


class StandIn(nn.Module):
    """A backbone following the contract: strided convs, one map per entry of ``strides``."""

    def __init__(self, channels=(8, 16, 24, 32), strides=(4, 8, 16, 32)):
        super().__init__()
        self.out_channels, self.strides = list(channels), list(strides)
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 3, padding=1) for c in channels)

    def forward(self, x):
        return [conv(nn.functional.avg_pool2d(x, s)) for conv, s in zip(self.convs, self.strides)]


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
    from vitlab.flops import count_params
    from vitlab.zoo import build_task_model

    with torch.device("meta"):
        model = build_task_model(row["name"], row["set"], row["task"])
    params = count_params(model) / 1e6
    assert params == pytest.approx(row["paper_params_m"], rel=0.03), f"{row['source']}: {params:.2f}M"
