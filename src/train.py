"""Train any backbone on any task: ``python src/train.py backbone=pvt_v2_b2 task=imagenet_cls``.

Composes ``conf/train.yaml`` with the command line, builds the DataModule, the task module and
a Lightning Trainer, fits (resuming the run when its directory holds a checkpoint), and writes
``summary.json`` to the run directory. The body is ``vitlab.runtime.run.train``; ``vitlab-train`` is the
same command for an installed vitlab.
"""
from vitlab.runtime.cli import train_main

if __name__ == "__main__":
    train_main()
