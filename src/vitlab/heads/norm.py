"""Normalisation layers the dense heads accept by name (mmdetection / mmsegmentation's ``norm_cfg``)."""
from __future__ import annotations

from functools import partial

from torch import nn

# name -> layer factory taking the channel count; GN uses 32 groups, as mmdet's GN configs
NORMS = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm, "GN": partial(nn.GroupNorm, 32), "none": None}


def norm_layer(name: str, key: str):
    """The factory for ``name`` (None for ``none``). ``SyncBN`` syncs batch statistics across DDP
    processes (the official dense configs use it) and is plain BatchNorm in a single process."""
    if name not in NORMS:
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(NORMS)}")
    return NORMS[name]
