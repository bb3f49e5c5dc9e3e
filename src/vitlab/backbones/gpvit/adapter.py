"""ViT-Adapter around a GPViT trunk: the paper's COCO backbone (GPViT Tables 3-4).

Official code: ChenhongyiYang/GPViT, ``downstream/mmdetection/mmdet/models/backbones/
gpvit_adapter.py`` (``GPViTAdapter`` / ``GPViTAdapterSingleStage``); checked against it
(tests/test_gpvit.py). The deformable attention is the pure-PyTorch form (``grid_sample``)
of Deformable DETR's op, as mmcv's CPU reference computes it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from vitlab.backbones.arguments import check_ints, check_positive, fail, per_stage
from vitlab.backbones.base import Backbone
from vitlab.backbones.gpvit.convert import convert_official_adapter, to_official_adapter
from vitlab.backbones.gpvit.trunk import GPViT, _dw_conv_tokens
from vitlab.backbones.layers import init_vit_weights, run_block

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


class GPViTAdapter(Backbone):
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

    The trunk is a ``GPViT`` held as ``self.trunk`` (every other keyword argument is its
    constructor's), built without final norm and dense outputs: the adapter makes the
    outputs. It is a dense backbone only, so it has no classification head.
    """

    convert_official = staticmethod(convert_official_adapter)
    to_official = staticmethod(to_official_adapter)
    official_container = "state_dict"  # mmdet checkpoints

    def __init__(
        self,
        *,
        out_strides: list[int],
        conv_inplane: int,
        n_points: int,
        deform_num_heads: int,
        init_values: float,
        interaction_indexes: list[list[int]],
        cffn_ratio: float,
        deform_ratio: float,
        extra_extractors: int,
        add_vit_feature: bool,
        **trunk,
    ):
        super().__init__()
        out_strides = list(out_strides)
        if out_strides not in ([4, 8, 16, 32], [8, 16, 32]):
            fail("out_strides", out_strides, "[4,8,16,32] (Mask R-CNN) or [8,16,32] (RetinaNet)")
        if trunk.get("patch_size") != 8:
            fail("patch_size", trunk.get("patch_size"), "the ViT-Adapter needs the stride-8 trunk (8)")
        depth = per_stage(trunk.get("depths", trunk.get("num_layers")), 1)[0]
        if not all(isinstance(i, int) and 0 <= i < depth for ix in interaction_indexes for i in ix):
            fail("interaction_indexes", interaction_indexes, f"trunk layers in [0, {depth - 1}]")
        check_ints(conv_inplane=conv_inplane, n_points=n_points, deform_num_heads=deform_num_heads)
        check_ints(0, extra_extractors=extra_extractors)
        check_positive(cffn_ratio=cffn_ratio, deform_ratio=deform_ratio)
        # official detection backbones run with final_norm=False; the adapter makes the dense outputs
        self.trunk = GPViT(**trunk, final_norm=False, out_indices=[], out_strides=[])
        dim = self.trunk.embed_dims
        self.strides, self.out_channels = out_strides, [dim] * len(out_strides)
        self.interaction_indexes = [list(ix) for ix in interaction_indexes]
        self.add_vit_feature = add_vit_feature
        out_c1 = 4 in out_strides
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        self.spm = SpatialPriorModule(conv_inplane, dim, out_c1)
        drop_path = trunk["drop_path_rate"]  # official: every adapter block gets the trunk's maximum rate
        self.interactions = nn.ModuleList(
            _Interaction(dim, deform_num_heads, n_points, deform_ratio, cffn_ratio, init_values, trunk["drop_rate"],
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
                part.apply(init_vit_weights)
        for m in self.interactions.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def no_weight_decay(self) -> set[str]:
        return {f"trunk.{n}" for n in self.trunk.no_weight_decay()} | {"level_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)  # the trunk's blocks (``grad_checkpointing`` is a trunk field)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The trunk's size-dependent tensors, adapted by the trunk."""
        trunk, messages = self.trunk.adapt_state_dict(
            {k.removeprefix("trunk."): v for k, v in state_dict.items() if k.startswith("trunk.")})
        rest = {k: v for k, v in state_dict.items() if not k.startswith("trunk.")}
        return {**rest, **{f"trunk.{k}": v for k, v in trunk.items()}}, [f"trunk.{m}" for m in messages]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h0, w0 = images.shape[-2:]
        pad_h, pad_w = (-h0) % 32, (-w0) % 32
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        c1, c2, c3, c4 = self.spm(images)
        c_shapes = [tuple(t.shape[-2:]) for t in (c2, c3, c4)]
        c = torch.cat([(t.flatten(2).transpose(1, 2) + self.level_embed[i]) for i, t in enumerate((c2, c3, c4))], 1)
        x, hw = self.trunk._embed(images)
        # reference points: trunk tokens look into the three c levels, c tokens into the trunk map
        ref_x = _reference_points([hw], images.device).expand(-1, -1, 3, -1)
        ref_c = _reference_points(c_shapes, images.device)
        for block, ix in zip(self.interactions, self.interaction_indexes):
            x = block.injector(x, ref_x, c, c_shapes)
            for layer in self.trunk.layers[ix[0] : ix[-1] + 1]:
                x = run_block(layer, x, hw, checkpointing=self.trunk.grad_checkpointing)
            for extractor in [block.extractor, *block.extra_extractors]:
                c = extractor(c, ref_c, x, hw, c_shapes)
        b, dim = x.shape[0], self.trunk.embed_dims
        maps = [t.transpose(1, 2).reshape(b, dim, *s) for t, s in zip(c.split([h * w for h, w in c_shapes], 1), c_shapes)]
        if self.up is not None:  # stride 4: conv features + the stride-8 tokens upsampled (before the trunk is added)
            maps = [self.up(maps[0]) + c1] + maps
        if self.add_vit_feature:  # the trunk map resized to every level
            x8 = x.transpose(1, 2).reshape(b, dim, *hw)
            maps = [m + (x8 if m.shape[-2:] == x8.shape[-2:] else
                         F.interpolate(x8, size=m.shape[-2:], mode="bilinear", align_corners=False)) for m in maps]
        return [norm(m)[..., : math.ceil(h0 / s), : math.ceil(w0 / s)]
                for norm, m, s in zip(self.ad_norms, maps, self.strides)]


