"""Official GPViT checkpoints (ChenhongyiYang/GPViT: mmcls classifiers, mmdet ViT-Adapter
detectors) -> this project's ``backbone.*`` + ``head.*`` layout."""
from __future__ import annotations

import re

import torch


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official mmcls GPViT checkpoint (``backbone.`` / ``neck.`` / ``head.`` keys, the
    "state_dict" wrapper already removed) -> our ``backbone.*`` + ``head.*`` layout.
    The ``backbone.`` part of the official mmdet ViT-Adapter checkpoints maps the same way."""
    out: dict[str, torch.Tensor] = {}
    first_ad_norm = 1 if "backbone.ad_norm1.weight" in state_dict else 2  # ViT-Adapter: ad_norm1 only with stride 4
    for key, value in state_dict.items():
        m = re.match(r"backbone\.ad_norm(\d+)\.(.*)", key)
        if m:
            out[f"backbone.ad_norms.{int(m[1]) - first_ad_norm}.{m[2]}"] = value
        else:
            out[_convert_key(key)] = value
    return out


# the trunk's top-level modules: under ``trunk.`` in our ViT-Adapter, at the top in the official one
_TRUNK_PARTS = ("patch_embed.", "pos_embed", "layers.")


def convert_official_adapter(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official mmdet ``GPViTAdapter`` / ``GPViTAdapterSingleStage`` checkpoint -> our
    ``GPViTAdapter`` layout: keys as ``convert_official``, the trunk's moved under ``trunk.``.
    Our own earlier layout (the trunk at the top, before the adapter held it) maps the same way."""
    out = {}
    for key, value in convert_official(state_dict).items():
        rest = key[len("backbone."):]
        out[f"backbone.trunk.{rest}" if key.startswith("backbone.") and rest.startswith(_TRUNK_PARTS) else key] = value
    return out


def _convert_key(key: str) -> str:
    prefix, _, rest = key.partition(".")
    if prefix == "neck":  # GroupNeck: group_token, norm_query, attn.k_proj
        return "head.neck." + rest.replace("attn.k_proj", "k_proj")
    if prefix == "head":  # LinearClsHead: fc
        return "head." + rest
    if prefix != "backbone":
        return key
    parts = rest.split(".")
    if parts[0] == "patch_embed":
        if parts[1] == "stem":
            return "backbone." + rest
        if parts[1] == "convs":  # convs.{3j+k} follow the 3 stem modules in our single Sequential
            return "backbone.patch_embed.stem." + ".".join([str(int(parts[2]) + 3), *parts[3:]])
        if parts[1] == "projection":
            return "backbone.patch_embed.proj." + ".".join(parts[2:])
    if parts[0] == "ln1":
        return "backbone.norm." + ".".join(parts[1:])
    if parts[0].startswith("norm") and parts[0][4:].isdigit():  # norm{i}: intermediate output norms
        return f"backbone.out_norms.{parts[0][4:]}." + ".".join(parts[1:])
    if parts[0] == "interactions":  # ViT-Adapter (mmdet checkpoints): the ConvFFN's conv is not wrapped here
        return "backbone." + rest.replace(".ffn.dwconv.dwconv.", ".ffn.dwconv.")
    if parts[0] == "layers":
        head, tail = ".".join(parts[:2]), ".".join(parts[2:])
        return f"backbone.{head}.{_convert_layer_key(tail)}"
    return "backbone." + rest


_LAYER_RENAMES = (
    # LePE block
    ("qkv.", "attn.qkv."),
    ("attns.0.get_v.", "attn.lepe.0."),
    ("attns.1.get_v.", "attn.lepe.1."),
    ("proj.", "attn.proj."),
    ("ffn.layers.0.0.", "mlp.fc1."),
    ("ffn.layers.1.", "mlp.fc2."),
    # GP block
    ("group_token", "group.group_token"),
    ("group_layer.norm_query.", "group.norm_query."),
    ("group_layer.norm_key.", "group.norm_key."),
    ("group_layer.attn.k_proj.", "group.k_proj."),
    ("un_group_layer.norm_query.", "ungroup.norm_query."),
    ("un_group_layer.norm_key.", "ungroup.norm_key."),
    ("un_group_layer.attn.q_proj.", "ungroup.q_proj."),
    ("un_group_layer.attn.k_proj.", "ungroup.k_proj."),
    ("un_group_layer.attn.v_proj.", "ungroup.v_proj."),
    ("un_group_layer.attn.proj.", "ungroup.proj."),
    ("un_group_layer.proj.", "ungroup.cat_proj."),
    ("un_group_layer.norm2.", "ungroup.norm2."),
    ("un_group_layer.ffn.layers.0.0.", "ungroup.mlp.fc1."),
    ("un_group_layer.ffn.layers.1.", "ungroup.mlp.fc2."),
    ("dwconv.", "dw."),
)

