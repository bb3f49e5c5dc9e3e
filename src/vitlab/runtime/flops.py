"""Parameter and FLOP counting with the papers' convention.

The papers (fvcore / mmcv counters) report multiply-adds (MACs) and call them
FLOPs. ``torch.utils.flop_counter.FlopCounterMode`` counts 2 x MACs for matmuls
and convolutions, so we halve it. Attention matmuls count: the CPU fused SDPA
kernel is not in torch's table, so we register it with torch's own SDPA formula.
Norms, activations and softmax are not counted (fvcore does not count them either).

mmcv's counter (``get_model_complexity_info``, behind mmdet's and mmseg's ``get_flops``)
hooks modules instead: it sees convolutions and ``nn.Linear`` layers but not functional
matmuls, so the attention maps (``q @ k^T``, ``attn @ v``: batched matmuls and SDPA) are
missing from numbers counted with it. ``count_gmacs(..., attention=False)`` counts that way.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class _FastMeta(TorchDispatchMode):
    """Shapes of norms, softmax, linear layers, resizes and pointwise ops on the meta device, without
    torch's Python meta kernels (``torch._refs`` and ``torch._meta_registrations``: 0.1 to 14 ms a
    call, most of a count's time). The output dtype of a pointwise op comes from the same op on 0-d CPU
    tensors, the shape from broadcasting, the layout from the first input (TensorIterator weighs every
    input; the layout can differ, and with it whether a linear layer runs as addmm or mm + add, never
    the MACs); in-place ops return their input. Anything else, and any call with keyword arguments,
    goes to torch. tests/test_zoo.py checks both ways agree."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if kwargs:
            return func(*args, **kwargs)
        if func is aten.native_layer_norm.default:
            x, normalized = args[0], args[1]
            stats = x.shape[: x.dim() - len(normalized)] + (1,) * len(normalized)
            return torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)
        if func is aten._native_batch_norm_legit_no_training.default:  # (out, running mean, running var)
            return torch.empty_like(args[0]), torch.empty_like(args[3]), torch.empty_like(args[4])
        if func is aten._safe_softmax.default and len(args) == 2:
            return torch.empty_like(args[0])
        if func is aten.addmm.default and args[1].dim() == 2 and args[2].dim() == 2:
            return args[1].new_empty((args[1].shape[0], args[2].shape[1]))
        if func is aten.upsample_bilinear2d.default:
            return args[0].new_empty((*args[0].shape[:2], *args[1]))
        if func is aten.grid_sampler_2d.default:
            return args[0].new_empty((*args[0].shape[:2], *args[1].shape[1:3]))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if torch.Tag.pointwise in func.tags and tensors and all(t.is_meta for t in tensors):
            if func._schema.is_mutable:
                return args[0]
            probe = func(*(torch.zeros((), dtype=a.dtype) if isinstance(a, torch.Tensor) else a for a in args))
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
            if tensors[0].shape == shape:
                return torch.empty_like(tensors[0], dtype=probe.dtype)
            return torch.empty(shape, dtype=probe.dtype, device="meta")
        return func(*args)


def is_attention_op(op) -> bool:
    """Batched matmuls and fused attention kernels: the attention maps, which mmcv's counter misses."""
    name = str(op)
    return "bmm" in name or "attention" in name


def gmacs_by_op(model: nn.Module, input_size: tuple[int, int], batch: int = 1, fast: bool = True) -> dict[str, float]:
    """GMACs per aten op (``"aten.convolution"``, ``"aten.bmm"``, ...) of one forward pass of ``model``
    on a ``batch x 3 x H x W`` input, per image.

    A model with a ``flops_forward(images)`` is counted through it (detectors: their
    post-processing is data-dependent; ``flops_forward`` runs what mmdetection counts, see
    ``vitlab.heads.detection``). Works for models on any device, including ``meta`` (no memory,
    no compute: the fast way to count big models; SDPA then decomposes into counted bmm's).
    ``fast=False`` keeps torch's own meta kernels for every op (see ``_FastMeta``).
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(batch, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _FastMeta() if fast and x.is_meta else contextlib.nullcontext():
            with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
                getattr(model, "flops_forward", model)(x)
    finally:
        model.train(was_training)
    return {str(op): flops / 2 / 1e9 / batch for op, flops in counter.get_flop_counts()["Global"].items()}


def count_gmacs(model: nn.Module, input_size: tuple[int, int], batch: int = 1, attention: bool = True) -> float:
    """GMACs of one forward pass (see ``gmacs_by_op``); ``attention=False`` leaves out the
    attention matmuls, as mmcv's module-hook counter does."""
    return sum(g for op, g in gmacs_by_op(model, input_size, batch).items() if attention or not is_attention_op(op))
