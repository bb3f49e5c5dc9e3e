"""One run, one owner: a locked run directory, checkpoints that survive a kill at any instant or a
full disk, and user errors printed as one message (exit code 2) instead of a traceback.

Commands run as a user types them: ``python src/train.py ...`` / ``src/eval.py`` in a process of
their own (``support.start_script``) from a temporary working directory with ``VITLAB_OUTPUT`` set.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from support import FAST, REPO, TINY_PVT, run_script, start_script
from vitlab.errors import VitlabUserError, user_errors_as_messages
from vitlab.runtime.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from vitlab.runtime.run import NoGoodCheckpointError, plan_resume
from vitlab.runtime.rundir import RunDirLockedError, owned

SMOKE = [*TINY_PVT, "debug=smoke", "data.synthetic=true"]
NO_TRACEBACK = {"HYDRA_FULL_ERROR": "0"}  # support.run_script shows tracebacks by default


def start(script: str, args: list[str], output: Path, data_dir: Path, env: dict | None = None,
          log: Path | None = None):
    """``python src/<script> args`` from ``output``'s parent, its output written to ``log``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return start_script(script, args, data_dir, env={"VITLAB_OUTPUT": str(output), **NO_TRACEBACK, **(env or {})},
                        cwd=output.parent, log=log)


def only_run_dir(output: Path) -> Path:
    (found,) = output.glob("imagenet_cls/pvt_v2_b0/*")
    return found


