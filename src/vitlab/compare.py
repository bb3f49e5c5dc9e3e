"""The paper-style table of a sweep: one row per setting, seeds aggregated, deltas, the paper beside it.

    python -m vitlab.compare multirun/2026-11-22_10-00-00            # a sweep directory
    python -m vitlab.compare outputs/imagenet_cls/run_a outputs/imagenet_cls/run_b
    python -m vitlab.compare SWEEP --baseline backbone.pale_size=7 --paper pale:Table7
    python -m vitlab.compare --wandb my-entity/vitlab --group pale_size-2026-11-22_10-00-00

A *setting* is a combination of the overrides that differ between runs, ``seed`` excepted:
a sweep run with ``seed=0,1,2`` gives three runs per setting. Per setting the table has
the mean and sample standard deviation of every ``val/`` metric over its runs and ``n``.

``--baseline`` names one setting (its overrides, e.g. ``backbone.pale_size=7``, or its row
index); every row then gets ``delta`` = mean(metric) - mean(baseline metric), with
``delta_se``, its standard error. Runs are paired by seed when both settings ran the same
seeds (``paired`` pairs; the standard error is that of the per-seed differences, which
removes what the seed does to both); otherwise the settings are treated as independent
(``sqrt(s1²/n1 + s2²/n2)``). ``significant`` is ``|delta| > 2 x delta_se``: a screening
rule, not a test. With 3 seeds a paired t-test at 5% needs ``|delta| > 4.3 x delta_se``,
so ``p_value`` (paired or Welch t-test) is given too when scipy is installed.

``--paper <paper>:<table>`` (``vitlab.paper``) joins each setting with the paper's row:
its result (``paper``), ``vs_paper`` = mean - paper, and Kendall's tau between our means
and the paper's over the matched rows (1: the paper's ordering of rows is preserved).
Params and GFLOPs of the paper rows come from the zoo (``vitlab.zoo.measure``).

Writes ``compare.csv`` (per setting), ``compare_runs.csv`` (per run), ``compare.json``
(table, metric, baseline, tau) and ``compare.png`` (the metric per setting with ±std error
bars and the paper's values; the metric against GFLOPs) to ``--out`` (default: the first
directory given, or the current one for W&B).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

SKIP_OVERRIDE_PREFIXES = ("hydra.", "hydra/", "+sweep=", "debug=", "data.", "trainer.", "logger", "callbacks")
# Overrides that repeat a setting rather than define one.
REPEAT_KEYS = ("seed",)


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


def _stored_config(run_dir: Path) -> dict:
    """Seed and resolved backbone config from the run's ``.hydra/config.yaml`` (when there)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.load(path)
    stored = {"seed": cfg.get("seed")}
    try:
        stored["backbone_config"] = OmegaConf.to_container(cfg.backbone, resolve=True)
    except Exception:  # an interpolation into Hydra's runtime: vitlab.paper composes it instead
        pass
    return stored


def load_local_runs(paths: list[str | Path]) -> list[dict]:
    runs = []
    for run_dir in find_run_dirs(paths):
        summary = json.loads((run_dir / "summary.json").read_text())
        summary = {**_stored_config(run_dir), **summary, "run_dir": str(run_dir)}
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
        stored = run.config.get("config") or {}
        summary.setdefault("seed", stored.get("seed"))
        summary.setdefault("backbone_config", stored.get("backbone"))
        summary["run_dir"] = run.url
        runs.append(summary)
    return runs


def _override_dict(run: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o)


def run_seed(run: dict):
    """The seed a run used: its ``seed=`` override, else the stored config's, else None."""
    seed = _override_dict(run).get("seed", run.get("seed"))
    return None if seed is None else str(seed)


def setting_label(run: dict, varying: list[str]) -> str:
    overrides = [o for o in run.get("overrides", []) if o.split("=")[0] in varying]
    return " ".join(overrides) or run.get("backbone") or Path(run["run_dir"]).name


def comparison_rows(runs: list[dict]) -> list[dict]:
    """One row per run: the overrides that differ between runs (seed excepted) name the setting."""
    keyed = [_override_dict(r) for r in runs]
    all_keys = sorted({k for d in keyed for k in d if not k.startswith(SKIP_OVERRIDE_PREFIXES) and k not in REPEAT_KEYS})
    varying = [k for k in all_keys if len({d.get(k) for d in keyed}) > 1] or all_keys
    metric_keys = sorted({k for r in runs for k in r if k.startswith("val/")})
    rows = []
    for run in runs:
        row = {"setting": setting_label(run, varying), "seed": run_seed(run), "backbone": run.get("backbone"),
               "params_m": round(run["params"] / 1e6, 2) if run.get("params") else None,
               "gflops": run.get("gflops")}
        row.update({k: run.get(k) for k in metric_keys})
        row["run_dir"] = run["run_dir"]
        rows.append(row)
    return rows


