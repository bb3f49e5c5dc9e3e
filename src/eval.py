"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=.../best.ckpt``.

Everything (data, backbone, head) is rebuilt from the run config stored in the
checkpoint; ``+overrides.data.root=/datasets/...`` changes parts of it.
"""
import hydra
from omegaconf import DictConfig

from vitlab.run import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
