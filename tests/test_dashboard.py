"""W&B dashboards as code, offline: the workspace spec of a smoke sweep, the paper join, sync."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest

from support import SWEEP_RATIOS as RATIOS
from vitlab.tools import compare, dashboard, paper


@pytest.fixture
def sweep_dir(smoke_sweep):
    """conftest's smoke sweep: backbone.mlp_ratios (two values) x two seeds, logged to W&B offline."""
    return smoke_sweep


def summaries(sweep_dir):
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]


def logged(sweep_dir):
    """Config keys and summary keys each offline W&B run really holds."""
    return [dashboard.wandb_run_info(p) for p in sorted(sweep_dir.glob("*/wandb/offline-run-*/run-*.wandb"))]


def test_dry_run_spec_holds_every_varied_field_and_metric(sweep_dir, tmp_path):
    out = tmp_path / "spec.json"
    spec = dashboard.main([str(sweep_dir), "--dry-run", str(out)])
    assert json.loads(out.read_text()) == spec
    text = out.read_text()
    section = spec["spec"]["section"]
    runset = section["runSets"][0]
    # the sweep's runs only (vitlab names a -m sweep's W&B group after its directory), grouped by setting:
    # the varied backbone field, not the seed, so seeds (and requeued attempts) aggregate
    assert spec["project"] == "vitlab" and spec["displayName"] == f"vitlab {sweep_dir.name}"
    assert runset["filters"]["filters"][0]["value"] == sweep_dir.name
    assert runset["grouping"] == [{"section": "config", "name": "mlp_ratios.value"}]
    panels = [p for s in section["panelBankConfig"]["sections"] for p in s["panels"]]
    kinds = {p["viewType"] for p in panels}
    assert {"Markdown Panel", "Scatter Plot", "Parallel Coordinates Plot", "Run History Line Plot", "Bar Chart"} <= kinds
    assert ("summary:gflops", "summary:best_score") in [(p["config"]["xAxis"], p["config"]["yAxis"])
                                                        for p in panels if p["viewType"] == "Scatter Plot"]
    parallel = next(p for p in panels if p["viewType"] == "Parallel Coordinates Plot")
    assert "config:mlp_ratios.value" in [c["accessor"] for c in parallel["config"]["columns"]]
    curves = {m for p in panels if p["viewType"] == "Run History Line Plot" for m in p["config"]["metrics"]}
    runs = logged(sweep_dir)
    assert len(runs) == 4
    val_metrics = {k for s in summaries(sweep_dir) for k in s if k.startswith("val/")}
    assert val_metrics and val_metrics <= curves and {"train/loss"} <= curves
    assert all(f"summary:{m}" in runset["runFeed"]["columnOrder"] for m in val_metrics | {"params", "gflops"})
    # every key the workspace reads exists in what the runs logged to W&B
    for run in runs:
        assert run["config"]["mlp_ratios"] in ([4, 4, 4, 4], [2, 2, 2, 2]) and run["config"]["debug"] == "smoke"
        assert {"params", "gflops", "best_score"} | val_metrics <= run["summary"]
        assert curves <= run["history"]
    assert all(r in text for r in RATIOS)


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
    markdown = next(p["config"]["value"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"]
                    for p in s["panels"] if p["viewType"] == "Markdown Panel")
    assert "paper_top1" in markdown and "Toy Table 3 (ratio 8)" in markdown and "toy:Table3" in markdown


def test_same_group_same_workspace_name(sweep_dir):
    sweep = dashboard.load_sweep(str(sweep_dir))
    names = {dashboard.build_workspace(sweep)._internal_name for _ in range(2)}
    other = dashboard.view_name(None, "vitlab", "another-group")
    assert len(names) == 1 and other not in names and other.startswith("nw-") and other.endswith("-v")


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
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "vitlab.tools.dashboard", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=True)


def test_saving_sends_the_dry_run_spec_and_updates_the_same_view(sweep_dir, tmp_path, monkeypatch):
    """The network calls replaced by recorders: saving sends what --dry-run writes; a second save updates."""
    from wandb_workspaces.workspaces import interface, internal

    sent, existing = [], {}

    def from_name(cls, entity, project, name):
        if name not in existing:
            raise ValueError(f"Workspace `{name}` not found in project `{project}`")
        return sent[-1].model_copy(update={"id": existing[name]})

    def upsert(view):
        sent.append(view)
        existing.setdefault(view.name, "view-id-1")
        return {"upsertView": {"view": {"name": view.name, "id": existing[view.name]}}}

    monkeypatch.setattr(internal.View, "from_name", classmethod(from_name))
    monkeypatch.setattr(internal, "upsert_view2", upsert)
    monkeypatch.setattr(interface.Workspace, "url", property(lambda self: f"https://wandb.test/{self._internal_name}"))
    sweep = dashboard.load_sweep(str(sweep_dir))
    sweep.entity = "me"
    for _ in range(2):
        dashboard.save_workspace(dashboard.build_workspace(sweep))
    dry = dashboard.workspace_spec(dashboard.build_workspace(sweep))
    first, second = (v.model_dump(mode="json", by_alias=True, exclude_none=True) for v in sent)
    assert first["id"] == "" and second["id"] == "view-id-1" and first["name"] == second["name"] == dry["name"]
    assert without_ids(first["spec"]) == without_ids(second["spec"]) == without_ids(dry["spec"])


def without_ids(obj):
    """A spec without its panels' random ``__id__``s (fresh per build)."""
    if isinstance(obj, dict):
        return {k: without_ids(v) for k, v in obj.items() if k != "__id__"}
    return [without_ids(v) for v in obj] if isinstance(obj, list) else obj


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
