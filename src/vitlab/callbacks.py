"""Lightning callbacks of our own (everything else in conf/callbacks/ is Lightning's)."""
from __future__ import annotations

import os

import lightning as L


class StopAfter(L.Callback):
    """Interrupt a run after ``epochs`` epochs or ``steps`` optimiser steps.

    Fault injection for resume tests and dry runs: ``hard=True`` kills the process
    at once (like a pre-empted SLURM job, nothing saved beyond what the checkpoint
    callbacks already wrote); otherwise the trainer stops cleanly.
    Use: ``+callbacks.stop._target_=vitlab.callbacks.StopAfter +callbacks.stop.steps=5``.
    """

    def __init__(self, epochs: int | None = None, steps: int | None = None, hard: bool = False):
        self.epochs, self.steps, self.hard = epochs, steps, hard

    def _stop(self, trainer: L.Trainer) -> None:
        if self.hard:
            os._exit(75)  # EX_TEMPFAIL: "try again", as a requeued job would be
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.steps is not None and trainer.global_step >= self.steps:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # runs after the epoch's validation and its checkpoint, as a kill between epochs would
        if self.epochs is not None and trainer.current_epoch + 1 >= self.epochs:
            self._stop(trainer)
