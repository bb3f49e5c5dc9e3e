"""Every family under activation checkpointing and torch.compile (issue: performance on the path
users take): checkpointed training gives the plain run's gradients and BatchNorm statistics, and
each family's default variant compiles as one graph whose outputs equal eager mode's."""
from __future__ import annotations

import copy

import pytest
import torch

import vitlab
import vitlab.backbones.layers as layers
from vitlab.backbones.base import ImageClassifier

# Each family's default variant, shrunk for CPU test time where it is big (same code paths).
SHRUNK = {
    "pvt_v2_b0": ["depths=[1,1,1,1]"],
    "pvt_tiny": ["depths=[1,1,1,1]", "embed_dims=[16,32,40,64]"],
    "pale_t": ["depths=[1,1,2,1]", "embed_dims=[16,32,48,64]", "num_heads=[2,2,4,4]"],
    "gpvit_l1": ["embed_dims=48", "depths=4", "num_heads=4", "gp_layers=[1,3]", "group_tokens=[8,4]",
                 "num_group_heads=2", "num_ungroup_heads=2", "propagation_heads=2", "neck_heads=2"],
    "scalablevit_s": ["depths=[2,2,2,2]", "embed_dims=[16,32,32,64]", "num_heads=[1,2,2,4]", "head_hidden_dim=64"],
}
# What else checkpointing must cover: ablation blocks with BatchNorm / window bias, the adapter, timm's models.
CHECKPOINTING = {
    **SHRUNK,
    "gpvit_l1 self_attn+windows": ["embed_dims=48", "depths=4", "num_heads=4", "gp_layers=[1,3]", "group_tokens=[8,4]",
                                   "num_group_heads=2", "num_ungroup_heads=2", "propagation_heads=2", "neck_heads=2",
                                   "propagation=self_attn", "local_attn=window", "window_sizes=3"],
    "scalablevit_s swsa": [*SHRUNK["scalablevit_s"], "block_pattern=swsa_ssa"],
    "resnet18": [],
    "vit_small_p32": [],
}


def _build(key: str, extra=(), classes: int = 5) -> ImageClassifier:
    torch.manual_seed(0)
    return vitlab.create_model(key.split()[0], classes, overrides=[*CHECKPOINTING[key], "drop_path_rate=0.0", *extra])


@pytest.mark.parametrize("key", list(CHECKPOINTING))
def test_grad_checkpointing_gives_the_plain_gradients(key, monkeypatch):
    plain = _build(key).train()
    ckpt = _build(key, ["grad_checkpointing=true"]).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.backbone.grad_checkpointing
    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    x = torch.randn(2, 3, 64, 64)
    for model in (plain, ckpt):
        model(x).square().mean().backward()
    if key.startswith("vit_"):  # timm's own checkpointing (its ViT blocks have no BatchNorm)
        assert ckpt.backbone.body.grad_checkpointing
    else:  # ours: the backbone's blocks (a ResNet's stages) went through the checkpoint
        assert len(calls) == len([m for m in ckpt.backbone.modules() if m in calls]) >= 4
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers()):  # BatchNorm statistics: updated once
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_set_grad_checkpointing_reaches_the_adapter_trunk():
    backbone = vitlab.create_backbone("gpvit_l1_adapter", overrides=[
        "embed_dims=32", "depths=4", "num_heads=4", "gp_layers=[1,3]", "group_tokens=[8,4]", "num_group_heads=2",
        "num_ungroup_heads=2", "conv_inplane=8", "n_points=2", "deform_num_heads=2", "interaction_indexes=[[0,1],[2,3]]"])
    backbone.set_grad_checkpointing(True)
    assert backbone.trunk.grad_checkpointing


def _naive_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T scale + mask) v in float64, written out (the reference for ``layers.attention``)."""
    q, k, v = q.double(), k.double(), v.double()
    logits = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(-1) @ v


def _attention_inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 16, generator=gen) for n in (20, 7, 7))
    bool_mask = torch.rand(3, 1, 20, 7, generator=gen) > 0.3
    bool_mask[..., 0] = True  # every query sees a key
    float_mask = torch.randn(1, 2, 20, 7, generator=gen)
    return q, k, v, bool_mask, float_mask


def test_attention_is_sdpa_bit_for_bit_in_fp32():
    q, k, v, bool_mask, float_mask = _attention_inputs()
    for mask, scale in ((None, None), (bool_mask, None), (float_mask, 0.3)):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        assert torch.equal(layers.attention(q, k, v, attn_mask=mask, scale=scale), expected)


def test_attention_in_bf16_on_cpu_is_written_out_and_matches_float64(monkeypatch):
    """bf16 on the CPU (autocast, or bf16 tensors) takes the written-out path (torch's fused CPU
    kernels are several times slower there); it equals float64 attention within bf16 rounding."""
    def refuse(*args, **kwargs):
        raise AssertionError("SDPA called in bf16 on the CPU")

    q, k, v, bool_mask, float_mask = _attention_inputs()
    for mask, scale in ((None, None), (bool_mask, None), (float_mask, 0.3)):
        expected = _naive_attention(q, k, v, mask, scale)
        with monkeypatch.context() as m:
            m.setattr(layers.F, "scaled_dot_product_attention", refuse)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                under_autocast = layers.attention(q, k, v, attn_mask=mask, scale=scale)
            plain_bf16 = layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, scale=scale)
        for out in (under_autocast, plain_bf16):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", list(SHRUNK))
def test_bf16_autocast_training_step_tracks_fp32(name):
    """The bf16 path users train with (written-out attention on the CPU) gives fp32's logits and
    gradients up to bf16 rounding (cosine similarity: a wrong mask or scale would break it)."""
    model = _build(name, ["drop_path_rate=0.0"]).train()
    x = torch.randn(2, 3, 64, 96)
    outs, grads = [], []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        logits.float().square().mean().backward()
        outs.append(logits.float().flatten())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    cos = torch.nn.functional.cosine_similarity
    assert cos(outs[0], outs[1], dim=0) > 0.998
    assert cos(grads[0], grads[1], dim=0) > 0.98


@pytest.mark.parametrize("name", list(SHRUNK))
def test_default_variant_compiles_without_graph_breaks(name):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward graphs
    without a compiler, so the check is quick on CPU."""
    torch._dynamo.reset()
    model = _build(name).eval()
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
    # the training step too (dropout, drop path, BatchNorm updates on the traced path)
    train = torch.compile(_build(name, ["drop_path_rate=0.1"]).train(), fullgraph=True, backend="eager")
    train(x).mean().backward()
