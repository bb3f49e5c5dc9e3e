"""``python -m vitlab.tools.bench`` on tiny inputs (seconds): every flag runs and the table holds what it
says. Timings themselves are not asserted (a benchmark is a command that prints a table)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import timm
import torch
from timm.models import _registry

from vitlab.data.throughput import format_loader_table, loader_bench
from vitlab.tools import bench
from vitlab.tools.bench import models as bench_models
from vitlab.tools.bench import suite as bench_suite

TINY = ["depths=[1,1,1,1]", "embed_dims=[16,32,48,64]", "num_heads=[1,1,2,2]"]
# narrow heads: Mask R-CNN's own (256-channel mask convs on up to 128 sampled positives an image) was most of
# its two steps' 15 s; what the test checks (the phases, the checkpointed copy, the counts) is the same
TINY_HEADS = {"maskrcnn": ["module.head.fpn_channels=16", "module.head.box_batch_size_per_image=32"],
              "retinanet": ["module.head.fpn_channels=16"], "fpn": [], "upernet": []}
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
    monkeypatch.setattr(bench_models, "count_gmacs", lambda model, size: counted.append(size) or 1.0)
    (ours, ckpt), = bench.bench(["pvt_v2_b0"], batch=2, input_size=(64, 64), task=task, grad_checkpointing=True,
                                phases=("train",), overrides=TINY + TINY_HEADS[task], steps=1, warmup=0, rounds=1)
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
def test_loader_bench_on_generated_data_in_the_real_formats(kind, size, tmp_path, monkeypatch):
    """Per core: timed on one torch thread as in a worker (the H200 host's 16 threads spun: 12 img/s),
    the process's thread count given back afterwards."""
    from vitlab.data import throughput

    timed_on, time_samples = [], throughput._time_samples
    monkeypatch.setattr(throughput, "_time_samples", lambda *a: timed_on.append(torch.get_num_threads()) or
                        time_samples(*a))
    torch.set_num_threads(2)
    rows = loader_bench(kind, images=4, rounds=2, fast_decode=kind == "imagenet", data_dir=str(tmp_path), size=size)
    assert set(timed_on) == {1} and torch.get_num_threads() == 2
    names = [r.name for r in rows]
    assert names == (["default", "fast_decode", "default: device part", "fast_decode: device part"]
                     if kind == "imagenet" else ["default"])
    assert all(len(r.rounds) == 2 and r.images_per_s > 0 for r in rows)
    assert (tmp_path / "bench" / f"{kind}_{size[0]}x{size[1]}_4" / ".complete").exists()
    assert format_loader_table(rows).splitlines()[2].startswith("default")


@pytest.mark.parametrize("kind", ["coco", "ade20k"])
def test_pack_bench_projects_the_real_split_from_two_packs(kind, tmp_path, capsys, monkeypatch):
    """--pack: the pack command on the dataset and on 4 images (its start-up); the cost per image is
    the difference, and the real training split follows. (The command itself, as a user runs it in a
    process of its own, is the README's --pack command in tests/test_readme.py.)"""
    from vitlab.data import throughput

    runs = []

    def timed(kind_, folder, out, workers):  # 2 s to start, 10 ms a wall image, 15 CPU ms an image
        n = len([f for f in folder.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg")
                 and f.parent.name in ("train2017", "training")])
        runs.append((kind_, n, workers))
        shutil.rmtree(out, ignore_errors=True)  # as the pack command's run: a new output
        out.mkdir(parents=True), (out / "chunk.bin").write_bytes(b"x" * 1000)
        return 2.0 + 0.010 * n, 3.0 + 0.015 * n

    monkeypatch.setattr(throughput, "_timed_pack", timed)
    bench.main(["--pack", kind, "--images", "8", "--workers", "1", "2", "--image-size", "64", "48",
                "--data-dir", str(tmp_path)])
    assert runs == [(kind, 4, 1), (kind, 8, 1), (kind, 4, 2), (kind, 8, 2)]
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(kind + " ")]
    real = {"coco": 118_287, "ade20k": 20_210}[kind]  # the real training splits' files
    for row, workers in zip(rows, (1, 2)):
        assert row[1:9] == [str(workers), "8", "2.1", "3.1", "2.0", "10.00", "15.00", "0.00"]
        assert float(row[9]) == pytest.approx((2.0 + real * 0.010) / 3600, abs=0.005)
    assert not [p for p in (tmp_path / "bench").iterdir() if p.name.endswith("_pack_timing")]  # removed
    with pytest.raises(SystemExit, match="--images > 4"):
        bench.main(["--pack", kind, "--images", "4", "--data-dir", str(tmp_path)])


def test_timm_is_untouched_after_a_reference_run(tmp_path):
    ref = tmp_path / "authors.py"
    ref.write_text(REFERENCE)
    bench.load_reference(f"{ref}:pvt_v2_b0")
    assert type(timm.create_model("pvt_v2_b0", num_classes=3)).__module__.startswith("timm.")


