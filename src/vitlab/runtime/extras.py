"""Optional dependencies (pyproject's extras): imported where used, with the install line when missing.

The core install (``pip install vitlab``) trains, evaluates and logs to CSV; the rest comes with an
extra: ``wandb`` (logger=wandb, vitlab.tools.dashboard, vitlab.tools.compare --wandb), ``export`` (ONNX),
``slurm`` (hydra/launcher=submitit_slurm), ``search`` (hparams_search=...), ``dev`` (the tests).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message has the pip line that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or stop with the extra that provides it (``purpose``: what needs it)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs the '{module.split('.')[0]}' package, which is not installed: "
            f"pip install 'vitlab[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
        ) from err
