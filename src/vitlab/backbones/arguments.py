"""Backbone constructor arguments: per-stage values and their validation.

Every family spells a concept the same way (``mlp_ratios``, ``pos_embed: none|ape|...``,
``img_size``, ``depths``), because these names become top-level keys of every run's metadata.
"""
from __future__ import annotations

from typing import Any

from vitlab.errors import VitlabUserError


def per_stage(value: Any, stages: int) -> list:
    """A scalar for every stage, or the list itself (its length is checked by ``check_stages``)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


# --------------------------------------------------------------------------- validation
class BackboneConfigError(VitlabUserError, ValueError):
    """A backbone argument no model can be built from: the message names the config key
    (``backbone.<name>``), the value, and what is allowed. Raised before anything is built."""


def show(value: Any) -> str:
    """A value as it is typed on the command line: ``[1,1]``, ``7``, ``'axial'``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def fail(key: str, value: Any, allowed: str) -> None:
    raise BackboneConfigError(f"backbone.{key}={show(value)}: {allowed}")


def _entries(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_ints(minimum: int = 1, **fields: Any) -> None:
    """Each field (a value or a list of them) holds integers >= ``minimum``."""
    for key, value in fields.items():
        if not all(_is_int(v) and v >= minimum for v in _entries(value)):
            what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
            fail(key, value, f"must be {what}" + (" (one per stage, or one for all)" if isinstance(value, (list, tuple)) else ""))


def check_positive(**fields: Any) -> None:
    """Each field (a number or a list of them) is a number > 0."""
    for key, value in fields.items():
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in _entries(value)):
            fail(key, value, "must be positive numbers" if isinstance(value, (list, tuple)) else "must be a positive number")


def check_rates(**fields: Any) -> None:
    """Dropout / stochastic-depth rates: numbers in [0, 1)."""
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            fail(key, value, "must be a rate in [0, 1)")


def check_choice(key: str, value: Any, options: tuple) -> None:
    if value not in options:
        fail(key, value, f"must be one of {', '.join(map(str, options))}")


def check_stages(**fields: Any) -> int:
    """Per-stage fields (lists; a scalar means every stage) agree on the number of stages, which
    is returned: the length most of them have (ties: the first field's). A field that differs
    is named with the fields that make the count."""
    lengths = {k: len(v) for k, v in fields.items() if isinstance(v, (list, tuple))}
    if not lengths:
        return 1
    counts = [list(lengths.values()).count(n) for n in lengths.values()]
    stages = list(lengths.values())[counts.index(max(counts))]
    for key, n in lengths.items():
        if n != stages:
            agree = [k for k, m in lengths.items() if m == stages]
            raise BackboneConfigError(
                f"backbone.{key}={show(fields[key])} has {n} entries but the model has {stages} stages "
                f"({', '.join(agree)} {'have' if len(agree) > 1 else 'has'} {stages})")
    return stages


def check_divisible(dims_key: str, dims: Any, heads_key: str, heads: Any) -> None:
    """Every stage's width splits evenly over its heads."""
    for c, h in zip(per_stage(dims, len(_entries(heads))), _entries(heads)):
        if c % h:
            fail(dims_key, dims, f"{c} channels do not split over backbone.{heads_key}={show(heads)} ({c} % {h} != 0)")
