"""What a sweep will cost, before launching it: the jobs, their FLOPs, steps and GPU-hours.

    python -m vitlab.tools.plan -m +sweep=pale_size task=imagenet_cls trainer=ddp
    python -m vitlab.tools.plan -m +sweep=pale_size seed=0,1,2 --gpu H100
    python -m vitlab.tools.plan experiment=demo --measure          # time the backbone on this machine

Takes the overrides of ``src/train.py`` and expands them as ``-m`` would: the master config
is composed for a multirun, Hydra's BasicSweeper turns its ``hydra.sweeper.params`` (the
``+sweep=`` presets) and the command line into jobs, and each job's config is composed the
way the launcher does. Nothing is launched. Per job:

* params and GFLOPs (GMACs, as the zoo counts them) of the job's model on the meta device,
  at the training input size (classification ``data.img_size``, ADE20K ``data.crop_size``,
  COCO the zoo's 800x1280);
* images/s per GPU = achieved TFLOP/s / training FLOPs per image, with training FLOPs =
  3 (forward + backward) x 2 (FLOPs per multiply-add) x GMACs. The achieved TFLOP/s comes
  from ``GPU_TFLOPS`` (``--gpu``, default A100) or ``--tflops``, or with ``--measure`` from
  ``vitlab.tools.bench`` timing the job's backbone (as a classifier) on this machine;
* optimizer steps from the schedule and the dataset (its DataModule's ``FACTS.train_images``, or the generated
  dataset's size; ``--train-images`` overrides): epochs x ceil(images / (batch x GPUs)) /
  accumulation, capped by ``max_steps``/``limit_train_batches``; iteration schedules
  (40k/80k/160k) are their ``max_steps``;
* GPU-hours = steps x global batch / (images/s per GPU x 3600), training only (validation
  is a few percent more), and wall-clock hours on the job's GPUs.

An adaptive sweeper (``hparams_search=...``, Optuna) is planned as ``n_trials`` runs of
the base config: the searched values (lr, weight decay) do not change the cost.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from dataclasses import asdict, dataclass

from omegaconf import DictConfig, OmegaConf

from vitlab.runtime.build import locate
from vitlab.runtime.weights import WEIGHT_KEYS

# Achieved (not peak) mixed-precision training TFLOP/s per GPU for hierarchical ViTs: a rough
# figure to calibrate (--measure on the target GPU, or --tflops). Anchor: DeiT-S (4.6 GMACs)
# trains 300 epochs in about 3 days on 4 V100s (DeiT paper, section 6), ~370 img/s x 27.6 GFLOP
# = ~10 TFLOP/s; A100 bf16 ~3x a V100, H100 ~2.3x an A100 (H200: same compute, more bandwidth).
GPU_TFLOPS = {"V100": 10.0, "A100": 30.0, "H100": 70.0, "H200": 75.0}
FLOPS_PER_MAC = 2
TRAIN_FLOPS_FACTOR = 3  # forward + backward (two matmuls per forward one)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class Job:
    overrides: list[str]
    backbone: str
    task: str
    backbone_overrides: list[str]
    input_size: list[int] | None
    batch_size: int
    gpus: int
    accumulate: int
    train_images: int
    max_epochs: int
    max_steps: int
    limit_train_batches: int | float | None
    precision: str
    params_m: float = float("nan")
    gflops: float = float("nan")
    images_per_s: float = float("nan")  # per GPU
    steps: int = 0
    gpu_hours: float = float("nan")
    wall_hours: float = float("nan")


def _hydra_value(value) -> str:
    """A value as Hydra's override grammar writes it."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w.\-]*", value) and value.lower() not in ("true", "false", "null")
        return value if plain else json.dumps(value)
    return json.dumps(value)


def backbone_overrides(name: str, backbone_cfg: dict) -> list[str]:
    """The job's backbone as overrides of its named config (presets and experiments included)."""
    from vitlab.tools.paper import resolved_backbone

    named = resolved_backbone(name)
    return [f"{k}={_hydra_value(v)}" for k, v in backbone_cfg.items()
            if k not in WEIGHT_KEYS and named.get(k) != v]


