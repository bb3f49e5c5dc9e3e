"""Rows of the papers' tables by key, the paper's results on them, and runs matched to them.

A key is ``<paper>:<table>``, e.g. ``pale:Table7``, ``pale:7``, ``scalablevit:5a``:

* paper: the first word of a row's ``source`` in ``src/vitlab/paper_tables/*.yaml``
  ("Pale", "PVT", "PVTv2", "GPViT", "ScalableViT"; any case);
* table: the numbers after "Table" in that source ("Pale Table 1/2" is in tables 1 and 2;
  "GPViT Table 6 (...); Table 7 (...)" in 6 and 7), or the row's ``table:`` key when it has one.

A row's ``paper_<name>`` keys other than params/GFLOPs (``paper_top1``, ``paper_miou``,
``paper_map``, ``paper_mask_map``) are the paper's value of the run metric ``val/<name>``.
``python -m vitlab.compare --paper`` and the W&B dashboard read tables through this module.
"""
from __future__ import annotations

import re
from functools import lru_cache

from vitlab.zoo import paper_rows

# Paper-row keys that are costs, not results.
COST_KEYS = ("paper_params_m", "paper_gflops")
TABLE_RE = re.compile(r"Table\s*(\d+[a-z]?(?:/\d+[a-z]?)*)")


def row_paper(row: dict) -> str:
    return (row.get("source") or "").split(" ", 1)[0].lower()


def row_tables(row: dict) -> set[str]:
    if row.get("table") is not None:
        tables = row["table"] if isinstance(row["table"], list) else [row["table"]]
        return {str(t).lower().replace("table", "").strip() for t in tables}
    return {t.lower() for group in TABLE_RE.findall(row.get("source") or "") for t in group.split("/")}


def parse_key(key: str) -> tuple[str, str]:
    paper, sep, table = key.partition(":")
    table = re.sub(r"^table\s*", "", table.strip().lower())
    if not sep or not paper or not table:
        raise ValueError(f"--paper {key!r}: expected <paper>:<table>, e.g. pale:Table7; available: {', '.join(available_keys())}")
    return paper.strip().lower(), table


def available_keys() -> list[str]:
    return sorted({f"{row_paper(r)}:Table{t}" for r in paper_rows() for t in row_tables(r)})


def table_rows(key: str) -> list[dict]:
    """Every row of one paper table, in file order (the paper's order)."""
    paper, table = parse_key(key)
    rows = [r for r in paper_rows() if row_paper(r) == paper and table in row_tables(r)]
    if not rows:
        raise ValueError(f"--paper {key}: no row of src/vitlab/paper_tables/ cites that table; "
                         f"available: {', '.join(available_keys())}")
    return rows


def paper_metrics(row: dict) -> dict[str, float]:
    """The paper's results on a row as run metric names: ``{"val/top1": 83.4}``."""
    return {f"val/{k[len('paper_'):]}": float(v) for k, v in row.items()
            if k.startswith("paper_") and k not in COST_KEYS and v is not None}


def row_task(run_task: str | None) -> str | None:
    """Paper rows name ImageNet classification ``task: null`` (the zoo's classifier)."""
    return None if run_task in (None, "imagenet_cls") else run_task


@lru_cache(maxsize=None)
def _composed(name: str, overrides: tuple[str, ...]) -> dict:
    from omegaconf import OmegaConf

    from vitlab.api import backbone_config

    return OmegaConf.to_container(backbone_config(name, list(overrides)), resolve=True)


def run_backbone_config(run: dict) -> dict | None:
    """A run's resolved backbone config: stored with the run, else composed from its overrides."""
    if run.get("backbone_config"):
        return run["backbone_config"]
    if not run.get("backbone"):
        return None
    prefix = "backbone."
    sets = tuple(o[len(prefix):] for o in run.get("overrides", []) if o.startswith(prefix))
    return _composed(run["backbone"], sets)


def match_row(rows: list[dict], run: dict) -> dict | None:
    """The table row describing a run: same backbone and task, and the same value of every
    backbone field the table varies (so ablation presets and experiment files match too)."""
    name, task = run.get("backbone"), row_task(run.get("task"))
    candidates = [r for r in rows if r["name"] == name and r["task"] == task]
    if not candidates:
        return None
    cfg = run_backbone_config(run) or {}
    knobs = sorted({s.split("=", 1)[0].lstrip("+~") for r in candidates for s in r["set"]})
    found = [r for r in candidates if all(cfg.get(k) == _composed(name, tuple(r["set"])).get(k) for k in knobs)]
    return found[0] if found else None


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties counted as scipy does); 1: same ordering, -1: reversed."""
    try:
        from scipy.stats import kendalltau
    except ImportError:  # scipy is not a vitlab dependency: tau-b over all pairs, as scipy defines it
        import numpy as np

        x, y = np.asarray(x, float), np.asarray(y, float)
        upper = np.triu_indices(len(x), k=1)
        sx = np.sign(x[:, None] - x[None, :])[upper]
        sy = np.sign(y[:, None] - y[None, :])[upper]
        denom = np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
        return float((sx * sy).sum() / denom) if denom else float("nan")
    return float(kendalltau(x, y).statistic)
