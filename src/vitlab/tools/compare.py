"""The paper-style table of a sweep: one row per setting, seeds aggregated, deltas, the paper beside it.

    python -m vitlab.tools.compare multirun/pale_size-1a2b3c4d              # a sweep directory
    python -m vitlab.tools.compare outputs/imagenet_cls/pvt_v2_b0/demo outputs/imagenet_cls/pvt_v2_b0/demo-5e6f7a8b
    python -m vitlab.tools.compare SWEEP --baseline backbone.pale_size=7 --paper pale:Table7
    python -m vitlab.tools.compare --wandb my-entity/vitlab --group pale_size-1a2b3c4d

A *setting* is a combination of the overrides that differ between runs, ``seed`` excepted:
a sweep run with ``seed=0,1,2`` gives three runs per setting. Per setting the table has the
varied fields as columns, params, GFLOPs, ``n``, and the mean and sample standard deviation
(``<metric>_std``) over its runs of every ``val/`` metric and of ``best_score`` (the best
monitored value).

``--baseline`` names one setting (its overrides, e.g. ``backbone.pale_size=7``, or its row
index); every row then gets ``delta`` = mean(metric) - mean(baseline metric), with
``delta_se``, its standard error. Runs are paired by seed when both settings ran the same
seeds (``paired`` pairs; the standard error is that of the per-seed differences, which
removes what the seed does to both); otherwise the settings are treated as independent
(``sqrt(s1²/n1 + s2²/n2)``). ``significant`` is ``|delta| > 2 x delta_se``: a screening
rule, not a test. With 3 seeds a paired t-test at 5% needs ``|delta| > 4.3 x delta_se``,
so ``p_value`` (paired or Welch t-test) is given too when scipy is installed.

``--paper <paper>:<table>`` (``vitlab.tools.paper``) joins each setting with the paper's row it
reproduces: ``paper_source``, the paper's numbers (``paper_top1``, ``paper_params_m``, ...),
``vs_paper_<x>`` = ours - paper for each, params and GFLOPs of the paper's model counted by
the zoo (``zoo_params_m``, ``zoo_gflops``), and Kendall's tau between our means and the
paper's values of the metric over the matched rows (1: the paper's ordering of rows is
preserved). The table's rows of the same task that no setting reproduced are appended.

Writes ``compare.csv`` (per setting), ``compare_runs.csv`` (per run), ``compare.json``
(table, metric, baseline, tau) and ``compare.png`` (the metric per setting with ±std error
bars and the paper's values; the metric against GFLOPs) to ``--out`` (default: the first
directory given, or the current one for W&B). ``python -m vitlab.tools.dashboard`` shows the same
table in a W&B workspace.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import yaml

SKIP_OVERRIDE_PREFIXES = ("hydra.", "hydra/", "+sweep=", "debug=", "data.", "trainer.", "logger", "callbacks")
# Overrides that repeat a setting rather than define one.
REPEAT_KEYS = ("seed",)
# Per-run values that are not copied to the per-setting row (the setting aggregates them).
PER_RUN = ("seed", "run_dir")


# ----------------------------------------------------------------------------- loading runs
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
    """summary.json of each run, with ``run_dir`` (where it is now) and ``run_config`` (the composed
    config Hydra stored: backbone fields, monitor, seed)."""
    runs = []
    for run_dir in find_run_dirs(paths):
        run = json.loads((run_dir / "summary.json").read_text())
        run["run_dir"] = str(run_dir)
        if (run_dir / ".hydra" / "config.yaml").is_file():
            run["run_config"] = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
            run.setdefault("seed", run["run_config"].get("seed"))
        runs.append(run)
    return runs


def load_wandb_runs(project: str, group: str | None = None) -> list[dict]:
    """Runs of a W&B project (``entity/project``), optionally one sweep group; needs network.
    Attempts of one job logged as separate W&B runs count once (``merge_attempts``)."""
    from vitlab.runtime.extras import require

    wandb = require("wandb", "wandb", "reading runs from W&B (--wandb)")

    filters = {"group": group} if group else {}
    runs = []
    for run in wandb.Api().runs(project, filters=filters):
        summary = {k: v for k, v in run.summary.items() if not k.startswith("_")}
        summary.setdefault("overrides", run.config.get("overrides", []))
        summary.setdefault("seed", run.config.get("seed"))
        summary["run_dir"] = run.url
        summary["run_config"] = run.config.get("config", {})
        summary["wandb_id"] = run.id
        runs.append(summary)
    return merge_attempts(runs)


def job_key(run: dict) -> tuple:
    return tuple(sorted(o for o in run.get("overrides", []) if not o.startswith("hydra")))


def merge_attempts(runs: list[dict]) -> list[dict]:
    """One run per job: W&B runs of attempts of one job (same overrides; runs from before the W&B
    run id was kept across requeues) collapse into the attempt that got furthest."""
    best: dict[tuple, dict] = {}
    for run in runs:
        key = job_key(run)
        if key not in best or (run.get("global_step") or 0) >= (best[key].get("global_step") or 0):
            best[key] = run
    return list(best.values())


# ----------------------------------------------------------------------------- settings
def override_dict(run: dict) -> dict[str, str]:
    return dict(o.split("=", 1) for o in run.get("overrides", []) if "=" in o)


def is_repeat(key: str) -> bool:
    return key.lstrip("+~") in REPEAT_KEYS


def run_seed(run: dict) -> str | None:
    """The seed a run used: its ``seed=`` override, else its summary's or stored config's, else None."""
    seed = override_dict(run).get("seed", run.get("seed"))
    return None if seed is None else str(seed)


def varied_fields(runs: list[dict]) -> list[str]:
    """The override keys that name a setting: those whose values differ between runs (all of them
    when none differ), seeds excepted."""
    keyed = [override_dict(r) for r in runs]
    all_keys = sorted({k for d in keyed for k in d if not k.startswith(SKIP_OVERRIDE_PREFIXES) and not is_repeat(k)})
    return [k for k in all_keys if len({d.get(k) for d in keyed}) > 1] or all_keys


def setting_label(run: dict, varying: list[str]) -> str:
    overrides = [o for o in run.get("overrides", []) if o.split("=")[0] in varying]
    return " ".join(overrides) or run.get("backbone") or Path(run["run_dir"]).name


def is_metric(key: str) -> bool:
    return key.startswith("val/") or key == "best_score"


def comparison_rows(runs: list[dict]) -> list[dict]:
    """One row per run: its setting (label and one column per varied field), seed, params, GFLOPs, metrics."""
    varying = varied_fields(runs)
    metric_keys = sorted({k for r in runs for k, v in r.items() if is_metric(k) and v is not None})
    rows = []
    for run in runs:
        fields = override_dict(run)
        row = {"setting": setting_label(run, varying), **{f: fields.get(f) for f in varying},
               "seed": run_seed(run), "backbone": run.get("backbone"),
               "params_m": round(run["params"] / 1e6, 2) if run.get("params") else None,
               "gflops": run.get("gflops")}
        row.update({k: run.get(k) for k in metric_keys})
        row["run_dir"] = run["run_dir"]
        rows.append(row)
    return rows


def default_metric(rows: list[dict]) -> str | None:
    return next((k for k in rows[0] if k.startswith("val/") and "loss" not in k and not k.endswith("_std")), None)


# ----------------------------------------------------------------------------- statistics
def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite numbers among ``values`` (std None below 2)."""
    values = [v for v in values if is_number(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


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
    """One row per setting: its fields, n and seeds, mean and std of each metric over its runs,
    and the delta of ``metric`` to ``baseline``; ``run_dirs`` lists its runs."""
    groups = group_settings(rows)
    metric_keys = [k for k in rows[0] if is_metric(k)]
    base = find_baseline(list(groups), baseline) if baseline is not None else None
    table = []
    for setting, members in groups.items():
        row = {k: v for k, v in members[0].items() if k not in PER_RUN and not is_metric(k)}
        row["n"] = len(members)
        row["seeds"] = " ".join(m["seed"] for m in members if m["seed"] is not None)
        for key in metric_keys:
            row[key], row[f"{key}_std"] = mean_std([m.get(key) for m in members])
        if base is not None and metric:
            row.update(paired_delta(members, groups[base], metric))
            row["baseline"] = setting == base
        row["run_dirs"] = [m["run_dir"] for m in members]
        table.append(row)
    return table


def join_paper(table: list[dict], runs: list[dict], paper_rows: list[dict], metric: str | None) -> float | None:
    """Add the paper's row (``vitlab.tools.paper.table_rows``) each setting reproduces: ``paper_source``,
    the paper's numbers, ``vs_<paper key>`` = ours - paper, the zoo's params and GFLOPs of the
    paper's model; append the rows no setting reproduced (same task); return Kendall's tau
    between our means of ``metric`` and the paper's (None below 2 matched rows)."""
    from vitlab.tools import paper

    by_dir = {r["run_dir"]: r for r in runs}
    matched, ours, theirs = [], [], []
    for row in table:
        found = paper.match_row(paper_rows, by_dir[row["run_dirs"][0]])
        row["paper_source"] = found["source"] if found else None
        if not found:
            continue
        matched.append(found)
        for key, value in paper.paper_values(found).items():
            row[key] = value
            mine = row.get(paper.our_column(key))
            row[f"vs_{key}"] = None if mine is None else mine - value
        # the paper's model (its classes and input size) counted by the zoo, beside the paper's counts
        size = tuple(found["input"]) if found.get("input") else None
        params_m, gflops = paper.model_counts(found["name"], tuple(found["set"]), found["task"], size)
        row["zoo_params_m"], row["zoo_gflops"] = round(params_m, 2), gflops
        if metric and row.get(metric) is not None and found.get(paper.paper_key(metric)) is not None:
            ours.append(row[metric])
            theirs.append(found[paper.paper_key(metric)])
    tasks = {r.get("task") or paper.CLASSIFIER_TASK for r in runs}
    table += [{"backbone": r["name"], "paper_source": r["source"], **paper.paper_values(r)}
              for r in paper_rows if not any(r is m for m in matched) and paper.row_task(r) in tasks]
    return paper.kendall_tau(ours, theirs) if len(ours) >= 2 else None


# ----------------------------------------------------------------------------- output
def cell(value, std=None) -> str:
    """A table cell: ``mean ± std`` for aggregated numbers."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(map(str, value))
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text + (f" ± {std:.2g}" if is_number(std) else "")


def columns(rows: list[dict], hidden=()) -> list[str]:
    """Every column of the rows in order, without ``hidden`` and the ``_std`` ones (shown beside their means)."""
    return [c for c in dict.fromkeys(k for r in rows for k in r) if c not in hidden and not c.endswith("_std")]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows([{k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()} for r in rows])


def plot(rows: list[dict], metric: str, path: Path) -> None:
    """The metric per setting (± std over seeds, the paper's values beside) and against GFLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitlab.tools.paper import paper_key

    rows = [r for r in rows if "n" in r]  # our settings, not the paper's rows we did not run
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    values = [r.get(metric) or 0.0 for r in rows]
    errors = [r.get(f"{metric}_std") or 0.0 for r in rows]
    ax1.bar(range(len(rows)), values, yerr=errors, capsize=4, color="tab:blue", label="ours (mean ± std over seeds)")
    paper_values = [(i, r[paper_key(metric)]) for i, r in enumerate(rows) if r.get(paper_key(metric)) is not None]
    if paper_values:
        ax1.scatter(*zip(*paper_values), marker="D", color="tab:red", zorder=3, label="paper")
    # zoomed on the values: ablation deltas are tenths of a point, invisible on bars from zero
    low = min([v - e for v, e in zip(values, errors)] + [v for _, v in paper_values])
    high = max([v + e for v, e in zip(values, errors)] + [v for _, v in paper_values])
    pad = max(high - low, 0.5) * 0.3
    ax1.set_ylim(low - pad, high + pad)
    ax1.set_xticks(range(len(rows)), [f"{r['setting']} (n={r['n']})" for r in rows], rotation=30, ha="right", fontsize=8)
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


# Columns kept to the CSV/JSON: the printed table stays readable.
NOT_PRINTED = ("seeds", "run_dirs", "baseline", "paper_source", "zoo_params_m", "zoo_gflops")


def print_table(rows: list[dict], title: str = "vitlab compare", hidden=()) -> None:
    """Metrics as ``mean ± std``; the baseline row in bold."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    shown = columns(rows, (*NOT_PRINTED, *hidden))
    for c in shown:
        table.add_column(c, no_wrap=c == "setting")
    for r in rows:
        table.add_row(*(cell(r.get(c), r.get(f"{c}_std")) for c in shown), style="bold" if r.get("baseline") else None)
    Console(width=240).print(table)


# ----------------------------------------------------------------------------- paper-ready tables
def paper_table(rows: list[dict], fmt: str, metrics: list[str] | None = None, digits: int = 1) -> str:
    """Our settings as a table to paste: the setting, params (M), GFLOPs, ``n``, each metric as
    mean ± std over seeds (the best mean of each metric in bold); where the paper's rows were joined
    (``--paper``), the paper's value and ours minus it beside each metric. ``fmt``: ``latex``
    (booktabs: ``\\usepackage{booktabs}``) or ``markdown`` (GitHub tables)."""
    from vitlab.tools.paper import paper_key

    rows = [r for r in rows if "n" in r]  # our settings; the paper's rows we did not run are in compare.csv
    metrics = metrics or [c for c in columns(rows) if c.startswith("val/") and "loss" not in c]
    latex = fmt == "latex"
    pm, delta = (" $\\pm$ ", "$\\Delta$") if latex else (" ± ", "Δ")
    num = lambda v, signed=False: "" if not is_number(v) else f"{v:{'+' if signed else ''}.{digits}f}"  # noqa: E731
    text = (lambda s: s.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&")
            .replace("%", "\\%").replace("#", "\\#")) if latex else (lambda s: s.replace("|", "\\|"))
    bold = (lambda s: f"\\textbf{{{s}}}") if latex else (lambda s: f"**{s}**")

    header = ["Setting", "Params (M)", "GFLOPs", "$n$" if latex else "n"]
    with_paper = {m: any(r.get(paper_key(m)) is not None for r in rows) for m in metrics}
    for m in metrics:
        name = text(m.removeprefix("val/"))
        header += [name] + ([f"{name} (paper)", delta] if with_paper[m] else [])
    best = {m: max((r[m] for r in rows if is_number(r.get(m))), default=None) for m in metrics}
    body = []
    for r in rows:
        line = [text(r["setting"].replace("backbone.", "")), num(r.get("params_m")),
                num(r.get("gflops")), str(r["n"])]
        for m in metrics:
            value = num(r.get(m)) + (pm + num(r[f"{m}_std"]) if is_number(r.get(f"{m}_std")) else "")
            line.append(bold(value) if value and r.get(m) == best[m] else value)
            if with_paper[m]:
                line += [num(r.get(paper_key(m))), num(r.get(f"vs_{paper_key(m)}"), signed=True)]
        body.append(line)
    if latex:
        return "\n".join(["\\begin{tabular}{l" + "r" * (len(header) - 1) + "}", "\\toprule",
                          " & ".join(header) + " \\\\", "\\midrule", *(" & ".join(b) + " \\\\" for b in body),
                          "\\bottomrule", "\\end{tabular}"]) + "\n"
    return "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] + ["---:"] * (len(header) - 1), *body]) + "\n"


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
    parser = argparse.ArgumentParser(prog="python -m vitlab.tools.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="run or sweep directories")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead (needs network)")
    parser.add_argument("--group", help="with --wandb: one sweep group")
    parser.add_argument("--metric", default=None, help="metric to compare and plot (default: the first val/ metric)")
    parser.add_argument("--baseline", help="setting to take deltas against: its overrides or its row index")
    parser.add_argument("--paper", metavar="PAPER:TABLE", help="join the paper's rows, e.g. pale:Table7")
    parser.add_argument("--out", help="folder for compare.csv, compare_runs.csv, compare.json and compare.png")
    parser.add_argument("--format", choices=["latex", "markdown"], action="append", default=[],
                        help="also write the paper-ready table compare.tex / compare.md (repeatable) and print it")
    parser.add_argument("--digits", type=int, default=1, help="decimals of the paper-ready table (default 1)")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run/sweep directories or --wandb ENTITY/PROJECT")
    try:
        paper_rows = None
        if args.paper:
            from vitlab.tools.paper import table_rows

            paper_rows = table_rows(args.paper)
        runs = load_wandb_runs(args.wandb, args.group) if args.wandb else load_local_runs(args.paths)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not runs:
        parser.error("no runs found")
    per_run = comparison_rows(runs)
    metric = args.metric or default_metric(per_run)
    if metric and metric not in per_run[0]:
        parser.error(f"--metric {metric}: not in the runs' summaries; they have {', '.join(k for k in per_run[0] if is_metric(k))}")
    try:
        table = aggregate(per_run, metric, args.baseline)
    except ValueError as err:
        parser.error(str(err))
    tau = join_paper(table, runs, paper_rows, metric) if paper_rows else None
    out = Path(args.out or (args.paths[0] if args.paths else "."))
    out.mkdir(parents=True, exist_ok=True)
    title = f"vitlab compare: {metric}" + (f", baseline {args.baseline}" if args.baseline else "")
    print_table(table, title, hidden=varied_fields(runs))
    if args.paper:
        print(f"{args.paper}: Kendall tau of our means vs the paper = "
              + ("n/a (fewer than 2 matched rows)" if tau is None else f"{tau:+.3f} (1 = the paper's ordering preserved)"))
    write_csv(table, out / "compare.csv")
    write_csv(per_run, out / "compare_runs.csv")
    (out / "compare.json").write_text(json.dumps(
        {"metric": metric, "baseline": args.baseline, "paper": args.paper, "kendall_tau": tau, "rows": table}, indent=2))
    if metric:
        plot(table, metric, out / "compare.png")
    for fmt in args.format:
        rendered = paper_table(table, fmt, digits=args.digits)
        (out / f"compare.{'tex' if fmt == 'latex' else 'md'}").write_text(rendered)
        print(rendered)
    per_class = per_class_rows(runs, per_run)
    if per_class:
        write_csv(per_class, out / "compare_per_class.csv")
    print(f"wrote {out / 'compare.csv'}" + (f" and {out / 'compare.png'} ({metric})" if metric else ""))
    return table


if __name__ == "__main__":
    main()
