"""Backbones and classifiers from backbone configs, with their pretrained weights.

The layer below the tasks: tasks build their backbones (and, through ``instantiate``, their heads)
here, and the run builds data and task modules with ``instantiate`` (``vitlab.runtime.targets``,
re-exported here), so every object made from a config passes the allow-list in
``vitlab.runtime.trust`` first.
"""
from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig

from vitlab.runtime.targets import instantiate, locate, plain  # noqa: F401 (re-exported)
from vitlab.runtime.weights import WEIGHT_KEYS, resolve


def build_backbone(cfg: Mapping | DictConfig, dense: bool = False):
    """Instantiate a backbone config (as found under ``backbone:`` in any run config);
    ``pretrained`` loads weights: a file, a run directory, or ``imagenet`` (``vitlab.runtime.weights``:
    the release of the config's ``variant``).
    The file loaded is kept as ``backbone.pretrained_file`` (None: random initialisation).
    ``dense``: for a detector or segmenter, without the parts only classification uses
    (``Backbone.prune_for_dense``)."""
    cfg = dict(plain(cfg))
    weights = {key: cfg.pop(key, None) for key in WEIGHT_KEYS}
    backbone = instantiate(cfg, "backbone")
    if dense:
        backbone.prune_for_dense()
    backbone.pretrained_file = _load(backbone, weights)
    return backbone


def build_classifier(cfg: Mapping | DictConfig, num_classes: int):
    """Backbone config -> ``ImageClassifier``; ``pretrained`` loads backbone and head."""
    from vitlab.backbones.base import ImageClassifier

    cfg = dict(plain(cfg))
    weights = {key: cfg.pop(key, None) for key in WEIGHT_KEYS}
    model = ImageClassifier(build_backbone(cfg), num_classes)
    model.backbone.pretrained_file = _load(model, weights)
    return model


def _load(model, weights: dict) -> str | None:
    """Load ``weights["pretrained"]`` (``imagenet``: the release of ``weights["variant"]``) strictly."""
    path = resolve(weights["pretrained"], weights)
    if path is None:
        return None
    from vitlab.runtime.checkpoints import load_pretrained

    load_pretrained(model, path, ema=bool(weights["pretrained_ema"]))
    return str(path)