def default_metric(rows: list[dict]) -> str | None:
    return next((k for k in rows[0] if k.startswith("val/") and "loss" not in k and not k.endswith("_std")), None)


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def group_settings(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["setting"], []).append(row)
    return groups


def find_baseline(settings: list[str], baseline: str | int) -> str:
    """A setting by row index, or the one setting whose overrides include all of ``baseline``'s."""
    if isinstance(baseline, int) or str(baseline).isdigit():
        index = int(baseline)
        if not 0 <= index < len(settings):
            raise ValueError(f"--baseline {index}: row index out of range 0..{len(settings) - 1}")
        return settings[index]
    wanted = set(str(baseline).split())
    found = [s for s in settings if wanted <= set(s.split())]
    if len(found) != 1:
        raise ValueError(f"--baseline {baseline!r} matches {len(found)} settings; give one of: "
                         + "; ".join(f"{i}: {s}" for i, s in enumerate(settings)))
    return found[0]


def paired_delta(rows: list[dict], base_rows: list[dict], metric: str) -> dict:
    """Mean difference to the baseline with its standard error, paired by seed where possible."""
    ours = {r["seed"]: r[metric] for r in rows if r.get(metric) is not None}
    base = {r["seed"]: r[metric] for r in base_rows if r.get(metric) is not None}
    if not ours or not base:
        return {"delta": None, "delta_se": None, "paired": 0, "p_value": None, "significant": None}
    common = [s for s in ours if s is not None and s in base]
    try:
        from scipy import stats
    except ImportError:  # optional: the flag below does not need it
        stats = None
    p_value = None
    if len(common) >= 2:
        diffs = [ours[s] - base[s] for s in common]
        delta, se = statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))
        if stats is not None and se > 0:
            p_value = float(stats.ttest_rel([ours[s] for s in common], [base[s] for s in common]).pvalue)
    else:
        a, b = list(ours.values()), list(base.values())
        delta = statistics.fmean(a) - statistics.fmean(b)
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) if min(len(a), len(b)) > 1 else None
        if stats is not None and se:
            p_value = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    significant = None if se is None else bool(abs(delta) > 2 * se)
    paired = len(common) if len(common) >= 2 else 0
    return {"delta": delta, "delta_se": se, "paired": paired, "p_value": p_value, "significant": significant}


