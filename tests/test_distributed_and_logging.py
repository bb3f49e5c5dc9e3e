"""DDP with two CPU processes (gloo) and the W&B logger in offline mode."""
from __future__ import annotations

import json

import pytest

from support import FAST, run_script

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
