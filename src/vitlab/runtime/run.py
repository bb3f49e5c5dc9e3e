"""The bodies of ``src/train.py`` and ``src/eval.py``: check, build, fit/validate, summarise.

Data flow of a training run (see docs/design.md):

    composed config --check_run_config--> DataModule (data:) --.info--> task module (module:,
    backbone:, schedule:) --> Lightning Trainer (trainer:, callbacks:, logger:) --fit-->
    checkpoints (+ the resolved config) --> summary.json

The run directory is a function of the command (``vitlab.runtime.rundir``); ``resume=auto`` continues a
run from its ``last.ckpt``. Every object is built through ``vitlab.runtime.build.instantiate``, which
only accepts the classes vitlab's own configs name.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from vitlab.data.base import DatasetInfo
from vitlab.errors import VitlabUserError
from vitlab.runtime.extras import require
from vitlab.runtime.build import instantiate, locate
from vitlab.runtime.callbacks import FastPaths, LastCheckpoint, RunConfigInCheckpoint
from vitlab.runtime.checkpoints import (AtomicCheckpointIO, CheckpointMismatchError, previous_of, read_checkpoint,
                                        write_atomically)
from vitlab.runtime.flops import count_gmacs, count_params
from vitlab.runtime.loggers import ResumableCSVLogger, log_summary, mlflow_names
from vitlab.runtime.rundir import LOCK_FILE, RunDirLockedError, owned
from vitlab.runtime.trust import check_targets
from vitlab.runtime.validate import check_run_config
from vitlab.runtime.weights import loaded_file, resolve

log = logging.getLogger("vitlab")


@dataclass(frozen=True)
class RunContext:
    """What a run knows from its command line, beyond the config: ``vitlab.runtime.cli`` reads it from
    Hydra once; a plainly composed config runs with the default (its ``paths.output_dir``, no names)."""
    run_dir: Path
    overrides: tuple[str, ...] = ()                   # the command line's overrides (summary, run names)
    choices: dict[str, str] = field(default_factory=dict)  # config-group choices: backbone, schedule, ...
    sweep: str | None = None                          # the -m sweep's directory name (the W&B group)

    @classmethod
    def of(cls, cfg: DictConfig) -> RunContext:
        return cls(run_dir=Path(cfg.paths.output_dir))


# ---- resume -----------------------------------------------------------------------------
class NoGoodCheckpointError(VitlabUserError):
    """Neither ``last.ckpt`` nor the one it replaced can be read."""


def _readable_step(path: Path) -> int | None:
    """The checkpoint's global step, or None (logged, naming the file) when it cannot be read."""
    try:
        return int(read_checkpoint(path, "checkpoint").get("global_step", 0))
    except CheckpointMismatchError as err:
        log.warning("%s is damaged and is not resumed from: %s", path, err)
        return None


def _finished_summary(summary: Path) -> dict | None:
    try:
        done = json.loads(summary.read_text())
    except (OSError, ValueError) as err:  # summary.json is written atomically: only a hand-edited one gets here
        log.warning("%s cannot be read (%s); the run is treated as unfinished", summary, err)
        return None
    return done if isinstance(done, dict) and done.get("status") == "finished" else None


