"""Throughput, achieved FLOP rate and peak memory of what users run, against the references.

    python -m vitlab.tools.bench pvt_v2_b0 pvt_v2_b2 --batch 8 --input 224 224 --compare-timm
    python -m vitlab.tools.bench pvt_v2_b2 --precision bf16-mixed --reference ../PVT/classification/pvt_v2.py:pvt_v2_b2
    python -m vitlab.tools.bench pvt_v2_b2 --device cuda --batch 64 --precision bf16-mixed --compile
    python -m vitlab.tools.bench pvt_v2_b2 --task maskrcnn --batch 1 --steps 1 --grad-checkpointing
    python -m vitlab.tools.bench --loader imagenet --fast-decode

Models. Each name is ``vitlab.create_model(name)`` (1000 classes), or with ``--task`` the full
dense model of ``task=coco_retinanet|coco_maskrcnn|ade20k_fpn|ade20k_upernet`` on that
backbone (the task class's own ``build_model``; random boxes, masks and label maps at the
papers' input sizes 800x1333 / 512x512 unless ``--input``). Measured in the same run,
interleaved with ours round by round so that all see the same machine load:

* ``--compare-timm``: timm's model of the same name, where timm has one (e.g. ``pvt_v2_*``);
* ``--reference FILE.py:FUNCTION``: any model factory, e.g. the authors' code (given once per
  name, in order). The file is executed as a module; its timm ``@register_model`` decorators are
  made inert so that it cannot replace timm's own models of the same name. FUNCTION is called
  with ``drop_path_rate`` = ours where its signature takes it (the same regularisation cost,
  as for timm's twin);
* ``--compile``: ours under ``torch.compile`` (``--compile-backend``; compilation happens in the
  warm-up steps);
* ``--grad-checkpointing``: ours with ``backbone.grad_checkpointing`` (activation checkpointing).

Every extra row gets a ratio line: ``ours / timm`` and ``ours / ref`` (>1: ours is faster),
``compiled / ours`` and ``checkpointed / ours`` (the gain, and the memory it saves).

* train: forward + loss under ``--precision`` autocast, backward (no optimizer step);
* infer: forward under ``torch.inference_mode()`` (and autocast), ``model.eval()``;
* images/s: batch x steps / time after ``--warmup`` steps (``--clock wall``, or ``cpu``: this
  process's CPU time, steadier on a shared machine); the median over ``--rounds`` rounds; a ratio
  is the median of the per-round ratios (paired: a load change on a shared machine hits both),
  followed by their quartiles (how far the pairs moved);
* GFLOP/s: images/s x the model's forward FLOPs per image (2 x the multiply-adds that
  ``vitlab.runtime.flops.count_gmacs`` counts), x 3 for a training step (backward ~ 2 x forward; dense
  heads counted at their evaluation-mode cost, so an approximation there); ``%peak``: that rate
  over the machine's matmul rate in the same dtype (a large square matmul, the best of runs before
  and after the models'): how close to the machine's limit the model runs;
* peak memory: CUDA -- ``torch.cuda.max_memory_allocated`` during the phase minus what was
  allocated before it (activations, gradients, workspace; weights excluded); CPU -- the peak
  resident set size (RSS, /proc/self/statm sampled every 2 ms by a thread) during the phase
  minus the RSS before it: a coarse figure that includes the allocator's caching.

``--precision 16-mixed`` needs a CUDA device: torch has no fast fp16 matmul on the CPU
(well under 1 GFLOP/s), so the CPU refuses it. No GradScaler runs (its cost is negligible).

``--loader imagenet|coco|ade20k`` times the training data pipeline instead (see
``vitlab.data.throughput``): decode + augmentation, images/s of one worker process.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import inspect
import os
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.api import backbone_config
from vitlab.backbones.base import Backbone
from vitlab.runtime.flops import count_gmacs

PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TASKS = {"retinanet": "coco_retinanet", "maskrcnn": "coco_maskrcnn", "fpn": "ade20k_fpn", "upernet": "ade20k_upernet"}
TRAIN_INPUT = {"coco": (800, 1333), "ade20k": (512, 512)}  # the papers' training sizes (COCO: the 1333x800 scale)
PHASES = ("infer", "train")
# cpu: this process's CPU time (all its threads), which other processes on a shared CPU machine do not
# inflate as they inflate wall time (the measured threads are the ones waiting for a core then)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Result:
    name: str
    params_m: float
    kind: str = "ours"  # ours | timm | ref | compiled | checkpointed
    gflops_per_image: float = float("nan")  # forward FLOPs (2 x MACs), in G
    train_ips: float = float("nan")
    infer_ips: float = float("nan")
    train_mem_mb: float = float("nan")
    infer_mem_mb: float = float("nan")
    rounds: dict = field(default_factory=lambda: {"train": [], "infer": []})
    mems: dict = field(default_factory=lambda: {"train": [], "infer": []})

    def gflops_rate(self, phase: str) -> float:
        """Achieved GFLOP/s in ``phase`` (a training step counts 3 forward passes)."""
        return getattr(self, f"{phase}_ips") * self.gflops_per_image * (3 if phase == "train" else 1)


class _PeakRSS:
    """Peak resident set size of this process while the block runs, minus the size before it.

    glibc keeps freed memory mapped; ``malloc_trim`` hands it back first so that the
    delta counts what the phase needs rather than what an earlier one left behind.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: the delta may then be understated
            pass
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.delta_mb = (self.peak - self.start) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- workloads
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
    dataset = full.split("_")[0]
    size = size or TRAIN_INPUT[dataset]
    if dataset == "coco":
        return detection_workload(batch, size, device, masks=task == "maskrcnn", task=full)
    return segmentation_workload(batch, size, device, task=full)


