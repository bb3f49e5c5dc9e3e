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
from vitlab.backbones.layers import run_block

__all__ = ["TimmCNN", "TimmColumnarViT", "TimmSwin"]


def convert_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm / torchvision classifier state dict -> ``backbone.body.*`` + ``head.*``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):  # ResNet / ResNeXt classifier -> ClassifierHead.fc
            out["head." + key] = value
        elif key.startswith("head."):  # ViT classifier
            out[key] = value
        else:
            out["backbone.body." + key] = value
    return out


def to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``backbone.body.*`` + ``head.*`` -> timm's classifier layout (the inverse of ``convert_timm``):
    the CNNs' ``ClassifierHead`` (``head.fc``) is timm's ``fc``, the ViT's linear head is ``head``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("head.fc."):
            out[key[len("head."):]] = value
        elif key.startswith("head."):
            out[key] = value
        else:
            out[key.removeprefix("backbone.body.")] = value
    return out


class _TimmBody(Backbone):
    """A backbone around a timm model ``self.body``, whose checkpoints ``convert_official`` reads;
    timm's layout is these baselines' official one (torchvision's ResNets share its names)."""

    body: nn.Module
    convert_official = staticmethod(convert_timm)
    to_official = to_timm = staticmethod(to_timm)

    def timm_architecture(self, config: dict) -> tuple[str, dict]:
        return config["model_name"], {}


class TimmCNN(_TimmBody):
    """A timm CNN (``features_only``) with timm's average-pool + linear classifier head.

    mmdetection's ResNet options (its detection configs use ``frozen_stages=1, norm_eval=True``):
    ``frozen_stages``: the stem and the first N residual stages keep their weights and BN statistics
    (-1: none); ``norm_eval``: every BatchNorm keeps its running statistics while training."""

    def __init__(self, *, model_name: str, out_indices: list[int], in_chans: int, drop_rate: float,
                 drop_path_rate: float, grad_checkpointing: bool = False, frozen_stages: int = -1,
                 norm_eval: bool = False):
        super().__init__()
        self.body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices,
                                      in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.set_grad_checkpointing(grad_checkpointing)
        self.out_channels = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        self.drop_rate = drop_rate
        self.norm_eval = norm_eval
        self.frozen: list[str] = []  # names in body: the stem (conv1, bn1, ...) then layer1..layer<frozen_stages>
        if frozen_stages >= 0:
            names = [n for n, _ in self.body.named_children()]
            if f"layer{max(frozen_stages, 1)}" not in names:
                raise ValueError(f"backbone.frozen_stages={frozen_stages}: {model_name} has the children {names}")
            last = names.index("layer1") - 1 if frozen_stages == 0 else names.index(f"layer{frozen_stages}")
            self.frozen = names[:last + 1]
            for name in self.frozen:
                getattr(self.body, name).requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            getattr(self.body, name).eval()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not self.grad_checkpointing:
            return self.body(images)
        # timm's FeatureListNet loop, checkpointing through run_block: timm's own checkpointing
        # re-runs BatchNorm's statistics update in the recompute (every batch counted twice).
        # As timm, the first and last modules and in-place ones (a stem's ReLU) run plainly.
        outs, x, last = [], images, len(self.body) - 1
        for i, (name, module) in enumerate(self.body.items()):
            plain = i in (0, last) or getattr(module, "inplace", False) is True
            x = run_block(module, x, checkpointing=not plain)
            if name in self.body.return_layers:
                outs.append(x)
        return outs

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)[-1]

    def make_head(self, num_classes: int) -> nn.Module:
        return ClassifierHead(self.out_channels[-1], num_classes, pool_type="avg", drop_rate=self.drop_rate)


