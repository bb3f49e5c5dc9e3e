"""Objects from config dicts: ``{"_target_": "pkg.Class", **kwargs}`` -> ``pkg.Class(**kwargs)``,
and backbones / classifiers from backbone configs.

The layer below the CLI: tasks build their heads and the run builds data and task modules
through here, so every object made from a config (the user's, or one stored in a checkpoint)
passes the allow-list in ``vitlab.trust`` first. Deliberately smaller than
``hydra.utils.instantiate``: one level, keyword arguments only, nothing else to exploit.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vitlab.aliases import current
from vitlab.trust import check_targets

# Keys of a backbone config that say which weights to load, not constructor arguments.
WEIGHT_KEYS = ("pretrained", "pretrained_ema")


def plain(cfg: Any) -> Any:
    """OmegaConf containers (also inside dicts and lists) -> dicts and lists, resolved."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(plain(v) for v in cfg)
    return cfg


def locate(target: str):
    """The object a dotted path names (a path from before a module moved is followed: ``vitlab.aliases``)."""
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


def build_backbone(cfg: Mapping | DictConfig, dense: bool = False):
    """Instantiate a backbone config (as found under ``backbone:`` in any run config);
    ``pretrained`` loads weights: a file, a run directory, or ``imagenet`` (``vitlab.weights``).
    The file loaded is kept as ``backbone.pretrained_file`` (None: random initialisation).
    ``dense``: for a detector or segmenter, without the parts only classification uses
    (``Backbone.prune_for_dense``)."""
    cfg = dict(plain(cfg))
    pretrained, use_ema = (cfg.pop(key, None) for key in WEIGHT_KEYS)
    backbone = instantiate(cfg, "backbone")
    if dense:
        backbone.prune_for_dense()
    backbone.pretrained_file = _load(backbone, backbone, pretrained, use_ema, cfg)
    return backbone


def build_classifier(cfg: Mapping | DictConfig, num_classes: int):
    """Backbone config -> ``ImageClassifier``; ``pretrained`` loads backbone and head."""
    from vitlab.backbones.base import ImageClassifier

    cfg = dict(plain(cfg))
    pretrained, use_ema = (cfg.pop(key, None) for key in WEIGHT_KEYS)
    model = ImageClassifier(build_backbone(cfg), num_classes)
    model.backbone.pretrained_file = _load(model, model.backbone, pretrained, use_ema, cfg)
    return model


def _load(model, backbone, pretrained, use_ema: bool, cfg: dict) -> str | None:
    from vitlab.weights import resolve

    path = resolve(pretrained, backbone, cfg)
    if path is None:
        return None
    from vitlab.checkpoints import load_pretrained

    load_pretrained(model, path, ema=use_ema)
    return str(path)
