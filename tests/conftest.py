"""Shared fixtures: a generated dataset made once per session, a runner for src/train.py, and
one smoke sweep shared by the compare, dashboard and export tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import SWEEP_RATIOS, SWEEP_SEEDS, TINY_PVT, run_script


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


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, data_dir) -> Path:
    """The sweep directory of ``train.py -m`` over ``backbone.mlp_ratios`` (SWEEP_RATIOS) x ``seed``
    (SWEEP_SEEDS): four W&B-offline smoke jobs of the tiny PVTv2 on generated data, one per
    ``<sweep dir>/<job number>``. Tests read it; they write elsewhere."""
    sweep = tmp_path_factory.mktemp("multirun") / "sweep-smoke"
    run_script("train.py", ["-m", *TINY_PVT, "experiment=demo", "debug=smoke", "data.img_size=32", "logger=wandb",
                            f"backbone.mlp_ratios={','.join(SWEEP_RATIOS)}", f"seed={','.join(map(str, SWEEP_SEEDS))}",
                            f"hydra.sweep.dir={sweep}"], data_dir)
    return sweep
