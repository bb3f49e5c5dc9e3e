"""Checkpoints are untrusted input: weights only, and configs may only name trusted classes."""
from __future__ import annotations

import pytest
import torch

from support import run_script
from vitlab.trust import UntrustedTargetError, check_targets


def test_check_targets_refuses_os_system():
    with pytest.raises(UntrustedTargetError, match="os.system"):
        check_targets({"data": {"_target_": "os.system", "command": "echo pwned"}})
    check_targets({"module": {"_target_": "vitlab.tasks.classification.ClassificationTask"}})  # allowed


def test_eval_refuses_checkpoint_whose_config_names_os_system(tmp_path, data_dir):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "vitlab_config": {
        "data": {"_target_": "os.system", "command": f"touch {marker}"},
        "module": {"_target_": "vitlab.tasks.classification.ClassificationTask"},
        "backbone": {}, "schedule": {},
    }}, ckpt)
    proc = run_script("eval.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"], data_dir, check=False)
    assert proc.returncode != 0
    assert "refusing to instantiate _target_='os.system'" in proc.stderr
    assert not marker.exists()


def test_pickled_code_in_a_checkpoint_is_never_executed(tmp_path):
    import vitlab

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(Exception, match="weights-only"):
        vitlab.create_model("pvt_v2_b0", num_classes=10, pretrained=str(path))
    assert not (tmp_path / "pwned").exists()
