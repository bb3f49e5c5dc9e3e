"""The interleaved rounds: every candidate of a name timed round by round, and the paired ratios."""
from __future__ import annotations

import statistics

import torch

from vitlab.tools.bench.measure import CLOCKS, PHASES, PRECISIONS, Result, _measure
from vitlab.tools.bench.workloads import make_workload
from vitlab.tools.bench.models import candidates


def bench(names, batch=8, input_size=None, compare_timm=False, device="cpu", steps=5, warmup=2, rounds=5,
          precision="32", references=None, task=None, compile_backend=None, grad_checkpointing=False,
          phases=PHASES, overrides=(), clock="wall", count_flops=True):
    """One list of ``Result`` per name: ours first, then what it is compared with."""
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    workload = make_workload(task, batch, tuple(input_size) if input_size else None, device)
    references = list(references or [None] * len(names))
    table = []
    for name, reference in zip(names, references):
        models = candidates(name, workload, device, compare_timm, reference, compile_backend, grad_checkpointing,
                            overrides, count_flops)
        for phase in phases:
            for _ in range(rounds):  # interleaved: ours, the others, ours, ...
                for result, model in models:
                    ips, mem, warm = _measure(model, phase, workload, steps, warmup, device, dtype, CLOCKS[clock])
                    result.warmup_s.setdefault(phase, warm)
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
