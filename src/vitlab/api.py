"""Python entry points: build backbones and classifiers from the same YAML as the CLI.

    import vitlab
    model = vitlab.create_model("pvt_v2_b2", num_classes=1000, pretrained="pvt_v2_b2.pth")
    backbone = vitlab.create_backbone("pale_t", overrides=["attn_mode=axial"])

Overrides are Hydra override strings relative to the backbone config
(``pale_size=3``, ``depths=[2,2,2,2]``), exactly what ``backbone.<key>=...``
does on the command line.
"""
from __future__ import annotations

from typing import Iterable

from omegaconf import DictConfig
from torch import nn

from vitlab.backbones.base import Backbone
from vitlab.runtime.build import build_backbone, build_classifier
from vitlab.runtime.config import compose
from vitlab.runtime.resources import conf_dir


def available_backbones() -> list[str]:
    """The variants: ``conf/backbone/*.yaml``, not the family bases they extend (``conf/backbone/family/``)."""
    return sorted(p.stem for p in (conf_dir() / "backbone").glob("*.yaml"))  # not recursive: no family/


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
    return compose(None, hydra_overrides).backbone


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
