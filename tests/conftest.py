"""Shared fixtures: a generated dataset made once per session, runners for src/train.py and
src/eval.py (``support.run_script``: each command in a process of its own), one smoke sweep
shared by the compare, dashboard, export and predict tests, and one smoke checkpoint per dense task (detection, segmentation) shared by the predict,
export and DDP tests. With pytest-xdist every worker makes its own copies: they are seconds each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import DENSE_SMOKE, SWEEP_RATIOS, SWEEP_SEEDS, TINY_PVT, run_script


# torch's thread count when the session starts (make test: OMP_NUM_THREADS=1, one per xdist worker).
# A test that changes it would slow every later test of its worker: more threads than cores spin.
THREADS = torch.get_num_threads()


def pytest_collection_finish(session):
    if torch.get_num_threads() != THREADS:
        raise pytest.UsageError(f"a test module changed torch's thread count at import ({THREADS} -> "
                                f"{torch.get_num_threads()}); set it inside the test and restore it")
    # The README's commands build on each other and must share a worker (xdist_group + --dist loadgroup);
    # pytest-xdist marks grouped tests by suffixing their node id, which pytest 9 silently ignores.
    if getattr(session.config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        ungrouped = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"--dist loadgroup is not grouping tests (pytest/pytest-xdist versions?): {ungrouped[0]}")


@pytest.fixture(autouse=True)
def torch_threads_kept():
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``paths.data_dir`` for test runs; synthetic datasets are generated here once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def train_run(data_dir):
    """Run ``src/train.py`` with overrides into ``run_dir``; return the summary (read back from
    summary.json, as a user would)."""

    def _run(run_dir: Path, *overrides: str, env: dict | None = None) -> dict:
        run_script("train.py", [*overrides, f"hydra.run.dir={run_dir}"], data_dir, env=env)
        return json.loads((Path(run_dir) / "summary.json").read_text())

    return _run


@pytest.fixture
def eval_run(data_dir):
    """Run ``src/eval.py ckpt_path=CKPT overrides...`` into ``run_dir``; return the summary."""

    def _run(run_dir: Path, ckpt: Path | str, *overrides: str) -> dict:
        run_script("eval.py", [f"ckpt_path={ckpt}", *overrides, f"hydra.run.dir={run_dir}"], data_dir)
        return json.loads((Path(run_dir) / "summary.json").read_text())

    return _run


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory, data_dir) -> Path:
    """The sweep directory of ``train.py -m`` over ``backbone.mlp_ratios`` (SWEEP_RATIOS) x ``seed``
    (SWEEP_SEEDS): four W&B-offline smoke jobs of the tiny PVTv2 on 10 generated classes, one per
    ``<sweep dir>/<job number>``. Tests read it; they write elsewhere (the predict test moves its
    generated data away and back)."""
    sweep = tmp_path_factory.mktemp("multirun") / "sweep-smoke"
    run_script("train.py", ["-m", *TINY_PVT, "experiment=demo", "debug=smoke", "data.img_size=32", "logger=wandb",
                               f"backbone.mlp_ratios={','.join(SWEEP_RATIOS)}", f"seed={','.join(map(str, SWEEP_SEEDS))}",
                               f"data.synthetic_root={sweep.parent / 'data'}", f"hydra.sweep.dir={sweep}"], data_dir)
    return sweep


def _dense_smoke_run(tmp_path_factory, data_dir, task: str) -> Path:
    run = tmp_path_factory.mktemp(task) / "run"
    run_script("train.py", [*TINY_PVT, f"task={task}", *DENSE_SMOKE[task], f"data.synthetic_root={run.parent / 'data'}",
                               f"hydra.run.dir={run}"], data_dir)
    return run


@pytest.fixture(scope="session")
def detection_run(tmp_path_factory, data_dir) -> Path:
    """The run directory of a Mask R-CNN smoke run (``DENSE_SMOKE``): 9 generated validation images."""
    return _dense_smoke_run(tmp_path_factory, data_dir, "coco_maskrcnn")


@pytest.fixture(scope="session")
def segmentation_run(tmp_path_factory, data_dir) -> Path:
    """The run directory of a Semantic FPN smoke run on generated ADE20K (``DENSE_SMOKE``): 9 validation images."""
    return _dense_smoke_run(tmp_path_factory, data_dir, "ade20k_fpn")
