"""Shared fixtures: a generated dataset made once per session, and a runner for src/train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A PVTv2-B0 shrunk to one block per stage: fast, and still the real family code.
TINY_PVT = [
    "backbone=pvt_v2_b0",
    "backbone.depths=[1,1,1,1]",
    "backbone.embed_dims=[16,32,48,64]",
    "backbone.num_heads=[1,1,2,2]",
    "backbone.drop_path_rate=0.0",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` for test runs; synthetic datasets are generated here once."""
    return tmp_path_factory.mktemp("data")


def run_script(script: str, args: list[str], data_dir: Path, env: dict | None = None, check: bool = True, timeout: int = 600):
    full_env = {**os.environ, "VITLAB_DATA": str(data_dir), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1",
                "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / script), *args], cwd=REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def train_run(data_dir):
    """Run ``src/train.py`` with overrides into ``run_dir``; return the parsed summary.json."""

    def _run(run_dir: Path, *overrides: str, env: dict | None = None) -> dict:
        run_script("train.py", [*overrides, f"hydra.run.dir={run_dir}"], data_dir, env=env)
        return json.loads((Path(run_dir) / "summary.json").read_text())

    return _run