def _train_images(cfg: DictConfig) -> int:
    data = cfg.data
    if not data.get("synthetic"):
        return locate(data._target_).FACTS.train_images  # the DataModule's (vitlab.data.base.DatasetFacts)
    if data.get("synthetic_num_train"):
        return int(data.synthetic_num_train)
    from vitlab.data.synthetic import make_imagenet  # generated ImageNet: num_train images per class

    return int(data.synthetic_classes) * inspect.signature(make_imagenet).parameters["num_train"].default


def _input_size(cfg: DictConfig) -> list[int] | None:
    if cfg.data.get("img_size"):
        return [int(cfg.data.img_size)] * 2
    if cfg.data.get("crop_size"):
        return [int(s) for s in cfg.data.crop_size]
    return None  # COCO: the zoo's 800x1280


def _devices(trainer: DictConfig) -> int:
    devices = trainer.devices
    count = len(devices) if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices) else devices
    count = int(count) if str(count).lstrip("-").isdigit() and int(count) > 0 else 1  # "auto"/-1: one per job
    return count * int(trainer.get("num_nodes") or 1)


def describe_job(cfg: DictConfig, overrides: list[str], train_images: int | None) -> Job:
    from vitlab.runtime.config import hydra_interpolations

    with hydra_interpolations(cfg):
        return _describe_job(cfg, overrides, train_images)


def _describe_job(cfg: DictConfig, overrides: list[str], train_images: int | None) -> Job:
    choices = cfg.hydra.runtime.choices
    backbone, task = choices.backbone, choices.task
    trainer = cfg.trainer
    return Job(
        overrides=overrides,
        backbone=backbone,
        task=task,
        backbone_overrides=backbone_overrides(backbone, OmegaConf.to_container(cfg.backbone, resolve=True)),
        input_size=_input_size(cfg),
        batch_size=int(cfg.data.batch_size),
        gpus=_devices(trainer),
        accumulate=int(trainer.get("accumulate_grad_batches") or 1),
        train_images=train_images or _train_images(cfg),
        max_epochs=int(trainer.max_epochs if trainer.max_epochs is not None else -1),
        max_steps=int(trainer.max_steps if trainer.max_steps is not None else -1),
        limit_train_batches=trainer.get("limit_train_batches"),
        precision=str(trainer.precision),
    )


def expand(overrides: list[str], train_images: int | None = None) -> list[Job]:
    """Compose every job of ``python src/train.py -m <overrides>`` as Hydra would."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from hydra.utils import get_class

    from vitlab.runtime.config import hydra_app

    with hydra_app(job_name="train") as hydra:  # hydra.sweep.dir resolves as src/train.py resolves it
        master = hydra.compose_config("train", overrides, run_mode=RunMode.MULTIRUN)
        arguments = list(master.hydra.overrides.task)
        parser = OverridesParser.create()
        if master.hydra.sweeper._target_ == BASIC_SWEEPER:
            # the class as Hydra's plugin discovery loaded it (discovery re-imports the module)
            BasicSweeper = get_class(BASIC_SWEEPER)
            sweeper = BasicSweeper(max_batch_size=None, params=master.hydra.sweeper.get("params"))
            # BasicSweeper.sweep: its params first, then the command line, Cartesian product
            parsed = parser.parse_overrides(sweeper._parse_config() + arguments)
            jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        else:  # adaptive search: n_trials runs of the base config (the searched values cost the same)
            fixed = [o.input_line for o in parser.parse_overrides(arguments) if not o.is_sweep_override()]
            jobs = [fixed] * int(master.hydra.sweeper.get("n_trials") or 1)
        return [describe_job(hydra.config_loader.load_sweep_config(master, list(job)), list(job), train_images)
                for job in jobs]


def count(job: Job) -> tuple[float, float]:
    """Params (M) and GMACs of the job's model, on the meta device (the zoo's counting)."""
    from vitlab.tools.paper import model_counts

    return model_counts(job.backbone, tuple(job.backbone_overrides), None if job.task == "imagenet_cls" else job.task,
                        tuple(job.input_size) if job.input_size else None)


def measured_tflops(job: Job, device: str, batch: int) -> float:
    """Achieved training TFLOP/s of the job's backbone (as a classifier) on this machine, by vitlab.tools.bench."""
    import torch

    from vitlab.tools.bench import bench
    from vitlab.tools.zoo import measure

    size = tuple(job.input_size or (800, 1280))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and "bf16" in job.precision)
    with autocast:
        result = bench([job.backbone], batch=batch, input_size=size, device=device, steps=3, warmup=1, rounds=1)[0][0]
    gmacs = measure(job.backbone, [], None, size).gflops
    return result.train_ips * TRAIN_FLOPS_FACTOR * FLOPS_PER_MAC * gmacs / 1e3