def aggregate(rows: list[dict], metric: str | None = None, baseline: str | int | None = None) -> list[dict]:
    """One row per setting: mean and std of each val/ metric over seeds, n, and the delta to ``baseline``."""
    groups = group_settings(rows)
    metric_keys = [k for k in rows[0] if k.startswith("val/")]
    base = find_baseline(list(groups), baseline) if baseline is not None else None
    table = []
    for setting, members in groups.items():
        first = members[0]
        row = {"setting": setting, "backbone": first["backbone"], "params_m": first["params_m"], "gflops": first["gflops"],
               "n": len(members), "seeds": " ".join(str(m["seed"]) for m in members if m["seed"] is not None)}
        for key in metric_keys:
            values = [m[key] for m in members if m.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = _std(values)
        if base is not None and metric:
            row.update(paired_delta(members, groups[base], metric))
            row["baseline"] = setting == base
        row["run_dirs"] = " ".join(m["run_dir"] for m in members)
        table.append(row)
    return table


def join_paper(table: list[dict], runs: list[dict], key: str, metric: str) -> float | None:
    """Add the paper's row to each setting (``paper``, ``vs_paper``, ``paper_source``, zoo params and
    GFLOPs of the paper row); return Kendall's tau between our means and the paper's values."""
    from vitlab import paper, zoo

    paper_rows = paper.table_rows(key)
    by_dir = {r["run_dir"]: r for r in runs}
    ours, theirs = [], []
    for row in table:
        matched = paper.match_row(paper_rows, by_dir[row["run_dirs"].split(" ")[0]])
        value = paper.paper_metrics(matched).get(metric) if matched else None
        row["paper"] = value
        row["vs_paper"] = row[metric] - value if value is not None and row.get(metric) is not None else None
        row["paper_source"] = matched["source"] if matched else None
        if matched:  # the paper's model (its classes and input size), counted by the zoo, beside the paper's counts
            # (detectors' GFLOPs need a real forward pass: params only for COCO rows)
            coco = (matched["task"] or "").startswith("coco")
            measured = zoo.measure(matched["name"], matched["set"], matched["task"], flops=not coco)
            row["zoo_params_m"] = round(measured.params / 1e6, 2)
            row["zoo_gflops"] = None if math.isnan(measured.gflops) else measured.gflops
            row["paper_params_m"] = matched.get("paper_params_m")
            row["paper_gflops"] = matched.get("paper_gflops")
        if row["vs_paper"] is not None:
            ours.append(row[metric])
            theirs.append(value)
    return paper.kendall_tau(ours, theirs) if len(ours) >= 2 else None


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["setting"] for r in rows]
    values = [r.get(metric) or 0.0 for r in rows]
    errors = [r.get(f"{metric}_std") or 0.0 for r in rows]
    ax1.bar(range(len(rows)), values, yerr=errors, capsize=4, color="tab:blue", label="ours (mean ± std over seeds)")
    paper_values = [(i, r["paper"]) for i, r in enumerate(rows) if r.get("paper") is not None]
    if paper_values:
        ax1.scatter(*zip(*paper_values), marker="D", color="tab:red", zorder=3, label="paper")
    # zoomed on the values: ablation deltas are tenths of a point, invisible on bars from zero
    low = min([v - e for v, e in zip(values, errors)] + [v for _, v in paper_values])
    high = max([v + e for v, e in zip(values, errors)] + [v for _, v in paper_values])
    pad = max(high - low, 0.5) * 0.3
    ax1.set_ylim(low - pad, high + pad)
    ax1.set_xticks(range(len(rows)), [f"{lbl} (n={r.get('n', 1)})" for lbl, r in zip(labels, rows)],
                   rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel(metric)
    ax1.set_title(f"{metric} per setting")
    ax1.legend(fontsize=8)
    for r, v, e in zip(rows, values, errors):
        if r.get("gflops") is not None:
            ax2.errorbar(r["gflops"], v, yerr=e, fmt="o", color="tab:orange", capsize=3)
            ax2.annotate(r["setting"], (r["gflops"], v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("GFLOPs")
    ax2.set_ylabel(metric)
    ax2.set_title(f"{metric} vs GFLOPs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# Columns kept to the CSV/JSON: the printed table stays readable.
NOT_PRINTED = ("run_dir", "run_dirs", "baseline", "paper_source", "zoo_params_m", "zoo_gflops", "paper_params_m", "paper_gflops")


def print_table(rows: list[dict], title: str = "vitlab compare") -> None:
    """Metrics as ``mean ± std``; the baseline row in bold."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = [c for c in rows[0] if c not in NOT_PRINTED and not c.endswith("_std")]
    for c in columns:
        table.add_column(c, no_wrap=c == "setting")
    for r in rows:
        cells = []
        for c in columns:
            std = r.get(f"{c}_std")
            cells.append(_cell(r.get(c)) + (f" ± {std:.2g}" if std is not None else ""))
        table.add_row(*cells, style="bold" if r.get("baseline") else None)
    Console(width=240).print(table)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run or sweep directories")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead (needs network)")
    parser.add_argument("--group", help="with --wandb: one sweep group")
    parser.add_argument("--metric", default=None, help="metric to compare and plot (default: the first val/ metric)")
    parser.add_argument("--baseline", help="setting to take deltas against: its overrides or its row index")
    parser.add_argument("--paper", metavar="PAPER:TABLE", help="join the paper's rows, e.g. pale:Table7")
    parser.add_argument("--out", help="folder for compare.csv, compare_runs.csv, compare.json and compare.png")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run/sweep directories or --wandb ENTITY/PROJECT")
    runs = load_wandb_runs(args.wandb, args.group) if args.wandb else load_local_runs(args.paths)
    if not runs:
        parser.error("no runs found")
    per_run = comparison_rows(runs)
    metric = args.metric or default_metric(per_run)
    if metric and metric not in per_run[0]:
        parser.error(f"--metric {metric}: not in the runs' summaries; they have {', '.join(k for k in per_run[0] if k.startswith('val/'))}")
    try:
        table = aggregate(per_run, metric, args.baseline)
        tau = join_paper(table, runs, args.paper, metric) if args.paper and metric else None
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out or (args.paths[0] if args.paths else "."))
    out.mkdir(parents=True, exist_ok=True)
    title = f"vitlab compare: {metric}" + (f", baseline {args.baseline}" if args.baseline else "")
    print_table(table, title)
    if args.paper:
        print(f"{args.paper}: Kendall tau of our means vs the paper = "
              + ("n/a (fewer than 2 matched rows)" if tau is None else f"{tau:+.3f} (1 = the paper's ordering preserved)"))
    write_csv(table, out / "compare.csv")
    write_csv(per_run, out / "compare_runs.csv")
    (out / "compare.json").write_text(json.dumps(
        {"metric": metric, "baseline": args.baseline, "paper": args.paper, "kendall_tau": tau, "rows": table}, indent=2))
    if metric:
        plot(table, metric, out / "compare.png")
    print(f"wrote {out / 'compare.csv'}" + (f" and {out / 'compare.png'} ({metric})" if metric else ""))
    return table


if __name__ == "__main__":
    main()
