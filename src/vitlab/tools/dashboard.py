"""W&B dashboards as code: one command turns a sweep into a comparison workspace.

    python -m vitlab.tools.dashboard multirun/pale_size-1a2b3c4d --project vitlab        # a local sweep dir
    python -m vitlab.tools.dashboard pale_size-1a2b3c4d --project vitlab --entity me     # a W&B group
    python -m vitlab.tools.dashboard multirun/... --project vitlab --paper pale:Table7   # paper numbers beside ours
    python -m vitlab.tools.dashboard multirun/... --project vitlab --dry-run spec.json   # no network: write the spec
    python -m vitlab.tools.dashboard sync outputs/ --watch 300     # login node: upload offline runs as they grow

The workspace (a saved view of the project, built with the official ``wandb-workspaces``
library) shows the sweep's runs only, grouped by the fields the sweep varied (seeds and
repeated attempts of one setting fall into one group), with: the paper-style table (one row
per setting, seeds aggregated, the paper's numbers when ``--paper`` is given: the table of
``python -m vitlab.tools.compare``), the main metric against GFLOPs, parallel coordinates over the
varied fields, and the training and validation curves grouped by setting. Everything is derived from the sweep itself.
Saving it again updates the same workspace: a sweep directory keeps its URL (``wandb_workspace_url``);
``--update URL`` names one. Reads only public data: the runs' ``summary.json`` (which records what
each run sent to W&B), the CSV logger's ``metrics.csv``, W&B's public API, and wandb-workspaces'
public classes.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vitlab.runtime.extras import require
from vitlab.tools import compare, paper

# Keys that run_metadata (vitlab.runtime.run) logs at the top level of the W&B config besides the backbone fields.
META_KEYS = ("backbone", "task", "schedule", "experiment")


# ----------------------------------------------------------------------------- what runs logged
def wandb_logged(run: dict) -> dict:
    """What a local run sent to W&B, as vitlab recorded it in summary.json (``wandb``: id, project,
    entity, group, config keys, series, step metric; ``vitlab.runtime.run.wandb_record``). Runs finished before
    vitlab recorded it: the project and entity of their stored logger config."""
    if run.get("wandb"):
        return run["wandb"]
    logger = ((run.get("run_config") or {}).get("logger") or {}).get("wandb") or {}
    return {"project": logger.get("project"), "entity": logger.get("entity")} if logger else {}


def csv_history_keys(run_dir: Path) -> set[str]:
    """Metric names of the CSV logger's ``csv/**/metrics.csv`` headers, if the run had that logger."""
    keys = set()
    for path in Path(run_dir).glob("csv/**/metrics.csv"):
        with open(path, newline="") as f:
            keys |= set(next(csv.reader(f), []))
    return keys


# ----------------------------------------------------------------------------- the sweep
@dataclass
class Sweep:
    group: str | None
    project: str | None
    entity: str | None
    runs: list[dict]          # one per job (compare.load_wandb_runs merges repeated attempts of a job)
    fields: list[str]         # override keys that name a setting (what the sweep varied, seeds excluded)
    seeded: bool              # the runs used several seeds: settings aggregate over seeds
    metrics: list[str]        # final val/ metrics in the runs' summaries
    monitor: str | None       # the task's monitored metric (best checkpoint), e.g. val/top1
    curves: list[str]         # logged train/ and val/ series
    step_metric: str          # x-axis of the curves

    @property
    def main_metric(self) -> str:
        """The summary key the dashboard ranks by: the best monitored score when runs have it."""
        if any(r.get("best_score") is not None for r in self.runs):
            return "best_score"
        return self.monitor or next((m for m in self.metrics if "loss" not in m), "best_score")

    @property
    def main_label(self) -> str:
        return f"best {self.monitor}" if self.main_metric == "best_score" and self.monitor else self.main_metric


def config_key(override_key: str) -> str:
    """The W&B config key that holds an override's value. run_metadata logs every backbone field
    and every config-group choice at the top level, and the whole run config under ``config``."""
    key = override_key.lstrip("+~")
    if key.startswith("backbone."):
        return key.removeprefix("backbone.")
    return key if "." not in key else f"config.{key}"


