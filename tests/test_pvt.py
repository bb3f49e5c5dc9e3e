"""PVT v1 / PVTv2 against independent references.

* PVTv2 (all 7 variants): timm's ``pvt_v2_*`` with random weights. Its state dict is
  mapped back to the official whai362/PVT layout (the inverse of timm's
  ``checkpoint_filter_fn``, written here), converted by our ``convert_official``,
  loaded strictly, and the logits must agree.
* PVT v1 (no timm model) and PVTv2 / -Li through the official key names:
  ``tests/fixtures/pvt_v{1,2}_official_tiny.pt``. How they were made: the official
  ``classification/pvt.py`` / ``pvt_v2.py`` of github.com/whai362/PVT (commit 57e2dfa),
  run outside this repo with torch 2.14 / timm 1.0.31 (its ``timm.models.layers``
  imports still resolve), built with tiny configs (stored in the fixture:
  embed_dims [8, 16, 20, 32], heads [1, 2, 5, 8], v1 depths [1, 2, 1, 1] with
  img_size 64, v2 depths [1, 1, 1, 1], 10 classes, LayerNorm eps 1e-6 as their
  registered models), torch.manual_seed(0), every 1-D parameter (norms, biases)
  shifted by 0.1 * N(0, 1) so no op is an identity, then run in eval mode on
  N(0, 1) inputs (rounded to fp16 for storage, run in fp32) at two sizes, one
  needing position-embedding interpolation (v1: 96x80). The file holds the
  official state dict, the config, inputs and logits.
* Parameter counts: the official code's (counted by running it); GFLOPs: the papers.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import vitlab
from vitlab.backbones.pvt import PyramidVisionTransformer
from vitlab.runtime.flops import count_gmacs, count_params

FIXTURES = Path(__file__).parent / "fixtures"

# name: (official-code params, ImageNet classifier; paper GFLOPs at 224)  -- official code, seeds 000/001
ZOO = {
    "pvt_tiny": (13_229_288, 1.9),
    "pvt_small": (24_485_864, 3.8),
    "pvt_medium": (44_208_104, 6.7),
    "pvt_large": (61_369_320, 9.8),
    "pvt_v2_b0": (3_666_760, 0.6),
    "pvt_v2_b1": (14_009_000, 2.1),
    "pvt_v2_b2": (25_362_856, 4.0),
    "pvt_v2_b2_li": (22_553_512, 3.9),
    "pvt_v2_b3": (45_238_696, 6.9),
    "pvt_v2_b4": (62_556_072, 10.1),
    "pvt_v2_b5": (81_956_008, 11.8),
}
V2 = [n for n in ZOO if n.startswith("pvt_v2")]


@pytest.mark.parametrize("name", list(ZOO))
def test_params_match_official_code(name):
    with torch.device("meta"):  # counting needs no memory or compute
        model = vitlab.create_model(name)
    assert count_params(model) == ZOO[name][0]


# GFLOPs of every variant are also checked by the zoo test (paper_tables/pvt.yaml); here one of
# each kind, since counting the deep ones takes seconds each.
@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_small", "pvt_v2_b0", "pvt_v2_b2", "pvt_v2_b2_li"])
def test_gflops_within_10_percent_of_paper(name):
    with torch.device("meta"):
        model = vitlab.create_model(name)
    assert count_gmacs(model, (224, 224)) == pytest.approx(ZOO[name][1], rel=0.10)


def timm_to_official(sd: dict) -> dict:
    """Inverse of timm's pvt_v2 ``checkpoint_filter_fn``: timm layout -> whai362/PVT layout."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^patch_embed\.", "patch_embed1.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"patch_embed{int(m[1]) + 1}.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.", k)
        k = re.sub(r"^stages\.(\d+)\.norm\.", lambda m: f"norm{int(m[1]) + 1}.", k)
        k = k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        out[k] = v
    return out