# --------------------------------------------------------------------------- the GPU suite
AUTHORS_PVT_V2_B2 = "import torch\n\ndef pvt_v2_b2(**kwargs):\n    return torch.nn.Linear(2, 2)\n"


def test_gpu_suite_runs_every_item_tiny_on_the_cpu_and_says_so(tmp_path, capsys, monkeypatch):
    """``--suite gpu`` without a GPU: every item of the GPU run, tiny, with its table and JSON, and the
    words that these are not GPU figures. (FLOP counts are tested above and in the zoo's tests.)"""
    monkeypatch.setattr(bench_models, "count_gmacs", lambda model, size: 1.0)
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "pvt_v2.py").write_text(AUTHORS_PVT_V2_B2)
    out = tmp_path / "suite.json"
    bench.main(["--suite", "gpu", "--json", str(out), "--data-dir", str(tmp_path / "data"),
                "--reference-dir", str(tmp_path / "official")])
    text = capsys.readouterr().out
    assert text.startswith("NOT A GPU FIGURE") and "NOT A GPU FIGURE: the figures above" in text
    report = json.loads(out.read_text())
    assert report["gpu_figure"] is False and report["device"] == "cpu" and report["peak_tflops"] is None
    rows = report["rows"]
    items = [name for name, *_ in bench_suite.items(bench_suite.CPU, torch.device("cpu"), tmp_path, None, None)]
    assert sorted({r["item"].split(" ")[0] + " " + r["item"].split(" ")[1] for r in rows}) == sorted(items)
    ours = {r["model"]: r for r in rows if r["kind"] == "ours" and r["item"].startswith("train")}
    assert set(ours) == set(bench_suite.MODELS)
    for r in ours.values():
        assert r["status"] == "ok" and r["images_s"] > 0 and r["tflops"] > 0 and r["mfu_pct"] is None  # no data sheet
        assert r["matmul_pct"] == pytest.approx(100 * r["tflops"] / report["matmul_tflops"])
    by_kind = {(r["kind"], r["model"]): r for r in rows}
    assert by_kind[("timm", "timm:pvt_v2_b2")]["ratio"].startswith("ours/timm ")
    assert by_kind[("authors", "authors:pvt_v2_b2")]["status"] == "found; timed on a GPU only"
    assert by_kind[("authors", "authors:pvt_small")]["status"].startswith("not importable")
    compiled = by_kind[("compiled", "pvt_v2_b2 compiled")]
    assert compiled["ratio"].startswith("compiled/eager ") and compiled["warmup_s"] > 0
    dense = [r for r in rows if r["kind"] == "dense"]
    assert [r["item"].split()[0] for r in dense] == ["maskrcnn", "upernet"]
    assert all(r["status"] == "ok" and r["steps_s"] == pytest.approx(r["images_s"] / 2) for r in dense)
    profiled = [r for r in rows if r["kind"] == "profile"]
    assert profiled[0]["model"] == "per step" and profiled[0]["status"].startswith("wall ")
    assert len(profiled) == 1 + bench_suite.PROFILE_TOP and all("ms/step" in r["status"] for r in profiled[1:])
    busy = [float(r["status"].split("(")[1].split("%")[0]) for r in profiled[1:]]  # % of the busy time
    assert busy == sorted(busy, reverse=True) and 0 < sum(busy) <= 100.5
    packed = next(r for r in rows if r["item"] == "packed imagenet")
    assert packed["status"] == "ok" and packed["images_s"] > 0
    slots = next(r for r in rows if r["item"] == "gpu_decode slots")
    assert slots["status"] == "ok" and "worst mean diff 0.00" in slots["model"], slots  # the same decoder on the CPU
    demo = next(r for r in rows if r["item"] == "lightning demo")
    assert demo["status"].startswith("finished: 2 steps, val/top1 "), demo["status"]  # debug=smoke: 2 steps
    loader = {r["model"]: r for r in rows if r["kind"] == "loader" and r["item"] == "loader imagenet"}
    assert loader["default"]["images_s"] > 0 and loader["fast_decode"]["images_s"] > 0
    assert loader["gpu_decode: device part"]["status"] == "ok" and loader["gpu_decode: device part"]["images_s"] > 0


def test_gpu_decode_slots_item_fails_on_images_unlike_their_bytes(tmp_path, monkeypatch):
    """The suite's slot check compares what the device decoded with the CPU's decode of the bytes: a
    decoder reading bytes the workers already overwrote (here: an image of the wrong bytes) fails it."""
    from vitlab.data import gpu_decode

    real = gpu_decode.DeviceAugment.decode
    monkeypatch.setattr(gpu_decode.DeviceAugment, "decode", lambda self, data, device: real(self, data[::-1], device))
    row, = bench_suite.ring_decode(torch.device("cpu"), str(tmp_path), 32)
    assert row.status.startswith("failed: worst mean difference"), row.status


