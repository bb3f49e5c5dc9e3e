"""Recipes as checked data: each recipe experiment (conf/experiment/) against the official config it follows.

    python -m vitlab.tools.recipes                        # every recipe: setting | backbones | official | ours | note
    python -m vitlab.tools.recipes pvtv2_maskrcnn_1x      # one recipe
    python -m vitlab.tools.recipes --differences          # only the settings where ours differs (each with its reason)
    python -m vitlab.tools.recipes --markdown             # docs/recipes.md's tables (what it follows; every difference kept)

The official values live in ``src/vitlab/tools/recipes/<family>.yaml``, one entry per experiment::

    pvtv2_maskrcnn_1x:
      follows: whai362/PVT detection/configs/mask_rcnn_pvt_v2_b*_fpn_1x_coco.py   # repository + path, or paper section
      backbones: [pvt_v2_b0, ...]      # the variants it is for: each is composed and checked
      bases: [mmdet_1x, mmdet_maskrcnn]   # shared official values (_bases.yaml: the mmdet/mmseg base configs)
      official: {schedule.optimizer.lr: 2.0e-4, ...}   # config key -> the official value
      variants: {pvt_v2_b4: {schedule.optimizer.lr: 1.4286e-4, ...}}   # official values of one variant
      notes: {config key: why ours differs}            # a difference without a note fails tests/test_recipes.py
      other: [{setting, official, ours, note}]         # official settings no config key expresses
                                                       # (bases may list some too, under _other; an
                                                       # optional `backbones:` limits a row to those)

"Ours" is the composed config of ``experiment=<name> backbone=<variant>`` (Hydra, as the CLI composes it,
per-variant files under conf/recipe_variant/ included).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

DATA_DIR = Path(__file__).parent
_ABSENT = "<absent>"


class _Loader(yaml.SafeLoader):
    """YAML with ``1e-4`` read as a float (YAML 1.1 wants ``1.0e-4``), as OmegaConf reads configs."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


@dataclass
class Row:
    setting: str
    backbones: list[str]
    official: Any
    ours: Any
    note: str | None

    @property
    def differs(self) -> bool:
        return not same(self.official, self.ours)


def same(a: Any, b: Any) -> bool:
    """Equal as config values: numbers to 1e-4 relative (official values like 2e-4 / 1.4 are written to
    five digits), containers element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@cache
def load() -> dict[str, dict]:
    """Every recipe entry (``_bases.yaml`` merged in), by experiment name."""
    bases = yaml.load((DATA_DIR / "_bases.yaml").read_text(), Loader=_Loader)
    recipes = {}
    for path in sorted(DATA_DIR.glob("[!_]*.yaml")):
        for name, entry in (yaml.load(path.read_text(), Loader=_Loader) or {}).items():
            official, other = {}, []
            for base in entry.get("bases", []):
                official.update({k: v for k, v in bases[base].items() if k != "_other"})
                other += bases[base].get("_other", [])
            official.update(entry.get("official") or {})
            recipes[name] = {**entry, "official": official, "other": other + (entry.get("other") or []),
                             "file": path.name}
    return recipes


@cache
def compose_recipe(experiment: str, backbone: str):
    """The config ``python src/train.py experiment=<experiment> backbone=<backbone>`` runs."""
    from vitlab.runtime.config import compose

    return compose("train", [f"experiment={experiment}", f"backbone={backbone}"])


def ours(cfg, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check(experiment: str) -> list[Row]:
    """The rows of one recipe: per setting, identical rows of its variants merged into one."""
    recipe = load()[experiment]
    notes = recipe.get("notes") or {}
    merged: dict[tuple, Row] = {}
    for backbone in recipe["backbones"]:
        cfg = compose_recipe(experiment, backbone)
        official = {**recipe["official"], **(recipe.get("variants") or {}).get(backbone, {})}
        for key, value in official.items():
            row = Row(key, [backbone], value, ours(cfg, key), notes.get(key))
            ident = (key, repr(row.official), repr(row.ours))
            if ident in merged:
                merged[ident].backbones.append(backbone)
            else:
                merged[ident] = row
    rows = list(merged.values())
    for other in recipe.get("other") or []:
        rows.append(Row(other["setting"], list(other.get("backbones", recipe["backbones"])), other["official"],
                        other["ours"], other.get("note")))
    return rows


def recipe_experiments() -> list[str]:
    """Every experiment under conf/experiment/ except the demos: each must have a recipe entry."""
    from vitlab.runtime.resources import conf_dir

    return sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml") if not p.stem.startswith("demo"))


def _show(value: Any) -> str:
    if value == _ABSENT:
        return "(absent)"
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, dict) and len(str(value)) > 60:
        return yaml.safe_dump(value, default_flow_style=None, sort_keys=False, width=60).strip()
    return str(value)


def _cell(value: Any) -> str:
    text = _show(value) if not isinstance(value, dict) else yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """The two tables of docs/recipes.md: what each recipe follows, and every difference it keeps."""
    lines = ["| experiment | follows | backbones |", "| --- | --- | --- |"]
    for name, recipe in load().items():
        lines.append(f"| `{name}` | {_cell(recipe['follows'])} | {', '.join(recipe['backbones'])} |")
    lines += ["", "| experiment | setting | backbones | official | ours | why |", "| --- | --- | --- | --- | --- | --- |"]
    for name, recipe in load().items():
        for row in check(name):
            if row.differs:
                who = "all" if len(row.backbones) == len(recipe["backbones"]) else ", ".join(row.backbones)
                lines.append(f"| `{name}` | {_cell(row.setting)} | {who} | {_cell(row.official)} | {_cell(row.ours)} | "
                             f"{_cell(row.note or 'MISSING')} |")
    return "\n".join(lines) + "\n"


def print_table(experiment: str, rows: list[Row], only_differences: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    recipe = load()[experiment]
    table = Table(title=f"{experiment}: follows {recipe['follows']}", title_justify="left", show_lines=False)
    for col in ("setting", "backbones", "official", "ours", "note"):
        table.add_column(col, overflow="fold")
    everyone = len(recipe["backbones"])
    for row in rows:
        if only_differences and not row.differs:
            continue
        who = "all" if len(row.backbones) == everyone else ", ".join(row.backbones)
        mark = "[red]" if row.differs and not row.note else ("[yellow]" if row.differs else "")
        table.add_row(row.setting, who, _show(row.official), f"{mark}{_show(row.ours)}",
                      row.note or ("MISSING: ours differs" if row.differs else ""))
    Console(width=200).print(table)
