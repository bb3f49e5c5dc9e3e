"""The GPViT trunk (Yang et al., "GPViT: A High Resolution Non-Hierarchical Vision
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
through ``F.scaled_dot_product_attention`` (``layers.attention``) with its default 1/sqrt(head_dim)
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
  ``window_sizes`` 7 (28 = 4 x 7 at 224) and its relative position bias
  (``rel_pos_bias``; a window clipped to a smaller map uses the middle of the table).
  ``global_block`` replaces the blocks at ``gp_layers``: ``gp`` (GP block),
  ``none`` (a local block like the others), ``conv`` (ViTDet's conv
  propagation block as the paper describes it: two 3x3 convs, each followed by
  a LayerNorm, GELU between, and a residual), ``global_attn`` (the local block
  with global attention), ``shifted_window`` (the window block shifted by
  half a window with Swin's region mask). ``propagation`` in
  {mlp_mixer, self_attn, none}: ``self_attn`` is a pre-norm transformer layer in
  which the group tokens attend to themselves and the image tokens
  (``propagation_heads`` heads, FFN ratio ``mlp_ratios``; ``GroupSelfAttention``
  explains why this is what Table 9's cost implies).
  ``pos_embed``: ``ape`` (the official learned embedding) or ``none``.
  ``local_block``: ``gpvit`` (the official block above) or ``deit`` (plain pre-norm
  ViT block, no depth-wise conv): Table 6's ViT-D216-P8/P16 baselines are ``deit``
  blocks with global attention, no GP blocks and the mean-pooling head
  (``head_pool: mean``); ``patch_size`` 16 adds a stride-2 conv to the stem (see
  ``ConvStem``). ``rel_pos_bias``: Swin's relative position bias in ``window`` and
  ``shifted_window`` attention (Tables 6-7 cite Swin's window attention, and the
  authors' codebase ships mmcls' ``WindowMSA`` with it); false leaves it out, as
  earlier versions did.
* Dense outputs. ``out_indices`` picks the layers whose (normed) token maps
  are returned: the last one through the final norm, others through their own
  LayerNorm (as the official ``norm{i}``; the official segmentation configs use
  ``[2, 5, 8, 11]`` at stride 8). ``out_strides`` gives each output's stride
  in the image: the map's own stride (``patch_size``, 8) returns it as it is;
  other strides make a simple feature pyramid from it
  (ViTDet-style: 2x2 transposed convs up with LayerNorm + GELU between, max
  pooling down, then a LayerNorm per level), so FPN heads work unchanged. With
  one index and several strides all levels come from that one map. The
  paper's COCO backbone, GPViT + ViT-Adapter, is ``adapter.GPViTAdapter``,
  which holds a trunk built with ``final_norm=False`` and no dense outputs.
* ``head_pool``: ``group`` is the official GroupNeck, ``mean`` averages the
  tokens instead.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, resample_abs_pos_embed, trunc_normal_
from torch import nn

from vitlab.backbones.arguments import (check_choice, check_divisible, check_ints, check_positive, check_rates, fail,
                                        per_stage, show)
from vitlab.backbones.base import Backbone
from vitlab.backbones.gpvit.convert import convert_official, to_official
from vitlab.backbones.layers import (add_relative_position_bias, adapt_shapes, attention, init_vit_weights,
                                     relative_position_bias, resize_relative_position_bias, resize_token_grid,
                                     run_block)

LOCAL_ATTNS = ("lepe", "window", "global")
LOCAL_BLOCKS = ("gpvit", "deit")
GLOBAL_BLOCKS = ("gp", "none", "conv", "global_attn", "shifted_window")
PROPAGATIONS = ("mlp_mixer", "self_attn", "none")
HEAD_POOLS = ("group", "mean")
POS_EMBEDS = ("ape", "none")


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
    bias: nn.Module | None = None,
) -> torch.Tensor:
    """Multi-head attention within (shifted) windows of a channels-last qkv map.

    qkv: (B, H, W, 3, heads, d). Windows of ``window`` (stripes are windows of
    (H, s) or (s, W)); the map is zero-padded bottom/right to a multiple of the
    window and padded keys are masked. ``lepe`` is a depth-wise conv applied to
    each window's value map and added to the output (CSWin / LePE). ``bias``: a
    module with Swin's relative position bias (``layers.add_relative_position_bias``),
    added to the attention logits. Returns (B, H, W, heads * d).
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
    if bias is not None:  # float mask: the bias, -inf where the boolean mask forbids
        rel = relative_position_bias(bias, (wh, ww))[None]  # (1, heads, L, L)
        mask = rel if mask is None else rel.masked_fill(~mask, float("-inf"))
    out = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
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
        rel_pos_bias: bool = False,
    ):
        super().__init__()
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
        self.rel_pos_bias = rel_pos_bias and mode == "window"
        if self.rel_pos_bias:  # Swin's window attention (mmcls WindowMSA, its key layout)
            add_relative_position_bias(self, window_size, num_heads)

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
            out = window_attention(qkv, window, shift, dropout_p=p, bias=self if self.rel_pos_bias else None)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))


