"""Check a dataset before training on it: every problem in one pass, with counts.

    python -m vitlab.tools.check_data task=coco_retinanet data.root=/data/coco [data.verify=full]

The arguments are overrides as on the training command line: the config is composed from
vitlab's conf/ as src/train.py composes it, so the check sees the DataModule a run would build.
Cheap by default (directory listings, image headers, annotations; no pixel decoded);
data.verify=full decodes every image and label map as the loaders do.

Exit status: 0 no problems (warnings are printed), 1 problems, 2 a bad command or dataset layout.
The same check runs at the start of every training run (data.verify; data.skip_corrupt=true
leaves the bad files and annotations out instead of stopping).
"""
from __future__ import annotations

import sys


def compose_data_config(overrides: list[str]) -> dict:
    """The resolved ``data:`` node of ``conf/train.yaml`` with the command-line overrides."""
    from omegaconf import OmegaConf

    from vitlab.runtime.config import compose, hydra_interpolations

    cfg = compose("train", overrides, return_hydra_config=True)
    with hydra_interpolations(cfg):  # paths resolve against the working directory, as in a run
        return OmegaConf.to_container(cfg.data, resolve=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vitlab.data.base import DatasetLayoutError
    from vitlab.runtime.build import instantiate
    from vitlab.runtime.validate import ConfigValueError, check_run_config

    try:
        data = compose_data_config(argv)
        check_run_config({"data": data})
        datamodule = instantiate(data, "data")
        report = datamodule.check(full=data.get("verify") == "full")
    except (HydraException, OmegaConfBaseException, ConfigValueError, DatasetLayoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary(examples=10))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
