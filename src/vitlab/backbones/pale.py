"""Pale Transformer (Wu et al., AAAI 2022; seed 002): Pale-Shaped self-Attention backbones.

No official code or checkpoint was ever released, so the paper (Table 1, Eq. 1-8,
appendix) is the only reference. Every choice it leaves open is marked
``DECISION`` below, with the table number that supports it where one does.

Layout: blocks work on channels-last ``(B, H, W, C)`` maps (LayerNorm and the
linear layers want channels last; convs get a permuted view, no copy).

Attention modes (``attn_mode``, the rows of Tables 6/8); "group" always means a
set of tokens attending among themselves, formed by reshape/permute and
attended with one ``F.scaled_dot_product_attention`` call per branch (``layers.attention``):

* ``pale_parallel`` (default, Fig. 2c): channels and heads split in half; one half
  attends within row groups (s_r interlaced rows: rows g, g+N_r, ..., g+(s_r-1)N_r
  with N_r = H_pad / s_r), the other within column groups (s_c interlaced columns);
  outputs concatenated, then the projection.
* ``pale_sequential``: all heads on row groups in even blocks of a stage, all heads
  on column groups in odd blocks (DECISION: rows first, block index counted
  within each stage).
* ``pale_vanilla``: one attention over each whole pale, rows and columns together
  (see ``_vanilla_attention``).
* ``cross``: CSWin-style; like ``pale_parallel`` but the s rows (columns) of a group
  are contiguous stripes instead of interlaced. DECISION: stripe width = pale size
  (the ablation replaces only the attention of Pale-T, and 4.2G in Table 8 equals
  pale_parallel at size 7); the block keeps CPE (no LePE).
* ``axial``: like ``pale_parallel`` with s_r = s_c = 1 (one row / one column);
  ``pale_size`` is ignored. DECISION: split channels/heads rather than two
  sequential axial layers; Table 8's 3.8G equals pale size 1111 (Table 7).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, NormMlpClassifierHead, trunc_normal_
from torch import nn

from vitlab.backbones.arguments import (check_choice, check_divisible, check_ints, check_positive, check_rates,
                                        check_stages, fail, per_stage)
from vitlab.backbones.base import Backbone
from vitlab.backbones.layers import adapt_shapes, attention, init_vit_weights, resize_grid, run_block

ATTN_MODES = ("pale_parallel", "pale_sequential", "pale_vanilla", "cross", "axial")
SPLIT_MODES = ("pale_parallel", "cross", "axial")  # half the heads on rows, half on columns
POS_EMBEDS = ("none", "ape", "cpe")


def _pale_pair(s) -> tuple[int, int] | None:
    """A pale size entry: ``s`` (s_r = s_c = s, as in the paper) or ``[s_r, s_c]``; None unless positive ints."""
    pair = list(s) if isinstance(s, (list, tuple)) else [s, s]
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        return None
    return pair[0], pair[1]


def _to_groups(t: torch.Tensor, s: int, interlaced: bool, heads: int) -> torch.Tensor:
    """``(B, R, W, C) -> (B * R // s, heads, s * W, C // heads)``: groups of s rows.

    Interlaced (pale): group g holds rows g, g + N, ..., g + (s-1) N with N = R / s,
    i.e. row r = k * N + g. Otherwise (CSWin stripe): row r = g * s + k.
    Column groups are row groups of ``t.transpose(1, 2)``.
    """
    b, r, w, c = t.shape
    n = r // s
    if interlaced:
        t = t.reshape(b, s, n, w, heads, c // heads).permute(0, 2, 4, 1, 3, 5)
    else:
        t = t.reshape(b, n, s, w, heads, c // heads).permute(0, 1, 4, 2, 3, 5)
    return t.reshape(b * n, heads, s * w, c // heads)


def _from_groups(o: torch.Tensor, out: torch.Tensor, s: int, interlaced: bool) -> None:
    """Inverse of ``_to_groups``: write ``o`` into the ``(B, R, W, C)`` view ``out`` (one copy)."""
    b, r, w, _ = out.shape
    n, heads, hd = r // s, o.shape[1], o.shape[-1]
    o = o.view(b, n, heads, s, w, hd)
    if interlaced:
        out.view(b, s, n, w, heads, hd).copy_(o.permute(0, 3, 1, 4, 2, 5))
    else:
        out.view(b, n, s, w, heads, hd).copy_(o.permute(0, 1, 3, 4, 2, 5))


def _group_mask(valid: torch.Tensor | None, s: int, interlaced: bool, batch: int) -> torch.Tensor | None:
    """Key mask ``(B * N, 1, 1, L)`` (True = real token) for the groups of ``_to_groups``."""
    if valid is None:
        return None
    m = _to_groups(valid[None, :, :, None], s, interlaced, 1)  # (N, 1, L, 1)
    return m.transpose(-1, -2).repeat(batch, 1, 1, 1)


def _vanilla_index(n: int, s_r: int, s_c: int, hp: int, wp: int, device) -> torch.Tensor:
    """Flat indices ``(n, L)`` of the tokens of the n pales of an ``(n s_r, n s_c)`` map.

    Pale i = rows {i + k n} (all columns) plus columns {i + m n} outside those rows,
    so L = s_r wp + s_c hp - s_r s_c (the paper's pale size, each token once).
    """
    i = torch.arange(n, device=device)
    rows = i[:, None] + n * torch.arange(s_r, device=device)  # (n, s_r)
    row_part = (rows[:, :, None] * wp + torch.arange(wp, device=device)).flatten(1)
    j = torch.arange(n - 1, device=device)
    other = j[None, :] + (j[None, :] >= i[:, None]).long()  # row residues != i, (n, n-1)
    other_rows = (other[:, None, :] + n * torch.arange(s_r, device=device)[None, :, None]).flatten(1)
    cols = i[:, None] + n * torch.arange(s_c, device=device)  # (n, s_c)
    col_part = (other_rows[:, :, None] * wp + cols[:, None, :]).flatten(1)
    return torch.cat([row_part, col_part], dim=1)


class ConvProjection(nn.Module):
    """CvT's convolutional projection, which the paper's q / k / v follow (Eq. 2: separable
    convolutions "similar to CvT"): 3x3 depth-wise conv (no bias) -> BatchNorm -> point-wise
    conv (bias = ``qkv_bias``; CvT's linear projection after flattening), on an NCHW map.

    The BatchNorm is CvT's (Wu et al. 2021, Sec. 3.2 and its ``conv_proj_q/k/v``); its cost is
    an affine per element, which Eq. 5 (the two convs' 27 hwc) leaves out, like our counter.
    It sees the map the attention module pads (see ``PaleAttention.forward``): in training its
    batch statistics include the padded positions, as if the map were that size.
    """

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.bn(self.conv_dw(x)))


class PaleAttention(nn.Module):
    """PS-Attention (Eq. 1-3) and the ablation alternatives, on ``(B, H, W, C)`` maps.

    ``mode``: ``pale_parallel`` | ``cross`` | ``axial`` | ``pale_vanilla`` |
    ``pale_rows`` / ``pale_cols`` (the two block kinds of ``pale_sequential``).
    q, k, v: three ``ConvProjection`` (Eq. 2, "similar to CvT").
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        pale_size: tuple[int, int],
        mode: str,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
    ):
        super().__init__()
        self.split = mode in SPLIT_MODES
        self.dim, self.num_heads, self.mode = dim, num_heads, mode
        self.pale_size = (1, 1) if mode == "axial" else pale_size
        self.interlaced = mode != "cross"
        self.attn_drop = attn_drop
        self.q, self.k, self.v = (ConvProjection(dim, qkv_bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def padded_size(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(s_r, s_c, H_pad, W_pad)`` for an ``h x w`` map.

        DECISION: a pale size larger than the map is clamped to it (one group
        spans the axis; the same result as padding up to s with masked keys,
        for less work). DECISION: pad at the bottom/right only. The paper:
        "h % s_r = 0 and w % s_c = 0" for the parallel form; for the vanilla form
        h/s_r = w/s_c = N (the "excessive padding" of Table 8).
        """
        s_r, s_c = min(self.pale_size[0], h), min(self.pale_size[1], w)
        if self.mode == "pale_vanilla":
            n = max(math.ceil(h / s_r), math.ceil(w / s_c))
            return s_r, s_c, n * s_r, n * s_c
        hp = math.ceil(h / s_r) * s_r if self.mode != "pale_cols" else h
        wp = math.ceil(w / s_c) * s_c if self.mode != "pale_rows" else w
        return s_r, s_c, hp, wp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        s_r, s_c, hp, wp = self.padded_size(h, w)
        # DECISION: pad the (normed) input of the whole attention module, Swin-style,
        # so q/k/v convs also run on the padded map: this is how Table 7's FLOPs
        # behave (3333: 4.1G, 5555: 4.4G > 7777: 4.2G). Real tokens' q/k/v are the
        # same as without padding (the convs zero-pad anyway); padded tokens are
        # masked out as keys and dropped as queries, so the output is exactly the
        # attention over the real tokens of each region.
        valid = None
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
            valid = (torch.arange(hp, device=x.device) < h)[:, None] & (torch.arange(wp, device=x.device) < w)[None]
        xc = x.permute(0, 3, 1, 2)
        q, k, v = (m(xc).permute(0, 2, 3, 1) for m in (self.q, self.k, self.v))
        drop = self.attn_drop if self.training else 0.0

        if self.mode == "pale_vanilla":
            y = self._vanilla_attention(q, k, v, valid, s_r, s_c, drop)
        else:
            y = q.new_empty(b, hp, wp, c)
            if self.split:  # first half of channels/heads: rows; second half: columns
                half, heads = c // 2, self.num_heads // 2
                self._attend(q[..., :half], k[..., :half], v[..., :half], y[..., :half], valid, s_r, heads, drop)
                self._attend(*(t[..., half:].transpose(1, 2) for t in (q, k, v, y)),
                             None if valid is None else valid.t(), s_c, heads, drop)
            elif self.mode == "pale_rows":
                self._attend(q, k, v, y, valid, s_r, self.num_heads, drop)
            else:  # pale_cols
                self._attend(*(t.transpose(1, 2) for t in (q, k, v, y)),
                             None if valid is None else valid.t(), s_c, self.num_heads, drop)
        if valid is not None:
            y = y[:, :h, :w]
        return self.proj_drop(self.proj(y))

    def _attend(self, q, k, v, out, valid, s, heads, drop) -> None:
        """Row-group attention of ``(B, R, W, C')`` q/k/v into ``out`` (one SDPA call)."""
        qg, kg, vg = (_to_groups(t, s, self.interlaced, heads) for t in (q, k, v))
        mask = _group_mask(valid, s, self.interlaced, q.shape[0])
        o = attention(qg, kg, vg, attn_mask=mask, dropout_p=drop)
        _from_groups(o, out, s, self.interlaced)

    def _vanilla_attention(self, q, k, v, valid, s_r, s_c, drop) -> torch.Tensor:
        """Self-attention within each whole pale (all heads, all channels).

        DECISION (what "split into pales P_1..P_N, N = h/s_r = w/s_c" means): pale i
        is row group i plus column group i, so N pales cover the map and a token
        whose row group differs from its column group lies in two pales; its
        output is the mean of the two pales' outputs. This reading reproduces the
        appendix's costs: 5.4G at 224 (Table 8), and +1681G / +362G over
        pale_parallel on ADE20K / COCO, from padding both sides to N s (Table 8).
        Pales overlap, so they are gathered with an index (not a reshape) and
        scattered back with ``index_add_`` (one SDPA call for all pales).
        """
        b, hp, wp, c = q.shape
        n = hp // s_r
        idx = _vanilla_index(n, s_r, s_c, hp, wp, q.device)  # (n, L)
        length, heads = idx.shape[1], self.num_heads

        def gather(t):
            t = t.reshape(b, hp * wp, heads, c // heads)[:, idx]  # (B, n, L, heads, hd)
            return t.permute(0, 1, 3, 2, 4).reshape(b * n, heads, length, c // heads)

        mask = None if valid is None else valid.flatten()[idx][:, None, None, :].repeat(b, 1, 1, 1)
        o = attention(gather(q), gather(k), gather(v), attn_mask=mask, dropout_p=drop)
        o = o.view(b, n, heads, length, c // heads).permute(0, 1, 3, 2, 4).reshape(b, n * length, c)
        flat = idx.flatten()
        y = o.new_zeros(b, hp * wp, c).index_add_(1, flat, o)
        # Token (r, c) lies in pale r % n and pale c % n: one pale or two.
        r = torch.arange(hp, device=q.device)[:, None] % n
        count = 1.0 + (r != torch.arange(wp, device=q.device)[None, :] % n).to(o.dtype)
        return y.view(b, hp, wp, c) / count[:, :, None]


class PaleBlock(nn.Module):
    """Eq. 6-8: x + CPE(x); x + PS-Attention(LN(x)); x + MLP(LN(x)) (with drop path)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        pale_size: tuple[int, int],
        mode: str,
        cpe: bool,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
    ):
        super().__init__()
        # CPE = 3x3 depth-wise conv with bias (Chu et al.'s PEG), not under drop path (Eq. 6).
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = PaleAttention(dim, num_heads, pale_size, mode, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpe is not None:
            x = x + self.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Overlapping conv (7x7 stride 4 for stage 1, 3x3 stride 2 after) + LayerNorm.

    Hand-written because timm's ``PatchEmbed`` is non-overlapping (kernel = stride).
    Padding k // 2, so an ``h x w`` input gives ``ceil(h/s) x ceil(w/s)``.
    """

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW -> (B, H, W, C)
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PaleStage(nn.Module):
    def __init__(self, downsample: PatchMerging, pos_embed: nn.Parameter | None, blocks: list[PaleBlock]):
        super().__init__()
        self.downsample = downsample
        self.pos_embed = pos_embed
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
        x = self.downsample(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != x.shape[1:3]:
                # DECISION: bicubic resize of the APE grid to other input sizes.
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=x.shape[1:3], mode="bicubic",
                                    align_corners=False).permute(0, 2, 3, 1)
            x = x + pos
        for block in self.blocks:
            x = run_block(block, x, checkpointing=checkpointing)
        return x


class PaleTransformer(Backbone):
    """Pale Transformer backbone (Table 1). Configs: ``conf/backbone/pale_{t,s,b}.yaml``.

    Args:
        embed_dims, depths, num_heads: per stage (C_i, depth, H_i of Table 1).
        mlp_ratios: R_i, a float (every stage) or one per stage.
        pale_size: S_i; an int (all stages), or one entry per stage, each an int
            (s_r = s_c) or a pair ``[s_r, s_c]``.
        attn_mode: one of ``ATTN_MODES`` (Table 6/8).
        pos_embed: ``none`` | ``ape`` | ``cpe`` (Table 9). DECISION for ``ape``: one
            learned embedding per stage, added after its patch merging, sized for
            ``img_size`` (Table 9's dense-task params grow by 7-8M with APE, which
            per-stage grids at the dense input size give: 7.9M at 512x2048, 7.7M
            at 800x1280; a single stage-1 grid would give only 4.2M / 4.1M).
        img_size: the input size (``S`` or ``[H, W]``) the APE grids are made for.
        qkv_bias: bias of the point-wise convs of q, k, v.
        drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks
            (the paper's "maximal stochastic depth rate").
        head_drop_rate: dropout before the classifier.
        norm_eps: LayerNorm epsilon (DECISION: PyTorch's 1e-5, the paper is silent).
        in_chans: image channels.
        grad_checkpointing: recompute each block's activations in backward (saves memory).
    """

    strides = [4, 8, 16, 32]

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratios: float | Sequence[float] = 4.0,
        pale_size: int | Sequence = 7,
        attn_mode: str = "pale_parallel",
        pos_embed: str = "cpe",
        img_size: int | Sequence[int] = 224,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        head_drop_rate: float = 0.0,
        norm_eps: float = 1e-5,
        in_chans: int = 3,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        n = check_stages(embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios,
                         pale_size=pale_size)
        check_ints(embed_dims=embed_dims, depths=depths, num_heads=num_heads, img_size=img_size, in_chans=in_chans)
        check_positive(mlp_ratios=mlp_ratios, norm_eps=norm_eps)
        check_rates(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
                    head_drop_rate=head_drop_rate)
        check_choice("attn_mode", attn_mode, ATTN_MODES)
        check_choice("pos_embed", pos_embed, POS_EMBEDS)
        check_divisible("embed_dims", embed_dims, "num_heads", num_heads)
        if attn_mode in SPLIT_MODES and any(h % 2 for h in num_heads):
            fail("num_heads", num_heads, f"must be even: attn_mode={attn_mode} splits the heads between rows and columns")
        pale_sizes = [_pale_pair(s) for s in per_stage(pale_size, n)]
        if None in pale_sizes:
            fail("pale_size", pale_size, "must be a positive int s (s_r = s_c = s), or one entry per stage, "
                                         "each s or a pair [s_r, s_c] of positive ints")
        dims, heads = list(embed_dims), list(num_heads)
        mlp_ratios = per_stage(mlp_ratios, n)
        self.out_channels = dims
        self.strides = [4 * 2**i for i in range(n)]
        self.head_drop_rate, self.norm_eps = head_drop_rate, norm_eps
        self.grad_checkpointing = grad_checkpointing
        total = sum(depths)  # plain Python, so the model can be built on the meta device
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]

        img_size = per_stage(img_size, 2)  # [H, W]
        grid = [math.ceil(img_size[0] / 4), math.ceil(img_size[1] / 4)]
        stages, cur = [], 0
        for i in range(n):
            if i == 0:
                down = PatchMerging(in_chans, dims[0], 7, 4, norm_eps)
            else:
                down = PatchMerging(dims[i - 1], dims[i], 3, 2, norm_eps)
                grid = [math.ceil(g / 2) for g in grid]
            pos = nn.Parameter(torch.zeros(1, *grid, dims[i])) if pos_embed == "ape" else None
            blocks = []
            for j in range(depths[i]):
                mode = attn_mode
                if attn_mode == "pale_sequential":
                    mode = "pale_rows" if j % 2 == 0 else "pale_cols"
                blocks.append(PaleBlock(dims[i], heads[i], mlp_ratios[i], pale_sizes[i], mode, pos_embed == "cpe",
                                        qkv_bias, drop_rate, attn_drop_rate, dpr[cur + j], norm_eps))
            cur += depths[i]
            stages.append(PaleStage(down, pos, blocks))
        self.stages = nn.ModuleList(stages)
        self.apply(functools.partial(init_vit_weights, convs=False))  # DECISION: ViT init; convs keep PyTorch's
        for stage in self.stages:
            if stage.pos_embed is not None:
                trunc_normal_(stage.pos_embed, std=0.02)

    def _stages(self, x: torch.Tensor):
        for stage in self.stages:
            x = stage(x, self.grad_checkpointing)
            yield x.permute(0, 3, 1, 2)  # NCHW view of the channels-last map
            x = x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs, NCHW (channels-last memory), strides 4/8/16/32.

        DECISION: no extra per-stage norms for dense tasks (the paper names none);
        dense heads normalise on their own.
        """
        return list(self._stages(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage map (NCHW); the head pools and normalises it."""
        for out in self._stages(x):
            pass
        return out

    def make_head(self, num_classes: int) -> nn.Module:
        """Global average pool + LayerNorm + linear (timm's NormMlpClassifierHead)."""
        head = NormMlpClassifierHead(self.out_channels[-1], num_classes, pool_type="avg",
                                     drop_rate=self.head_drop_rate,
                                     norm_layer=functools.partial(LayerNorm2d, eps=self.norm_eps))
        trunc_normal_(head.fc.weight, std=0.02)
        nn.init.zeros_(head.fc.bias)
        return head

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """APE grids of another ``img_size`` are resized (bicubic, as at run time) to this model's."""

        def resize(key, value, target):
            return resize_grid(value, tuple(target.shape[1:3]), "bicubic")

        return adapt_shapes(self, state_dict, {"pos_embed": (resize, "bicubic")})

    @classmethod
    def to_official(cls, state_dict):
        raise ValueError("Pale Transformer: its authors released no code and no checkpoint, so there is no official "
                         "layout to write (and timm has no Pale model); share vitlab's own checkpoint, "
                         "--format mmdet (vitlab's key names under backbone.), or --format onnx / torchscript")

    to_timm = to_official

    def no_weight_decay(self) -> set[str]:
        return {f"stages.{i}.pos_embed" for i, s in enumerate(self.stages) if s.pos_embed is not None}
