"""Experiment operations: submitit launcher, mid-epoch pre-emption and resume (run comparison: test_compare)."""
from __future__ import annotations

import json

import pytest

from support import FAST, TINY_PVT, run_script


pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def test_two_job_sweep_through_submitit_local(tmp_path, data_dir):
    run_script("train.py", ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                            *TINY_PVT, "experiment=demo", "debug=smoke", "seed=1,2",
                            f"hydra.sweep.dir={tmp_path}"], data_dir, timeout=900)
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert [s["overrides"][-1] for s in summaries] == ["seed=1", "seed=2"]
    assert list((tmp_path / ".submitit").glob("*/*_result.pkl")), "jobs must have run through submitit"


def test_killed_mid_epoch_rerun_continues_and_finishes_same_step_count(tmp_path, train_run, data_dir):
    run_dir = tmp_path / "run"
    command = [*FAST, "schedule.epochs=2", "data.synthetic_classes=4", "schedule.checkpoint_every_n_steps=4",
               f"hydra.run.dir={run_dir}"]
    kill = ["+callbacks.stop._target_=vitlab.runtime.callbacks.StopAfter", "+callbacks.stop.steps=6"]
    proc = run_script("train.py", [*command, *kill], data_dir, check=False)
    assert proc.returncode == 75, proc.stderr[-2000:]  # killed like a pre-empted job
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "summary.json").exists()
    run_script("train.py", command, data_dir)  # the same command again: resumes from last.ckpt
    resumed = json.loads((run_dir / "summary.json").read_text())
    straight = train_run(tmp_path / "straight", *command[:-1])
    assert resumed["global_step"] == straight["global_step"] == 2 * (4 * 80 // 16)
    assert "resuming from" in (run_dir / "train.log").read_text()
