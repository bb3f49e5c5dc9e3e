"""The papers' tables as keys: ``pale:Table7`` names the rows of ``paper_tables/*.yaml`` from
Table 7 of the Pale paper, and a run finds its row by backbone, ablation fields and task.

A row belongs to paper P when the first word of its ``source`` is P (case-insensitive:
``pale`` -> "Pale Table 7 (...)", ``pvtv2`` -> "PVTv2 Table 2", ``pvt`` -> "PVT Table 2" only),
and to every table its ``source`` names: "Table 1/2" is in Tables 1 and 2, "Table 6 (...);
Table 7 (...)" in 6 and 7, "Table 5a" in 5a. Rows from every file count (the dense
rows of several papers live in dense.yaml).
"""
from __future__ import annotations

import re
from typing import Any

import yaml

TABLE_REF = re.compile(r"\bTable\s+([0-9]+[a-z]?(?:/[0-9]+[a-z]?)*)")
# paper_tables write ``task: null`` for the ImageNet classifier rows.
CLASSIFIER_TASK = "imagenet_cls"


def all_rows() -> list[dict]:
    from vitlab.zoo import paper_rows

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
        raise ValueError(f"--paper {key!r}: expected PAPER:TABLE, e.g. pale:Table7 (see `available_tables()`)")
    return f"{paper.strip().lower()}:Table{table}"


def available_tables(rows: list[dict] | None = None) -> list[str]:
    keys = {k for row in (all_rows() if rows is None else rows) for k in row_tables(row)}
    return sorted(keys, key=lambda k: (k.split(":")[0], int(re.match(r"\d+", k.rsplit("Table", 1)[1]).group()), k))


def table_rows(key: str, rows: list[dict] | None = None) -> list[dict]:
    """The rows of one paper table; a clear error naming the tables there are when none match."""
    wanted = normalise_key(key)
    rows = all_rows() if rows is None else rows
    found = [row for row in rows if wanted in row_tables(row)]
    if not found:
        raise ValueError(
            f"--paper {key!r}: no row of src/vitlab/paper_tables/*.yaml has a source naming that table; "
            f"tables: {', '.join(available_tables(rows))}"
        )
    return found


def parse_value(text: str) -> Any:
    """A Hydra override value as data (``[1,3,5,7]`` -> list, ``3`` -> int), to compare rows and runs."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def as_data(value: Any) -> Any:
    return parse_value(value) if isinstance(value, str) else value


def row_matches(row: dict, backbone: str | None, fields: dict[str, Any], task: str | None) -> bool:
    """Does a run (backbone config name, its backbone field values, its task) reproduce this row?"""
    if row["name"] != backbone or (task is not None and (row.get("task") or CLASSIFIER_TASK) != task):
        return False
    return all(
        key in fields and as_data(fields[key]) == parse_value(value)
        for key, value in (item.split("=", 1) for item in row.get("set", []))
    )


def find_row(rows: list[dict], backbone: str | None, fields: dict[str, Any], task: str | None) -> dict | None:
    """The most specific matching row (the one that sets the most fields)."""
    matches = [row for row in rows if row_matches(row, backbone, fields, task)]
    return max(matches, key=lambda row: len(row.get("set", [])), default=None)


def paper_values(row: dict) -> dict[str, Any]:
    """The paper's numbers of a row: every ``paper_<name>`` field, keyed by ``<name>``."""
    return {k.removeprefix("paper_"): v for k, v in row.items() if k.startswith("paper_") and v is not None}
