"""GPViT (Yang et al., "GPViT: A High Resolution Non-Hierarchical Vision
Transformer with Group Propagation", ICLR 2023; seed 003).

A conv stem brings the image to stride 8 (7x7/2 conv-BN-ReLU with 64 channels,
``num_convs`` 3x3 conv-BN-ReLU, then a 4x4/4 projection to C), a learned
position embedding is added (bicubic resize for other inputs) and 12 layers
run at that single resolution:

* local blocks (LePE attention by default): pre-norm attention and FFN, then a
  3x3 depth-wise conv *without* residual (as the official
  ``LePEAttnSimpleDWBlock``). LePE = CSWin's attention: half the heads attend
  within vertical stripes, half within horizontal stripes of width
  ``split_size``, plus a depth-wise 3x3 conv of v applied per stripe;
* GP blocks at ``gp_layers`` with ``group_tokens`` learnable group tokens:
  grouping (the tokens attend to the image tokens with only a key projection:
  q and v are the normed tokens / image features, no output projection),
  propagation (an MLP-Mixer layer), ungrouping (image tokens attend to the
  groups, the result is concatenated with the image tokens and projected
  2C -> C, then an FFN), then depth-wise 3x3 conv + BN + ReLU (no residual).

A final LayerNorm closes the trunk. The official classifier reads the token
sequence through ``GroupNeck`` (one learnable query token attending over the
final tokens, key projection only) followed by a linear layer.

Facts not in the paper come from the official code
(github.com/ChenhongyiYang/GPViT, ``mmcls/gpvit_dev``), whose checkpoints
``convert_official`` maps onto this layout (LayerNorm eps 1e-6 in the trunk and
the local blocks, PyTorch's default 1e-5 in the GP blocks and the neck, as
there). Every attention (stripes, windows, grouping, ungrouping, neck) goes
through ``F.scaled_dot_product_attention`` with its default 1/sqrt(head_dim)
scale, which is the official scale everywhere.

Decisions left open by the paper and the official code:

* Any input size. The stem's projection pads bottom/right to a multiple of its
  stride (mmcv's "corner" adaptive padding, as official), so the grid is
  ceil(H / 8) x ceil(W / 8). Stripes and windows pad the qkv map with zeros
  to a multiple of the stripe / window and mask the padded keys (Swin leaves
  them unmasked); LePE's per-stripe conv then sees zeros there, exactly the
  zero padding it sees at the image border. The official code only supports
  grids divisible by the stripe width, where this is the identity. Windows are
  clipped to the map and, as in Swin, a map no larger than one window is not
  shifted.
* Ablations (Tables 6-9, all at L1 width), each a constructor argument:
  ``local_attn`` in {lepe, window, global} swaps only the attention inside the
  local block (qkv, proj, FFN and the depth-wise conv stay, so each table row
  changes one thing); ``window`` is Swin's window attention with
  ``window_size`` 7 (28 = 4 x 7 at 224) and no relative position bias (the
  absolute position embedding and the depth-wise convs give position).
  ``global_block`` replaces the blocks at ``gp_layers``: ``gp`` (GP block),
  ``none`` (a local block like the others), ``conv`` (ViTDet's conv
  propagation block as the paper describes it: two 3x3 convs, each followed by
  a LayerNorm, GELU between, and a residual), ``global_attn`` (the local block
  with global attention), ``shifted_window`` (the window block shifted by
  ``window_size // 2`` with Swin's region mask). ``propagation`` in
  {mlp_mixer, self_attn, none}: ``self_attn`` is timm's pre-norm ViT block on
  the group tokens (``propagation_heads`` heads, FFN ratio ``ffn_ratio``).
  ``patch_size`` 16 keeps the conv stem and makes the projection 8x8/8.
* Dense outputs. ``out_indices`` picks the layers whose (normed) token maps
  are returned: the last one through the final norm, others through their own
  LayerNorm (as the official ``norm{i}``; the official segmentation configs use
  ``[2, 5, 8, 11]`` at stride 8). ``out_strides`` gives each output's stride
  in the image: the map's own stride (``patch_size``, 8) returns it as it is;
  other strides make a simple feature pyramid from it
  (ViTDet-style: 2x2 transposed convs up with LayerNorm + GELU between, max
  pooling down, then a LayerNorm per level), so FPN heads work unchanged. With
  one index and several strides all levels come from that one map. The
  paper's COCO backbone, GPViT + ViT-Adapter, is ``GPViTAdapter`` below
  (official mmdet ``GPViTAdapter`` / ``GPViTAdapterSingleStage``, checked
  against that code); its deformable attention is the pure-PyTorch form
  (``grid_sample``) of the op, as mmcv's CPU reference computes it.
* ``head_pool``: ``group`` is the official GroupNeck, ``mean`` averages the
  tokens instead.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block as ViTBlock
from torch import nn

from vitlab.backbones.base import Backbone
from vitlab.backbones.layers import init_vit_weights

LOCAL_ATTNS = ("lepe", "window", "global")
GLOBAL_BLOCKS = ("gp", "none", "conv", "global_attn", "shifted_window")
PROPAGATIONS = ("mlp_mixer", "self_attn", "none")
HEAD_POOLS = ("group", "mean")


# --------------------------------------------------------------------------- windows
def _window_ids(hw: tuple[int, int], padded: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], device):
    """Per-window token ids (nW, L) whose equality says which keys a query may see.

    Padded positions get ids of their own (so real queries never see them) and,
    for shifted windows, Swin's regions split the wrapped-around windows. None
    when nothing needs masking.
    """
    (h, w), (hp, wp) = hw, padded
    if (hp, wp) == (h, w) and shift == (0, 0):
        return None
    ids = torch.zeros(hp, wp, dtype=torch.long, device=device)
    if shift != (0, 0):  # Swin's region ids, laid out in the rolled frame
        for dim, (size, win, s) in enumerate(zip((hp, wp), window, shift)):
            if s:
                region = torch.zeros(size, dtype=torch.long, device=device)
                region[size - win :] = 1
                region[size - s :] = 2
                ids = ids * 3 + (region[:, None] if dim == 0 else region[None, :])
    pad = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    pad[h:, :] = True
    pad[:, w:] = True
    pad = torch.roll(pad, (-shift[0], -shift[1]), (0, 1))
    ids = torch.where(pad, -1 - ids, ids)
    wh, ww = window
    ids = ids.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    return ids


def window_attention(
    qkv: torch.Tensor,
    window: tuple[int, int],
    shift: tuple[int, int] = (0, 0),
    lepe: nn.Module | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention within (shifted) windows of a channels-last qkv map.

    qkv: (B, H, W, 3, heads, d). Windows of ``window`` (stripes are windows of
    (H, s) or (s, W)); the map is zero-padded bottom/right to a multiple of the
    window and padded keys are masked. ``lepe`` is a depth-wise conv applied to
    each window's value map and added to the output (CSWin / LePE). Returns
    (B, H, W, heads * d).
    """
    b, h, w, _, heads, d = qkv.shape
    wh, ww = min(window[0], h), min(window[1], w)
    sh, sw = (shift[0] if wh < h else 0), (shift[1] if ww < w else 0)  # Swin: no shift inside one window
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    if (hp, wp) != (h, w):
        qkv = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, wp - w, 0, hp - h))
    if sh or sw:
        qkv = torch.roll(qkv, (-sh, -sw), (1, 2))
    nh, nw = hp // wh, wp // ww
    nwin, length = nh * nw, wh * ww
    # (B, nh, wh, nw, ww, 3, heads, d) -> (3, B*nW, heads, L, d): one copy for q, k and v; 4-D for the fused kernels
    q, k, v = (
        qkv.view(b, nh, wh, nw, ww, 3, heads, d)
        .permute(5, 0, 1, 3, 6, 2, 4, 7)
        .reshape(3, b * nwin, heads, length, d)
        .unbind(0)
    )
    ids = _window_ids((h, w), (hp, wp), (wh, ww), (sh, sw), qkv.device)
    mask = None
    if ids is not None:  # (B*nW, 1, L, L); only where padding or a shift needs it
        mask = (ids[:, :, None] == ids[:, None, :]).expand(b, nwin, length, length).reshape(b * nwin, 1, length, length)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if lepe is not None:
        # each window's value map as an image: (B*nW, heads*d, wh, ww), head-major channels
        v_img = v.transpose(-1, -2).reshape(b * nwin, heads * d, wh, ww)
        out = out + lepe(v_img).view(b * nwin, heads, d, length).transpose(-1, -2)
    out = out.view(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, heads * d)
    if sh or sw:
        out = torch.roll(out, (sh, sw), (1, 2))
    if (hp, wp) != (h, w):
        out = out[:, :h, :w]
    return out


