"""GPViT against independent references.

* tests/fixtures/gpvit_tiny_official.pt: made by running the OFFICIAL code
  (ChenhongyiYang/GPViT mmcls GPViT + GroupNeck + LinearClsHead, on mmcv 1.7.2)
  on a tiny architecture (C=32, 4 layers, GP blocks at 1 and 3 with 8 / 4 group
  tokens, one extra stem conv) with random weights and BN statistics, on a
  48x80 input (a 6x10 grid, so the 8x8 position embedding is resized). It holds
  the official state dict, the input, the normed outputs of layers 2 and 3 and
  the logits. The script is not part of the repo (it needs the official code).
* tests/fixtures/gpvit_l1_official_keys.json: every key and shape of the
  official L1 classifier (backbone / neck / head), from the same code.
* Naive loop implementations (below) of LePE stripes and shifted windows, and
  timm's ViT attention, for the attention variants and for padding.
* The official code's parameter counts (counted by running it).
* tests/fixtures/gpvit_adapter_tiny_official.pt: the OFFICIAL mmdet GPViTAdapter and
  GPViTAdapterSingleStage (ViT-Adapter, COCO) on the tiny trunk above (no extra
  stem conv) with conv_inplane 8, 2 heads, 2 points, interactions [[0,1],[2,3]],
  run with mmcv's CPU reference of the deformable-attention op, on a 64x96 input:
  its state dict (Mask R-CNN variant; the RetinaNet one shares it minus the
  stride-4 parts) and both variants' outputs. The official adapter parameter
  counts of L1-L4 were measured with the same code.
"""
from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.backbones.base import ImageClassifier
from vitlab.backbones.gpvit import GPViT, LocalAttention, group_attention_maps, ms_deform_attn
from vitlab.backbones.gpvit.trunk import GroupSelfAttention, LocalBlock
from vitlab.backbones.layers import relative_position_index
from vitlab.runtime.flops import count_params

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

# the official tiny architecture of the fixture, as overrides of gpvit_l1
TINY = [
    "img_size=64", "embed_dims=32", "num_convs=1", "depths=4", "num_heads=4", "gp_layers=[1,3]",
    "group_tokens=[8,4]", "num_group_heads=2", "num_ungroup_heads=2", "propagation_heads=2",
    "drop_path_rate=0.0", "neck_heads=2",
]


def _fixture():
    return torch.load(FIXTURES / "gpvit_tiny_official.pt", weights_only=True)


def test_official_code_outputs(tmp_path):
    fix = _fixture()
    official = {k: v.float() if v.is_floating_point() else v for k, v in fix["state_dict"].items()}
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "meta": {}}, path)  # the official release layout
    # create_model loads backbone + neck + head strictly through convert_official
    model = vitlab.create_model(
        "gpvit_l1", num_classes=10, pretrained=str(path), overrides=[*TINY, "out_indices=[2,3]", "out_strides=[8,8]"]
    ).eval()
    x = fix["input"].float()
    with torch.no_grad():
        out2, out3 = model.backbone(x)
        logits = model(x)
    assert out2.shape == out3.shape == (2, 32, 6, 10)
    torch.testing.assert_close(out2, fix["out_layer2"], atol=1e-4, rtol=1e-4)  # norm2 of layer 2
    torch.testing.assert_close(out3, fix["out_layer3"], atol=1e-4, rtol=1e-4)  # final stride-8 map (ln1)
    torch.testing.assert_close(logits, fix["logits"], atol=1e-4, rtol=1e-4)  # GroupNeck + fc


