"""Backbone constructor arguments: the names of earlier versions, and per-stage values.

Every family spells a concept the same way (``mlp_ratios``, ``pos_embed: none|ape|...``,
``img_size``, ``depths``), because these names become top-level keys of every run's
metadata. Configs stored by earlier runs (checkpoints' ``.hydra``) use older names;
``renamed_arguments`` maps them with a ``DeprecationWarning`` so those runs still load.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable


def renamed_arguments(names: dict[str, str] | None = None, values: dict[str, dict] | None = None) -> Callable:
    """Decorator for a backbone ``__init__``: ``names`` maps an old argument name to the current
    one; ``values`` maps an argument to {old value: current value} (e.g. PVT's ``pos_embed``
    was a bool). Only values of the old values' type are mapped (``True`` is not ``1``)."""
    names, values = names or {}, values or {}

    def wrap(init: Callable) -> Callable:
        @functools.wraps(init)  # inspect.signature still shows the current arguments
        def init_with_old_names(self, *args, **kwargs):
            family = type(self).__name__
            for old, new in names.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{family}: got both backbone.{old} (its old name) and backbone.{new}")
                    warnings.warn(f"{family}: backbone.{old} is now backbone.{new}", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            for name, mapping in values.items():
                value = kwargs.get(name)
                if any(type(value) is type(old) and value == old for old in mapping):
                    warnings.warn(f"{family}: backbone.{name}={value} is now backbone.{name}={mapping[value]}",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[name] = mapping[value]
            return init(self, *args, **kwargs)

        return init_with_old_names

    return wrap


def per_stage(value: Any, stages: int) -> list:
    """A scalar for every stage, or the list itself (its length is checked by ``check_stages``)."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages
