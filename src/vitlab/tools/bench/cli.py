"""Throughput, achieved FLOP rate and peak memory of what users run, against the references.

    python -m vitlab.tools.bench pvt_v2_b0 pvt_v2_b2 --batch 8 --input 224 224 --compare-timm
    python -m vitlab.tools.bench pvt_v2_b2 --precision bf16-mixed --reference ../PVT/classification/pvt_v2.py:pvt_v2_b2
    python -m vitlab.tools.bench pvt_v2_b2 --device cuda --batch 64 --precision bf16-mixed --compile
    python -m vitlab.tools.bench pvt_v2_b2 --task maskrcnn --batch 1 --steps 1 --grad-checkpointing
    python -m vitlab.tools.bench --loader imagenet --fast-decode
    python -m vitlab.tools.bench --loader imagenet --format folder litdata --model pvt_v2_b2 --precision bf16-mixed

Models. Each name is ``vitlab.create_model(name)`` (1000 classes), or with ``--task`` the full
dense model of ``task=coco_retinanet|coco_maskrcnn|ade20k_fpn|ade20k_upernet`` on that
backbone (the task class's own ``build_model``; random boxes, masks and label maps at the
papers' input sizes 800x1333 / 512x512 unless ``--input``). Measured in the same run,
interleaved with ours round by round so that all see the same machine load:

* ``--compare-timm``: timm's model of the same name, where timm has one (e.g. ``pvt_v2_*``);
* ``--reference FILE.py:FUNCTION``: any model factory, e.g. the authors' code (given once per
  name, in order). The file is executed as a module; its timm ``@register_model`` decorators are
  made inert so that it cannot replace timm's own models of the same name. FUNCTION is called
  with ``drop_path_rate`` = ours where its signature takes it (the same regularisation cost,
  as for timm's twin);
* ``--compile``: ours under ``torch.compile`` (``--compile-backend``; compilation happens in the
  warm-up steps);
* ``--grad-checkpointing``: ours with ``backbone.grad_checkpointing`` (activation checkpointing).

Every extra row gets a ratio line: ``ours / timm`` and ``ours / ref`` (>1: ours is faster),
``compiled / ours`` and ``checkpointed / ours`` (the gain, and the memory it saves).

* train: forward + loss under ``--precision`` autocast, backward (no optimizer step);
* infer: forward under ``torch.inference_mode()`` (and autocast), ``model.eval()``;
* images/s: batch x steps / time after ``--warmup`` steps (``--clock wall``, or ``cpu``: this
  process's CPU time, steadier on a shared machine); the median over ``--rounds`` rounds; a ratio
  is the median of the per-round ratios (paired: a load change on a shared machine hits both),
  followed by their quartiles (how far the pairs moved);
* GFLOP/s: images/s x the model's forward FLOPs per image (2 x the multiply-adds that
  ``vitlab.runtime.flops.count_gmacs`` counts), x 3 for a training step (backward ~ 2 x forward; dense
  heads counted at their evaluation-mode cost, so an approximation there); ``%peak``: that rate
  over the machine's matmul rate in the same dtype (a large square matmul, the best of runs before
  and after the models'): how close to the machine's limit the model runs;
* peak memory: CUDA -- ``torch.cuda.max_memory_allocated`` during the phase minus what was
  allocated before it (activations, gradients, workspace; weights excluded); CPU -- the peak
  resident set size (RSS, /proc/self/statm sampled every 2 ms by a thread) during the phase
  minus the RSS before it: a coarse figure that includes the allocator's caching.

``--precision 16-mixed`` needs a CUDA device: torch has no fast fp16 matmul on the CPU
(well under 1 GFLOP/s), so the CPU refuses it. No GradScaler runs (its cost is negligible).

``--loader imagenet|coco|ade20k`` times the training data pipeline instead (see
``vitlab.data.throughput``): decode + augmentation, images/s of one worker process; with
``--format folder litdata litdata-block`` the DataModule's training loader per data format, workers
and page cache (``litdata-block``: the packed format in ``data.shuffle=block``'s order; workers 0:
the loader in this process, no transfer between processes: the format's own cost);
with ``--model NAME`` also that model's training images/s here and the loader workers it needs:
ceil(model images/s / loader images per CPU-second), each worker one busy core.
``--eval coco|ade20k --images N [--masks]`` times the validation metric at full size
(``vitlab.tools.eval_cost``): seconds and peak memory.
"""
from __future__ import annotations

