"""Kill a training run the ways a user's run dies, re-run the same command, and compare.

Every run here is ``python src/train.py <the same overrides>`` (in a process of its own,
``support.start_script``) from a temporary working directory
with ``VITLAB_OUTPUT`` set, exactly as a user re-runs a command: no ``hydra.run.dir``, no test-only
callback in the command. The run directory is found from the command, the re-run resumes from
``last.ckpt`` and must end bit-equal to a run that was never interrupted.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from support import FAST, run_script, start_script

# 2 epochs of 20 steps; mixup (numpy RNG) and drop path (torch RNG) on, so the restored RNG matters;
# last.ckpt every 3 steps, so a kill lands mid-epoch after a mid-epoch checkpoint.
COMMAND = [*FAST, "schedule.epochs=2", "data.synthetic_classes=4", "data.batch_size=8",
           "schedule.checkpoint_every_n_steps=3", "module.mixup=0.8", "backbone.drop_path_rate=0.1",
           "trainer.log_every_n_steps=1"]
STEPS = 2 * (4 * 80 // 8)  # 4 generated classes x 80 training images, batch 8


def run_dir(output: Path) -> Path:
    dirs = list(output.glob("imagenet_cls/pvt_v2_b0/*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def start(output: Path, data_dir: Path, env: dict | None = None, extra: tuple = ()):
    """The command, from ``output``'s parent; its output (stdout and stderr) in ``output``'s parent."""
    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.parent / f"train-{len(list(output.parent.glob('train-*.log')))}.log"
    return start_script("train.py", [*COMMAND, *extra], data_dir, env={"VITLAB_OUTPUT": str(output), **(env or {})},
                        cwd=output.parent, log=log)


def wait_for_mid_epoch_checkpoint(proc, output: Path, timeout: float = 300) -> None:
    """Until the run has written a step checkpoint (training is under way, handlers installed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = list(output.glob("imagenet_cls/pvt_v2_b0/*/checkpoints/last.ckpt"))
        if last:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it wrote a checkpoint:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint within the time-out")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Path:
    """The uninterrupted run."""
    output = tmp_path_factory.mktemp("straight") / "outputs"
    proc = start(output, data_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return run_dir(output)


def assert_same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def rerun(output: Path, data_dir: Path, extra: tuple = ()) -> dict:
    proc = start(output, data_dir, extra=extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return json.loads((run_dir(output) / "summary.json").read_text())


def test_sigkill_mid_epoch_then_same_command_is_bit_equal(tmp_path, data_dir, straight):
    output = tmp_path / "outputs"
    proc = start(output, data_dir)
    wait_for_mid_epoch_checkpoint(proc, output)
    proc.kill()  # SIGKILL: nothing runs after this
    proc.wait()
    assert not (run_dir(output) / "summary.json").exists()
    summary = rerun(output, data_dir)
    assert summary["resumed_from"].endswith("last.ckpt") and summary["global_step"] == STEPS
    assert_same_weights(straight, run_dir(output))
    assert "resuming from" in (run_dir(output) / "train.log").read_text()


@pytest.mark.slow
def test_sigkill_mid_epoch_on_the_packed_format_is_bit_equal(tmp_path, data_dir):
    """data.format=litdata (the generated set packed, shuffled) in the block order (data.shuffle=block):
    killed mid-epoch and re-run, it ends bit-equal to an uninterrupted run. (The uniform order's
    sampler is the folder format's, killed in the test above; both orders' loaders resume exactly:
    test_streaming.)"""
    extra = ("data.format=litdata", "data.shuffle=block", "data.shuffle_window=2")
    (tmp_path / "straight").mkdir()
    uninterrupted = tmp_path / "straight" / "outputs"
    proc = start(uninterrupted, data_dir, extra=extra)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    output = tmp_path / "outputs"
    proc = start(output, data_dir, extra=extra)
    wait_for_mid_epoch_checkpoint(proc, output)
    proc.kill()
    proc.wait()
    summary = rerun(output, data_dir, extra)
    assert summary["resumed_from"].endswith("last.ckpt") and summary["global_step"] == STEPS
    assert_same_weights(run_dir(uninterrupted), run_dir(output))


def test_preemption_signal_saves_requeues_and_resumes(tmp_path, data_dir, straight):
    """SLURM's pre-emption / time-limit signal: the run saves at the next step, asks SLURM to requeue
    it (a stand-in ``scontrol`` records the call) and exits; the requeued command resumes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    output = tmp_path / "outputs"
    proc = start(output, data_dir, env={"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    wait_for_mid_epoch_checkpoint(proc, output)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGUSR1" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    saved = torch.load(run_dir(output) / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < saved < STEPS
    summary = rerun(output, data_dir)
    assert summary["global_step"] == STEPS
    assert_same_weights(straight, run_dir(output))
    # the history continues: one CSV holds both attempts, each step once
    rows = list(csv.DictReader((run_dir(output) / "csv" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] < saved < steps[-1]


def test_finished_run_is_reported_not_repeated_and_resume_never_starts_fresh(tmp_path, data_dir):
    output = tmp_path / "outputs"
    command = [*FAST, "debug=smoke"]
    env = {"VITLAB_OUTPUT": str(output)}
    run_script("train.py", command, data_dir, env=env, cwd=tmp_path)
    again = run_script("train.py", command, data_dir, env=env, cwd=tmp_path)
    assert "already finished" in again.stdout + again.stderr
    run_script("train.py", [*command, "resume=never"], data_dir, env=env, cwd=tmp_path)
    names = sorted(p.name for p in output.glob("imagenet_cls/pvt_v2_b0/*"))
    assert len(names) == 2 and names[1] == names[0] + "-2"


def test_rerunning_a_sweep_skips_its_finished_jobs(tmp_path, data_dir):
    """The sweep directory is a function of the sweep command: the same -m command again finds its
    jobs' summaries and skips them (a sweep killed half-way would resume the rest)."""
    output = tmp_path / "outputs"
    command = ["-m", *FAST, "debug=smoke", "seed=1,2"]
    env = {"VITLAB_OUTPUT": str(output)}
    run_script("train.py", command, data_dir, env=env, cwd=tmp_path)
    (sweep,) = output.glob("sweep-*")
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == ["0", "1"]
    again = run_script("train.py", command, data_dir, env=env, cwd=tmp_path)
    assert (again.stdout + again.stderr).count("already finished") == 2
    assert list(output.glob("sweep-*")) == [sweep]
