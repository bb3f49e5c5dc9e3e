"""How fast one data-loader worker makes training samples: decode + augmentation, images/s per core.

    python -m vitlab.tools.bench --loader imagenet --fast-decode
    python -m vitlab.tools.bench --loader coco
    python -m vitlab.tools.bench --loader ade20k

Generated data in the real formats at realistic sizes (kept under ``<data dir>/bench/``, made once):
ImageNet photos of 500 x 375 (its most common size), COCO 640 x 480 (its typical size, with
masks), ADE20K 683 x 512 (shorter side 512 as most of it). Each dataset is the project's own
training dataset with its default training transforms (the papers' recipes), read in this
process as a worker reads it (``dataset[i]``); a worker is one process, so the figure is
images/s per core: images over the CPU time this process spent (``time.process_time``, which
other processes on a shared machine do not inflate as they inflate wall time), torch on one
thread as in a DataLoader worker.

``--fast-decode`` (ImageNet) times ``data.fast_decode=true`` alongside, round by round, and adds
the device-side part it moves out of the worker (normalisation + random erasing on the batch,
timed here on the CPU: on a GPU it costs far less) as its own row.
"""
from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import pickle
import resource
import shutil
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


def datasets(kind: str, folder: Path, fast_decode: bool) -> dict:
    """{row name: DataModule} with the DataModules' default training transforms, set up."""
    if kind == "imagenet":
        out = {}
        for fast in (False, True) if fast_decode else (False,):
            out["fast_decode" if fast else "default"] = ImageNetDataModule(str(folder), num_workers=0, fast_decode=fast)
    elif kind == "coco":
        out = {"default": CocoDataModule(str(folder), num_workers=0, with_masks=True)}
    else:
        out = {"default": ADE20KDataModule(str(folder), num_workers=0)}
    for dm in out.values():
        dm.setup("fit")
    return out


def _time_samples(dataset, images: int, offset: int) -> tuple[float, list]:
    """(images per CPU second, the samples) of ``images`` consecutive items from ``offset``."""
    n = len(dataset)
    start = time.process_time()
    samples = [dataset[(offset + k) % n] for k in range(images)]
    return images / (time.process_time() - start), samples


def loader_bench(kind: str, images: int = 64, rounds: int = 5, fast_decode: bool = False,
                 data_dir: str | None = None, size: tuple[int, int] | None = None) -> list[LoaderRow]:
    """Images per CPU-second of each training pipeline's worker part (``dataset[i]``) and, for ImageNet
    (whose batches leave the workers as uint8), of its part after the transfer (normalisation and
    random erasing: on the device in a run, timed here on the CPU)."""
    if fast_decode and kind != "imagenet":
        raise SystemExit("--fast-decode applies to --loader imagenet (data.fast_decode is an ImageNet option)")
    folder = generate(kind, bench_dir(data_dir), images, size)
    modules = datasets(kind, folder, fast_decode)
    rows = {name: LoaderRow(name) for name in modules}
    device_rows = {name: LoaderRow(f"{name}: device part") for name in modules} if kind == "imagenet" else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: per core (16 threads read 12 img/s on a 16-core host)
    try:
        for r in range(rounds):
            for name, dm in modules.items():  # interleaved: every pipeline sees the same machine load
                rate, samples = _time_samples(dm.train_set, images, r * images)
                rows[name].rounds.append(rate)
                if name in device_rows:
                    batch = ImageBatch(torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples]),
                                       torch.tensor(0))
                    start = time.process_time()
                    dm.on_after_batch_transfer(batch, 0)
                    device_rows[name].rounds.append(images / (time.process_time() - start))
    finally:
        torch.set_num_threads(threads)
    return [*rows.values(), *device_rows.values()]


def gpu_decode_rate(folder: Path, device: str, batch: int = 128, rounds: int = 3) -> float:
    """Images/s of ``data.gpu_decode``'s device part on ``device``, as a run does it per training
    batch: the DataModule's transfer (decode, random resized crop and flip: ``DeviceAugment``) and its
    after-transfer hook (normalisation, random erasing), on batches of ``batch`` generated JPEGs read
    beforehand; the median of ``rounds`` batches after one untimed (nvJPEG's set-up)."""
    from vitlab.data.gpu_decode import collate_bytes

    dm = ImageNetDataModule(str(folder), batch_size=batch, num_workers=0, gpu_decode=True, auto_augment=None,
                            color_jitter=0)
    dm.setup("fit")
    n, dev = len(dm.train_set), torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rates = []
    for r in range(rounds + 1):
        jpegs = collate_bytes([dm.train_set[(r * batch + k) % n] for k in range(batch)])
        sync()
        start = time.perf_counter()
        dm.on_after_batch_transfer(dm.transfer_batch_to_device(jpegs, dev, 0), 0)
        sync()
        if r:
            rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


