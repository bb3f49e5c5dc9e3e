"""Run directories that are a function of the command, so re-running a command finds its run.

    outputs/<task>/<backbone>/<experiment or "default">[-<hash of the other overrides>]
    multirun/<sweep preset or "sweep">-<hash of the sweep's overrides>/<job number>

``resume``, ``ckpt_path`` and the overrides already spelled out in the path do not count;
``resume=never`` never reuses a directory that holds something: it takes ``<name>-2``, ``-3``, ...
Registered as OmegaConf resolvers (``vitlab.run_dir``, ``vitlab.sweep_dir``) used by
``conf/hydra/default.yaml`` by ``vitlab.runtime.config.register_resolvers`` (the entry points call it).

A run directory has one owner (``owned``): the process that trains in it holds an OS lock on
``<run dir>/.lock`` while it runs, so a second copy of the same command cannot write the same
checkpoints and history.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import weakref
from pathlib import Path

from vitlab.errors import VitlabUserError

log = logging.getLogger("vitlab")

SWEEP_DIR_ENV = "VITLAB_SWEEP_DIR"
# Overrides that do not change what a run computes, or that the path already names.
NOT_IN_HASH = ("resume", "ckpt_path", "requeue_lock_wait_s", "task", "backbone", "experiment")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def overrides_hash(overrides) -> str | None:
    kept = sorted(str(o) for o in overrides or [] if _key(str(o)) not in NOT_IN_HASH)
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:8] if kept else None


def _fresh(path: Path, resume: str) -> Path:
    """With ``resume=never``, the first of path, path-2, path-3, ... that is empty or absent."""
    if resume != "never":
        return path
    candidate, n = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def run_dir(root: str, task: str, backbone: str, experiment, overrides, resume: str = "auto") -> str:
    name = experiment or "default"
    digest = overrides_hash(overrides)
    if digest:
        name = f"{name}-{digest}"
    return str(_fresh(Path(root) / str(task) / str(backbone) / name, str(resume)))


def sweep_dir(root: str, sweep, overrides, resume: str = "auto", job=None, *, _root_=None) -> str:
    """Hydra resolves the sweep directory in the launching process (``job`` null, with the sweep's
    overrides, ``lr=1e-3,1e-4``) and again in every job (``job``: its number, with that job's values).
    The launching process decides once per sweep (per master config: a second sweep in the same
    process decides anew) and hands its answer to the jobs in the environment, which jobs inherit
    (in-process jobs, and submitit/SLURM jobs, requeued ones included)."""
    if job is not None and os.environ.get(SWEEP_DIR_ENV):
        return os.environ[SWEEP_DIR_ENV]
    known = _decided.get(id(_root_))
    if known is not None and known[0]() is _root_:  # this sweep asked before (e.g. per launched batch)
        return known[1]
    kept = [o for o in overrides or [] if _key(str(o)) not in ("resume", "ckpt_path")]
    digest = hashlib.sha1("\n".join(sorted(map(str, kept))).encode()).hexdigest()[:8]
    path = str(_fresh(Path(root) / f"{sweep or 'sweep'}-{digest}", str(resume)))
    if job is None and _root_ is not None:
        for key in [k for k, (ref, _) in _decided.items() if ref() is None]:
            del _decided[key]
        _decided[id(_root_)] = (weakref.ref(_root_), path)
        os.environ[SWEEP_DIR_ENV] = path
    return path


# The launching process's decision per master config (id -> (weak reference, directory)).
_decided: dict[int, tuple[weakref.ref, str]] = {}


# ---- ownership ------------------------------------------------------------------------------
LOCK_FILE = ".lock"


class RunDirLockedError(VitlabUserError):
    """Another live process trains in this run directory."""


# Lock descriptors this process holds. A forked child (loader workers, the mask-paste pool, a packer)
# shares the parent's open file, and flock is released only when every copy is closed: an orphaned
# worker of a killed run would keep its directory locked against the re-run. Children close theirs.
_held_locks: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def _is_requeued_copy(owner: dict) -> bool:
    """This process is a requeued SLURM job whose previous copy may still be ending (SLURM restarts a
    job while the old copy saves and exits): the same job id, or SLURM's restart count above 0."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return bool(job) and (owner.get("slurm_job") == job or (restarts.isdigit() and int(restarts) > 0))


def _is_rank_zero() -> bool:
    """Rank 0 of a distributed run owns its directory; other ranks (other nodes too) don't take the lock."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") in ("", "0")


@contextlib.contextmanager
def owned(run_dir: Path, requeue_wait_s: float = 300.0, poll_s: float = 1.0):
    """Hold ``<run_dir>/.lock`` (``fcntl.flock``) for the body: the kernel drops the lock when the
    process dies however it dies, so a killed run never leaves a stale lock. A second process stops
    at once with ``RunDirLockedError`` naming the owner, unless it is a requeued SLURM job, which
    waits up to ``requeue_wait_s`` for its previous copy to end. Other DDP ranks skip the lock.

    Hand-written over ``filelock``: the file must keep the owner's PID and host for the second
    process to read, and flock on our own descriptor does that in a few lines."""
    if not _is_rank_zero():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the owner's record stays readable
    try:
        deadline, waiting = None, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # NFS: Linux maps flock to NFS byte-range locks
                break
            except BlockingIOError:
                owner = _owner(fd)
                if deadline is None:
                    waiting = _is_requeued_copy(owner)
                    deadline = time.monotonic() + (requeue_wait_s if waiting else 0)
                    if waiting:
                        log.warning("run directory %s is still held by PID %s on %s (this job's previous copy?): "
                                    "waiting up to %gs for it to end", run_dir, owner.get("pid", "?"),
                                    owner.get("host", "?"), requeue_wait_s)
                if time.monotonic() >= deadline:
                    waited = f" (waited {requeue_wait_s:g}s: requeue_lock_wait_s)" if waiting else ""
                    raise RunDirLockedError(
                        f"run directory {run_dir} is in use by another process: PID {owner.get('pid', '?')} on host "
                        f"{owner.get('host', '?')} (started {owner.get('started', '?')}) holds {path}{waited}. Two "
                        f"copies of one run would write the same checkpoints and history. Wait for it to end (a "
                        f"re-run then resumes), stop it, or start a separate run beside it with resume=never.")
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
        }).encode(), 0)
        _held_locks.add(fd)
        yield
    finally:
        _held_locks.discard(fd)
        os.close(fd)  # releases the lock (the file stays: removing it would race with a waiting process)
