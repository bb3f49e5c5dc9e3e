"""Shared fixtures: a generated dataset made once per session, and a runner for src/train.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import run_script


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` for test runs; synthetic datasets are generated here once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def train_run(data_dir):
    """Run ``src/train.py`` with overrides into ``run_dir``; return the parsed summary.json."""

    def _run(run_dir: Path, *overrides: str, env: dict | None = None) -> dict:
        run_script("train.py", [*overrides, f"hydra.run.dir={run_dir}"], data_dir, env=env)
        return json.loads((Path(run_dir) / "summary.json").read_text())

    return _run