def test_gpu_suite_keeps_going_past_failures_and_writes_json_after_each_item(tmp_path, monkeypatch, capsys):
    out = tmp_path / "suite.json"
    seen_in_json = []

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def compile_error():
        raise RuntimeError("BackendCompilerFailed: inductor raised\nmore lines")

    def works():
        seen_in_json.append(len(json.loads(out.read_text())["rows"]))  # the two failures already written
        return [bench_suite.Row("good", "m", images_s=1.0)]

    monkeypatch.setattr(bench_suite, "items", lambda *a: [("a", "m1", "ours", oom), ("b", "m2", "compiled", compile_error),
                                                          ("c", "m3", "ours", works)])
    report = bench_suite.run_suite("cpu", str(out))
    assert [r.status for r in report.rows] == [
        "out of memory: CUDA out of memory. Tried to allocate 20.00 GiB",
        "failed: RuntimeError: BackendCompilerFailed: inductor raised", "ok"]
    assert seen_in_json == [2] and len(json.loads(out.read_text())["rows"]) == 3
    assert "out of memory" in capsys.readouterr().out
    skipped = bench_suite.run_suite("cpu", None, budget_s=-1)
    assert [r.status for r in skipped.rows] == ["skipped: past the -1 s budget"] * 3


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("Tesla V100-SXM2-16GB", None)])
def test_bf16_peak_by_device_name(name, peak):
    assert bench_suite.device_peak(name) == peak


def test_suite_rows_give_mfu_against_the_data_sheet_and_the_measured_matmul():
    ours = bench.Result("pvt_v2_b2", 25.4, gflops_per_image=8.0, train_ips=1000.0)
    ours.rounds["train"] = [1000.0, 1000.0]
    twin = bench.Result("timm:pvt_v2_b2", 25.4, kind="timm", gflops_per_image=8.0, train_ips=800.0)
    twin.rounds["train"] = [800.0, 800.0]
    report = bench_suite.Report("NVIDIA H200", True, peak_tflops=989.0, matmul_tflops=600.0)
    row, timm_row = bench_suite._rows_from("train pvt_v2_b2", [ours, twin], report, torch.device("cuda"))
    assert row.tflops == pytest.approx(24.0)  # 1000 images/s x 8 GFLOP x 3 (forward + backward)
    assert row.mfu_pct == pytest.approx(100 * 24.0 / 989.0) and row.matmul_pct == pytest.approx(4.0)
    assert timm_row.ratio == "ours/timm 1.25"


def test_a_failed_packed_read_in_the_gpu_suite_says_which_side_is_wrong(tmp_path, monkeypatch):
    """The suite's diagnosis of a failed packed read: the chunks' hashes against the manifest, then
    the first item the packed reader reads otherwise than LitData's reader."""
    from vitlab.data.pack import main
    from vitlab.data.streaming import PackedImages
    from vitlab.data.synthetic import make_imagenet

    folder = make_imagenet(tmp_path / "folder", num_classes=2, num_train=4, num_val=2, size=32)
    root = tmp_path / "packed"
    main(["imagenet", "--root", str(folder), "--out", str(root), "--shard-size", "8KB", "--workers", "1"])
    assert bench_suite.pack_diagnosis(root) == "every chunk's SHA-256 as packed; all 8 items equal to LitData's " \
                                               "reader's in this process"
    chunk = sorted((root / "train").glob("*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    data[-10] ^= 0xFF  # inside the last item's JPEG: both readers read the changed byte
    chunk.write_bytes(data)
    said = bench_suite.pack_diagnosis(root)
    assert f"{chunk}: shard's SHA-256 differs" in said and said.endswith("all 8 items equal to LitData's reader's in "
                                                                         "this process")
    read = PackedImages.read
    monkeypatch.setattr(PackedImages, "read", lambda self, i: (b"", 0) if i == 3 else read(self, i))
    assert "; item 3 (chunk-0-" in bench_suite.pack_diagnosis(root)
    assert "the packed reader's 0 bytes differ from LitData's" in bench_suite.pack_diagnosis(root)


def test_a_bench_user_error_is_its_message_not_a_traceback(tmp_path):
    """The bench command as a user runs it: a --bucket it cannot read prints the error's message (the
    option, what it takes) and exits with code 2, as the other commands do."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vitlab.tools.bench", "--loader", "imagenet", "--format", "litdata",
                           "--bucket", "gs://data/bench", "--dataset-images", "8", "--images", "4", "--workers", "0",
                           "--image-size", "64", "48", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Error (DatasetLayoutError): --bucket=gs://data/bench: vitlab reads packed datasets from s3://" in proc.stderr
    assert "Traceback" not in proc.stderr
