"""``python -m vitlab.tools.bench --suite gpu`` (``make gpu-check``): the prepared first GPU run.

One command, under 8 minutes on one H200, printing one table and writing JSON (``--json``, rewritten
after every item, so a run cut short keeps what it measured):

* bf16 training (forward, loss, backward) of PVTv2-B2, ScalableViT-S, Pale-T, GPViT-L1 and PVT-S at
  the papers' per-GPU batch (128 at 224): images/s, achieved TFLOP/s, model-FLOPs utilisation (MFU)
  against the GPU's dense bf16 peak (``BF16_PEAK_TFLOPS``, by device name) and against a bf16 matmul
  measured in the same run, peak memory;
* timm's ``pvt_v2_b2``, and the authors' code where ``--reference-dir`` (default ``official/``)
  holds its file (``AUTHORS``; ``--reference``'s mechanism), in the same rounds as ours;
* eager vs ``torch.compile`` for PVTv2-B2 (``COMPILED``), with the compilation's warm-up seconds;
* Mask R-CNN + PVTv2-B2 at 800x1333 and UperNet + Pale-T at 512x512, batch 2: steps/s, memory;
* where PVTv2-B2's training step spends its time (``PROFILED``: torch.profiler, the device's busy share of
  the wall time, kernel launches, the top ops);
* the packed ImageNet reader from a cold page cache through two workers (every image once);
* ``make train``'s demo as a Lightning run on the device (bf16, ``data.gpu_decode``), in its own process;
* ``data.gpu_decode``'s shared batch slots: images decoded on the device from slots the workers refill
  at once, against the CPU's decode of their bytes;
* the ImageNet loader's images/s (one worker per core: decode + augmentation; ``data.fast_decode``),
  and the device's images/s for ``data.gpu_decode``'s part (decode, crop, flip, normalise, erase).

Each item's failure (out of memory, a compile error, an unimportable authors' file) becomes a row
saying so; the suite goes on. On a CPU the same command runs a tiny version of every item (small
inputs, one-block backbones) and says that its figures are not GPU figures.
"""
from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vitlab.tools.bench.measure import matmul_peak
from vitlab.tools.bench.models import load_reference
from vitlab.tools.bench.run import bench, paired_ratio

MODELS = ("pvt_v2_b2", "scalablevit_s", "pale_t", "gpvit_l1", "pvt_small")
COMPILED = ("pvt_v2_b2",)
PROFILED = ("pvt_v2_b2",)  # where a training step's time goes (3-6% MFU on an H200: not matmul-bound)
PROFILE_STEPS, PROFILE_TOP = 3, 12
# The authors' files under --reference-dir (README "Performance": whai362/PVT, Yangr116/ScalableViT,
# ChenhongyiYang/GPViT; Pale has no released code).
AUTHORS = {"pvt_v2_b2": "pvt_v2.py:pvt_v2_b2", "pvt_small": "pvt.py:pvt_small",
           "scalablevit_s": "scalablevit.py:scalable_vit_small", "gpvit_l1": "gpvit.py:gpvit_l1"}
DENSE = (("maskrcnn", "pvt_v2_b2", (800, 1333)), ("upernet", "pale_t", (512, 512)))
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; the first name
# that the device's name contains wins (so the more specific names come first).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0))
# The CPU's tiny version: one block per stage (GPViT: two layers, one group-propagation layer), narrow heads.
TINY = {"pvt_v2_b2": ["depths=[1,1,1,1]"], "pvt_small": ["depths=[1,1,1,1]"], "pale_t": ["depths=[1,1,1,1]"],
        "scalablevit_s": ["depths=[1,1,1,1]"], "gpvit_l1": ["depths=2", "gp_layers=[1]", "group_tokens=[16]"]}
TINY_HEADS = {"maskrcnn": ["module.head.fpn_channels=16", "module.head.box_batch_size_per_image=16",
                           "module.head.rpn_post_nms_top_n_train=64"],
              "upernet": ["module.head.channels=16", "module.auxiliary_head.channels=16"]}


