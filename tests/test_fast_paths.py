"""The CUDA fast paths, checked on the CPU: no host-device synchronisation on the training hot path
(counted in real training runs of each task), each fast path's switch, and equal numerics where a
fast path changes the arithmetic's route (fused optimiser, channels_last, the attention dispatch)."""
from __future__ import annotations

import numbers
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from lightning import Callback, LightningModule

from support import DENSE_SMOKE, FAST, TINY_PVT
from vitlab.runtime.config import compose
from vitlab.runtime.run import train as train_run_in_process

# What makes the host wait for the device when called on a CUDA tensor (the patched methods).
SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
TORCH_DIR = str(Path(torch.__file__).parent)
TORCHVISION_DIR = str(Path(torchvision.__file__).parent)
LOG_EVERY = 3


class SyncProbe(Callback):
    """Records, during the training batches of a run, every call of a ``SYNCING`` tensor method with
    the training step it happened in and the first caller outside torch (file:line)."""

    calls: list[tuple[int, str, str]] = []
    step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        SyncProbe.step = trainer.global_step  # until the next batch starts: the step, logging, callbacks

    def on_validation_start(self, trainer, pl_module):
        SyncProbe.step = None

    def on_train_epoch_end(self, trainer, pl_module):
        SyncProbe.step = None


def _patched(name, original):
    def method(self, *args, **kwargs):
        if SyncProbe.step is not None:
            frames = traceback.extract_stack()[:-1]
            caller = frames[-1]
            in_loader = any("torch/utils/data" in f.filename for f in frames)  # worker-side work (num_workers=0)
            # torch's own calls are on host-side tensors (the optimisers' step counts); torchvision's
            # detectors sample boxes and proposals by data-dependent shapes: theirs by design
            if not in_loader and not caller.filename.startswith((TORCH_DIR, TORCHVISION_DIR)):
                SyncProbe.calls.append((SyncProbe.step, name, f"{caller.filename}:{caller.lineno}"))
        return original(self, *args, **kwargs)

    return method


def _logging_numbers(original):
    """``LightningModule.log`` of a Python number copies it to the GPU with a blocking copy (a sync)."""
    def log(self, name, value, *args, **kwargs):
        if SyncProbe.step is not None and isinstance(value, numbers.Number):
            SyncProbe.calls.append((SyncProbe.step, "log(number)", name))
        return original(self, name, value, *args, **kwargs)

    return log


