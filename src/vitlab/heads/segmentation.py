"""Semantic segmentation heads on our backbones' feature pyramids (mmsegmentation's designs).

* ``SemanticFPNHead``: Panoptic-FPN's semantic branch (Kirillov et al.): torchvision's
  FPN (256 ch, strides 4-32), each level brought to stride 4 by 3x3 conv-BN-ReLU
  (+2x bilinear up) stacks of 128 ch, summed, dropout 0.1, 1x1 classifier.
* ``UperNetHead``: UPerNet (Xiao et al.): pyramid pooling (1, 2, 3, 6) on the last
  level + FPN fusion, 512 ch. ``FCNHead`` is its auxiliary head on stage 3.
* ``SegFormerHead``: SegFormer's all-MLP decoder (Xie et al.), mmseg's variant
  (1x1 conv-BN-ReLU per level, as used by GPViT's mmseg configs).

Heads take the backbone's ``out_channels`` / ``strides`` and the list of feature maps,
read the maps listed in ``in_index`` (mmseg's convention: GPViT's official configs feed
four stride-8 maps, ``out_indices=[2,5,8,11]``), and return logits at the first read
map's stride (``Segmentor`` upsamples them to the input size).
Blocks are torchvision's ``Conv2dNormActivation``; nothing in torchvision or timm
provides these decoders themselves, so they are written here. ``norm``: BN (default) | SyncBN
(the official mmseg configs: batch statistics over all DDP processes) | GN | none.
Under mixed precision the logits are upsampled (and the task's loss computed) in float32.

Initialisation as mmseg 0.13: every conv-norm-ReLU block as mmcv's ``ConvModule`` initialises
itself (Kaiming normal, fan-out), the Semantic FPN's neck Xavier (mmseg's FPN), and only the
classifier (``conv_seg``) re-initialised by the decode head: normal(0.01), zero bias. The heads
initialise only their own modules: a ``backbone.pretrained`` load is untouched.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from vitlab.heads.norm import norm_layer


def check_index(in_index: list[int], strides: list[int], head: str) -> list[int]:
    """mmseg's ``in_index``: which of the backbone's outputs a head reads (any strides, even equal)."""
    in_index = list(in_index)
    if any(not 0 <= i < len(strides) for i in in_index):
        raise ValueError(
            f"{head}: in_index {in_index} but the backbone returns {len(strides)} maps (strides {list(strides)}); "
            f"GPViT returns one map unless backbone.out_indices / out_strides ask for four"
        )
    return in_index


def conv_bn_relu(cin: int, cout: int, k: int, norm: str = "BN", mmcv_init: bool = True) -> nn.Module:
    """conv-norm-ReLU initialised as mmcv's ``ConvModule``: Kaiming normal (fan-out, ReLU gain) weights,
    zero bias, norm weight 1 / bias 0 (PyTorch's default conv init, ``mmcv_init=False``: Kaiming uniform,
    a = sqrt(5))."""
    block = Conv2dNormActivation(cin, cout, k, norm_layer=norm_layer(norm, "module.head.norm"),
                                 activation_layer=nn.ReLU)
    if not mmcv_init:
        return block
    conv = block[0]
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return block


def up(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class _Head(nn.Module):
    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # mmseg's init of conv_seg
        nn.init.zeros_(self.classifier.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(x))


class SemanticFPNHead(_Head):
    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        in_index: list[int] = (0, 1, 2, 3),
        fpn_channels: int = 256,
        channels: int = 128,
        dropout: float = 0.1,
        norm: str = "BN",
    ):
        super().__init__(channels, num_classes, dropout)
        self.levels = check_index(in_index, strides, "Semantic FPN")
        in_strides = [strides[i] for i in self.levels]
        self.fpn = FeaturePyramidNetwork([in_channels[i] for i in self.levels], fpn_channels)
        for m in self.fpn.modules():  # Xavier for the FPN, as mmseg's FPN neck
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        base = in_strides[0]
        self.scale_heads = nn.ModuleList()
        for stride in in_strides:
            steps = max(1, int(math.log2(max(stride // base, 1))))  # 2x upsamplings to reach stride `base`
            layers = []
            for k in range(steps):
                layers.append(conv_bn_relu(fpn_channels if k == 0 else channels, channels, 3, norm))
                if stride != base:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.levels))).values())
        out = self.scale_heads[0](pyramid[0])
        for head, x in zip(self.scale_heads[1:], pyramid[1:]):
            out = out + up(head(x), out.shape[-2:])  # sizes can differ by rounding on odd inputs
        return self.classify(out)


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet): average-pool to each scale, 1x1 conv-BN-ReLU, upsample back."""

    def __init__(self, in_channels: int, channels: int, pool_scales: list[int], norm: str = "BN"):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1, norm)) for s in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [up(stage(x), x.shape[-2:]) for stage in self.stages]