HANDOVER_STEPS = ("read", "into shared memory", "pickle + unpickle", "receiver reads")


def handover_costs(root: Path, fmt: str, images: int, batch: int = 32, ring: bool = True) -> dict[str, float]:
    """CPU microseconds per image of a ``data.gpu_decode`` batch's way from a loader worker to the
    training process, each step timed alone in this process (one torch thread) on ``images`` training
    items in a shuffled order: reading the bytes (the format's part), writing the batch into shared
    memory (``ring``: a slot of the ``ByteRing`` the training loader uses, else a new block as torch's
    collate makes: its pages faulted in), pickling and unpickling it as the worker's queue does (a
    new block: its file descriptor passed over a socket), the training process reading it as the
    decoder does (one byte a page: a new block's page faults again) and giving its slot back."""
    from multiprocessing import resource_sharer
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 -- registers the shared-memory reductions the queue uses
    from vitlab.data.gpu_decode import ByteRing, collate_bytes
    from vitlab.data.imagenet import RING_BYTES_PER_IMAGE

    if fmt == "litdata-block":
        fmt = "litdata"  # the same reads; the order does not change a warm read's CPU
    dm = ImageNetDataModule(str(root), batch_size=batch, num_workers=0, format=fmt, gpu_decode=True,
                            auto_augment=None, color_jitter=0)
    dm.setup("fit")
    warm(dataset_files(root, fmt))
    slots = ByteRing(1, slots=4, slot_bytes=batch * RING_BYTES_PER_IMAGE) if ring else None
    order = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(0)).tolist()[:images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spent = dict.fromkeys(HANDOVER_STEPS, 0.0)
    try:
        for start in range(0, len(order), batch):
            t0 = time.process_time()
            items = [dm.train_set[i] for i in order[start:start + batch]]
            t1 = time.process_time()
            collated = collate_bytes(items, shared=True, ring=slots, worker=0)
            t2 = time.process_time()
            arrived = pickle.loads(ForkingPickler.dumps(collated))
            t3 = time.process_time()
            arrived.images.bytes()[::4096].sum()
            arrived.images.release()
            t4 = time.process_time()
            for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                spent[key] += dt
            del collated, arrived
            if start // batch % 100 == 99:
                resource_sharer.stop()  # the shared blocks' descriptors, kept for a receiver that never asks
    finally:
        resource_sharer.stop()
        torch.set_num_threads(threads)
    return {key: 1e6 * value / len(order) for key, value in spent.items()}


def format_handover_table(costs: dict[tuple[str, str], dict[str, float]]) -> str:
    head = (f"{'format':<13} {'hand-over':<10} " + " ".join(f"{step:>{max(len(step), 6)}}" for step in HANDOVER_STEPS)
            + f" {'total':>7}  (CPU us per image)")
    lines = [head, "-" * len(head)]
    for (fmt, way), c in costs.items():
        lines.append(f"{fmt:<13} {way:<10} " + " ".join(f"{c[step]:>{max(len(step), 6)}.1f}" for step in HANDOVER_STEPS)
                     + f" {sum(c.values()):>7.1f}")
    return "\n".join(lines)


def format_loader_table(rows: list[LoaderRow]) -> str:
    head = f"{'pipeline':<28} {'images/s per core':>18} {'vs default':>11}"
    lines = [head, "-" * len(head)]
    base = rows[0]
    for row in rows:
        paired = ("-" if row is base or row.name.endswith("device part") else
                  f"{statistics.median(a / b for a, b in zip(row.rounds, base.rounds)):.2f}x")
        lines.append(f"{row.name:<28} {row.images_per_s:>18.1f} {paired:>11}")
    return "\n".join(lines)


# ---- the loader as training runs it: formats, page cache, workers --------------------------------
@dataclass
class FormatRow:
    format: str
    pipeline: str
    cache: str
    workers: int
    images: int
    wall_s: float
    cpu_s: float

    @property
    def per_wall_s(self) -> float:
        return self.images / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.images / max(self.cpu_s, 1e-3)  # rusage counts in ticks


def dataset_files(root: Path, fmt: str) -> list[Path]:
    """The files a format's training split reads (the JPEGs, or the chunk files)."""
    return sorted((root / "train").rglob("*.bin" if fmt.startswith("litdata") else "*.JPEG"))


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (``posix_fadvise(DONTNEED)``: no root needed; clean
    pages only, which is all a reader leaves)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its ended, joined children."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _running_children_cpu(leave_out: set[int] = frozenset()) -> float | None:
    """CPU seconds so far of this process's running multiprocessing children but ``leave_out`` (pids
    of those that are not the loader's workers), from /proc (getrusage counts a child only once it
    has ended); None where there is no /proc."""
    total = 0.0
    for child in multiprocessing.active_children():
        if child.pid in leave_out:
            continue
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def time_loader(root: Path | str, fmt: str, workers: int, images: int, batch: int, gpu_decode: bool,
                seed: int = 0, cache_dir: Path | None = None, read_threads: int = 0) -> tuple[float, float, int]:
    """(wall s, CPU s of this process + workers, images) for ``images`` training images of a shuffled
    epoch through the DataModule's own training loader (``litdata-block``: the packed format in
    ``data.shuffle=block``'s order; ``root`` may be an ``s3://`` pack, ``cache_dir`` its
    ``data.cache_dir``), in the steady state: timed after each worker's first batch (its start-up:
    forking, opening files, once per run with persistent workers) where the epoch has batches to
    spare. This process also reads each batch once (one byte a page, as the transfer to the device or
    ``gpu_decode``'s decoder reads it: the hand-over's cost on the receiving side)."""
    from vitlab.data.imagenet import ImageNetDataModule

    extra = dict(auto_augment=None, color_jitter=0) if gpu_decode else {}
    if fmt == "litdata-block":
        fmt, extra = "litdata", {**extra, "shuffle": "block"}
    dm = ImageNetDataModule(str(root), batch_size=batch, num_workers=workers, format=fmt, gpu_decode=gpu_decode,
                            seed=seed, cache_dir=str(cache_dir) if cache_dir else None, read_threads=read_threads,
                            **extra)
    dm.setup("fit")
    loader = dm.train_dataloader()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker (with workers=0 this process does their work)

    def take(it) -> int | None:
        try:
            got = next(it)
        except StopIteration:
            return None
        # this process reads each batch as the transfer to the device (or the decoder) would: a byte a page
        if gpu_decode:
            got.images.bytes()[::4096].sum()
            got.images.release()  # decoded: its slot goes back to the workers
        else:
            got.images.flatten()[::4096].sum()
        return len(got.targets)

    start_up = max(workers, 1)
    others = {child.pid for child in multiprocessing.active_children()}  # e.g. a local S3 server
    it = iter(loader)
    steady = len(loader) * batch > images + start_up * batch and _running_children_cpu(others) is not None
    for _ in range(start_up if steady else 0):
        take(it)
    cpu0, children0, t0 = _cpu_seconds(), _running_children_cpu(others) if steady else 0.0, time.perf_counter()
    seen = 0
    while seen < images and (n := take(it)) is not None:
        seen += n
    wall = time.perf_counter() - t0
    if steady:
        cpu = _cpu_seconds() - cpu0 + _running_children_cpu(others) - children0
    del it, loader  # the workers end and are joined here
    # a worker the loader had to terminate (one blocked in a download) is not joined by it: reaped here,
    # or its CPU time would be missing from the figure
    multiprocessing.active_children()
    if not steady:  # the workers' whole lives, start-up included (getrusage, once they have ended)
        cpu = _cpu_seconds() - cpu0
    torch.set_num_threads(threads)
    return wall, cpu, seen


def packed_copy(folder: Path) -> Path:
    """The generated ImageNet ``folder`` packed beside it (training split shuffled), made once."""
    from vitlab.data.imagenet import pack_imagenet

    packed = folder.parent / f"{folder.name}_litdata_shuffled"
    if not (packed / ".complete").exists():
        pack_imagenet(folder, packed, order="shuffled")
        (packed / ".complete").touch()
    return packed


# the images a pack of the real dataset's training split reads (COCO: all of train2017, also the
# 1,021 without annotations that training filters out)
TRAINING_FILES = {"imagenet": 1_281_167, "coco": 118_287, "ade20k": 20_210}


@dataclass
class PackRow:
    kind: str
    workers: int
    images: int
    wall_s: float
    cpu_s: float
    out_bytes: int
    start_wall_s: float  # the same command on a dataset of PACK_START_IMAGES: start-up and fixed costs
    start_cpu_s: float

    @property
    def wall_per_image(self) -> float:
        return (self.wall_s - self.start_wall_s) / (self.images - PACK_START_IMAGES)

    @property
    def cpu_per_image(self) -> float:
        return (self.cpu_s - self.start_cpu_s) / (self.images - PACK_START_IMAGES)

    @property
    def full_hours(self) -> float:
        """The dataset's real training split packed at this per-image rate (plus the start-up), in hours."""
        return (self.start_wall_s + TRAINING_FILES[self.kind] * self.wall_per_image) / 3600


PACK_START_IMAGES = 4


def _timed_pack(kind: str, folder: Path, out: Path, workers: int) -> tuple[float, float]:
    """(wall s, CPU s) of ``python -m vitlab.data.pack`` as a user runs it (a process of its own, its
    packing workers' CPU included), writing ``out`` anew."""
    import shutil
    import subprocess
    import sys

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "vitlab.data.pack", kind, "--root", str(folder), "--out", str(out),
               "--workers", str(workers)]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return wall, cpu