@pytest.mark.parametrize("task, overrides", [
    ("imagenet_cls", [*FAST, "data.batch_size=4", "module.mixup=0.8", "module.cutmix=1.0", "module.ema_decay=0.9"]),
    ("coco_maskrcnn", [*TINY_PVT, *DENSE_SMOKE["coco_maskrcnn"], "data.synthetic_num_train=8"]),
    ("ade20k_upernet", [*TINY_PVT, "debug=smoke", "data.synthetic=true", "data.synthetic_num_train=8",
                        "data.synthetic_num_val=2", "data.smoke_images=8", "logger=csv", "module.head.channels=16",
                        "module.auxiliary_head.channels=16", "data.crop_size=[64,64]"]),
])
def test_no_host_sync_in_training_steps_except_logging_steps(task, overrides, tmp_path, data_dir, monkeypatch):
    """Six training steps of each task with the default callbacks (progress bar on, checkpoints,
    fast paths) and ``log_every_n_steps=3``: the only calls that would make the host wait for a GPU
    (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)``, ..., and ``self.log`` of a Python number,
    which Lightning copies to the device with a blocking copy) from vitlab, Lightning, timm or
    torchmetrics happen in the logging steps. (Before: ``batch.skipped.item()`` in every step of every
    task, Lightning turning the loss logged with ``prog_bar=True`` into a number every step, and the
    learning rate logged as a Python number.)"""
    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, _patched(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(LightningModule, "log", _logging_numbers(LightningModule.log))
    SyncProbe.calls = []
    args = [*overrides, f"task={task}", "trainer.max_steps=6", "trainer.limit_train_batches=6", "trainer.max_epochs=1",
            f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=true",
            "callbacks.progress_bar={_target_:vitlab.runtime.callbacks.StepMetricsProgressBar}",
            "+callbacks.sync_probe._target_=test_fast_paths.SyncProbe", f"data.synthetic_root={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={data_dir}", f"paths.root_dir={tmp_path}"]
    train_run_in_process(compose("train", args))  # in this process: the probe counts calls made here
    steps = {step for step, _, _ in SyncProbe.calls}
    assert SyncProbe.calls, "the probe saw no call at all: it is not measuring"  # logging steps do sync
    off_steps = [c for c in SyncProbe.calls if (c[0] + 1) % LOG_EVERY and c[0] != 0]
    assert not off_steps, f"host syncs outside the logging steps (step, method, caller): {off_steps[:8]}"
    assert steps <= {0, LOG_EVERY - 1, 2 * LOG_EVERY - 1}


# --------------------------------------------------------------------------- the switches
def test_attention_takes_sdpa_off_the_cpu_even_in_bf16(monkeypatch):
    """The written-out attention is for bf16 / fp16 on the CPU only: a reduced-precision tensor on
    any other device (meta here, as CUDA would be), under autocast or not, goes to torch's SDPA."""
    from vitlab.backbones import layers

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].device) or real(*a, **k))
    q = torch.empty(2, 1, 49, 16, dtype=torch.bfloat16, device="meta")
    layers.attention(q, q, q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers.attention(q.float(), q.float(), q.float())
    assert [d.type for d in calls] == ["meta", "meta"]
    cpu = torch.randn(2, 1, 49, 16).bfloat16()
    layers.attention(cpu, cpu, cpu)  # the CPU bf16 case is the written-out one
    assert len(calls) == 2


def test_fast_path_settings_per_device_precision_and_task():
    from vitlab.runtime.callbacks import FastPaths

    fast = FastPaths()
    assert fast.settings("cuda", "32-true", True) == {"matmul_precision": "high", "cudnn_benchmark": True,
                                                      "optimizer_kernels": "fused", "channels_last": False}
    dense_bf16 = fast.settings("cuda", "bf16-mixed", False)
    assert dense_bf16["matmul_precision"] is None and dense_bf16["cudnn_benchmark"] is False
    assert fast.settings("cpu", "32-true", True) == {"matmul_precision": None, "cudnn_benchmark": None,
                                                     "optimizer_kernels": "foreach", "channels_last": False}
    off = FastPaths(tf32=False, cudnn_benchmark=False, fused_optimizer=False, channels_last=True)
    assert off.settings("cuda", "32-true", True) == {"matmul_precision": None, "cudnn_benchmark": False,
                                                     "optimizer_kernels": "foreach", "channels_last": True}
    with pytest.raises(ValueError, match="cudnn_benchmark"):
        FastPaths(cudnn_benchmark="yes")


def test_fast_paths_apply_and_put_back_the_global_flags():
    from vitlab.runtime.callbacks import FastPaths

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    module = torch.nn.Conv2d(3, 4, 3)
    fast = FastPaths(channels_last=True)
    fast.apply(module, fast.settings("cuda", "32-true", True))
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    assert module.optimizer_kernels == "fused" and module.weight.is_contiguous(memory_format=torch.channels_last)
    fast.teardown(None, module, "fit")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before


def test_fused_adamw_through_timm_steps_as_the_foreach_one():
    """The fused kernels (here torch's CPU build of them) take the same steps as timm's default."""
    from timm.optim import create_optimizer_v2

    from vitlab.tasks.base import kernel_options

    assert kernel_options("adamw", "fused") == {"fused": True} and kernel_options("adamw", "foreach") == {}
    assert kernel_options("lamb", "fused") == {}  # timm's own optimisers have no fused build
    with pytest.raises(ValueError, match="expected fused or foreach"):
        kernel_options("adamw", "fast")
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [create_optimizer_v2(n, opt="adamw", lr=1e-2, weight_decay=0.05, **kernel_options("adamw", k))
            for n, k in zip(nets, ("foreach", "fused"))]
    assert opts[1].defaults["fused"] and not opts[0].defaults.get("fused")
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_channels_last_backbone_gives_the_same_features():
    """channels_last (off by default) changes only the memory layout of the convolutions (patch
    embeddings, PVTv2's depth-wise conv): the same features, forward and backward."""
    import vitlab

    torch.manual_seed(0)
    model = vitlab.create_model("pvt_v2_b0", overrides=["depths=[1,1,1,1]", "drop_path_rate=0.0"]).eval()
    nhwc = vitlab.create_model("pvt_v2_b0", overrides=["depths=[1,1,1,1]", "drop_path_rate=0.0"]).eval()
    nhwc.load_state_dict(model.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    ref, out = model(x), nhwc(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ref.sum().backward(), out.sum().backward()
    for (name, a), b in zip(model.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_loaders_pin_memory_on_cuda_keep_workers_and_lightning_moves_batches_non_blocking(monkeypatch, tmp_path):
    """Every DataModule's loaders come from ``make_loader``: pinned host memory when CUDA is there,
    persistent workers; Lightning then copies each batch (our NamedTuples, detection's target dicts)
    to the GPU with ``non_blocking=True`` (which overlaps with compute only from pinned memory)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from vitlab.data.ade20k import ADE20KDataModule
    from vitlab.data.base import ImageBatch, VitlabDataModule
    from vitlab.data.coco import CocoDataModule
    from vitlab.data.imagenet import ImageNetDataModule

    for cls in (ImageNetDataModule, CocoDataModule, ADE20KDataModule):
        assert cls.make_loader is VitlabDataModule.make_loader
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dm = VitlabDataModule(root=str(tmp_path), num_workers=2, batch_size=2)
    for train in (True, False):
        loader = dm.make_loader(list(range(8)), train=train)
        assert loader.pin_memory and loader.persistent_workers
    seen = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: seen.append(k.get("non_blocking")) or self)
    batch = ImageBatch(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.tensor(0))
    move_data_to_device([batch, {"boxes": torch.zeros(1, 4)}], torch.device("cuda"))
    assert seen == [True] * 4


def test_evaluation_takes_the_runs_fast_paths():
    """src/eval.py's Trainer gets the fast paths of the run that wrote the checkpoint, with that run's
    switches (a checkpoint's stored config, as composed and resolved for training); none for a run
    that turned them off, and none from a ``_target_`` the checkpoint names instead."""
    from omegaconf import OmegaConf

    from vitlab.runtime.callbacks import FastPaths
    from vitlab.runtime.config import compose
    from vitlab.runtime.run import eval_callbacks

    def stored(*overrides):  # the part of a checkpoint's stored run config read here
        callbacks = compose("train", overrides).callbacks
        return {"callbacks": {k: OmegaConf.to_container(callbacks[k], resolve=True) for k in callbacks
                              if k == "fast_paths"}}

    (fast,) = eval_callbacks(stored("callbacks.fast_paths.tf32=false", "callbacks.fast_paths.channels_last=true"))
    assert isinstance(fast, FastPaths)
    assert fast.settings("cuda", "32-true", True) == {"matmul_precision": None, "cudnn_benchmark": True,
                                                      "optimizer_kernels": "fused", "channels_last": True}
    assert eval_callbacks(stored("~callbacks.fast_paths")) == []
    named = stored()
    named["callbacks"]["fast_paths"]["_target_"] = "os.system"
    assert eval_callbacks(named) == []