@dataclass
class Scale:
    batch: int
    size: tuple[int, int]
    dense_size: dict[str, tuple[int, int]] | None  # None: the papers' sizes
    steps: int
    warmup: int
    rounds: int
    compile_backend: str
    loader_images: int
    tiny: bool


GPU = Scale(128, (224, 224), None, steps=10, warmup=3, rounds=3, compile_backend="inductor", loader_images=256,
            tiny=False)
CPU = Scale(2, (32, 32), {"maskrcnn": (96, 128), "upernet": (64, 64)}, steps=1, warmup=1, rounds=1,
            compile_backend="eager", loader_images=4, tiny=True)


@dataclass
class Row:
    item: str
    model: str
    kind: str = "ours"  # ours | timm | authors | compiled | dense | loader
    status: str = "ok"
    images_s: float = float("nan")
    steps_s: float = float("nan")
    tflops: float = float("nan")  # achieved, model FLOPs (a training step = 3 forward passes)
    mfu_pct: float = float("nan")  # of the device's bf16 peak (BF16_PEAK_TFLOPS)
    matmul_pct: float = float("nan")  # of the bf16 matmul measured in this run
    peak_mem_gb: float = float("nan")
    warmup_s: float = float("nan")
    ratio: str = ""  # e.g. "ours/timm 1.05"


@dataclass
class Report:
    device: str
    gpu_figure: bool
    torch: str = torch.__version__
    peak_tflops: float | None = None
    matmul_tflops: float = float("nan")
    rows: list[Row] = field(default_factory=list)

    def write(self, path: Path | None) -> None:
        if path is not None:
            path.write_text(json.dumps(asdict(self), indent=1, default=str).replace("NaN", "null") + "\n")