def pack_bench(kind: str, images: int, workers=(1, 2), data_dir: str | None = None,
               size: tuple[int, int] | None = None) -> list[PackRow]:
    """``python -m vitlab.data.pack <kind>`` timed as a user runs it, on a generated dataset of
    ``images`` training images at the dataset's typical size (made once; warm page cache), per
    ``--workers`` count; the same command on ``PACK_START_IMAGES`` images gives the start-up
    (interpreter, imports, LitData's workers), so the difference is the cost per image, and the real
    dataset's training split follows from it. A pack reads every file, writes the chunks, reads every
    item back and hashes every chunk (``vitlab.data.packing``): all of it is timed."""
    import shutil

    if images <= PACK_START_IMAGES:
        raise SystemExit(f"--pack needs --images > {PACK_START_IMAGES} (the start-up is timed on {PACK_START_IMAGES})")
    folder = generate(kind, bench_dir(data_dir), images, size)
    small = generate(kind, bench_dir(data_dir), PACK_START_IMAGES, size)
    warm([f for f in folder.rglob("*") if f.is_file()] + [f for f in small.rglob("*") if f.is_file()])
    out = folder.parent / f"{folder.name}_pack_timing"
    rows = []
    try:
        for n in workers:
            start_wall, start_cpu = _timed_pack(kind, small, out, n)
            wall, cpu = _timed_pack(kind, folder, out, n)
            written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            rows.append(PackRow(kind, n, images, wall, cpu, written, start_wall, start_cpu))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows


# (title, width, format, value) per column of the --pack table
PACK_COLUMNS = (("dataset", -9, "", lambda r: r.kind), ("workers", 7, "", lambda r: r.workers),
                ("images", 7, "", lambda r: r.images), ("wall s", 7, ".1f", lambda r: r.wall_s),
                ("CPU s", 7, ".1f", lambda r: r.cpu_s), ("start-up s", 10, ".1f", lambda r: r.start_wall_s),
                ("ms/image", 8, ".2f", lambda r: 1e3 * r.wall_per_image),
                ("CPU ms/image", 12, ".2f", lambda r: 1e3 * r.cpu_per_image),
                ("MB written", 10, ".2f", lambda r: r.out_bytes / 1e6),
                ("real training split h", 21, ".2f", lambda r: r.full_hours))


def format_pack_table(rows: list[PackRow]) -> str:
    def cell(value, width, fmt=""):
        return f"{value:{'<' if width < 0 else '>'}{abs(width)}{fmt}}"

    head = " ".join(cell(title, width) for title, width, _, _ in PACK_COLUMNS)
    body = [" ".join(cell(value(r), width, fmt) for _, width, fmt, value in PACK_COLUMNS) for r in rows]
    return "\n".join([head, "-" * len(head), *body])


def bucket_copy(packed: Path, url: str) -> str:
    """The packed copy uploaded to ``url`` (an ``s3://`` prefix), unless the objects there already have
    its files' names and sizes."""
    from vitlab.data.remote import S3Pack

    bucket = S3Pack(url, option="--bucket")
    listed = bucket.listing()
    files = {str(p.relative_to(packed)): p for p in sorted(packed.rglob("*")) if p.is_file() and p.name != ".complete"}
    if any(listed.get(name, [None])[0] != path.stat().st_size for name, path in files.items()):
        for name, path in files.items():
            bucket.client.upload_file(str(path), bucket.bucket, bucket.key(name))
    return bucket.url


