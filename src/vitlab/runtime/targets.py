"""Objects from config dicts: ``{"_target_": "pkg.Class", **kwargs}`` -> ``pkg.Class(**kwargs)``.

Every object made from a config (the user's, or one stored in a checkpoint) passes the allow-list
in ``vitlab.runtime.trust`` first. Deliberately smaller than ``hydra.utils.instantiate``: one level,
keyword arguments only, nothing else to exploit. Below ``build`` and ``weights`` (both build from
configs), so neither imports the other to make an object.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitlab.data.base import DatasetInfo
from vitlab.runtime.aliases import current
from vitlab.runtime.trust import check_targets


def plain(cfg: Any) -> Any:
    """OmegaConf containers and ``DatasetInfo`` (also inside dicts, lists and tuples) -> dicts and lists,
    resolved: what a checkpoint read with ``weights_only=True`` (and a hparams.yaml) can hold."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, DatasetInfo):
        return cfg.to_dict()
    if isinstance(cfg, dict):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v) for v in cfg]
    return cfg


def locate(target: str):
    """The object a dotted path names (a path from before a module moved is followed: ``vitlab.runtime.aliases``)."""
    module_name, _, attr = current(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"_target_={target!r} cannot be imported ({err})") from None


def instantiate(cfg: Mapping | DictConfig, where: str = "config", trusted: bool = False, **kwargs) -> Any:
    """``cfg["_target_"](**rest_of_cfg, **kwargs)`` after the trust check; ``where`` names the
    config key in error messages (e.g. ``module.head``). ``trusted=True`` skips the allow-list:
    only for the run-level objects of the user's own command (callbacks, loggers, the Trainer),
    never for anything a checkpoint can name (data, module, backbone, heads)."""
    cfg = plain(cfg)
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise ValueError(f"{where}: expected a config with a _target_, got {cfg!r:.200}")
    if not trusted:
        check_targets(cfg, where)
    args = {k: v for k, v in cfg.items() if k != "_target_"}
    try:
        return locate(cfg["_target_"])(**args, **kwargs)
    except TypeError as err:  # an unknown or missing argument: say which config it came from
        if "argument" in str(err):
            raise TypeError(f"{where} ({cfg['_target_']}): {err}") from None
        raise
