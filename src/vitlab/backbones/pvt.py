"""Pyramid Vision Transformer v1 (Wang et al., ICCV 2021) and PVTv2 (Wang et al., CVMJ 2022).

One implementation; what separates v1 from v2 are constructor switches, so the
PVTv2 component ablation (v1 -> +OPE -> +CFFN -> +LSRA) is a set of overrides.
Official code: github.com/whai362/PVT, classification/pvt.py and pvt_v2.py;
``PyramidVisionTransformer.convert_official`` maps its released state dicts onto our layout.

* ``overlap_patch_embed``: v1 patchifies with a conv of kernel = stride = S; v2
  uses kernel 2S-1 with padding S-1 ("overlapping patch embedding").
* ``conv_ffn``: v2 puts a 3x3 depth-wise conv between fc1 and GELU.
* ``linear_sra``: "-Li" models take keys/values from an adaptive average pool to
  ``sra_pool_size`` x ``sra_pool_size``, 1x1 conv, LayerNorm, GELU -- in every
  stage, whatever its SR ratio (official code). As in the official code this
  mode also puts a ReLU after fc1 in the FFN. Otherwise keys/values come from a
  conv with kernel = stride = R_i + LayerNorm (none where R_i = 1).
* ``pos_embed``: ``ape`` is v1's learned absolute position embedding per stage on
  the grid of ``img_size``, bilinearly resized for other inputs (as the official v1
  code); ``none`` is v2's (the conv FFN gives position). Stored configs of earlier
  versions have a bool here (true = ``ape``).
* ``cls_token``: v1 prepends a class token in the last stage and the head reads
  it; otherwise the head reads the mean of the last stage's tokens (v2).
* ``stage_norm``: v2 ends every stage with a LayerNorm (part of the dense
  outputs); v1 has one LayerNorm after the last stage that only the head reads.

Decisions the papers leave open, taken from the official code:

* Norm epsilons: blocks and stage/final norms use ``norm_eps`` (1e-6);
  patch-embedding and SRA-reduction norms ``embed_norm_eps`` (nn.LayerNorm's 1e-5).
* Dense outputs (``forward``) of v1 follow the official detection backbone: no
  class token and no final norm. Dense tasks drop ``cls_token``, ``cls_pos_embed``
  and ``norm`` (``prune_for_dense``), as the official mmdet backbone has none.
* Weight init is PVTv2's everywhere (v1 left convs at PyTorch's default init).
* ``width_mult`` (PVT Table 9, PVT-Small-Wide): the paper does not say how C_i x 1.4
  is rounded. We round C_i * width_mult / heads_i to an integer and multiply back,
  so heads always divide the width: x1.4 on [64,128,320,512] gives [90,180,450,720]
  (every head dim 64 -> 90).

Tokens travel as (B, N, C); spatial ops see them as NCHW views with channels-last
strides (no copies). The dense outputs are such views. The image itself is not made channels-last
(the first patch embedding's tokens are copied once by its LayerNorm instead, as in the official
code): that extra copy of the input moved where later tensors are allocated, and stage 1's GELU
ran 2-4x slower under bf16 (torch.profiler, best of several rounds, against the authors' code). Attention is
``F.scaled_dot_product_attention`` (through ``layers.attention``: written out for bf16 on the CPU).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from vitlab.backbones.arguments import (check_choice, check_divisible, check_ints, check_positive, check_rates,
                                        check_stages, fail, per_stage)
from vitlab.backbones.base import Backbone
from vitlab.backbones.layers import adapt_shapes, attention, init_vit_weights, resize_token_grid, run_block

__all__ = ["PyramidVisionTransformer"]

POS_EMBEDS = ("ape", "none")


def _to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W) as a view (channels-last strides, no copy)."""
    return x.transpose(1, 2).unflatten(2, hw)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a view when the map is channels-last in memory."""
    return x.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Conv patchify + LayerNorm. timm's PatchEmbed has no overlapping (2S-1, pad S-1) form."""

    def __init__(self, in_chans: int, dim: int, stride: int, overlap: bool, eps: float):
        super().__init__()
        kernel, padding = (2 * stride - 1, stride - 1) if overlap else (stride, 0)
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return self.norm(_to_tokens(x)), (x.shape[2], x.shape[3])


class SpatialReduction(nn.Module):
    """What keys/values are computed from: (B, C, H, W) map -> (B, n, C) reduced tokens.

    SRA: conv with kernel = stride = ``sr_ratio``, LayerNorm.
    Linear SRA (``pool_size`` given): adaptive average pool, 1x1 conv, LayerNorm, GELU.
    """

    def __init__(self, dim: int, sr_ratio: int, pool_size: int | None, eps: float):
        super().__init__()
        linear = pool_size is not None
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if linear else nn.Identity()
        kernel = 1 if linear else sr_ratio
        self.conv = nn.Conv2d(dim, dim, kernel, stride=kernel)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.act = nn.GELU() if linear else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(_to_tokens(self.conv(self.pool(x)))))


class SRAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced map."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        linear_sra: bool,
        sra_pool_size: int,
        qkv_bias: bool,
        attn_drop: float,
        proj_drop: float,
        eps: float,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        if linear_sra:
            self.sr = SpatialReduction(dim, sr_ratio, sra_pool_size, eps)
        elif sr_ratio > 1:
            self.sr = SpatialReduction(dim, sr_ratio, None, eps)
        else:
            self.sr = None
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, heads, N, d), a view
        src = x if self.sr is None else self.sr(_to_map(x, hw))
        k, v = self.kv(src).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).flatten(2)))


class FeedForward(nn.Module):
    """fc1 [-> ReLU] [-> 3x3 depth-wise conv] -> GELU -> fc2.

    timm's Mlp has no slot for a depth-wise conv between fc1 and the activation,
    so this one class covers the v1 MLP and the v2 convolutional FFN.
    """

    def __init__(self, dim: int, hidden: int, conv: bool, relu: bool, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU() if relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if conv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        if self.dwconv is not None:
            x = _to_tokens(self.dwconv(_to_map(x, hw)))
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        conv_ffn: bool,
        linear_sra: bool,
        sra_pool_size: int,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
        norm_eps: float,
        embed_norm_eps: float,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SRAttention(
            dim, num_heads, sr_ratio, linear_sra, sra_pool_size, qkv_bias, attn_drop, drop, embed_norm_eps
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        # hidden = int(dim * mlp_ratio) as the official code; its "-Li" FFN has the extra ReLU
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), conv=conv_ffn, relu=linear_sra, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), hw))
        return x + self.drop_path2(self.mlp(self.norm2(x), hw))


class Stage(nn.Module):
    """Patch embedding [+ position embedding] -> blocks [-> LayerNorm]; NCHW in, tokens out."""

    def __init__(
        self,
        *,
        in_chans: int,
        dim: int,
        depth: int,
        stride: int,
        pos_grid: tuple[int, int] | None,
        overlap_patch_embed: bool,
        stage_norm: bool,
        drop_rate: float,
        drop_path: list[float],
        norm_eps: float,
        embed_norm_eps: float,
        **block_kwargs,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, stride, overlap_patch_embed, embed_norm_eps)
        self.pos_grid = pos_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid[0] * pos_grid[1], dim)) if pos_grid else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            Block(dim, drop=drop_rate, drop_path=drop_path[j], norm_eps=norm_eps, embed_norm_eps=embed_norm_eps,
                  **block_kwargs)
            for j in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if stage_norm else nn.Identity()

    def position_embedding(self, hw: tuple[int, int]) -> torch.Tensor:
        if hw == self.pos_grid:
            return self.pos_embed
        # as official PVT v1: bilinear (align_corners=False) from the img_size grid
        pos = F.interpolate(_to_map(self.pos_embed, self.pos_grid), size=hw, mode="bilinear", align_corners=False)
        return _to_tokens(pos)

    def forward(self, x: torch.Tensor, prefix: torch.Tensor | None = None, checkpointing: bool = False):
        """NCHW in; ``(tokens (B, [1 +] H*W, C), (H, W))`` out, ``prefix`` tokens (the cls token) first."""
        x, hw = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.position_embedding(hw)
        if prefix is not None:
            x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = run_block(block, x, hw, checkpointing=checkpointing)
        return self.norm(x), hw


def _stage(m: re.Match) -> str:
    return f"backbone.stages.{int(m[1]) - 1}"


# official key (1-based stage numbers) -> ours; the first matching rule wins
_OFFICIAL_RULES = [
    (r"^patch_embed(\d+)\.", lambda m: f"{_stage(m)}.patch_embed."),
    (r"^pos_embed(\d+)$", lambda m: f"{_stage(m)}.pos_embed"),
    (r"^block(\d+)\.(\d+)\.attn\.sr\.", lambda m: f"{_stage(m)}.blocks.{m[2]}.attn.sr.conv."),
    (r"^block(\d+)\.(\d+)\.attn\.norm\.", lambda m: f"{_stage(m)}.blocks.{m[2]}.attn.sr.norm."),
    (r"^block(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.", lambda m: f"{_stage(m)}.blocks.{m[2]}.mlp.dwconv."),
    (r"^block(\d+)\.(\d+)\.", lambda m: f"{_stage(m)}.blocks.{m[2]}."),
    (r"^norm(\d+)\.", lambda m: f"{_stage(m)}.norm."),
    (r"^(norm\.|cls_token$)", lambda m: f"backbone.{m[1]}"),
]