# --------------------------------------------------------------------------- local blocks
class LocalAttention(nn.Module):
    """qkv -> LePE stripes / (shifted) windows / global attention -> proj."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mode: str,
        split_size: int,
        window_size: int,
        shift: bool = False,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if mode not in LOCAL_ATTNS:
            raise ValueError(f"local_attn {mode!r}: use one of {LOCAL_ATTNS}")
        if mode == "lepe" and (num_heads % 2 or dim % 2):
            raise ValueError("LePE splits heads and channels in two halves: num_heads and dim must be even")
        self.mode, self.num_heads = mode, num_heads
        self.split_size, self.window_size, self.shift = split_size, window_size, shift
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # one depth-wise LePE conv per stripe direction (vertical, horizontal) over its half of the channels
        self.lepe = (
            nn.ModuleList(nn.Conv2d(dim // 2, dim // 2, 3, padding=1, groups=dim // 2) for _ in range(2))
            if mode == "lepe"
            else None
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = hw
        p = self.attn_drop if self.training else 0.0
        if self.mode == "lepe":
            # channels split into halves (vertical / horizontal stripes), each half into num_heads / 2 heads
            qkv = self.qkv(x).view(b, h, w, 3, 2, self.num_heads // 2, c // self.num_heads)
            s = self.split_size
            vert = window_attention(qkv[:, :, :, :, 0], (h, s), lepe=self.lepe[0], dropout_p=p)
            horiz = window_attention(qkv[:, :, :, :, 1], (s, w), lepe=self.lepe[1], dropout_p=p)
            out = torch.cat((vert, horiz), dim=-1)
        else:
            qkv = self.qkv(x).view(b, h, w, 3, self.num_heads, c // self.num_heads)
            if self.mode == "global":
                window, shift = (h, w), (0, 0)
            else:
                ws = self.window_size
                window, shift = (ws, ws), ((ws // 2, ws // 2) if self.shift else (0, 0))
            out = window_attention(qkv, window, shift, dropout_p=p)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))


def _dw_conv_tokens(conv: nn.Module, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Apply a conv (stack) to a (B, N, C) token sequence seen as a (B, C, H, W) map."""
    b, n, c = x.shape
    y = conv(x.reshape(b, *hw, c).permute(0, 3, 1, 2))  # a channels-last view: convs take it without a copy
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


