"""Helpers shared by the tests (not a test file): the repository, tiny model overrides, running
the command-line entry points as a user does (a subprocess) or in this process (``hydra_command``)."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
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
# The shared dense smoke runs (conftest ``detection_run``, ``segmentation_run``): narrow heads, 4
# generated training images and 9 validation images (an odd count, for the DDP evaluation test).
_DENSE_DATA = ["debug=smoke", "data.synthetic=true", "data.synthetic_num_train=4", "data.synthetic_num_val=9",
               "data.smoke_images=9", "logger=csv"]
DENSE_SMOKE = {
    "coco_maskrcnn": [*_DENSE_DATA, "module.head.fpn_channels=16"],
    "ade20k_fpn": [*_DENSE_DATA, "module.head.fpn_channels=16", "module.head.channels=16"],
}


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


@contextlib.contextmanager
def process_state_restored():
    """Whatever an in-process run changes in this process is put back afterwards, so runs do not leak
    into later tests: environment variables (``PL_GLOBAL_SEED``, ``VITLAB_SWEEP_DIR``), RNG states, torch threads and flags, the logging handlers Hydra's job
    logging installs (its ``<run dir>/<job>.log`` file is closed), the signal handlers of
    ``vitlab.runtime.callbacks.LastCheckpoint``, the working directory, warning filters and the HydraConfig
    Hydra's run sets."""
    from hydra.core.hydra_config import HydraConfig

    environ, cwd = dict(os.environ), os.getcwd()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch_flags = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.get_float32_matmul_precision(), torch.get_default_dtype())
    signals = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    loggers = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
               for name, lg in [("", logging.root), *logging.root.manager.loggerDict.items()]
               if isinstance(lg, logging.Logger)}
    hydra_cfg = HydraConfig.instance().cfg
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        torch.set_num_threads(torch_flags[0])
        torch.use_deterministic_algorithms(torch_flags[1])
        torch.set_float32_matmul_precision(torch_flags[2])
        torch.set_default_dtype(torch_flags[3])
        for sig, handler in signals.items():
            signal.signal(sig, handler)
        for name, lg in [("", logging.root), *logging.root.manager.loggerDict.items()]:
            if not isinstance(lg, logging.Logger):
                continue
            level, handlers, propagate, disabled = loggers.get(name, (logging.NOTSET, [], True, False))
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
        HydraConfig.instance().cfg = hydra_cfg


def hydra_command(script: str, args: list[str], data_dir: Path, env: dict | None = None):
    """``python src/<script> args...`` in this process: Hydra's own run (``-m`` in ``args``: multirun)
    of the entry point's body, ``vitlab.runtime.cli.train_job`` / ``eval_job`` / ``vitlab.tools.predict.predict``. This is the code
    ``@hydra.main`` runs (vitlab.runtime.cli): the config is composed from the command line, HydraConfig set,
    ``hydra.runtime.output_dir`` set to what the command's ``hydra.run.dir`` (``hydra.sweep.dir``)
    resolves to, ``.hydra/`` and the job's log file written. What the run changes in this process
    is undone (``process_state_restored``). Returns the summary (multirun: the jobs' summaries);
    a failing run raises its exception."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vitlab.runtime.cli import eval_job, train_job
    from vitlab.runtime.config import register_resolvers
    from vitlab.runtime.resources import conf_dir
    from vitlab.tools.predict import predict

    register_resolvers()
    body = {"train.py": train_job, "eval.py": eval_job, "predict.py": predict}[script]
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if multirun:
        overrides.append("hydra.mode=MULTIRUN")  # what Hydra's command line adds for -m (hydra/_internal/utils.py)
    full_env = {"VITLAB_DATA": str(data_dir), "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", **(env or {})}
    with process_state_restored():
        os.environ.update(full_env)
        job_name = Path(script).stem
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name=job_name):
            hydra = GlobalHydra.instance().hydra
            if not multirun:
                return hydra.run(job_name, body, overrides).return_value
            batches = hydra.multirun(job_name, body, overrides) or []
            return [job.return_value for batch in batches for job in batch]


class StandIn(nn.Module):
    """A backbone following the contract: strided convs, one map per entry of ``strides``."""

    def __init__(self, channels=(8, 16, 24, 32), strides=(4, 8, 16, 32)):
        super().__init__()
        self.out_channels, self.strides = list(channels), list(strides)
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 3, padding=1) for c in channels)

    def forward(self, x):
        return [conv(nn.functional.avg_pool2d(x, s)) for conv, s in zip(self.convs, self.strides)]


# ----------------------------------------------------------------------------- W&B's own record of a run
def wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks
    of [crc32, length, type] chunks around protobuf ``Record``s). Tests only: they check what W&B
    itself recorded (config, summary, history, tables) against what vitlab meant to log, and wandb
    >= 0.19 has no public reader of offline runs (vitlab.tools.dashboard reads summary.json instead)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log (no ':W&B' header)")
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start, MIDDLE/LAST extend
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run_info(path: Path) -> dict:
    """Identity (id, project, entity, group), config, summary keys, numeric history keys and step
    metric of one offline W&B run, from its ``.wandb`` log (``wandb_records``)."""
    import json

    info = {"history": set(), "step_metric": None, "config": {}, "summary": set()}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            info["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            info["summary"] |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
        elif kind == "run":
            run = record.run
            info.update(wandb_id=run.run_id, project=run.project or None, entity=run.entity or None,
                        group=run.run_group or None)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                if not key.startswith("_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    info["history"].add(key)
        elif kind == "metric" and record.metric.step_metric and not info["step_metric"]:
            info["step_metric"] = record.metric.step_metric  # Lightning: trainer/global_step
    return info
