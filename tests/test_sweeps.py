"""Every ablation preset in conf/sweep runs end to end with -m (one result per table row)."""
from __future__ import annotations

import json

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from support import REPO, run_script

PRESETS = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
SMOKE = ["debug=smoke", "data.synthetic=true", "logger=csv"]


def expected_rows(preset: str) -> int:
    params = yaml.safe_load((REPO / "conf" / "sweep" / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]
    parser = OverridesParser.create()
    rows = 1
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        rows *= len(list(override.sweep_iterator())) if override.is_sweep_override() else 1
    return rows


@pytest.mark.parametrize("preset", PRESETS)
def test_sweep_preset_runs_every_row(preset, tmp_path, data_dir):
    run_script("train.py", ["-m", f"+sweep={preset}", *SMOKE, f"hydra.sweep.dir={tmp_path}"], data_dir, timeout=900)
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/summary.json"))]
    assert len(summaries) == expected_rows(preset) >= 2
    settings = {tuple(sorted(o for o in s["overrides"] if not o.startswith(tuple(SMOKE)))) for s in summaries}
    assert len(settings) == len(summaries), "every row must be a different setting"
    for s in summaries:
        assert "val/top1" in s and s["params"] > 0 and s["gflops"] > 0