def plan_resume(cfg: DictConfig, run_dir: Path) -> tuple[str | None, dict | None, int | None]:
    """(checkpoint to resume from or None, the summary of an already finished run or None, the
    checkpoint's global step: read here, once, as checking the file reads it whole); logs which of
    the cases applies. A damaged ``last.ckpt`` is named in the log and the run resumes from
    the one it replaced (``last.prev.ckpt``); if neither can be read the command stops, never
    silently starting the run again from scratch."""
    resume, ckpt_path = cfg.get("resume", "auto"), cfg.get("ckpt_path")
    if ckpt_path not in (None, "", "null", "none"):
        step = int(read_checkpoint(ckpt_path, "ckpt_path").get("global_step", 0))  # a clear error for a bad file
        log.info("resuming from ckpt_path=%s (run dir %s)", ckpt_path, run_dir)
        return str(ckpt_path), None, step
    last = run_dir / "checkpoints" / "last.ckpt"
    summary = run_dir / "summary.json"
    if resume == "auto" and summary.is_file():
        done = _finished_summary(summary)
        if done is not None:
            log.info("run %s already finished (summary.json); nothing to do. resume=never starts a new run "
                     "beside it", run_dir)
            return None, done, None
    candidates = [p for p in (last, previous_of(last)) if p.is_file()]
    if resume == "auto" and candidates:
        for path in candidates:
            step = _readable_step(path)
            if step is not None:
                if path != last:  # the damaged file is set aside, and never becomes the next "previous"
                    why = f"{last.name} is missing"
                    if last.is_file():
                        os.replace(last, last.with_name("last.damaged.ckpt"))
                        why = "the damaged file is now last.damaged.ckpt"
                    log.warning("resuming from %s, the checkpoint before %s (%s)", path, last.name, why)
                log.info("resuming from %s (resume=auto; resume=never starts a new run)", path)
                return str(path), None, step
        raise NoGoodCheckpointError(
            f"{run_dir}: no readable checkpoint to resume from ({', '.join(str(p) for p in candidates)} are "
            f"damaged, see above). Move them away to start this run again from scratch, or use resume=never "
            f"for a new run beside it")
    log.info("starting a new run in %s", run_dir)
    return None, None, None


def _holds_only_hydra_files(run_dir: Path) -> bool:
    """A run directory Hydra has just made: its .hydra/ folder and log file, nothing of ours."""
    return run_dir.is_dir() and all(p.name in (".hydra", LOCK_FILE) or p.suffix == ".log" for p in run_dir.iterdir())


# ---- building -----------------------------------------------------------------------------
def build_data_and_module(run_cfg: dict) -> tuple[L.LightningDataModule, L.LightningModule]:
    """The DataModule (its data checked first: ``data.verify``), then the task module with the
    dataset's description (``info``). ``backbone.pretrained=imagenet`` is found (or downloaded) in
    ``paths.weights_dir`` here and handed to the task as the file."""
    datamodule = instantiate(run_cfg["data"], "data")
    if not datamodule.synthetic:  # generated data is made by us in the right format (and may not exist yet)
        datamodule.preflight()
    backbone = run_cfg["backbone"]
    weights_dir = (run_cfg.get("paths") or {}).get("weights_dir")
    if str(backbone.get("pretrained")) == "imagenet" and weights_dir:
        backbone = {**backbone, "pretrained": str(resolve("imagenet", backbone, Path(weights_dir)))}
    module = instantiate(run_cfg["module"], "module", backbone=backbone, schedule=run_cfg["schedule"],
                         info=datamodule.info)
    return datamodule, module


def model_gflops(module: L.LightningModule) -> float | None:
    """GMACs of the module's model at its input size, counted on a meta-device copy (no compute;
    detectors through their ``flops_forward``, as the zoo counts them)."""
    size, model = module.flops_input_size, module.model
    try:
        return float(f"{count_gmacs(copy.deepcopy(model).to('meta'), tuple(size)):.4g}")
    except Exception as err:
        log.warning("could not count FLOPs: %s", err)
        return None


def run_metadata(cfg: DictConfig, context: RunContext | None = None) -> dict[str, Any]:
    """Top-level keys that dashboards group and filter on: names plus every backbone field."""
    choices = dict(context.choices) if context else {}
    meta = {
        "backbone": choices.get("backbone") or cfg.backbone.get("variant"),
        "task": cfg.get("task_name"),
        "schedule": choices.get("schedule"),
        "experiment": choices.get("experiment"),
        "overrides": list(context.overrides) if context else [],
        "seed": cfg.get("seed"),
    }
    for key, value in OmegaConf.to_container(cfg.backbone, resolve=True).items():
        if not key.startswith("_") and key not in meta:
            meta[key] = value
    # every other config-group choice too (e.g. `ablation` of +ablation=... sweeps): dashboards group by it
    meta.update({k: v for k, v in choices.items() if not k.startswith("hydra") and k not in meta})
    return meta


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, made once and kept in ``<run dir>/wandb_run_id``:
    every attempt of a run (resume, SLURM requeue) logs into the same W&B run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
    return run_id