def load_sweep(source: str, project: str | None = None, entity: str | None = None, group: str | None = None) -> Sweep:
    """Runs of a local sweep directory, or of a W&B group (``source`` not a directory; needs network)."""
    step_metrics, curves = [], set()
    if Path(source).exists():
        runs = compare.load_local_runs([source])
        for run in runs:
            logged = wandb_logged(run)
            curves |= set(logged.get("series", []))
            step_metrics.append(logged.get("step_metric"))
            if "config_keys" in logged:
                run["wandb_config_keys"] = logged["config_keys"]
            for key, ours in (("id", "wandb_id"), ("project", "project"), ("entity", "entity"), ("group", "group")):
                if logged.get(key):
                    run.setdefault(ours, logged[key])
            curves |= csv_history_keys(Path(run["run_dir"]))
        groups = sorted({r["group"] for r in runs if r.get("group")})
        if group:
            runs = [r for r in runs if r.get("group") in (group, None)]
        elif len(groups) > 1:
            raise ValueError(f"{source}: runs of several W&B groups {groups}; pick one with --group")
        group = group or (groups[0] if groups else None)
        project = project or next((r["project"] for r in runs if r.get("project")), None)
        entity = entity or next((r["entity"] for r in runs if r.get("entity")), None)
    else:
        if not project:
            raise ValueError(f"{source}: not a directory, so a W&B group; give --project (and --entity)")
        group = group or source
        runs = compare.load_wandb_runs(f"{entity}/{project}" if entity else project, group)
        if not runs:
            raise ValueError(f"no runs in W&B group {group!r} of {entity or '<default entity>'}/{project}")
        curves = {k for r in runs for k, v in r.items() if compare.is_number(v)}
    metrics = sorted({k for r in runs for k, v in r.items() if k.startswith("val/") and compare.is_number(v)})
    monitors = {((r.get("run_config") or {}).get("monitor") or {}).get("metric") for r in runs} - {None}
    return Sweep(
        group=group, project=project, entity=entity, runs=runs,
        fields=compare.varied_fields(runs), seeded=len({compare.run_seed(r) for r in runs}) > 1,
        metrics=metrics, monitor=min(monitors) if monitors else None,
        curves=sorted(k for k in curves if k.startswith(("train/", "val/"))),
        step_metric=next((s for s in step_metrics if s), None) or "Step",
    )


def unlogged_fields(sweep: Sweep) -> list[str]:
    """Varied fields whose W&B config key a local run did not log (the workspace could not group by them)."""
    logged = [set(r["wandb_config_keys"]) for r in sweep.runs if "wandb_config_keys" in r]
    return [f for f in sweep.fields if any(config_key(f).split(".")[0] not in c for c in logged)]


# ----------------------------------------------------------------------------- the paper-style table
def results_table(sweep: Sweep, paper_rows: list[dict] | None = None) -> list[dict]:
    """``vitlab.tools.compare``'s table of the sweep: one row per setting, seeds aggregated (mean, ``_std``,
    n); with ``paper_rows`` (``vitlab.tools.paper.table_rows``), the paper's numbers joined, then the
    table's rows no setting reproduced."""
    table = compare.aggregate(compare.comparison_rows(sweep.runs))
    if paper_rows is not None:
        compare.join_paper(table, sweep.runs, paper_rows, sweep.monitor)
    return table


# Columns of compare's table the workspace's markdown leaves out (the varied fields have columns of their own).
NOT_IN_MARKDOWN = ("setting", "seeds", "run_dirs")