# ---- one owner --------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_copies_of_a_command_one_trains_the_other_stops_naming_the_owner(tmp_path, data_dir):
    """Two copies of one command started together (a double submit): one trains, the other stops at
    once (exit code 2, no traceback) naming the directory, the owner's PID and host and resume=never;
    the run's history holds every step once."""
    output = tmp_path / "outputs"
    command = [*FAST, "schedule.epochs=2", "data.synthetic_classes=4", "trainer.log_every_n_steps=1"]
    copies = [start("train.py", command, output, data_dir, log=tmp_path / f"{i}.log") for i in range(2)]
    codes = [c.wait(timeout=600) for c in copies]
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert sorted(codes) == [0, 2], logs
    owner, stopped = codes.index(0), codes.index(2)
    run_dir = only_run_dir(output)
    assert "Traceback" not in logs[stopped]
    assert (f"run directory {run_dir} is in use by another process: PID {copies[owner].pid} on host "
            f"{socket.gethostname()}") in logs[stopped]
    assert "resume=never" in logs[stopped]
    steps = [int(r["step"]) for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("train/loss")]
    assert steps == list(range(2 * (4 * 80 // 16)))  # every step once


@contextlib.contextmanager
def another_owner(path: Path):
    """``path`` owned by a thread until the block ends or the yielded event is set: flock locks belong
    to an open file, so a thread's lock stands for another process's."""
    release, held = threading.Event(), threading.Event()

    def hold():
        with owned(path):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join()


def test_requeued_slurm_job_waits_for_its_previous_copy(tmp_path, monkeypatch):
    with another_owner(tmp_path) as release:
        started = time.monotonic()
        with pytest.raises(RunDirLockedError, match=rf"PID {os.getpid()} on host"):  # not requeued: at once
            with owned(tmp_path, requeue_wait_s=30):
                pass
        assert time.monotonic() - started < 5
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with pytest.raises(RunDirLockedError, match=r"waited 0.3s: requeue_lock_wait_s"):  # a bounded wait
            with owned(tmp_path, requeue_wait_s=0.3, poll_s=0.05):
                pass
        threading.Timer(0.5, release.set).start()  # the previous copy ends while this one waits
        started = time.monotonic()
        with owned(tmp_path, requeue_wait_s=30, poll_s=0.05):
            assert 0.4 < time.monotonic() - started < 20
            assert json.loads((tmp_path / ".lock").read_text())["slurm_job"] == "77"


def test_a_forked_child_does_not_keep_the_run_directory_locked(tmp_path):
    """A process forked while the run holds its directory (a loader worker, the paste pool) lets go of
    the lock: once the owner ends, the directory is free even while such a child lives on (an orphaned
    worker of a killed run would otherwise stop the re-run)."""
    import signal

    ready, tell = os.pipe()
    with owned(tmp_path):
        child = os.fork()
        if child == 0:  # the child outlives the owner's hold
            os.write(tell, b"1")  # running: past the fork's handlers
            time.sleep(30)
            os._exit(0)
    os.read(ready, 1)
    try:
        with owned(tmp_path):  # a fresh open of .lock: free although the child still runs
            assert os.waitpid(child, os.WNOHANG) == (0, 0)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready), os.close(tell)


def test_other_ddp_ranks_do_not_take_the_lock(tmp_path, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    with another_owner(tmp_path):
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        with owned(tmp_path):  # rank 1 of the owner's run: no fight
            pass


# ---- SLURM signals ------------------------------------------------------------------------------
class SignalProbe(L.Callback):
    """Writes to ``out`` (JSON), during training, who handles the pre-emption signals and Lightning's
    cluster environment."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        env = trainer._accelerator_connector.cluster_environment
        handlers = {s.name: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        Path(self.out).write_text(json.dumps({
            "environment": type(env).__name__, "auto_requeue": getattr(env, "auto_requeue", None),
            **{name: type(getattr(h, "__self__", None)).__name__ for name, h in handlers.items()}}))


def test_under_slurm_vitlab_alone_handles_the_preemption_signals(tmp_path, data_dir):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    probe = tmp_path / "probe.json"
    run_script("train.py", [*SMOKE, "+callbacks.probe._target_=test_ownership.SignalProbe", f"+callbacks.probe.out={probe}",
                            f"hydra.run.dir={tmp_path / 'run'}"], data_dir, env=slurm)
    seen = json.loads(probe.read_text())
    assert seen["environment"] == "SLURMEnvironment" and seen["auto_requeue"] is False
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):  # not Lightning's (it adds a SIGTERM handler after setup)
        assert seen[name] == "LastCheckpoint", (name, seen[name])


# ---- checkpoints --------------------------------------------------------------------------------
def test_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def full_disk(obj, f):  # writes part of the file, then the disk is full
        Path(f).write_bytes(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=rf"could not write {path}: No space left on device .*the "
                                                   rf"previous last.ckpt is intact"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.prev.ckpt"]  # no .tmp left


class SaveRecorder(L.Callback):
    """Records, as the run goes, a copy of every checkpoint the trainer hands its checkpoint writer
    and the path it goes to (``out``: a ``torch.save`` list written when the run ends)."""

    def __init__(self, out: str):
        self.out, self.saves = out, []

    def setup(self, trainer, pl_module, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        write = io.save_checkpoint

        def recorded(checkpoint, path, storage_options=None):
            self.saves.append((str(path), copy.deepcopy(checkpoint)))
            return write(checkpoint, path, storage_options)

        io.save_checkpoint = recorded

    def teardown(self, trainer, pl_module, stage: str) -> None:
        torch.save(self.saves, self.out)


def same(a, b, where="checkpoint") -> None:
    """``a`` and ``b`` hold the same structure and values (tensors: dtype, shape and every element)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("best_at_epoch_end", [True, False])
def test_best_and_last_of_one_epoch_end_are_one_file_holding_what_was_saved(best_at_epoch_end, tmp_path, data_dir):
    """The end of an improving epoch writes ``best.ckpt`` then ``last.ckpt`` from the same state: the
    second is a copy of the first's bytes (one serialisation), and each file loads back as exactly what
    the trainer asked to save to it. ``best.ckpt`` written after validation instead (as with mid-epoch
    validation) is a state of its own: serialised twice."""
    records = tmp_path / "saves.pt"
    run_script("train.py", [*SMOKE, "+callbacks.recorder._target_=test_ownership.SaveRecorder",
                            f"+callbacks.recorder.out={records}", f"hydra.run.dir={tmp_path / 'run'}",
                            f"+callbacks.best_checkpoint.save_on_train_epoch_end={best_at_epoch_end}"], data_dir)
    saves = torch.load(records, weights_only=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert [Path(p).name for p, _ in saves] == ["best.ckpt", "last.ckpt"]
    for path, asked in saves:
        same(torch.load(path, weights_only=False), asked, Path(path).name)
    copied = (ckpts / "best.ckpt").read_bytes() == (ckpts / "last.ckpt").read_bytes()  # torch.save names its
    assert copied == best_at_epoch_end  # archive's folder after the file: two saves are never byte-equal


def test_a_checkpoint_is_copied_only_from_an_equal_unchanged_file(tmp_path):
    """``AtomicCheckpointIO`` copies the file it wrote just before, instead of serialising, only when
    the two checkpoints would serialise the same and that file is as it wrote it."""
    weight = torch.randn(200, 200)  # over 64 KB: fingerprinted by identity and version counter

    def checkpoint(step=3, rng=0):
        return {"global_step": step, "state_dict": {"w": weight.detach()}, "rng": torch.tensor([rng, 1, 2])}

    def copied(first: dict, second: dict, between=lambda: None) -> bool:
        io = AtomicCheckpointIO()
        for name in ("best.ckpt", "last.ckpt"):
            (tmp_path / name).unlink(missing_ok=True)
        io.save_checkpoint(first, tmp_path / "best.ckpt")
        between()
        io.save_checkpoint(second, tmp_path / "last.ckpt")
        same(torch.load(tmp_path / "last.ckpt", weights_only=True), second)
        assert not os.path.samefile(tmp_path / "best.ckpt", tmp_path / "last.ckpt")  # never one file
        return (tmp_path / "best.ckpt").read_bytes() == (tmp_path / "last.ckpt").read_bytes()

    assert copied(checkpoint(), checkpoint())  # fresh dicts, fresh small tensors, the same values
    assert not copied(checkpoint(), checkpoint(step=4))
    assert not copied(checkpoint(), checkpoint(rng=1))  # a small tensor's value
    assert not copied(checkpoint(), checkpoint(), between=lambda: weight.mul_(1.0))  # written in place
    assert not copied(checkpoint(), checkpoint(), between=lambda: torch.save({}, tmp_path / "best.ckpt"))


def test_damaged_last_is_named_and_the_previous_one_resumed(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 6}, ckpts / "last.prev.ckpt")
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.prev.ckpt").read_bytes()[:100])  # a truncated write
    cfg = OmegaConf.create({"resume": "auto", "ckpt_path": None})
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        assert plan_resume(cfg, tmp_path) == (str(ckpts / "last.prev.ckpt"), None, 6)
    assert f"{ckpts / 'last.ckpt'} is damaged" in caplog.text and "last.damaged.ckpt" in caplog.text
    # the damaged file is set aside, so the next save cannot make it the "previous" one
    assert not (ckpts / "last.ckpt").exists() and (ckpts / "last.damaged.ckpt").exists()
    (ckpts / "last.prev.ckpt").write_bytes(b"garbage")
    with pytest.raises(NoGoodCheckpointError, match="no readable checkpoint to resume from"):
        plan_resume(cfg, tmp_path)  # never silently from scratch


# ---- user errors ------------------------------------------------------------------------------
def test_user_errors_exit_2_without_traceback_and_bugs_keep_theirs(monkeypatch, capsys):
    def user(cfg):
        raise RuntimeError("wrapped") from VitlabUserError("data.root=/x: no such directory")

    with pytest.raises(SystemExit) as exit_:
        user_errors_as_messages(user)(None)
    assert exit_.value.code == 2
    assert "data.root=/x: no such directory" in capsys.readouterr().err

    def bug(cfg):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        user_errors_as_messages(bug)(None)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(RuntimeError):
        user_errors_as_messages(user)(None)


def _untrusted_checkpoint(path: Path) -> str:
    torch.save({"state_dict": {}, "vitlab_config": {"data": {"_target_": "os.system", "command": "true"},
                                                    "module": {}, "backbone": {}}}, path)
    return str(path)


USER_ERRORS = {
    # name: (entry point, arguments (tmp_path -> list), text the message must hold)
    "config value": ("train", lambda t: [*SMOKE, "data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
    "offline weights": ("train", lambda t: ["backbone=pvt_v2_b0", "debug=smoke", "data.synthetic=true",
                                            "backbone.pretrained=imagenet", f"paths.weights_dir={t}"],
                        "VITLAB_OFFLINE is set"),
    "unknown weights": ("train", lambda t: [*SMOKE, f"backbone.pretrained={t}"],
                        "a directory without checkpoints/best.ckpt"),
    "untrusted checkpoint": ("eval", lambda t: [f"ckpt_path={_untrusted_checkpoint(t / 'x.ckpt')}"],
                             "os.system"),
    "not a checkpoint": ("eval", lambda t: [f"ckpt_path={REPO / 'README.md'}"], "not a checkpoint"),
    "missing checkpoint": ("eval", lambda t: [f"ckpt_path={t / 'nowhere.ckpt'}"], "nowhere.ckpt: no such file"),
}


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_error_through_the_entry_point(case, tmp_path, data_dir):
    entry, args, text = USER_ERRORS[case]
    proc = run_script(f"{entry}.py", args(tmp_path), data_dir, check=False, cwd=tmp_path,
                      env={**NO_TRACEBACK, "VITLAB_OUTPUT": str(tmp_path / "out"), "VITLAB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert text in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_dataset_layout_error_through_the_script(tmp_path, data_dir):
    proc = run_script("train.py", [*TINY_PVT, "debug=smoke"], data_dir, check=False, cwd=tmp_path,
                      env={**NO_TRACEBACK, "VITLAB_OUTPUT": str(tmp_path / "out")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Error (DatasetLayoutError): " in proc.stderr and "imagenet/train is missing" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list((tmp_path / "out").rglob("*"))  # a failed command leaves no run directory


# ---- kill at any instant --------------------------------------------------------------------------
# Loaded by every Python process started with this folder on PYTHONPATH: VITLAB_TEST_KILL=NAME:N:PHASE
# kills the process (os._exit(9): nothing runs after it) at the N-th rename onto a file called NAME,
# which is how every checkpoint and summary.json reaches its place: "partial" with the new file
# half written, "before" the rename, "after" it.
KILLER = '''
import os
_spec = os.environ.get("VITLAB_TEST_KILL")
if _spec:
    _name, _n, _phase = _spec.split(":")
    _replace, _seen = os.replace, [0]

    def _killing_replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == _name:
            _seen[0] += 1
            if _seen[0] == int(_n):
                if _phase == "partial":
                    os.truncate(src, os.path.getsize(src) // 2)
                if _phase == "after":
                    _replace(src, dst, *args, **kwargs)
                os._exit(9)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _killing_replace
'''
# 2 epochs of 10 steps, last.ckpt every 3 steps; each kill is counted from its own process's start
# (each re-run resumes where the killed one left off).
KILL_COMMAND = [*FAST, "schedule.epochs=2", "data.synthetic_classes=2", "schedule.checkpoint_every_n_steps=3",
                "trainer.log_every_n_steps=1"]
KILLS = [
    "last.ckpt:1:partial",       # the first step checkpoint half written: the re-run starts cleanly
    "last.prev.ckpt:1:before",   # while the previous last.ckpt is being kept
    "best.ckpt:1:after",         # epoch 0's best written, the epoch-end last.ckpt not yet
    "last.ckpt:1:after",         # then last.ckpt is damaged by hand: the re-run resumes from last.prev.ckpt
    "best.ckpt:1:partial",       # epoch 1's best half written: epoch 0's stays
    "summary.json:1:partial",    # the summary half written: the re-run writes it again
]


def best_score(ckpt: Path) -> float:
    callbacks = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [v for k, v in callbacks.items() if k.startswith("ModelCheckpoint")]
    return float(state["best_model_score"])


@pytest.mark.slow
def test_killed_at_every_kind_of_checkpoint_write_the_same_command_resumes_and_keeps_the_best(tmp_path, data_dir):
    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "sitecustomize.py").write_text(KILLER)
    straight_out = tmp_path / "straight" / "outputs"
    straight = start("train.py", KILL_COMMAND, straight_out, data_dir, log=tmp_path / "straight.log")
    assert straight.wait(timeout=900) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    expected = json.loads((only_run_dir(straight_out) / "summary.json").read_text())

    output = tmp_path / "outputs"
    env = {"PYTHONPATH": f"{killer}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    best_seen = None
    for i, kill in enumerate(KILLS):
        log = tmp_path / f"{i}.log"
        proc = start("train.py", KILL_COMMAND, output, data_dir, env={**env, "VITLAB_TEST_KILL": kill}, log=log)
        assert proc.wait(timeout=900) == 9, f"{kill}: the kill point was not reached\n{log.read_text()[-3000:]}"
        if i:  # every re-run starts cleanly or resumes: never fails on what the kill left
            assert "resuming from" in log.read_text() or "starting a new run" in log.read_text()
        ckpts = only_run_dir(output) / "checkpoints"
        if (ckpts / "best.ckpt").exists():  # the best checkpoint is never lost, nor its score lowered
            score = best_score(ckpts / "best.ckpt")
            assert best_seen is None or score >= best_seen, kill
            best_seen = score
        else:
            assert best_seen is None, f"{kill}: best.ckpt lost"
        if kill == "last.ckpt:1:after":
            (ckpts / "last.ckpt").write_bytes(b"\0" * 1000)  # damaged after it was written
    log = tmp_path / "final.log"
    final = start("train.py", KILL_COMMAND, output, data_dir, log=log)
    assert final.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "resuming from" in log.read_text()
    first_damaged = (tmp_path / f"{KILLS.index('last.ckpt:1:after') + 1}.log").read_text()
    assert f"{ckpts / 'last.ckpt'} is damaged" in first_damaged and "resuming from " in first_damaged
    assert str(ckpts / "last.prev.ckpt") in first_damaged
    summary = json.loads((only_run_dir(output) / "summary.json").read_text())
    assert summary["global_step"] == expected["global_step"] == 20
    assert summary["best_score"] == expected["best_score"] == best_score(ckpts / "best.ckpt")
    a = torch.load(ckpts / "best.ckpt", weights_only=True)["state_dict"]
    b = torch.load(only_run_dir(straight_out) / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)  # the best weights are the uninterrupted run's
    rows = list(csv.DictReader((only_run_dir(output) / "csv" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(20))  # the history holds every step once


def test_resume_reads_the_checkpoint_once_before_lightning(tmp_path, monkeypatch):
    """Deciding to resume reads last.ckpt whole (it checks the file) and hands on its global step, which
    the loggers need: no second read of a checkpoint that can be gigabytes on a shared filesystem
    (Lightning's own load is the only other)."""
    from vitlab.runtime import run

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.save({"global_step": 9}, ckpts / "last.ckpt")
    reads = []
    real = run.read_checkpoint
    monkeypatch.setattr(run, "read_checkpoint", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    cfg = OmegaConf.create({"resume": "auto", "ckpt_path": None})
    assert plan_resume(cfg, tmp_path) == (str(ckpts / "last.ckpt"), None, 9) and len(reads) == 1
    explicit = OmegaConf.create({"resume": "auto", "ckpt_path": str(ckpts / "last.ckpt")})
    assert plan_resume(explicit, tmp_path / "elsewhere") == (str(ckpts / "last.ckpt"), None, 9) and len(reads) == 2
    import inspect
    module = inspect.getsource(run)
    train = module[module.index("\ndef train("):module.index("\ndef ", module.index("\ndef train(") + 1)]
    assert "plan_resume(" in train and "read_checkpoint(" not in train