def build_loggers(cfg: DictConfig, context: RunContext, resume_step: int | None) -> list:
    run_dir, loggers = context.run_dir, []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
        cls = locate(logger_cfg["_target_"]) if isinstance(logger_cfg, dict) and "_target_" in logger_cfg else None
        extra = {}
        run_name = ",".join(o for o in context.overrides if not o.startswith("hydra")) or "default"
        if cls is not None and issubclass(cls, WandbLogger):
            require("wandb", "wandb", f"logger.{name} (W&B)")
            logger_cfg["name"] = logger_cfg.get("name") or run_name
            logger_cfg["group"] = context.sweep or logger_cfg.get("group")  # runs of one -m sweep: one group
            extra = {"id": wandb_run_id(run_dir), "resume": "allow"}
        elif cls is not None and issubclass(cls, MLFlowLogger):
            logger_cfg["run_name"] = logger_cfg.get("run_name") or run_name[:250]  # MLflow's limit on names
            # every attempt of a run (resume, requeue) logs into the MLflow run it started
            saved = run_dir / "mlflow_run_id"
            extra = {"run_id": saved.read_text().strip()} if saved.is_file() else {}
        elif cls is not None and issubclass(cls, ResumableCSVLogger):
            extra = {"resume_step": resume_step or 0}  # a new run drops the rows of an attempt that saved nothing
        loggers.append(instantiate(logger_cfg, f"logger.{name}", trusted=True, **extra))
        if isinstance(loggers[-1], MLFlowLogger) and L.fabric.utilities.rank_zero.rank_zero_only.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "mlflow_run_id").write_text(loggers[-1].run_id)
    return loggers


def trainer_plugins() -> list:
    """Atomic checkpoint writes; under SLURM, Lightning's SLURM environment without its requeue
    handler: vitlab's ``LastCheckpoint`` owns the pre-emption signals (save, requeue, exit)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [])]


# Lightning's WandbLogger plots every series against this key (its define_metric).
WANDB_STEP_METRIC = "trainer/global_step"


def wandb_record(run) -> dict:
    """What a W&B run holds, for summary.json (``vitlab.tools.dashboard`` reads it, not W&B's files):
    its identity, its config's top-level keys and the numeric series it logged (W&B's summary holds
    the last value of each series until vitlab's own summary is added after this)."""
    last = {k: run.summary[k] for k in run.summary.keys()}  # wandb's Summary has keys() but no items()
    series = sorted(k for k, v in last.items()
                    if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool))
    return {"id": run.id, "project": run.project or None, "entity": run.entity or None, "group": run.group or None,
            "config_keys": sorted(run.config.keys()), "series": series, "step_metric": WANDB_STEP_METRIC}


def write_summary(out_dir: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2, default=str)
    write_atomically(out_dir / "summary.json", lambda tmp: tmp.write_text(text))  # a kill leaves no half file
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"summary ({out_dir / 'summary.json'})")
    table.add_column("key")
    table.add_column("value")
    for key, value in summary.items():
        if key in ("extra", "config"):
            continue
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)


# ---- train --------------------------------------------------------------------------------
def _cleaned_up_on_failure(body):
    """A command that fails before it has written a checkpoint or a summary leaves no directory."""

    def run(cfg: DictConfig, context: RunContext | None = None) -> dict:
        context = context or RunContext.of(cfg)
        run_dir = context.run_dir
        fresh = not run_dir.exists() or _holds_only_hydra_files(run_dir)
        try:
            return body(cfg, context)
        except RunDirLockedError:
            raise  # another process's directory: not ours to clean up
        except BaseException:
            if fresh and not (run_dir / "checkpoints").exists() and not (run_dir / "summary.json").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in (run_dir.parent, run_dir.parent.parent):  # e.g. <task>/<backbone>/ made for it
                    if parent.is_dir() and not any(parent.iterdir()):
                        parent.rmdir()
            raise

    run.__doc__ = body.__doc__
    return run


def _owned(body):
    """The config checked, then the run directory's lock (``vitlab.runtime.rundir.owned``) held around the
    body; a second copy stops before it touches anything."""

    def run(cfg: DictConfig, context: RunContext) -> dict:
        check_run_config(cfg)
        with owned(context.run_dir, requeue_wait_s=float(cfg.get("requeue_lock_wait_s", 300))):
            return body(cfg, context)

    run.__doc__ = body.__doc__
    return run


