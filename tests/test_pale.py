"""Pale Transformer (seed 002): attention modes vs naive masked attention, Eq. 5, configs.

The paper's params/GFLOPs rows (src/vitlab/tools/paper_tables/pale.yaml) are checked by
tests/test_zoo.py; here: what only this family has.
"""
from __future__ import annotations

import math
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vitlab
from vitlab.api import backbone_config, build_backbone
from vitlab.backbones.base import ImageClassifier
from vitlab.backbones.pale import PaleAttention, PaleTransformer
from vitlab.runtime.flops import count_gmacs

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=[16, 32, 48, 64], depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4])


# ---------------------------------------------------------------------------
# Naive reference: explicit region masks over the unpadded map, masked softmax.

def _region(mode: str, h: int, w: int, s_r: int, s_c: int) -> list[torch.Tensor]:
    """Boolean ``(hw, hw)`` masks ``allowed[i, j]`` (query i may attend key j), one per branch.

    Written from the definitions: a pale's row group = s_r interlaced rows, i.e. rows
    with equal ``r mod N_r`` where ``N_r = ceil(h / s_r)`` groups (the last padded
    rows of each group being absent); a stripe = s contiguous rows; axial = one row.
    """
    r = torch.arange(h).repeat_interleave(w)
    c = torch.arange(w).repeat(h)
    n_r, n_c = math.ceil(h / s_r), math.ceil(w / s_c)

    def same(a, b):
        return a[:, None] == b[None, :]

    rows_il, cols_il = same(r % n_r, r % n_r), same(c % n_c, c % n_c)
    if mode == "pale_parallel":
        return [rows_il, cols_il]
    if mode == "pale_rows":
        return [rows_il]
    if mode == "pale_cols":
        return [cols_il]
    if mode == "cross":
        return [same(r // s_r, r // s_r), same(c // s_c, c // s_c)]
    if mode == "axial":
        return [same(r, r), same(c, c)]
    raise ValueError(mode)


def _naive_attention(attn: PaleAttention, x: torch.Tensor) -> torch.Tensor:
    """Same weights, computed by hand: q/k/v convs on the unpadded map, masked full attention."""
    b, h, w, c = x.shape
    heads, hd = attn.num_heads, c // attn.num_heads
    s_r, s_c = attn.pale_size if attn.mode != "axial" else (1, 1)

    def sep(m):  # CvT's convolutional projection: depth-wise conv -> BatchNorm (eval) -> point-wise conv
        y = F.conv2d(x.permute(0, 3, 1, 2), m.conv_dw.weight, None, padding=1, groups=c)
        y = (y - m.bn.running_mean[:, None, None]) / torch.sqrt(m.bn.running_var[:, None, None] + m.bn.eps)
        y = y * m.bn.weight[:, None, None] + m.bn.bias[:, None, None]
        y = F.conv2d(y, m.conv_pw.weight, m.conv_pw.bias)
        return y.flatten(2).transpose(1, 2).reshape(b, h * w, heads, hd).transpose(1, 2)  # (b, heads, hw, hd)

    q, k, v = sep(attn.q), sep(attn.k), sep(attn.v)

    def masked(allowed, hs):  # attention of heads hs, keys restricted by allowed
        logits = q[:, hs] @ k[:, hs].transpose(-1, -2) / math.sqrt(hd)
        return logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, hs]

    if attn.mode == "pale_vanilla":
        n = max(math.ceil(h / min(s_r, h)), math.ceil(w / min(s_c, w)))
        r = torch.arange(h).repeat_interleave(w)
        cc = torch.arange(w).repeat(h)
        out = torch.zeros_like(q)
        count = torch.zeros(h * w, dtype=x.dtype)
        for p in range(n):  # pale p = rows r % n == p plus columns c % n == p
            member = (r % n == p) | (cc % n == p)
            if not member.any():
                continue
            o = masked(member[None, :] & member[:, None] | ~member[:, None], slice(None))
            out += o * member[:, None]
            count += member
        y = out / count[:, None]
    else:
        masks = _region(attn.mode, h, w, min(s_r, h), min(s_c, w))
        per = heads // len(masks)
        y = torch.cat([masked(m, slice(i * per, (i + 1) * per)) for i, m in enumerate(masks)], dim=1)
    y = y.transpose(1, 2).reshape(b, h, w, c)
    return F.linear(y, attn.proj.weight, attn.proj.bias)


@pytest.mark.parametrize("mode", ["pale_parallel", "pale_rows", "pale_cols", "cross", "axial", "pale_vanilla"])
@pytest.mark.parametrize(
    "hw, pale",
    [((6, 8), (3, 2)),  # divisible: no padding
     ((7, 9), (3, 2)),  # padding on both axes, non-square pale
     ((5, 11), (3, 4)),  # vanilla pads both sides to N * s
     ((2, 5), (3, 3))],  # pale larger than the map (clamped)
    ids=["div", "pad", "wide", "clamp"])
def test_attention_matches_naive_masked_attention(mode, hw, pale):
    torch.manual_seed(0)
    attn = PaleAttention(16, 4, pale, mode, qkv_bias=True, attn_drop=0.0, proj_drop=0.0).double().eval()
    for p in attn.parameters():  # non-trivial biases too
        torch.nn.init.normal_(p, std=0.5)
    for proj in (attn.q, attn.k, attn.v):  # BatchNorm statistics too
        proj.bn.running_mean.normal_(std=0.5)
        proj.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, *hw, 16, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _naive_attention(attn, x), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# Cost of one PS-Attention layer vs the paper's Eq. 5.

def _layer_gmacs(attn: PaleAttention, h: int, w: int, c: int) -> float:
    class Wrap(torch.nn.Module):  # count_gmacs feeds (1, 3, H, W) images
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, img):
            return self.attn(img.new_zeros(1, h, w, c))

    return count_gmacs(Wrap(), (h, w))


