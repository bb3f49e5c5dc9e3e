"""Pieces several backbone families share."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table
from torch import nn
from torch.utils.checkpoint import checkpoint


def init_vit_weights(m: nn.Module, convs: bool = True) -> None:
    """The initialisation PVT, ScalableViT and GPViT's official code share (use with ``.apply``).

    Linears: trunc-normal(0.02), zero bias; LayerNorms: 1 / 0. With ``convs``, convolutions
    (transposed ones too) get a fan-out normal whose fan-out is divided by the groups (timm's
    ``kaiming_normal_`` does not divide, so depth-wise convs would get a different std than the
    official code).
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif convs and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- attention
_REDUCED = (torch.bfloat16, torch.float16)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, scale=scale)``: the fused
    kernels everywhere except in bf16 / fp16 on the CPU (under autocast or not), where it is
    softmax(q k^T scale + mask) v written out as the official codes write it.

    Why written out there: torch's CPU kernels for reduced precision (the flash kernel, and the
    math fallback, which upcasts to fp32) are 1.6x (PVTv2 stage 1: 3136 queries, 49 keys) to
    9x (49 x 49 windows) slower forward + backward than two bf16 matmuls and a bf16 softmax,
    enough to make a whole PVTv2 / ScalableViT training step slower than the authors' code
    (python -m vitlab.tools.bench --precision bf16-mixed --reference ...). fp32 and GPUs keep SDPA,
    bit for bit. The boolean mask means what SDPA's means (True: may attend).
    """
    if q.device.type != "cpu" or _compute_dtype(q) not in _REDUCED:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ (k * scale).transpose(-2, -1)  # k: usually the shorter sequence (spatial reduction)
    if attn_mask is not None:
        logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else logits + attn_mask)
    weights = logits.softmax(-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return weights.to(v.dtype) @ v  # a float mask may have promoted the weights (no-op otherwise)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype SDPA would compute ``q``'s attention in on the CPU (autocast's, where it is on)."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype


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


# --------------------------------------------------------------------------- Swin's relative position bias
def add_relative_position_bias(module: nn.Module, window: int, num_heads: int) -> None:
    """Give a window-attention module Swin's relative position bias, in the key layout of
    mmcls' ``WindowMSA`` (the GPViT authors' codebase): a learned ``relative_position_bias_table``
    ((2 window - 1)^2, heads), trunc-normal(0.02) as Swin, and the ``relative_position_index``
    buffer (L, L) that picks each query-key pair's entry."""
    module.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
    module.register_buffer("relative_position_index", relative_position_index((window, window), window))
    if not module.relative_position_bias_table.is_meta:
        trunc_normal_(module.relative_position_bias_table, std=0.02)


def relative_position_index(window: tuple[int, int], table: int) -> torch.Tensor:
    """(L, L) index of every (query, key) pair of a row-major ``window`` into the bias table of a
    ``table`` x ``table`` window: (dy + table - 1) (2 table - 1) + dx + table - 1, Swin's index.
    A window smaller than the table's (a map smaller than one window) uses its middle part
    (timm's ``gen_relative_position_index`` only makes the index of the table's own window)."""
    ys, xs = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
    dy = ys.reshape(-1, 1) - ys.reshape(1, -1)
    dx = xs.reshape(-1, 1) - xs.reshape(1, -1)
    return (dy + table - 1) * (2 * table - 1) + dx + table - 1


def relative_position_bias(module: nn.Module, window: tuple[int, int]) -> torch.Tensor:
    """The (heads, L, L) bias of ``add_relative_position_bias`` for a window of ``window`` tokens."""
    table = module.relative_position_bias_table
    size = math.isqrt(table.shape[0]) // 2 + 1
    index = module.relative_position_index
    if window != (size, size):
        index = relative_position_index(window, size).to(table.device)
    length = window[0] * window[1]
    return table[index.reshape(-1)].view(length, length, -1).permute(2, 0, 1)


def resize_relative_position_bias() -> dict[str, tuple[Resizer, str]]:
    """``adapt_shapes`` rules for a checkpoint made with another window size: the bias table
    resized as timm resizes it, the index buffer this model's own."""
    def table(key, value, target):
        size = math.isqrt(target.shape[0]) // 2 + 1
        return resize_rel_pos_bias_table(value, (size, size), tuple(target.shape))

    def index(key, value, target):
        return target.clone()

    return {"relative_position_bias_table": (table, "timm resize_rel_pos_bias_table"),
            "relative_position_index": (index, "this window's index")}


def run_block(block: nn.Module, *args, checkpointing: bool) -> torch.Tensor:
    """``block(*args)``; with ``checkpointing`` (a backbone's ``grad_checkpointing``) and autograd on,
    its activations are recomputed in the backward pass instead of kept (activation checkpointing,
    ``torch.utils.checkpoint`` with use_reentrant=False, as timm's ``checkpoint``). The recomputation
    leaves BatchNorm statistics alone, so they are updated once per step, as without checkpointing."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _frozen_norm_statistics(block)))
    return block(*args)


@contextlib.contextmanager
def _frozen_norm_statistics(block: nn.Module):
    """BatchNorms of ``block`` update nothing inside (momentum 0, step count restored)."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, steps) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(steps)
