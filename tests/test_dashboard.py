"""W&B dashboards as code, offline: the workspace spec of a smoke sweep, the paper join, sync.

The dashboard reads the runs' summary.json; these tests check it against what W&B itself recorded
offline (``support.wandb_run_info``: W&B has no public reader of offline runs)."""
from __future__ import annotations

import json
import os
import statistics
from types import SimpleNamespace

import pytest

from support import SWEEP_RATIOS as RATIOS
from support import run_script, wandb_run_info
from vitlab.tools import compare, dashboard, paper


@pytest.fixture
def sweep_dir(smoke_sweep):
    """conftest's smoke sweep: backbone.mlp_ratios (two values) x two seeds, logged to W&B offline."""
    return smoke_sweep


def summaries(sweep_dir):
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]


def logged(sweep_dir):
    """Config keys and summary keys each offline W&B run really holds."""
    return [wandb_run_info(p) for p in sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))]


def panels_of(spec) -> list[dict]:
    return [p for section in spec["sections"] for p in section["panels"]]


def test_dry_run_spec_holds_every_varied_field_and_metric(sweep_dir, tmp_path):
    out = tmp_path / "spec.json"
    spec = dashboard.main([str(sweep_dir), "--dry-run", str(out)])
    assert json.loads(out.read_text()) == spec
    text = out.read_text()
    runset = spec["runset_settings"]
    # the sweep's runs only (vitlab names a -m sweep's W&B group after its directory), grouped by setting:
    # the varied backbone field, not the seed, so seeds (and requeued attempts) aggregate
    assert spec["project"] == "vitlab" and spec["name"] == f"vitlab {sweep_dir.name}"
    assert runset["filters"] == f"Metric(\"Group\") == '{sweep_dir.name}'"
    assert runset["groupby"] == [{"name": "mlp_ratios"}]
    panels = panels_of(spec)
    kinds = {p["kind"] for p in panels}
    assert {"MarkdownPanel", "ScatterPlot", "ParallelCoordinatesPlot", "LinePlot", "BarPlot"} <= kinds
    assert ({"name": "gflops"}, {"name": "best_score"}) in [(p["x"], p["y"]) for p in panels if p["kind"] == "ScatterPlot"]
    parallel = next(p for p in panels if p["kind"] == "ParallelCoordinatesPlot")
    assert {"name": "mlp_ratios"} in [c["metric"] for c in parallel["columns"]]
    curves = {m for p in panels if p["kind"] == "LinePlot" for m in p["y"]}
    runs = logged(sweep_dir)
    assert len(runs) == 4
    val_metrics = {k for s in summaries(sweep_dir) for k in s if k.startswith("val/")}
    assert val_metrics and val_metrics <= curves and {"train/loss"} <= curves
    assert all(f"summary:{m}" in runset["pinned_columns"] for m in val_metrics | {"params", "gflops"})
    # every key the workspace reads exists in what the runs logged to W&B (W&B's own record of them)
    x_axes = {p["x"] for p in panels if p["kind"] == "LinePlot"} | {spec["settings"]["x_axis"]}
    for run in runs:
        assert run["config"]["mlp_ratios"] in ([4, 4, 4, 4], [2, 2, 2, 2]) and run["config"]["debug"] == "smoke"
        assert {"params", "gflops", "best_score"} | val_metrics <= run["summary"]
        assert curves <= run["history"] and x_axes == {run["step_metric"]}
        assert run["group"] == sweep_dir.name and run["project"] == "vitlab"
    assert all(r in text for r in RATIOS)


def test_summary_records_what_the_run_sent_to_wandb(sweep_dir):
    """summary.json's ``wandb`` block (what the dashboard reads) agrees with W&B's own record."""
    for summary, run in zip(summaries(sweep_dir), logged(sweep_dir)):
        mine = summary["wandb"]
        assert (mine["id"], mine["project"], mine["entity"], mine["group"]) == (
            run["wandb_id"], run["project"], run["entity"], run["group"])
        assert set(mine["config_keys"]) == set(run["config"])
        assert {"train/loss", "val/top1", mine["step_metric"]} <= set(mine["series"]) <= run["history"]
        assert mine["step_metric"] == run["step_metric"]  # Lightning's WandbLogger: trainer/global_step


def test_table_aggregates_seeds_per_setting(sweep_dir):
    sweep = dashboard.load_sweep(str(sweep_dir))
    assert sweep.fields == ["backbone.mlp_ratios"] and sweep.seeded and sweep.monitor == "val/top1"
    rows = dashboard.results_table(sweep)  # vitlab.tools.compare's aggregation
    assert [r["backbone.mlp_ratios"] for r in rows] == RATIOS
    for row in rows:
        mine = [s for s in summaries(sweep_dir) if f"backbone.mlp_ratios={row['backbone.mlp_ratios']}" in s["overrides"]]
        assert row["n"] == len(mine) == 2 and row["seeds"] == "0 1"
        assert row["val/top5"] == pytest.approx(statistics.mean(s["val/top5"] for s in mine))
        assert row["best_score"] == pytest.approx(statistics.mean(s["best_score"] for s in mine))
        assert row["best_score_std"] == pytest.approx(statistics.stdev(s["best_score"] for s in mine))
        assert row["params_m"] == pytest.approx(mine[0]["params"] / 1e6, abs=0.005)
    assert rows[0]["params_m"] > rows[1]["params_m"]  # mlp ratio 4 > 2
    table = dashboard.markdown_table(rows, {"best_score": sweep.main_label})
    assert len(table.splitlines()) == 2 + 2 and "| backbone.mlp_ratios |" in table
    assert "best val/top1" in table and " ± " in table and "run_dirs" not in table


