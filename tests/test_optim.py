"""Optimiser and LR policy from the schedule config: param groups, LR scaling, per-step shapes."""
from __future__ import annotations

import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch import nn

from vitlab.data.base import DatasetInfo
from vitlab.tasks.base import VitlabTask
from vitlab.tasks.classification import ClassificationTask

BACKBONE = {"_target_": "vitlab.backbones.pvt.PyramidVisionTransformer", "img_size": 32, "patch_sizes": [4, 2, 2, 2],
            "embed_dims": [16, 32, 48, 64], "width_mult": 1.0, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
            "mlp_ratios": [2, 2, 2, 2], "sr_ratios": [8, 4, 2, 1], "overlap_patch_embed": False, "conv_ffn": False,
            "linear_sra": False, "sra_pool_size": 7, "pos_embed": "ape", "cls_token": True, "stage_norm": False,
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


# ---- schedule.optimizer.paramwise (mmengine's paramwise_cfg) ---------------------------
class Toy(nn.Module):
    """Names like an mmseg segmentor: backbone.*, decode_head.*; one position embedding."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.backbone.pos_embed = nn.Parameter(torch.zeros(1, 4, 2, 2))
        self.decode_head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))

    def no_weight_decay(self):
        return {"backbone.pos_embed"}


class ToyTask(VitlabTask):
    def __init__(self, schedule):
        super().__init__({}, schedule, DatasetInfo(class_names=("a", "b"), input_size=(8, 8)))
        self.model = Toy()


def toy_groups(paramwise, policy=None, lr=2e-4, wd=0.05):
    schedule = {"epochs": None, "max_steps": 100, "base_batch_size": 16, "scale_lr": True,
                "optimizer": {"name": "adamw", "lr": lr, "weight_decay": wd, "paramwise": paramwise},
                "lr_policy": policy or {"name": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0}}
    task = ToyTask(schedule)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=4), world_size=4, accumulate_grad_batches=1,
                              estimated_stepping_batches=100, max_epochs=None)
    with mock.patch.object(ToyTask, "trainer", new_callable=mock.PropertyMock, return_value=trainer):
        cfg = task.configure_optimizers()
    names = {id(p): n for n, p in task.model.named_parameters()}
    per_param = {names[id(p)]: (round(g["lr"], 12), round(g["weight_decay"], 12))
                 for g in cfg["optimizer"].param_groups for p in g["params"]}
    return per_param, cfg


def test_paramwise_custom_keys_follow_mmengine():
    # GPViT's SegFormer recipe in miniature: x10 lr on the head, no decay on norms, biases, position embeddings
    per_param, _ = toy_groups({"custom_keys": {"head": {"lr_mult": 10.0}, "pos_embed": {"decay_mult": 0.0}},
                               "norm_decay_mult": 0.0, "bias_decay_mult": 0.0})
    lr, wd = 2e-4, 0.05  # global batch 4 x 4 = the base 16: no scaling
    assert per_param == {
        "backbone.0.weight": (lr, wd), "backbone.0.bias": (lr, 0.0),           # bias_decay_mult
        "backbone.1.weight": (lr, 0.0), "backbone.1.bias": (lr, 0.0),          # norm_decay_mult (BatchNorm)
        "backbone.2.weight": (lr, wd), "backbone.2.bias": (lr, 0.0),
        "backbone.pos_embed": (lr, 0.0),                                       # its custom key
        # "head" matches: lr x10 and decay x1 for every head parameter, the norm's and biases too
        # (a matched key decides alone; mmengine's default decay_mult is 1)
        "decode_head.0.weight": (10 * lr, wd), "decode_head.0.bias": (10 * lr, wd),
        "decode_head.1.weight": (10 * lr, wd), "decode_head.1.bias": (10 * lr, wd),
        "decode_head.2.weight": (10 * lr, wd), "decode_head.2.bias": (10 * lr, wd),
    }


def test_paramwise_defaults_decay_everything_and_longest_key_wins():
    # mmdetection's default (paramwise with no keys): every parameter decays, 1-D ones and pos_embed too
    per_param, _ = toy_groups({"custom_keys": {}}, lr=1e-4, wd=0.1)
    assert set(per_param.values()) == {(1e-4, 0.1)}
    per_param, _ = toy_groups({"custom_keys": {"decode_head.2": {"lr_mult": 3.0, "decay_mult": 0.5},
                                               "head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}},
                               "norm_decay_mult": 0.5}, lr=1e-4, wd=0.1)
    assert per_param["decode_head.2.weight"] == (3e-4, 0.05)      # the longer key wins
    assert per_param["decode_head.1.bias"] == (1e-3, 0.1)         # matched: norm/bias rules do not apply
    assert per_param["backbone.1.weight"] == (1e-4, 0.05)         # BatchNorm not named *norm*: norm_decay_mult
    assert per_param["backbone.0.bias"] == (1e-4, 0.1)            # bias_decay_mult defaults to 1


def test_no_paramwise_keeps_timms_groups():
    per_param, _ = toy_groups(None)
    assert per_param["backbone.pos_embed"] == (2e-4, 0.0) and per_param["backbone.1.weight"] == (2e-4, 0.0)
    assert per_param["backbone.0.bias"] == (2e-4, 0.0) and per_param["backbone.0.weight"] == (2e-4, 0.05)


@pytest.mark.parametrize("policy", [
    {"name": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0},
    {"name": "multistep", "milestones": [50, 80], "gamma": 0.1, "warmup_iters": 10, "warmup_lr": 0.0},
])
def test_paramwise_groups_keep_their_ratio_through_the_schedule(policy):
    _, cfg = toy_groups({"custom_keys": {"head": {"lr_mult": 10.0}}}, policy=policy)
    optimizer, scheduler = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for step in (0, 5, 30, 70, 99):
        scheduler.step_update(num_updates=step)
        by_mult = {g["lr_mult"]: g["lr"] for g in optimizer.param_groups}
        assert by_mult[10.0] == pytest.approx(10 * by_mult[1.0], rel=1e-9, abs=1e-15)
    assert by_mult[1.0] < 2e-4  # the schedule did move


def test_paramwise_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"paramwise: unknown key\(s\) \['decay_mul'\]"):
        toy_groups({"decay_mul": 0.0})
    with pytest.raises(ValueError, match=r"custom_keys.head: unknown key\(s\) \['lr'\]"):
        toy_groups({"custom_keys": {"head": {"lr": 1.0}}})
