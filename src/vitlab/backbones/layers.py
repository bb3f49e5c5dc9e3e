"""Pieces several backbone families share."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
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


# --------------------------------------------------------------------------- size-dependent weights
Resizer = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def adapt_shapes(
    model: nn.Module, state_dict: dict[str, torch.Tensor], resizers: dict[str, tuple[Resizer, str]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The loop behind every ``Backbone.adapt_state_dict``: each tensor whose last name is a key
    of ``resizers`` and whose shape differs from the model's goes through
    ``resizer(key, checkpoint_tensor, model_tensor)``; returns the new dict and one message per
    resized tensor (``how`` says the method). Other mismatches are left for the strict load to name."""
    own = model.state_dict()
    out, messages = dict(state_dict), []
    for key, value in state_dict.items():
        target, name = own.get(key), key.rsplit(".", 1)[-1]
        if name in resizers and target is not None and target.shape != value.shape:
            resize, how = resizers[name]
            out[key] = resize(key, value, target).to(value.dtype)
            messages.append(f"{key}: {tuple(value.shape)} -> {tuple(target.shape)} ({how})")
    return out, messages


def resize_grid(grid: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, H, W, C) -> (1, H', W', C), interpolated as the families do at run time (align_corners=False)."""
    return F.interpolate(grid.permute(0, 3, 1, 2).float(), size=size, mode=mode, align_corners=False).permute(0, 2, 3, 1)


def resize_token_grid(tokens: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(1, H*W, C) tokens of a square H x W grid (as checkpoints trained at 224 have) -> (1, H'*W', C)."""
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise ValueError(f"position embedding of {tokens.shape[1]} tokens is not a square grid; cannot resize it")
    return resize_grid(tokens.unflatten(1, (side, side)), size, mode).flatten(1, 2)
