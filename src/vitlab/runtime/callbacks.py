"""Lightning callbacks of our own (everything else in conf/callbacks/ is Lightning's)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import lightning as L
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
    """

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None,
                 signals: list[str] = ("SIGUSR1", "SIGUSR2", "SIGTERM"), requeue: bool = True, exit_code: int = 0,
                 max_requeues: int | None = 20):
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.signals = list(signals)
        self.requeue = requeue
        self.exit_code = exit_code
        self.max_requeues = max_requeues
        self._signalled: str | None = None
        self._saved_step = -1

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, "last.ckpt")

    def _handle(self, signum, frame) -> None:
        self._signalled = signal.Signals(signum).name  # acted on at the next step boundary

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                signal.signal(getattr(signal, name), self._handle)

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
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
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
