"""Parameter and FLOP counting with the papers' convention.

The papers (fvcore / mmcv counters) report multiply-adds (MACs) and call them
FLOPs. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 x MACs for matmuls
and convolutions, so we halve it. Attention matmuls count: the CPU fused SDPA
kernel is not in torch's table, so we register it with torch's own SDPA formula.
Norms, activations and softmax are not counted (fvcore does not count them either).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_gmacs(model: nn.Module, input_size: tuple[int, int], batch: int = 1) -> float:
    """GMACs of one forward pass of ``model`` on a ``batch x 3 x H x W`` input.

    Works for models on any device, including ``meta`` (no memory, no compute:
    the fast way to count big models; SDPA then decomposes into counted bmm's).
    A model with a ``flops_forward(images)`` (detectors: their post-processing is
    data-dependent) is counted through it.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(batch, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            getattr(model, "flops_forward", model)(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9 / batch
