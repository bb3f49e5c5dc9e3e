"""The paper-style table of a sweep: one row per setting, with params, GFLOPs and metrics.

    python -m vitlab.compare multirun/2026-11-22_10-00-00            # a sweep directory
    python -m vitlab.compare outputs/imagenet_cls/run_a outputs/imagenet_cls/run_b
    python -m vitlab.compare --wandb my-entity/vitlab --group pale_size-2026-11-22_10-00-00

Prints the table and writes ``compare.csv`` and ``compare.png`` (the metric per
setting, and the metric against GFLOPs) to ``--out`` (default: the first
directory given, or the current one for W&B).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

SKIP_OVERRIDE_PREFIXES = ("hydra.", "hydra/", "+sweep=", "debug=", "data.", "trainer.", "logger", "callbacks")


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Every directory holding a summary.json: the paths themselves, or runs inside sweep dirs."""
    runs = []
    for path in map(Path, paths):
        if (path / "summary.json").is_file():
            runs.append(path)
        else:
            found = sorted({p.parent for p in path.rglob("summary.json")}, key=lambda p: (len(p.parts), str(p)))
            if not found:
                raise FileNotFoundError(f"{path}: no summary.json in it or below it (is it a run or sweep directory?)")
            runs.extend(found)
    return runs


def load_local_runs(paths: list[str | Path]) -> list[dict]:
    runs = []
    for run_dir in find_run_dirs(paths):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["run_dir"] = str(run_dir)
        if (run_dir / ".hydra" / "config.yaml").is_file():  # the composed config: backbone fields, monitor
            summary["run_config"] = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        runs.append(summary)
    return runs


def load_wandb_runs(project: str, group: str | None = None) -> list[dict]:
    """Runs of a W&B project (``entity/project``), optionally one sweep group; needs network."""
    import wandb

    filters = {"group": group} if group else {}
    runs = []
    for run in wandb.Api().runs(project, filters=filters):
        summary = {k: v for k, v in run.summary.items() if not k.startswith("_")}
        summary.setdefault("overrides", run.config.get("overrides", []))
        summary["run_dir"] = run.url
        summary["run_config"] = run.config.get("config", {})
        summary["wandb_id"] = run.id
        runs.append(summary)
    return runs


def setting_label(run: dict, varying: list[str]) -> str:
    overrides = [o for o in run.get("overrides", []) if o.split("=")[0] in varying]
    return " ".join(overrides) or run.get("backbone") or Path(run["run_dir"]).name


def override_dict(run: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o)


def varied_fields(runs: list[dict]) -> list[str]:
    """The override keys whose values differ between runs (all of them when none differ)."""
    keyed = [override_dict(r) for r in runs]
    all_keys = sorted({k for d in keyed for k in d if not k.startswith(SKIP_OVERRIDE_PREFIXES)})
    return [k for k in all_keys if len({d.get(k) for d in keyed}) > 1] or all_keys


def comparison_rows(runs: list[dict]) -> list[dict]:
    """One row per run: the overrides that differ between runs name the setting."""
    varying = varied_fields(runs)
    metric_keys = sorted({k for r in runs for k in r if k.startswith("val/")})
    rows = []
    for run in runs:
        row = {"setting": setting_label(run, varying), "backbone": run.get("backbone"),
               "params_m": round(run["params"] / 1e6, 2) if run.get("params") else None,
               "gflops": run.get("gflops")}
        row.update({k: run.get(k) for k in metric_keys})
        row["run_dir"] = run["run_dir"]
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["setting"] for r in rows]
    values = [r.get(metric) or 0.0 for r in rows]
    ax1.bar(range(len(rows)), values, color="tab:blue")
    ax1.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} per setting")
    for r, v in zip(rows, values):
        if r.get("gflops") is not None:
            ax2.scatter(r["gflops"], v, color="tab:orange")
            ax2.annotate(r["setting"], (r["gflops"], v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("GFLOPs")
    ax2.set_ylabel(metric)
    ax2.set_title(f"{metric} vs GFLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vitlab compare")
    columns = [c for c in rows[0] if c != "run_dir"]
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*("" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns))
    Console(width=200).print(table)


def per_class_rows(runs: list[dict], rows: list[dict]) -> list[dict]:
    """One row per class, one column per setting (the mean over its runs, e.g. seeds): the per-class
    result runs keep in summary.json's ``extra`` (``per_class_top1``, ``per_class_ap``, ``per_class_iou``).
    ``rows``: one per run, in the same order, with its ``setting``."""
    extras = [run.get("extra") or {} for run in runs]
    key = next((k for extra in extras for k in extra if k.startswith("per_class_")), None)
    if key is None:
        return []
    by_setting: dict[str, list[dict]] = {}
    for extra, row in zip(extras, rows):
        by_setting.setdefault(row["setting"], []).append(extra.get(key, {}))

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 2) if values else None

    classes = dict.fromkeys(c for extra in extras for c in extra.get(key, {}))
    return [{key: c, **{s: mean([t.get(c) for t in tables]) for s, tables in by_setting.items()}} for c in classes]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run or sweep directories")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead (needs network)")
    parser.add_argument("--group", help="with --wandb: one sweep group")
    parser.add_argument("--metric", default=None, help="metric to plot (default: the first val/ metric)")
    parser.add_argument("--out", help="folder for compare.csv and compare.png")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run/sweep directories or --wandb ENTITY/PROJECT")
    runs = load_wandb_runs(args.wandb, args.group) if args.wandb else load_local_runs(args.paths)
    if not runs:
        parser.error("no runs found")
    rows = comparison_rows(runs)
    metric = args.metric or next((k for k in rows[0] if k.startswith("val/") and "loss" not in k), None)
    out = Path(args.out or (args.paths[0] if args.paths else "."))
    out.mkdir(parents=True, exist_ok=True)
    print_table(rows)
    write_csv(rows, out / "compare.csv")
    if metric:
        plot(rows, metric, out / "compare.png")
    per_class = per_class_rows(runs, rows)
    if per_class:
        write_csv(per_class, out / "compare_per_class.csv")
    print(f"wrote {out / 'compare.csv'}" + (f" and {out / 'compare.png'} ({metric})" if metric else ""))
    return rows


if __name__ == "__main__":
    main()
