"""vitlab.tools.compare and vitlab.tools.paper: seeds aggregated, paired deltas, the paper's rows beside ours.

Most runs are summary.json files written here (what train.py writes), so the numbers are
known and every statistic is checked against numpy/scipy computed independently; one test
reads the real smoke sweep (conftest ``smoke_sweep``) through the command and the notebook.
"""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from support import REPO, SWEEP_RATIOS, SWEEP_SEEDS
from vitlab.tools import compare, paper

stats = pytest.importorskip("scipy.stats")

SIZES = [1, 3, 5, 7, 9]
PAPER_TOP1 = [82.4, 82.9, 83.1, 83.4, 83.3]  # Pale Table 7, ImageNet column


def write_run(run_dir, overrides, metrics, backbone="pale_t", backbone_cfg=None):
    run_dir.mkdir(parents=True)
    summary = {**metrics, "params": 21_716_000, "gflops": 4.2, "backbone": backbone, "task": "imagenet_cls",
               "overrides": overrides}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if backbone_cfg is not None:  # what Hydra stores next to every run
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create({"seed": 0, "backbone": backbone_cfg}), run_dir / ".hydra" / "config.yaml")


def test_seeds_aggregate_with_paired_delta_and_error_bars(tmp_path):
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 3)  # what each seed does to every setting: pairing removes it
    top1 = {size: 80 + 0.3 * i + seed_effect + rng.normal(0, 0.05, 3) for i, size in enumerate(SIZES)}
    for size in SIZES:
        for seed in range(3):
            write_run(tmp_path / f"{size}_{seed}", ["backbone=pale_t", f"backbone.pale_size={size}", f"seed={seed}"],
                      {"val/top1": float(top1[size][seed]), "val/loss": 1.0})
    table = compare.main([str(tmp_path), "--baseline", "backbone.pale_size=7"])

    assert [r["setting"] for r in table] == [f"backbone.pale_size={s}" for s in SIZES]
    for row, size in zip(table, SIZES):
        assert row["n"] == 3 and row["seeds"] == "0 1 2"
        assert row["val/top1"] == pytest.approx(np.mean(top1[size]))
        assert row["val/top1_std"] == pytest.approx(np.std(top1[size], ddof=1))
        diffs = top1[size] - top1[7]
        assert row["delta"] == pytest.approx(diffs.mean())
        if size != 7:
            assert row["paired"] == 3
            assert row["delta_se"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(3))
            t = diffs.mean() / (np.std(diffs, ddof=1) / math.sqrt(3))
            assert row["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    # 0.3 per step with 0.05 noise per run: every row but the baseline and its neighbour 9 (0.3 away) is clearly apart
    flags = {r["setting"]: r["significant"] for r in table}
    assert flags["backbone.pale_size=1"] and flags["backbone.pale_size=3"]
    assert not flags["backbone.pale_size=7"]
    # unpaired, the seed spread (std 1.0) would hide 0.3 points: pairing is what makes 5 vs 7 visible
    assert flags["backbone.pale_size=5"]

    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {"n", "val/top1_std", "delta", "delta_se", "significant"} <= set(rows[0])
    assert len((tmp_path / "compare_runs.csv").read_text().splitlines()) == 16
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_unpaired_delta_uses_both_spreads(tmp_path):
    a, b = [70.0, 72.0], [75.0, 76.0, 77.0]
    for i, v in enumerate(a):
        write_run(tmp_path / f"a{i}", ["backbone.pale_size=3", f"seed={i}"], {"val/top1": v})
    for i, v in enumerate(b):
        write_run(tmp_path / f"b{i}", ["backbone.pale_size=7", f"seed={10 + i}"], {"val/top1": v})
    table = compare.main([str(tmp_path), "--baseline", "1"])
    row = table[0]
    assert row["paired"] == 0
    assert row["delta"] == pytest.approx(71 - 76)
    assert row["delta_se"] == pytest.approx(math.sqrt(np.var(a, ddof=1) / 2 + np.var(b, ddof=1) / 3))
    assert row["p_value"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    with pytest.raises(SystemExit):  # an unknown baseline names the settings there are
        compare.main([str(tmp_path), "--baseline", "backbone.pale_size=11"])


def test_paper_join_deltas_and_ordering(tmp_path, capsys):
    ours = [78.0, 78.6, 78.9, 79.3, 79.1]  # the paper's ordering, 4-4.4 points lower
    for size, top1 in zip(SIZES, ours):
        write_run(tmp_path / "sweep" / str(size), ["backbone=pale_t", f"backbone.pale_size={size}"], {"val/top1": top1})
    table = compare.main([str(tmp_path / "sweep"), "--paper", "pale:Table7"])
    assert [r["paper_top1"] for r in table] == PAPER_TOP1
    assert [r["vs_paper_top1"] for r in table] == pytest.approx([o - p for o, p in zip(ours, PAPER_TOP1)])
    assert table[0]["paper_source"] == "Pale Table 7 (pale size 1111)"
    assert table[0]["paper_gflops"] == 3.8 and table[0]["zoo_gflops"] == pytest.approx(3.8, rel=0.03)
    assert table[0]["zoo_params_m"] == pytest.approx(22, rel=0.03)
    tau = json.loads((tmp_path / "sweep" / "compare.json").read_text())["kendall_tau"]
    assert tau == pytest.approx(stats.kendalltau(ours, PAPER_TOP1).statistic) and tau == pytest.approx(1.0)
    assert "Kendall tau" in capsys.readouterr().out

    reversed_ = tmp_path / "reversed"
    for size, top1 in zip(SIZES, ours[::-1]):
        write_run(reversed_ / str(size), ["backbone=pale_t", f"backbone.pale_size={size}"], {"val/top1": top1})
    compare.main([str(reversed_), "--paper", "pale:7"])
    assert json.loads((reversed_ / "compare.json").read_text())["kendall_tau"] < -0.5


def test_ablation_presets_match_paper_rows_through_the_stored_config(tmp_path):
    """A row set by a named preset (+ablation=...) is matched by its resolved backbone fields."""
    from vitlab.api import backbone_config

    for preset, field_overrides in (("scalablevit_ssa_rc1", ["block_pattern=ssa", "c_ratios=[1.0,1.0,1.0,1.0]"]),
                                    ("scalablevit_wsa", ["block_pattern=wsa"])):
        cfg = OmegaConf.to_container(backbone_config("scalablevit_s", field_overrides))
        write_run(tmp_path / preset, ["backbone=scalablevit_s", f"+ablation={preset}"], {"val/top1": 80.0},
                  backbone="scalablevit_s", backbone_cfg=cfg)
    runs = compare.load_local_runs([tmp_path])
    rows = paper.table_rows("scalablevit:Table5a")
    assert [paper.match_row(rows, r)["source"] for r in runs] == [
        "ScalableViT Table 5a (SSA, r_c = 1)", "ScalableViT Table 5a (WSA)"]


def test_table_keys_and_bad_key():
    assert {r["source"] for r in paper.table_rows("Pale:Table 1")} == {"Pale Table 1/2"}
    assert paper.table_rows("Pale:table 7") == paper.table_rows("pale:7") == paper.table_rows("pale:Table7")
    assert len(paper.table_rows("gpvit:Table7")) > len(paper.table_rows("gpvit:Table9"))
    assert "pvtv2:Table6" in paper.available_tables() and "scalablevit:Table5a" in paper.available_tables()
    with pytest.raises(ValueError, match="pale:Table7"):  # the error lists the keys there are
        paper.table_rows("pale:Table99")
    with pytest.raises(ValueError, match="PAPER:TABLE"):
        paper.table_rows("pale")


def test_runs_match_rows_of_the_shipped_tables():
    # Pale Table 7 (pale size, ImageNet rows): the paper's GFLOPs 3.8 / 4.1 / 4.4 / 4.2 / 5.4
    rows = [r for r in paper.table_rows("pale:Table7") if r["task"] is None]
    assert [paper.paper_values(r)["paper_gflops"] for r in rows] == [3.8, 4.1, 4.4, 4.2, 5.4]

    def run(*overrides, task="imagenet_cls"):  # what a run's summary.json says, no stored config: composed
        return {"backbone": "pale_t", "task": task, "overrides": ["backbone=pale_t", *overrides]}

    assert paper.match_row(rows, run("backbone.pale_size=9"))["source"] == "Pale Table 7 (pale size 9999)"
    assert paper.match_row(rows, run())["source"] == "Pale Table 7 (pale size 7777)"  # pale_t as named
    assert paper.match_row(rows, run("backbone.pale_size=[9,9,9,9]")) is None
    assert paper.match_row(rows, run("backbone.pale_size=9", task="ade20k_upernet")) is None
    dense = paper.match_row(paper.table_rows("pale:Table7"), run("backbone.pale_size=9", task="ade20k_upernet"))
    assert dense["source"] == "Pale Table 7 (pale size 9999, ADE20K)" and dense["paper_miou"] == 50.6
    # GPViT Table 3 rows carry the official box head (module.head.*): runs match on backbone fields only
    gpvit = paper.match_row(paper.table_rows("gpvit:Table3"), {"backbone": "gpvit_l2_adapter", "task": "coco_maskrcnn",
                                                               "overrides": ["backbone=gpvit_l2_adapter"]})
    assert gpvit["paper_gflops"] == 690 and "module.head.box_head=4conv1fc" in gpvit["set"]


def test_kendall_tau_without_scipy_matches_scipy(monkeypatch):
    x, y = [1, 2, 2, 3, 5, 4], [2.0, 1.0, 3.0, 3.0, 6.0, 5.0]  # ties on both sides: tau-b
    expected = stats.kendalltau(x, y).statistic
    monkeypatch.setitem(__import__("sys").modules, "scipy.stats", None)
    assert paper.kendall_tau(x, y) == pytest.approx(expected)


def test_smoke_sweep_table_csv_plot_and_notebook(smoke_sweep, tmp_path):
    """The command on a real sweep (two settings x two seeds), then the notebook on the same sweep."""
    table = compare.main([str(smoke_sweep), "--out", str(tmp_path)])
    summaries = [json.loads(p.read_text()) for p in sorted(smoke_sweep.glob("*/summary.json"))]
    assert [r["setting"] for r in table] == [f"backbone.mlp_ratios={r}" for r in SWEEP_RATIOS]
    assert [r["backbone.mlp_ratios"] for r in table] == SWEEP_RATIOS
    for row in table:
        mine = [s for s in summaries if row["setting"] in s["overrides"]]
        assert row["n"] == 2 and row["seeds"] == " ".join(map(str, SWEEP_SEEDS))
        assert row["val/top1"] == pytest.approx(np.mean([s["val/top1"] for s in mine]))
        assert row["best_score_std"] == pytest.approx(np.std([s["best_score"] for s in mine], ddof=1))
    assert table[0]["params_m"] > table[1]["params_m"] and table[0]["gflops"] > table[1]["gflops"]  # MLP ratio 4 > 2
    lines = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("setting,backbone.mlp_ratios,backbone,params_m,gflops,n,seeds")
    assert (tmp_path / "compare.png").stat().st_size > 10_000

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks" / "compare_runs.ipynb", as_version=4)
    os.environ["VITLAB_SWEEP_DIR"] = str(smoke_sweep)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["VITLAB_SWEEP_DIR"]
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "4 runs from" in printed and "in 2 settings" in printed
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_paper_ready_tables_render_as_expected(tmp_path, capsys):
    """Two settings x two seeds: mean ± sample std (78.0/78.4 -> 78.2 ± 0.3), the best mean bold per
    metric, Pale Table 7's top-1 (83.1, 83.4) and ours minus it; expected text written out by hand."""
    runs = {5: ([78.0, 78.4], [94.0, 94.2]), 7: ([79.0, 79.6], [94.5, 94.3])}
    for size, (top1, top5) in runs.items():
        for seed in range(2):
            write_run(tmp_path / f"{size}_{seed}", ["backbone=pale_t", f"backbone.pale_size={size}", f"seed={seed}"],
                      {"val/top1": top1[seed], "val/top5": top5[seed], "val/loss": 1.0})
    compare.main([str(tmp_path), "--paper", "pale:Table7", "--format", "latex"])
    latex = r"""\begin{tabular}{lrrrrrrr}
\toprule
Setting & Params (M) & GFLOPs & $n$ & top1 & top1 (paper) & $\Delta$ & top5 \\
\midrule
pale\_size=5 & 21.7 & 4.2 & 2 & 78.2 $\pm$ 0.3 & 83.1 & -4.9 & 94.1 $\pm$ 0.1 \\
pale\_size=7 & 21.7 & 4.2 & 2 & \textbf{79.3 $\pm$ 0.4} & 83.4 & -4.1 & \textbf{94.4 $\pm$ 0.1} \\
\bottomrule
\end{tabular}
"""
    assert (tmp_path / "compare.tex").read_text() == latex and latex in capsys.readouterr().out

    compare.main([str(tmp_path), "--format", "markdown", "--digits", "2"])  # no paper: no paper columns
    assert (tmp_path / "compare.md").read_text() == """\
| Setting | Params (M) | GFLOPs | n | top1 | top5 |
| --- | ---: | ---: | ---: | ---: | ---: |
| pale_size=5 | 21.72 | 4.20 | 2 | 78.20 ± 0.28 | 94.10 ± 0.14 |
| pale_size=7 | 21.72 | 4.20 | 2 | **79.30 ± 0.42** | **94.40 ± 0.14** |
"""