@_cleaned_up_on_failure
@_owned
def train(cfg: DictConfig, context: RunContext) -> dict:
    """Fit (or resume) the run the config describes and return its summary (``context``: the command
    line's names and the run directory; default: ``paths.output_dir``, so a plainly composed config runs)."""
    run_dir = context.run_dir
    resume_from, finished, resume_step = plan_resume(cfg, run_dir)
    if finished is not None:
        return finished
    L.seed_everything(cfg.seed, workers=True)
    run_cfg = OmegaConf.to_container(cfg, resolve=True)
    datamodule, module = build_data_and_module(run_cfg)
    # the user's own run-level objects (a checkpoint never rebuilds these): any class may be named
    callbacks = [instantiate(c, f"callbacks.{k}", trusted=True) for k, c in (run_cfg.get("callbacks") or {}).items() if c]
    callbacks.append(RunConfigInCheckpoint(run_cfg))
    # last.ckpt after best.ckpt at an epoch's end (both are Checkpoint callbacks, which Lightning runs
    # last, in this order): a last.ckpt written before would miss that epoch's best score
    callbacks.sort(key=lambda c: isinstance(c, LastCheckpoint))
    loggers = build_loggers(cfg, context, resume_step)
    trainer: L.Trainer = instantiate(run_cfg["trainer"], "trainer", trusted=True, callbacks=callbacks,
                                     logger=loggers or False, plugins=trainer_plugins())

    meta = run_metadata(cfg, context)
    params = count_params(module.model)
    gflops = model_gflops(module)
    for logger in loggers:
        hparams = {**meta, "params": params, "gflops": gflops, "config": run_cfg}
        logger.log_hyperparams(mlflow_names(hparams) if isinstance(logger, MLFlowLogger) else hparams)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)

    best_cb = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
    last = run_dir / "checkpoints" / "last.ckpt"
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    summary = {
        **metrics,
        "status": "finished",
        "best_ckpt": best_cb.best_model_path if best_cb else None,
        "best_score": float(best_cb.best_model_score) if best_cb and best_cb.best_model_score is not None else None,
        "last_ckpt": str(last) if last.is_file() else None,
        "run_dir": str(run_dir),
        "resumed_from": resume_from,
        "params": params,
        "gflops": gflops,
        "pretrained": loaded_file(module),  # the backbone's initial weights; null: trained from scratch
        "global_step": trainer.global_step,
        **{k: meta[k] for k in ("backbone", "task", "schedule", "experiment", "overrides", "seed")},
    }
    if hasattr(module, "extra_summary"):
        summary["extra"] = module.extra_summary()
    wandb_logger = next((lg for lg in loggers if isinstance(lg, WandbLogger)), None)
    if wandb_logger is not None and trainer.is_global_zero:
        summary["wandb"] = wandb_record(wandb_logger.experiment)
    if trainer.is_global_zero:
        write_summary(run_dir, summary)
    for logger in loggers:
        if trainer.is_global_zero:
            log_summary(logger, summary)
        if isinstance(logger, WandbLogger):
            # Close the run: writes its files, and the next job of a -m sweep (same process) gets its own run.
            logger.experiment.finish()
    return summary


# ---- evaluate -----------------------------------------------------------------------------
def load_checkpoint_config(ckpt_path: str) -> tuple[dict, dict]:
    """Read a vitlab checkpoint safely: weights only, and a config that names allowed classes only."""
    ckpt = read_checkpoint(ckpt_path, "ckpt_path")
    config = ckpt.get("vitlab_config")
    if not isinstance(config, dict) or not {"data", "module", "backbone"} <= config.keys():
        raise CheckpointMismatchError(
            f"ckpt_path={ckpt_path}: not a vitlab training checkpoint (it holds no stored run config); "
            f"expected checkpoints/last.ckpt or best.ckpt of a vitlab run"
        )
    for part in ("data", "module", "backbone"):  # everything eval, predict and export build from it
        check_targets(config[part], f"{ckpt_path}: {part}")
    return ckpt, config


def check_same_dataset(stored: dict, info: DatasetInfo, ckpt_path: str) -> None:
    """A checkpoint's classes must be the evaluation data's classes, in the same order."""
    trained = DatasetInfo.from_dict(stored)
    if trained.class_names != info.class_names:
        diff = next((i for i, (a, b) in enumerate(zip(trained.class_names, info.class_names)) if a != b),
                    min(trained.num_classes, info.num_classes))
        raise CheckpointMismatchError(
            f"{ckpt_path} was trained on {trained.num_classes} classes but the data has {info.num_classes}; "
            f"they first differ at label {diff}. Point +overrides.data.root= at the dataset it was trained on."
        )


