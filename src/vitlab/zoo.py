"""Parameter counts and GFLOPs of every backbone config, side by side with the papers.

    python -m vitlab.zoo                                   # every backbone config
    python -m vitlab.zoo pale_t --set attn_mode=axial      # an ablation row
    python -m vitlab.zoo --rows                            # every row of the papers' tables
    python -m vitlab.zoo scalablevit_s --task ade20k_fpn   # the full task model
    python -m vitlab.zoo pvt_v2_b2 --json

GFLOPs are multiply-adds at the paper's input size (see ``vitlab.flops``); models are
built on the meta device, so counting even the largest is instant and needs no memory.
The papers' numbers live in ``src/vitlab/paper_tables/*.yaml``, one file per family. A row
may carry an ``id``; ``delta_from: <id>`` compares its GFLOPs difference from that row with the
paper's (the note column); ``known_gap: <reason>`` marks a row not reproduced within tolerance.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from vitlab.api import available_backbones, backbone_config
from vitlab.build import build_backbone, build_classifier
from vitlab.flops import count_gmacs, count_params

TABLES_DIR = Path(__file__).parent / "paper_tables"
DEFAULT_INPUT = (224, 224)
# Classes of the datasets the dense tasks are counted with (the papers' models).
TASK_CLASSES = {"coco": 80, "ade20k": 150}
# The papers' input sizes for dense-task FLOPs (COCO: 1280x800 as mmdet counts; ADE20K: 512x512 crops).
TASK_INPUT = {"coco": (800, 1280), "ade20k": (512, 512)}


@dataclass
class ZooRow:
    name: str
    overrides: list[str]
    task: str | None
    input: list[int]
    params: int
    gflops: float
    paper_params: float | None  # millions
    paper_gflops: float | None
    official_params: int | None = None
    scope: str = "classifier"
    source: str | None = None
    row_id: str | None = None  # the paper row's ``id``, which other rows' ``delta_from`` name
    delta_from: str | None = None  # the row whose GFLOPs this row's paper delta is measured from
    known_gap: str | None = None  # why this row is not reproduced within tolerance

    @property
    def params_diff(self) -> float | None:
        ref = self.official_params or (self.paper_params * 1e6 if self.paper_params else None)
        return None if not ref else 100 * (self.params - ref) / ref

    @property
    def gflops_diff(self) -> float | None:
        return None if not self.paper_gflops else 100 * (self.gflops - self.paper_gflops) / self.paper_gflops


def paper_rows() -> list[dict]:
    rows = []
    for path in sorted(TABLES_DIR.glob("*.yaml")):
        for row in yaml.safe_load(path.read_text()) or []:
            row.setdefault("set", [])
            row.setdefault("task", None)
            row.setdefault("input", list(DEFAULT_INPUT))
            row["table_file"] = path.name
            rows.append(row)
    return rows


def find_paper_row(name: str, overrides: list[str], task: str | None) -> dict | None:
    for row in paper_rows():
        if row["name"] == name and sorted(row["set"]) == sorted(overrides) and row["task"] == task:
            return row
    return None


def build_task_model(name: str, overrides: list[str], task: str) -> torch.nn.Module:
    """The full model of a dense task (backbone + neck + heads), as the papers count it: the task
    class's own ``build_model`` with the real dataset's class count and the papers' input size."""
    from hydra import compose, initialize_config_dir

    from vitlab.build import locate
    from vitlab.data.base import DatasetInfo
    from vitlab.resources import conf_dir
    from vitlab.trust import check_targets

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", f"backbone={name}", *(f"backbone.{o}" for o in overrides),
                                          "backbone.pretrained=null"])  # counting needs no weights
    module_cfg = OmegaConf.to_container(cfg.module, resolve=True)  # not `paths`: no Hydra run here
    check_targets(module_cfg, "module")
    dataset = task.split("_")[0]
    info = DatasetInfo(class_names=tuple(str(i) for i in range(TASK_CLASSES[dataset])), input_size=TASK_INPUT[dataset],
                       with_masks=bool(cfg.data.get("with_masks", False)))
    return locate(module_cfg["_target_"]).build_model(OmegaConf.to_container(cfg.backbone, resolve=True),
                                                       module_cfg, info)


def build_for_count(name: str, overrides: list[str], task: str | None, scope: str) -> torch.nn.Module:
    with torch.device("meta"):  # no memory, no init cost: counting only
        if task:
            return build_task_model(name, overrides, task)
        cfg = backbone_config(name, overrides)
        return build_backbone(cfg) if scope == "backbone" else build_classifier(cfg, 1000)