_MIXER_RENAMES = (
    ("patch_mixer.0.", "token_mlp.fc1."),
    ("patch_mixer.3.", "token_mlp.fc2."),
    ("channel_mixer.0.", "channel_mlp.fc1."),
    ("channel_mixer.3.", "channel_mlp.fc2."),
)


def _convert_layer_key(tail: str) -> str:
    if tail.startswith("mixer.layers."):  # mixer.layers.{d}.X -> propagate.{d}.X
        d, _, rest = tail[len("mixer.layers."):].partition(".")
        return f"propagate.{d}.{_first_prefix_renamed(rest, _MIXER_RENAMES)}"
    for old, new in _LAYER_RENAMES:
        if tail.startswith(old) and not (old == "group_token" and tail != "group_token"):
            return new + tail[len(old):]
    return tail  # norm1, norm2, dw


# ---- the way out: our layout -> the official mmcls / mmdet one (vitlab.tools.export --format official)
def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``backbone.*`` + ``head.*`` -> the official mmcls GPViT layout (``backbone.`` / ``neck.`` /
    ``head.``): the inverse of ``convert_official``. A ViT-Adapter's extra keys (``interactions``,
    ``ad_norms``, ...) map back as ``convert_official`` maps them in (see ``to_official_adapter``)."""
    first_ad_norm = 1 if "backbone.up.weight" in state_dict else 2  # as convert_official: ad_norm1 with stride 4 only
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"backbone\.ad_norms\.(\d+)\.(.*)", key)
        out[f"backbone.ad_norm{int(m[1]) + first_ad_norm}.{m[2]}" if m else _official_key(key)] = value
    return out


def to_official_adapter(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``GPViTAdapter`` layout -> the official mmdet one: the trunk back at the top, then ``to_official``."""
    return to_official({key.replace("backbone.trunk.", "backbone.", 1): v for key, v in state_dict.items()})


def _official_key(key: str) -> str:
    if key.startswith("head.neck."):
        return "neck." + re.sub(r"(^|\.)k_proj\.", r"\1attn.k_proj.", key[len("head.neck."):])
    if not key.startswith("backbone."):
        return key  # head.fc.* is the official head's name already
    parts = key.split(".")[1:]
    if parts[:2] == ["patch_embed", "stem"] and int(parts[2]) >= 3:  # the conv stack after the 3 stem modules
        return "backbone.patch_embed.convs." + ".".join([str(int(parts[2]) - 3), *parts[3:]])
    if parts[:2] == ["patch_embed", "proj"]:
        return "backbone.patch_embed.projection." + ".".join(parts[2:])
    if parts[0] == "norm":
        return "backbone.ln1." + ".".join(parts[1:])
    if parts[0] == "out_norms":
        return f"backbone.norm{parts[1]}." + ".".join(parts[2:])
    if parts[0] == "interactions":
        return key.replace(".ffn.dwconv.", ".ffn.dwconv.dwconv.")
    if parts[0] == "layers":
        return f"backbone.layers.{parts[1]}." + _official_layer_key(".".join(parts[2:]))
    return key


def _official_layer_key(tail: str) -> str:
    if tail.startswith("propagate."):
        d, _, rest = tail[len("propagate."):].partition(".")
        return f"mixer.layers.{d}.{_first_prefix_renamed(rest, [(new, old) for old, new in _MIXER_RENAMES])}"
    if re.match(r"dw\.\d", tail):  # the GP block's conv + BN (official dwconv.N); the local block's dw conv keeps its name
        return "dwconv." + tail[len("dw."):]
    for old, new in _LAYER_RENAMES:
        if old != "dwconv." and tail.startswith(new) and not (new == "group.group_token" and tail != new):
            return old + tail[len(new):]
    return tail


def _first_prefix_renamed(text: str, renames) -> str:
    """``text`` with the first (old prefix, new prefix) pair that starts it applied; unchanged if none does."""
    for old, new in renames:
        if text.startswith(old):
            return new + text[len(old):]
    return text
