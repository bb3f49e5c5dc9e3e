"""DDP with two CPU processes (gloo) and the W&B logger in offline mode."""
from __future__ import annotations

import json

import pytest

from support import FAST, TINY_PVT, run_script
from vitlab.data.synthetic import make_imagenet
from vitlab.data.synthetic_dense import make_ade20k, make_coco

from vitlab.dashboard import wandb_records


def test_ddp_two_cpu_processes_validation_matches_single_process(tmp_path, train_run, data_dir):
    summary = train_run(
        tmp_path / "ddp", *FAST, "schedule.epochs=1", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.precision=32-true", "trainer.benchmark=false",
    )
    # 200 validation images split over 2 ranks with no padding: the synced metric covers each once.
    run_script("eval.py", [f"ckpt_path={summary['last_ckpt']}", f"hydra.run.dir={tmp_path / 'eval'}",
                           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"], data_dir)
    single = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert single["val/top1"] == pytest.approx(summary["val/top1"], abs=1e-4)


DDP_EVAL = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.benchmark=false", "trainer.sync_batchnorm=false", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("task,metric", [("imagenet_cls", "val/top1"), ("coco_maskrcnn", "val/map"),
                                         ("ade20k_fpn", "val/miou")])
def test_ddp_evaluation_counts_every_image_once(task, metric, tmp_path, data_dir):
    """An odd number of validation images on 2 processes gives exactly the single-process metric
    (a padding sampler would score one image twice)."""
    if task == "imagenet_cls":
        root = make_imagenet(tmp_path / "in", num_classes=3, num_train=4, num_val=7, size=32)  # 21 val images
        data = [f"data.root={root}", "data.img_size=32"]
        model = ["experiment=demo"]
        keep_all = ["+overrides.data.smoke=false"]  # smoke keeps 2 batches of ImageNet; evaluate all 21
    elif task == "coco_maskrcnn":
        root = make_coco(tmp_path / "coco", num_train=4, num_val=9, size=96)
        data = [f"data.root={root}", "data.smoke_images=9"]
        model = [f"task={task}", "module.head.fpn_channels=16"]
        keep_all = []
    else:
        root = make_ade20k(tmp_path / "ade", num_train=4, num_val=9, size=64) / "ADEChallengeData2016"
        data = [f"data.root={root}", "data.smoke_images=9"]
        model = [f"task={task}", "module.head.fpn_channels=16", "module.head.channels=16"]
        keep_all = []
    run_script("train.py", [*TINY_PVT, *model, "debug=smoke", "data.synthetic=false", *data, "backbone.pretrained=null",
                            f"hydra.run.dir={tmp_path / 'run'}"], data_dir)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    results = {}
    for name, trainer in (("single", ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]), ("ddp", DDP_EVAL)):
        run_script("eval.py", [f"ckpt_path={ckpt}", *keep_all, *trainer, f"hydra.run.dir={tmp_path / name}"], data_dir)
        results[name] = json.loads((tmp_path / name / "summary.json").read_text())[metric]
    assert results["ddp"] == pytest.approx(results["single"], abs=1e-9), results


def test_wandb_offline_run_holds_config_and_metrics(tmp_path, train_run):
    train_run(tmp_path, *FAST, "schedule.epochs=1", "logger=wandb", "tags=[test]")
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))
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


def _map_on_rank(rank: int, world: int, port: int, items: list, out: dict) -> None:
    import torch.distributed as dist
    from torchmetrics.detection import MeanAveragePrecision

    from vitlab.tasks.detection import gather_per_image_states

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metric = MeanAveragePrecision(backend="pycocotools", iou_type="bbox", sync_on_compute=False)
    mine = items[rank::world]  # 7 images: 4 on rank 0, 3 on rank 1
    for _, pred, gt in mine:
        metric.update([pred], [gt])
    results = gather_per_image_states(metric, [i for i, _, _ in mine], [{"image_id": i} for i, _, _ in mine])
    out[rank] = (float(metric.compute()["map"]), [r["image_id"] for r in results])
    dist.destroy_process_group()


def test_map_states_gathered_over_uneven_processes_equal_one_process():
    """Two gloo processes with 4 and 3 images: the gathered mAP equals one process's over all 7
    (torchmetrics' own sync needs equal counts and would fail or count an image twice)."""
    import socket

    import torch
    import torch.multiprocessing as mp
    from torchmetrics.detection import MeanAveragePrecision

    g = torch.Generator().manual_seed(0)
    items = []
    for image_id in range(7):
        boxes = torch.rand(3, 2, generator=g) * 50
        boxes = torch.cat([boxes, boxes + 10 + torch.rand(3, 2, generator=g) * 30], 1)
        noisy = boxes + torch.randn(3, 4, generator=g) * 4  # imperfect detections: AP strictly between 0 and 1
        labels = torch.randint(0, 3, (3,), generator=g)
        items.append((image_id, {"boxes": noisy, "scores": torch.rand(3, generator=g), "labels": labels},
                      {"boxes": boxes, "labels": labels}))
    single = MeanAveragePrecision(backend="pycocotools", iou_type="bbox")
    for _, pred, gt in items:
        single.update([pred], [gt])
    expected = float(single.compute()["map"])
    assert 0.05 < expected < 0.95
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_map_on_rank, args=(2, port, items, out), nprocs=2, join=True)
    for rank in (0, 1):
        assert out[rank][0] == pytest.approx(expected, abs=1e-12)
        assert out[rank][1] == list(range(7))  # every image once, in id order
