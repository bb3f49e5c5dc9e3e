"""ScalableViT (Yang et al., "ScalableViT: Rethinking the Context-oriented
Generalization of Vision Transformer", ECCV 2022; seed 004).

Four stages of conv patch embedding (7x7/4, then 3x3/2, each + LayerNorm) and
blocks that alternate two attentions:

* IWSA: window attention (window 7) plus the local interactive module (LIM), a
  depth-wise 3x3 conv over the re-assembled value map added to the attention
  output before the projection;
* SSA: q = Linear(C -> C r_c); k, v from the map reduced by a depth-wise conv
  (kernel = stride = sr) + 1x1 conv (C -> C r_c) + LayerNorm + GELU, then
  k = Linear(C r_c -> C r_c), v = Linear(C r_c -> C). Where sr = 1 it is plain
  attention with a fused kv.

A PEG (residual 3x3 depth-wise conv) follows the first block of each stage; a
final LayerNorm, global average pooling and the official two-layer head
(Linear(C4, 4096) - LayerNorm - GELU - Linear) classify.

Everything not in the paper is taken from the official code
(github.com/Yangr116/ScalableViT, image_classification/models/scalablevit.py),
whose checkpoints ``ScalableViT.convert_official`` maps onto this layout. Tokens travel
between layers as channels-last ``(B, H, W, C)`` maps so that linears, convs
(through a permuted, channels_last view) and window reshapes need no copies.

Decisions the paper / official code leave open (all only matter off the
official path, i.e. for ablations or inputs that are not multiples of 224):

* Padding. IWSA / WSA / SWSA zero-pad the normed map on the bottom/right to a
  multiple of the window (as Swin and Twins do for detection), attend without
  masking the padding, add the LIM output computed on the padded value map, and
  crop before the output projection. SSA zero-pads only the input of the
  reduction conv to a multiple of sr (queries never need padding), so every
  real pixel contributes to a reduced token. Patch embeddings need no padding
  (their convs produce ceil(H / stride) rows). The official code supports only
  inputs that are multiples of 224 and reproduces these numbers exactly there.
* Ablation attentions (Table 5a), chosen by ``block_pattern``: ``wsa`` is IWSA
  without any local module (no relative position bias either: the official
  IWSA has none); ``swsa`` is Swin's shifted-window attention (shift =
  window // 2, Swin's region mask and, with ``rel_pos_bias``, Swin's relative
  position bias: the paper names Swin's SWSA) with no local module; a single name means every
  block, two names joined by ``_`` mean even / odd blocks. Every SWSA block is
  shifted (the paper swaps IWSA for SWSA; there is no W/SW alternation, the SSA
  blocks between them already mix windows).
* Swin's rule is kept for SWSA: no shift where the map is no larger than one
  window in either direction (e.g. stage 4 at 224), as the shift would only cut
  the single window into masked regions.
* LEM (Table 5b / 7) is the same depth-wise conv as the LIM but applied to each
  window's value tokens separately (zero padding at every window border), the
  paper's "convolution limited in the discrete V_n". It is added at the same
  place as the LIM.
* Dense outputs: ``forward`` returns the four stage outputs, the last one after
  the final norm (so no parameter is idle in dense tasks); ``forward_features``
  is the mean of that normed map, exactly the official classification path.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from vitlab.backbones.arguments import (check_choice, check_divisible, check_ints, check_positive, check_rates,
                                        check_stages, fail, per_stage)
from vitlab.backbones.base import Backbone
from vitlab.backbones.layers import (adapt_shapes, add_relative_position_bias, attention, init_vit_weights,
                                     relative_position_bias, resize_relative_position_bias, run_block)

ATTENTIONS = ("iwsa", "wsa", "swsa", "ssa")
LOCAL_MODULES = ("none", "lem", "lim")
HEADS = ("two_layer", "linear")
POS_EMBEDS = ("peg", "none")


def parse_block_pattern(pattern: str) -> tuple[str, str]:
    """'iwsa_ssa' -> (even, odd) attention names; 'ssa' -> ('ssa', 'ssa')."""
    names = pattern.split("_") if isinstance(pattern, str) else []
    if len(names) == 1:
        names = names * 2
    if len(names) != 2 or any(n not in ATTENTIONS for n in names):
        fail("block_pattern", pattern, f"use one or two of {', '.join(ATTENTIONS)} joined by '_' (even_odd blocks)")
    return names[0], names[1]


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view; convs run on it as channels_last."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class ConvPatchEmbed(nn.Module):
    """Overlapping conv patch embedding (padding kernel // 2) + LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW -> NHWC
        return self.norm(_nhwc(self.proj(x)))


class PosConv(nn.Module):
    """PEG (Chu et al., CPVT): x + depth-wise conv(x)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _nhwc(self.proj(_nchw(x)))


def _shift_mask(hp: int, wp: int, ws: int, shift: int, device) -> torch.Tensor:
    """Swin's SW-MSA mask for a padded (hp, wp) map: (num_windows, ws*ws, ws*ws),
    True where query and key come from the same region before the cyclic shift."""
    def bands(n):  # row / column region index: [0, n-ws) -> 0, [n-ws, n-shift) -> 1, rest -> 2
        i = torch.arange(n, device=device)
        return (i >= n - ws).long() + (i >= n - shift).long()

    label = bands(hp)[:, None] * 3 + bands(wp)[None, :]
    label = label.view(hp // ws, ws, wp // ws, ws).transpose(1, 2).reshape(-1, ws * ws)
    return label[:, :, None] == label[:, None, :]


class WindowAttention(nn.Module):
    """IWSA (with ``local_module`` 'lim' or 'lem'), WSA ('none') and SWSA
    (``shift_size`` > 0) over non-overlapping ws x ws windows. ``rel_pos_bias`` adds Swin's
    relative position bias (mmcls ``WindowMSA`` key layout)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, qkv_bias: bool,
                 local_module: str, local_kernel: int, attn_drop: float, proj_drop: float,
                 rel_pos_bias: bool = False):
        super().__init__()
        if local_module != "none" and shift_size:
            raise ValueError("a local module is only defined for unshifted windows (IWSA)")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.local_module = local_module
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.local_conv = (None if local_module == "none" else
                           nn.Conv2d(dim, dim, local_kernel, 1, local_kernel // 2, groups=dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.rel_pos_bias = rel_pos_bias
        if rel_pos_bias:
            add_relative_position_bias(self, window_size, num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, nh = self.window_size, self.num_heads
        hd = C // nh
        pad_h, pad_w = -H % ws, -W % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        hg, wg = Hp // ws, Wp // ws
        shift = self.shift_size if min(H, W) > ws else 0
        if shift:
            x = torch.roll(x, (-shift, -shift), dims=(1, 2))

        qkv = self.qkv(x)  # (B, Hp, Wp, 3C), channel = (q|k|v, head, head_dim)
        # one permute forms the windows: (3, B * windows, heads, ws*ws, head_dim)
        win = (qkv.view(B, hg, ws, wg, ws, 3, nh, hd).permute(5, 0, 1, 3, 6, 2, 4, 7)
               .reshape(3, B * hg * wg, nh, ws * ws, hd))
        q, k, v = win.unbind(0)
        mask = None
        if shift:
            mask = _shift_mask(Hp, Wp, ws, shift, x.device)
            mask = mask[None, :, None].expand(B, -1, 1, -1, -1).reshape(B * hg * wg, 1, ws * ws, ws * ws)
        if self.rel_pos_bias:  # float mask: the bias, -inf across Swin's regions
            bias = relative_position_bias(self, (ws, ws))[None]
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        if self.local_module == "lem":  # conv inside each window: (B*nW, C, ws, ws)
            lem = self.local_conv(v.transpose(-1, -2).reshape(-1, C, ws, ws))
            out = out + lem.view(-1, nh, hd, ws * ws).transpose(-1, -2)
        # windows back to the map: (B, hg, ws, wg, ws, heads, head_dim) -> (B, Hp, Wp, C)
        out = out.view(B, hg, wg, nh, ws, ws, hd).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, Hp, Wp, C)
        if self.local_module == "lim":  # conv over the re-assembled value map
            out = out + _nhwc(self.local_conv(_nchw(qkv[..., 2 * C:])))
        if shift:
            out = torch.roll(out, (shift, shift), dims=(1, 2))
        if pad_h or pad_w:
            out = out[:, :H, :W]
        return self.proj_drop(self.proj(out))


class ScalableSelfAttention(nn.Module):
    """SSA: spatial reduction sr (r_n = 1 / sr^2) and channel scale r_c."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, c_ratio: float, qkv_bias: bool,
                 attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        # official: C' = int(C r_c) and scale = (C / heads * r_c)^-0.5, also where
        # sr = 1 (there q, k keep C channels, so r_c only changes the scale)
        self.scale = (dim / num_heads * c_ratio) ** -0.5
        if sr_ratio > 1:
            c_new = int(dim * c_ratio)
            self.q = nn.Linear(dim, c_new, bias=qkv_bias)
            self.sr_dw = nn.Conv2d(dim, dim, sr_ratio, sr_ratio, groups=dim)
            self.sr_pw = nn.Conv2d(dim, c_new, 1)
            self.sr_norm = nn.LayerNorm(c_new)  # official: default eps (1e-5) here
            self.act = nn.GELU()
            self.k = nn.Linear(c_new, c_new, bias=qkv_bias)
            self.v = nn.Linear(c_new, dim, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh, sr = self.num_heads, self.sr_ratio
        q = self.q(x).view(B, H * W, nh, -1).transpose(1, 2)
        if sr > 1:
            r = _nchw(x)
            if H % sr or W % sr:
                r = F.pad(r, (0, -W % sr, 0, -H % sr))
            r = self.sr_pw(self.sr_dw(r))  # (B, C', H/sr, W/sr), channels_last
            r = self.act(self.sr_norm(_nhwc(r).flatten(1, 2)))
            k = self.k(r).view(B, r.shape[1], nh, -1).transpose(1, 2)
            v = self.v(r).view(B, r.shape[1], nh, -1).transpose(1, 2)
        else:
            k, v = self.kv(x).view(B, H * W, 2, nh, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, scale=self.scale,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, H, W, C)))


class ScalableViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, attention: str, mlp_ratio: float, qkv_bias: bool,
                 window_size: int, sr_ratio: int, c_ratio: float, local_module: str, local_kernel: int,
                 drop: float, attn_drop: float, drop_path: float, norm_eps: float, rel_pos_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if attention == "ssa":
            self.attn = ScalableSelfAttention(dim, num_heads, sr_ratio, c_ratio, qkv_bias, attn_drop, drop)
        else:
            self.attn = WindowAttention(
                dim, num_heads, window_size, window_size // 2 if attention == "swsa" else 0, qkv_bias,
                local_module if attention == "iwsa" else "none", local_kernel, attn_drop, drop,
                rel_pos_bias=rel_pos_bias and attention == "swsa")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ScalableViTStage(nn.Module):
    def __init__(self, embed: ConvPatchEmbed, blocks: list[ScalableViTBlock], peg: PosConv | None,
                 drop_rate: float):
        super().__init__()
        self.embed = embed
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(blocks)
        self.peg = peg

    def forward(self, x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:  # NCHW in, NHWC out
        x = self.pos_drop(self.embed(x))
        for i, blk in enumerate(self.blocks):
            x = run_block(blk, x, checkpointing=checkpointing)
            if i == 0 and self.peg is not None:
                x = self.peg(x)
        return x


_OFFICIAL_RENAMES = [
    (r"^patch_embeds\.(\d+)\.", r"backbone.stages.\1.embed."),
    (r"^pos_block\.(\d+)\.proj\.0\.", r"backbone.stages.\1.peg.proj."),
    (r"^stages\.(\d+)\.(\d+)\.", r"backbone.stages.\1.blocks.\2."),
    (r"\.attn\.lim_func\.", ".attn.local_conv."),
    (r"\.attn\.reduction\.0\.", ".attn.sr_dw."),
    (r"\.attn\.reduction\.1\.", ".attn.sr_pw."),
    (r"\.attn\.norm_act\.0\.", ".attn.sr_norm."),
    (r"^norm\.", "backbone.norm."),
]

# ours -> official: the inverse of _OFFICIAL_RENAMES (each applied in turn)
_TO_OFFICIAL_RENAMES = [
    (r"^backbone\.stages\.(\d+)\.embed\.", r"patch_embeds.\1."),
    (r"^backbone\.stages\.(\d+)\.peg\.proj\.", r"pos_block.\1.proj.0."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.attn\.local_conv\.", ".attn.lim_func."),
    (r"\.attn\.sr_dw\.", ".attn.reduction.0."),
    (r"\.attn\.sr_pw\.", ".attn.reduction.1."),
    (r"\.attn\.sr_norm\.", ".attn.norm_act.0."),
    (r"^backbone\.norm\.", "norm."),
]


class ScalableViT(Backbone):
    """ScalableViT backbone; every argument is a field of conf/backbone/scalablevit_*.yaml.

    ``pos_embed``: ``peg`` puts a PEG after each stage's first block (official), ``none`` drops
    it (Table 5b); stored configs of earlier versions have ``peg: true|false`` instead.
    ``mlp_ratios`` and ``window_sizes`` take one value for every stage or one per stage.
    ``rel_pos_bias``: Swin's relative position bias in SWSA blocks (the paper's Swin SWSA);
    IWSA / WSA never have one (the official IWSA has none, and WSA is IWSA without its LIM).
    """

    def __init__(
        self,
        in_chans: int,
        embed_dims: list[int],
        depths: list[int],
        num_heads: list[int],
        mlp_ratios: float | list[float],
        patch_sizes: list[int],
        patch_kernels: list[int],
        window_sizes: int | list[int],
        rel_pos_bias: bool,
        sr_ratios: list[int],
        c_ratios: list[float],
        qkv_bias: bool,
        block_pattern: str,
        local_module: str,
        local_kernel: int,
        pos_embed: str,
        peg_kernel: int,
        norm_eps: float,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        head: str,
        head_hidden_dim: int,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        n_stages = check_stages(embed_dims=embed_dims, depths=depths, num_heads=num_heads, mlp_ratios=mlp_ratios,
                                patch_sizes=patch_sizes, patch_kernels=patch_kernels, window_sizes=window_sizes,
                                sr_ratios=sr_ratios, c_ratios=c_ratios)
        check_ints(embed_dims=embed_dims, depths=depths, num_heads=num_heads, patch_sizes=patch_sizes,
                   patch_kernels=patch_kernels, window_sizes=window_sizes, sr_ratios=sr_ratios, in_chans=in_chans,
                   local_kernel=local_kernel, peg_kernel=peg_kernel, head_hidden_dim=head_hidden_dim)
        check_positive(mlp_ratios=mlp_ratios, c_ratios=c_ratios, norm_eps=norm_eps)
        check_rates(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        check_choice("head", head, HEADS)
        check_choice("pos_embed", pos_embed, POS_EMBEDS)
        check_choice("local_module", local_module, LOCAL_MODULES)
        check_divisible("embed_dims", embed_dims, "num_heads", num_heads)
        even, odd = parse_block_pattern(block_pattern)
        mlp_ratios, window_sizes, c_ratios = (per_stage(v, n_stages) for v in (mlp_ratios, window_sizes, c_ratios))
        for c, h, sr, rc in zip(embed_dims, num_heads, sr_ratios, c_ratios):
            if sr > 1 and "ssa" in (even, odd) and int(c * rc) % h:  # SSA's reduced width C r_c over the heads
                fail("c_ratios", c_ratios, f"int({c} x {rc}) = {int(c * rc)} channels do not split over {h} heads")
        self.head_type = head
        self.grad_checkpointing = grad_checkpointing
        self.head_hidden_dim = head_hidden_dim
        self.norm_eps = norm_eps
        self.out_channels = list(embed_dims)
        self.strides = [int(math.prod(patch_sizes[: i + 1])) for i in range(len(depths))]
        # the official linear stochastic-depth rule (torch.linspace), in plain Python so
        # that the model can be built on the meta device
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages, cur = [], 0
        for s, depth in enumerate(depths):
            dim = embed_dims[s]
            blocks = [
                ScalableViTBlock(dim, num_heads[s], odd if i % 2 else even, mlp_ratios[s], qkv_bias,
                                 window_sizes[s], sr_ratios[s], c_ratios[s], local_module, local_kernel,
                                 drop_rate, attn_drop_rate, dpr[cur + i], norm_eps, rel_pos_bias)
                for i in range(depth)
            ]
            embed = ConvPatchEmbed(in_chans if s == 0 else embed_dims[s - 1], dim, patch_kernels[s],
                                   patch_sizes[s], norm_eps)
            stages.append(ScalableViTStage(embed, blocks, PosConv(dim, peg_kernel) if pos_embed == "peg" else None, drop_rate))
            cur += depth
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps)
        self.apply(init_vit_weights)

    def _forward_nhwc(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x, self.grad_checkpointing)
            outs.append(x)
            x = _nchw(x)
        outs[-1] = self.norm(outs[-1])
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [_nchw(o) for o in self._forward_nhwc(x)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # the official path: final norm, then global average pooling
        return self._forward_nhwc(x)[-1].mean((1, 2))

    def make_head(self, num_classes: int) -> nn.Module:
        dim = self.out_channels[-1]
        if self.head_type == "linear":
            head = nn.Linear(dim, num_classes)
        else:  # official: Linear - LayerNorm - GELU - Linear (keys head.0/1/3)
            head = nn.Sequential(
                nn.Linear(dim, self.head_hidden_dim),
                nn.LayerNorm(self.head_hidden_dim, eps=self.norm_eps),
                nn.GELU(),
                nn.Linear(self.head_hidden_dim, num_classes),
            )
        head.apply(init_vit_weights)
        return head

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if ".peg." in n or n.endswith("relative_position_bias_table")}

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """SWSA bias tables of another window size, resized as timm resizes them."""
        return adapt_shapes(self, state_dict, resize_relative_position_bias())

    @staticmethod
    def convert_official(state_dict: dict) -> dict:
        """Official release (Yangr116/ScalableViT, a plain state dict or {'model': ...})
        -> this project's ``backbone.*`` / ``head.*`` layout. The head keys
        (head.0/1/3, or head.weight/bias for the plain head) are already ours."""
        if "model" in state_dict and isinstance(state_dict["model"], dict):
            state_dict = state_dict["model"]
        return _renamed(state_dict, _OFFICIAL_RENAMES)

    official_container = "model"  # DeiT-style release files

    @classmethod
    def to_official(cls, state_dict: dict) -> dict:
        """``backbone.*`` + ``head.*`` -> Yangr116/ScalableViT's layout (the head's keys are the same)."""
        return _renamed(state_dict, _TO_OFFICIAL_RENAMES)


def _renamed(state_dict: dict, renames) -> dict:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
