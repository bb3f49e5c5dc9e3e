"""vitlab: vision-transformer backbones (PVT, PVTv2, Pale, GPViT, ScalableViT) on Lightning + Hydra."""
from vitlab.api import available_backbones, create_backbone, create_model

__all__ = ["available_backbones", "create_backbone", "create_model"]
