"""Refuse to instantiate configs that name code outside the libraries we trust.

A checkpoint's stored config is rebuilt with ``hydra.utils.instantiate``; a
crafted file could otherwise name ``os.system`` as a ``_target_``.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig

TRUSTED_PREFIXES = ("vitlab.", "torch.", "torchvision.", "timm.", "lightning.", "torchmetrics.")


class UntrustedTargetError(ValueError):
    pass


def check_targets(cfg: Any, where: str = "config") -> None:
    """Raise ``UntrustedTargetError`` if any ``_target_`` in ``cfg`` is outside the trusted packages."""
    if isinstance(cfg, (DictConfig, dict)):
        for key, value in cfg.items():
            if key == "_target_" and not (isinstance(value, str) and value.startswith(TRUSTED_PREFIXES)):
                raise UntrustedTargetError(
                    f"{where}: refusing to instantiate _target_={value!r}; only classes under "
                    f"{', '.join(p.rstrip('.') for p in TRUSTED_PREFIXES)} are allowed"
                )
            check_targets(value, f"{where}.{key}")
    elif isinstance(cfg, (ListConfig, list, tuple)):
        for i, value in enumerate(cfg):
            check_targets(value, f"{where}[{i}]")
