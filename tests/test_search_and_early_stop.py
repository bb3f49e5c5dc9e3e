"""hparams_search=demo_optuna (hydra-optuna-sweeper) and callbacks=early_stop, end to end on generated data."""
from __future__ import annotations

import json

import pytest
import yaml

from support import TINY_PVT, run_script

# The tiny PVTv2 without its drop_path_rate: the search sets that one.
TINY = [o for o in TINY_PVT if not o.startswith("backbone.drop_path_rate")]


def test_two_trial_optuna_search_maximises_best_score(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    run_script("train.py", ["-m", "hparams_search=demo_optuna", "hydra.sweeper.n_trials=2", "debug=smoke",
                            "data.synthetic=true", *TINY, f"hydra.sweep.dir={tmp_path}",
                            f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}"], data_dir)
    trials = [json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in range(2)]
    searched = [dict(o.split("=", 1) for o in t["overrides"] if o.startswith(("schedule.optimizer.", "backbone.drop")))
                for t in trials]
    for params in searched:
        assert 1e-4 <= float(params["schedule.optimizer.lr"]) <= 1e-2
        assert 0 <= float(params["schedule.optimizer.weight_decay"]) <= 0.1
        assert 0 <= float(params["backbone.drop_path_rate"]) <= 0.2
    assert searched[0] != searched[1]
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    best = max(range(2), key=lambda i: trials[i]["best_score"])
    assert results["best_value"] == pytest.approx(trials[best]["best_score"])
    assert {k: pytest.approx(float(v)) for k, v in searched[best].items()} == results["best_params"]
    assert (tmp_path / "study.db").stat().st_size > 0  # the study is kept (it can be continued)


def test_early_stop_ends_the_run_when_the_metric_stalls(tmp_path, train_run):
    """min_delta larger than any accuracy change: the first validation sets the best, the
    second does not improve on it, and patience 1 stops after 2 of the demo's 12 epochs."""
    summary = train_run(tmp_path, *TINY_PVT, "experiment=demo", "data.synthetic_classes=4", "data.img_size=32",
                        "data.batch_size=16", "data.num_workers=0", "trainer.enable_progress_bar=false",
                        "callbacks=early_stop", "callbacks.progress_bar=null",
                        "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=1000")
    steps_per_epoch = 4 * 80 // 16  # 4 generated classes x 80 training images, batch 16
    assert summary["global_step"] == 2 * steps_per_epoch
    assert (tmp_path / "checkpoints" / "best.ckpt").exists()  # the default callbacks are still there
