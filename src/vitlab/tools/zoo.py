"""Parameter counts and GFLOPs of every backbone config, side by side with the papers.

    python -m vitlab.tools.zoo                                   # every backbone config
    python -m vitlab.tools.zoo pale_t --set attn_mode=axial      # an ablation row
    python -m vitlab.tools.zoo --rows                            # every row of the papers' tables
    python -m vitlab.tools.zoo --rows pale_t                     # the rows of one backbone
    python -m vitlab.tools.zoo scalablevit_s --task ade20k_fpn   # the full task model
    python -m vitlab.tools.zoo pvt_v2_b2 --json                  # one JSON object per line
    python -m vitlab.tools.zoo --rows --record                   # store the values of rows without paper numbers

Rows are printed as they are measured, by ``--jobs`` processes (default: one per CPU). GFLOPs
are multiply-adds at the paper's input size (see ``vitlab.runtime.flops``); models are built on the meta
device, so counting even the largest needs no memory and no compute. Detectors are counted
through their ``flops_forward`` (``vitlab.heads.detection``): what mmdetection's ``get_flops``
runs, with fixed proposals. ``--set module.KEY=VALUE`` (and a row's ``set`` entries under
``module.``) set the task's module, e.g. a head option such as ``module.head.box_head=4conv1fc``.

The papers' numbers live in ``src/vitlab/tools/paper_tables/*.yaml``, one file per family. A row
with ``paper_counter: mmcv`` was counted by the paper with mmcv's module hooks (mmdet /
mmseg ``get_flops``), which miss the attention matmuls: it is compared without them
(GFLOPs marked ``*``). A row without a paper (or official-code) value says "no paper value"
and is compared with the value stored in ``paper_tables/measured.yaml`` by ``--record``. A row
may carry an ``id``; ``delta_from: <id>`` compares its GFLOPs difference from that row with the
paper's (the note column); ``known_gap: <reason>`` marks a row not reproduced within tolerance.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from vitlab.api import available_backbones, backbone_config
from vitlab.data.base import DatasetFacts
from vitlab.data.imagenet import ImageNetDataModule
from vitlab.runtime.build import build_backbone, build_classifier
from vitlab.runtime.flops import count_params, gmacs_by_op, is_attention_op

TABLES_DIR = Path(__file__).parent / "paper_tables"
# Not a paper table: measured values of the rows that have no paper value (written by --record).
MEASURED_FILE = TABLES_DIR / "measured.yaml"
DEFAULT_INPUT = ImageNetDataModule.FACTS.flops_input  # the classifiers' (the tables: input 224)
CLASSIFIER_TASK = "imagenet_cls"  # the tables write ``task: null`` for the ImageNet classifier
# ``set`` / ``--set`` entries under this prefix override the task's module (head options such as
# ``module.head.box_head=4conv1fc``); the others override the backbone config.
MODULE_PREFIX = "module."


@dataclass
class ZooRow:
    name: str
    overrides: list[str]
    task: str | None
    input: list[int]
    params: int
    gflops: float  # every matmul and convolution
    attention_gflops: float  # of which attention matmuls (what mmcv's counter leaves out)
    paper_params: float | None  # millions
    paper_gflops: float | None
    official_params: int | None = None
    measured_params: int | None = None  # stored for rows without a paper / official value
    measured_gflops: float | None = None
    paper_counter: str | None = None  # "mmcv": the paper's count has no attention matmuls
    scope: str = "classifier"
    source: str | None = None
    row_id: str | None = None  # the paper row's ``id``, which other rows' ``delta_from`` name
    delta_from: str | None = None  # the row whose GFLOPs this row's paper delta is measured from
    known_gap: str | None = None  # why this row is not reproduced within tolerance

    @property
    def compared_gflops(self) -> float:
        """Our GFLOPs counted the way the paper counted them."""
        return self.gflops - self.attention_gflops if self.paper_counter == "mmcv" else self.gflops

    def params_reference(self) -> tuple[float, str] | None:
        """(reference parameter count, where it comes from): the official code, the paper or the stored value."""
        if self.official_params:
            return self.official_params, "code"
        if self.paper_params:
            return self.paper_params * 1e6, "paper"
        if self.measured_params:
            return self.measured_params, "stored"
        return None

    def gflops_reference(self) -> tuple[float, str] | None:
        if self.paper_gflops:
            return self.paper_gflops, "paper"
        if self.measured_gflops:
            return self.measured_gflops, "stored"
        return None

    @property
    def params_diff(self) -> float | None:
        ref = self.params_reference()
        return None if ref is None else 100 * (self.params - ref[0]) / ref[0]

    @property
    def gflops_diff(self) -> float | None:
        ref = self.gflops_reference()
        if ref is None or math.isnan(self.gflops):
            return None
        ours = self.compared_gflops if ref[1] == "paper" else self.gflops  # stored values count everything
        return 100 * (ours - ref[0]) / ref[0]

    def to_json(self) -> dict:
        return {**asdict(self), "params_diff": self.params_diff, "gflops_diff": self.gflops_diff}


def row_key(row: dict) -> str:
    """What identifies a measured model: backbone, overrides, task, input size (and the scope
    of the count when it is not the classifier). The key of ``measured.yaml``."""
    parts = [row["name"], *row["set"], row["task"] or CLASSIFIER_TASK, "x".join(map(str, row["input"]))]
    if row.get("params_scope", "classifier") != "classifier":
        parts.append(row["params_scope"])
    return " ".join(parts)


@lru_cache(maxsize=None)
def _parsed_yaml(path: Path, mtime_ns: int):
    # libyaml's loader where PyYAML has it: the paper tables are ~100 KB of YAML, parsed once per
    # process (a sweep's plan looks a row up per job)
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_yaml(path: Path):
    """``path`` parsed (a fresh copy: callers may change it), read again only when the file changed."""
    return copy.deepcopy(_parsed_yaml(path, path.stat().st_mtime_ns))


def load_measured() -> dict[str, dict]:
    return (read_yaml(MEASURED_FILE) or {}) if MEASURED_FILE.is_file() else {}


def paper_rows() -> list[dict]:
    """Every row of the paper tables, with the stored measurement of rows that lack paper values
    (``measured_params`` / ``measured_gflops``, None when nothing is stored)."""
    measured = load_measured()
    rows = []
    for path in sorted(TABLES_DIR.glob("*.yaml")):
        if path.name == MEASURED_FILE.name:  # stored measurements, not a paper table
            continue
        for row in read_yaml(path) or []:
            row.setdefault("set", [])
            row.setdefault("task", None)
            row.setdefault("input", list(DEFAULT_INPUT))
            row["table_file"] = path.name
            stored = measured.get(row_key(row), {})
            row["measured_params"], row["measured_gflops"] = stored.get("params"), stored.get("gflops")
            rows.append(row)
    return rows


def find_paper_row(name: str, overrides: list[str], task: str | None) -> dict | None:
    for row in paper_rows():
        if row["name"] == name and sorted(row["set"]) == sorted(overrides) and row["task"] == task:
            return row
    return None


def split_overrides(overrides) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A row's ``set``: (backbone overrides, ``module.*`` overrides)."""
    module = tuple(o for o in overrides if o.startswith(MODULE_PREFIX))
    return tuple(o for o in overrides if not o.startswith(MODULE_PREFIX)), module


