"""The package layout: old checkpoints keep loading after modules move (``vitlab.aliases``)."""
from __future__ import annotations

import importlib

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
