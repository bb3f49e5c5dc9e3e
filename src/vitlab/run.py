"""The bodies of ``src/train.py`` and ``src/eval.py``: instantiate, fit/validate, summarise."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vitlab.checkpoints import CheckpointMismatchError
from vitlab.flops import count_gmacs, count_params
from vitlab.trust import check_targets

log = logging.getLogger("vitlab")


def _choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if isinstance(v, str)}


def _overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """``last``: resume from ``<run dir>/checkpoints/last.ckpt`` if a previous attempt left one."""
    if ckpt_path in (None, "", "none", "null"):
        return None
    if ckpt_path == "last":
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return ckpt_path


def model_gflops(module: L.LightningModule) -> float | None:
    """GMACs of the module's model at its input size, counted on a meta-device copy (no compute)."""
    size = getattr(module, "flops_input_size", None)
    model = getattr(module, "flops_model", None) or getattr(module, "model", None)
    if size is None or model is None:
        return None
    try:
        return float(f"{count_gmacs(copy.deepcopy(model).to('meta'), tuple(size)):.4g}")
    except Exception as err:  # some detection post-processing is data-dependent: count for real
        log.info("meta-device FLOP count failed (%s); counting on CPU", err)
        try:
            return float(f"{count_gmacs(copy.deepcopy(model).cpu(), tuple(size)):.4g}")
        except Exception as err2:
            log.warning("could not count FLOPs: %s", err2)
            return None


def run_metadata(cfg: DictConfig) -> dict[str, Any]:
    """Top-level keys that dashboards group and filter on: names plus every backbone field."""
    choices = _choices()
    meta = {
        "backbone": choices.get("backbone"),
        "task": cfg.get("task_name"),
        "schedule": choices.get("schedule"),
        "experiment": choices.get("experiment"),
        "overrides": _overrides(),
    }
    for key, value in OmegaConf.to_container(cfg.backbone, resolve=True).items():
        if not key.startswith("_") and key not in meta:
            meta[key] = value
    # every other config-group choice too (e.g. `ablation` of +ablation=... sweeps): dashboards group by it
    meta.update({k: v for k, v in choices.items() if not k.startswith("hydra") and k not in meta})
    return meta


def _sweep_group() -> str | None:
    """Runs of one ``-m`` sweep share a W&B group: the sweep directory's name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep = _choices().get("sweep")
    return f"{sweep or 'sweep'}-{Path(HydraConfig.get().sweep.dir).name}"


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        logger_cfg = OmegaConf.to_container(logger_cfg, resolve=True)
        if name == "wandb":
            if not logger_cfg.get("name"):
                logger_cfg["name"] = ",".join(o for o in _overrides() if not o.startswith("hydra")) or "default"
            logger_cfg["group"] = _sweep_group() or logger_cfg.get("group")
        loggers.append(hydra.utils.instantiate(logger_cfg))
    return loggers


def instantiate_task(cfg: DictConfig):
    check_targets(cfg.data, "data")
    check_targets(cfg.module, "module")
    datamodule = hydra.utils.instantiate(cfg.data)
    data_classes = getattr(datamodule, "num_classes", None)
    wanted = cfg.module.get("num_classes")
    if isinstance(data_classes, int) and wanted is not None and data_classes != wanted:
        if not cfg.data.get("synthetic"):
            raise ValueError(
                f"module.num_classes={wanted} but the dataset at {datamodule.data_root()} has {data_classes} "
                f"classes; set module.num_classes={data_classes}"
            )
        # generated data has its own (small) label set: the head follows it
        log.info("module.num_classes=%s -> %s (the generated dataset's classes)", wanted, data_classes)
        OmegaConf.update(cfg, "module.num_classes", data_classes)
    module = hydra.utils.instantiate(cfg.module, backbone=cfg.backbone, schedule=cfg.schedule, _recursive_=False)
    if getattr(module, "flops_input_size", None) is None:
        module.flops_input_size = getattr(datamodule, "input_size", None)
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    return datamodule, module


def write_summary(out_dir: Path, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
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


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    datamodule, module = instantiate_task(cfg)
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = build_loggers(cfg)
    trainer_kwargs = {}
    if cfg.data.get("repeated_aug"):
        trainer_kwargs["use_distributed_sampler"] = False  # the RA sampler distributes itself
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_kwargs)

    meta = run_metadata(cfg)
    params = count_params(module.model)
    gflops = model_gflops(module)
    for logger in loggers:
        logger.log_hyperparams({**meta, "params": params, "gflops": gflops, "config": module.run_config})

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), str(out_dir))
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    best_cb = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)
    last_cb = next((c for c in trainer.checkpoint_callbacks if c.save_last), None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    summary = {
        **metrics,
        "best_ckpt": best_cb.best_model_path if best_cb else None,
        "best_score": float(best_cb.best_model_score) if best_cb and best_cb.best_model_score is not None else None,
        "last_ckpt": last_cb.last_model_path if last_cb else None,
        "params": params,
        "gflops": gflops,
        "global_step": trainer.global_step,
        **{k: meta[k] for k in ("backbone", "task", "schedule", "experiment", "overrides")},
    }
    if hasattr(module, "extra_summary"):
        summary["extra"] = module.extra_summary()
    if trainer.is_global_zero:
        write_summary(out_dir, summary)
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            if trainer.is_global_zero:
                logger.experiment.summary.update({k: v for k, v in summary.items() if k != "extra"})
            # Close the run: writes its files, and the next job of a -m sweep (same process) gets its own run.
            logger.experiment.finish()
    return summary


def load_checkpoint_config(ckpt_path: str) -> tuple[dict, dict]:
    """Read a vitlab checkpoint safely: weights only, and a config that names trusted classes only."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file") from None
    config = ckpt.get("vitlab_config")
    if not config:
        raise CheckpointMismatchError(f"{ckpt_path}: not a vitlab checkpoint (no stored run config)")
    check_targets(config, f"{ckpt_path}:config")
    return ckpt, config


def evaluate(cfg: DictConfig) -> dict:
    """Rebuild data and model from the checkpoint alone and validate."""
    ckpt, config = load_checkpoint_config(cfg.ckpt_path)
    run_cfg = OmegaConf.create(config)
    for key, value in (cfg.get("overrides") or {}).items():
        OmegaConf.update(run_cfg, key, value, force_add=True)
    if cfg.get("module"):  # e.g. tta=ms_flip sets module.tta
        run_cfg.module = OmegaConf.merge(run_cfg.module, cfg.module)
    run_cfg.backbone.pretrained = None  # weights come from the checkpoint
    check_targets(run_cfg, "config")
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = instantiate_task(run_cfg)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    results = trainer.validate(module, datamodule=datamodule)[0]
    summary = {**{k: float(v) for k, v in results.items()}, "ckpt_path": cfg.ckpt_path}
    if cfg.get("results_path"):
        if not hasattr(module, "write_results"):
            raise ValueError(f"results_path is set but task {run_cfg.get('task_name')} writes no results file")
        module.write_results(cfg.results_path)
        summary["results_path"] = cfg.results_path
    if trainer.is_global_zero:
        write_summary(Path(cfg.paths.output_dir), summary)
    return summary