class LocalBlock(nn.Module):
    """Official ``LePEAttnSimpleDWBlock``: attention + FFN (pre-norm, residual), then a
    depth-wise 3x3 conv without bias and without residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mode: str,
        split_size: int,
        window_size: int,
        shift: bool,
        ffn_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = LocalAttention(dim, num_heads, mode, split_size, window_size, shift, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * ffn_ratio), drop=drop)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return _dw_conv_tokens(self.dw, x, hw)


class ConvPropagationBlock(nn.Module):
    """Table 7's "conv" block (ViTDet's conv propagation as the paper describes it):
    x + LN(conv3x3(GELU(LN(conv3x3(x)))))."""

    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm1 = LayerNorm2d(dim)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        return x + self.drop_path(_dw_conv_tokens(self._convs, x, hw))

    def _convs(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


# --------------------------------------------------------------------------- GP block
class TokenGrouping(nn.Module):
    """Learnable tokens attend over image tokens with only a key projection (q = the
    normed tokens, v = the (normed) image tokens, no output projection).

    The GP block's grouping (official ``LightGroupAttnBlock``) and, with one token,
    no key norm and no key bias, the classification neck (official ``GroupNeck``).
    """

    def __init__(self, dim: int, num_tokens: int, num_heads: int, qkv_bias: bool, norm_key: bool, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.group_token = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.norm_query = nn.LayerNorm(dim, eps=eps)
        self.norm_key = nn.LayerNorm(dim, eps=eps) if norm_key else nn.Identity()
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)

    def _qkv(self, x: torch.Tensor):
        b, n, c = x.shape
        heads = self.num_heads
        q = self.norm_query(self.group_token)  # normed once, shared by the batch
        q = q.view(1, -1, heads, c // heads).transpose(1, 2).expand(b, -1, -1, -1)
        v = self.norm_key(x)
        k = self.k_proj(v).view(b, n, heads, c // heads).transpose(1, 2)
        v = v.view(b, n, heads, c // heads).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(2)  # (B, M, C)

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, M, N) grouping weights, for visualisation (SDPA does not return them)."""
        q, k, _ = self._qkv(x)
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