def _random_timm(name: str, seed: int) -> torch.nn.Module:
    """timm's model with random weights, made quickly (meta build + randn: b5 has 82M parameters)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:  # norms around 1, biases around 0, but random so that every op counts
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + float("norm" in n and n.endswith("weight")))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


@pytest.mark.parametrize("name", V2)
def test_pvt_v2_matches_timm(name):
    ref = _random_timm(name, seed=0)
    official = timm_to_official(ref.state_dict())
    with torch.device("meta"):
        ours = vitlab.create_model(name)
    ours.load_state_dict(PyramidVisionTransformer.convert_official(official), strict=True, assign=True)
    ours.eval()
    g = torch.Generator().manual_seed(1)
    small = name in ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li")  # the deep ones: one size only
    with torch.no_grad():
        for size in [(72, 40), (64, 64)][: 2 if small else 1]:  # non-square and square, not multiples of 32
            x = torch.randn(1, 3, *size, generator=g)
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)
        if small:  # dense outputs = timm's stage outputs (strides 4/8/16/32, after each stage's norm)
            for a, b in zip(ours.backbone(x), ref.forward_intermediates(x, intermediates_only=True)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _tiny_overrides(cfg: dict, v1: bool) -> list[str]:
    lst = lambda v: "[" + ",".join(str(i) for i in v) + "]"  # noqa: E731
    out = [f"embed_dims={lst(cfg['embed_dims'])}", f"depths={lst(cfg['depths'])}",
           f"mlp_ratios={lst(cfg['mlp_ratios'])}", f"num_heads={lst(cfg['num_heads'])}",
           f"sr_ratios={lst(cfg['sr_ratios'])}"]
    if v1:
        out.append(f"img_size={cfg['img_size']}")
    return out


def _check_fixture(fix: dict, name: str, v1: bool) -> None:
    model = vitlab.create_model(name, num_classes=10, overrides=_tiny_overrides(fix["config"], v1))
    model.load_state_dict(PyramidVisionTransformer.convert_official(fix["state_dict"]), strict=True)
    model.eval()
    with torch.no_grad():
        for x, y in zip(fix["inputs"], fix["logits"]):
            torch.testing.assert_close(model(x.float()), y, rtol=1e-4, atol=1e-5)


def test_pvt_v1_matches_official_code():
    fix = torch.load(FIXTURES / "pvt_v1_official_tiny.pt", weights_only=True)
    assert tuple(fix["inputs"][1].shape[-2:]) == (96, 80)  # needs interpolated position embeddings
    _check_fixture(fix, "pvt_tiny", v1=True)


@pytest.mark.parametrize("variant,name", [("pvt_v2", "pvt_v2_b0"), ("pvt_v2_li", "pvt_v2_b2_li")])
def test_pvt_v2_matches_official_code(variant, name):
    fix = torch.load(FIXTURES / "pvt_v2_official_tiny.pt", weights_only=True)[variant]
    _check_fixture(fix, name, v1=False)


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_v2_b0"])
def test_backbone_contract_any_input_size(name):
    backbone = vitlab.create_backbone(name, overrides=["depths=[1,1,1,1]"]).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 75, 61))
    assert backbone.strides == [4, 8, 16, 32]
    assert [f.shape[1] for f in feats] == backbone.out_channels
    # each stage: the conv output size of its patch embedding (floor for v1, ceil for v2's padding)
    h, w = 75, 61
    for f, s in zip(feats, [4, 2, 2, 2]):
        h, w = (h // s, w // s) if name == "pvt_tiny" else (-(-h // s), -(-w // s))
        assert tuple(f.shape[2:]) == (h, w)


def test_small_wide_is_pvt_small_times_1p4():
    # PVT Table 9: every C_i x 1.4; rounded per head so heads divide the width (89.6 -> 90 per head)
    backbone = vitlab.create_backbone("pvt_small_wide", overrides=["depths=[1,1,1,1]"])
    assert backbone.out_channels == [90, 180, 450, 720]
    assert all(abs(c - 1.4 * b) / (1.4 * b) < 0.02 for c, b in zip(backbone.out_channels, [64, 128, 320, 512]))


def test_component_ablation_ends_at_pvt_v2_b2_li():
    # PVTv2 component ablation: PVT-Small + OPE + conv FFN (no APE, GAP head) + linear SRA = PVTv2-B2-Li
    rows = ["overlap_patch_embed=true", "conv_ffn=true", "pos_embed=none", "cls_token=false",
            "stage_norm=true", "linear_sra=true"]
    with torch.device("meta"):
        model = vitlab.create_model("pvt_small", overrides=rows)
    assert count_params(model) == ZOO["pvt_v2_b2_li"][0]



def test_v1_checkpoint_at_224_loads_into_another_img_size(tmp_path, caplog):
    # issue: ImageNet weights into a dense model built for its input size; the position embeddings
    # are resized bilinearly (what the v1 code does at run time), everything else loads as it is
    torch.manual_seed(0)
    src = vitlab.create_model("pvt_tiny", num_classes=10, overrides=["depths=[1,1,1,1]"])
    torch.save(src.state_dict(), tmp_path / "pvt_tiny_224.pth")
    with caplog.at_level(logging.INFO, logger="vitlab.runtime.checkpoints"):
        dst = vitlab.create_model("pvt_tiny", num_classes=10, pretrained=str(tmp_path / "pvt_tiny_224.pth"),
                                  overrides=["depths=[1,1,1,1]", "img_size=320"])
    for i, (side, new) in enumerate(zip([56, 28, 14, 7], [80, 40, 20, 10])):
        stage = dst.backbone.stages[i]
        grid = src.backbone.stages[i].pos_embed.detach().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        torch.testing.assert_close(stage.pos_embed.detach(), ref)
    assert sum("resized" in r.message and "pos_embed" in r.message for r in caplog.records) == 4
    same = {k: v for k, v in src.state_dict().items() if "pos_embed" not in k or "cls" in k}
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in same.items())
