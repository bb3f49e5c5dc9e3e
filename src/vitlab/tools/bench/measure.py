"""Timing one model: a step, images/s and peak memory of a phase, the machine's matmul rate."""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from vitlab.tools.bench.workloads import Workload


PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


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
    warmup_s: dict = field(default_factory=dict)  # phase -> seconds of the first round's warm-up (compilation)
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
    """(images/s, peak memory MB, warm-up seconds) of ``steps`` steps of ``phase`` after ``warmup`` steps,
    timed by ``clock`` (the warm-up by the wall clock: it holds a compiled model's compilation)."""
    model.train(phase == "train")
    warm_start = time.perf_counter()
    for _ in range(warmup):
        _step(model, workload, phase, device, dtype)
    _sync(device)
    warm = time.perf_counter() - warm_start
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
    return workload.batch * steps / elapsed, mem, warm


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
