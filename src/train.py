"""Train any backbone on any task: ``python src/train.py backbone=pvt_v2_b2 task=imagenet_cls``.

Composes ``conf/train.yaml`` with the command line, instantiates the DataModule,
the task module and a Lightning Trainer, fits, and writes ``summary.json`` to the
run directory. See ``conf/train.yaml`` for the config groups.
"""
import hydra
from omegaconf import DictConfig

from vitlab.run import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    summary = train(cfg)
    return summary.get("best_score")  # what sweepers optimise


if __name__ == "__main__":
    main()
