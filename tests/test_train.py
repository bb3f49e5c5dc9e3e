"""End-to-end runs of src/train.py and src/eval.py on generated data (real Trainer, real Hydra), in this
process (conftest ``train_run`` / ``eval_run``) except the killed run, which needs a process to kill."""
from __future__ import annotations

import json

import pytest
import torch

from support import FAST, TINY_PVT, run_script


def test_smoke_run_writes_summary(tmp_path, train_run):
    summary = train_run(tmp_path, *TINY_PVT, "experiment=demo", "debug=smoke")
    for key in ("val/top1", "val/top5", "best_ckpt", "last_ckpt", "params", "gflops", "overrides"):
        assert key in summary, key
    assert 0 <= summary["val/top1"] <= 100 and summary["val/top5"] >= summary["val/top1"]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "debug=smoke" in summary["overrides"]
    assert summary["backbone"] == "pvt_v2_b0" and summary["task"] == "imagenet_cls"
    assert summary["params"] > 0 and summary["gflops"] > 0
    assert summary["pretrained"] is None  # trained from scratch, and the summary says so


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, train_run, data_dir):
    """Interrupted after epoch 1 and resumed (resume=auto): bit-equal weights to one straight run.

    CPU, num_workers=0: data order (epoch-seeded sampler), augmentation RNG (restored before
    Lightning builds the training iterator), optimiser state and LR schedule all carry over.
    """
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    common = [*FAST, "schedule.epochs=2", "data.synthetic_classes=4"]
    stop = ["+callbacks.stop._target_=vitlab.runtime.callbacks.StopAfter", "+callbacks.stop.epochs=1"]
    killed = run_script("train.py", [*common, *stop, f"hydra.run.dir={resumed}"], data_dir, check=False)
    assert killed.returncode == 75 and not (resumed / "summary.json").exists()
    train_run(straight, *common)
    second = train_run(resumed, *common)  # resume=auto is the default: continues
    assert second["resumed_from"], "the re-run started again instead of resuming"
    assert second["global_step"] == json.loads((straight / "summary.json").read_text())["global_step"]
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_learns_and_eval_rebuilds_from_checkpoint_alone(tmp_path, train_run, eval_run):
    """10 generated classes (chance 10%): one epoch of a tiny PVTv2 already does far better;
    eval.py, given only the checkpoint, rebuilds data and model and gets the same top-1."""
    summary = train_run(tmp_path / "run", *FAST, "schedule.epochs=1")
    assert summary["val/top1"] > 30, summary
    evaluated = eval_run(tmp_path / "eval", summary["last_ckpt"], "trainer.enable_progress_bar=false")
    assert evaluated["val/top1"] == pytest.approx(summary["val/top1"], abs=1e-6)


def test_compiled_run_matches_eager_and_saves_eager_keys(tmp_path, data_dir):
    """module.compile=<backend>: the backbone is compiled in place (dynamo traces graphs), training gives
    the eager run's results, and the checkpoint has the eager model's keys (no ``_orig_mod.``), so it
    serves eval.py and backbone.pretrained= like any other. The eager backend: dynamo's tracing without
    a compiler, what this test is about (AOTAutograd's tracing of every family: test_backbone_runtime;
    inductor is what ``true`` selects)."""
    from torch._dynamo.utils import counters

    from vitlab.runtime.config import compose
    from vitlab.runtime.run import train

    def run(name: str, *overrides: str) -> dict:  # in this process: dynamo's counters are read here
        return train(compose("train", [*FAST, "schedule.epochs=1", "data.synthetic_classes=4", *overrides,
                                       f"paths.output_dir={tmp_path / name}", f"paths.root_dir={tmp_path}",
                                       f"paths.data_dir={data_dir}"]))

    eager = run("eager")
    counters.clear()
    compiled = run("compiled", "module.compile=eager")
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert compiled["val/top1"] == pytest.approx(eager["val/top1"], abs=1e-6)
    a = torch.load(tmp_path / "eager" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