def _dw_conv_tokens(conv: nn.Module, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Apply a conv (stack) to a (B, N, C) token sequence seen as a (B, C, H, W) map."""
    b, n, c = x.shape
    y = conv(x.reshape(b, *hw, c).permute(0, 3, 1, 2))  # a channels-last view: convs take it without a copy
    return y.permute(0, 2, 3, 1).reshape(b, n, c)


class LocalBlock(nn.Module):
    """Official ``LePEAttnSimpleDWBlock``: attention + FFN (pre-norm, residual), then a
    depth-wise 3x3 conv without bias and without residual. Without ``dw_conv`` it is the
    plain pre-norm ViT block of DeiT (``local_block: deit``, Table 6's ViT baselines)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mode: str,
        split_size: int,
        window_size: int,
        shift: bool,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
        rel_pos_bias: bool,
        dw_conv: bool,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = LocalAttention(dim, num_heads, mode, split_size, window_size, shift, qkv_bias, attn_drop, drop,
                                   rel_pos_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False) if dw_conv else None

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x if self.dw is None else _dw_conv_tokens(self.dw, x, hw)


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
        out = attention(q, k, v)
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

    def forward(self, groups: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``image`` tokens: unused (the mixer sees only the groups); every propagation layer takes both."""
        x = groups + self.drop_path(self.token_mlp(self.norm1(groups).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.channel_mlp(self.norm2(x)))


class GroupSelfAttention(nn.Module):
    """Table 9's "SelfAttn" propagation: a pre-norm transformer layer whose queries are the
    group tokens and whose keys / values are the group tokens and the image tokens, then an FFN.

    Why this design (the paper shows no code for it): Table 9 prices it at +0.5 GFLOPs over no
    propagation (5.7 -> 6.2; MLP-Mixer +0.1) at L1 (C = 216, N = 28 x 28 image tokens, M = 64,
    32, 32, 16 group tokens in the four GP blocks). A transformer layer on the group tokens alone
    costs 12 M C^2 + 2 M^2 C MACs per block, 0.08 G over the four blocks whatever its head count,
    so it cannot be the paper's layer (depth 1, as the official ``mlpmixer_depth``; six such
    layers would be needed). The official config keeps ``num_group_forward_heads=6``: a 6-head
    attention for the propagation. The cost has to come from the image tokens: taking keys and
    values from [groups; image tokens] adds 2 N C^2 per block (their projections) plus
    2 M (M + N) C for the attention; with the query / output projections and the FFN on the
    groups this is +0.42 G, the paper's +0.5 within the rounding of its two printed numbers.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_path: float):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.norm1 = nn.LayerNorm(dim)  # one pre-norm for the joint [groups; image tokens] sequence
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, groups: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        b, m, c = groups.shape
        heads = self.num_heads
        seq = self.norm1(torch.cat((groups, image), dim=1))
        q = self.q(seq[:, :m]).view(b, m, heads, c // heads).transpose(1, 2)
        k, v = self.kv(seq).view(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = groups + self.drop_path(self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, m, c))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Ungrouping(nn.Module):
    """Official ``FullAttnCatBlock``: image tokens attend to the groups; the result is
    concatenated with the image tokens (instead of a residual), projected 2C -> C,
    then a pre-norm FFN with residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
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
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        m, heads = groups.shape[1], self.num_heads
        g = self.norm_key(groups)
        q = self.q_proj(self.norm_query(x)).view(b, n, heads, c // heads).transpose(1, 2)
        k = self.k_proj(g).view(b, m, heads, c // heads).transpose(1, 2)
        v = self.v_proj(g).view(b, m, heads, c // heads).transpose(1, 2)
        out = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
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
        mlp_ratio: float,
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
            layers = [GroupSelfAttention(dim, propagation_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path)
                      for _ in range(propagation_depth)]
        else:  # none
            layers = []
        self.propagate = nn.ModuleList(layers)
        self.ungroup = Ungrouping(dim, num_ungroup_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path)
        self.dw = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        groups = self.group(x)
        for layer in self.propagate:
            groups = layer(groups, x)
        return _dw_conv_tokens(self.dw, self.ungroup(x, groups), hw)


# --------------------------------------------------------------------------- stem, pyramid, head
class ConvStem(nn.Module):
    """7x7/2 conv-BN-ReLU, ``num_convs`` 3x3 conv-BN-ReLU, then a (patch/2)x(patch/2) projection
    (official ``ConvPatchEmbed``; patch 8 -> 4x4/4).

    Beyond patch 8 the projection stays 4x4/4 and each further factor 2 is a 3x3/2
    conv-BN-ReLU before it (patch 16: one). DECISION for Table 6's ViT-D216-P16, which the
    paper builds with "patch size 16" and prices at 1.8 GFLOPs: this stem costs 0.28 G, the 12
    DeiT blocks at 14 x 14 tokens 1.52 G (1.80 G in all, 7.28M parameters with the pooling
    head; the paper lists 7.4M). The official stem with an 8x8/8 projection would also give
    1.8 G but 7.9M parameters (its projection alone has 0.9M).
    """

    def __init__(self, in_chans: int, stem_channels: int, num_convs: int, patch_size: int, dim: int):
        super().__init__()
        proj = min(patch_size // 2, 4)
        extra = (patch_size // 2 // proj).bit_length() - 1  # stride-2 convs before the projection
        if patch_size % 2 or proj * 2 ** (extra + 1) != patch_size:
            fail("patch_size", patch_size, "use an even size up to 8, or 8 times a power of two")

        def conv_bn_relu(cin, kernel, stride):
            return [nn.Conv2d(cin, stem_channels, kernel, stride, kernel // 2, bias=False),
                    nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)]

        layers = conv_bn_relu(in_chans, 7, 2)
        for stride in [1] * num_convs + [2] * extra:
            layers += conv_bn_relu(stem_channels, 3, stride)
        self.stem = nn.Sequential(*layers)
        self.strides = [2] + [2] * extra + [proj]  # what the grid of an input is divided by (ceil each time)
        self.proj_stride = proj
        self.proj = nn.Conv2d(stem_channels, dim, proj, proj)

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
    """GPViT trunk: conv stem to stride ``patch_size``, position embedding, ``depths``
    local / GP blocks at that one resolution, final LayerNorm (see the module docstring).
    One stage: ``depths``, ``window_sizes`` and ``mlp_ratios`` are one value (or a one-entry
    list), spelled as the multi-stage families spell them; configs stored by earlier versions
    call them ``num_layers``, ``window_size`` and ``ffn_ratio``.

    ``forward`` returns the maps of ``out_indices`` at ``out_strides``; ``forward_features``
    the final normed tokens (B, N, C) that the GroupNeck head reads. A trunk held by another
    backbone (the ViT-Adapter) is built with ``final_norm=False`` and no ``out_indices``, so it
    has no module it would not use.
    """

    convert_official = staticmethod(convert_official)
    to_official = staticmethod(to_official)
    official_container = "state_dict"  # mmcls checkpoints

    def __init__(
        self,
        img_size: int | list[int],
        in_chans: int,
        embed_dims: int,
        patch_size: int,
        stem_channels: int,
        num_convs: int,
        depths: int | list[int],
        num_heads: int,
        local_attn: str,
        local_block: str,
        split_size: int,
        window_sizes: int | list[int],
        rel_pos_bias: bool,
        mlp_ratios: float | list[float],
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
        pos_embed: str,
        interpolate_mode: str,
        out_indices: list[int] = (-1,),
        out_strides: list[int] = (8,),
        head_pool: str | None = None,
        neck_heads: int | None = None,
        final_norm: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self._check(locals())
        # one stage: the per-stage fields of the other families hold one value here
        (num_layers,), (window_size,), (mlp_ratio,) = (per_stage(v, 1) for v in (depths, window_sizes, mlp_ratios))
        out_indices = [i % num_layers for i in out_indices]
        img_size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
        self.embed_dims, self.patch_size, self.num_layers = embed_dims, patch_size, num_layers
        self.grad_checkpointing = grad_checkpointing
        self.interpolate_mode, self.head_pool, self.neck_heads = interpolate_mode, head_pool, neck_heads

        self.patch_embed = ConvStem(in_chans, stem_channels, num_convs, patch_size, embed_dims)
        # grid of the pretraining size, as the stem produces it (ceil at each stride)
        self.grid = tuple(functools.reduce(lambda g, s: math.ceil(g / s), self.patch_embed.strides, size)
                          for size in img_size)
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dims))
                          if pos_embed == "ape" else None)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]  # linspace, meta-safe
        tokens_at = dict(zip([i % num_layers for i in gp_layers], group_tokens))
        local = dict(dim=embed_dims, num_heads=num_heads, split_size=split_size, window_size=window_size,
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, norm_eps=norm_eps,
                     rel_pos_bias=rel_pos_bias, dw_conv=local_block == "gpvit")
        layers = []
        for i in range(num_layers):
            if i not in tokens_at or global_block == "none":
                layers.append(LocalBlock(mode=local_attn, shift=False, drop_path=dpr[i], **local))
            elif global_block == "gp":
                layers.append(GPBlock(embed_dims, tokens_at[i], num_group_heads, num_ungroup_heads, propagation,
                                      propagation_depth, propagation_heads, mixer_token_ratio, mixer_channel_ratio,
                                      mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i]))
            elif global_block == "conv":
                layers.append(ConvPropagationBlock(embed_dims, dpr[i]))
            elif global_block == "global_attn":
                layers.append(LocalBlock(mode="global", shift=False, drop_path=dpr[i], **local))
            else:  # shifted_window
                layers.append(LocalBlock(mode="window", shift=True, drop_path=dpr[i], **local))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps) if final_norm else None

        # dense outputs: own LayerNorm for intermediate layers (official norm{i}), resampling per stride
        self.out_indices = out_indices
        self.out_norms = nn.ModuleDict(
            {str(i): nn.LayerNorm(embed_dims, eps=norm_eps) for i in sorted(set(out_indices)) if i != num_layers - 1}
        )
        self.resample = nn.ModuleList(_resample(embed_dims, patch_size / s) for s in out_strides)
        self.strides = list(out_strides)
        self.out_channels = [embed_dims] * len(out_strides)

        if self.patch_embed.proj.weight.is_meta:  # built on the meta device to count: no values to initialise (slow)
            return
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, TokenGrouping):
                trunc_normal_(m.group_token, std=0.02)
        self.apply(functools.partial(init_vit_weights, convs=False))  # the official classifier config: convs keep torch's init

    @staticmethod
    def _check(a: dict) -> None:
        """The constructor's arguments ``a``, checked before anything is built."""
        for key in ("depths", "window_sizes", "mlp_ratios"):  # one stage
            if isinstance(a[key], (list, tuple)) and len(a[key]) != 1:
                fail(key, a[key], "GPViT has one stage: one value (or a one-entry list)")
        check_ints(embed_dims=a["embed_dims"], depths=a["depths"], num_heads=a["num_heads"], patch_size=a["patch_size"],
                   stem_channels=a["stem_channels"], split_size=a["split_size"], window_sizes=a["window_sizes"],
                   group_tokens=a["group_tokens"], num_group_heads=a["num_group_heads"], in_chans=a["in_chans"],
                   num_ungroup_heads=a["num_ungroup_heads"], propagation_heads=a["propagation_heads"],
                   img_size=a["img_size"], out_strides=a["out_strides"])
        check_ints(0, num_convs=a["num_convs"], propagation_depth=a["propagation_depth"])
        check_positive(mlp_ratios=a["mlp_ratios"], mixer_token_ratio=a["mixer_token_ratio"],
                       mixer_channel_ratio=a["mixer_channel_ratio"], norm_eps=a["norm_eps"])
        check_rates(drop_rate=a["drop_rate"], attn_drop_rate=a["attn_drop_rate"], drop_path_rate=a["drop_path_rate"])
        for key, options in (("local_attn", LOCAL_ATTNS), ("local_block", LOCAL_BLOCKS), ("global_block", GLOBAL_BLOCKS),
                             ("propagation", PROPAGATIONS), ("pos_embed", POS_EMBEDS),
                             ("interpolate_mode", ("bicubic", "bilinear", "nearest"))):
            check_choice(key, a[key], options)
        if a["head_pool"] is not None:  # None: a trunk that makes no classification head (the ViT-Adapter's)
            check_choice("head_pool", a["head_pool"], HEAD_POOLS)
            check_ints(neck_heads=a["neck_heads"])
        used = {"num_heads": True, "num_group_heads": a["global_block"] == "gp",
                "num_ungroup_heads": a["global_block"] == "gp", "neck_heads": a["head_pool"] == "group",
                "propagation_heads": a["global_block"] == "gp" and a["propagation"] == "self_attn"}
        for heads in (k for k, needed in used.items() if needed):
            check_divisible("embed_dims", a["embed_dims"], heads, a[heads])
        if a["local_attn"] == "lepe" and a["num_heads"] % 2:
            fail("num_heads", a["num_heads"], "must be even: LePE splits the heads between vertical and horizontal stripes")
        depth = per_stage(a["depths"], 1)[0]
        for key in ("gp_layers", "out_indices"):
            if not all(isinstance(i, int) and -depth <= i < depth for i in a[key]):
                fail(key, a[key], f"layer indices must be in [-{depth}, {depth - 1}] (backbone.depths={depth})")
        if len(a["gp_layers"]) != len(a["group_tokens"]):
            fail("group_tokens", a["group_tokens"], f"needs one entry per GP layer (backbone.gp_layers={show(a['gp_layers'])})")
        if len(a["out_indices"]) not in (1, len(a["out_strides"])) and a["out_strides"]:
            fail("out_indices", a["out_indices"], "one layer for all out_strides, or one layer per stride")
        if any(math.log2(s / a["patch_size"]) % 1 for s in a["out_strides"]):
            fail("out_strides", a["out_strides"], f"each must be backbone.patch_size={a['patch_size']} times a power of two")

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A position embedding of another ``img_size`` (a square grid) is resized to this model's
        grid with ``interpolate_mode``, as at run time; window bias tables of another window size
        as timm resizes them."""

        def resize(key, value, target):
            return resize_token_grid(value, self.grid, self.interpolate_mode)

        rules = {"pos_embed": (resize, self.interpolate_mode), **resize_relative_position_bias()}
        return adapt_shapes(self, state_dict, rules)

    def no_weight_decay(self) -> set[str]:
        # as the official recipe: position embedding, group tokens and window bias tables
        return {n for n, _ in self.named_parameters()
                if n.endswith(("pos_embed", "group_token", "relative_position_bias_table"))}

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(images)
        hw = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            x = x + resample_abs_pos_embed(self.pos_embed, list(hw), list(self.grid), num_prefix_tokens=0,
                                           interpolation=self.interpolate_mode, antialias=False)
        return self.pos_drop(x), hw

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Final normed tokens (B, N, C): what the GroupNeck reads."""
        x, hw = self._embed(images)
        for layer in self.layers:
            x = run_block(layer, x, hw, checkpointing=self.grad_checkpointing)
        return x if self.norm is None else self.norm(x)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, hw = self._embed(images)
        wanted = set(self.out_indices)
        maps: dict[int, torch.Tensor] = {}
        b = x.shape[0]
        for i, layer in enumerate(self.layers[: max(wanted) + 1]):
            x = run_block(layer, x, hw, checkpointing=self.grad_checkpointing)
            if i in wanted:
                y = self.norm(x) if i == self.num_layers - 1 else self.out_norms[str(i)](x)
                maps[i] = y.transpose(1, 2).reshape(b, -1, *hw)
        idx = self.out_indices * len(self.resample) if len(self.out_indices) == 1 else self.out_indices
        return [resample(maps[i]) for resample, i in zip(self.resample, idx)]

    def make_head(self, num_classes: int) -> nn.Module:
        if self.head_pool is None:
            raise ValueError("this GPViT trunk was built without a head (head_pool=None): set backbone.head_pool")
        return GPViTHead(self.embed_dims, num_classes, self.head_pool, self.neck_heads)