def task_gmacs(name: str, overrides: list[str], task: str, size: tuple[int, int]) -> float:
    """Detectors' post-processing (top-k, NMS) is data-dependent, so it cannot run on the
    meta device: count those on a real CPU forward of a random image (seconds)."""
    try:
        return count_gmacs(build_for_count(name, overrides, task, "classifier"), size)
    except (NotImplementedError, RuntimeError):
        torch.manual_seed(0)
        return count_gmacs(build_task_model(name, overrides, task), size)


def measure(
    name: str, overrides: list[str] | None = None, task: str | None = None, input_size=None, scope: str | None = None,
    flops: bool = True,
) -> ZooRow:
    overrides = list(overrides or [])
    row = find_paper_row(name, overrides, task) or {}
    scope = scope or row.get("params_scope", "classifier")
    size = tuple(input_size or row.get("input") or TASK_INPUT.get((task or "").split("_")[0], DEFAULT_INPUT))
    model = build_for_count(name, overrides, task, scope)
    if not flops:
        gmacs = float("nan")
    elif task:
        gmacs = task_gmacs(name, overrides, task, size)
    else:
        gmacs = count_gmacs(model, size)
    return ZooRow(
        name=name,
        overrides=overrides,
        task=task,
        input=list(size),
        params=count_params(model),
        gflops=round(gmacs, 3),
        paper_params=row.get("paper_params_m"),
        paper_gflops=row.get("paper_gflops"),
        official_params=row.get("official_params"),
        scope=scope,
        source=row.get("source"),
        row_id=row.get("id"),
        delta_from=row.get("delta_from"),
        known_gap=row.get("known_gap"),
    )


def print_table(rows: list[ZooRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v):
        return "" if v is None else f"{v:+.1f}%"

    def note(r: ZooRow) -> str:  # the GFLOPs delta from the baseline row (when measured too), known gaps
        base = next((b for b in rows if r.delta_from and b.row_id == r.delta_from), None)
        parts = []
        if base is not None and r.paper_gflops is not None and base.paper_gflops is not None:
            parts.append(f"Δ{r.gflops - base.gflops:+.2f} (paper {r.paper_gflops - base.paper_gflops:+.2f})")
        if r.known_gap:
            parts.append(f"KNOWN GAP: {r.known_gap}")
        return " ".join(parts)

    table = Table(title="vitlab zoo: measured vs paper (GFLOPs = GMACs)")
    for col in ("name", "overrides", "task", "input", "params (M)", "paper / official", "diff", "GFLOPs", "paper", "diff",
                "note"):
        table.add_column(col)
    for r in rows:
        ref = f"{r.official_params / 1e6:.3f} (code)" if r.official_params else (f"{r.paper_params}" if r.paper_params else "")
        table.add_row(
            r.name, " ".join(r.overrides), r.task or "", "x".join(map(str, r.input)),
            f"{r.params / 1e6:.3f}" + (" bb" if r.scope == "backbone" else ""), ref, pct(r.params_diff),
            f"{r.gflops:.2f}", "" if r.paper_gflops is None else f"{r.paper_gflops}", pct(r.gflops_diff), note(r),
        )
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="backbone config names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override on the backbone config")
    parser.add_argument("--input", nargs=2, type=int, metavar=("H", "W"))
    parser.add_argument("--task", help="count the full model of this task (e.g. coco_retinanet)")
    parser.add_argument("--rows", action="store_true", help="every row of the papers' tables (ablations included)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.rows:
        wanted = [(r["name"], r["set"], r["task"]) for r in paper_rows() if not args.names or r["name"] in args.names]
    else:
        names = args.names or available_backbones()
        unknown = sorted(set(names) - set(available_backbones()))
        if unknown:
            parser.error(f"unknown backbone(s) {unknown}; available: {', '.join(available_backbones())}")
        wanted = [(n, args.set, args.task) for n in names]
    rows = [measure(n, s, t, args.input) for n, s, t in wanted]
    if args.json:
        print(json.dumps([
            {"name": r.name, "overrides": r.overrides, "task": r.task, "input": r.input, "params": r.params,
             "gflops": r.gflops, "paper_params": r.paper_params, "paper_gflops": r.paper_gflops} for r in rows
        ], indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