# --------------------------------------------------------------------------- models
def build_ours(name: str, workload: Workload, device: torch.device, overrides=()) -> nn.Module:
    """``overrides``: relative to the backbone config, and with a task ``module.*`` ones (the zoo's rows' convention)."""
    if workload.task is None:
        return vitlab.create_model(name, overrides=list(overrides)).to(device)
    from vitlab.tools.zoo import build_task_model

    return build_task_model(name, list(overrides), workload.task).to(device)


def _timm_twin(name: str, device: torch.device) -> nn.Module | None:
    import timm

    if not timm.is_model(name):
        return None
    cfg = backbone_config(name)
    kwargs = {k: cfg[k] for k in ("drop_path_rate",) if k in cfg}  # identical regularisation cost
    return timm.create_model(name, pretrained=False, **kwargs).to(device)


@contextlib.contextmanager
def _inert_timm_registry():
    """Authors' model files decorate their factories with timm's ``@register_model``, which
    would replace timm's own models of the same name (``pvt_v2_b0``, ...) in this process."""
    import timm.models
    import timm.models._registry as registry

    holders = [m for m in (timm.models, registry, sys.modules.get("timm.models.registry")) if m is not None]
    saved = [m.register_model for m in holders]
    for m in holders:
        m.register_model = lambda fn: fn
    try:
        yield
    finally:
        for m, fn in zip(holders, saved):
            m.register_model = fn


def load_reference(spec: str) -> Callable[..., nn.Module]:
    """``path/to/file.py:function`` -> the function (the file executed as a module of its own)."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func:
        raise SystemExit(f"--reference {spec!r}: expected FILE.py:FUNCTION, e.g. PVT/classification/pvt_v2.py:pvt_v2_b2")
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"--reference {spec!r}: {file} is not a file")
    spec_ = importlib.util.spec_from_file_location(f"vitlab_bench_reference_{file.stem}", file)
    module = importlib.util.module_from_spec(spec_)
    folder = str(file.parent.resolve())
    sys.path.insert(0, folder)  # the file's own sibling imports
    try:
        with _inert_timm_registry(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # authors' files import timm's deprecated paths
            spec_.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    fn = getattr(module, func, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise SystemExit(f"--reference {spec!r}: {file} has no function {func!r}; it defines: {', '.join(names)}")
    return fn


def build_reference(spec: str, name: str, device: torch.device) -> nn.Module:
    fn = load_reference(spec)
    params = inspect.signature(fn).parameters
    takes = "drop_path_rate" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    cfg = backbone_config(name)
    kwargs = {"drop_path_rate": cfg.drop_path_rate} if takes and "drop_path_rate" in cfg else {}
    return fn(**kwargs).to(device)


def with_grad_checkpointing(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose backbone(s) recompute activations in the backward pass."""
    model = copy.deepcopy(model)
    found = [m for m in model.modules() if isinstance(m, Backbone)]
    if not found:
        raise SystemExit("--grad-checkpointing: the model has no vitlab backbone")
    for m in found:
        m.set_grad_checkpointing(True)
    return model