class MixerLayer(nn.Module):
    """MLP-Mixer layer on the group tokens (official ``MLPMixerLayer``): token mixing with
    hidden ``token_ratio * C`` (of the channels, as official), channel mixing ``channel_ratio * C``."""

    def __init__(self, num_tokens: int, dim: int, token_ratio: float, channel_ratio: float, drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(num_tokens, int(token_ratio * dim), drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, int(channel_ratio * dim), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.channel_mlp(self.norm2(x)))


class Ungrouping(nn.Module):
    """Official ``FullAttnCatBlock``: image tokens attend to the groups; the result is
    concatenated with the image tokens (instead of a residual), projected 2C -> C,
    then a pre-norm FFN with residual."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.norm_query = nn.LayerNorm(dim)
        self.norm_key = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.cat_proj = nn.Linear(2 * dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * ffn_ratio), drop=drop)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        m, heads = groups.shape[1], self.num_heads
        g = self.norm_key(groups)
        q = self.q_proj(self.norm_query(x)).view(b, n, heads, c // heads).transpose(1, 2)
        k = self.k_proj(g).view(b, m, heads, c // heads).transpose(1, 2)
        v = self.v_proj(g).view(b, m, heads, c // heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        x = self.cat_proj(torch.cat((x, self.drop_path(out)), dim=-1))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GPBlock(nn.Module):
    """Group propagation block: grouping -> propagation -> ungrouping -> DW conv + BN + ReLU."""

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        num_group_heads: int,
        num_ungroup_heads: int,
        propagation: str,
        propagation_depth: int,
        propagation_heads: int,
        token_ratio: float,
        channel_ratio: float,
        ffn_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ):
        super().__init__()
        self.group = TokenGrouping(dim, num_tokens, num_group_heads, qkv_bias, norm_key=True)
        if propagation == "mlp_mixer":
            layers = [MixerLayer(num_tokens, dim, token_ratio, channel_ratio, drop, drop_path) for _ in range(propagation_depth)]
        elif propagation == "self_attn":
            layers = [
                ViTBlock(dim, propagation_heads, mlp_ratio=ffn_ratio, qkv_bias=qkv_bias, proj_drop=drop,
                         attn_drop=attn_drop, drop_path=drop_path, norm_layer=nn.LayerNorm)
                for _ in range(propagation_depth)
            ]
        elif propagation == "none":
            layers = []
        else:
            raise ValueError(f"propagation {propagation!r}: use one of {PROPAGATIONS}")
        self.propagate = nn.Sequential(*layers)
        self.ungroup = Ungrouping(dim, num_ungroup_heads, ffn_ratio, qkv_bias, drop, attn_drop, drop_path)
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        groups = self.propagate(self.group(x))
        return _dw_conv_tokens(self.dw, self.ungroup(x, groups), hw)


# --------------------------------------------------------------------------- stem, pyramid, head
class ConvStem(nn.Module):
    """7x7/2 conv-BN-ReLU, ``num_convs`` 3x3 conv-BN-ReLU, then a (patch/2)x(patch/2) projection."""

    def __init__(self, in_chans: int, stem_channels: int, num_convs: int, patch_size: int, dim: int):
        super().__init__()
        if patch_size % 2:
            raise ValueError("patch_size must be even (the stem halves the image first)")
        layers = [nn.Conv2d(in_chans, stem_channels, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)]
        for _ in range(num_convs):
            layers += [nn.Conv2d(stem_channels, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*layers)
        self.proj_stride = patch_size // 2
        self.proj = nn.Conv2d(stem_channels, dim, self.proj_stride, self.proj_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        s = self.proj_stride
        pad_h, pad_w = (-x.shape[-2]) % s, (-x.shape[-1]) % s
        if pad_h or pad_w:  # mmcv's "corner" adaptive padding, as official
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x)


def _resample(dim: int, factor: float) -> nn.Module:
    """ViTDet-style simple-feature-pyramid level: 2x transposed convs up / max pooling down, then LN."""
    if factor == 1:
        return nn.Identity()
    if factor > 1:
        ups = int(round(math.log2(factor)))
        layers: list[nn.Module] = []
        for i in range(ups):
            if i:
                layers += [LayerNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, 2, 2))
    else:
        k = int(round(1 / factor))
        layers = [nn.MaxPool2d(k, k, ceil_mode=True)]
    return nn.Sequential(*layers, LayerNorm2d(dim))


class GPViTHead(nn.Module):
    """Official classifier: ``GroupNeck`` (one query token, key projection only, no key
    norm: the tokens arrive normed) + linear; or token averaging + linear."""

    def __init__(self, dim: int, num_classes: int, pool: str, num_heads: int):
        super().__init__()
        if pool not in HEAD_POOLS:
            raise ValueError(f"head_pool {pool!r}: use one of {HEAD_POOLS}")
        # official GroupNeck: qkv_bias=False, LayerNorm(eps 1e-5) on the query; its token starts at zero
        self.neck = TokenGrouping(dim, 1, num_heads, qkv_bias=False, norm_key=False) if pool == "group" else None
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        if self.neck is not None:
            trunc_normal_(self.neck.k_proj.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.neck(tokens).flatten(1) if self.neck is not None else tokens.mean(1)
        return self.fc(x)

    def no_weight_decay(self) -> set[str]:
        # the official recipe exempts every ".group_token", the neck's query included
        return {"neck.group_token"} if self.neck is not None else set()


# --------------------------------------------------------------------------- backbone
class GPViT(Backbone):
    """GPViT trunk: conv stem to stride ``patch_size``, position embedding, ``num_layers``
    local / GP blocks at that one resolution, final LayerNorm (see the module docstring).

    ``forward`` returns the maps of ``out_indices`` at ``out_strides``; ``forward_features``
    the final normed tokens (B, N, C) that the GroupNeck head reads.
    """

    def __init__(
        self,
        img_size: int | list[int],
        in_chans: int,
        embed_dims: int,
        patch_size: int,
        stem_channels: int,
        num_convs: int,
        num_layers: int,
        num_heads: int,
        local_attn: str,
        split_size: int,
        window_size: int,
        ffn_ratio: float,
        qkv_bias: bool,
        global_block: str,
        gp_layers: list[int],
        group_tokens: list[int],
        num_group_heads: int,
        num_ungroup_heads: int,
        propagation: str,
        propagation_depth: int,
        propagation_heads: int,
        mixer_token_ratio: float,
        mixer_channel_ratio: float,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        norm_eps: float,
        interpolate_mode: str,
        out_indices: list[int],
        out_strides: list[int],
        head_pool: str,
        neck_heads: int,
    ):
        super().__init__()
        if global_block not in GLOBAL_BLOCKS:
            raise ValueError(f"global_block {global_block!r}: use one of {GLOBAL_BLOCKS}")
        if head_pool not in HEAD_POOLS:
            raise ValueError(f"head_pool {head_pool!r}: use one of {HEAD_POOLS}")
        if len(gp_layers) != len(group_tokens):
            raise ValueError("gp_layers and group_tokens need one entry per GP block")
        out_indices = [i % num_layers for i in out_indices]
        if len(out_indices) not in (1, len(out_strides)):
            raise ValueError("out_indices: one layer for all out_strides, or one layer per stride")
        img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        self.embed_dims, self.patch_size, self.num_layers = embed_dims, patch_size, num_layers
        self.interpolate_mode, self.head_pool, self.neck_heads = interpolate_mode, head_pool, neck_heads

        self.patch_embed = ConvStem(in_chans, stem_channels, num_convs, patch_size, embed_dims)
        # grid of the pretraining size, as the stem produces it (ceil at each stride)
        self.grid = (math.ceil(math.ceil(img_size[0] / 2) / (patch_size // 2)),
                     math.ceil(math.ceil(img_size[1] / 2) / (patch_size // 2)))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]  # linspace, meta-safe
        tokens_at = dict(zip([i % num_layers for i in gp_layers], group_tokens))
        local = dict(dim=embed_dims, num_heads=num_heads, split_size=split_size, window_size=window_size,
                     ffn_ratio=ffn_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, norm_eps=norm_eps)
        layers = []
        for i in range(num_layers):
            if i not in tokens_at or global_block == "none":
                layers.append(LocalBlock(mode=local_attn, shift=False, drop_path=dpr[i], **local))
            elif global_block == "gp":
                layers.append(GPBlock(embed_dims, tokens_at[i], num_group_heads, num_ungroup_heads, propagation,
                                      propagation_depth, propagation_heads, mixer_token_ratio, mixer_channel_ratio,
                                      ffn_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i]))
            elif global_block == "conv":
                layers.append(ConvPropagationBlock(embed_dims, dpr[i]))
            elif global_block == "global_attn":
                layers.append(LocalBlock(mode="global", shift=False, drop_path=dpr[i], **local))
            else:  # shifted_window
                layers.append(LocalBlock(mode="window", shift=True, drop_path=dpr[i], **local))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)

        # dense outputs: own LayerNorm for intermediate layers (official norm{i}), resampling per stride
        self.out_indices = out_indices
        self.out_norms = nn.ModuleDict(
            {str(i): nn.LayerNorm(embed_dims, eps=norm_eps) for i in sorted(set(out_indices)) if i != num_layers - 1}
        )
        self.resample = nn.ModuleList(_resample(embed_dims, patch_size / s) for s in out_strides)
        self.strides = list(out_strides)
        self.out_channels = [embed_dims] * len(out_strides)

        if self.pos_embed.is_meta:  # built on the meta device to count: no values to initialise (and it is slow)
            return
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, TokenGrouping):
                trunc_normal_(m.group_token, std=0.02)
        self.apply(partial(init_vit_weights, convs=False))  # the official classifier config: convs keep torch's init

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"} | {n for n, _ in self.named_parameters() if n.endswith("group_token")}

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(images)
        hw = (x.shape[-2], x.shape[-1])
        pos = resample_abs_pos_embed(self.pos_embed, list(hw), list(self.grid), num_prefix_tokens=0,
                                     interpolation=self.interpolate_mode, antialias=False)
        return self.pos_drop(x.flatten(2).transpose(1, 2) + pos), hw

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final normed tokens (B, N, C): what the GroupNeck reads."""
        x, hw = self._embed(images)
        for layer in self.layers:
            x = layer(x, hw)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, hw = self._embed(images)
        wanted = set(self.out_indices)
        maps: dict[int, torch.Tensor] = {}
        b = x.shape[0]
        for i, layer in enumerate(self.layers[: max(wanted) + 1]):
            x = layer(x, hw)
            if i in wanted:
                y = self.norm(x) if i == self.num_layers - 1 else self.out_norms[str(i)](x)
                maps[i] = y.transpose(1, 2).reshape(b, -1, *hw)
        idx = self.out_indices * len(self.resample) if len(self.out_indices) == 1 else self.out_indices
        return [resample(maps[i]) for resample, i in zip(self.resample, idx)]

    def make_head(self, num_classes: int) -> nn.Module:
        return GPViTHead(self.embed_dims, num_classes, self.head_pool, self.neck_heads)


# --------------------------------------------------------------------------- ViT-Adapter (COCO)
def ms_deform_attn(value, shapes, locations, weights):
    """Multi-scale deformable attention, the pure-PyTorch form of Deformable DETR's op.

    value (B, S, heads, d) over the levels' flattened maps of ``shapes`` [(h, w), ...];
    locations (B, Q, heads, levels, points, 2) as (x, y) in [0, 1]; weights
    (B, Q, heads, levels, points). Returns (B, Q, heads * d). One ``grid_sample`` per
    level (at most three): the levels differ in size, so they cannot share one call.
    """
    b, _, heads, d = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        start += h * w
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*heads, d, Q)
    return out.view(b, heads * d, q).transpose(1, 2)