def test_official_l1_key_layout():
    shapes = json.loads((FIXTURES / "gpvit_l1_official_keys.json").read_text())
    converted = GPViT.convert_official({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    with torch.device("meta"):
        model = ImageClassifier(vitlab.create_backbone("gpvit_l1"), 1000)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(converted) == len(shapes)  # one-to-one
    assert {k: tuple(v.shape) for k, v in converted.items()} == own


@pytest.mark.parametrize(
    "name,official", [("gpvit_l1", 9_325_544), ("gpvit_l2", 23_691_532), ("gpvit_l3", 36_221_056), ("gpvit_l4", 74_859_456)]
)
def test_backbone_params_equal_official_code(name, official):
    with torch.device("meta"):
        assert count_params(vitlab.create_backbone(name)) == official


# --------------------------------------------------------------------------- attention references
def _naive_attention(q, k, v, allowed=None, bias=None):
    """q (Lq, d), k/v (Lk, d): explicit softmax attention, plus an additive (Lq, Lk) bias."""
    s = q @ k.T / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def _naive_lepe(attn: LocalAttention, x: torch.Tensor, hw) -> torch.Tensor:
    """CSWin/LePE by loops: half the heads in vertical stripes of width s (the last
    one narrower when W is not a multiple), half in horizontal stripes; the LePE
    conv runs on each stripe's value map with zero padding at the stripe border."""
    b, n, c = x.shape
    h, w = hw
    heads, s = attn.num_heads // 2, attn.split_size
    half, d = c // 2, c // attn.num_heads
    qkv = attn.qkv(x).view(b, h, w, 3, c)
    out = torch.zeros(b, h, w, c)
    for branch in range(2):
        chans = slice(branch * half, (branch + 1) * half)
        if branch == 0:
            stripes = [(slice(0, h), slice(j, min(j + s, w))) for j in range(0, w, s)]
        else:
            stripes = [(slice(i, min(i + s, h)), slice(0, w)) for i in range(0, h, s)]
        for rows, cols in stripes:
            q, k, v = (qkv[:, rows, cols, t, chans] for t in range(3))  # (B, hh, ww, C/2)
            hh, ww = q.shape[1:3]
            lepe = attn.lepe[branch](v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            for bi in range(b):
                for hd in range(heads):
                    cs = slice(hd * d, (hd + 1) * d)
                    o = _naive_attention(q[bi, ..., cs].reshape(-1, d), k[bi, ..., cs].reshape(-1, d),
                                         v[bi, ..., cs].reshape(-1, d))
                    out[bi, rows, cols, branch * half + hd * d: branch * half + (hd + 1) * d] = (
                        o.view(hh, ww, d) + lepe[bi, ..., cs]
                    )
    return attn.proj(out.view(b, n, c))


@pytest.mark.parametrize("hw", [(6, 8), (5, 7)])  # divisible, and padded in both directions
def test_lepe_attention_matches_naive_stripes(hw):
    torch.manual_seed(0)
    attn = LocalAttention(24, 4, "lepe", split_size=2, window_size=7).eval()
    for conv in attn.lepe:
        torch.nn.init.normal_(conv.weight, std=0.3)
    x = torch.randn(2, hw[0] * hw[1], 24)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, hw), _naive_lepe(attn, x, hw), atol=1e-5, rtol=1e-5)


def _naive_windows(attn: LocalAttention, x: torch.Tensor, hw, shift: int) -> torch.Tensor:
    """Swin (shifted) window attention by loops over queries: a real query sees the real
    keys of its window in the frame rolled by -shift (padded to a window multiple), and
    only those on the same side of the wrap-around (Swin's region mask). With a bias table,
    each (query, key) pair adds Swin's bias: the table entry of their offset (dy, dx) in the
    rolled frame, row (dy + ws - 1) * (2 ws - 1) + dx + ws - 1."""
    b, n, c = x.shape
    h, w = hw
    ws, heads = attn.window_size, attn.num_heads
    d = c // heads
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    qkv = attn.qkv(x).view(b, n, 3, heads, d)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    sh, sw = (shift if h > ws else 0), (shift if w > ws else 0)  # Swin: no shift along an axis inside one window
    ri, rj = (ii - sh) % hp, (jj - sw) % wp  # rolled coordinates
    key = torch.stack([ri // ws, rj // ws, ri >= hp - sh if sh else ri * 0, rj >= wp - sw if sw else rj * 0], -1)
    key = key.view(n, 4)
    allowed = (key[:, None, :] == key[None, :, :]).all(-1)  # (N, N)
    table = getattr(attn, "relative_position_bias_table", None)
    dy, dx = ri.reshape(-1, 1) - ri.reshape(1, -1), rj.reshape(-1, 1) - rj.reshape(1, -1)
    rows = ((dy + ws - 1) * (2 * ws - 1) + dx + ws - 1).clamp(0, (2 * ws - 1) ** 2 - 1)  # clamp: pairs not allowed
    out = torch.zeros(b, n, heads, d)
    for bi in range(b):
        for hd in range(heads):
            bias = None if table is None else table[rows, hd]
            out[bi, :, hd] = _naive_attention(qkv[bi, :, 0, hd], qkv[bi, :, 1, hd], qkv[bi, :, 2, hd], allowed, bias)
    return attn.proj(out.view(b, n, c))


@pytest.mark.parametrize("bias", [True, False], ids=["swin_bias", "no_bias"])
@pytest.mark.parametrize("hw,shift", [((8, 8), False), ((9, 11), False), ((9, 11), True), ((3, 11), True)])
def test_window_attention_matches_naive(hw, shift, bias):
    # (3, 11): windows clipped to 3 rows (their bias from the middle of the 4x4 window's table)
    torch.manual_seed(0)
    attn = LocalAttention(24, 3, "window", split_size=2, window_size=4, shift=shift, rel_pos_bias=bias).eval()
    assert hasattr(attn, "relative_position_bias_table") is bias
    if bias:
        torch.nn.init.normal_(attn.relative_position_bias_table)  # large enough to matter
    x = torch.randn(2, hw[0] * hw[1], 24)
    with torch.no_grad():
        ref = _naive_windows(attn, x, hw, 2 if shift else 0)
        torch.testing.assert_close(attn(x, hw), ref, atol=1e-5, rtol=1e-5)


def test_global_attention_matches_timm():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    ours = LocalAttention(24, 3, "global", split_size=2, window_size=7).eval()
    ref = Attention(24, num_heads=3, qkv_bias=True).eval()
    ref.load_state_dict(ours.state_dict())  # same qkv / proj layout
    x = torch.randn(2, 35, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, (5, 7)), ref(x), atol=1e-5, rtol=1e-5)


def test_deit_block_is_timms_vit_block():
    # Table 6's ViT baselines: local_block=deit with global attention is DeiT's pre-norm block
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    ours = LocalBlock(24, 3, "global", split_size=2, window_size=7, shift=False, mlp_ratio=4.0, qkv_bias=True,
                      drop=0.0, attn_drop=0.0, drop_path=0.0, norm_eps=1e-6, rel_pos_bias=True, dw_conv=False).eval()
    ref = Block(24, 3, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    ref.load_state_dict(ours.state_dict())  # norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    x = torch.randn(2, 35, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, (5, 7)), ref(x), atol=1e-5, rtol=1e-5)


def test_group_self_attention_matches_naive():
    # Table 9's self-attention propagation: groups query [groups; image tokens], then an FFN
    torch.manual_seed(0)
    layer = GroupSelfAttention(24, 3, 4.0, True, 0.0, 0.0, 0.0).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g, x = torch.randn(2, 5, 24), torch.randn(2, 30, 24)
    with torch.no_grad():
        seq = layer.norm1(torch.cat((g, x), 1))
        q, kv = layer.q(seq[:, :5]), layer.kv(seq)
        k, v = kv[..., :24], kv[..., 24:]
        heads = [_naive_attention(q[b, :, h * 8:(h + 1) * 8], k[b, :, h * 8:(h + 1) * 8], v[b, :, h * 8:(h + 1) * 8])
                 for b in range(2) for h in range(3)]
        attn = torch.stack([torch.cat(heads[b * 3:(b + 1) * 3], -1) for b in range(2)])
        ref = g + layer.proj(attn)
        ref = ref + layer.mlp(layer.norm2(ref))
        torch.testing.assert_close(layer(g, x), ref, atol=1e-5, rtol=1e-5)


def test_window_bias_of_another_window_size_is_resized(tmp_path):
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table

    torch.manual_seed(0)
    src = vitlab.create_backbone("gpvit_l1", overrides=[*TINY, "local_attn=window", "global_block=none"])
    torch.save({f"backbone.{k}": v for k, v in src.state_dict().items()}, tmp_path / "w7.pth")
    dst = vitlab.create_backbone("gpvit_l1", pretrained=str(tmp_path / "w7.pth"),
                                 overrides=[*TINY, "local_attn=window", "global_block=none", "window_sizes=5"])
    attn, old = dst.layers[0].attn, src.layers[0].attn.relative_position_bias_table.detach()
    assert attn.relative_position_bias_table.shape == (81, 4)
    torch.testing.assert_close(attn.relative_position_bias_table.detach(), resize_rel_pos_bias_table(old, (5, 5), (81, 4)))
    assert torch.equal(attn.relative_position_index, relative_position_index((5, 5), 5))


def test_patch16_stem_adds_a_stride2_conv():
    model = _tiny("patch_size=16", "out_strides=[16]")
    convs = [(m.kernel_size[0], m.stride[0]) for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(7, 2), (3, 1), (3, 2), (4, 4)]  # 7x7/2, num_convs=1 3x3/1, the extra 3x3/2, 4x4/4
    assert model.grid == (4, 4) and model.forward_features(torch.randn(1, 3, 50, 70)).shape[1] == 4 * 5


# --------------------------------------------------------------------------- model-level behaviour
def _tiny(*extra):
    torch.manual_seed(0)
    return vitlab.create_backbone("gpvit_l1", overrides=[*TINY, *extra]).eval()


def test_position_embedding_bicubic_resize():
    model = _tiny()
    x = torch.randn(1, 3, 40, 88)  # 5 x 11 grid vs the 8 x 8 pretraining grid
    stem = model.patch_embed(x)
    ref = F.interpolate(model.pos_embed.reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=(5, 11), mode="bicubic",
                        align_corners=False).flatten(2).transpose(1, 2)
    tokens, hw = model._embed(x)
    assert hw == (5, 11)
    torch.testing.assert_close(tokens, stem.flatten(2).transpose(1, 2) + ref)


def test_any_input_size_and_dense_pyramid():
    from torchvision.ops import FeaturePyramidNetwork

    model = _tiny("out_strides=[4,8,16,32]")
    x = torch.randn(2, 3, 50, 70)  # stem pads: ceil(50/8) x ceil(70/8) = 7 x 9 at stride 8
    with torch.no_grad():
        feats = model(x)
        tokens = model.forward_features(x)
    assert model.strides == [4, 8, 16, 32] and model.out_channels == [32] * 4
    assert [tuple(f.shape[-2:]) for f in feats] == [(14, 18), (7, 9), (4, 5), (2, 3)]
    # the stride-8 level is the final normed token map itself
    torch.testing.assert_close(feats[1], tokens.transpose(1, 2).reshape(2, 32, 7, 9))
    fpn = FeaturePyramidNetwork(model.out_channels, 16)
    outs = fpn({str(i): f for i, f in enumerate(feats)})
    assert [o.shape[1] for o in outs.values()] == [16] * 4


@pytest.mark.parametrize(
    "overrides",
    [
        ["local_attn=window", "window_sizes=3", "global_block=shifted_window"],
        ["global_block=conv"],
        ["local_attn=global", "global_block=global_attn"],
        ["propagation=self_attn"],
        ["propagation=none"],
        ["patch_size=16", "out_strides=[16]"],
        ["head_pool=mean"],
        ["patch_size=16", "local_attn=global", "local_block=deit", "global_block=none", "head_pool=mean",
         "out_strides=[16]"],  # Table 6's ViT-D216-P16
        ["pos_embed=none"],
    ],
)
def test_ablation_variants_train(overrides):
    model = _tiny(*overrides).train()
    clf = ImageClassifier(model, 5)
    x = torch.randn(2, 3, 56, 72)
    loss = clf(x).logsumexp(-1).mean()
    loss.backward()
    # every parameter takes part in classification (no idle modules, e.g. for DDP)
    idle = [n for n, p in clf.named_parameters() if p.grad is None]
    assert not idle


def test_ablation_block_parameter_counts():
    c = 32
    base = count_params(_tiny("global_block=none"))
    local = 3 * c * c + 3 * c + c * c + c + 8 * c * c + 5 * c + 9 * c + 4 * c + 2 * (c // 2) * 10  # qkv proj mlp dw norms lepe
    conv = 2 * 9 * c * c + 4 * c  # two 3x3 convs without bias, two LayerNorms
    assert count_params(_tiny("global_block=conv")) == base - 2 * local + 2 * conv
    # window / shifted / global attention share the qkv / proj / FFN / dw weights (no LePE convs)
    n_lepe = 2 * (c // 2) * 10
    assert count_params(_tiny("global_block=global_attn")) == base - 2 * n_lepe
    # window attention: Swin's bias table ((2 * 7 - 1)^2 x 4 heads) per layer, or none (the switch)
    table = (2 * 7 - 1) ** 2 * 4
    assert count_params(_tiny("local_attn=window", "global_block=shifted_window")) == base - 4 * n_lepe + 4 * table
    assert count_params(_tiny("local_attn=window", "global_block=shifted_window", "rel_pos_bias=false")) == (
        base - 4 * n_lepe)


def test_group_attention_maps():
    model = _tiny()
    image = torch.rand(3, 48, 64)
    maps = group_attention_maps(model, image)
    assert [tuple(m.shape) for m in maps] == [(1, 8, 48, 64), (1, 4, 48, 64)]
    # each group's attention is a distribution over the 6 x 8 tokens; bilinear x8 upsampling
    # gives every token a total weight of 64 pixels, so each map sums to 64
    for m in maps:
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum((-1, -2)), torch.full(m.shape[:2], 64.0), atol=1e-3, rtol=0)
    # the first block's maps are the explicit softmax of the grouping queries over layer-0 tokens
    blk = model.layers[1].group
    with torch.no_grad():
        tokens, hw = model._embed(image[None])
        x = model.layers[0](tokens, hw)
        q = blk.norm_query(blk.group_token).view(8, 2, 16).transpose(0, 1)
        k = blk.k_proj(blk.norm_key(x[0])).view(-1, 2, 16).transpose(0, 1)
        w = (q @ k.transpose(1, 2) / 4).softmax(-1).mean(0).view(8, *hw)
    ref = F.interpolate(w[None], scale_factor=8, mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps[0], ref, atol=1e-5, rtol=1e-5)


def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "gpvit_groups.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed clean
    start = time.monotonic()
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert time.monotonic() - start < 60
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images  # the group maps were plotted


# --------------------------------------------------------------------------- ViT-Adapter
ADAPTER_TINY = [o for o in TINY if not o.startswith(("num_convs", "neck_heads"))] + [
    "num_convs=0", "conv_inplane=8", "n_points=2", "deform_num_heads=2", "interaction_indexes=[[0,1],[2,3]]",
]


@pytest.mark.parametrize("variant,strides", [("maskrcnn", [4, 8, 16, 32]), ("retinanet", [8, 16, 32])])
def test_adapter_official_code_outputs(tmp_path, variant, strides):
    fix = torch.load(FIXTURES / "gpvit_adapter_tiny_official.pt", weights_only=True)
    official = {k: v.float() if v.is_floating_point() else v for k, v in fix["maskrcnn_state_dict"].items()}
    if variant == "retinanet":  # GPViTAdapterSingleStage has no stride-4 parts and numbers its norms from 2
        official = {k: v for k, v in official.items() if not k.startswith(("backbone.spm.fc1", "backbone.up.", "backbone.ad_norm1."))}
    path = tmp_path / "official_det.pth"
    torch.save({"state_dict": official}, path)
    model = vitlab.create_backbone(
        "gpvit_l1_adapter", pretrained=str(path), overrides=[*ADAPTER_TINY, f"out_strides={strides}".replace(" ", "")]
    ).eval()
    with torch.no_grad():
        outs = model(fix["input"].float())
    assert model.strides == strides and len(outs) == len(fix[f"{variant}_outputs"])
    for ours, ref in zip(outs, fix[f"{variant}_outputs"]):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name,maskrcnn,retinanet",  # L2-L4 (28,733,370 / 43,209,384 / 87,727,688 ...) are rows of paper_tables/gpvit.yaml
    [("gpvit_l1_adapter", 12_078_436, 11_877_124)],
)
def test_adapter_params_equal_official_code(name, maskrcnn, retinanet):
    with torch.device("meta"):
        assert count_params(vitlab.create_backbone(name)) == maskrcnn
        assert count_params(vitlab.create_backbone(name, overrides=["out_strides=[8,16,32]"])) == retinanet


def test_adapter_holds_a_trunk_and_builds_nothing_it_does_not_use(tmp_path):
    torch.manual_seed(0)
    model = vitlab.create_backbone("gpvit_l1_adapter", overrides=ADAPTER_TINY).eval()
    assert isinstance(model.trunk, GPViT) and not isinstance(model, GPViT)
    assert model.trunk.norm is None and len(model.trunk.out_norms) == 0 and len(model.trunk.resample) == 0
    outs = model(torch.randn(1, 3, 64, 96))
    sum(o.sum() for o in outs).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]  # every parameter is used
    # a state dict of the earlier layout (the trunk's modules at the top) still loads, through convert_official
    old = {f"backbone.{k.removeprefix('trunk.')}": v for k, v in model.state_dict().items()}
    torch.save(old, tmp_path / "round1.pth")
    fresh = vitlab.create_backbone("gpvit_l1_adapter", pretrained=str(tmp_path / "round1.pth"), overrides=ADAPTER_TINY)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_ms_deform_attn_matches_naive_bilinear():
    """Deformable attention = weighted sum of bilinear samples (zero outside), checked point by point."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(1, 24 + 6, 2, 5)  # (B, S, heads, d)
    loc = torch.rand(1, 3, 2, 2, 2, 2) * 1.2 - 0.1  # some samples fall outside the map
    w = torch.rand(1, 3, 2, 2, 2)
    ours = ms_deform_attn(value, shapes, loc, w)

    def bilinear(img, x, y):  # img (h, w, d); pixel-centre convention of align_corners=False
        h, wd, _ = img.shape
        px, py = x * wd - 0.5, y * h - 0.5
        x0, y0 = math.floor(px), math.floor(py)
        out = torch.zeros(img.shape[-1])
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < h and 0 <= xx < wd:
                out += (1 - abs(px - xx)) * (1 - abs(py - yy)) * img[yy, xx]
        return out

    starts = [0, 24]
    ref = torch.zeros(1, 3, 2, 5)
    for q in range(3):
        for hd in range(2):
            for lvl, (h, wd) in enumerate(shapes):
                img = value[0, starts[lvl]: starts[lvl] + h * wd, hd].view(h, wd, 5)
                for p in range(2):
                    x, y = loc[0, q, hd, lvl, p].tolist()
                    ref[0, q, hd] += w[0, q, hd, lvl, p] * bilinear(img, x, y)
    torch.testing.assert_close(ours, ref.view(1, 3, 10), atol=1e-5, rtol=1e-5)
