"""DDP with two CPU processes (gloo) and the W&B logger in offline mode."""
from __future__ import annotations

import json

import pytest

from support import FAST, call_in_children, run_script, wandb_records
from vitlab.data.synthetic import make_imagenet


DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "trainer.benchmark=false", "trainer.sync_batchnorm=false", "trainer.enable_progress_bar=false"]


def test_ddp_two_cpu_processes_train_and_validate_every_image_once(tmp_path, data_dir, eval_run):
    """Training on 2 processes; its validation of an odd number of images (21, split 11 + 10 with no
    padding) gives exactly what eval.py computes from the checkpoint in one process (a padding
    sampler would score one image twice)."""
    root = make_imagenet(tmp_path / "in", num_classes=3, num_train=8, num_val=7, size=32)
    run_script("train.py", [*FAST, "schedule.epochs=1", f"data.root={root}", "data.synthetic=false", "data.batch_size=4",
                            *DDP, f"hydra.run.dir={tmp_path / 'ddp'}"], data_dir)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["global_step"] == 3  # 24 training images: 12 per process, batch 4
    single = eval_run(tmp_path / "eval", summary["last_ckpt"], "trainer.accelerator=cpu",
                      "trainer.enable_progress_bar=false")
    assert single["val/top1"] == pytest.approx(summary["val/top1"], abs=1e-9)


@pytest.mark.parametrize("task,metric", [("coco_maskrcnn", "val/map"), ("ade20k_fpn", "val/miou")])
def test_ddp_evaluation_counts_every_image_once(task, metric, tmp_path, data_dir, eval_run, request):
    """eval.py on 2 processes over an odd number of validation images (the shared smoke runs' 9)
    gives exactly the single-process metric (a padding sampler would score one image twice)."""
    run = request.getfixturevalue({"coco_maskrcnn": "detection_run", "ade20k_fpn": "segmentation_run"}[task])
    ckpt = run / "checkpoints" / "last.ckpt"
    single = eval_run(tmp_path / "single", ckpt, "trainer.accelerator=cpu", "trainer.enable_progress_bar=false")
    run_script("eval.py", [f"ckpt_path={ckpt}", *DDP, f"hydra.run.dir={tmp_path / 'ddp'}"], data_dir)
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp[metric] == pytest.approx(single[metric], abs=1e-9), (ddp, single)


def test_wandb_offline_run_holds_config_and_metrics(smoke_sweep):
    """The smoke sweep's first job (logger=wandb, offline): what W&B holds for dashboards."""
    runs = list((smoke_sweep / "0" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(smoke_sweep.rglob("*"))
    config, summary, history = {}, {}, set()
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            history |= {i.key or "/".join(i.nested_key) for i in record.history.item}
    # dashboard keys: names and every backbone field at top level, plus the full config
    assert config["backbone"] == "pvt_v2_b0" and config["task"] == "imagenet_cls"
    assert config["depths"] == [1, 1, 1, 1] and config["params"] > 0
    assert config["config"]["data"]["synthetic"] is True
    assert {"train/loss", "val/top1"} <= history, history
    assert summary["params"] > 0 and "val/top1" in summary and summary["backbone"] == "pvt_v2_b0"


def _map_on_rank(rank: int, world: int, port: int, items: list) -> tuple[float, list[int]]:
    import torch.distributed as dist

    from vitlab.tasks.detection import CocoEvaluator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    evaluator = CocoEvaluator(False, [1, 2, 3])
    for image_id, pred, gt in items[rank::world]:  # 7 images: 4 on rank 0, 3 on rank 1
        evaluator.update(pred, gt, image_id)
    evaluator.gather()
    out = (evaluator.compute()["bbox_map"], [r["image_id"] for r in evaluator.results])
    dist.destroy_process_group()
    return out


def test_map_states_gathered_over_uneven_processes_equal_one_process():
    """Two gloo processes with 4 and 3 images: the gathered mAP equals torchmetrics' (pycocotools)
    over all 7 in one process, and every process holds every image's results once, in id order."""
    import socket

    import torch
    from torchmetrics.detection import MeanAveragePrecision

    g = torch.Generator().manual_seed(0)
    items = []
    for image_id in range(1, 8):
        boxes = torch.rand(3, 2, generator=g) * 50
        boxes = torch.cat([boxes, boxes + 10 + torch.rand(3, 2, generator=g) * 30], 1)
        noisy = boxes + torch.randn(3, 4, generator=g) * 4  # imperfect detections: AP strictly between 0 and 1
        labels = torch.randint(0, 3, (3,), generator=g)
        gt = {"boxes": boxes, "labels": labels, "iscrowd": torch.zeros(3, dtype=torch.long),
              "area": (boxes[:, 2:] - boxes[:, :2]).prod(1), "orig_size": torch.tensor([100, 100])}
        items.append((image_id, {"boxes": noisy, "scores": torch.rand(3, generator=g), "labels": labels}, gt))
    single = MeanAveragePrecision(backend="pycocotools", iou_type="bbox")
    for _, pred, gt in items:
        single.update([pred], [{k: gt[k] for k in ("boxes", "labels")}])
    expected = float(single.compute()["map"])
    assert 0.05 < expected < 0.95
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = call_in_children(_map_on_rank, [(rank, 2, port, items) for rank in (0, 1)])
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(expected, abs=1e-4)  # results files round boxes to 0.01 px
        assert sorted(set(out[rank][1])) == list(range(1, 8)) and out[rank][1] == sorted(out[rank][1])
        assert len(out[rank][1]) == 21  # 3 detections per image, each once


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, train_run, data_dir):
    """Killed after epoch 1 and re-run (as a requeued SLURM job): both attempts log offline into the one
    W&B run whose id the run directory keeps, so `wandb sync` / `vitlab.tools.dashboard sync` merge them."""
    from support import FAST, run_script

    run = tmp_path / "run"
    common = [*FAST, "schedule.epochs=2", "data.synthetic_classes=4", "logger=wandb"]
    stop = ["+callbacks.stop._target_=vitlab.runtime.callbacks.StopAfter", "+callbacks.stop.epochs=1"]
    killed = run_script("train.py", [*common, *stop, f"hydra.run.dir={run}"], data_dir, check=False)
    assert killed.returncode == 75, killed.stderr[-2000:]
    run_id = (run / "wandb_run_id").read_text().strip()
    summary = train_run(run, *common)
    assert summary["resumed_from"] and (run / "wandb_run_id").read_text().strip() == run_id
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(a.name.endswith(f"-{run_id}") for a in attempts), attempts
