"""Pieces several backbone families share."""
from __future__ import annotations

import math

from timm.layers import trunc_normal_
from torch import nn


def init_vit_weights(m: nn.Module, convs: bool = True) -> None:
    """The initialisation PVT, ScalableViT and GPViT's official code share (use with ``.apply``).

    Linears: trunc-normal(0.02), zero bias; LayerNorms: 1 / 0. With ``convs``, convolutions
    get a fan-out normal whose fan-out is divided by the groups (timm's ``kaiming_normal_``
    does not divide, so depth-wise convs would get a different std than the official code).
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif convs and isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
