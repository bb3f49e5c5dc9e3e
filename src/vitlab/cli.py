"""Command-line entry points: ``src/train.py`` / ``src/eval.py`` / ``src/predict.py`` and the console
scripts ``vitlab-train`` / ``vitlab-eval`` / ``vitlab-predict`` (pyproject.toml) run these same functions.

The configs are found through ``vitlab.resources.conf_dir()``: the repository's ``conf/`` in a
source checkout, the package data of an installed wheel, so the commands work from any directory.

A ``VitlabUserError`` (bad data, config values, weights, checkpoints, a run directory another
process owns) is printed as one block and the command exits with code 2; any other exception is
a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows user errors' tracebacks too.
"""
from __future__ import annotations

import functools
import os
import sys

import hydra
from omegaconf import DictConfig

from vitlab.errors import EXIT_USER_ERROR, VitlabUserError
from vitlab.resources import conf_dir
from vitlab.run import evaluate, train


def user_error_in(err: BaseException) -> VitlabUserError | None:
    """``err`` or the user error it was raised from (a library may wrap ours, e.g. a DataLoader worker's)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, VitlabUserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def user_errors_as_messages(body):
    """Run ``body``; a user error becomes its message on stderr and exit code 2 (SystemExit passes
    through Hydra's error reporting, which would print a traceback for an exception)."""

    @functools.wraps(body)
    def run(cfg: DictConfig):
        try:
            return body(cfg)
        except Exception as err:
            user = user_error_in(err)
            if user is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"\nError ({type(user).__name__}): {user}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return run


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


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="predict")
@user_errors_as_messages
def predict_main(cfg: DictConfig) -> None:
    """Run a checkpoint on image files: ``vitlab-predict ckpt_path=.../best.ckpt inputs=photos/``."""
    from vitlab.predict import predict

    predict(cfg)