def test_repeated_attempts_of_a_job_do_not_add_rows(sweep_dir):
    sweep = dashboard.load_sweep(str(sweep_dir))
    first = sweep.runs[0]
    retry = {**first, "global_step": 0, "run_dir": "https://wandb.ai/x/y/runs/older-attempt"}
    assert compare.merge_attempts([retry, *sweep.runs]) == sweep.runs
    assert compare.merge_attempts([*sweep.runs, retry]) == sweep.runs


def test_paper_join_on_synthetic_rows(sweep_dir):
    rows = [
        {"name": "pvt_v2_b0", "set": ["mlp_ratios=[4,4,4,4]"], "task": None, "paper_params_m": 0.2, "paper_top1": 60.0,
         "source": "Toy Table 3 (ratio 4)"},
        {"name": "pvt_v2_b0", "set": ["mlp_ratios=[2, 2, 2, 2]"], "task": None, "paper_params_m": 0.15, "paper_top1": 55.0,
         "source": "Toy Table 3 (ratio 2)"},
        {"name": "pvt_v2_b0", "set": ["mlp_ratios=[8,8,8,8]"], "task": None, "paper_top1": 61.0, "source": "Toy Table 3 (ratio 8)"},
        {"name": "pvt_v2_b0", "set": ["mlp_ratios=[4,4,4,4]"], "task": "ade20k_fpn", "paper_miou": 30.0,
         "source": "Toy Table 3 (ADE20K)"},
        {"name": "pvt_v2_b0", "set": [], "task": None, "paper_top1": 1.0, "source": "Toy Table 4"},
    ]
    table = paper.table_rows("toy:Table3", rows)
    assert [r["source"] for r in table] == [r["source"] for r in rows[:4]]
    with pytest.raises(ValueError, match="toy:Table3, toy:Table4"):
        paper.table_rows("toy:Table9", rows)
    sweep = dashboard.load_sweep(str(sweep_dir))
    joined = dashboard.results_table(sweep, table)
    assert [r.get("paper_top1") for r in joined] == [60.0, 55.0, 61.0]  # ADE20K row: another task
    for row, ref in zip(joined, (60.0, 55.0)):
        assert row["paper_source"].startswith("Toy Table 3")
        assert row["vs_paper_top1"] == pytest.approx(row["val/top1"] - ref)
        assert row["vs_paper_params_m"] == pytest.approx(row["params_m"] - row["paper_params_m"])
    # the paper's model counted by the zoo: the full PVTv2-B0 with MLP ratio 4 has more parameters than with 2
    assert joined[0]["zoo_params_m"] > joined[1]["zoo_params_m"] > 1
    assert "n" not in joined[2] and "val/top1" not in joined[2]  # the paper's row no setting reproduced
    spec = dashboard.workspace_spec(dashboard.build_workspace(sweep, table, "toy:Table3"))
    markdown = next(p["markdown"] for p in panels_of(spec) if p["kind"] == "MarkdownPanel")
    assert "paper_top1" in markdown and "Toy Table 3 (ratio 8)" in markdown and "toy:Table3" in markdown


def test_sync_picks_new_and_grown_offline_runs(sweep_dir):
    files = dashboard.runs_to_sync(sweep_dir)
    assert len(files) == 4
    proc = run_script_module(["sync", str(sweep_dir), "--dry-run"])
    assert "Would sync 4 run(s)" in proc.stdout + proc.stderr
    for f in files:
        f.with_suffix(".wandb.synced").touch()
    try:
        assert dashboard.runs_to_sync(sweep_dir) == []
        synced_at = files[0].with_suffix(".wandb.synced").stat().st_mtime
        os.utime(files[0], (synced_at + 60,) * 2)  # the run logged more after it was synced
        assert dashboard.runs_to_sync(sweep_dir) == [files[0]]
    finally:
        for f in files:
            f.with_suffix(".wandb.synced").unlink()


def run_script_module(args):
    return run_script("-m", ["vitlab.tools.dashboard", *args], None, timeout=120)


