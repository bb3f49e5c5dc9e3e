"""``python -m vitlab.tools.bench`` on tiny inputs (seconds): every flag runs and the table holds what it
says. Timings themselves are not asserted (a benchmark is a command that prints a table)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import _registry

from vitlab.data.throughput import format_loader_table, loader_bench
from vitlab.tools import bench

TINY = ["depths=[1,1,1,1]", "embed_dims=[16,32,48,64]", "num_heads=[1,1,2,2]"]
FAST = dict(steps=1, warmup=0, rounds=2)

# An authors'-style model file: registers its factory with timm under a name timm already has.
REFERENCE = '''
import json
from pathlib import Path

from timm.models.registry import register_model
from torch import nn


@register_model
def pvt_v2_b0(pretrained=False, **kwargs):
    Path(__file__).with_suffix(".json").write_text(json.dumps(kwargs))
    return nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))
'''


def test_classifier_against_timm_and_a_reference_file_under_bf16(tmp_path, capsys):
    ref = tmp_path / "authors.py"
    ref.write_text(REFERENCE)
    timm_entry = _registry._model_entrypoints["pvt_v2_b0"]
    (ours, twin, other), = bench.bench(["pvt_v2_b0"], batch=2, input_size=(32, 32), compare_timm=True,
                                        precision="bf16-mixed", references=[f"{ref}:pvt_v2_b0"], **FAST)
    assert [r.kind for r in (ours, twin, other)] == ["ours", "timm", "ref"]
    assert _registry._model_entrypoints["pvt_v2_b0"] is timm_entry  # the file did not replace timm's model
    assert (tmp_path / "authors.json").read_text() == '{"drop_path_rate": 0.1}'  # ours, from conf/backbone
    # timm's PVTv2-B0 is the same network: same parameters and FLOPs, counted independently of our code
    assert ours.params_m == pytest.approx(twin.params_m) == pytest.approx(3.666760)
    assert ours.gflops_per_image == pytest.approx(twin.gflops_per_image, rel=1e-3)
    for r in (ours, twin, other):
        assert len(r.rounds["train"]) == len(r.rounds["infer"]) == 2 and r.train_ips > 0 and r.infer_ips > 0
        assert r.gflops_rate("train") == pytest.approx(3 * r.train_ips * r.gflops_per_image)
    text = bench.format_table([[ours, twin, other]], "cpu", peak=100.0)
    assert "  ours / timm" in text and "  ours / ref" in text and "ref:pvt_v2_b0" in text
    line = next(row for row in text.splitlines() if row.startswith("pvt_v2_b0 "))
    assert f"{100 * ours.gflops_rate('infer') / 100.0:.1f}" in line.split()[-1]  # %peak of the measured peak


@pytest.mark.parametrize("task", list(bench.TASKS))
def test_dense_task_training_steps_with_and_without_checkpointing(task, monkeypatch):
    # a detector's FLOPs need a real evaluation forward (100 random detections through the mask
    # head: slow here); the dense-task counts are the zoo's, tested there
    counted = []
    monkeypatch.setattr(bench, "count_gmacs", lambda model, size: counted.append(size) or 1.0)
    (ours, ckpt), = bench.bench(["pvt_v2_b0"], batch=2, input_size=(64, 64), task=task, grad_checkpointing=True,
                                phases=("train",), overrides=TINY, steps=1, warmup=0, rounds=1)
    assert ckpt.kind == "checkpointed" and ckpt.params_m == ours.params_m
    assert counted == [(64, 64)] and ours.gflops_per_image == ckpt.gflops_per_image == 2.0  # counted once
    for r in (ours, ckpt):
        assert r.train_ips > 0 and math.isfinite(r.train_mem_mb) and r.gflops_per_image > 0
        assert math.isnan(r.infer_ips)  # phase not run


def test_compile_row_and_its_gain_line():
    table = bench.bench(["pvt_v2_b0"], batch=2, input_size=(32, 32), compile_backend="eager", overrides=TINY, **FAST)
    assert [r.kind for r in table[0]] == ["ours", "compiled"]
    assert all(r.train_ips > 0 and r.infer_ips > 0 for r in table[0])
    assert "  compiled / ours" in bench.format_table(table, "cpu")


def test_matmul_peak_is_a_rate():
    assert bench.matmul_peak(torch.device("cpu"), torch.bfloat16, size=128) > 0


@pytest.mark.parametrize("argv, message", [
    (["pvt_v2_b0", "--precision", "16-mixed", "--device", "cpu"], "no fast fp16 matmul"),
    (["pvt_v2_b0", "--reference", "missing.py:f", "--batch", "1", "--input", "32", "32"], "missing.py is not a file"),
    (["pvt_v2_b0", "pvt_v2_b1", "--reference", "a.py:f"], "one per name"),
    (["pvt_v2_b0", "--task", "upernet", "--batch", "1"], "module.head.norm=GN"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert message in capsys.readouterr().err + str(err.value.code)


def test_reference_without_the_function_lists_what_the_file_has(tmp_path):
    ref = tmp_path / "authors.py"
    ref.write_text(REFERENCE)
    with pytest.raises(SystemExit, match="has no function 'pvt_v2_b9'; it defines: pvt_v2_b0"):
        bench.load_reference(f"{ref}:pvt_v2_b9")


@pytest.mark.parametrize("kind, size", [("imagenet", (96, 72)), ("coco", (96, 72)), ("ade20k", (96, 72))])
def test_loader_bench_on_generated_data_in_the_real_formats(kind, size, tmp_path):
    rows = loader_bench(kind, images=4, rounds=2, fast_decode=kind == "imagenet", data_dir=str(tmp_path), size=size)
    names = [r.name for r in rows]
    assert names == (["default", "fast_decode", "fast_decode: device part"] if kind == "imagenet" else ["default"])
    assert all(len(r.rounds) == 2 and r.images_per_s > 0 for r in rows)
    assert (tmp_path / "bench" / f"{kind}_{size[0]}x{size[1]}_4" / ".complete").exists()
    assert format_loader_table(rows).splitlines()[2].startswith("default")


def test_timm_is_untouched_after_a_reference_run(tmp_path):
    ref = tmp_path / "authors.py"
    ref.write_text(REFERENCE)
    bench.load_reference(f"{ref}:pvt_v2_b0")
    assert type(timm.create_model("pvt_v2_b0", num_classes=3)).__module__.startswith("timm.")
