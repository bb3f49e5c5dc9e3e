"""Run directories that are a function of the command, so re-running a command finds its run.

    outputs/<task>/<backbone>/<experiment or "default">[-<hash of the other overrides>]
    multirun/<sweep preset or "sweep">-<hash of the sweep's overrides>/<job number>

``resume``, ``ckpt_path`` and the overrides already spelled out in the path do not count;
``resume=never`` never reuses a directory that holds something: it takes ``<name>-2``, ``-3``, ...
Registered as OmegaConf resolvers (``vitlab.run_dir``, ``vitlab.sweep_dir``) used by
``conf/hydra/default.yaml`` by ``vitlab.runtime.config.register_resolvers`` (the entry points call it).
"""
from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path

SWEEP_DIR_ENV = "VITLAB_SWEEP_DIR"
# Overrides that do not change what a run computes, or that the path already names.
NOT_IN_HASH = ("resume", "ckpt_path", "task", "backbone", "experiment")


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
