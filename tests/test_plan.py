"""vitlab.tools.plan: the jobs of a sweep as Hydra's multirun makes them, their FLOPs, steps and GPU-hours."""
from __future__ import annotations

import json
import math
import textwrap

import pytest

from support import REPO, run_script
from vitlab.tools import plan

PALE_TABLE7_GFLOPS = {1: 3.8, 3: 4.1, 5: 4.4, 7: 4.2, 9: 5.4}  # the paper's ImageNet FLOPs per pale size


def hydra_multirun_jobs(tmp_path, overrides: list[str]) -> list[list[str]]:
    """The overrides of every job that Hydra's own -m launches (a task function that only records them)."""
    script = tmp_path / "record.py"
    script.write_text(textwrap.dedent(f"""
        import json, hydra
        from hydra.core.hydra_config import HydraConfig

        @hydra.main(version_base="1.3", config_path={str(REPO / "conf")!r}, config_name="train")
        def record(cfg):
            with open({str(tmp_path / "jobs.jsonl")!r}, "a") as f:
                f.write(json.dumps(list(HydraConfig.get().overrides.task)) + "\\n")

        record()
    """))
    run_script(str(script), ["-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/job_logging=disabled",
                             "hydra/hydra_logging=disabled"], None)  # str(script): absolute, REPO/src is not joined
    return [json.loads(line) for line in (tmp_path / "jobs.jsonl").read_text().splitlines()]


def test_sweep_preset_with_seeds_expands_like_hydra_multirun(tmp_path, capsys):
    overrides = ["+sweep=pale_size", "seed=0,1", "task=imagenet_cls", "trainer=ddp"]
    jobs = plan.main(["-m", *overrides, "--tflops", "30"])
    assert [j.overrides for j in jobs] == hydra_multirun_jobs(tmp_path, overrides)
    assert len(jobs) == 10 and {j.backbone for j in jobs} == {"pale_t"}
    steps = 300 * math.ceil(1_281_167 / (128 * 8))  # 300 epochs of ImageNet at 8 GPUs x 128
    for job in jobs:
        size = int(next(o for o in job.overrides if o.startswith("backbone.pale_size=")).split("=")[1])
        assert job.backbone_overrides == ([] if size == 7 else [f"pale_size={size}"])  # 7: pale_t as named
        assert job.gflops == pytest.approx(PALE_TABLE7_GFLOPS[size], rel=0.03)
        assert job.params_m == pytest.approx(22, rel=0.03)
        assert job.gpus == 8 and job.steps == steps
        images = steps * 128 * 8
        assert job.gpu_hours == pytest.approx(images * 6 * job.gflops * 1e9 / 30e12 / 3600)
        assert job.wall_hours == pytest.approx(job.gpu_hours / 8)
    printed = capsys.readouterr().out
    assert "total:" in printed and "nothing was launched" in printed


def test_iteration_schedules_generated_data_and_smoke_caps(capsys):
    ade = plan.main(["task=ade20k_fpn", "backbone=pvt_v2_b0", "schedule=40k,80k", "--gpu", "H100"])
    assert [j.steps for j in ade] == [40_000, 80_000]
    assert ade[0].input_size == [512, 512] and ade[0].train_images == 20_210
    assert ade[0].images_per_s == pytest.approx(plan.GPU_TFLOPS["H100"] * 1e3 / (6 * ade[0].gflops))

    demo = plan.main(["experiment=demo", "--measure"])[0]  # 10 generated classes x 80 images, batch 32, 12 epochs
    assert demo.train_images == 800 and demo.steps == 12 * 25 and demo.input_size == [64, 64]
    assert 0 < demo.images_per_s < math.inf

    capsys.readouterr()
    smoke = plan.main(["experiment=demo", "debug=smoke", "--json"])[0]
    assert smoke.steps == 2  # debug=smoke: max_steps 2
    assert json.loads(capsys.readouterr().out)[0]["steps"] == 2


def test_optuna_search_is_planned_as_its_trials():
    jobs = plan.main(["hparams_search=demo_optuna", "hydra.sweeper.n_trials=3"])
    assert len(jobs) == 3 and all(j.backbone == "pvt_v2_b0" and j.steps == 300 for j in jobs)
