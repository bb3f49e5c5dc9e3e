"""timm baselines (PVT Tables 2-5 CNNs, Table 8 columnar ViT) against timm's own classifiers."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.backbones.timm_baselines import TimmCNN, TimmColumnarViT, TimmSwin
from vitlab.runtime.flops import count_params

# config -> timm model of the same weights; (params of timm's 1000-class classifier are the reference)
CNNS = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnext101_32x4d": "resnext101_32x4d",
    "resnext101_64x4d": "resnext101_64x4d",
}


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (BN statistics too), so the comparison covers every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif t.ndim == 1:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1 + float(name.endswith("weight")))
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(CNNS))
def test_cnn_params_equal_timm_classifier(name):
    with torch.device("meta"):
        ours = vitlab.create_model(name)
        ref = timm.create_model(CNNS[name], pretrained=False)
    assert count_params(ours) == count_params(ref)
    assert ours.backbone.strides == [4, 8, 16, 32]
    assert ours.backbone.out_channels[-1] == ref.num_features


@pytest.mark.parametrize("name", ["resnet18", "resnext101_32x4d"])
def test_cnn_logits_equal_timm_with_converted_weights(name):
    ref = _random(timm.create_model(CNNS[name], pretrained=False), seed=0)
    ours = vitlab.create_model(name)
    ours.load_state_dict(TimmCNN.convert_official(ref.state_dict()), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
        feats = ours.backbone(x)
        # stride-32 map = what timm's head pools
        torch.testing.assert_close(feats[-1], ref.forward_features(x), rtol=1e-4, atol=1e-4)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 12), (8, 6), (4, 3), (2, 2)]


def test_vit_small_p32_classifier_and_pyramid_match_timm():
    ref = _random(timm.create_model("vit_small_patch32_224", pretrained=False, dynamic_img_size=True), seed=1)
    ours = vitlab.create_model("vit_small_p32")
    assert count_params(ours) == count_params(ref)
    ours.load_state_dict(TimmColumnarViT.convert_official(ref.state_dict()), strict=True)
    ours.eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 96, 128)  # not the 224 pre-training size: resized position embedding
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
        feats = ours.backbone(x)
        # PVT footnote 3: layers 2, 4, 6, 8 (1-based) of ViT-Small/32, resized to strides 4..32
        layers = ref.forward_intermediates(x, indices=[1, 3, 5, 7], intermediates_only=True)
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    torch.testing.assert_close(feats[-1], layers[-1])  # stride 32: the 8th layer itself
    up = torch.nn.functional.interpolate(layers[0], scale_factor=8, mode="bilinear", align_corners=False)
    torch.testing.assert_close(feats[0], up)


def test_vit_small_p4_builds_with_stride4_grid():
    with torch.device("meta"):
        ours = vitlab.create_model("vit_small_p4")
        feats = ours.backbone(torch.zeros(1, 3, 64, 64, device="meta"))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_frozen_stages_and_norm_eval_as_mmdetection():
    from vitlab.backbones.timm_baselines import TimmCNN

    common = dict(model_name="resnet18", out_indices=[1, 2, 3, 4], in_chans=3, drop_rate=0.0, drop_path_rate=0.0)
    plain = TimmCNN(**common)
    frozen = TimmCNN(**common, frozen_stages=1, norm_eval=True)
    assert plain.state_dict().keys() == frozen.state_dict().keys()  # same checkpoints either way
    trainable = {n.split(".")[1] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}  # stem + layer1 frozen (mmdet frozen_stages=1)
    assert all(p.requires_grad for p in plain.parameters())
    frozen.train()
    assert frozen.training and not any(m.training for m in frozen.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = frozen.body.layer3[0].bn1.running_mean.clone()
    frozen(torch.randn(2, 3, 64, 64))
    assert torch.equal(before, frozen.body.layer3[0].bn1.running_mean)  # norm_eval: statistics kept
    only_frozen = TimmCNN(**common, frozen_stages=1)
    only_frozen.train()
    assert not only_frozen.body.bn1.training and not only_frozen.body.layer1.training
    assert only_frozen.body.layer2.training
    with pytest.raises(ValueError, match="backbone.frozen_stages=7"):
        TimmCNN(**common, frozen_stages=7)


def test_swin_tiny_classifier_and_pyramid_match_timm():
    """PVTv2 Table 4's Swin-T: timm's classifier from timm's weights; its stages as the pyramid."""
    ref = _random(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), seed=2)
    ours = vitlab.create_model("swin_tiny")
    assert count_params(ours) == count_params(ref) + 2 * (96 + 192 + 384)  # + the three extra output norms
    ours.load_state_dict(TimmSwin.convert_official(ref.state_dict()), strict=True)
    ours.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
        stages = ref.forward_intermediates(x, intermediates_only=True)  # NCHW, before any norm
        feats = ours.backbone(x)
    assert ours.backbone.strides == [4, 8, 16, 32] and ours.backbone.out_channels == [96, 192, 384, 768]
    # new norms start as identity-affine LayerNorms over channels
    torch.testing.assert_close(feats[0], F.layer_norm(stages[0].permute(0, 2, 3, 1), (96,)).permute(0, 3, 1, 2))
    with torch.no_grad():  # detector-sized inputs: any size (padded to the patch size, windows padded)
        assert [tuple(f.shape[-2:]) for f in ours.backbone(torch.randn(1, 3, 98, 130))] == [
            (25, 33), (13, 17), (7, 9), (4, 5)]
