"""Command-line entry points: ``src/train.py`` / ``src/eval.py`` and the console scripts ``vitlab-train`` /
``vitlab-eval`` (pyproject.toml) run these same functions (``src/predict.py``, a tool on a checkpoint,
is ``vitlab.tools.predict.main``).

The configs are found through ``vitlab.runtime.resources.conf_dir()``: the repository's ``conf/`` in a
source checkout, the package data of an installed wheel, so the commands work from any directory.
Hydra's global state (``HydraConfig``) is read here only, once per job (``run_context``); the run
gets what it needs as a ``RunContext``.

A ``VitlabUserError`` (bad data, config values, weights, checkpoints, a run directory another
process owns) is printed as one block and the command exits with code 2; any other exception is
a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows user errors' tracebacks too.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from vitlab.errors import user_errors_as_messages
from vitlab.runtime.config import files_parsed_once, register_resolvers
from vitlab.runtime.resources import conf_dir
from vitlab.runtime.run import RunContext, evaluate, train


def run_context() -> RunContext:
    """The running Hydra job's output directory, command-line overrides, group choices and sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return RunContext(
        run_dir=Path(hc.runtime.output_dir),
        overrides=tuple(hc.overrides.task),
        choices={k: v for k, v in hc.runtime.choices.items() if isinstance(v, str)},
        sweep=Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None,
    )


def train_job(cfg: DictConfig) -> float | None:
    """The body of one training job under Hydra (each job of a ``-m`` sweep)."""
    summary = train(cfg, run_context())
    return summary.get("best_score")  # what sweepers optimise


def eval_job(cfg: DictConfig) -> None:
    evaluate(cfg, run_context())


def train_main() -> float | None:
    """Train any backbone on any task: ``vitlab-train backbone=pvt_v2_b2 task=imagenet_cls``."""
    register_resolvers()  # the run directory's (conf/hydra/default.yaml), before Hydra resolves it
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
    with files_parsed_once():  # a sweep's jobs compose from files parsed once, not twice a job
        return app(user_errors_as_messages(train_job))()


def eval_main() -> None:
    """Evaluate a checkpoint: ``vitlab-eval ckpt_path=.../best.ckpt``."""
    register_resolvers()
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
    with files_parsed_once():
        app(user_errors_as_messages(eval_job))()
