"""Small pieces shared by the detectors of ``one_stage``, ``cascade``, ``sparse_rcnn`` and ``detr``.

* ``mean_over_processes``: loss normalisers (number of positives, of boxes) averaged over the DDP
  processes, as mmdetection's ``reduce_mean`` and DETR's ``num_boxes`` do, so every process divides
  by the same number.
* ``hungarian_match``: the minimum-cost one-to-one assignment of set predictors (DETR, Sparse
  R-CNN), SciPy's ``linear_sum_assignment`` on the CPU.
* ``FlopsDetector``: the label-offset wrapper with a ``flops_forward`` that delegates to the model.
* ``fixed_rois``: data-independent RoI features for ``flops_forward`` (RoIAlign is not a
  multiply-add layer and its level assignment is data-dependent, so the meta device cannot run it).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from vitlab.heads.detection import _Detector


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    """``value`` (a float tensor) averaged over the processes of a DDP run; itself otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (predictions) and columns (ground truths) of the minimum-cost matching of a Q x G cost matrix."""
    rows, cols = linear_sum_assignment(cost.detach().float().cpu().numpy())
    return (torch.as_tensor(rows, dtype=torch.int64, device=cost.device),
            torch.as_tensor(cols, dtype=torch.int64, device=cost.device))


def fixed_rois(like: torch.Tensor, num: int, channels: int, size: int) -> torch.Tensor:
    """``num`` RoI feature maps of ``channels`` x ``size`` x ``size`` on ``like``'s device and dtype."""
    return like.new_zeros((num, channels, size, size))


class FlopsDetector(_Detector):
    """``vitlab.heads.detection``'s wrapper (targets as plain tensors, labels 0..K-1) around a
    model of ours that has its own ``flops_forward``."""

    def flops_forward(self, images: torch.Tensor):
        return self.model.flops_forward(images)