def device_peak(name: str) -> float | None:
    """The dense bf16 peak (TFLOP/s) of a GPU by its name (``torch.cuda.get_device_name``), None if unknown."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key.lower() in name.lower()), None)


def _rows_from(item: str, results: list, report: Report, device: torch.device) -> list[Row]:
    kinds = {"ours": "ours", "timm": "timm", "ref": "authors", "compiled": "compiled"}
    rows = []
    ours = results[0]
    for r in results:
        tflops = r.gflops_rate("train") / 1e3
        row = Row(item, r.name, kinds.get(r.kind, r.kind), images_s=r.train_ips, tflops=tflops,
                  mfu_pct=100 * tflops / report.peak_tflops if report.peak_tflops else float("nan"),
                  matmul_pct=100 * tflops / report.matmul_tflops,
                  peak_mem_gb=r.train_mem_mb / 1024, warmup_s=r.warmup_s.get("train", float("nan")))
        if r.kind == "compiled":
            row.ratio = f"compiled/eager {paired_ratio(r, ours, 'train'):.2f}"
        elif r is not ours:  # >1: ours is faster
            row.ratio = f"ours/{row.kind} {paired_ratio(ours, r, 'train'):.2f}"
        rows.append(row)
    return rows


def pack_diagnosis(root: Path) -> str:
    """After a failed read of the generated pack: every chunk's hash against the manifest, and the
    first training item the packed reader reads otherwise than LitData's reader (the H200 machine's
    first packed read stopped on an empty item of a chunk just verified; this says which side is wrong)."""
    from litdata import StreamingDataset

    from vitlab.data.streaming import PackedImages, check_packed

    notes = []
    try:
        check_packed(root, "imagenet", full=True)
        notes.append("every chunk's SHA-256 as packed")
    except Exception as err:  # noqa: BLE001
        notes.append(f"check_packed(full): {err}")
    ours, theirs = PackedImages(root / "train"), StreamingDataset(str(root / "train"))
    for i in range(len(theirs)):
        try:
            mine = bytes(ours.read(i)[0])
        except Exception as err:  # noqa: BLE001
            notes.append(f"item {i}: the packed reader fails ({type(err).__name__}: {err})")
            break
        if mine != theirs[i]["jpeg"]:
            k, j = ours.chunks.locate(i)
            notes.append(f"item {i} ({ours.chunks.names[k]} item {j}): the packed reader's {len(mine)} bytes differ "
                         f"from LitData's {len(theirs[i]['jpeg'])}")
            break
    else:
        notes.append(f"all {len(theirs)} items equal to LitData's reader's in this process")
    return "; ".join(notes)


# nvJPEG's pixels against libjpeg's on the generated JPEGs (tests/test_gpu_decode.py's NVJPEG_DIFF plus
# room): an image decoded from bytes overwritten midway is off by tens of grey levels on average
DECODE_DIFF_MEAN = 5.0


def ring_decode(device: torch.device, data_dir: str | None, images: int) -> list[Row]:
    """data.gpu_decode's batches through the training loader's shared slots (2 workers), decoded on
    ``device`` as the DataModule's transfer does, each slot given back right after the decode call
    while the workers fill the next ones: every image against the CPU's decode of a copy of its
    bytes taken before. A decoder still reading the host bytes after returning (asynchronous
    nvJPEG) would show here as images far from the CPU's."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from vitlab.data.gpu_decode import DeviceAugment, RingSlot
    from vitlab.data.imagenet import ImageNetDataModule
    from vitlab.data.throughput import bench_dir, generate

    folder = generate("imagenet", bench_dir(data_dir), max(images, 64))
    dm = ImageNetDataModule(str(folder), batch_size=16, num_workers=2, gpu_decode=True, auto_augment=None,
                            color_jitter=0)
    dm.setup("fit")
    decoder = DeviceAugment(dm.img_size, dm.scale)
    worst, in_slots, seen, pending = 0.0, 0, 0, []
    for batch in dm.train_dataloader():
        in_slots += isinstance(batch.images.data, RingSlot)
        copies = [part.clone() for part in batch.images.split()]
        decoded = decoder.decode(batch.images.split(), device)
        batch.images.release()
        pending.append((copies, decoded))
        seen += len(copies)
        if seen >= images:
            break
    for copies, decoded in pending:
        for data, image in zip(copies, decoded):
            cpu = decode_jpeg(data, mode=ImageReadMode.RGB).float()
            worst = max(worst, float((image.cpu().float() - cpu).abs().mean()))
    status = "ok" if worst <= DECODE_DIFF_MEAN and in_slots else (
        f"failed: worst mean difference {worst:.1f} grey levels (limit {DECODE_DIFF_MEAN}), "
        f"{in_slots} batches in slots")
    return [Row("gpu_decode slots", f"{seen} images, worst mean diff {worst:.2f}", "loader", status=status)]


def _failed(item: str, model: str, kind: str, err: BaseException) -> Row:
    first = (str(err).strip().splitlines() or [""])[0][:120]
    status = "out of memory" if isinstance(err, torch.cuda.OutOfMemoryError) else f"failed: {type(err).__name__}"
    return Row(item, model, kind, status=f"{status}: {first}" if first else status)