@lru_cache(maxsize=None)
def _task_config(task: str, module_overrides: tuple[str, ...] = ()) -> tuple[dict, bool, DatasetFacts]:
    """The task's ``module:`` config (with ``module_overrides``), whether its data has masks and its
    DataModule's facts (class count, FLOP input), composed once per task (the backbone does not change them). The backbone is composed on its
    own: a row states the architecture in ``set``, and backbone fields a task sets
    (``pretrained``) are not applied."""
    from vitlab.runtime.build import locate
    from vitlab.runtime.config import compose
    from vitlab.runtime.trust import check_targets

    cfg = compose("train", [f"task={task}", *module_overrides])
    module_cfg = OmegaConf.to_container(cfg.module, resolve=True)  # not `paths`: no Hydra run here
    check_targets(module_cfg, "module")
    return module_cfg, bool(cfg.data.get("with_masks", False)), locate(cfg.data._target_).FACTS


@lru_cache(maxsize=None)
def _plain_backbone_config(name: str, overrides: tuple[str, ...]) -> dict:
    return OmegaConf.to_container(backbone_config(name, overrides), resolve=True)


def _backbone_config(name: str, overrides: tuple[str, ...]) -> dict:
    """The composed backbone config (a fresh copy), composed once per backbone and overrides:
    the rows of several tasks share it."""
    return copy.deepcopy(_plain_backbone_config(name, overrides))