def _reference_points(shapes, device) -> torch.Tensor:
    """Pixel centres of every level, normalised to [0, 1], as (1, sum h*w, 1, 2) (x, y)."""
    refs = []
    for h, w in shapes:
        y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device) / h,
                              torch.linspace(0.5, w - 0.5, w, device=device) / w, indexing="ij")
        refs.append(torch.stack((x.reshape(-1), y.reshape(-1)), -1))
    return torch.cat(refs)[None, :, None]


class MSDeformAttn(nn.Module):
    """Deformable attention of ViT-Adapter (offsets and weights from the query)."""

    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int, ratio: float):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, int(dim * ratio))
        self.output_proj = nn.Linear(int(dim * ratio), dim)

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, one per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid[:, None, None, :] * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference_points, feat, shapes) -> torch.Tensor:
        b, q, _ = query.shape
        value = self.value_proj(feat).view(b, feat.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, q, self.n_heads, -1).softmax(-1)
        weights = weights.view(b, q, self.n_heads, self.n_levels, self.n_points)
        normaliser = torch.tensor([(w, h) for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(value, shapes, locations, weights))


class _ConvFFN(nn.Module):
    """ViT-Adapter's FFN with a 3x3 depth-wise conv (shared) on each level of the token pyramid."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, shapes) -> torch.Tensor:
        x = self.fc1(x)
        x = torch.cat([_dw_conv_tokens(self.dwconv, t, s) for t, s in
                       zip(x.split([h * w for h, w in shapes], dim=1), shapes)], dim=1)  # three levels
        return self.drop(self.fc2(self.drop(self.act(x))))


class _Extractor(nn.Module):
    """Pyramid tokens c gather from the trunk tokens x (one level), then a ConvFFN."""

    def __init__(self, dim, heads, points, ratio, cffn_ratio, drop, drop_path):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 1, heads, points, ratio)
        self.ffn = _ConvFFN(dim, int(dim * cffn_ratio), drop)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, c, ref, x, x_shape, c_shapes):
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [x_shape])
        return c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))


class _Injector(nn.Module):
    """Trunk tokens x gather from the pyramid tokens c (three levels), scaled by gamma."""

    def __init__(self, dim, heads, points, ratio, init_values):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 3, heads, points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x, ref, c, c_shapes):
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(c), c_shapes)


class _Interaction(nn.Module):
    def __init__(self, dim, heads, points, ratio, cffn_ratio, init_values, drop, drop_path, extra_extractors: int):
        super().__init__()
        self.injector = _Injector(dim, heads, points, ratio, init_values)
        self.extractor = _Extractor(dim, heads, points, ratio, cffn_ratio, drop, drop_path)
        self.extra_extractors = nn.ModuleList(
            _Extractor(dim, heads, points, ratio, cffn_ratio, drop, drop_path) for _ in range(extra_extractors)
        )


class SpatialPriorModule(nn.Module):
    """ViT-Adapter's conv branch: ResNet-like stem to stride 4, then 3x3/2 convs to strides 8, 16, 32,
    each projected to the trunk width by a 1x1 conv (stride 4 only when it is an output)."""

    def __init__(self, inplanes: int, dim: int, out_c1: bool):
        super().__init__()

        def cbr(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(*cbr(3, inplanes, 2), *cbr(inplanes, inplanes, 1), *cbr(inplanes, inplanes, 1),
                                  nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*cbr(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*cbr(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*cbr(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, dim, 1) if out_c1 else None
        self.fc2 = nn.Conv2d(2 * inplanes, dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, dim, 1)

    def forward(self, x: torch.Tensor):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return (self.fc1(c1) if self.fc1 is not None else None), self.fc2(c2), self.fc3(c3), self.fc4(c4)


class GPViTAdapter(GPViT):
    """GPViT with ViT-Adapter for COCO (the paper's detection backbone; official
    ``GPViTAdapter`` / ``GPViTAdapterSingleStage``): a conv branch (SpatialPriorModule)
    makes stride 8/16/32 tokens that exchange information with the trunk through
    deformable attention around each group of layers in ``interaction_indexes``
    (injector before the group, extractor(s) after it); outputs are those tokens plus
    the trunk map resized (bilinear) to each stride, each through a BatchNorm.
    ``out_strides`` [4, 8, 16, 32] (Mask R-CNN) adds the stride-4 level (stride-4 conv
    features + the 2x transposed-conv of stride 8); [8, 16, 32] (RetinaNet) does not.
    As official there is no final LayerNorm. Inputs are padded to a multiple of 32 (the
    official code needs it) and outputs cropped to ceil(H / stride).
    """

    def __init__(
        self,
        *,
        conv_inplane: int,
        n_points: int,
        deform_num_heads: int,
        init_values: float,
        interaction_indexes: list[list[int]],
        cffn_ratio: float,
        deform_ratio: float,
        extra_extractors: int,
        add_vit_feature: bool,
        **kwargs,
    ):
        out_strides = list(kwargs["out_strides"])
        if out_strides not in ([4, 8, 16, 32], [8, 16, 32]) or kwargs["patch_size"] != 8:
            raise ValueError("GPViTAdapter: out_strides [4, 8, 16, 32] or [8, 16, 32], patch_size 8")
        super().__init__(**{**kwargs, "out_strides": [8]})
        dim = self.embed_dims
        self.norm = None  # official detection backbones run with final_norm=False
        self.resample = None
        self.strides, self.out_channels = out_strides, [dim] * len(out_strides)
        self.interaction_indexes = [list(ix) for ix in interaction_indexes]
        self.add_vit_feature = add_vit_feature
        out_c1 = 4 in out_strides
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim, out_c1)
        drop_path = kwargs["drop_path_rate"]  # official: every adapter block gets the trunk's maximum rate
        self.interactions = nn.ModuleList(
            _Interaction(dim, deform_num_heads, n_points, deform_ratio, cffn_ratio, init_values, kwargs["drop_rate"],
                         drop_path, extra_extractors if i == len(interaction_indexes) - 1 else 0)
            for i in range(len(interaction_indexes))
        )
        self.up = nn.ConvTranspose2d(dim, dim, 2, 2) if out_c1 else None
        self.ad_norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in out_strides)
        if self.level_embed.is_meta:  # counting only
            return
        # official init of the new parts: trunc-normal linears, fan-out normal convs, then Deformable DETR's
        for part in (self.spm, self.interactions, self.up):
            if part is not None:
                part.apply(self._init_adapter)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def _init_adapter(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"level_embed"}

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("GPViTAdapter is a dense backbone; classify with GPViT")

    def make_head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError("GPViTAdapter is a dense backbone; classify with GPViT")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h0, w0 = images.shape[-2:]
        pad_h, pad_w = (-h0) % 32, (-w0) % 32
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        c1, c2, c3, c4 = self.spm(images)
        c_shapes = [tuple(t.shape[-2:]) for t in (c2, c3, c4)]
        c = torch.cat([(t.flatten(2).transpose(1, 2) + self.level_embed[i]) for i, t in enumerate((c2, c3, c4))], 1)
        x, hw = self._embed(images)
        # reference points: trunk tokens look into the three c levels, c tokens into the trunk map
        ref_x = _reference_points([hw], images.device).expand(-1, -1, 3, -1)
        ref_c = _reference_points(c_shapes, images.device)
        for block, ix in zip(self.interactions, self.interaction_indexes):
            x = block.injector(x, ref_x, c, c_shapes)
            for layer in self.layers[ix[0] : ix[-1] + 1]:
                x = layer(x, hw)
            for extractor in [block.extractor, *block.extra_extractors]:
                c = extractor(c, ref_c, x, hw, c_shapes)
        b, dim = x.shape[0], self.embed_dims
        maps = [t.transpose(1, 2).reshape(b, dim, *s) for t, s in zip(c.split([h * w for h, w in c_shapes], 1), c_shapes)]
        if self.up is not None:  # stride 4: conv features + the stride-8 tokens upsampled (before the trunk is added)
            maps = [self.up(maps[0]) + c1] + maps
        if self.add_vit_feature:  # the trunk map resized to every level
            x8 = x.transpose(1, 2).reshape(b, dim, *hw)
            maps = [m + (x8 if m.shape[-2:] == x8.shape[-2:] else
                         F.interpolate(x8, size=m.shape[-2:], mode="bilinear", align_corners=False)) for m in maps]
        return [norm(m)[..., : math.ceil(h0 / s), : math.ceil(w0 / s)]
                for norm, m, s in zip(self.ad_norms, maps, self.strides)]


# --------------------------------------------------------------------------- visualisation
@torch.no_grad()
def group_attention_maps(backbone: GPViT, image: torch.Tensor) -> list[torch.Tensor]:
    """Per GP block, the grouping attention (averaged over heads) as one map per group
    token, upsampled to the image resolution: a list of (B, M, H, W) tensors (GPViT Fig. 6).

    ``image``: (B, 3, H, W) or (3, H, W).
    """
    if image.dim() == 3:
        image = image[None]
    groupings = [m.group for m in backbone.layers if isinstance(m, GPBlock)]
    inputs: list[torch.Tensor] = []
    hooks = [g.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for g in groupings]
    was_training = backbone.training
    backbone.eval()
    try:
        x, hw = backbone._embed(image)
        for layer in backbone.layers:
            x = layer(x, hw)
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    b, _, height, width = image.shape
    maps = []
    for g, tokens in zip(groupings, inputs):
        attn = g.attention_weights(tokens).mean(1).view(b, -1, *hw)  # (B, M, h, w)
        up = F.interpolate(attn, size=(hw[0] * backbone.patch_size, hw[1] * backbone.patch_size), mode="bilinear",
                           align_corners=False)
        maps.append(up[:, :, :height, :width])
    return maps


# --------------------------------------------------------------------------- official checkpoints
def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official mmcls GPViT checkpoint (``backbone.`` / ``neck.`` / ``head.`` keys, the
    "state_dict" wrapper already removed) -> our ``backbone.*`` + ``head.*`` layout.
    The ``backbone.`` part of the official mmdet ViT-Adapter checkpoints maps the same way."""
    out: dict[str, torch.Tensor] = {}
    first_ad_norm = 1 if "backbone.ad_norm1.weight" in state_dict else 2  # ViT-Adapter: ad_norm1 only with stride 4
    for key, value in state_dict.items():
        if key.startswith("backbone.ad_norm"):
            level, _, rest = key[len("backbone.ad_norm"):].partition(".")
            out[f"backbone.ad_norms.{int(level) - first_ad_norm}.{rest}"] = value
        else:
            out[_convert_key(key)] = value
    return out


def _convert_key(key: str) -> str:
    prefix, _, rest = key.partition(".")
    if prefix == "neck":  # GroupNeck: group_token, norm_query, attn.k_proj
        return "head.neck." + rest.replace("attn.k_proj", "k_proj")
    if prefix == "head":  # LinearClsHead: fc
        return "head." + rest
    if prefix != "backbone":
        return key
    parts = rest.split(".")
    if parts[0] == "patch_embed":
        if parts[1] == "stem":
            return "backbone." + rest
        if parts[1] == "convs":  # convs.{3j+k} follow the 3 stem modules in our single Sequential
            return "backbone.patch_embed.stem." + ".".join([str(int(parts[2]) + 3), *parts[3:]])
        if parts[1] == "projection":
            return "backbone.patch_embed.proj." + ".".join(parts[2:])
    if parts[0] == "ln1":
        return "backbone.norm." + ".".join(parts[1:])
    if parts[0].startswith("norm") and parts[0][4:].isdigit():  # norm{i}: intermediate output norms
        return f"backbone.out_norms.{parts[0][4:]}." + ".".join(parts[1:])
    if parts[0] == "interactions":  # ViT-Adapter (mmdet checkpoints): the ConvFFN's conv is not wrapped here
        return "backbone." + rest.replace(".ffn.dwconv.dwconv.", ".ffn.dwconv.")
    if parts[0] == "layers":
        head, tail = ".".join(parts[:2]), ".".join(parts[2:])
        return f"backbone.{head}.{_convert_layer_key(tail)}"
    return "backbone." + rest


_LAYER_RENAMES = (
    # LePE block
    ("qkv.", "attn.qkv."),
    ("attns.0.get_v.", "attn.lepe.0."),
    ("attns.1.get_v.", "attn.lepe.1."),
    ("proj.", "attn.proj."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
    # GP block
    ("group_token", "group.group_token"),
    ("group_layer.norm_query.", "group.norm_query."),
    ("group_layer.norm_key.", "group.norm_key."),
    ("group_layer.attn.k_proj.", "group.k_proj."),
    ("un_group_layer.norm_query.", "ungroup.norm_query."),
    ("un_group_layer.norm_key.", "ungroup.norm_key."),
    ("un_group_layer.attn.q_proj.", "ungroup.q_proj."),
    ("un_group_layer.attn.k_proj.", "ungroup.k_proj."),
    ("un_group_layer.attn.v_proj.", "ungroup.v_proj."),
    ("un_group_layer.attn.proj.", "ungroup.proj."),
    ("un_group_layer.proj.", "ungroup.cat_proj."),
    ("un_group_layer.norm2.", "ungroup.norm2."),
    ("un_group_layer.ffn.layers.0.0.", "ungroup.mlp.fc1."),
    ("un_group_layer.ffn.layers.1.", "ungroup.mlp.fc2."),
    ("dwconv.", "dw."),
)

_MIXER_RENAMES = (
    ("patch_mixer.0.", "token_mlp.fc1."),
    ("patch_mixer.3.", "token_mlp.fc2."),
    ("channel_mixer.0.", "channel_mlp.fc1."),
    ("channel_mixer.3.", "channel_mlp.fc2."),
)


def _convert_layer_key(tail: str) -> str:
    if tail.startswith("mixer.layers."):  # mixer.layers.{d}.X -> propagate.{d}.X
        d, _, rest = tail[len("mixer.layers."):].partition(".")
        for old, new in _MIXER_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        return f"propagate.{d}.{rest}"
    for old, new in _LAYER_RENAMES:
        if tail.startswith(old) and not (old == "group_token" and tail != "group_token"):
            return new + tail[len(old):]
    return tail  # norm1, norm2, dw
