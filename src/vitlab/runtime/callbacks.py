"""Lightning callbacks of our own (everything else in conf/callbacks/ is Lightning's)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger("vitlab")


class StopAfter(L.Callback):
    """Kill the run after ``epochs`` epochs or ``steps`` optimiser steps, as a pre-empted job dies.

    Fault injection for resume tests: the process exits at once (code 75, EX_TEMPFAIL: "try
    again"), with nothing saved beyond what the checkpoint callbacks already wrote; re-running
    the same command must then continue the run.
    Use: ``+callbacks.stop._target_=vitlab.runtime.callbacks.StopAfter +callbacks.stop.steps=5``.
    """

    def __init__(self, epochs: int | None = None, steps: int | None = None):
        self.epochs, self.steps = epochs, steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.steps is not None and trainer.global_step >= self.steps:
            os._exit(75)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # after everything of the epoch before (validation, best.ckpt, last.ckpt), as a kill between epochs
        if self.epochs is not None and trainer.current_epoch >= self.epochs:
            os._exit(75)


class RunConfigInCheckpoint(L.Callback):
    """Stores the fully resolved run config in every checkpoint (``vitlab_config``), so that
    ``eval.py``, ``predict.py`` and ``export`` can rebuild data and model from the file alone."""

    def __init__(self, config: dict):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["vitlab_config"] = self.config


class LastCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt`` for resuming: written at every epoch end (after its validation),
    every ``every_n_train_steps`` optimiser steps, and when a pre-emption signal arrives.

    Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last`` only when another checkpoint
    is saved, so resuming needs its own callback. Writes are atomic (``AtomicCheckpointIO``). A
    ``Checkpoint`` subclass, so Lightning runs it with the checkpoint callbacks, after them
    (``vitlab.runtime.run`` puts it last): the epoch-end ``last.ckpt`` holds the best checkpoint's state of that epoch, and a
    run resumed from it keeps its best score.

    Pre-emption: on one of ``signals`` (SLURM sends SIGUSR1/SIGUSR2 ``--signal`` seconds before the
    time limit and SIGTERM on pre-emption) the run finishes its current step, saves, asks SLURM to
    requeue the job (``scontrol requeue $SLURM_JOB_ID``, when running under SLURM) and exits with
    ``exit_code``; the requeued job re-runs the same command, which resumes from this file.

    This callback is the one owner of those signals: Lightning's SLURM environment runs without its
    requeue handler (``SLURMEnvironment(auto_requeue=False)``, ``vitlab.runtime.run.trainer_plugins``), the
    handlers are installed again when training starts, over the SIGTERM handler Lightning adds, and
    over submitit's (so its ``max_num_timeout`` does not apply). ``max_requeues`` takes its place: a
    job SLURM has already restarted that many times (``SLURM_RESTART_COUNT``) saves and exits
    without asking for another requeue.

    With several processes they must agree to save at the same step: that agreement is a collective
    (and a host-device sync), so it is taken every ``signal_check_every_n_steps`` steps (default: the
    trainer's ``log_every_n_steps``), not every step; one process alone checks every step for free.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None,
                 signals: list[str] = ("SIGUSR1", "SIGUSR2", "SIGTERM"), requeue: bool = True, exit_code: int = 0,
                 max_requeues: int | None = 20, signal_check_every_n_steps: int | None = None):
        self.dirpath = dirpath
        self.signal_check_every_n_steps = signal_check_every_n_steps
        self.every_n_train_steps = every_n_train_steps
        self.signals = list(signals)
        self.requeue = requeue
        self.exit_code = exit_code
        self.max_requeues = max_requeues
        self._signalled: str | None = None
        self._saved_step = -1
        self._outer_handlers: dict | None = None  # the process's handlers before fit, put back after it

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, "last.ckpt")

    def _handle(self, signum, frame) -> None:
        self._signalled = signal.Signals(signum).name  # acted on at the next step boundary

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            if self._outer_handlers is None:
                self._outer_handlers = {name: signal.getsignal(getattr(signal, name)) for name in self.signals}
            for name in self.signals:
                signal.signal(getattr(signal, name), self._handle)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # a run called from Python (``vitlab.runtime.run.train`` in a notebook, a test) leaves the
        # caller's handlers as they were
        if stage == "fit" and self._outer_handlers is not None:
            for name, handler in self._outer_handlers.items():
                signal.signal(getattr(signal, name), handler)
            self._outer_handlers = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()  # after Lightning's Trainer has added its own SIGTERM handler (it does so after setup)

    def _save(self, trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signalled = self._signalled is not None
        if trainer.world_size > 1:  # every process must save together
            every = self.signal_check_every_n_steps or max(1, trainer.log_every_n_steps)
            signalled = (trainer.global_step % every == 0
                         and trainer.strategy.reduce_boolean_decision(signalled, all=False))
        if signalled:
            self._save(trainer)
            self._requeue_and_exit(trainer)
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step

    def _requeue_and_exit(self, trainer) -> None:
        log.warning("received %s: saved %s at step %d", self._signalled or "a signal", self.path, trainer.global_step)
        job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if self.requeue and job and trainer.is_global_zero:
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            job = f"{job}_{task}" if os.environ.get("SLURM_ARRAY_JOB_ID") and task else job
            if self.max_requeues is not None and restarts >= self.max_requeues:
                log.warning("not requeueing job %s: SLURM has restarted it %d times (max_requeues=%d); the same "
                            "command resumes it from %s", job, restarts, self.max_requeues, self.path)
            else:
                try:
                    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                    outcome = "done" if result.returncode == 0 else result.stderr.strip()
                except OSError as err:  # no scontrol on this node
                    outcome = str(err)
                log.warning("scontrol requeue %s: %s", job, outcome)
        for logger in trainer.loggers:  # what this attempt logged reaches the files (CSV history)
            logger.save()
        sys.stdout.flush()
        os._exit(self.exit_code)  # at once: the time limit is close


class FastPaths(L.Callback):
    """The CUDA fast paths of a run (``callbacks.fast_paths``; each a switch). On a CPU run nothing changes.

    * ``tf32``: fp32 runs (``trainer.precision=32-true``) do their matmuls in TF32
      (``torch.set_float32_matmul_precision("high")``; cuDNN convolutions already use TF32 by default);
    * ``cudnn_benchmark``: ``auto`` turns cuDNN's autotuner on for tasks whose inputs keep one size
      (classification: fixed crops) and off for the dense tasks, whose image sizes vary (every new size
      would be tuned again); ``true`` / ``false`` force it. ``trainer.benchmark`` stays null so this decides;
    * ``fused_optimizer``: AdamW / Adam / SGD as torch's fused CUDA kernels (one launch for all
      parameters); off: timm's default, the multi-tensor ``foreach`` kernels;
    * ``channels_last``: NHWC weights for the convolutions. Off: these backbones are mostly linear
      layers on token sequences, and it has not been measured faster for them.

    Attention takes ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels) on CUDA
    unconditionally (``vitlab.backbones.layers.attention``). What this sets globally is put back at teardown.
    """

    def __init__(self, tf32: bool = True, cudnn_benchmark: bool | str = "auto", fused_optimizer: bool = True,
                 channels_last: bool = False):
        if cudnn_benchmark not in (True, False, "auto"):
            raise ValueError(f"callbacks.fast_paths.cudnn_benchmark={cudnn_benchmark!r}: expected true, false or auto")
        self.tf32, self.cudnn_benchmark = tf32, cudnn_benchmark
        self.fused_optimizer, self.channels_last = fused_optimizer, channels_last
        self._saved: tuple | None = None

    def settings(self, device_type: str, precision: str, fixed_input_size: bool) -> dict:
        """What a run on ``device_type`` at ``precision`` gets: matmul precision, cuDNN benchmark,
        optimiser kernels, memory format (None: left as it is)."""
        if device_type != "cuda":
            return {"matmul_precision": None, "cudnn_benchmark": None, "optimizer_kernels": "foreach",
                    "channels_last": False}
        benchmark = fixed_input_size if self.cudnn_benchmark == "auto" else bool(self.cudnn_benchmark)
        return {"matmul_precision": "high" if self.tf32 and str(precision).startswith("32") else None,
                "cudnn_benchmark": benchmark,
                "optimizer_kernels": "fused" if self.fused_optimizer else "foreach",
                "channels_last": bool(self.channels_last)}

    def apply(self, pl_module: L.LightningModule, settings: dict) -> None:
        self._saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
        if settings["matmul_precision"]:
            torch.set_float32_matmul_precision(settings["matmul_precision"])
        if settings["cudnn_benchmark"] is not None:
            torch.backends.cudnn.benchmark = settings["cudnn_benchmark"]
        pl_module.optimizer_kernels = settings["optimizer_kernels"]  # read by VitlabTask.configure_optimizers
        if settings["channels_last"]:
            pl_module.to(memory_format=torch.channels_last)

    def setup(self, trainer, pl_module, stage: str) -> None:
        device = trainer.strategy.root_device.type
        self.apply(pl_module, self.settings(device, trainer.precision, getattr(pl_module, "fixed_input_size", False)))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._saved is not None:
            torch.set_float32_matmul_precision(self._saved[0])
            torch.backends.cudnn.benchmark = self._saved[1]
            self._saved = None


class StepMetricsProgressBar(RichProgressBar):
    """Lightning's rich progress bar that shows training metrics (``train_metrics``, e.g. the loss)
    read on logging steps only (``trainer.log_every_n_steps``, and the first step).

    Reading a logged tensor as a number waits for the GPU. Lightning does that at the end of every
    step for each value logged with ``prog_bar=True``, so the tasks log their training values without
    it and this bar reads them when the loggers do."""

    def __init__(self, train_metrics: list[str] = ("train/loss",), **kwargs):
        super().__init__(**kwargs)
        self.train_metrics = list(train_metrics)
        self._shown: dict | None = None

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        if not trainer.training:
            return metrics
        if self._shown is None or trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            found = trainer.callback_metrics
            self._shown = {k: float(found[k]) for k in self.train_metrics if k in found}
        return {**metrics, **self._shown}
