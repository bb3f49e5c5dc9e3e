"""Helpers shared by the tests (not a test file): the repository, tiny model overrides, and
running the command-line entry points as a user does."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torch import nn

REPO = Path(__file__).resolve().parents[1]

# A PVTv2-B0 shrunk to one block per stage: fast, and still the real family code.
TINY_PVT = [
    "backbone=pvt_v2_b0",
    "backbone.depths=[1,1,1,1]",
    "backbone.embed_dims=[16,32,48,64]",
    "backbone.num_heads=[1,1,2,2]",
    "backbone.drop_path_rate=0.0",
]
# The shared smoke sweep (conftest.py ``smoke_sweep``): a backbone field with two values, times two seeds.
SWEEP_RATIOS = ["[4,4,4,4]", "[2,2,2,2]"]
SWEEP_SEEDS = [0, 1]
# The demo on 32 px images, no workers, no progress bar: a real training run in seconds.
FAST = [*TINY_PVT, "experiment=demo", "data.num_workers=0", "data.img_size=32", "data.batch_size=16",
        "trainer.enable_progress_bar=false", "callbacks.progress_bar=null"]


def run_script(script: str, args: list[str], data_dir: Path, env: dict | None = None, check: bool = True,
               timeout: int = 600, cwd: Path | None = None):
    """``python src/<script> args...`` in a subprocess, generated data under ``data_dir``."""
    full_env = {**os.environ, "VITLAB_DATA": str(data_dir), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1",
                "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / script), *args], cwd=cwd or REPO, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


class StandIn(nn.Module):
    """A backbone following the contract: strided convs, one map per entry of ``strides``."""

    def __init__(self, channels=(8, 16, 24, 32), strides=(4, 8, 16, 32)):
        super().__init__()
        self.out_channels, self.strides = list(channels), list(strides)
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 3, padding=1) for c in channels)

    def forward(self, x):
        return [conv(nn.functional.avg_pool2d(x, s)) for conv, s in zip(self.convs, self.strides)]