import argparse
import os

import torch

from vitlab.tools.bench.measure import CLOCKS, PHASES, PRECISIONS, matmul_peak
from vitlab.tools.bench.workloads import TASKS, task_data
from vitlab.tools.bench.run import bench
from vitlab.tools.bench.tables import format_table


def check_model_args(p: argparse.ArgumentParser, args) -> None:
    if args.precision == "16-mixed" and args.device == "cpu":
        p.error("--precision 16-mixed on the CPU: torch has no fast fp16 matmul there (well under 1 GFLOP/s); "
                "use --precision bf16-mixed, or --device cuda")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu times CPU work; a CUDA step's time is the device's: use --clock wall")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.tools.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("names", nargs="*", default=["pvt_v2_b0"], help="backbone config names (conf/backbone)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per step (default: 8; with --task 2, the papers' images per GPU)")
    p.add_argument("--input", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input size (default: 224 224; with --task the paper's: 800 1333 / 512 512)")
    p.add_argument("--precision", default="32", choices=list(PRECISIONS), help="autocast on the device (as Lightning's)")
    p.add_argument("--compare-timm", action="store_true", help="also time timm's model of the same name")
    p.add_argument("--reference", action="append", default=None, metavar="FILE.py:FUNCTION",
                   help="also time this model factory (once per name, in order), e.g. the authors' code")
    p.add_argument("--task", choices=list(TASKS), default=None, help="time the full dense model of this task")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for ours, relative to the backbone config (e.g. depths=[1,1,1,1]), or with "
                        "--task of the task's module (module.head.norm=GN); the references are built as they are")
    p.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--grad-checkpointing", action="store_true", help="also time ours with activation checkpointing")
    p.add_argument("--phase", choices=[*PHASES, "both"], default="both", help="time training, inference or both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per model and phase; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or (CPU device) this process's CPU time: steadier on a shared machine, "
                        "images per CPU-second with --threads 1")
    p.add_argument("--loader", choices=["imagenet", "coco", "ade20k"], default=None,
                   help="time this dataset's training pipeline instead (vitlab.data.throughput)")
    p.add_argument("--images", type=int, default=64, help="--loader: images per round; --eval: images evaluated")
    p.add_argument("--fast-decode", action="store_true", help="--loader imagenet: also time data.fast_decode=true")
    p.add_argument("--format", nargs="+", choices=["folder", "litdata", "litdata-block"], default=None,
                   help="--loader imagenet: time the training loader (workers, page cache) per data.format instead "
                        "(vitlab.data.throughput.format_bench); --images: images timed per run")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--format: loader workers to time")
    p.add_argument("--dataset-images", type=int, default=20_000, help="--format: size of the generated ImageNet")
    p.add_argument("--gpu-decode", action="store_true", help="--format: also time data.gpu_decode's worker part")
    p.add_argument("--bucket", default=None, metavar="s3://BUCKET/PREFIX",
                   help="--format: the packed formats read the generated pack uploaded there (data.root=s3://...; "
                        "credentials and endpoint from the AWS environment)")
    p.add_argument("--read-threads", type=int, nargs="+", default=[0], metavar="N",
                   help="--format folder / litdata: data.read_threads values to time (a batch's images read from "
                        "disk by N threads at once; 0: one after another)")
    p.add_argument("--handover", action="store_true",
                   help="--format: only a gpu_decode batch's steps per image from worker to training process, each "
                        "alone (read, into shared memory, pickle + unpickle, receiver reads), through the loader's "
                        "shared slots and through a new block per batch, warm cache, on --images items of the "
                        "generated set")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="--format: also time this model's training step (--device, --precision, --batch, --input, "
                        "--steps, --rounds) and print the loader workers per device that feed it")
    p.add_argument("--pack", choices=["imagenet", "coco", "ade20k"], default=None,
                   help="time python -m vitlab.data.pack on a generated dataset of --images training images, "
                        "per --workers count, and the real training split at that rate")
    p.add_argument("--eval", choices=["coco", "ade20k"], default=None,
                   help="time the validation metric at full size instead (vitlab.tools.eval_cost)")
    p.add_argument("--masks", action="store_true", help="--eval coco: boxes and masks")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="--loader: the generated images' size (default: ImageNet 500 375, COCO 640 480, ADE20K 683 512)")
    p.add_argument("--data-dir", default=None, help="--loader: where the generated data is kept (default: "
                   "$VITLAB_DATA or ./data, under bench/)")
    p.add_argument("--suite", choices=["gpu"], default=None,
                   help="run the prepared GPU suite (vitlab.tools.bench.suite; on a CPU its tiny version)")
    p.add_argument("--json", default=None, metavar="FILE", help="--suite: write the results here (after every item)")
    p.add_argument("--reference-dir", default="official", metavar="DIR",
                   help="--suite: where the authors' files are (pvt_v2.py, pvt.py, scalablevit.py, gpvit.py)")
    p.add_argument("--budget", type=float, default=420.0, help="--suite: seconds after which items are skipped")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        from vitlab.tools.bench.suite import run_suite

        run_suite(args.device, args.json, args.reference_dir, args.data_dir, args.budget)
        return
    if args.pack:
        from vitlab.data.throughput import format_pack_table, pack_bench

        rows = pack_bench(args.pack, args.images, args.workers, args.data_dir, args.image_size)
        print(f"pack={args.pack} generated training images={args.images} (warm page cache; CPU = this process + "
              f"its packing workers; load average {os.getloadavg()[0]:.1f})")
        print(format_pack_table(rows))
        return
    if args.eval:
        from vitlab.tools.eval_cost import run

        print(run(args.eval, args.images, args.masks))
        return
    if args.model and not (args.loader and args.format):
        p.error("--model applies to --loader imagenet --format (the models to time are the positional names)")
    if args.loader and args.format:
        from vitlab.data.throughput import format_bench, format_rows_table

        if args.loader != "imagenet":
            p.error("--format applies to --loader imagenet")
        if args.handover:
            from vitlab.data.throughput import bench_dir, format_handover_table, generate, handover_costs, packed_copy

            folder = generate("imagenet", bench_dir(args.data_dir), args.dataset_images, args.image_size)
            packed = packed_copy(folder)
            roots = {"folder": folder, "litdata": packed, "litdata-block": packed}
            costs = {(fmt, way): handover_costs(roots[fmt], fmt, args.images, ring=way == "ring slot")
                     for fmt in args.format for way in ("new block", "ring slot")}
            print(f"loader=imagenet dataset={args.dataset_images} images={args.images}, batches of 32, warm cache: "
                  f"a data.gpu_decode batch's steps from loader worker to training process, each timed alone")
            print(format_handover_table(costs))
            return
        rows = format_bench(args.dataset_images, args.images, args.format, args.workers, batch=32,
                            gpu_decode=args.gpu_decode, data_dir=args.data_dir, size=args.image_size,
                            bucket=args.bucket, read_threads=args.read_threads)
        print(f"loader=imagenet dataset={args.dataset_images} images timed per run={args.images} "
              f"(one shuffled pass; CPU = this process + its workers; load average {os.getloadavg()[0]:.1f})")
        print(format_rows_table(rows))
        decode_ips = None
        if args.gpu_decode:
            from vitlab.data.throughput import bench_dir, generate, gpu_decode_rate

            folder = generate("imagenet", bench_dir(args.data_dir), args.dataset_images, args.image_size)
            decode_ips = gpu_decode_rate(folder, args.device, args.batch or 128)
            print(f"\ngpu_decode's device part on {args.device} (decode, crop, flip, normalise, erase; batch "
                  f"{args.batch or 128}): {decode_ips:.1f} images/s"
                  + ("" if args.device == "cuda" else " -- NOT A GPU FIGURE: libjpeg on the CPU"))
        if args.model:
            check_model_args(p, args)
            from vitlab.data.throughput import format_workers_table, workers_needed

            model_ips = bench([args.model], args.batch or 8, args.input, False, args.device, args.steps, args.warmup,
                              args.rounds, args.precision, phases=("train",), clock=args.clock)[0][0].train_ips
            size = args.input or (224, 224)
            print(f"\nmodel={args.model} train precision={args.precision} batch={args.batch or 8} "
                  f"input={size[0]}x{size[1]} device={args.device}: {model_ips:.1f} images/s measured here"
                  + ("" if args.device == "cuda" else " -- NOT A GPU FIGURE: the model ran on the CPU; on a GPU run "
                     "this with --device cuda (workers = its images/s / the loader's images per CPU-second)"))
            print(format_workers_table(workers_needed(rows, model_ips), model_ips))
            if decode_ips:  # the device decodes and trains: its time per image is the sum of both
                both = 1 / (1 / model_ips + 1 / decode_ips)
                print(f"with gpu_decode the device trains and decodes: {both:.1f} images/s (the gpu_decode rows' "
                      f"workers for that rate: {both / model_ips:.2f}x the figure above)")
        return
    if args.loader:
        from vitlab.data.throughput import format_loader_table, loader_bench

        from vitlab.data.throughput import SIZES

        rows = loader_bench(args.loader, args.images, args.rounds, args.fast_decode, args.data_dir, args.image_size)
        width, height = args.image_size or SIZES[args.loader]
        print(f"loader={args.loader} images={width}x{height} per round={args.images} rounds={args.rounds} "
              f"(one worker process, one torch thread; images per CPU second)")
        print(format_loader_table(rows))
        return
    if args.reference and len(args.reference) != len(args.names):
        p.error(f"--reference given {len(args.reference)} times for {len(args.names)} names: give one per name, in order")
    check_model_args(p, args)
    if args.task and args.compare_timm:
        p.error("--compare-timm times classifiers; it does not apply with --task")
    batch = args.batch or (2 if args.task else 8)
    if args.task == "upernet" and batch < 2 and not any(o.startswith("module.head.norm=") for o in args.override):
        p.error("--task upernet with --batch 1: the pyramid pooling's 1x1 map has one value per channel, which "
                "BatchNorm cannot normalise in training; use --batch >= 2, or --override module.head.norm=GN")
    dtype = PRECISIONS[args.precision] or torch.float32
    device, clock = torch.device(args.device), CLOCKS[args.clock]
    peak = matmul_peak(device, dtype, clock=clock)  # before and after the run: the best (a shared machine's load varies)
    phases = PHASES if args.phase == "both" else (args.phase,)
    table = bench(args.names, batch, args.input, args.compare_timm, args.device, args.steps, args.warmup, args.rounds,
                  args.precision, args.reference, args.task, args.compile_backend if args.compile else None,
                  args.grad_checkpointing, phases, args.override, args.clock)
    peak = max(peak, matmul_peak(device, dtype, clock=clock))
    size = args.input or (task_data(TASKS[args.task]).FACTS.train_input if args.task else (224, 224))
    print(f"device={args.device} task={args.task or 'classification'} batch={batch} input={size[0]}x{size[1]} "
          f"precision={args.precision} steps={args.steps} rounds={args.rounds} threads={torch.get_num_threads()} "
          f"clock={args.clock} "
          f"torch={torch.__version__} matmul peak={peak:.0f} GFLOP/s ({str(dtype).split('.')[-1]})")
    print(format_table(table, args.device, peak))