class UperNetHead(_Head):
    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        in_index: list[int] = (0, 1, 2, 3),
        channels: int = 512,
        pool_scales: list[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        norm: str = "BN",
    ):
        super().__init__(channels, num_classes, dropout)
        self.levels = check_index(in_index, strides, "UperNet")
        chans = [in_channels[i] for i in self.levels]
        self.ppm = PPM(chans[-1], channels, pool_scales, norm)
        self.bottleneck = conv_bn_relu(chans[-1] + len(pool_scales) * channels, channels, 3, norm)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1, norm) for c in chans[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3, norm) for _ in chans[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(chans) * channels, channels, 3, norm)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        xs = [feats[i] for i in self.levels]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, xs[:-1])]
        laterals.append(self.bottleneck(torch.cat([xs[-1], *self.ppm(xs[-1])], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + up(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.classify(self.fpn_bottleneck(torch.cat([outs[0]] + [up(o, size) for o in outs[1:]], dim=1)))


class FCNHead(_Head):
    """Auxiliary head (mmseg FCNHead, 1 conv, no input concat) on one level: stage 3 (index 2) by default."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        in_index: int = 2,
        channels: int = 256,
        num_convs: int = 1,
        dropout: float = 0.1,
        norm: str = "BN",
    ):
        super().__init__(channels, num_classes, dropout)
        (self.level,) = check_index([in_index], strides, "FCN auxiliary head")
        cin = in_channels[self.level]
        self.convs = nn.Sequential(*(conv_bn_relu(cin if k == 0 else channels, channels, 3, norm)
                                     for k in range(num_convs)))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.convs(feats[self.level]))


class SegFormerHead(_Head):
    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        in_index: list[int] = (0, 1, 2, 3),
        channels: int = 256,
        dropout: float = 0.1,
        norm: str = "BN",
    ):
        super().__init__(channels, num_classes, dropout)
        self.levels = check_index(in_index, strides, "SegFormer head")
        self.mlps = nn.ModuleList(conv_bn_relu(in_channels[i], channels, 1, norm) for i in self.levels)
        self.fuse = conv_bn_relu(len(self.levels) * channels, channels, 1, norm)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        xs = [mlp(feats[i]) for mlp, i in zip(self.mlps, self.levels)]
        size = xs[0].shape[-2:]
        return self.classify(self.fuse(torch.cat([xs[0]] + [up(x, size) for x in xs[1:]], dim=1)))


class Segmentor(nn.Module):
    """Backbone + decode head (+ auxiliary head): logits at the input size, in float32 (bilinear,
    with the decode head's ``align_corners`` if it has one: mmseg's heads False, Trans2Seg True).

    Training returns ``(logits, aux_logits or None)``; evaluation returns logits. The heads' logits
    are cast to float32 before the upsampling (under autocast they come out in bf16/fp16, and
    autocast would upsample them in that dtype on GPU), so the loss is computed in float32 too.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, auxiliary_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head

    def forward(self, images: torch.Tensor):
        feats = self.backbone(images)
        size = images.shape[-2:]
        logits = up(self.decode_head(feats).float(), size, getattr(self.decode_head, "align_corners", False))
        if not self.training:
            return logits
        aux = up(self.auxiliary_head(feats).float(), size) if self.auxiliary_head is not None else None
        return logits, aux
