"""Command-line entry points: ``src/train.py`` / ``src/eval.py`` and the console scripts ``vitlab-train`` /
``vitlab-eval`` (pyproject.toml) run these same functions (``src/predict.py``, a tool on a checkpoint,
is ``vitlab.tools.predict.main``).

The configs are found through ``vitlab.runtime.resources.conf_dir()``: the repository's ``conf/`` in a
source checkout, the package data of an installed wheel, so the commands work from any directory.

A ``VitlabUserError`` (bad data, config values, weights, checkpoints, a run directory another
process owns) is printed as one block and the command exits with code 2; any other exception is
a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows user errors' tracebacks too.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vitlab.errors import user_errors_as_messages
from vitlab.runtime.resources import conf_dir
from vitlab.runtime.run import evaluate, train


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
@user_errors_as_messages
def train_main(cfg: DictConfig) -> float | None:
    """Train any backbone on any task: ``vitlab-train backbone=pvt_v2_b2 task=imagenet_cls``."""
    summary = train(cfg)
    return summary.get("best_score")  # what sweepers optimise


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
@user_errors_as_messages
def eval_main(cfg: DictConfig) -> None:
    """Evaluate a checkpoint: ``vitlab-eval ckpt_path=.../best.ckpt``."""
    evaluate(cfg)