def build_task_model(name: str, overrides: list[str], task: str) -> torch.nn.Module:
    """The full model of a dense task (backbone + neck + heads), as the papers count it: the task
    class's own ``build_model`` with the real dataset's class count and the papers' input size."""
    from vitlab.data.base import DatasetInfo
    from vitlab.runtime.build import locate

    backbone_overrides, module_overrides = split_overrides(overrides)
    module_cfg, with_masks, facts = _task_config(task, module_overrides)
    info = DatasetInfo(class_names=tuple(str(i) for i in range(facts.num_classes)), input_size=facts.flops_input,
                       with_masks=with_masks)
    return locate(module_cfg["_target_"]).build_model(_backbone_config(name, backbone_overrides), module_cfg, info)


class _SkipInitOnMeta(TorchFunctionMode):
    """Weight initialisers as no-ops on meta tensors. Meta tensors hold no values, yet torch runs
    the initialisers' Python meta kernels (about 1 ms a call: half the time of building a model
    there); what they would fill leaves shapes and parameter counts as they are."""

    FILLERS = frozenset({
        "uniform_", "normal_", "trunc_normal_", "constant_", "zeros_", "ones_", "xavier_uniform_", "xavier_normal_",
        "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "zero_", "fill_", "erfinv_", "mul_", "add_", "sub_",
        "div_", "clamp_", "copy_",
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.FILLERS and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


def build_for_count(name: str, overrides: list[str], task: str | None, scope: str) -> torch.nn.Module:
    if not task and split_overrides(overrides)[1]:
        raise ValueError(f"{list(split_overrides(overrides)[1])}: {MODULE_PREFIX}* overrides set a task's module; "
                         f"name the task (--task, or the row's task:)")
    with _SkipInitOnMeta(), torch.device("meta"):  # no memory, no init cost: counting only
        if task:
            return build_task_model(name, overrides, task)
        cfg = _backbone_config(name, tuple(overrides))
        return build_backbone(cfg) if scope == "backbone" else build_classifier(cfg, 1000)


@lru_cache(maxsize=None)
def _count(name: str, overrides: tuple[str, ...], task: str | None, size: tuple[int, int], scope: str,
           flops: bool) -> tuple[int, float, float]:
    """(params, GFLOPs, attention GFLOPs) of one model; rows that name the same model share it."""
    model = build_for_count(name, list(overrides), task, scope)
    if not flops:
        return count_params(model), float("nan"), float("nan")
    by_op = gmacs_by_op(model, size)
    attention = sum(g for op, g in by_op.items() if is_attention_op(op))
    return count_params(model), round(sum(by_op.values()), 3), round(attention, 3)


def measure(
    name: str, overrides: list[str] | None = None, task: str | None = None, input_size=None, scope: str | None = None,
    flops: bool = True, row: dict | None = None,
) -> ZooRow:
    """Params and GFLOPs of one model next to its paper row (``row``, or the first row that names
    the same backbone, overrides and task)."""
    overrides = list(overrides or [])
    row = row if row is not None else (find_paper_row(name, overrides, task) or {})
    scope = scope or row.get("params_scope", "classifier")
    size = tuple(input_size or row.get("input") or (_task_config(task)[2].flops_input if task else DEFAULT_INPUT))
    params, gflops, attention = _count(name, tuple(overrides), task, size, scope, flops)
    return ZooRow(
        name=name,
        overrides=overrides,
        task=task,
        input=list(size),
        params=params,
        gflops=gflops,
        attention_gflops=attention,
        paper_params=row.get("paper_params_m"),
        paper_gflops=row.get("paper_gflops"),
        official_params=row.get("official_params"),
        measured_params=row.get("measured_params"),
        measured_gflops=row.get("measured_gflops"),
        paper_counter=row.get("paper_counter"),
        scope=scope,
        source=row.get("source"),
        row_id=row.get("id"),
        delta_from=row.get("delta_from"),
        known_gap=row.get("known_gap"),
    )


def record(measured: list[tuple[dict, ZooRow]], every_row: bool) -> Path:
    """Store the measured params / GFLOPs of the rows that have no paper or official value
    (``every_row``: the file then holds exactly those rows; else the entries are updated)."""
    needed: dict[str, dict] = {}  # rows of several tables can name one model: what any of them lacks
    for row, got in measured:
        entry = needed.setdefault(row_key(row), {})
        if not (row.get("official_params") or row.get("paper_params_m")):
            entry["params"] = got.params
        if not row.get("paper_gflops"):
            entry["gflops"] = got.gflops
    stored = {} if every_row else load_measured()
    for key, entry in needed.items():
        if entry:
            stored[key] = entry
        else:
            stored.pop(key, None)
    lines = [
        "# Measured params / GFLOPs (GMACs, every matmul) of the paper_tables rows that have no paper or",
        "# official-code value, so that tests/test_zoo.py checks them too (exactly). Written by",
        "# `python -m vitlab.tools.zoo --rows --record`; re-record when a model changes on purpose.",
        *(f"{json.dumps(key)}: {json.dumps(stored[key])}" for key in sorted(stored)),
    ]
    MEASURED_FILE.write_text("\n".join(lines) + "\n")
    return MEASURED_FILE


class StreamTable:
    """A rich table printed one row at a time (fixed column widths, so the rows line up)."""

    COLUMNS = (("name", 17), ("overrides", 30), ("task", 14), ("input", 9), ("params (M)", 11),
               ("reference", 17), ("diff", 7), ("GFLOPs", 9), ("reference", 14), ("diff", 7), ("note", 44))

    def __init__(self):
        from rich.console import Console

        self.console = Console(width=sum(w + 1 for _, w in self.COLUMNS) + 2)
        self._print([name for name, _ in self.COLUMNS], header=True)

    def _print(self, cells: list[str], header: bool = False) -> None:
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD if header else None, show_header=header, show_edge=False, pad_edge=False,
                      padding=(0, 1, 0, 0))
        for name, width in self.COLUMNS:
            table.add_column(name, width=width, overflow="fold")
        if not header:
            table.add_row(*cells)
        self.console.print(table)
        self.console.file.flush()

    def add(self, r: ZooRow, note: str = "") -> None:
        def pct(v):
            return "" if v is None else f"{v:+.1f}%"

        params_ref, gflops_ref = r.params_reference(), r.gflops_reference()
        gflops = "" if math.isnan(r.gflops) else f"{r.compared_gflops:.2f}" + ("*" if r.paper_counter == "mmcv" else "")
        self._print([
            r.name, " ".join(r.overrides), r.task or "", "x".join(map(str, r.input)),
            f"{r.params / 1e6:.3f}" + (" bb" if r.scope == "backbone" else ""),
            "" if params_ref is None else f"{params_ref[1]} {params_ref[0] / 1e6:.3f}", pct(r.params_diff),
            gflops, "" if gflops_ref is None else f"{gflops_ref[1]} {gflops_ref[0]:g}", pct(r.gflops_diff), note,
        ])


def row_note(r: ZooRow, base: ZooRow | None) -> str:
    """Rows without paper values, the GFLOPs delta from the ``delta_from`` row, known gaps."""
    params_ref, gflops_ref = r.params_reference(), r.gflops_reference()
    notes = []
    if params_ref is None or gflops_ref is None:
        notes.append("no paper value, nothing stored (--record)")
    elif "stored" in (params_ref[1], gflops_ref[1]):
        notes.append("no paper value")
    if base is not None and r.paper_gflops is not None and base.paper_gflops is not None:
        notes.append(f"Δ{r.compared_gflops - base.compared_gflops:+.2f} (paper {r.paper_gflops - base.paper_gflops:+.2f})")
    if r.known_gap:
        notes.append(f"KNOWN GAP: {r.known_gap}")
    return "; ".join(notes)


def _measure_row(row: dict) -> ZooRow:
    return measure(row["name"], row["set"], row["task"], row.get("input"), row=row)


# A worker process starts as a fresh interpreter that imports torch and vitlab (~6 s): about what
# measuring 6 rows costs, so a pool pays off only beyond that many rows per worker.
ROWS_PER_WORKER_START = 6


def measure_rows(rows: list[dict], jobs: int = 1):
    """``measure`` every row, yielding the results in order as they come (up to ``jobs`` processes:
    none for a few rows, which this process measures sooner than a worker could start)."""
    jobs = min(jobs, len(rows) // ROWS_PER_WORKER_START)
    if jobs <= 1:
        yield from map(_measure_row, rows)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter per worker (forking a process that has run torch can hang in OpenMP)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_measure_row, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="backbone config names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override on the backbone config (module.KEY=VALUE: on the task's module, with --task)")
    parser.add_argument("--input", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--task", help="count the full model of this task (e.g. coco_retinanet)")
    parser.add_argument("--rows", action="store_true", help="every row of the papers' tables (ablations included)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row and line (JSON Lines)")
    parser.add_argument("--record", action="store_true",
                        help="with --rows: store the measured values of rows without paper values (measured.yaml)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes that measure rows (default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    if args.record and (not args.rows or args.input):
        parser.error("--record stores the paper-table rows at their own input sizes: use it with --rows, without --input")
    if split_overrides(args.set)[1] and not args.task:
        parser.error(f"--set {' '.join(split_overrides(args.set)[1])}: {MODULE_PREFIX}* overrides set a task's module; "
                     f"add --task")

    names = set(args.names)
    unknown = sorted(names - set(available_backbones()))
    if unknown:
        parser.error(f"unknown backbone(s) {unknown}; available: {', '.join(available_backbones())}")
    every_row = paper_rows()
    if args.rows:
        wanted = [r for r in every_row if not names or r["name"] in names]
    else:
        wanted = [{**(find_paper_row(n, args.set, args.task) or {}), "name": n, "set": args.set, "task": args.task}
                  for n in (args.names or available_backbones())]
    if args.input:
        wanted = [{**r, "input": list(args.input)} for r in wanted]
    by_id = {r["id"]: r for r in every_row if "id" in r}

    table = None if args.json else StreamTable()
    measured, done = [], {}
    for row, got in zip(wanted, measure_rows(wanted, args.jobs)):
        measured.append((row, got))
        if "id" in row:
            done[row["id"]] = got
        if args.json:
            print(json.dumps(got.to_json()), flush=True)
            continue
        base_id = row.get("delta_from")
        base = done.get(base_id) or (_measure_row(by_id[base_id]) if base_id in by_id else None)
        table.add(got, row_note(got, base))
    if table is not None:
        table.console.print("GFLOPs = GMACs; * counted as the paper's mmcv counter counts (attention matmuls left out).")
    if args.record:
        path = record(measured, every_row=not names)
        print(f"stored the measured values of rows without paper values in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
