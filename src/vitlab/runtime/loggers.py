"""Loggers whose history survives a resume (the rest in conf/logger/ are Lightning's own)."""
from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run keeps it and appends.

    Rows an interrupted attempt logged after its last checkpoint (``step >= resume_step``) are
    dropped, because the resumed run logs those steps again.
    """

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        if self.resume_step is not None:
            rows = [r for r in rows if not r.get("step") or int(float(r["step"])) < self.resume_step]
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that continues ``metrics.csv`` across attempts of the same run."""

    def __init__(self, *args, resume_step: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


def mlflow_names(params: dict) -> dict:
    """Nested keys with the characters MLflow refuses in parameter names (Hydra's ``group@_global_``
    choices) replaced by ``_``."""
    import re

    return {re.sub(r"[^\w\-. :/]", "_", str(k)): mlflow_names(v) if isinstance(v, dict) else v for k, v in params.items()}


# ---- what W&B gets beyond scalars, for the other loggers (tables, the final summary) ---------------
def log_table(logger, tag: str, columns: list[str], rows: list[list], step: int) -> None:
    """A table (per-class results) in each logger's own form: a W&B Table; an MLflow JSON artifact
    ``<tag>/step_<N>.json`` in the {"columns", "data"} layout ``mlflow.log_table`` writes (written with
    ``log_dict``: ``log_table`` would need pandas); a markdown table as TensorBoard text."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_table(key=tag, columns=columns, data=rows, step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_dict(logger.run_id, {"columns": columns, "data": rows}, f"{tag}/step_{step}.json")
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, markdown_table(columns, rows), global_step=step)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [columns, ["---"] * len(columns), *([cell(v) for v in row] for row in rows)]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def log_summary(logger, summary: dict) -> None:
    """The run's summary.json at its end: W&B's run summary, an MLflow artifact ``summary.json``,
    TensorBoard text ``summary``. W&B's run is closed here (the next job of a -m sweep gets its own)."""
    import json

    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    plain = {k: v for k, v in summary.items() if k not in ("extra", "wandb")}
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(plain)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_dict(logger.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")
    elif isinstance(logger, TensorBoardLogger):
        # the HPARAMS tab: the run's hyper-parameters with its final val/ metrics (the plugin reads their
        # values from the scalar series of the same names), written as SummaryWriter.add_hparams writes them
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(logger.hparams).items()}
        writer = logger.experiment
        for part in hparams(values, {k: v for k, v in plain.items() if k.startswith("val/") and isinstance(v, float)}):
            writer._get_file_writer().add_summary(part)
        writer.add_text("summary", "```\n" + json.dumps(plain, indent=2, default=str) + "\n```")
        writer.flush()


def flatten(params: dict, prefix: str = "") -> dict:
    """Nested dicts -> one level, keys joined with ``/`` (as Lightning flattens hyper-parameters)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def log_images(logger, tag: str, images: list, step: int) -> bool:
    """H x W x 3 uint8 figures: W&B images, MLflow artifacts ``<tag>/step_<N>_<i>.png``, TensorBoard
    images ``<tag>/<i>``. False when the logger keeps no images (the caller writes PNGs)."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=list(images), step=step)
    elif isinstance(logger, MLFlowLogger):
        for i, image in enumerate(images):
            logger.experiment.log_image(logger.run_id, image, artifact_file=f"{tag}/step_{step}_{i}.png")
    elif isinstance(logger, TensorBoardLogger):
        for i, image in enumerate(images):
            logger.experiment.add_image(f"{tag}/{i}", image, global_step=step, dataformats="HWC")
    else:
        return False
    return True
