"""The printed table: one row per model, one ratio line per comparison."""
from __future__ import annotations

import statistics

from vitlab.tools.bench.measure import Result
from vitlab.tools.bench.run import paired_ratio, round_ratios


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
