"""``python -m vitlab.tools.bench``: throughput, achieved FLOP rate and peak memory of what users run,
against the references (the command's help is ``cli``'s docstring). One module per job:

* ``measure``: one model's training / inference step, images/s, peak memory; the machine's matmul rate;
* ``workloads``: what a step feeds: classification batches, the dense tasks at the papers' sizes;
* ``models``: the candidates (ours, timm's twin, the authors' code, compiled, checkpointed) and their FLOPs;
* ``run``: the interleaved rounds and the paired ratios;
* ``tables``: the printed table;
* ``suite``: ``--suite gpu``, the prepared GPU check;
* ``cli``: the command line (``--loader`` times the data pipeline with ``vitlab.data.throughput``).
"""
from __future__ import annotations

from vitlab.tools.bench.measure import Result, matmul_peak, PRECISIONS, PHASES, CLOCKS
from vitlab.tools.bench.workloads import TASKS, Workload, make_workload
from vitlab.tools.bench.models import load_reference, build_reference, forward_gflops, candidates
from vitlab.tools.bench.run import bench, round_ratios, paired_ratio
from vitlab.tools.bench.tables import format_table, ratio_lines
from vitlab.tools.bench.cli import main

# the package's API (vitlab.tools.plan and the tests call ``bench.bench`` / ``bench.main`` ...)
__all__ = ["Result", "matmul_peak", "PRECISIONS", "PHASES", "CLOCKS", "TASKS", "Workload", "make_workload",
           "load_reference", "build_reference", "forward_gflops", "candidates", "bench", "round_ratios",
           "paired_ratio", "format_table", "ratio_lines", "main"]
