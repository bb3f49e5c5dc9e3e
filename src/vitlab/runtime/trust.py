"""What a config may instantiate: exactly the classes vitlab's own configs name.

A checkpoint's stored run config is rebuilt into objects; a crafted file could otherwise
name any importable callable (``os.system``, ``torch.load`` of a pickle, ``torch.hub.load``).
A prefix rule ("anything under torch.") is not enough, so the rule is an allow-list: the
``_target_`` values found in the shipped ``conf/`` tree, nothing else, and of Hydra's special
keys only ``_target_`` (no ``_args_``, ``_partial_``, ``_recursive_``, ``_convert_``: our
configs never need them). Adding a config that names a new class extends the list by itself; a path
from before a module moved is checked as its current path (``vitlab.runtime.aliases``).
"""
from __future__ import annotations

import re
from functools import cache
from typing import Any

from omegaconf import DictConfig, ListConfig

from vitlab.errors import VitlabUserError
from vitlab.runtime.aliases import current
from vitlab.runtime.resources import conf_dir

_TARGET_LINE = re.compile(r"^\s*_target_:\s*([\w.]+)\s*(#.*)?$")
# Hydra's own launcher plugins are instantiated by Hydra, never from a stored config.
_NOT_FROM_STORED_CONFIGS = ("hydra_plugins.",)


class UntrustedTargetError(VitlabUserError, ValueError):
    pass


@cache
def allowed_targets() -> frozenset[str]:
    """Every ``_target_`` written in the configs under ``conf/`` (the allow-list)."""
    found = set()
    for path in conf_dir().rglob("*.yaml"):
        for line in path.read_text().splitlines():
            match = _TARGET_LINE.match(line)
            if match and not match.group(1).startswith(_NOT_FROM_STORED_CONFIGS):
                found.add(match.group(1))
    return frozenset(found)


def check_targets(cfg: Any, where: str = "config") -> None:
    """Raise ``UntrustedTargetError`` unless every ``_target_`` in ``cfg`` is on the allow-list
    and no other Hydra special key (``_args_``, ``_partial_``, ...) appears."""
    if isinstance(cfg, (DictConfig, dict)):
        for key, value in cfg.items():
            key = str(key)
            if key == "_target_":
                if not (isinstance(value, str) and current(value) in allowed_targets()):
                    raise UntrustedTargetError(
                        f"{where}: refusing to instantiate _target_={value!r}: a config may only name the "
                        f"classes vitlab's own configs use ({len(allowed_targets())} of them, under conf/)"
                    )
            elif key.startswith("_") and key.endswith("_"):
                raise UntrustedTargetError(
                    f"{where}: refusing the special key {key}={value!r}: vitlab's configs use only _target_"
                )
            check_targets(value, f"{where}.{key}")
    elif isinstance(cfg, (ListConfig, list, tuple)):
        for i, value in enumerate(cfg):
            check_targets(value, f"{where}[{i}]")
