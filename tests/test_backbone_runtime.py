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
