"""Load weights from our own files or a family's official release files.

Accepted files: ``.safetensors``; ``torch.save`` files read with
``weights_only=True`` (checkpoints from the internet are untrusted, so no
pickled code is ever executed); Lightning checkpoints of this project
(``state_dict`` with a ``model.`` prefix); mmcls-style ``{"state_dict": ...}``
and ``{"model": ...}`` wrappers. Our layout is ``backbone.*`` + ``head.*``
(``ImageClassifier``): a file whose keys are all in it is used as it is, anything
else goes through ``type(backbone).convert_official``. Then the backbone's
``adapt_state_dict`` resizes size-dependent tensors (position embeddings, relative
position bias tables) to the model's shapes (logged), and the load is strict.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from vitlab.backbones.base import Backbone, ImageClassifier

log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    pass


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses pickled objects: say so plainly
            raise CheckpointMismatchError(
                f"{path}: cannot be read as a weights-only checkpoint ({err.__class__.__name__}: {err})"
            ) from err
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors")
    if any(k.startswith("model.backbone.") for k in sd):  # a vitlab Lightning checkpoint
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def to_our_layout(sd: dict[str, torch.Tensor], backbone: Backbone, expected: set[str], bare: bool) -> dict:
    """``sd`` in our ``backbone.*``/``head.*`` layout: as it is when every key is one of the model's
    (``head.*`` keys too when loading a bare backbone, which drops them), else converted by the family."""
    if all(k in expected or (bare and k.startswith("head.")) for k in sd):
        return sd
    return type(backbone).convert_official(dict(sd))


def _adapt(sd: dict[str, torch.Tensor], backbone: Backbone, source: str) -> dict[str, torch.Tensor]:
    """Resize the ``backbone.*`` tensors whose shape depends on the input size to the model's."""
    part = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    part, messages = backbone.adapt_state_dict(part)
    for message in messages:
        log.info("%s: resized %s", source, message)
    return {**{k: v for k, v in sd.items() if not k.startswith("backbone.")}, **{f"backbone.{k}": v for k, v in part.items()}}


def _check_and_load(model: nn.Module, sd: dict, source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:

        def show(items):
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__} "
            f"({type(getattr(model, 'backbone', model)).__name__}): "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
            f"shape mismatches [{show(shapes)}]"
        )
    model.load_state_dict(sd, strict=True)


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` strictly into an ``ImageClassifier`` or a bare ``Backbone`` (head dropped)."""
    sd = read_state_dict(path)
    if isinstance(model, ImageClassifier):
        sd = _adapt(to_our_layout(sd, model.backbone, set(model.state_dict()), bare=False), model.backbone, str(path))
        _check_and_load(model, sd, str(path))
    elif isinstance(model, Backbone):
        sd = to_our_layout(sd, model, {f"backbone.{k}" for k in model.state_dict()}, bare=True)
        sd = _adapt(sd, model, str(path))
        _check_and_load(model, {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, str(path))
    else:
        _check_and_load(model, sd, str(path))
    return model