def format_bench(dataset_images: int = 20_000, images: int = 1_000, formats=("folder", "litdata"),
                 workers=(1, 2), caches=("cold", "warm"), batch: int = 32, gpu_decode: bool = False,
                 data_dir: str | None = None, size: tuple[int, int] | None = None,
                 bucket: str | None = None, read_threads=(0,)) -> list[FormatRow]:
    """Every (format, cache, workers) on one generated ImageNet of ``dataset_images`` (made and
    packed once under the bench directory, the training split shuffled: read in the uniform order
    as ``litdata``, in the block order as ``litdata-block``): the DeiT training pipeline in the
    workers, and with ``gpu_decode`` also the workers' part of ``data.gpu_decode`` (reading bytes:
    the device work is not timed here). ``bucket``: the packed formats read the copy uploaded to that
    ``s3://`` prefix (``data.root=s3://...``); cold: an empty local chunk cache, warm: the chunks the
    previous run left in it (the block order's; the uniform order caches none). ``read_threads``: the
    ``data.read_threads`` values timed for ``folder`` and ``litdata`` read from disk (rows ``... tN``)."""
    folder = generate("imagenet", bench_dir(data_dir), dataset_images, size)
    packed = packed_copy(folder)
    remote = bucket_copy(packed, bucket) if bucket else None
    roots = {"folder": folder, "litdata": remote or packed, "litdata-block": remote or packed}
    cache_dir = bench_dir(data_dir) / "bucket_cache"
    rows = []
    for pipeline in ("deit", "gpu_decode") if gpu_decode else ("deit",):
        for cache in caches:
            for fmt in formats:
                from_bucket = remote is not None and fmt != "folder"
                files = [] if from_bucket else dataset_files(roots[fmt], fmt)
                threaded = read_threads if fmt in ("folder", "litdata") and not from_bucket else (0,)
                for n, threads in itertools.product(workers, threaded):
                    if from_bucket and cache == "cold":
                        shutil.rmtree(cache_dir, ignore_errors=True)
                    evict(files) if cache == "cold" else warm(files)
                    wall, cpu, seen = time_loader(roots[fmt], fmt, n, images, min(batch, images),
                                                  pipeline == "gpu_decode", cache_dir=cache_dir, read_threads=threads)
                    name = f"{fmt} s3" if from_bucket else f"{fmt} t{threads}" if threads else fmt
                    rows.append(FormatRow(name, pipeline, cache, n, seen, wall, cpu))
    return rows


def format_rows_table(rows: list[FormatRow]) -> str:
    head = (f"{'pipeline':<11} {'cache':<5} {'format':<16} {'workers':>7} {'images':>7} {'img/wall-s':>11} "
            f"{'img/CPU-s':>10} {'vs folder (CPU)':>16}")
    lines = [head, "-" * len(head)]
    base = {(r.pipeline, r.cache, r.workers): r for r in rows if r.format == "folder"}
    for r in rows:
        ref = base.get((r.pipeline, r.cache, r.workers))
        ratio = "-" if ref is None or ref is r else f"{r.per_cpu_s / ref.per_cpu_s:.2f}x"
        lines.append(f"{r.pipeline:<11} {r.cache:<5} {r.format:<16} {r.workers:>7} {r.images:>7} "
                     f"{r.per_wall_s:>11.1f} {r.per_cpu_s:>10.1f} {ratio:>16}")
    return "\n".join(lines)


def workers_needed(rows: list[FormatRow], model_ips: float) -> list[tuple[str, str, str, int, float, int]]:
    """(pipeline, format, cache, workers timed, loader images per CPU-second, loader workers needed) per
    pipeline, format and cache: a training run that takes ``model_ips`` images/s needs
    ``ceil(model_ips / images per CPU-second)`` loader workers, each one core busy (the figure of the
    most workers timed, whose CPU includes the main process's share of the loading)."""
    best = {}
    for r in rows:
        key = (r.pipeline, r.format, r.cache)
        if r.workers >= 1 and (key not in best or r.workers > best[key].workers):
            best[key] = r
    return [(*key, r.workers, r.per_cpu_s, math.ceil(model_ips / r.per_cpu_s)) for key, r in best.items()]


def format_workers_table(needed: list[tuple], model_ips: float) -> str:
    head = f"{'pipeline':<11} {'cache':<5} {'format':<16} {'timed at':>8} {'img/CPU-s':>10} {'workers for ' + format(model_ips, '.1f') + ' img/s':>24}"
    lines = [head, "-" * len(head)] + ([] if needed else ["(no run with loader workers timed: --workers 1 2)"])
    for pipeline, fmt, cache, timed, per_cpu, n in needed:
        lines.append(f"{pipeline:<11} {cache:<5} {fmt:<16} {timed:>8} {per_cpu:>10.1f} {n:>24}")
    return "\n".join(lines)
