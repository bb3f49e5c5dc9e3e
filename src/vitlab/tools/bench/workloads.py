"""What one step feeds a model: classification batches, and the dense tasks' images, boxes, masks and label maps
at the papers' sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.data.coco import CocoDataModule


TASKS = {"retinanet": "coco_retinanet", "maskrcnn": "coco_maskrcnn", "fpn": "ade20k_fpn", "upernet": "ade20k_upernet"}


@lru_cache(maxsize=None)
def task_data(task: str) -> type:
    """The DataModule class a task reads (``conf/task/<task>.yaml`` picks it): its ``FACTS`` hold the
    papers' training size."""
    from vitlab.runtime.build import locate
    from vitlab.runtime.config import compose

    return locate(compose("train", [f"task={task}"]).data._target_)


@dataclass
class Workload:
    """What one step feeds a model: ``loss(model)`` (train mode) and ``forward(model)`` (eval mode)."""

    batch: int
    input_size: tuple[int, int]
    loss: Callable[[nn.Module], torch.Tensor]
    forward: Callable[[nn.Module], Any]
    task: str | None = None


def classification_workload(batch: int, size: tuple[int, int], device: torch.device) -> Workload:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    return Workload(batch, size, lambda m: F.cross_entropy(m(x), y), lambda m: m(x))


def detection_workload(batch: int, size: tuple[int, int], device: torch.device, masks: bool, task: str,
                       objects: int = 8) -> Workload:
    """Images in [0, 1] (detectors normalise inside) with ``objects`` random boxes (and box-shaped masks) each."""
    gen = torch.Generator().manual_seed(0)
    h, w = size
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, h, w, generator=gen).to(device))
        wh = torch.rand(objects, 2, generator=gen) * torch.tensor([w, h]) * 0.3 + 16
        xy = torch.rand(objects, 2, generator=gen) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        target = {"boxes": boxes.to(device), "labels": torch.randint(0, 80, (objects,), generator=gen).to(device)}
        if masks:
            m = torch.zeros(objects, h, w, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            target["masks"] = m.to(device)
        targets.append(target)
    return Workload(batch, size, lambda m: sum(m(images, targets).values()), lambda m: m(images), task)


def segmentation_workload(batch: int, size: tuple[int, int], device: torch.device, task: str,
                          aux_weight: float = 0.4, ignore_index: int = 255) -> Workload:
    """Normalised images and ADE20K-like label maps (150 classes, some pixels ignored); mmseg's loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    y = torch.randint(0, 150, (batch, *size), generator=gen)
    y[:, : size[0] // 8] = ignore_index
    y = y.to(device)

    def loss(model):
        logits, aux = model(x)
        out = F.cross_entropy(logits, y, ignore_index=ignore_index)
        return out if aux is None else out + aux_weight * F.cross_entropy(aux, y, ignore_index=ignore_index)

    return Workload(batch, size, loss, lambda m: m(x), task)


def make_workload(task: str | None, batch: int, size: tuple[int, int] | None, device: torch.device) -> Workload:
    if task is None:
        return classification_workload(batch, size or (224, 224), device)
    full = TASKS[task]
    data = task_data(full)
    size = size or data.FACTS.train_input
    if issubclass(data, CocoDataModule):
        return detection_workload(batch, size, device, masks=task == "maskrcnn", task=full)
    return segmentation_workload(batch, size, device, task=full)
