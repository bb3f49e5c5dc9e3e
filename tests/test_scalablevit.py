"""ScalableViT against independent references.

* Official code, through ``tests/fixtures/scalablevit_tiny_official.pt``. How it was
  made: ``image_classification/models/scalablevit.py`` of github.com/Yangr116/ScalableViT
  (commit 8011147), run outside this repo with torch 2.14 / timm 1.0.31, building
  ``ScalableViT(img_size=224, patch_size=4, embed_dims=[8, 16, 32, 32],
  num_heads=[1, 2, 2, 2], mlp_ratios=[4]*4, qkv_bias=True, depths=[2, 2, 2, 2],
  wss=[7]*4, sr_ratios=[8, 4, 2, 1], c_ratios=[1.25, 0.5, 1.25, 1.25], num_classes=8,
  norm_layer=LayerNorm(eps=1e-6))`` (r_c = 1.25 at sr = 1 exercises the official
  attention scale there). Its two-layer head hard-codes 4096 hidden units; to keep
  the file small it was replaced by the same Linear-LayerNorm-GELU-Linear with 64.
  Every parameter was then redrawn (torch.Generator seed 0): matrices N(0, 1/fan_in),
  norm weights 1 + 0.1 N(0, 1), other 1-D parameters 0.1 N(0, 1), all rounded to
  fp16 (stored so) and run in fp32 in eval mode on a random uint8 image of
  224x448 mapped to [-1, 1] (x / 127.5 - 1). The file holds the official-layout
  state dict, the image and the logits.
* Parameter counts / GMACs: the official code's numbers, counted by running it (and the
  official ``scalable_vit_small_0`` for the plain linear head: 26,307,032).
* Off the official path (inputs that are not multiples of 224, SWSA, LEM): naive
  per-window loop implementations written here, and timm's Swin block for SWSA.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock

import vitlab
from vitlab.backbones.scalablevit import ScalableSelfAttention, ScalableViT, WindowAttention
from vitlab.runtime.flops import count_gmacs, count_params

FIXTURES = Path(__file__).parent / "fixtures"

# the fixture's architecture, as overrides of conf/backbone/scalablevit_s.yaml
TINY = [
    "embed_dims=[8,16,32,32]", "depths=[2,2,2,2]", "num_heads=[1,2,2,2]",
    "c_ratios=[1.25,0.5,1.25,1.25]", "drop_path_rate=0.0", "head_hidden_dim=64",
]


def test_official_fixture_logits():
    ref = torch.load(FIXTURES / "scalablevit_tiny_official.pt")
    model = vitlab.create_model("scalablevit_s", num_classes=8, overrides=TINY).eval()
    sd = ScalableViT.convert_official({k: v.float() for k, v in ref["state_dict"].items()})
    model.load_state_dict(sd, strict=True)
    x = ref["image"].float() / 127.5 - 1.0
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, ref["logits"], atol=2e-5, rtol=1e-4)
    # the official no_weight_decay() names the PEG (pos_block) parameters
    official_nwd = {k for k in ref["state_dict"] if k.startswith("pos_block.")}
    assert set(ScalableViT.convert_official(dict.fromkeys(official_nwd))) == set(model.no_weight_decay())


def test_official_file_through_loader(tmp_path):
    # the release files are DeiT-style {"model": state_dict}; vitlab.runtime.checkpoints detects
    # the official layout and calls convert_official (classifier and bare backbone)
    ref = torch.load(FIXTURES / "scalablevit_tiny_official.pt")
    path = tmp_path / "scalablevit_tiny.pth"
    torch.save({"model": {k: v.float() for k, v in ref["state_dict"].items()}, "epoch": 300}, path)
    x = ref["image"].float() / 127.5 - 1.0
    model = vitlab.create_model("scalablevit_s", num_classes=8, pretrained=str(path), overrides=TINY).eval()
    backbone = vitlab.create_backbone("scalablevit_s", pretrained=str(path), overrides=TINY).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref["logits"], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(backbone.forward_features(x), model.backbone.forward_features(x))


@pytest.mark.parametrize("name,params,gmacs", [
    ("scalablevit_s", 32_000_472, 4.27), ("scalablevit_b", 81_881_624, 8.80), ("scalablevit_l", 109_288_840, 14.99)])
def test_official_params_and_gmacs(name, params, gmacs):
    with torch.device("meta"):
        model = vitlab.create_model(name, 1000)
        assert count_params(model) == params
        assert count_gmacs(model, (224, 224)) == pytest.approx(gmacs, abs=0.01)


def test_linear_head_params():
    # official `scalable_vit_small_0`: plain head, r_c = 1.25 in all four stages
    with torch.device("meta"):
        model = vitlab.create_model("scalablevit_s", 1000, overrides=["head=linear", "c_ratios=[1.25,1.25,1.25,1.25]"])
    assert count_params(model) == 26_307_032
    assert isinstance(model.head, torch.nn.Linear)


@pytest.mark.parametrize("overrides,paper_params_m", [
    (["block_pattern=wsa"], 30), (["block_pattern=iwsa"], 30), (["block_pattern=ssa"], 34),
    (["block_pattern=ssa", "c_ratios=[1,1,1,1]"], 32)])
def test_table5a_params(overrides, paper_params_m):
    # the rows whose parameter counts differ (paper Table 5a, rounded to 1M)
    with torch.device("meta"):
        model = vitlab.create_model("scalablevit_s", 1000, overrides=overrides)
    assert count_params(model) / 1e6 == pytest.approx(paper_params_m, abs=0.6)


def test_block_patterns():
    def kinds(pattern):
        m = vitlab.create_backbone("scalablevit_s", overrides=TINY + [f"block_pattern={pattern}"])
        out = []
        for blk in m.stages[0].blocks:
            a = blk.attn
            out.append("ssa" if isinstance(a, ScalableSelfAttention) else
                       "swsa" if a.shift_size else a.local_module)
        return out

    assert kinds("iwsa_ssa") == ["lim", "ssa"]
    assert kinds("ssa_iwsa") == ["ssa", "lim"]
    assert kinds("swsa_ssa") == ["swsa", "ssa"]
    assert kinds("wsa") == ["none", "none"]
    assert kinds("ssa") == ["ssa", "ssa"]
    with pytest.raises(Exception, match="backbone.block_pattern='iwsa_foo': use one or two of"):  # hydra wraps it
        kinds("iwsa_foo")


# ---------------------------------------------------------------- naive references
def _swin_regions(hp, wp, ws, shift):
    """Swin's region ids of a padded, cyclically shifted map (slice assignment, as in Swin)."""
    img = torch.zeros(hp, wp, dtype=torch.long)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[h, w] = cnt
            cnt += 1
    return img


