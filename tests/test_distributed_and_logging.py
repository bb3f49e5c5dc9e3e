"""DDP with two CPU processes (gloo) and the W&B logger in offline mode."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

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


def read_wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file (LevelDB log format: 32 KiB blocks of
    [crc32, length, type] chunks around protobuf ``Record``s). wandb >= 0.19 ships no Python
    reader and no longer writes files/config.yaml for offline runs, so the test reads it itself."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_config_and_metrics(tmp_path, train_run):
    train_run(tmp_path, *FAST, "schedule.epochs=1", "logger=wandb", "tags=[test]")
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))
    config, summary, history = {}, {}, set()
    for record in read_wandb_records(runs[0]):
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