def forward_gflops(model: nn.Module, workload: Workload) -> float:
    """Forward GFLOPs per image (2 x MACs), counted on a meta-device copy where the model allows it
    (no compute), else on a CPU copy with one image (detectors' post-processing is data-dependent).
    The copy's parameters need no gradient: torch's module tracker (inside the FLOP counter) fails on
    views of such parameters made under no_grad (e.g. the official GPViT's expanded group tokens)."""
    try:
        return 2 * count_gmacs(copy.deepcopy(model).to("meta").requires_grad_(False), workload.input_size)
    except Exception:  # noqa: BLE001 -- whatever fails on meta is counted for real
        pass
    try:
        return 2 * count_gmacs(copy.deepcopy(model).cpu().requires_grad_(False), workload.input_size)
    except Exception as err:  # noqa: BLE001 -- a model the counter cannot run: no FLOP columns
        print(f"(FLOPs not counted for {type(model).__name__}: {type(err).__name__}: {err})", file=sys.stderr)
        return float("nan")


# --------------------------------------------------------------------------- timing
def _step(model: nn.Module, workload: Workload, phase: str, device: torch.device, dtype) -> None:
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    if phase == "train":
        with autocast:
            loss = workload.loss(model)
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode(), autocast:
            workload.forward(model)


def _measure(model, phase, workload, steps, warmup, device, dtype, clock=time.perf_counter):
    """(images/s, peak memory MB) of ``steps`` steps of ``phase`` after ``warmup`` steps, timed by ``clock``."""
    model.train(phase == "train")
    for _ in range(warmup):
        _step(model, workload, phase, device, dtype)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        for _ in range(steps):
            _step(model, workload, phase, device, dtype)
        _sync(device)
        elapsed = time.perf_counter() - start
        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with _PeakRSS() as rss:
            start = clock()
            for _ in range(steps):
                _step(model, workload, phase, device, dtype)
            elapsed = clock() - start
        mem = rss.delta_mb
    return workload.batch * steps / elapsed, mem


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """GFLOP/s of a large square matmul in ``dtype`` (the best of ``repeats``): the machine's limit."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = clock()
        a @ b
        _sync(device)
        best = max(best, 2 * size**3 / (clock() - start) / 1e9)
    return best


def candidates(name: str, workload: Workload, device: torch.device, compare_timm: bool, reference: str | None,
               compile_backend: str | None, grad_checkpointing: bool, overrides=()) -> list[tuple[Result, nn.Module]]:
    ours = build_ours(name, workload, device, overrides)
    models = [(Result(name, 0.0, "ours"), ours)]
    if compare_timm and workload.task is None:
        twin = _timm_twin(name, device)
        if twin is not None:
            models.append((Result(f"timm:{name}", 0.0, "timm"), twin))
    if reference:
        models.append((Result(f"ref:{reference.rpartition(':')[2]}", 0.0, "ref"), build_reference(reference, name, device)))
    if compile_backend:
        models.append((Result(f"{name} compiled", 0.0, "compiled"), torch.compile(ours, backend=compile_backend)))
    if grad_checkpointing:
        models.append((Result(f"{name} checkpointed", 0.0, "checkpointed"), with_grad_checkpointing(ours)))
    for result, model in models:
        result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        # compiled / checkpointed: the same network as ours, the same FLOPs
        result.gflops_per_image = (forward_gflops(model, workload) if result.kind in ("ours", "timm", "ref")
                                   else models[0][0].gflops_per_image)
    return models


def bench(names, batch=8, input_size=None, compare_timm=False, device="cpu", steps=5, warmup=2, rounds=5,
          precision="32", references=None, task=None, compile_backend=None, grad_checkpointing=False,
          phases=PHASES, overrides=(), clock="wall"):
    """One list of ``Result`` per name: ours first, then what it is compared with."""
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    workload = make_workload(task, batch, tuple(input_size) if input_size else None, device)
    references = list(references or [None] * len(names))
    table = []
    for name, reference in zip(names, references):
        models = candidates(name, workload, device, compare_timm, reference, compile_backend, grad_checkpointing,
                            overrides)
        for phase in phases:
            for _ in range(rounds):  # interleaved: ours, the others, ours, ...
                for result, model in models:
                    ips, mem = _measure(model, phase, workload, steps, warmup, device, dtype, CLOCKS[clock])
                    result.rounds[phase].append(ips)
                    result.mems[phase].append(mem)
            for result, _ in models:
                setattr(result, f"{phase}_ips", statistics.median(result.rounds[phase]))
                setattr(result, f"{phase}_mem_mb", max(result.mems[phase]))
        table.append([r for r, _ in models])
        del models
    return table


def round_ratios(a: Result, b: Result, phase: str) -> list[float]:
    """a's images/s over b's in each round (both measured in the same round)."""
    return [x / y for x, y in zip(a.rounds[phase], b.rounds[phase])]


def paired_ratio(a: Result, b: Result, phase: str) -> float:
    """The median of ``round_ratios``."""
    ratios = round_ratios(a, b, phase)
    return statistics.median(ratios) if ratios else float("nan")


def _quartiles(values: list[float]) -> str:
    """'q1-q3' of the per-round ratios: how much the paired measurement moved ('-' for < 4 rounds)."""
    if len(values) < 4:
        return "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.2f}-{q3:.2f}"


def ratio_lines(results: list[Result]) -> list[tuple[str, Result, Result]]:
    """(label, numerator, denominator) of every ratio line of one name's rows."""
    ours, lines = results[0], []
    for other in results[1:]:
        if other.kind in ("timm", "ref"):
            lines.append((f"  ours / {other.kind}", ours, other))
        else:
            lines.append((f"  {other.kind} / ours", other, ours))
    return lines