def test_saving_again_updates_the_same_view(sweep_dir, tmp_path, monkeypatch):
    """The network calls replaced by recorders (wandb-workspaces' two request functions: the only
    place to intercept them): the first save creates a view and the sweep directory keeps its URL;
    the second loads that view (public ``Workspace.from_url``) and updates it in place; what was sent
    reads back as the --dry-run spec."""
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    sent, ids = [], {}

    def from_name(cls, entity, project, name):
        view = next(v for v in reversed(sent) if v.name == name)
        return view.model_copy(update={"id": ids[name]})

    def upsert(view):
        view = view.model_copy(update={"name": view.name or f"nw-{len(sent)}-v"})
        sent.append(view)
        ids.setdefault(view.name, f"view-id-{len(ids) + 1}")
        return {"upsertView": {"view": {"name": view.name, "id": ids[view.name]}}}

    monkeypatch.setattr(internal.View, "from_name", classmethod(from_name))
    monkeypatch.setattr(internal, "upsert_view2", upsert)
    # the app's address comes from a logged-in wandb.Api(): a fixed one here (view "nw-x-v" -> "?nw=x")
    monkeypatch.setattr(ws.Workspace, "url", property(
        lambda self: f"https://wandb.test/{self.entity}/{self.project}?nw={self._internal_name[3:-2]}"))
    url_file = sweep_dir / dashboard.URL_FILE
    try:
        for _ in range(2):
            dashboard.main([str(sweep_dir), "--entity", "me"])
        url = url_file.read_text().strip()
    finally:
        url_file.unlink(missing_ok=True)
    first, second = sent
    assert first.id == "" and second.id == "view-id-1" and first.name == second.name and len(ids) == 1
    assert url.startswith("https://wandb.test/me/vitlab?nw=") and f"nw-{url.split('nw=')[1]}-v" == first.name
    dry = dashboard.workspace_spec(dashboard.build_workspace(dashboard.load_sweep(str(sweep_dir), entity="me")))
    back = dashboard.workspace_spec(ws.Workspace.from_url(url))  # the view as W&B would hold it, read back
    def outline(spec):  # panel kinds, titles and texts (the read-back spells metric names as objects)
        return [(p["kind"], p.get("title"), p.get("markdown")) for p in panels_of(spec)]

    assert outline(back) == outline(dry) and back["runset_settings"]["groupby"] == dry["runset_settings"]["groupby"]
    assert back["name"] == dry["name"] == f"vitlab {sweep_dir.name}"


def test_the_dashboard_uses_public_wandb_workspaces_api_only():
    """vitlab.tools.dashboard touches no private name of wandb-workspaces (the tests intercept its requests)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(dashboard))
    private = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                      and not n.attr.startswith("__")})
    assert private == [], private
    assert "wandb_internal_pb2" not in inspect.getsource(dashboard)


def test_a_wandb_group_source_merges_attempts(sweep_dir, monkeypatch):
    """The W&B-group path (compare.load_wandb_runs) with wandb.Api replaced by the runs as W&B holds
    them (summary, config as run_metadata logs it), one job logged twice (a requeued attempt from
    before the W&B run id was kept across attempts)."""
    import wandb
    import yaml

    def api_run(summary, config, url, **changes):
        logged = {**{k: summary[k] for k in ("overrides", "seed", "backbone")}, "config": config}
        return SimpleNamespace(summary={**summary, "train/loss": 2.3, "_step": 2, **changes}, config=logged, url=url,
                               id=url.rsplit("/", 1)[1])

    configs = [yaml.safe_load(p.read_text()) for p in sorted(sweep_dir.glob("*/.hydra/config.yaml"))]
    api_runs = [api_run(s, c, f"https://wandb.test/run{i}") for i, (s, c) in enumerate(zip(summaries(sweep_dir), configs))]
    api_runs.append(api_run(summaries(sweep_dir)[0], configs[0], "https://wandb.test/attempt-1", global_step=1))
    asked = []

    class Api:
        def runs(self, path, filters):
            asked.append((path, filters))
            return api_runs

    monkeypatch.setattr(wandb, "Api", Api)
    sweep = dashboard.load_sweep("pale_size-2026", project="vitlab", entity="me")
    assert asked == [("me/vitlab", {"group": "pale_size-2026"})] and sweep.group == "pale_size-2026"
    assert len(sweep.runs) == 4 and "https://wandb.test/attempt-1" not in {r["run_dir"] for r in sweep.runs}
    assert sweep.fields == ["backbone.mlp_ratios"] and sweep.seeded and sweep.monitor == "val/top1"
    assert "train/loss" in sweep.curves and "_step" not in sweep.runs[0]
    assert [r["n"] for r in dashboard.results_table(sweep)] == [2, 2]
    with pytest.raises(ValueError, match="--project"):
        dashboard.load_sweep("pale_size-2026")


def test_config_keys_follow_what_run_metadata_logs(sweep_dir):
    config = logged(sweep_dir)[0]["config"]
    # backbone fields and config-group choices at the top level, the whole run config under `config`
    assert dashboard.config_key("backbone.mlp_ratios") in config and dashboard.config_key("+debug") in config
    assert dashboard.config_key("schedule.optimizer.lr") == "config.schedule.optimizer.lr"
    assert config["config"]["schedule"]["optimizer"]["lr"] == 2.0e-3  # experiment=demo's value