def eq5_gmacs(h: int, w: int, c: int, s_r: int, s_c: int) -> float:
    """The paper's Eq. 5: O = 4hwc^2 + hwc(s_c h + s_r w + 27)."""
    return (4 * h * w * c * c + h * w * c * (s_c * h + s_r * w + 27)) / 1e9


@pytest.mark.parametrize("h, w, c, s", [(56, 56, 64, 7), (28, 42, 128, 7), (14, 14, 256, 7), (24, 36, 32, 3)])
def test_parallel_cost_is_eq5(h, w, c, s):
    with torch.device("meta"):
        attn = PaleAttention(c, 4, (s, s), "pale_parallel", True, 0.0, 0.0)
    assert _layer_gmacs(attn, h, w, c) == pytest.approx(eq5_gmacs(h, w, c, s, s), rel=1e-9)


def test_padded_cost_is_eq5_on_padded_map():
    # Decision under test: q/k/v and attention run on the map padded to multiples
    # of the pale size, the projection on the real tokens only.
    h, w, c, s = 30, 45, 32, 7
    hp, wp = 35, 49
    with torch.device("meta"):
        attn = PaleAttention(c, 2, (s, s), "pale_parallel", True, 0.0, 0.0)
    expected = eq5_gmacs(hp, wp, c, s, s) - (hp * wp - h * w) * c * c / 1e9
    assert _layer_gmacs(attn, h, w, c) == pytest.approx(expected, rel=1e-9)


def test_vanilla_costs_a_whole_pale_per_pale():
    # N pales of L = s_r w + s_c h - s_r s_c tokens each, full channels (the paper's 5.4G reading).
    h = w = 28
    c, s = 64, 7
    n, length = 4, 7 * 28 * 2 - 49
    with torch.device("meta"):
        attn = PaleAttention(c, 2, (s, s), "pale_vanilla", True, 0.0, 0.0)
    expected = (4 * h * w * c * c + 27 * h * w * c + 2 * n * length**2 * c) / 1e9
    assert _layer_gmacs(attn, h, w, c) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------
# Backbone contract, configs, sweeps.

@pytest.mark.parametrize("mode", ["pale_parallel", "pale_sequential", "pale_vanilla", "cross", "axial"])
def test_any_input_size_and_contract(mode):
    torch.manual_seed(0)
    model = PaleTransformer(**TINY, attn_mode=mode, pos_embed="ape", img_size=64, drop_path_rate=0.1)
    clf = ImageClassifier(model, num_classes=5)
    x = torch.randn(2, 3, 37, 53)
    feats = model(x)
    sizes = [(37, 53)]
    for stride in (4, 2, 2, 2):  # ceil division at each overlapping-conv merge
        sizes.append((math.ceil(sizes[-1][0] / stride), math.ceil(sizes[-1][1] / stride)))
    assert [tuple(f.shape) for f in feats] == [(2, ch, *hw) for ch, hw in zip(TINY["embed_dims"], sizes[1:])]
    assert model.strides == [4, 8, 16, 32] and model.out_channels == TINY["embed_dims"]
    logits = clf(x)
    logits.sum().backward()
    assert logits.shape == (2, 5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in clf.parameters())
    assert {k.split(".")[0] for k in clf.state_dict()} == {"backbone", "head"}
    names = dict(clf.named_parameters())
    assert clf.no_weight_decay() and all(n in names for n in clf.no_weight_decay())


def test_head_is_gap_layernorm_linear():
    model = PaleTransformer(**TINY).eval()
    head = model.make_head(7)
    feat = torch.randn(2, 64, 3, 5)
    pooled = F.layer_norm(feat.mean((2, 3)), (64,), head.norm.weight, head.norm.bias, eps=1e-5)
    torch.testing.assert_close(head(feat), F.linear(pooled, head.fc.weight, head.fc.bias))


