"""DDP with two CPU processes (gloo) and the W&B logger in offline mode."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_script
from test_train import FAST


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
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))
    files = runs[0] / "files"
    config = yaml.safe_load((files / "config.yaml").read_text())
    # dashboard keys: names and every backbone field at top level
    assert config["backbone"]["value"] == "pvt_v2_b0"
    assert config["task"]["value"] == "imagenet_cls"
    assert config["depths"]["value"] == [1, 1, 1, 1]
    assert config["params"]["value"] > 0
    summary = json.loads((files / "wandb-summary.json").read_text())
    assert "val/top1" in summary and "train/loss" in summary and summary["params"] > 0
