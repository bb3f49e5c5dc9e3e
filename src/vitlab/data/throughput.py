"""How fast one data-loader worker makes training samples: decode + augmentation, images/s per core.

    python -m vitlab.tools.bench --loader imagenet --fast-decode --threads 1
    python -m vitlab.tools.bench --loader coco
    python -m vitlab.tools.bench --loader ade20k

Generated data in the real formats at realistic sizes (kept under ``<data dir>/bench/``, made once):
ImageNet photos of 500 x 375 (its most common size), COCO 640 x 480 (its typical size, with
masks), ADE20K 683 x 512 (shorter side 512 as most of it). Each dataset is the project's own
training dataset with its default training transforms (the papers' recipes), read in this
process as a worker reads it (``dataset[i]``); a worker is one process, so the figure is
images/s per core: images over the CPU time this process spent (``time.process_time``, which
other processes on a shared machine do not inflate as they inflate wall time; ``--threads 1``
pins torch to one thread, as DataLoader workers run).

``--fast-decode`` (ImageNet) times ``data.fast_decode=true`` alongside, round by round, and adds
the device-side part it moves out of the worker (normalisation + random erasing on the batch,
timed here on the CPU: on a GPU it costs far less) as its own row.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vitlab.data.ade20k import ADE20KDataModule
from vitlab.data.base import ImageBatch
from vitlab.data.coco import CocoDataModule
from vitlab.data.imagenet import ImageNetDataModule

# a typical image's width, height per dataset: its DataModule's (DatasetFacts.image_size)
SIZES = {kind: module.FACTS.image_size for kind, module in
         (("imagenet", ImageNetDataModule), ("coco", CocoDataModule), ("ade20k", ADE20KDataModule))}


@dataclass
class LoaderRow:
    name: str
    rounds: list[float] = field(default_factory=list)  # images/s per round

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.rounds)


def bench_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get("VITLAB_DATA", "data")) / "bench"


def generate(kind: str, root: Path, images: int, size: tuple[int, int] | None = None) -> Path:
    """The generated dataset for ``kind`` with at least ``images`` training images of ``size``
    (width, height; default ``SIZES[kind]``), made once."""
    from vitlab.data import synthetic, synthetic_dense

    width, height = size or SIZES[kind]
    if kind != "imagenet" and height != width * 3 // 4:
        raise SystemExit(f"--image-size {width} {height}: the generated {kind} data is 4:3 (height = 3/4 width)")
    folder = root / f"{kind}_{width}x{height}_{images}"
    done = folder / ".complete"
    if not done.exists():
        if kind == "imagenet":
            synthetic.make_imagenet(folder, num_classes=4, num_train=-(-images // 4), num_val=1, size=width, height=height)
        elif kind == "coco":  # synthetic_dense sizes: the longer side, 3/4 of it the shorter one
            synthetic_dense.make_coco(folder, num_train=images, num_val=2, size=width)
        else:
            synthetic_dense.make_ade20k(folder, num_train=images, num_val=2, size=width)
        done.touch()
    return folder


def datasets(kind: str, folder: Path, fast_decode: bool):
    """{row name: training dataset} with the DataModules' default training transforms."""
    if kind == "imagenet":
        out = {}
        for fast in (False, True) if fast_decode else (False,):
            dm = ImageNetDataModule(str(folder), num_workers=0, fast_decode=fast)
            dm.setup("fit")
            out["fast_decode" if fast else "default"] = dm
        return {name: dm.train_set for name, dm in out.items()}, out.get("fast_decode")
    if kind == "coco":
        dm = CocoDataModule(str(folder), num_workers=0, with_masks=True)
    else:
        dm = ADE20KDataModule(str(folder), num_workers=0)
    dm.setup("fit")
    return {"default": dm.train_set}, None


def _time_samples(dataset, images: int, offset: int) -> tuple[float, list]:
    """(images per CPU second, the samples) of ``images`` consecutive items from ``offset``."""
    n = len(dataset)
    start = time.process_time()
    samples = [dataset[(offset + k) % n] for k in range(images)]
    return images / (time.process_time() - start), samples


def loader_bench(kind: str, images: int = 64, rounds: int = 5, fast_decode: bool = False,
                 data_dir: str | None = None, size: tuple[int, int] | None = None) -> list[LoaderRow]:
    if fast_decode and kind != "imagenet":
        raise SystemExit("--fast-decode applies to --loader imagenet (data.fast_decode is an ImageNet option)")
    folder = generate(kind, bench_dir(data_dir), images, size)
    sets, fast_module = datasets(kind, folder, fast_decode)
    rows = {name: LoaderRow(name) for name in sets}
    device_row = LoaderRow("fast_decode: device part") if fast_module is not None else None
    for r in range(rounds):
        for name, dataset in sets.items():  # interleaved: both see the same machine load
            rate, samples = _time_samples(dataset, images, r * images)
            rows[name].rounds.append(rate)
            if name == "fast_decode":
                batch = ImageBatch(torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]),
                                   torch.tensor(0))
                start = time.process_time()
                fast_module.on_after_batch_transfer(batch, 0)
                device_row.rounds.append(images / (time.process_time() - start))
    return [*rows.values(), *([device_row] if device_row else [])]


def format_loader_table(rows: list[LoaderRow]) -> str:
    head = f"{'pipeline':<28} {'images/s per core':>18} {'vs default':>11}"
    lines = [head, "-" * len(head)]
    base = rows[0]
    for row in rows:
        paired = ("-" if row is base or row.name.endswith("device part") else
                  f"{statistics.median(a / b for a, b in zip(row.rounds, base.rounds)):.2f}x")
        lines.append(f"{row.name:<28} {row.images_per_s:>18.1f} {paired:>11}")
    return "\n".join(lines)
