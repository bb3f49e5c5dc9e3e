"""The contract every backbone in vitlab follows.

A backbone is an ``nn.Module`` that

* ``forward(images) -> list[Tensor]``: NCHW feature maps, one per entry of
  ``strides`` (e.g. 4, 8, 16, 32), with ``out_channels[i]`` channels each; any
  input size works (families pad internally and interpolate position embeddings);
* ``forward_features(images)``: whatever the family's classification head reads
  (pooled vector, token sequence, cls token, ...);
* ``make_head(num_classes) -> nn.Module``: the family's official classification
  head, applied to ``forward_features``' output;
* ``no_weight_decay() -> set[str]``: parameter names exempt from weight decay
  (timm's optimiser factory reads this; norms and biases are exempt anyway);
* ``grad_checkpointing`` (a constructor field of every family, and
  ``set_grad_checkpointing(enable)`` as timm's models have): recompute each block's
  activations in the backward pass instead of keeping them (``layers.run_block``);
* ``convert_official(state_dict)`` (a static method): an official release's state
  dict -> our layout (below); the default converts nothing (no official release);
* ``to_official(state_dict)`` / ``to_timm(state_dict)`` (class methods): the way out,
  our layout -> the authors' release / timm's (``vitlab.tools.export --format official|timm|mmdet``);
  the default refuses with a message;
* ``adapt_state_dict(state_dict) -> (state_dict, messages)``: resizes the tensors
  whose shape depends on the input size or window (position embeddings, relative
  position bias tables) to this model's, so that weights trained at 224 load into a
  model built for another size; one message per resized tensor.

Classification models are ``ImageClassifier(backbone, num_classes)``, so every
state dict in this project has the layout ``backbone.*`` + ``head.*``.
``vitlab.runtime.checkpoints.load_pretrained`` uses a file as it is when its keys are in
that layout, else ``type(backbone).convert_official``; then ``adapt_state_dict``,
then a strict load.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class Backbone(nn.Module):
    out_channels: list[int]
    strides: list[int]
    grad_checkpointing: bool = False

    pruned_keys: frozenset[str] = frozenset()
    # the key the official release's .pth keeps its state dict under (None: the file is the state dict)
    official_container: str | None = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def prune_for_dense(self) -> None:
        """Drop what the dense outputs (``forward``) never use: under DDP a parameter that gets no
        gradient stops training ("find_unused_parameters"), and the official dense backbones do not
        have these parts. The dropped state-dict keys are kept in ``pruned_keys``: weight loading
        skips them in a classifier's checkpoint, and old dense checkpoints that still hold them load."""
        before = set(self.state_dict())
        self.drop_classification_parts()
        self.pruned_keys = frozenset(before - set(self.state_dict()))

    def classification_only_keys(self) -> frozenset[str]:
        """The state-dict keys ``prune_for_dense`` drops (found on a copy; this model is unchanged)."""
        if self.pruned_keys:
            return self.pruned_keys
        probe = copy.deepcopy(self)
        probe.prune_for_dense()
        return probe.pruned_keys

    def drop_classification_parts(self) -> None:
        """Families whose ``forward`` leaves parameters unused remove them here (default: none)."""

    def forward_features(self, images: torch.Tensor):
        raise NotImplementedError

    def make_head(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return set()

    @staticmethod
    def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official release -> ``backbone.*`` + ``head.*``; families with a release override it."""
        return dict(state_dict)

    @classmethod
    def to_official(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``backbone.*`` + ``head.*`` -> the authors' release layout (the inverse of
        ``convert_official``; ``vitlab.tools.export --format official``). Families with a release override it."""
        raise ValueError(f"{cls.__name__}: no converter to an official layout")

    @classmethod
    def to_timm(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``backbone.*`` + ``head.*`` -> timm's layout (``vitlab.tools.export --format timm``)."""
        raise ValueError(f"{cls.__name__}: timm has no model of this family, so there is no timm layout to write")

    def timm_architecture(self, config: dict) -> tuple[str, dict]:
        """(timm model name, keyword arguments) of the timm classifier that ``to_timm``'s weights
        fill, for timm's ``config.json`` (``config``: this backbone's config)."""
        raise ValueError(f"{type(self).__name__}: timm has no model of this family")

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Our-layout backbone state dict (no ``backbone.`` prefix) -> one with this model's
        size-dependent shapes, and what was changed. The default changes nothing."""
        return dict(state_dict), []


class ImageClassifier(nn.Module):
    """Backbone + its family's head; the model behind ``vitlab.create_model``."""

    def __init__(self, backbone: Backbone, num_classes: int = 1000):
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.head = backbone.make_head(num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(images))

    def no_weight_decay(self) -> set[str]:
        head = self.head.no_weight_decay() if hasattr(self.head, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()} | {f"head.{n}" for n in head}