def naive_window_attention(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Zero-pad, (roll), loop over windows and heads with an explicit softmax."""
    B, H, W, C = x.shape
    ws, nh = attn.window_size, attn.num_heads
    d = C // nh
    hp, wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    xp = x.new_zeros(B, hp, wp, C)
    xp[:, :H, :W] = x
    shift = attn.shift_size if min(H, W) > ws else 0
    if shift:
        xp = torch.roll(xp, (-shift, -shift), (1, 2))
        regions = _swin_regions(hp, wp, ws, shift)
    q, k, v = F.linear(xp, attn.qkv.weight, attn.qkv.bias).split(C, -1)
    out = torch.zeros_like(xp)
    for i in range(0, hp, ws):
        for j in range(0, wp, ws):
            vw = v[:, i:i + ws, j:j + ws]  # (B, ws, ws, C)
            lem = None
            if attn.local_module == "lem":
                conv = attn.local_conv
                lem = F.conv2d(vw.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding,
                               groups=C).permute(0, 2, 3, 1).reshape(B, ws * ws, C)
            for h in range(nh):
                ch = slice(h * d, (h + 1) * d)
                qh = q[:, i:i + ws, j:j + ws, ch].reshape(B, ws * ws, d)
                kh = k[:, i:i + ws, j:j + ws, ch].reshape(B, ws * ws, d)
                vh = vw[..., ch].reshape(B, ws * ws, d)
                logits = qh @ kh.transpose(1, 2) / math.sqrt(d)
                if attn.rel_pos_bias:  # Swin: the table row of each pair's offset (dy, dx) in the window
                    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
                    dy, dx = yy.reshape(-1, 1) - yy.reshape(1, -1), xx.reshape(-1, 1) - xx.reshape(1, -1)
                    logits = logits + attn.relative_position_bias_table[(dy + ws - 1) * (2 * ws - 1) + dx + ws - 1, h]
                if shift:
                    r = regions[i:i + ws, j:j + ws].reshape(-1)
                    logits = logits.masked_fill(r[:, None] != r[None, :], float("-inf"))
                o = logits.softmax(-1) @ vh
                if lem is not None:
                    o = o + lem[..., ch]
                out[:, i:i + ws, j:j + ws, ch] = o.reshape(B, ws, ws, d)
    if attn.local_module == "lim":
        conv = attn.local_conv
        out = out + F.conv2d(v.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding,
                             groups=C).permute(0, 2, 3, 1)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return F.linear(out[:, :H, :W], attn.proj.weight, attn.proj.bias)


def naive_ssa(attn: ScalableSelfAttention, x: torch.Tensor, c_ratio: float) -> torch.Tensor:
    """SSA from the paper's equations with the official layout: zero-pad the
    reduction input to a multiple of sr, explicit softmax, scale (C/h * r_c)^-0.5."""
    B, H, W, C = x.shape
    nh, sr = attn.num_heads, attn.sr_ratio
    q = F.linear(x, attn.q.weight, attn.q.bias).reshape(B, H * W, -1)
    if sr > 1:
        hp, wp = math.ceil(H / sr) * sr, math.ceil(W / sr) * sr
        xp = x.new_zeros(B, C, hp, wp)
        xp[:, :, :H, :W] = x.permute(0, 3, 1, 2)
        r = F.conv2d(xp, attn.sr_dw.weight, attn.sr_dw.bias, stride=sr, groups=C)
        r = F.conv2d(r, attn.sr_pw.weight, attn.sr_pw.bias).flatten(2).transpose(1, 2)
        r = F.gelu(F.layer_norm(r, r.shape[-1:], attn.sr_norm.weight, attn.sr_norm.bias, eps=1e-5))
        k, v = F.linear(r, attn.k.weight, attn.k.bias), F.linear(r, attn.v.weight, attn.v.bias)
    else:
        k, v = F.linear(x, attn.kv.weight, attn.kv.bias).reshape(B, H * W, 2 * C).chunk(2, -1)
    out = []
    for h in range(nh):
        qh, kh, vh = q.chunk(nh, -1)[h], k.chunk(nh, -1)[h], v.chunk(nh, -1)[h]
        a = (qh @ kh.transpose(1, 2) * (C / nh * c_ratio) ** -0.5).softmax(-1)
        out.append(a @ vh)
    return F.linear(torch.cat(out, -1).reshape(B, H, W, C), attn.proj.weight, attn.proj.bias)


def _randomize(module: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel() if p.dim() > 1 else 10))
    return module


@pytest.mark.parametrize("local_module,shift,bias", [("lim", 0, False), ("lem", 0, False), ("none", 0, False),
                                                     ("none", 3, False), ("none", 3, True)])
@pytest.mark.parametrize("size", [(14, 21), (10, 13)])
def test_window_attention_vs_naive(local_module, shift, bias, size):
    attn = _randomize(WindowAttention(12, 3, 7, shift, True, local_module, 3, 0.0, 0.0, bias)).eval()
    x = torch.randn(2, *size, 12)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), naive_window_attention(attn, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False], ids=["swin_bias", "no_bias"])
def test_swsa_vs_timm_swin(bias):
    # SWSA = timm's Swin SW-MSA (same qkv layout): with the same relative position bias table,
    # or with timm's table zeroed when the switch leaves the bias out
    ours = _randomize(WindowAttention(16, 2, 7, 3, True, "none", 3, 0.0, 0.0, rel_pos_bias=bias)).eval()
    swin = SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=3).eval()
    with torch.no_grad():
        swin.attn.relative_position_bias_table.copy_(ours.relative_position_bias_table if bias else 0)
        swin.attn.qkv.load_state_dict(ours.qkv.state_dict())
        swin.attn.proj.load_state_dict(ours.proj.state_dict())
        x = torch.randn(2, 14, 14, 16)
        torch.testing.assert_close(ours(x), swin._attn(x), atol=1e-5, rtol=1e-4)
    if bias:  # the mmcls WindowMSA key layout, and timm's (= mmcls') index
        assert torch.equal(ours.relative_position_index, swin.attn.relative_position_index)


def test_swsa_bias_switch_and_blocks_with_bias():
    def tables(*extra):
        m = vitlab.create_backbone("scalablevit_s", overrides=TINY + list(extra))
        return [n for n, _ in m.named_parameters() if n.endswith("relative_position_bias_table")]

    assert len(tables("block_pattern=swsa_ssa")) == 4  # the even block of each stage (depths 2)
    assert tables("block_pattern=swsa_ssa", "rel_pos_bias=false") == []
    assert tables() == tables("block_pattern=wsa") == []  # IWSA / WSA: none, as the official IWSA


@pytest.mark.parametrize("sr,c_ratio", [(4, 1.25), (2, 0.5), (1, 1.25)])
@pytest.mark.parametrize("size", [(8, 12), (10, 13)])
def test_ssa_vs_naive(sr, c_ratio, size):
    attn = _randomize(ScalableSelfAttention(16, 2, sr, c_ratio, True, 0.0, 0.0)).eval()
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), naive_ssa(attn, x, c_ratio), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pattern", ["iwsa_ssa", "swsa_ssa"])
def test_any_input_size(pattern):
    # a detection-like size that is a multiple of neither the window (7), nor the
    # reductions (8, 4, 2), nor 32: every stage has ceil(H / stride) rows (conv arithmetic)
    m = vitlab.create_backbone("scalablevit_s", overrides=TINY + [f"block_pattern={pattern}", "local_module=lem"])
    x = torch.randn(1, 3, 100, 132, requires_grad=True)
    feats = m(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 25, 33), (16, 13, 17), (32, 7, 9), (32, 4, 5)]
    assert m.strides == [4, 8, 16, 32] and m.out_channels == [8, 16, 32, 32]
    sum(f.square().mean() for f in feats).backward()
    assert torch.isfinite(x.grad).all()
