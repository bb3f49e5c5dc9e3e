"""module.ema_decay: the EMA moves once per optimiser step (trainer.accumulate_grad_batches), in
every task, and validation runs the EMA copy."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from vitlab.api import backbone_config
from vitlab.data.base import DatasetInfo, ImageBatch, SegmentationBatch
from vitlab.tasks.classification import ClassificationTask
from vitlab.tasks.segmentation import SegmentationTask

TINY = ["depths=[1,1,1,1]", "embed_dims=[16,32,48,64]", "num_heads=[1,1,2,2]", "drop_path_rate=0.0"]
SCHEDULE = {"optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "epochs": None,
            "lr_policy": {"name": "cosine"}}
NUM_CLASSES = 4


def make_task(kind: str, decay: float | None):
    backbone = backbone_config("pvt_v2_b0", TINY)
    names = tuple(map(str, range(NUM_CLASSES)))
    if kind == "classification":
        return ClassificationTask(backbone, SCHEDULE, DatasetInfo(names, (32, 32)), mixup=0, cutmix=0,
                                  label_smoothing=0, ema_decay=decay)
    return SegmentationTask(backbone, SCHEDULE, DatasetInfo(names, (32, 32), ignore_index=255), num_vis_images=0,
                            head={"_target_": "vitlab.heads.segmentation.SemanticFPNHead", "fpn_channels": 16,
                                  "channels": 16}, ema_decay=decay)


def make_batch(kind: str, seed: int, train: bool = True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 32, 32, generator=g)
    skipped = torch.tensor(0)
    if kind == "classification":
        return ImageBatch(images, torch.randint(0, NUM_CLASSES, (2,), generator=g), skipped)
    labels = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    if not train:  # validation: one tensor per image
        images, labels = list(images), list(labels)
    return SegmentationBatch(images, labels, ["a", "b"], skipped)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("kind", ["classification", "segmentation"])
def test_ema_moves_once_per_optimiser_step_and_validation_runs_it(kind, tmp_path):
    k, steps, decay = 3, 4, 0.5
    task = make_task(kind, decay)
    start = params(task.model)
    after_batch: list[dict] = []  # the trained weights after every micro-batch, as training made them

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            after_batch.append(params(module.model))

    batches = DataLoader([make_batch(kind, i) for i in range(k * steps)], batch_size=None)
    trainer(tmp_path, max_steps=steps, accumulate_grad_batches=k, limit_val_batches=0,
            callbacks=[Record()]).fit(task, train_dataloaders=batches)
    assert len(after_batch) == k * steps
    stepped = [i for i in range(k * steps) if (i + 1) % k == 0]  # where the optimiser steps
    for i, weights in enumerate(after_batch):  # the weights move on those micro-batches only
        before = after_batch[i - 1] if i else start
        moved = any(not torch.equal(weights[n], before[n]) for n in weights)
        assert moved == (i in stepped), i

    def ema_over(indices):  # e <- d e + (1 - d) w, from the initial weights
        e = {n: v.double() for n, v in start.items()}
        for i in indices:
            e = {n: decay * e[n] + (1 - decay) * after_batch[i][n].double() for n in e}
        return e

    expected, per_micro_batch = ema_over(stepped), ema_over(range(k * steps))
    got = params(task.ema.module)
    worst = max(float((got[n].double() - expected[n]).abs().max()) for n in got)
    assert worst < 1e-5
    assert max(float((got[n].double() - per_micro_batch[n]).abs().max()) for n in got) > 100 * worst + 1e-4

    # validation (and so val/ metrics and best.ckpt) runs the EMA copy, not the trained weights
    calls = {"ema": 0, "model": 0}
    for name, model in (("ema", task.ema.module), ("model", task.model)):
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # the patch embedding
        first_conv.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    trainer(tmp_path).validate(task, dataloaders=DataLoader([make_batch(kind, 99, train=False)], batch_size=None),
                               verbose=False)
    assert calls["ema"] > 0 and calls["model"] == 0


def test_ema_decay_must_be_a_fraction():
    with pytest.raises(ValueError, match=r"module.ema_decay=1.5"):
        make_task("segmentation", 1.5)


def test_export_writes_the_weights_validation_ran():
    """With an EMA, validation (and so best.ckpt's choice) ran the EMA copy: export writes it, in
    every part and weight layout; without one, the trained weights."""
    from vitlab.tools.export import select_part, weights_in_layout

    task = make_task("classification", 0.5)
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(1.0)  # the trained weights move away from the EMA copy
    ema = task.ema.module
    assert select_part(task, "model") is ema
    assert select_part(task, "backbone") is ema.backbone
    got = weights_in_layout(task, "timm", "model")
    expected = type(ema.backbone).to_timm(ema.state_dict())
    assert got.keys() == expected.keys() and all(got[k].equal(expected[k]) for k in got)
    plain = make_task("classification", None)
    assert select_part(plain, "model") is plain.model