def test_sequential_alternates_rows_and_columns_per_stage():
    model = PaleTransformer(**{**TINY, "depths": [3, 2, 1, 1]}, attn_mode="pale_sequential")
    modes = [[b.attn.mode for b in s.blocks] for s in model.stages]
    assert modes == [["pale_rows", "pale_cols", "pale_rows"], ["pale_rows", "pale_cols"], ["pale_rows"], ["pale_rows"]]


def test_position_encodings():
    none, ape, cpe = (PaleTransformer(**TINY, pos_embed=p) for p in ("none", "ape", "cpe"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # CPE: a 3x3 depth-wise conv with bias per block; APE: one (H/s x W/s x C) grid per stage at 224.
    cpe_params = sum(d * 10 * c for d, c in zip(TINY["depths"], TINY["embed_dims"]))
    ape_params = sum((224 // s) ** 2 * c for s, c in zip((4, 8, 16, 32), TINY["embed_dims"]))
    assert count(cpe) - count(none) == cpe_params
    assert count(ape) - count(none) == ape_params


def test_per_stage_pale_size_list():
    model = PaleTransformer(**TINY, pale_size=[1, 3, [5, 2], 7])
    assert [s.blocks[0].attn.pale_size for s in model.stages] == [(1, 1), (3, 3), (5, 2), (7, 7)]


def test_variant_drop_path_rates():
    # the paper's ImageNet values (the dense tasks' are in conf/experiment/pale_*)
    assert [backbone_config(f"pale_{v}").drop_path_rate for v in "tsb"] == [0.1, 0.3, 0.5]


SWEEPS = {"pale_size": ("pale_size", [1, 3, 5, 7, 9]),
          "pale_attn_mode": ("attn_mode", ["axial", "cross", "pale_vanilla", "pale_sequential", "pale_parallel"]),
          "pale_pos_embed": ("pos_embed", ["none", "ape", "cpe"])}


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_sweep_presets_build_the_table_rows(sweep):
    path = REPO / "conf" / "sweep" / f"{sweep}.yaml"
    assert path.read_text().splitlines()[0] == "# @package _global_"
    cfg = yaml.safe_load(path.read_text())
    assert list(cfg) == ["hydra"] and list(cfg["hydra"]) == ["sweeper"] and list(cfg["hydra"]["sweeper"]) == ["params"]
    params = cfg["hydra"]["sweeper"]["params"]
    field, values = SWEEPS[sweep]
    assert params["backbone"] == "pale_t"
    assert set(params) == {"backbone", f"backbone.{field}"}
    assert [yaml.safe_load(v) for v in str(params[f"backbone.{field}"]).split(",")] == values
    for value in str(params[f"backbone.{field}"]).split(","):
        with torch.device("meta"):
            model = build_backbone(backbone_config("pale_t", [f"{field}={value}"]))
        block = model.stages[2].blocks[1]
        if field == "pale_size":
            assert block.attn.pale_size == (int(value), int(value))
        elif field == "attn_mode":
            assert block.attn.mode == {"pale_sequential": "pale_cols"}.get(value, value)
        else:
            assert (block.cpe is not None, model.stages[0].pos_embed is not None) == (value == "cpe", value == "ape")


def test_ape_classifier_at_224_loads_into_a_dense_backbone_of_another_size(tmp_path, caplog):
    # Table 9's dense APE rows: grids made for the dense input size, initialised from ImageNet (224)
    tiny = ["embed_dims=[16,32,48,64]", "depths=[1,1,1,1]", "num_heads=[2,2,4,4]", "pos_embed=ape"]
    torch.manual_seed(0)
    src = vitlab.create_model("pale_t", num_classes=10, overrides=tiny)
    torch.save(src.state_dict(), tmp_path / "pale_ape_224.pth")
    with caplog.at_level(logging.INFO, logger="vitlab.runtime.checkpoints"):
        dst = vitlab.create_backbone("pale_t", pretrained=str(tmp_path / "pale_ape_224.pth"),
                                     overrides=[*tiny, "img_size=[96,160]"])
    for i, size in enumerate([(24, 40), (12, 20), (6, 10), (3, 5)]):
        old = src.backbone.stages[i].pos_embed.detach()
        ref = F.interpolate(old.permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        torch.testing.assert_close(dst.stages[i].pos_embed.detach(), ref)
    assert sum("resized" in r.message for r in caplog.records) == 4
    assert torch.equal(dst.stages[2].blocks[0].attn.q.conv_dw.weight, src.backbone.stages[2].blocks[0].attn.q.conv_dw.weight)