def module_from_checkpoint(ckpt_path: str, overrides: dict | None = None, module_overrides: dict | None = None,
                           with_data: bool = True):
    """(DataModule, task module with the checkpoint's weights, checkpoint dict) rebuilt from the file.

    ``overrides``: dotted keys of the stored run config to change (``{"data": {"root": ...}}``);
    ``module_overrides``: merged into ``module`` (``tta=ms_flip`` sets ``module.tta``).
    ``with_data=False``: the task gets the dataset description stored in the checkpoint, so the
    dataset need not exist (predict, export); the DataModule is constructed, which reads no file,
    for its evaluation transform, but not set up."""
    ckpt, config = load_checkpoint_config(ckpt_path)
    run_cfg = OmegaConf.create(config)
    for key, value in (overrides or {}).items():
        OmegaConf.update(run_cfg, key, value, force_add=True)
    if module_overrides:
        run_cfg.module = OmegaConf.merge(run_cfg.module, module_overrides)
    run_cfg.backbone.pretrained = None  # weights come from the checkpoint
    run_cfg = OmegaConf.to_container(run_cfg, resolve=True)
    for part in ("data", "module", "backbone"):
        check_targets(run_cfg[part], part)
    datamodule = instantiate(run_cfg["data"], "data")
    stored = ckpt.get("hyper_parameters", {}).get("info")
    if not stored:
        raise CheckpointMismatchError(f"ckpt_path={ckpt_path}: holds no dataset description (hyper_parameters.info); "
                                      f"expected checkpoints/last.ckpt or best.ckpt of a vitlab run")
    if with_data:
        info = datamodule.info
        check_same_dataset(stored, info, ckpt_path)
    else:
        info = DatasetInfo.from_dict(stored)
    module = instantiate(run_cfg["module"], "module", backbone=run_cfg["backbone"], schedule=run_cfg["schedule"],
                         info=info)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return datamodule, module, ckpt


def eval_callbacks(run_config: dict) -> list[L.Callback]:
    """The callbacks of a checkpoint's run that change how evaluation runs: its CUDA fast paths (TF32
    for fp32, cuDNN's autotuner for fixed-size inputs, channels_last), with the run's own switches.
    Built here, not from the stored ``_target_``: a checkpoint names no class to instantiate."""
    stored = (run_config.get("callbacks") or {}).get("fast_paths")
    if not stored or stored.get("_target_") != f"{FastPaths.__module__}.{FastPaths.__name__}":
        return []
    return [FastPaths(**{k: v for k, v in stored.items() if k != "_target_"})]


@_cleaned_up_on_failure
def evaluate(cfg: DictConfig, context: RunContext) -> dict:
    """Rebuild data and model from the checkpoint alone and validate."""
    run_dir = context.run_dir
    L.seed_everything(cfg.seed, workers=True)
    overrides = OmegaConf.to_container(cfg.overrides, resolve=True) if cfg.get("overrides") else {}
    module_overrides = OmegaConf.to_container(cfg.module, resolve=True) if cfg.get("module") else None
    datamodule, module, ckpt = module_from_checkpoint(cfg.ckpt_path, overrides, module_overrides)
    trainer: L.Trainer = instantiate(OmegaConf.to_container(cfg.trainer, resolve=True), "trainer", trusted=True,
                                     logger=False, callbacks=eval_callbacks(ckpt["vitlab_config"]))
    results = trainer.validate(module, datamodule=datamodule)[0]
    summary = {**{k: float(v) for k, v in results.items()}, "ckpt_path": str(cfg.ckpt_path)}
    if cfg.get("results_path"):
        if not hasattr(module, "write_results"):
            raise ValueError("results_path is set but the checkpoint's task writes no results file")
        module.write_results(cfg.results_path)
        summary["results_path"] = cfg.results_path
    if hasattr(module, "extra_summary"):
        summary["extra"] = module.extra_summary()
    if trainer.is_global_zero:
        write_summary(run_dir, summary)
    return summary
