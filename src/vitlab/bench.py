"""Throughput and peak memory of backbones built as classifiers, optionally against timm.

    python -m vitlab.bench pvt_v2_b0 pvt_v2_b2 --batch 8 --input 224 224 --compare-timm
    python -m vitlab.bench pvt_v2_b2 --device cuda --batch 64 --steps 20 --compare-timm

Each model is ``vitlab.create_model(name)`` (1000 classes); with ``--compare-timm``
timm's model of the same name (where timm has one, e.g. ``pvt_v2_*``) is built
with the same drop-path rate and measured in the same run, interleaved with ours
round by round so that both see the same machine load; the table gives the ratio.

* train: forward + cross-entropy + backward (no optimizer step), ``model.train()``;
* infer: forward under ``torch.inference_mode()``, ``model.eval()``;
* images/s: batch x steps / wall time after ``--warmup`` steps; the median over
  ``--rounds`` rounds; the ours/timm ratio is the median of the per-round ratios
  (paired, so that a load change on a shared machine hits both);
* peak memory: CUDA -- ``torch.cuda.max_memory_allocated`` during the phase minus
  what was allocated before it (activations, gradients, workspace; weights excluded);
  CPU -- the peak resident set size (RSS, /proc/self/statm sampled every 2 ms by a
  thread) during the phase minus the RSS before it: a coarse figure that includes
  the allocator's caching.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import vitlab
from vitlab.api import backbone_config


@dataclass
class Result:
    name: str
    params_m: float
    train_ips: float = float("nan")
    infer_ips: float = float("nan")
    train_mem_mb: float = float("nan")
    infer_mem_mb: float = float("nan")
    train_ratio: float = float("nan")  # ours / timm images/s: median of the per-round ratios
    infer_ratio: float = float("nan")
    rounds: dict = field(default_factory=lambda: {"train": [], "infer": []})


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


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _infer_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.inference_mode():
        model(x)


def _measure(model: nn.Module, phase: str, x, y, steps: int, warmup: int, device: torch.device):
    """(images/s, peak memory MB) of ``steps`` steps of ``phase`` after ``warmup`` steps."""
    step = _train_step if phase == "train" else _infer_step
    model.train(phase == "train")
    for _ in range(warmup):
        step(model, x, y)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(model, x, y)
        _sync(device)
        elapsed = time.perf_counter() - start
        mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        with _PeakRSS() as rss:
            start = time.perf_counter()
            for _ in range(steps):
                step(model, x, y)
            elapsed = time.perf_counter() - start
        mem = rss.delta_mb
    return x.shape[0] * steps / elapsed, mem


def _timm_twin(name: str, device: torch.device) -> nn.Module | None:
    import timm

    if not timm.is_model(name):
        return None
    cfg = backbone_config(name)
    kwargs = {k: cfg[k] for k in ("drop_path_rate",) if k in cfg}  # identical regularisation cost
    return timm.create_model(name, pretrained=False, **kwargs).to(device)


def bench(names, batch=8, input_size=(224, 224), compare_timm=False, device="cpu", steps=5, warmup=2, rounds=5):
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *input_size, generator=gen).to(device)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    table = []
    for name in names:
        models = [(name, vitlab.create_model(name).to(device))]
        if compare_timm:
            twin = _timm_twin(name, device)
            if twin is not None:
                models.append((f"timm:{name}", twin))
        results = [Result(n, sum(p.numel() for p in m.parameters()) / 1e6) for n, m in models]
        for phase in ("infer", "train"):
            mems = [[] for _ in models]
            for _ in range(rounds):  # interleaved: ours, timm, ours, timm, ...
                for i, (_, model) in enumerate(models):
                    ips, mem = _measure(model, phase, x, y, steps, warmup, device)
                    results[i].rounds[phase].append(ips)
                    mems[i].append(mem)
            for r, m in zip(results, mems):
                setattr(r, f"{phase}_ips", statistics.median(r.rounds[phase]))
                setattr(r, f"{phase}_mem_mb", max(m))
            if len(results) == 2:  # paired per round: both saw (nearly) the same machine load
                ratios = [a / b for a, b in zip(results[0].rounds[phase], results[1].rounds[phase])]
                setattr(results[0], f"{phase}_ratio", statistics.median(ratios))
        table.append(results)
        del models
    return table


def format_table(table, device: str) -> str:
    mem = "peak alloc MB" if device.startswith("cuda") else "peak RSS delta MB"
    head = f"{'model':<24} {'params M':>9} {'train img/s':>12} {'infer img/s':>12} {'train ' + mem:>24} {'infer ' + mem:>24}"
    lines = [head, "-" * len(head)]
    for results in table:
        for r in results:
            lines.append(f"{r.name:<24} {r.params_m:>9.2f} {r.train_ips:>12.2f} {r.infer_ips:>12.2f} "
                         f"{r.train_mem_mb:>24.1f} {r.infer_mem_mb:>24.1f}")
        if len(results) == 2:
            ours, ref = results
            lines.append(f"{'  ours / timm':<24} {'':>9} {ours.train_ratio:>11.2f}x "
                         f"{ours.infer_ratio:>11.2f}x {ours.train_mem_mb / max(ref.train_mem_mb, 1e-9):>23.2f}x "
                         f"{ours.infer_mem_mb / max(ref.infer_mem_mb, 1e-9):>23.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.bench", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", default=["pvt_v2_b0"], help="backbone config names (conf/backbone)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--input", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--compare-timm", action="store_true", help="also time timm's model of the same name")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per model and phase; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = bench(args.names, args.batch, tuple(args.input), args.compare_timm, args.device, args.steps,
                  args.warmup, args.rounds)
    print(f"device={args.device} batch={args.batch} input={args.input[0]}x{args.input[1]} steps={args.steps} "
          f"rounds={args.rounds} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(format_table(table, args.device))


if __name__ == "__main__":
    main()
