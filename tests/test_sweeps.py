"""Every ablation preset in conf/sweep expands, as ``-m`` does, into one distinct configuration per
paper-table row, whose model has that row's parameter count; one preset per backbone family runs
end to end with ``-m`` (in this process, as Hydra's basic launcher runs a sweep's jobs)."""
from __future__ import annotations

import json

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from support import REPO, run_script
from vitlab.runtime.flops import count_params
from vitlab.tools import paper, plan
from vitlab.tools.zoo import build_for_count

PRESETS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
SMOKE = ["debug=smoke", "data.synthetic=true", "logger=csv"]
# One preset per backbone family, run for real, on narrow models (a block per stage, or GPViT's layout in
# 4 layers, half or a quarter of the width) where the preset does not vary what is narrowed: the
# full-size models' steps and checkpoints would cost more than the runs' code paths.
RUN_END_TO_END = {
    "pvt": ["+sweep=pvtv2_components", "backbone.depths=[1,1,1,1]", "backbone.embed_dims=[16,32,80,128]"],
    "pale": ["+sweep=pale_pos_embed", "backbone.depths=[1,1,1,1]", "backbone.embed_dims=[32,64,128,256]"],
    "gpvit": ["+sweep=gpvit_propagation", "backbone=gpvit_l1", "backbone.embed_dims=48", "backbone.depths=4",
              "backbone.num_heads=4", "backbone.gp_layers=[1,3]", "backbone.group_tokens=[16,8]"],
    "scalablevit": ["+sweep=scalablevit_lim", "backbone.depths=[1,1,1,1]", "backbone.embed_dims=[32,64,128,256]"],
}


def expected_rows(preset: str) -> int:
    """The product of the preset's sweep lists, read with Hydra's override parser."""
    params = yaml.safe_load((REPO / "conf" / "sweep" / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]
    parser = OverridesParser.create()
    rows = 1
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        rows *= len(list(override.sweep_iterator())) if override.is_sweep_override() else 1
    return rows


def test_every_family_has_a_preset_run_end_to_end():
    assert {p.split("_")[0].removesuffix("v2") for p in PRESETS} == set(RUN_END_TO_END)


@pytest.mark.parametrize("preset", PRESETS)
def test_sweep_preset_expands_to_its_table_rows(preset):
    """``vitlab.tools.plan.expand`` composes every job as Hydra's BasicSweeper and launcher do. Each job's
    resolved backbone config differs from every other job's, reproduces its own paper-table row
    (``vitlab.tools.paper.match_row``) and builds, on the meta device, with that row's parameters."""
    jobs = plan.expand([f"+sweep={preset}"])
    assert len(jobs) == expected_rows(preset) >= 2
    configs = {(j.backbone, tuple(sorted(j.backbone_overrides))) for j in jobs}
    assert len(configs) == len(jobs), "every row must be a different configuration"
    rows = paper.all_rows()
    matched = []
    for job in jobs:
        row = paper.match_row(rows, {"backbone": job.backbone, "task": job.task,
                                     "overrides": [f"backbone.{o}" for o in job.backbone_overrides]})
        assert row is not None, f"{preset}: no paper-table row for {job.backbone} {job.backbone_overrides}"
        matched.append(id(row))
        params = count_params(build_for_count(job.backbone, job.backbone_overrides, None, "classifier"))
        if row.get("official_params"):
            assert params == row["official_params"], (job.overrides, params, row)
        elif row.get("paper_params_m"):
            tol = row.get("params_tol", 0.03) * row["paper_params_m"]
            assert abs(params / 1e6 - row["paper_params_m"]) <= tol, (job.overrides, params, row)
    assert len(set(matched)) == len(jobs), "two jobs reproduce the same table row"


@pytest.mark.parametrize("family", list(RUN_END_TO_END))
def test_sweep_preset_runs_every_row(family, tmp_path, data_dir):
    args = RUN_END_TO_END[family]
    preset = args[0].removeprefix("+sweep=")
    run_script("train.py", ["-m", *args, *SMOKE, f"hydra.sweep.dir={tmp_path}"], data_dir)
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == expected_rows(preset)
    settings = {tuple(sorted(o for o in s["overrides"] if o not in SMOKE)) for s in summaries}
    assert len(settings) == len(summaries), "every row must be a different setting"
    for s in summaries:
        assert s["status"] == "finished" and "val/top1" in s and s["params"] > 0 and s["gflops"] > 0