# ours -> official: the inverse of _OFFICIAL_RULES (first match wins)
_TO_OFFICIAL_RULES = [
    (r"^backbone\.stages\.(\d+)\.patch_embed\.", lambda m: f"patch_embed{int(m[1]) + 1}."),
    (r"^backbone\.stages\.(\d+)\.pos_embed$", lambda m: f"pos_embed{int(m[1]) + 1}"),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.sr\.conv\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.sr."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.sr\.norm\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.attn.norm."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}.mlp.dwconv.dwconv."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (r"^backbone\.stages\.(\d+)\.norm\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"^backbone\.(norm\.|cls_token$)", lambda m: m[1]),
]
# official (whai362/PVT pvt_v2.py) -> timm's pvt_v2 (the inverse of timm's checkpoint_filter_fn)
_OFFICIAL_TO_TIMM_RULES = [
    (r"^patch_embed1\.", lambda m: "patch_embed."),
    (r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (r"^block(\d+)\.(\d+)\.(.*)mlp\.dwconv\.dwconv\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}mlp.dwconv."),
    (r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
]


def rename_keys(state_dict: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Each key through the first (pattern, replacement) rule that matches; keys no rule knows pass through."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in rules:
            key, hits = re.subn(pattern, repl, key)
            if hits:
                break
        out[key] = value
    return out


class PyramidVisionTransformer(Backbone):
    """PVT v1 / PVTv2 (see the module docstring for every switch)."""

    def __init__(
        self,
        *,
        in_chans: int,
        img_size: int,
        patch_sizes: list[int],
        embed_dims: list[int],
        width_mult: float,
        depths: list[int],
        num_heads: list[int],
        mlp_ratios: float | list[float],
        sr_ratios: list[int],
        overlap_patch_embed: bool,
        conv_ffn: bool,
        linear_sra: bool,
        sra_pool_size: int,
        pos_embed: str,
        cls_token: bool,
        stage_norm: bool,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        norm_eps: float,
        embed_norm_eps: float,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        n = check_stages(embed_dims=embed_dims, depths=depths, num_heads=num_heads, patch_sizes=patch_sizes,
                         mlp_ratios=mlp_ratios, sr_ratios=sr_ratios)
        check_ints(embed_dims=embed_dims, depths=depths, num_heads=num_heads, patch_sizes=patch_sizes,
                   sr_ratios=sr_ratios, sra_pool_size=sra_pool_size, img_size=img_size, in_chans=in_chans)
        check_positive(mlp_ratios=mlp_ratios, width_mult=width_mult, norm_eps=norm_eps, embed_norm_eps=embed_norm_eps)
        check_rates(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        check_divisible("embed_dims", embed_dims, "num_heads", num_heads)
        check_choice("pos_embed", pos_embed, POS_EMBEDS)
        mlp_ratios = per_stage(mlp_ratios, n)
        if cls_token and (conv_ffn or linear_sra or sr_ratios[-1] > 1):
            # the class token is not on the grid the depth-wise conv / spatial reduction work on;
            # the official code never combines them (v1's last stage: SR ratio 1, plain MLP)
            fail("cls_token", cls_token, "needs conv_ffn=false, linear_sra=false and sr_ratios[-1]=1 (as PVT v1)")
        dims = [h * round(c * width_mult / h) for c, h in zip(embed_dims, num_heads)]  # see docstring
        self.grad_checkpointing = grad_checkpointing

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth decay
        self.stages = nn.ModuleList()
        grid, stride, prev = (img_size, img_size), 1, in_chans
        self.strides = []
        for i in range(n):
            s = patch_sizes[i]
            # the grid the patch-embedding conv makes of an img_size input (the position embedding's size)
            grid = tuple(-(-g // s) if overlap_patch_embed else g // s for g in grid)
            stride *= s
            self.strides.append(stride)
            self.stages.append(Stage(
                in_chans=prev, dim=dims[i], depth=depths[i], stride=s, pos_grid=grid if pos_embed == "ape" else None,
                overlap_patch_embed=overlap_patch_embed, stage_norm=stage_norm, drop_rate=drop_rate,
                drop_path=dpr[sum(depths[:i]):], norm_eps=norm_eps, embed_norm_eps=embed_norm_eps,
                num_heads=num_heads[i], mlp_ratio=mlp_ratios[i], sr_ratio=sr_ratios[i], conv_ffn=conv_ffn,
                linear_sra=linear_sra, sra_pool_size=sra_pool_size, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
            ))
            prev = dims[i]
        self.out_channels = dims
        # v1 classification path: a final LayerNorm and the class token with its position slot
        self.norm = None if stage_norm else nn.LayerNorm(dims[-1], eps=norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[-1])) if cls_token else None
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, dims[-1])) if cls_token and pos_embed == "ape" else None
        self.apply(init_vit_weights)
        for name, p in self.named_parameters():
            if name.endswith(("pos_embed", "cls_token")):
                trunc_normal_(p, std=0.02)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outs, x = [], images
        for stage in self.stages:
            tokens, hw = stage(x, checkpointing=self.grad_checkpointing)
            x = _to_map(tokens, hw)
            outs.append(x)
        return outs

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The vector the linear head reads: the class token (v1) or the mean token (v2)."""
        x, last = images, len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            prefix = None
            if i == last and self.cls_token is not None:
                prefix = self.cls_token if self.cls_pos_embed is None else self.cls_token + self.cls_pos_embed
            tokens, hw = stage(x, prefix, self.grad_checkpointing)
            if i < last:
                x = _to_map(tokens, hw)
        if self.norm is not None:
            tokens = self.norm(tokens)
        return tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)

    def make_head(self, num_classes: int) -> nn.Module:
        head = nn.Linear(self.out_channels[-1], num_classes)
        init_vit_weights(head)
        return head

    def drop_classification_parts(self) -> None:
        # v1's class token, its position slot and the final norm serve the classifier only
        self.cls_token = self.cls_pos_embed = self.norm = None

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """v1's per-stage position embeddings (square grids of the checkpoint's img_size) are
        resized bilinearly to this model's grids, as the official v1 code resizes them at run time."""

        def resize(key, value, target):
            return resize_token_grid(value, self.stages[int(key.split(".")[1])].pos_grid, "bilinear")

        return adapt_shapes(self, state_dict, {"pos_embed": (resize, "bilinear")})

    def no_weight_decay(self) -> set[str]:
        # Position embeddings and the class token, as DeiT and PVTv2's code list them (the v1
        # code exempted only cls_token; its comment: "has pos_embed may be better").
        return {n for n, _ in self.named_parameters() if n.endswith(("pos_embed", "cls_token"))}

    @staticmethod
    def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """whai362/PVT classification state dict (v1 or v2) -> ``backbone.*`` + ``head.*``.

        v1's last ``pos_embed{n}`` starts with the class token's slot: it becomes
        ``backbone.cls_pos_embed``. Keys no rule knows pass through, so a strict load names them.
        """
        state_dict = dict(state_dict)
        pos_keys = [k for k in state_dict if re.fullmatch(r"pos_embed\d+", k)]
        last_pos = max(pos_keys, key=lambda k: int(k[len("pos_embed"):]), default=None)
        cls_pos = None
        if last_pos is not None and "cls_token" in state_dict:
            cls_pos, state_dict[last_pos] = state_dict[last_pos][:, :1], state_dict[last_pos][:, 1:]
        out = rename_keys(state_dict, _OFFICIAL_RULES)
        if cls_pos is not None:
            out["backbone.cls_pos_embed"] = cls_pos
        return out

    @classmethod
    def to_official(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``backbone.*`` + ``head.*`` -> whai362/PVT's layout (v1 ``pvt.py`` / v2 ``pvt_v2.py``):
        v1's ``cls_pos_embed`` goes back in front of the last stage's position embedding."""
        state_dict = dict(state_dict)
        cls_pos = state_dict.pop("backbone.cls_pos_embed", None)
        out = rename_keys(state_dict, _TO_OFFICIAL_RULES)
        if cls_pos is not None:
            last = max((k for k in out if re.fullmatch(r"pos_embed\d+", k)), key=lambda k: int(k[len("pos_embed"):]))
            out[last] = torch.cat([cls_pos, out[last]], dim=1)
        return out

    def timm_architecture(self, config: dict) -> tuple[str, dict]:
        """timm's ``pvt_v2_b0`` with this model's widths, depths, heads and ratios (``linear``: -Li)."""
        if self.cls_token is not None or self.stages[0].pos_embed is not None:
            raise ValueError("timm has PVTv2 only; this is a PVT v1 model")
        return "pvt_v2_b0", {"depths": list(config["depths"]), "embed_dims": list(self.out_channels),
                             "num_heads": list(config["num_heads"]), "mlp_ratios": config["mlp_ratios"],
                             "sr_ratios": list(config["sr_ratios"]), "linear": bool(config["linear_sra"])}

    @classmethod
    def to_timm(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``backbone.*`` + ``head.*`` -> timm's ``pvt_v2_*`` layout (PVTv2 only: timm has no PVT v1)."""
        official = cls.to_official(state_dict)
        if any(re.fullmatch(r"pos_embed\d+|cls_token|norm\..*", k) for k in official):
            raise ValueError("--format timm: timm has PVTv2 only (pvt_v2_b0..b5, b2_li); this is a PVT v1 model "
                             "(position embeddings / class token); use --format official")
        return rename_keys(official, _OFFICIAL_TO_TIMM_RULES)