def estimate(job: Job, tflops: float) -> Job:
    """Fill images/s, steps and GPU-hours of a job from its GMACs and the achieved TFLOP/s."""
    job.images_per_s = tflops * 1e3 / (TRAIN_FLOPS_FACTOR * FLOPS_PER_MAC * job.gflops)
    batches = math.ceil(job.train_images / (job.batch_size * job.gpus))  # per process and epoch
    limit = job.limit_train_batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    steps_per_epoch = math.ceil(batches / job.accumulate)
    caps = [steps_per_epoch * job.max_epochs] if job.max_epochs > 0 else []
    caps += [job.max_steps] if job.max_steps > 0 else []
    if not caps:
        raise ValueError(f"job {' '.join(job.overrides)}: neither trainer.max_epochs nor trainer.max_steps is set")
    job.steps = min(caps)
    images = job.steps * job.accumulate * job.batch_size * job.gpus
    job.gpu_hours = images / job.images_per_s / 3600
    job.wall_hours = job.gpu_hours / job.gpus
    return job


def print_plan(jobs: list[Job], tflops_note: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vitlab plan: {len(jobs)} job(s), {tflops_note}")
    for col in ("#", "overrides", "backbone", "params M", "GFLOPs", "input", "img/s/GPU", "GPUs", "steps",
                "images M", "GPU-h", "wall h"):
        table.add_column(col, no_wrap=col != "overrides")
    for i, j in enumerate(jobs):
        images = j.steps * j.accumulate * j.batch_size * j.gpus
        table.add_row(str(i), " ".join(j.overrides), j.backbone, f"{j.params_m:.2f}", f"{j.gflops:.3g}",
                      "x".join(map(str, j.input_size or [800, 1280])), f"{j.images_per_s:,.0f}", str(j.gpus),
                      f"{j.steps:,}", f"{images / 1e6:.3g}", f"{j.gpu_hours:,.3g}", f"{j.wall_hours:,.3g}")
    Console(width=240).print(table)
    print(f"total: {sum(j.gpu_hours for j in jobs):,.4g} GPU-hours over {len(jobs)} job(s); nothing was launched")


def main(argv: list[str] | None = None) -> list[Job]:
    parser = argparse.ArgumentParser(prog="python -m vitlab.tools.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="overrides as for src/train.py (sweeps allowed)")
    parser.add_argument("-m", "--multirun", action="store_true", help="accepted for symmetry with train.py: sweeps always expand")
    parser.add_argument("--gpu", default="A100", choices=sorted(GPU_TFLOPS), help="GPU of the TFLOP/s table (default A100)")
    parser.add_argument("--tflops", type=float, help="achieved training TFLOP/s per GPU (instead of --gpu)")
    parser.add_argument("--measure", action="store_true", help="time each backbone on this machine with vitlab.tools.bench")
    parser.add_argument("--batch", type=int, default=None, help="with --measure: batch size (default 32 on CUDA, 2 on CPU)")
    parser.add_argument("--train-images", type=int, help="training images per epoch (default: the dataset's)")
    parser.add_argument("--json", action="store_true", help="print the jobs as JSON")
    args = parser.parse_args(argv)

    jobs = expand(args.overrides, args.train_images)
    measured: dict[str, float] = {}
    for job in jobs:
        job.params_m, job.gflops = count(job)  # once per model (seeds, schedules share one)
        if args.measure:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            if job.backbone not in measured:
                measured[job.backbone] = measured_tflops(job, device, args.batch or (32 if device == "cuda" else 2))
            tflops, note = measured[job.backbone], f"TFLOP/s measured on {device} per backbone"
        else:
            tflops = args.tflops or GPU_TFLOPS[args.gpu]
            note = f"{tflops:g} achieved TFLOP/s per GPU" + ("" if args.tflops else f" ({args.gpu}, assumed)")
        estimate(job, tflops)
    if args.json:
        print(json.dumps([asdict(j) for j in jobs], indent=2))
    else:
        print_plan(jobs, note)
    return jobs


if __name__ == "__main__":
    main()
