"""Optimiser and LR policy from the schedule config: param groups, LR scaling, per-step shapes."""
from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest

from vitlab.data.base import DatasetInfo
from vitlab.tasks.classification import ClassificationTask

BACKBONE = {"_target_": "vitlab.backbones.pvt.PyramidVisionTransformer", "img_size": 32, "patch_sizes": [4, 2, 2, 2],
            "embed_dims": [16, 32, 48, 64], "width_mult": 1.0, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
            "mlp_ratios": [2, 2, 2, 2], "sr_ratios": [8, 4, 2, 1], "overlap_patch_embed": False, "conv_ffn": False,
            "linear_sra": False, "sra_pool_size": 7, "pos_embed": True, "cls_token": True, "stage_norm": False,
            "qkv_bias": True, "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0, "norm_eps": 1e-6,
            "embed_norm_eps": 1e-5, "in_chans": 3, "pretrained": None}


def make_task(policy: dict, epochs=10, steps_per_epoch=100, batch=64, world=2):
    schedule = {"epochs": epochs, "max_steps": -1, "base_batch_size": 512, "scale_lr": True,
                "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]},
                "lr_policy": policy, "clip_grad": None}
    info = DatasetInfo(class_names=tuple(map(str, range(10))), input_size=(224, 224))
    task = ClassificationTask(BACKBONE, schedule, info, mixup=0, cutmix=0)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch), world_size=world, accumulate_grad_batches=1,
                              estimated_stepping_batches=epochs * steps_per_epoch, max_epochs=epochs)
    patcher = mock.patch.object(ClassificationTask, "trainer", new_callable=mock.PropertyMock, return_value=trainer)
    patcher.start()
    return task, patcher


def test_param_groups_exempt_norms_biases_pos_embeds_and_tokens():
    task, patcher = make_task({"name": "cosine", "warmup_epochs": 1})
    try:
        optimizer = task.configure_optimizers()["optimizer"]
    finally:
        patcher.stop()
    names = {id(p): n for n, p in task.model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"backbone.cls_token", "backbone.stages.0.pos_embed", "backbone.stages.0.blocks.0.norm1.weight"} <= by_decay[0.0]
    assert any(n.endswith("attn.q.bias") for n in by_decay[0.0])
    assert "head.weight" in by_decay[0.05] and any(n.endswith("attn.q.weight") for n in by_decay[0.05])
    # linear scaling rule: 1e-3 per 512 images, global batch 64 x 2
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 128 / 512)


def lrs(policy, steps):
    task, patcher = make_task(policy)
    try:
        cfg = task.configure_optimizers()
    finally:
        patcher.stop()
    scheduler, optimizer = cfg["lr_scheduler"]["scheduler"], cfg["optimizer"]
    out = []
    for step in steps:
        scheduler.step_update(num_updates=step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_cosine_with_linear_warmup_per_step():
    peak = 1e-3 * 128 / 512
    warm, mid, end = lrs({"name": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-6, "min_lr": 1e-5}, [50, 500, 999])
    assert warm == pytest.approx(1e-6 + (peak - 1e-6) * 50 / 100)  # linear over the 100 warm-up steps
    assert mid == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * 500 / 1000)))
    assert end == pytest.approx(1e-5, rel=0.05)


def test_multistep_and_poly():
    peak = 1e-3 * 128 / 512
    # x0.1 at epochs 8 and 9 (timm decides the exact boundary step: look a few steps either side)
    before, after_8, after_9 = lrs({"name": "multistep", "warmup_iters": 10, "milestones": [8, 9]}, [795, 805, 905])
    assert (before, after_8, after_9) == pytest.approx((peak, peak * 0.1, peak * 0.01))
    (half,) = lrs({"name": "poly", "power": 0.9, "warmup_iters": 0, "min_lr": 0.0}, [500])
    assert half == pytest.approx(peak * (1 - 500 / 1000) ** 0.9)
