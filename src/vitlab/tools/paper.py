"""The papers' tables by key, the paper's numbers of a row, and the row a run reproduces.

A key is ``<paper>:<table>``: ``pale:Table7``, ``pale:7``, ``Pale:table 7``, ``scalablevit:5a``.
A row of ``src/vitlab/tools/paper_tables/*.yaml`` belongs to paper P when the first word of its
``source`` is P (case-insensitive: ``pale`` -> "Pale Table 7 (...)", ``pvtv2`` -> "PVTv2
Table 2", ``pvt`` -> "PVT Table 2" only), and to every table its ``source`` names: "Table 1/2"
is in Tables 1 and 2, "Table 6 (...); Table 7 (...)" in 6 and 7, "Table 5a" in 5a. Rows from
every file count (the dense rows of several papers live in dense.yaml).

A row's ``paper_<name>`` keys are the paper's numbers: ``paper_params_m`` and ``paper_gflops``
its costs, the others (``paper_top1``, ``paper_miou``, ``paper_map``, ``paper_mask_map``) the
paper's value of the run metric ``val/<name>``. ``python -m vitlab.tools.compare --paper`` and
``python -m vitlab.tools.dashboard --paper`` read the tables through this module.
"""
from __future__ import annotations

import re
from functools import lru_cache

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

TABLE_REF = re.compile(r"\bTable\s+([0-9]+[a-z]?(?:/[0-9]+[a-z]?)*)")
# paper_tables write ``task: null`` for the ImageNet classifier rows.
CLASSIFIER_TASK = "imagenet_cls"
# The paper's numbers that are costs; our column of the same quantity has the same name.
COST_COLUMNS = ("params_m", "gflops")


def all_rows() -> list[dict]:
    from vitlab.tools.zoo import paper_rows

    return paper_rows()


def row_tables(row: dict) -> list[str]:
    """Table keys of one row, e.g. ``["pale:Table7"]``, ``["gpvit:Table6", "gpvit:Table7"]``."""
    source = row.get("source") or ""
    paper = source.split(" ", 1)[0].lower()
    numbers = [n for ref in TABLE_REF.findall(source) for n in ref.split("/")]
    return [f"{paper}:Table{n}" for n in dict.fromkeys(numbers)]


def normalise_key(key: str) -> str:
    """``Pale:Table7`` / ``pale:table 7`` / ``pale:7`` -> ``pale:Table7``."""
    paper, sep, table = key.partition(":")
    table = re.sub(r"^table", "", table.strip().lower().replace(" ", ""))
    if not sep or not paper.strip() or not table:
        raise ValueError(f"--paper {key!r}: expected PAPER:TABLE, e.g. pale:Table7; tables: {', '.join(available_tables())}")
    return f"{paper.strip().lower()}:Table{table}"


def available_tables(rows: list[dict] | None = None) -> list[str]:
    keys = {k for row in (all_rows() if rows is None else rows) for k in row_tables(row)}
    return sorted(keys, key=lambda k: (k.split(":")[0], int(re.match(r"\d+", k.rsplit("Table", 1)[1]).group()), k))


def table_rows(key: str, rows: list[dict] | None = None) -> list[dict]:
    """The rows of one paper table in file order (the paper's order); a clear error naming the
    tables there are when none match."""
    wanted = normalise_key(key)
    rows = all_rows() if rows is None else rows
    found = [row for row in rows if wanted in row_tables(row)]
    if not found:
        raise ValueError(
            f"--paper {key!r}: no row of src/vitlab/tools/paper_tables/*.yaml has a source naming that table; "
            f"tables: {', '.join(available_tables(rows))}"
        )
    return found


def row_task(row: dict) -> str:
    return row.get("task") or CLASSIFIER_TASK


def paper_values(row: dict) -> dict[str, float]:
    """The paper's numbers of a row, keyed as in the table file: ``{"paper_top1": 83.4, "paper_gflops": 4.2}``."""
    return {k: v for k, v in row.items() if k.startswith("paper_") and v is not None}


def our_column(paper_key: str) -> str:
    """Our column holding the quantity of a paper key: ``paper_top1`` -> ``val/top1``, ``paper_gflops`` -> ``gflops``."""
    name = paper_key.removeprefix("paper_")
    return name if name in COST_COLUMNS else f"val/{name}"


def paper_key(metric: str) -> str:
    """The paper key of one of our metrics: ``val/top1`` -> ``paper_top1``."""
    return "paper_" + metric.removeprefix("val/")


@lru_cache(maxsize=None)
def resolved_backbone(name: str, overrides: tuple[str, ...] = ()) -> dict:
    """``conf/backbone/<name>.yaml`` with overrides, resolved (cached: treat the dict as read-only)."""
    from vitlab.api import backbone_config

    return OmegaConf.to_container(backbone_config(name, list(overrides)), resolve=True)


def run_backbone_config(run: dict) -> dict | None:
    """A run's resolved backbone config: the one stored with the run, else composed from its overrides."""
    stored = (run.get("run_config") or {}).get("backbone")
    if stored:
        try:
            return OmegaConf.to_container(OmegaConf.create(run["run_config"]).backbone, resolve=True)
        except InterpolationResolutionError:  # e.g. ${hydra:...}, known only inside the run: compose instead
            pass
    if not run.get("backbone"):
        return None
    sets = tuple(o.removeprefix("backbone.") for o in run.get("overrides", []) if o.startswith("backbone."))
    return resolved_backbone(run["backbone"], sets)


def match_row(rows: list[dict], run: dict) -> dict | None:
    """The row a run reproduces: same backbone and task, and the same resolved value of every
    backbone field the rows set (so ablation presets and experiment files match too, and
    ``c_ratios=[1,1,1,1]`` matches a run's ``[1.0, 1.0, 1.0, 1.0]``; head options, ``module.*``,
    are not compared); of several, the most specific."""
    from vitlab.tools.zoo import split_overrides

    name, task = run.get("backbone"), run.get("task") or CLASSIFIER_TASK
    candidates = [(r, split_overrides(r.get("set", []))[0]) for r in rows if r["name"] == name and row_task(r) == task]
    if not candidates:
        return None
    cfg = run_backbone_config(run) or {}
    knobs = sorted({s.split("=", 1)[0].lstrip("+~") for _, sets in candidates for s in sets})
    found = [(r, sets) for r, sets in candidates if all(cfg.get(k) == resolved_backbone(name, sets).get(k) for k in knobs)]
    return max(found, key=lambda found_row: len(found_row[1]), default=(None,))[0]


@lru_cache(maxsize=None)
def model_counts(name: str, overrides: tuple[str, ...] = (), task: str | None = None,
                 input_size: tuple[int, int] | None = None) -> tuple[float, float]:
    """Params (M) and GMACs of a model as ``vitlab.tools.zoo.measure`` counts it (meta device), once per
    process: a paper row's model (compare) or a sweep job's (plan)."""
    from vitlab.tools.zoo import measure

    row = measure(name, list(overrides), task, input_size)
    return row.params / 1e6, row.gflops


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (ties counted as scipy does); 1: same ordering, -1: reversed."""
    try:
        from scipy.stats import kendalltau
    except ImportError:  # scipy is optional for users: tau-b over all pairs, as scipy defines it
        import numpy as np

        x, y = np.asarray(x, float), np.asarray(y, float)
        upper = np.triu_indices(len(x), k=1)
        sx = np.sign(x[:, None] - x[None, :])[upper]
        sy = np.sign(y[:, None] - y[None, :])[upper]
        denom = np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy))
        return float((sx * sy).sum() / denom) if denom else float("nan")
    return float(kendalltau(x, y).statistic)