def format_table(table, device: str, peak: float | None = None) -> str:
    mem = "peak alloc MB" if device.startswith("cuda") else "peak RSS delta MB"
    head = (f"{'model':<28} {'params M':>9} {'fwd GFLOP':>9} {'train img/s':>12} {'infer img/s':>12} "
            f"{'train ' + mem:>24} {'infer ' + mem:>24} {'train GFLOP/s':>14} {'%peak':>6} "
            f"{'infer GFLOP/s':>14} {'%peak':>6}")
    lines = [head, "-" * len(head)]

    def pct(rate):
        return 100 * rate / peak if peak else float("nan")

    for results in table:
        for r in results:
            lines.append(
                f"{r.name:<28} {r.params_m:>9.2f} {r.gflops_per_image:>9.2f} {r.train_ips:>12.4g} {r.infer_ips:>12.4g} "
                f"{r.train_mem_mb:>24.1f} {r.infer_mem_mb:>24.1f} {r.gflops_rate('train'):>14.1f} "
                f"{pct(r.gflops_rate('train')):>6.1f} {r.gflops_rate('infer'):>14.1f} {pct(r.gflops_rate('infer')):>6.1f}")
        for label, a, b in ratio_lines(results):
            lines.append(
                f"{label:<28} {'':>9} {'':>9} {paired_ratio(a, b, 'train'):>11.2f}x {paired_ratio(a, b, 'infer'):>11.2f}x "
                f"{a.train_mem_mb / max(b.train_mem_mb, 1e-9):>23.2f}x {a.infer_mem_mb / max(b.infer_mem_mb, 1e-9):>23.2f}x"
                f"   rounds' quartiles: train {_quartiles(round_ratios(a, b, 'train'))}, "
                f"infer {_quartiles(round_ratios(a, b, 'infer'))}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.tools.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("names", nargs="*", default=["pvt_v2_b0"], help="backbone config names (conf/backbone)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default: 8; with --task 2, the papers' images per GPU)")
    p.add_argument("--input", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size (default: 224 224; with --task the paper's: 800 1333 / 512 512)")
    p.add_argument("--precision", default="32", choices=list(PRECISIONS), help="autocast on the device (as Lightning's)")
    p.add_argument("--compare-timm", action="store_true", help="also time timm's model of the same name")
    p.add_argument("--reference", action="append", default=None, metavar="FILE.py:FUNCTION",
                   help="also time this model factory (once per name, in order), e.g. the authors' code")
    p.add_argument("--task", choices=list(TASKS), default=None, help="time the full dense model of this task")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for ours, relative to the backbone config (e.g. depths=[1,1,1,1]), or with "
                        "--task of the task's module (module.head.norm=GN); the references are built as they are")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--grad-checkpointing", action="store_true", help="also time ours with activation checkpointing")
    p.add_argument("--phase", choices=[*PHASES, "both"], default="both", help="time training, inference or both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per model and phase; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or (CPU device) this process's CPU time: steadier on a shared machine, "
                        "images per CPU-second with --threads 1")
    p.add_argument("--loader", choices=["imagenet", "coco", "ade20k"], default=None,
                   help="time this dataset's training pipeline instead (vitlab.data.throughput)")
    p.add_argument("--images", type=int, default=64, help="--loader: images per round")
    p.add_argument("--fast-decode", action="store_true", help="--loader imagenet: also time data.fast_decode=true")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="--loader: the generated images' size (default: ImageNet 500 375, COCO 640 480, ADE20K 683 512)")
    p.add_argument("--data-dir", default=None, help="--loader: where the generated data is kept (default: "
                   "$VITLAB_DATA or ./data, under bench/)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loader:
        from vitlab.data.throughput import format_loader_table, loader_bench

        from vitlab.data.throughput import SIZES

        rows = loader_bench(args.loader, args.images, args.rounds, args.fast_decode, args.data_dir, args.image_size)
        width, height = args.image_size or SIZES[args.loader]
        print(f"loader={args.loader} images={width}x{height} per round={args.images} rounds={args.rounds} "
              f"threads={torch.get_num_threads()} (one worker process; images per CPU second)")
        print(format_loader_table(rows))
        return
    if args.reference and len(args.reference) != len(args.names):
        p.error(f"--reference given {len(args.reference)} times for {len(args.names)} names: give one per name, in order")
    if args.precision == "16-mixed" and args.device == "cpu":
        p.error("--precision 16-mixed on the CPU: torch has no fast fp16 matmul there (well under 1 GFLOP/s); "
                "use --precision bf16-mixed, or --device cuda")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; a CUDA step's time is the device's: use --clock wall")
    if args.task and args.compare_timm:
        p.error("--compare-timm times classifiers; it does not apply with --task")
    batch = args.batch or (2 if args.task else 8)
    if args.task == "upernet" and batch < 2 and not any(o.startswith("module.head.norm=") for o in args.override):
        p.error("--task upernet with --batch 1: the pyramid pooling's 1x1 map has one value per channel, which "
                "BatchNorm cannot normalise in training; use --batch >= 2, or --override module.head.norm=GN")
    dtype = PRECISIONS[args.precision] or torch.float32
    device, clock = torch.device(args.device), CLOCKS[args.clock]
    peak = matmul_peak(device, dtype, clock=clock)  # before and after the run: the best (a shared machine's load varies)
    phases = PHASES if args.phase == "both" else (args.phase,)
    table = bench(args.names, batch, args.input, args.compare_timm, args.device, args.steps, args.warmup, args.rounds,
                  args.precision, args.reference, args.task, args.compile_backend if args.compile else None,
                  args.grad_checkpointing, phases, args.override, args.clock)
    peak = max(peak, matmul_peak(device, dtype, clock=clock))
    size = args.input or (TRAIN_INPUT[TASKS[args.task].split("_")[0]] if args.task else (224, 224))
    print(f"device={args.device} task={args.task or 'classification'} batch={batch} input={size[0]}x{size[1]} "
          f"precision={args.precision} steps={args.steps} rounds={args.rounds} threads={torch.get_num_threads()} "
          f"clock={args.clock} "
          f"torch={torch.__version__} matmul peak={peak:.0f} GFLOP/s ({str(dtype).split('.')[-1]})")
    print(format_table(table, args.device, peak))


if __name__ == "__main__":
    main()