def markdown_table(rows: list[dict], labels: dict[str, str] | None = None) -> str:
    """The table as markdown, ``mean ± std`` cells; ``labels`` renames columns."""
    shown = compare.columns(rows, NOT_IN_MARKDOWN)
    header = [(labels or {}).get(c, c) for c in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(compare.cell(r.get(c), r.get(f"{c}_std")).replace("|", "/") for c in shown) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the workspace
def column(metric) -> str:
    """Runs-table accessor of a Config/SummaryMetric: ``config:<key>.value[.<rest>]``, ``summary:<key>``."""
    wr = require("wandb_workspaces.reports.v2", "wandb", "python -m vitlab.tools.dashboard")
    if isinstance(metric, wr.Config):
        first, _, rest = metric.name.partition(".")
        return f"config:{first}.value" + (f".{rest}" if rest else "")
    return f"summary:{metric.name}"


def build_workspace(sweep: Sweep, paper_rows: list[dict] | None = None, paper_key: str | None = None):
    wr = require("wandb_workspaces.reports.v2", "wandb", "python -m vitlab.tools.dashboard")
    ws = require("wandb_workspaces.workspaces", "wandb", "python -m vitlab.tools.dashboard")

    main = wr.SummaryMetric(sweep.main_metric)
    fields = [wr.Config(config_key(f)) for f in sweep.fields]
    title = f"{sweep.group or 'sweep'}: one row per setting" + (", mean ± std over seeds" if sweep.seeded else "")
    table = markdown_table(results_table(sweep, paper_rows), {"best_score": sweep.main_label})
    if paper_key:
        table += f"\n\nPaper: {paper_key} (src/vitlab/tools/paper_tables); vs_paper_<x> = ours − paper."
    grouped = {"groupby_aggfunc": "mean", "groupby_rangefunc": "stddev"}  # panels follow the runs-table grouping
    sections = [
        ws.Section(name="Results", is_open=True, layout_settings=ws.SectionLayoutSettings(columns=1, rows=1),
                   panels=[wr.MarkdownPanel(markdown=f"### {title}\n\n{table}")]),
        ws.Section(name="Accuracy vs cost", is_open=True, panels=[
            wr.ScatterPlot(title=f"{sweep.main_label} vs GFLOPs", x=wr.SummaryMetric("gflops"), y=main),
            wr.ScatterPlot(title=f"{sweep.main_label} vs params", x=wr.SummaryMetric("params"), y=main),
            wr.BarPlot(title=f"{sweep.main_label} per setting", metrics=[main], **grouped),
        ]),
        ws.Section(name="Varied fields", is_open=True, panels=[wr.ParallelCoordinatesPlot(
            title="varied fields → " + sweep.main_label,
            columns=[wr.ParallelCoordinatesPlotColumn(metric=m) for m in
                     [*fields, wr.SummaryMetric("params"), wr.SummaryMetric("gflops"), main]],
        )]),
        ws.Section(name="Curves", is_open=True, panels=[
            wr.LinePlot(title=m, x=sweep.step_metric, y=[m], **grouped) for m in sweep.curves
        ]),
    ]
    summary_columns = ["params", "gflops", sweep.main_metric, *sweep.metrics]
    workspace = ws.Workspace(
        entity=sweep.entity or "",
        project=sweep.project or "",
        name=f"vitlab {sweep.group or 'sweep'}",
        sections=sections,
        settings=ws.WorkspaceSettings(x_axis=sweep.step_metric, max_runs=max(10, len(sweep.runs))),
        runset_settings=ws.RunsetSettings(
            filters=ws.And(ws.Metric("Group") == sweep.group) if sweep.group else "",
            groupby=[ws.Config(config_key(f)) for f in sweep.fields],
            pinned_columns=[column(c) for c in [*fields, *map(wr.SummaryMetric, dict.fromkeys(summary_columns))]],
        ),
    )
    return workspace


def workspace_spec(workspace) -> dict:
    """The workspace as built, through the public pydantic model wandb-workspaces defines it with
    (pydantic's ``TypeAdapter``), each panel with its ``kind`` (class name); the library's private
    fields (``_``-prefixed: random panel ids, view ids) are left out, so equal builds give equal specs."""
    TypeAdapter = require("pydantic", "wandb", "python -m vitlab.tools.dashboard").TypeAdapter

    def public(obj):
        if isinstance(obj, dict):
            return {k: public(v) for k, v in obj.items() if not k.startswith("_")}
        return [public(v) for v in obj] if isinstance(obj, list) else obj

    spec = public(TypeAdapter(type(workspace)).dump_python(workspace, mode="json"))
    for section, built in zip(spec["sections"], workspace.sections):
        for panel, obj in zip(section["panels"], built.panels):
            panel["kind"] = type(obj).__name__
    return spec


# The parts of a workspace vitlab builds; the rest of a saved view (its id, name, UI state) stays.
WORKSPACE_FIELDS = ("name", "sections", "settings", "runset_settings")


def save_workspace(workspace, url: str | None = None) -> str:
    """Save as a new view, or with ``url`` (an earlier save's) update that view: loaded with
    ``Workspace.from_url``, given this build's sections and settings, saved. Needs network and a
    W&B login. Returns the view's URL."""
    if url:
        ws = require("wandb_workspaces.workspaces", "wandb", "python -m vitlab.tools.dashboard")
        existing = ws.Workspace.from_url(url)
        for field in WORKSPACE_FIELDS:
            setattr(existing, field, getattr(workspace, field))
        workspace = existing
    workspace.save()
    return workspace.url


# ----------------------------------------------------------------------------- sync from the login node
def runs_to_sync(root: Path) -> list[Path]:
    """Offline run logs under ``root`` never synced, or grown since their last sync (``.wandb.synced`` marker).
    Only file names: the offline-run directories ``wandb sync`` takes and the marker it leaves; the
    logs' contents (W&B's private record format) are not read."""
    todo = []
    for path in sorted(Path(root).rglob("offline-run-*/run-*.wandb")):
        marker = path.with_suffix(".wandb.synced")
        if not marker.exists() or marker.stat().st_mtime < path.stat().st_mtime:
            todo.append(path)
    return todo


def sync(root: Path, watch: float | None = None, dry_run: bool = False, wandb_args: list[str] | None = None) -> list[Path]:
    """``wandb sync`` of every new or grown offline run under ``root``; with ``watch``, again every
    ``watch`` seconds (runs still training are uploaded as they progress; Ctrl-C stops).
    One call per pass: fragments of one run (a requeued job resuming its run id) sync in order."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"sync: {root} is not a directory")
    while True:
        todo = runs_to_sync(root)
        if todo:
            command = [sys.executable, "-m", "wandb", "sync", "--include-synced", *(wandb_args or []),
                       *(["--dry-run"] if dry_run else []), *map(str, todo)]
            print(f"syncing {len(todo)} run(s): {' '.join(command[1:])}", flush=True)
            failed = subprocess.run(command, check=False).returncode
            if failed and not watch:  # when watching, the next pass retries (e.g. the network came back)
                raise RuntimeError(f"wandb sync failed (exit {failed}); see its output above")
        if not watch:
            return todo
        time.sleep(watch)


# ----------------------------------------------------------------------------- command line
URL_FILE = "wandb_workspace_url"  # in a sweep directory: its workspace, so saving again updates it

def main(argv: list[str] | None = None) -> dict | list:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sync"]:
        parser = argparse.ArgumentParser(prog="python -m vitlab.tools.dashboard sync",
                                         description="Upload offline W&B runs under DIR (e.g. from a login node).")
        parser.add_argument("dir", type=Path, help="a run, sweep or outputs directory")
        parser.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until interrupted")
        parser.add_argument("--dry-run", action="store_true", help="list what wandb sync would upload")
        parser.add_argument("wandb_args", nargs="*", help="after --: options for wandb sync, e.g. -- --entity me")
        args = parser.parse_args(argv[1:])
        return sync(args.dir, args.watch, args.dry_run, args.wandb_args)

    parser = argparse.ArgumentParser(prog="python -m vitlab.tools.dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a sweep directory, or a W&B group name")
    parser.add_argument("--project", help="W&B project (default: the runs' own)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' own, else your default entity)")
    parser.add_argument("--group", help="the W&B group (default: the runs' own)")
    parser.add_argument("--paper", metavar="PAPER:TABLE", help="e.g. pale:Table7: the paper's numbers beside ours")
    parser.add_argument("--dry-run", metavar="FILE", type=Path, help="write the workspace spec as JSON; no network")
    parser.add_argument("--update", metavar="URL", help="update this saved workspace (default for a sweep directory: "
                        f"the one its last save made, kept in <dir>/{URL_FILE})")
    args = parser.parse_args(argv)
    try:
        paper_rows = paper.table_rows(args.paper) if args.paper else None
        sweep = load_sweep(args.source, args.project, args.entity, args.group)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not sweep.project:
        parser.error(f"{args.source}: the runs name no W&B project; give --project")
    if not args.dry_run and not sweep.group:
        parser.error(f"{args.source}: its runs logged no W&B group (logger=wandb?); give --group")
    if not args.dry_run and not sweep.entity:
        wandb = require("wandb", "wandb", "python -m vitlab.tools.dashboard")
        sweep.entity = wandb.Api().default_entity  # the view's name depends on it: set before building
    for field in unlogged_fields(sweep):
        print(f"warning: {field}: its W&B config key {config_key(field)!r} is missing from some runs; "
              "they will not group by it", file=sys.stderr)
    workspace = build_workspace(sweep, paper_rows, args.paper)
    spec = workspace_spec(workspace)
    if args.dry_run:
        args.dry_run.write_text(json.dumps(spec, indent=1))
        print(f"wrote {args.dry_run}: workspace {spec['name']!r}, {len(sweep.runs)} runs, "
              f"settings by {', '.join(sweep.fields) or '(none)'}")
        return spec
    url_file = Path(args.source) / URL_FILE if Path(args.source).is_dir() else None
    url = args.update or (url_file.read_text().strip() if url_file and url_file.is_file() else None)
    url = save_workspace(workspace, url)
    if url_file:
        url_file.write_text(url + "\n")
    print(f"saved {url}")
    return spec


if __name__ == "__main__":
    main()