def items(scale: Scale, device: torch.device, reference_dir: Path, data_dir: str | None, report: Report):
    """(item name, model, kind, function returning rows) in the suite's order."""
    common = dict(device=str(device), steps=scale.steps, warmup=scale.warmup, rounds=scale.rounds,
                  precision="bf16-mixed", phases=("train",))

    def classification(name: str) -> Callable[[], list[Row]]:
        def run() -> list[Row]:
            overrides = TINY[name] if scale.tiny else []
            rows, reference = [], None
            if name in AUTHORS:
                spec = f"{reference_dir / AUTHORS[name].split(':')[0]}:{AUTHORS[name].split(':')[1]}"
                try:
                    load_reference(spec)
                    reference = spec
                except (Exception, SystemExit) as err:  # noqa: BLE001 -- reported as the authors' row
                    rows.append(Row(f"train {name}", f"authors:{name}", "authors",
                                    status=f"not importable: {str(err).splitlines()[0][:100]}"))
            if scale.tiny and reference:
                reference = None  # the authors' full-size model is no tiny item
                rows.append(Row(f"train {name}", f"authors:{name}", "authors", status="found; timed on a GPU only"))
            table = bench([name], scale.batch, scale.size, compare_timm=name == "pvt_v2_b2",
                                 references=[reference], overrides=overrides, **common)
            return _rows_from(f"train {name}", table[0], report, device) + rows
        return run

    def compiled(name: str) -> Callable[[], list[Row]]:
        def run() -> list[Row]:
            table = bench([name], scale.batch, scale.size, compile_backend=scale.compile_backend,
                                 overrides=TINY[name] if scale.tiny else [], **common)
            return _rows_from(f"compile {name}", table[0], report, device)
        return run

    def dense(task: str, name: str, size: tuple[int, int]) -> Callable[[], list[Row]]:
        def run() -> list[Row]:
            size_ = scale.dense_size[task] if scale.dense_size else size
            # steps/s and memory: a detector's FLOPs need an evaluation forward on the CPU (minutes at
            # 800x1333); the dense models' counts are the zoo's
            table = bench([name], 2, size_, task=task, overrides=TINY[name] + TINY_HEADS[task] if scale.tiny
                                 else [], count_flops=False, **common)
            rows = _rows_from(f"{task} {name} {size_[0]}x{size_[1]}", table[0], report, device)
            for row in rows:
                row.kind, row.steps_s = "dense", row.images_s / 2
            return rows
        return run

    def loader() -> list[Row]:
        from vitlab.data.throughput import loader_bench

        rounds = max(1, scale.rounds)
        rows = [Row("loader imagenet", r.name, "loader", images_s=r.images_per_s)
                for r in loader_bench("imagenet", scale.loader_images, rounds, True, data_dir)]
        # data.gpu_decode's device part (nvJPEG decode, crop, flip, normalise, erase) at the training batch
        from vitlab.data.throughput import bench_dir, generate, gpu_decode_rate

        folder = generate("imagenet", bench_dir(data_dir), scale.loader_images)
        rows.append(Row("loader imagenet", "gpu_decode: device part", "loader",
                        images_s=gpu_decode_rate(folder, str(device), scale.batch, rounds)))
        return rows

    def profiled(name: str) -> Callable[[], list[Row]]:
        def run() -> list[Row]:
            return profile_rows(name, scale, device)
        return run

    def packed() -> list[Row]:
        """The packed reader as a run uses it, from a cold page cache: every training image once
        through two loader workers (the H200 machine's first packed read stopped on an empty item)."""
        from vitlab.data.throughput import bench_dir, evict, generate, packed_copy, time_loader, dataset_files

        folder = generate("imagenet", bench_dir(data_dir), scale.loader_images)
        root = packed_copy(folder)
        evict(dataset_files(root, "litdata"))
        n = scale.loader_images
        try:
            wall, _, seen = time_loader(root, "litdata", 2, n, min(32, n), gpu_decode=True)
        except Exception as err:  # noqa: BLE001 -- the row says what failed and what the pack holds
            traceback.print_exc()
            status = f"failed: {type(err).__name__}: {str(err)[:300]}; {pack_diagnosis(root)}"
            return [Row("packed imagenet", "litdata, cold, 2 workers", "loader", status=status)]
        ok = "ok" if seen == n else f"failed: {seen} of {n} images read; {pack_diagnosis(root)}"
        return [Row("packed imagenet", "litdata, cold, 2 workers", "loader", status=ok, images_s=seen / wall)]

    def lightning() -> list[Row]:
        return lightning_demo(device, data_dir)

    def ring() -> list[Row]:
        return ring_decode(device, data_dir, scale.loader_images)

    out = [(f"train {m}", m, "ours", classification(m)) for m in MODELS]
    out += [(f"profile {m}", m, "profile", profiled(m)) for m in PROFILED]
    out.append(("packed imagenet", "imagenet", "loader", packed))
    out.append(("lightning demo", "pvt_v2_b0", "run", lightning))
    out.append(("gpu_decode slots", "imagenet", "loader", ring))
    out += [(f"compile {m}", m, "compiled", compiled(m)) for m in COMPILED]
    out += [(f"{task} {m}", m, "dense", dense(task, m, size)) for task, m, size in DENSE]
    out.append(("loader imagenet", "imagenet", "loader", loader))
    return out