class TimmColumnarViT(_TimmBody):
    """timm ViT whose intermediate layers are resized to a pyramid (PVT Table 8)."""

    def __init__(self, *, model_name: str, patch_size: int, img_size: int, in_chans: int, out_indices: list[int],
                 out_strides: list[int], drop_rate: float, drop_path_rate: float, grad_checkpointing: bool = False):
        super().__init__()
        if len(out_indices) != len(out_strides):
            raise ValueError("out_indices and out_strides need the same length")
        # num_classes=0: the trunk returns the pooled (class token, normed) vector; our head is the linear
        self.body = timm.create_model(
            model_name, pretrained=False, num_classes=0, patch_size=patch_size, img_size=img_size,
            in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            dynamic_img_size=True, dynamic_img_pad=True,  # any input size: resized pos. embedding, padding
        )
        self.set_grad_checkpointing(grad_checkpointing)
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

    def timm_architecture(self, config: dict) -> tuple[str, dict]:
        return config["model_name"], {"patch_size": self.patch_size, "img_size": config["img_size"],
                                      "dynamic_img_size": True, "dynamic_img_pad": True}

    def drop_classification_parts(self) -> None:
        # the blocks after the last tapped one, the final norm and the pooling serve the classifier only
        self.body.prune_intermediate_layers(self.out_indices, prune_norm=True, prune_head=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.body.set_grad_checkpointing(enable)  # timm's own, per block (use_reentrant=False; no BatchNorm)

    def make_head(self, num_classes: int) -> nn.Module:
        head = nn.Linear(self.body.embed_dim, num_classes)
        trunc_normal_(head.weight, std=0.02)  # timm's default ViT init for linears
        nn.init.zeros_(head.bias)
        return head

    def no_weight_decay(self) -> set[str]:
        return {f"body.{n}" for n in self.body.no_weight_decay()}


def convert_timm_swin(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin classifier state dict -> ours: timm's ``layers.N`` are ``layers_N`` in its
    ``features_only`` model, and its final ``norm`` is our last output norm."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            out[key] = value
        elif key.startswith("norm."):  # Swin's final norm
            out["backbone.norms.3." + key[len("norm."):]] = value
        elif key.startswith("layers."):  # Swin stages
            out["backbone.body.layers_" + key[len("layers."):]] = value
        else:
            out["backbone.body." + key] = value
    # the other output norms are new layers (Swin's detection backbone): LayerNorm's own init
    for k in range(sum(k.endswith(".downsample.norm.weight") for k in state_dict)):
        width = state_dict[f"layers.{k + 1}.downsample.norm.weight"].shape[0] // 4
        out[f"backbone.norms.{k}.weight"], out[f"backbone.norms.{k}.bias"] = torch.ones(width), torch.zeros(width)
    return out


def to_timm_swin(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> timm's Swin classifier (the inverse of ``convert_timm_swin``). The output norms of
    stages 1-3 are not part of timm's Swin (its detection backbone's) and are left out."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.norms."):
            if key.startswith("backbone.norms.3."):
                out["norm." + key[len("backbone.norms.3."):]] = value
        elif key.startswith("backbone.body.layers_"):
            out["layers." + key[len("backbone.body.layers_"):]] = value
        else:
            out[key.removeprefix("backbone.body.")] = value
    return out


class TimmSwin(_TimmBody):
    """timm Swin Transformer: four NCHW maps (strides 4-32), each through its own LayerNorm."""

    convert_official = staticmethod(convert_timm_swin)
    to_official = to_timm = staticmethod(to_timm_swin)

    def __init__(self, *, model_name: str, out_indices: list[int], in_chans: int, drop_rate: float,
                 drop_path_rate: float, grad_checkpointing: bool = False):
        super().__init__()
        self.body = timm.create_model(model_name, pretrained=False, features_only=True, out_indices=out_indices,
                                      in_chans=in_chans, drop_path_rate=drop_path_rate, dynamic_img_size=True)
        self.set_grad_checkpointing(grad_checkpointing)
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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.body.set_grad_checkpointing(enable)  # timm's own, per block (LayerNorm only: no statistics)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

