"""Run directories that are a function of the command, so re-running a command finds its run.

    outputs/<task>/<backbone>/<experiment or "default">[-<hash of the other overrides>]
    multirun/<sweep preset or "sweep">-<hash of the sweep's overrides>/<job number>

``resume``, ``ckpt_path`` and the overrides already spelled out in the path do not count;
``resume=never`` never reuses a directory that holds something: it takes ``<name>-2``, ``-3``, ...
Registered as OmegaConf resolvers (``vitlab.run_dir``, ``vitlab.sweep_dir``) used by
``conf/hydra/default.yaml``; importing ``vitlab.runtime.run`` registers them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import OmegaConf

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


def sweep_dir(root: str, sweep, overrides, resume: str = "auto") -> str:
    """Hydra resolves the sweep directory in the launching process (with the sweep's overrides,
    ``lr=1e-3,1e-4``) and again in every job (with that job's values). The launching process's
    answer is the sweep's: it is kept in the environment, which jobs inherit (in-process jobs, and
    submitit/SLURM jobs, requeued ones included)."""
    if os.environ.get(SWEEP_DIR_ENV):
        return os.environ[SWEEP_DIR_ENV]
    kept = [o for o in overrides or [] if _key(str(o)) not in ("resume", "ckpt_path")]
    digest = hashlib.sha1("\n".join(sorted(map(str, kept))).encode()).hexdigest()[:8]
    path = str(_fresh(Path(root) / f"{sweep or 'sweep'}-{digest}", str(resume)))
    os.environ[SWEEP_DIR_ENV] = path
    return path


def register_resolvers() -> None:
    for name, fn in (("vitlab.run_dir", run_dir), ("vitlab.sweep_dir", sweep_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