def profile_rows(name: str, scale: Scale, device: torch.device) -> list[Row]:
    """torch.profiler over ``PROFILE_STEPS`` bf16 training steps of ``name``: a first row with the wall
    time, the device's busy time (the kernels' own time) and the kernel launches per step (a device
    busy for a small part of the wall time waits on the host: launch-bound), then the ops with the
    most own device time (CPU: own CPU time), one row each."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from vitlab.tools.bench.measure import _step, _sync
    from vitlab.tools.bench.models import build_ours
    from vitlab.tools.bench.workloads import make_workload

    gpu = device.type == "cuda"
    workload = make_workload(None, scale.batch, scale.size, device)
    model = build_ours(name, workload, device, TINY[name] if scale.tiny else [])
    model.train()
    for _ in range(2):
        _step(model, workload, "train", device, torch.bfloat16)
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        start = time.perf_counter()
        for _ in range(PROFILE_STEPS):
            _step(model, workload, "train", device, torch.bfloat16)
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / PROFILE_STEPS
    events = prof.key_averages()
    own = "self_device_time_total" if gpu else "self_cpu_time_total"
    # busy: the kernels' own time on a GPU (an op's device time is its kernels': not summed twice)
    busy_ms = sum(getattr(e, own) for e in events if not gpu or e.device_type == DeviceType.CUDA) / 1e3 / PROFILE_STEPS
    ops = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: getattr(e, own), reverse=True)
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    where = "device" if gpu else "CPU"
    rows = [Row(f"profile {name}", "per step", "profile", images_s=scale.batch / wall_ms * 1e3,
                status=f"wall {wall_ms:.1f} ms, {where} busy {busy_ms:.1f} ms ({100 * busy_ms / wall_ms:.0f}%), "
                       f"{launches // PROFILE_STEPS} kernel launches")]
    for e in ops[:PROFILE_TOP]:
        t = getattr(e, own) / 1e3 / PROFILE_STEPS
        rows.append(Row(f"profile {name}", e.key[:24], "profile",
                        status=f"{t:.2f} ms/step ({100 * t / busy_ms:.1f}% of {where} busy), {e.count // PROFILE_STEPS} "
                               f"calls/step: {e.key[:60]}"))
    return rows


def lightning_demo(device: torch.device, data_dir: str | None) -> list[Row]:
    """``make train``'s demo as a user runs it (``vitlab-train`` in a process of its own: the Lightning
    Trainer, the checkpoints, summary.json) on the device: bf16, one epoch, JPEGs decoded there
    (``data.gpu_decode``); on a CPU its ``debug=smoke`` version. Run directory in a temporary folder."""
    import os
    import subprocess
    import sys
    import tempfile

    gpu = device.type == "cuda"
    overrides = ["experiment=demo", "resume=never", "data.gpu_decode=true"]
    overrides += (["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "schedule.epochs=1"] if gpu
                  else ["debug=smoke"])
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "VITLAB_OUTPUT": out, "VITLAB_DATA": str(Path(data_dir or "data").resolve())}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", "from vitlab.runtime.cli import train_main; train_main()",
                               *overrides], env=env, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - start
        summaries = sorted(Path(out).rglob("summary.json"))
        if done.returncode or not summaries:
            last = (done.stderr.strip().splitlines() or ["no summary.json written"])[-1][:120]
            return [Row("lightning demo", "pvt_v2_b0", "run", status=f"failed: {last}")]
        summary = json.loads(summaries[0].read_text())
    return [Row("lightning demo", "pvt_v2_b0", "run",
                status=f"{summary['status']}: {summary['global_step']} steps, val/top1 {summary['val/top1']:.1f}, "
                       f"{wall:.0f} s with start-up ({' '.join(overrides)})")]


def run_suite(device: str | None = None, json_path: str | None = None, reference_dir: str = "official",
              data_dir: str | None = None, budget_s: float = 420.0) -> Report:
    """Run every item (each failure a row), print the table, write the JSON; items left when
    ``budget_s`` seconds have passed are reported as skipped."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device_.type == "cuda"
    name = torch.cuda.get_device_name(device_) if gpu else "cpu"
    scale = GPU if gpu else CPU
    report = Report(device=name, gpu_figure=gpu, peak_tflops=device_peak(name) if gpu else None)
    path = Path(json_path) if json_path else None
    banner = (f"GPU suite on {name}" if gpu else
              "NOT A GPU FIGURE: no CUDA device, so this is the suite's tiny CPU version (small inputs, "
              "one-block backbones); it checks that every item runs, its numbers say nothing about a GPU")
    print(banner, flush=True)
    report.matmul_tflops = matmul_peak(device_, torch.bfloat16, size=16384 if gpu else 256) / 1e3
    report.write(path)
    start = time.perf_counter()
    for item, model, kind, run in items(scale, device_, Path(reference_dir), data_dir, report):
        if time.perf_counter() - start > budget_s:
            report.rows.append(Row(item, model, kind, status=f"skipped: past the {budget_s:.0f} s budget"))
            continue
        try:
            report.rows += run()
        except Exception as err:  # noqa: BLE001 -- one item's failure is a row; the suite goes on
            traceback.print_exc()
            report.rows.append(_failed(item, model, kind, err))
        finally:
            if gpu:
                torch.cuda.empty_cache()
        report.write(path)
        print(f"  done: {item} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(format_suite(report))
    if not gpu:
        print(banner.split(":")[0] + ": the figures above are from the CPU's tiny version")
    if path is not None:
        print(f"JSON: {path}")
    return report


def format_suite(report: Report) -> str:
    peak = f"{report.peak_tflops:.0f}" if report.peak_tflops else "unknown"
    head = (f"{'item':<30} {'model':<24} {'kind':<9} {'img/s':>9} {'steps/s':>8} {'TFLOP/s':>8} {'MFU %':>6} "
            f"{'mm %':>6} {'peak GB':>8} {'warm-up s':>9}  ratio / status")
    lines = [f"device={report.device} torch={report.torch} bf16 peak={peak} TFLOP/s (data sheet), "
             f"bf16 matmul measured={report.matmul_tflops:.1f} TFLOP/s; MFU %: of the data-sheet peak, "
             f"mm %: of the measured matmul", head, "-" * len(head)]

    def num(v, width, fmt):
        return f"{'-':>{width}}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>{width}{fmt}}"

    for r in report.rows:
        tail = r.ratio if r.status == "ok" else r.status
        lines.append(f"{r.item[:30]:<30} {r.model[:24]:<24} {r.kind:<9} {num(r.images_s, 9, '.1f')} "
                     f"{num(r.steps_s, 8, '.2f')} {num(r.tflops, 8, '.2f')} {num(r.mfu_pct, 6, '.1f')} "
                     f"{num(r.matmul_pct, 6, '.1f')} {num(r.peak_mem_gb, 8, '.2f')} {num(r.warmup_s, 9, '.1f')}  {tail}")
    return "\n".join(lines)
