"""Python entry points: build backbones and classifiers from the same YAML as the CLI.

    import vitlab
    model = vitlab.create_model("pvt_v2_b2", num_classes=1000, pretrained="pvt_v2_b2.pth")
    backbone = vitlab.create_backbone("pale_t", overrides=["attn_mode=axial"])

Overrides are Hydra override strings relative to the backbone config
(``pale_size=3``, ``depths=[2,2,2,2]``), exactly what ``backbone.<key>=...``
does on the command line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vitlab.backbones.base import Backbone, ImageClassifier
from vitlab.trust import check_targets

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Keys of a backbone config that are not constructor arguments.
NON_CONSTRUCTOR_KEYS = ("pretrained",)


def available_backbones() -> list[str]:
    """The variants: ``conf/backbone/*.yaml``, not the family bases they extend (``conf/backbone/family/``)."""
    return sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))  # not recursive: no family/


def _relative_to_backbone(override: str) -> str:
    prefix = ""
    while override[:1] in "+~":
        prefix, override = prefix + override[0], override[1:]
    return f"{prefix}backbone.{override}"


def backbone_config(name: str, overrides: Iterable[str] | None = None) -> DictConfig:
    """Compose ``conf/backbone/<name>.yaml`` with overrides relative to it."""
    names = available_backbones()
    if name not in names:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(names)}")
    hydra_overrides = [f"+backbone={name}", *(_relative_to_backbone(o) for o in overrides or [])]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path has conf/
        cfg = compose(overrides=hydra_overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(overrides=hydra_overrides)
    return cfg.backbone


def build_backbone(cfg: DictConfig) -> Backbone:
    """Instantiate a backbone config (as found under ``backbone:`` in any run config)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    pretrained = cfg.get("pretrained")
    for key in NON_CONSTRUCTOR_KEYS:
        cfg.pop(key, None)
    check_targets(cfg)
    backbone = hydra.utils.instantiate(cfg, _convert_="all")
    if pretrained:
        from vitlab.checkpoints import load_pretrained

        load_pretrained(backbone, pretrained)
    return backbone


def build_classifier(cfg: DictConfig, num_classes: int) -> ImageClassifier:
    """Backbone config -> ``ImageClassifier``; ``cfg.pretrained`` loads backbone and head."""
    pretrained = cfg.get("pretrained")
    model = ImageClassifier(build_backbone(OmegaConf.merge(cfg, {"pretrained": None})), num_classes)
    if pretrained:
        from vitlab.checkpoints import load_pretrained

        load_pretrained(model, pretrained)
    return model


def create_backbone(name: str, pretrained: str | None = None, overrides: Iterable[str] | None = None) -> Backbone:
    cfg = backbone_config(name, overrides)
    if pretrained is not None:
        cfg.pretrained = str(pretrained)
    return build_backbone(cfg)


def create_model(
    name: str, num_classes: int = 1000, pretrained: str | None = None, overrides: Iterable[str] | None = None
) -> nn.Module:
    cfg = backbone_config(name, overrides)
    if pretrained is not None:
        cfg.pretrained = str(pretrained)
    return build_classifier(cfg, num_classes)
