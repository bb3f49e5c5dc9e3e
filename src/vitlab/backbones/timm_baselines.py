"""Baselines the PVT papers compare against, taken from timm rather than rewritten.

* ``TimmCNN``: ResNet-18/50/101, ResNeXt-101 32x4d / 64x4d (PVT Tables 2-5):
  timm's ``features_only`` trunk (strides 4/8/16/32) + timm's own classifier head
  (global average pool + linear, ``ClassifierHead``), so the classifier has
  exactly timm's parameters.
* ``TimmColumnarViT``: PVT Table 8's columnar ViT in a detector. The paper
  (footnote 3): "we extract the features from the layer 2, 4, 6, and 8 of
  ViT-Small/32, and interpolate them to different scales". Decisions it leaves
  open: layers are 1-based (outputs of blocks 1, 3, 5, 7), taken before the
  final norm; "interpolate" is bilinear resizing (parameter-free: up for
  ViT-S/32, down for ViT-S/4) of the patch grid to the grid of each output
  stride, i.e. grid x patch/stride (rounded up). The classification path is
  timm's whole ViT (12 blocks, norm, class token) + a linear head.
* ``TimmSwin``: Swin-T, the transformer baseline of PVTv2 Table 4: timm's ``features_only``
  Swin (any input size: ``dynamic_img_size``, inputs padded to the patch size) with a LayerNorm on
  each output as Swin's official detection backbone (``norm0``..``norm3``); the last one is timm's
  final ``norm``, so the classifier (+ timm's average-pool / linear head) computes timm's model
  (with 1,344 parameters more: the three other output norms, unused by the classifier).

``convert_official`` maps timm's (and torchvision's: same names for ResNets)
released state dicts to our layout: the trunk goes under ``backbone.body.``,
``fc.*`` (CNNs) / ``head.*`` (ViT) become our head.
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, trunc_normal_
from torch import nn

from vitlab.backbones.base import Backbone

__all__ = ["TimmCNN", "TimmColumnarViT", "TimmSwin", "convert_official"]


class TimmCNN(Backbone):
    """A timm CNN (``features_only``) with timm's average-pool + linear classifier head."""

    def __init__(self, *, model_name: str, out_indices: list[int], in_chans: int, drop_rate: float,
                 drop_path_rate: float):
        super().__init__()
        self.body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices,
                                      in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        self.drop_rate = drop_rate

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body(images)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)[-1]

    def make_head(self, num_classes: int) -> nn.Module:
        return ClassifierHead(self.out_channels[-1], num_classes, pool_type="avg", drop_rate=self.drop_rate)


class TimmColumnarViT(Backbone):
    """timm ViT whose intermediate layers are resized to a pyramid (PVT Table 8)."""

    def __init__(self, *, model_name: str, patch_size: int, img_size: int, in_chans: int, out_indices: list[int],
                 out_strides: list[int], drop_rate: float, drop_path_rate: float):
        super().__init__()
        if len(out_indices) != len(out_strides):
            raise ValueError("out_indices and out_strides need the same length")
        # num_classes=0: the trunk returns the pooled (class token, normed) vector; our head is the linear
        self.body = timm.create_model(
            model_name, pretrained=False, num_classes=0, patch_size=patch_size, img_size=img_size,
            in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            dynamic_img_size=True, dynamic_img_pad=True,  # any input size: resized pos. embedding, padding
        )
        self.patch_size = patch_size
        self.out_indices = list(out_indices)
        self.out_channels = [self.body.embed_dim] * len(out_indices)
        self.strides = list(out_strides)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.body.forward_intermediates(
            images, indices=self.out_indices, output_fmt="NCHW", intermediates_only=True, stop_early=True
        )
        outs = []
        for x, stride in zip(maps, self.strides):
            size = tuple(math.ceil(g * self.patch_size / stride) for g in x.shape[-2:])
            outs.append(x if size == tuple(x.shape[-2:]) else
                        F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return outs

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def make_head(self, num_classes: int) -> nn.Module:
        head = nn.Linear(self.body.embed_dim, num_classes)
        trunc_normal_(head.weight, std=0.02)  # timm's default ViT init for linears
        nn.init.zeros_(head.bias)
        return head

    def no_weight_decay(self) -> set[str]:
        return {f"body.{n}" for n in self.body.no_weight_decay()}


class TimmSwin(Backbone):
    """timm Swin Transformer: four NCHW maps (strides 4-32), each through its own LayerNorm."""

    def __init__(self, *, model_name: str, out_indices: list[int], in_chans: int, drop_rate: float,
                 drop_path_rate: float):
        super().__init__()
        self.body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices,
                                      in_chans=in_chans, drop_path_rate=drop_path_rate, dynamic_img_size=True)
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        self.patch_size = self.body.patch_embed.patch_size[0]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)
        self.drop_rate = drop_rate

    def _maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """NHWC maps after their norms; the input padded (right, bottom) to the patch size, as Swin's PatchEmbed."""
        h, w = images.shape[-2:]
        images = F.pad(images, (0, (-w) % self.patch_size, 0, (-h) % self.patch_size))
        return [norm(x) for norm, x in zip(self.norms, self.body(images))]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [x.permute(0, 3, 1, 2) for x in self._maps(images)]

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self._maps(images)[-1]

    def make_head(self, num_classes: int) -> nn.Module:
        return ClassifierHead(self.out_channels[-1], num_classes, pool_type="avg", drop_rate=self.drop_rate,
                              input_fmt="NHWC")

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm / torchvision classifier state dict -> ``backbone.body.*`` + ``head.*``.

    Swin: timm's ``layers.N`` are ``layers_N`` in its ``features_only`` model, and its final
    ``norm`` is our last output norm.
    """
    out = {}
    swin = any(k.startswith("layers.") for k in state_dict)
    for key, value in state_dict.items():
        if key.startswith("fc."):  # ResNet / ResNeXt classifier -> ClassifierHead.fc
            out["head." + key] = value
        elif key.startswith("head."):  # ViT / Swin classifier
            out[key] = value
        elif swin and key.startswith("norm."):  # Swin's final norm
            out["backbone.norms.3." + key[len("norm."):]] = value
        elif key.startswith("layers."):  # Swin stages
            out["backbone.body.layers_" + key[len("layers."):]] = value
        else:
            out["backbone.body." + key] = value
    if swin:  # the other output norms are new layers (Swin's detection backbone): LayerNorm's own init
        for k in range(sum(k.endswith(".downsample.norm.weight") for k in state_dict)):
            width = state_dict[f"layers.{k + 1}.downsample.norm.weight"].shape[0] // 4
            out[f"backbone.norms.{k}.weight"], out[f"backbone.norms.{k}.bias"] = torch.ones(width), torch.zeros(width)
    return out
