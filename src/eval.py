"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=.../best.ckpt``.

Everything (data, backbone, head) is rebuilt from the run config stored in the checkpoint;
``+overrides.data.root=/datasets/...`` changes parts of it. ``vitlab-eval`` is the same command
for an installed vitlab.
"""
from vitlab.runtime.cli import eval_main

if __name__ == "__main__":
    eval_main()
