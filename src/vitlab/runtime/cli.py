"""Command-line entry points: ``src/train.py`` / ``src/eval.py`` and the console scripts ``vitlab-train`` /
``vitlab-eval`` (pyproject.toml) run these same functions (``src/predict.py``, a tool on a checkpoint,
is ``vitlab.tools.predict.main``).

The configs are found through ``vitlab.runtime.resources.conf_dir()``: the repository's ``conf/`` in a
source checkout, the package data of an installed wheel, so the commands work from any directory.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vitlab.runtime.resources import conf_dir
from vitlab.runtime.run import evaluate, train


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    """Train any backbone on any task: ``vitlab-train backbone=pvt_v2_b2 task=imagenet_cls``."""
    summary = train(cfg)
    return summary.get("best_score")  # what sweepers optimise


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def eval_main(cfg: DictConfig) -> None:
    """Evaluate a checkpoint: ``vitlab-eval ckpt_path=.../best.ckpt``."""
    evaluate(cfg)

