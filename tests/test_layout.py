"""The package layout: old checkpoints keep loading after modules move (``vitlab.runtime.aliases``), and the
import graph of ``src/vitlab`` follows the layer list of docs/design.md (no upward imports, no circles)."""
from __future__ import annotations

import ast
import graphlib
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from support import REPO
from vitlab.runtime.aliases import MOVED, current
from vitlab.runtime.build import instantiate, locate
from vitlab.runtime.trust import check_targets

# Written by vitlab 0.1.0 before the runtime / tools move (commit 6691f66): the tiny PVTv2 of
# tests/support.py TINY_PVT trained one epoch of `experiment=demo` at 32 px (optimizer state and
# run paths stripped). The run measured val/top1 48.5 and val/top5 92.5 on the generated data.
OLD_CKPT = REPO / "tests" / "fixtures" / "pvt_v2_tiny_run_0.1.0.ckpt"
RECORDED = {"val/top1": 48.5, "val/top5": 92.5}


def test_a_checkpoint_written_before_the_move_evaluates_to_its_recorded_score(tmp_path, data_dir, eval_run):
    synthetic = data_dir / "synthetic" / "imagenet_10c_64px_seed42"  # the stored run's generated data, made anew
    summary = eval_run(tmp_path / "eval", OLD_CKPT, f"+overrides.data.root={data_dir / 'imagenet'}",
                       f"+overrides.data.synthetic_root={synthetic}")
    assert {k: summary[k] for k in RECORDED} == pytest.approx(RECORDED, abs=1e-6)


def test_the_old_paths_a_stored_config_names_still_build():
    stored = torch.load(OLD_CKPT, map_location="cpu", weights_only=True)["vitlab_config"]
    old = [stored["callbacks"]["last_checkpoint"], stored["logger"]["csv"]]
    assert {node["_target_"] for node in old} == {"vitlab.callbacks.LastCheckpoint", "vitlab.loggers.ResumableCSVLogger"}
    for node in old:
        check_targets(node)  # the allow-list accepts the old path
        assert type(instantiate({**node, "dirpath" if "dirpath" in node else "save_dir": "unused"})).__name__ == \
            node["_target_"].rsplit(".", 1)[1]


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_alias_names_a_module_that_exists_and_no_old_module_is_left(old):
    importlib.import_module(MOVED[old])
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    assert current(old + ".Thing") == MOVED[old] + ".Thing"
    assert locate(old + ".__name__") == MOVED[old]


# ---- the import graph ------------------------------------------------------------------
SRC = REPO / "src"
DESIGN = REPO / "docs" / "design.md"


def layers() -> list[list[str]]:
    """The layer list of docs/design.md ("What goes where"), lowest first: the one place it is written."""
    text = DESIGN.read_text()
    block = re.search(r"## What goes where\n.*?```text\n(.*?)```", text, re.S)
    assert block, f"{DESIGN}: no ```text layer list under '## What goes where'"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "vitlab").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported vitlab module, line) of every import in the file, also those inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from pkg import module` imports the module
                found.append((f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno))
    return [(m, line) for m, line in found if m == "vitlab" or m.startswith("vitlab.")]


def layer_of(name: str, order: list[list[str]]) -> int | None:
    """The line of the longest name that is ``name`` or a package holding it."""
    best = None
    for i, line in enumerate(order):
        for entry in line:
            if name == entry or (entry != "vitlab" and name.startswith(entry + ".")):
                if best is None or len(entry) > len(best[1]):
                    best = (i, entry)
    return None if best is None else best[0]


def graph() -> dict[str, list[tuple[str, int]]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer_and_every_listed_name_exists():
    order, found = layers(), modules()
    assert [n for n in found if layer_of(n, order) is None] == []
    assert [e for line in order for e in line if not any(n == e or n.startswith(e + ".") for n in found)] == []


def test_no_module_imports_from_a_layer_above_its_own():
    order, found = layers(), modules()
    upward = [f"{found[name].relative_to(SRC)}:{line}: {name} (layer {layer_of(name, order)}) imports {dep} "
              f"(layer {layer_of(dep, order)})"
              for name, deps in graph().items() for dep, line in deps
              if layer_of(dep, order) is not None and layer_of(dep, order) > layer_of(name, order)]
    assert upward == []


def test_no_import_circles():
    edges = {name: {dep for dep, _ in deps if dep != name} for name, deps in graph().items()}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


def test_the_checks_catch_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The graph test sees what it must: a backbone importing the run (up) and the old build <-> weights circle."""
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    for name, text in {"__init__": "", "backbones/__init__": "", "backbones/x": "from vitlab.runtime import run\n",
                       "runtime/__init__": "", "runtime/run": "def f():\n    from vitlab.backbones import x\n",
                       }.items():
        (tmp_path / "vitlab" / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "vitlab" / f"{name}.py").write_text(text)
    with pytest.raises(AssertionError, match=r"vitlab.backbones.x \(layer 0\) imports vitlab.runtime.run"):
        test_no_module_imports_from_a_layer_above_its_own()
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circles()
