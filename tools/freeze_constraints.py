"""Write constraints.txt: the exact versions of everything vitlab and all its extras pull in, as
installed in the environment the tests passed in (``make install`` installs with ``-c constraints.txt``).

    .venv/bin/python tools/freeze_constraints.py > constraints.txt

``pip freeze`` restricted to vitlab's dependency closure (read from pyproject.toml and the installed
packages' metadata), so tools that happen to sit in the same environment are not pinned. Left out:
vitlab, torch and torchvision (the Makefile's TORCH line pins them) and the CUDA / triton wheels torch
pins itself; pip, setuptools and wheel (build tools, as ``pip freeze`` leaves them out).
"""
from __future__ import annotations

import platform
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
TORCH = {"torch", "torchvision"}
BUILD_TOOLS = {"pip", "setuptools", "wheel"}


def _requirements(dist_name: str, extras: set[str]) -> list[Requirement]:
    """The installed package's requirements that apply here (markers evaluated with its extras)."""
    reqs = []
    for line in distribution(dist_name).requires or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            reqs.append(req)
    return reqs


def _closure(roots: list[Requirement], skip=lambda parent, req: False) -> dict[str, str]:
    """canonical name -> installed version of every package reachable from ``roots``."""
    found: dict[str, str] = {}
    todo = [(None, r) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        parent, req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen or skip(parent, req):
            continue
        seen.add(key)
        try:
            found[name] = distribution(req.name).version
        except PackageNotFoundError:
            continue  # an optional dependency this environment does not need
        todo += [(name, r) for r in _requirements(req.name, set(req.extras))]
    return found


def _pinned_by_torch(parent: str | None, req: Requirement) -> bool:
    """torch's own exact or capped pins (CUDA wheels, triton) come with torch's install."""
    return parent == "torch" and any(s.operator in ("==", "~=", "<", "<=") for s in req.specifier)


def constraints() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [d for deps in project["optional-dependencies"].values() for d in deps]
    found = _closure([Requirement(line) for line in lines], _pinned_by_torch)
    return {name: v for name, v in sorted(found.items()) if name not in TORCH | BUILD_TOOLS | {"vitlab"}}


def main() -> None:
    py = ".".join(platform.python_version_tuple()[:2])
    print("# Versions vitlab's tests passed with; `make install` installs with `pip install -c constraints.txt`.")
    print("# Written by tools/freeze_constraints.py (its docstring says what is left out and why); rerun it")
    print(f"# after changing dependencies. Tested on Python {py}; the pins apply from that Python on (older")
    print("# ones lack wheels of these versions and resolve freely).")
    for name, version in constraints().items():
        print(f'{name}=={version} ; python_version >= "{py}"')


if __name__ == "__main__":
    sys.exit(main())
