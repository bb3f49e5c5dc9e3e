"""A regular (non-editable) install works: the wheel carries the configs and the papers' tables,
and the API, the zoo and the console scripts run from another directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

SOURCES = ("conf", "src", "setup.py", "pyproject.toml", "README.md")  # what a source distribution holds


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources, installed (without dependencies: the test
    environment has them) into a folder of its own."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w",
                            str(root / "dist"), str(src)], check=True, capture_output=True, text=True, cwd=root)
    (root / "build.log").write_text(build.stdout + build.stderr)  # -v: setuptools' own messages
    wheel = next((root / "dist").glob("vitlab-*.whl"))
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, cwd=root)
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "VITLAB_OUTPUT": str(cwd / "outputs"),
           "VITLAB_DATA": str(cwd / "data"), "WANDB_MODE": "offline"}
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_wheel_holds_configs_and_tables(installed):
    assert (installed / "vitlab" / "conf" / "train.yaml").is_file()
    assert (installed / "vitlab" / "conf" / "backbone" / "pvt_v2_b0.yaml").is_file()
    assert list((installed / "vitlab" / "tools" / "paper_tables").glob("*.yaml"))


def test_the_build_warns_about_no_package_data(installed):
    """Configs and tables are declared as setuptools documents it (setup.py), so its build says nothing
    about them (it printed 33 "Package would be ignored" warnings, ~1,400 lines, before)."""
    log = (installed.parent / "build.log").read_text()
    assert "copying conf/backbone/pvt_v2_b0.yaml" in log  # the log is setuptools' verbose one
    for warning in ("Package would be ignored", "as data is deprecated", "is absent from the `packages`"):
        assert warning not in log


def test_api_and_zoo_from_another_directory(installed, tmp_path):
    """The API, then ``python -m vitlab.tools.zoo pvt_v2_b0`` (runpy's ``-m``), in one fresh interpreter."""
    code = ("import runpy, sys, vitlab, vitlab.runtime.resources as r; m = vitlab.create_model('pvt_v2_b0', num_classes=3); "
            "print(vitlab.__file__, r.conf_dir(), sum(p.numel() for p in m.parameters()), flush=True); "
            "sys.argv = ['vitlab.tools.zoo', 'pvt_v2_b0']; runpy._run_module_as_main('vitlab.tools.zoo')")
    first, _, zoo = run_installed(installed, tmp_path, sys.executable, "-c", code).stdout.partition("\n")
    out = first.split()
    assert out[0].startswith(str(installed)) and out[1] == str(installed / "vitlab" / "conf")
    assert int(out[2]) > 3_000_000
    assert "pvt_v2_b0" in zoo and "3.667" in zoo  # 3,666,760 params (official code)


def test_console_scripts_train_and_eval(installed, tmp_path):
    bin_dir = installed / "bin"
    run_installed(installed, tmp_path, str(bin_dir / "vitlab-train"), "experiment=demo", "debug=smoke",
                  "backbone.depths=[1,1,1,1]")
    ckpt = next((tmp_path / "outputs").glob("imagenet_cls/pvt_v2_b0/*/checkpoints/last.ckpt"))
    out = run_installed(installed, tmp_path, str(bin_dir / "vitlab-eval"), f"ckpt_path={ckpt}").stdout
    assert "val/top1" in out
