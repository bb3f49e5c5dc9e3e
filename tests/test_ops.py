"""Experiment operations: submitit launcher, mid-epoch pre-emption and resume (run comparison: test_compare)."""
from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from support import FAST, TINY_PVT, run_script, start_script


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


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (ended, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(") ")[2][0] == "Z"
    except OSError:
        return True


def _submitit_task(under: Path) -> int:
    """The PID of the submitit job started under ``under`` (``python -u -m submitit.core._submit FOLDER``:
    the controller's child, or the warm python forwarding to it; tests/warm_python.py)."""
    tasks = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode().split("\0")
        except OSError:  # ended meanwhile
            continue
        if "submitit.core._submit" in args and any(a.startswith(str(under)) for a in args):
            tasks.append(int(cmdline.parent.name))
    assert len(tasks) == 1, tasks
    return tasks[0]


@pytest.mark.slow
def test_slurm_signals_through_the_submitit_launcher_are_vitlabs(tmp_path, data_dir):
    """A job launched as on SLURM (submitit's local launcher: a controller that forwards SIGTERM to
    its task, and submitit's own signal handlers in the task): SIGTERM saves, runs the (stand-in)
    ``scontrol requeue`` once and exits, handled by vitlab's callback alone (neither submitit's nor
    Lightning's handler runs); the requeued job resumes, and at ``max_requeues`` SIGUSR1 saves
    without asking for another requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(stat.S_IRWXU)
    output = tmp_path / "multirun"
    command = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", *FAST, "schedule.epochs=2",
               "data.synthetic_classes=4", "schedule.checkpoint_every_n_steps=2"]  # 40 steps: room to signal mid-run
    env = {"VITLAB_OUTPUT": str(output), "SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def attempt(signum: int, restarts: int) -> tuple[str, int]:
        """Launch the sweep; once its job has saved a newer step checkpoint, signal it."""
        last = list(output.glob("sweep-*/0/checkpoints/last.ckpt"))
        before = torch.load(last[0], weights_only=True)["global_step"] if last else 0
        old = {p.name for p in output.glob("sweep-*/.submitit/*")}
        parent = start_script("train.py", command, data_dir, env={**env, "SLURM_RESTART_COUNT": str(restarts)},
                              cwd=tmp_path, log=tmp_path / f"launcher-{restarts}.log")
        deadline = time.time() + 600
        while True:
            assert parent.poll() is None and time.time() < deadline, "the job ended or never saved"
            last = list(output.glob("sweep-*/0/checkpoints/last.ckpt"))
            controllers = [int(p.name) for p in output.glob("sweep-*/.submitit/*") if p.name.isdigit() and p.name not in old]
            if last and controllers and torch.load(last[0], weights_only=True)["global_step"] > before:
                break
            time.sleep(0.2)
        (controller,) = controllers
        task = _submitit_task(tmp_path)
        # SIGTERM: to the controller, which forwards it as SLURM does; SIGUSR1 straight to the task
        os.kill(controller if signum == signal.SIGTERM else task, signum)
        while not _ended(task):
            assert time.time() < deadline, "the job did not end"
            time.sleep(0.2)
        # the launcher waits 15 s for the result of a job that exited without one (submitit's
        # _results_timeout_s), then reports it: not our business
        parent.kill()
        parent.wait(timeout=60)
        job_log = "".join(p.read_text() for p in output.glob(f"sweep-*/.submitit/{controller}/*_0_log.*"))
        return job_log, torch.load(last[0], weights_only=True)["global_step"]

    log, saved = attempt(signal.SIGTERM, restarts=0)
    assert "received SIGTERM" in log and 0 < saved < 40, log[-3000:]
    assert "Bypassing signal" not in log and "Received SIGTERM" not in log  # submitit's / Lightning's handlers
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    log, saved_again = attempt(signal.SIGUSR1, restarts=20)  # the requeued job, at the limit
    assert "resuming from" in log and "received SIGUSR1" in log and saved < saved_again < 40, log[-3000:]
    assert "not requeueing job 4242: SLURM has restarted it 20 times (max_requeues=20)" in log
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]  # no second requeue
    assert not list(output.glob("sweep-*/0/summary.json"))
