"""Checkpoints are untrusted input: weights only, and a stored config may only name the classes
vitlab's own configs use. Every crafted checkpoint below must be refused by ``eval.py`` with a
message naming the key, and its payload (which would write a marker file) must never run."""
from __future__ import annotations

import re

import pytest
import torch

from support import REPO, run_script
from vitlab.runtime.trust import UntrustedTargetError, allowed_targets, check_targets


def _payloads(marker: str, tmp) -> dict[str, dict]:
    """Config nodes that would run code (each writes ``marker``) if they were instantiated."""
    pickle_file = tmp / "payload.pkl"
    hub_dir = tmp / "hub"
    hub_dir.mkdir(exist_ok=True)
    (hub_dir / "hubconf.py").write_text(f"open({marker!r}, 'w').write('hub')\ndef model():\n    return 1\n")
    return {
        "torch.load of a pickle": {"_target_": "torch.load", "f": str(pickle_file), "weights_only": False},
        "torch.hub.load of a local dir": {"_target_": "torch.hub.load", "repo_or_dir": str(hub_dir),
                                          "model": "model", "source": "local"},
        "torch.jit.load": {"_target_": "torch.jit.load", "f": str(tmp / "model.pt")},
        "cpp_extension.load_inline": {"_target_": "torch.utils.cpp_extension.load_inline", "name": "x",
                                      "cpp_sources": [f'auto _ = fopen("{marker}", "w");']},
        "timm.create_model with checkpoint_path": {"_target_": "timm.create_model", "model_name": "resnet18",
                                                  "checkpoint_path": str(pickle_file)},
        "Lightning load_from_checkpoint": {
            "_target_": "vitlab.tasks.classification.ClassificationTask.load_from_checkpoint",
            "checkpoint_path": str(pickle_file), "weights_only": False},
        "builtins.eval": {"_target_": "builtins.eval", "_args_": [f"open({marker!r}, 'w')"]},
        "_args_ on an allowed class": {"_target_": "vitlab.data.imagenet.ImageNetDataModule",
                                       "_args_": [f"open({marker!r}, 'w')"]},
        "_partial_ torch.load": {"_target_": "torch.load", "_partial_": True, "f": str(pickle_file)},
        "os.system": {"_target_": "os.system", "command": f"touch {marker}"},
    }


@pytest.fixture
def pickle_payload(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(Evil()))
    return marker


def test_allow_list_is_exactly_the_targets_our_configs_name():
    written = set()
    for path in (REPO / "conf").rglob("*.yaml"):
        written |= set(re.findall(r"^\s*_target_:\s*([\w.]+)", path.read_text(), re.M))
    assert allowed_targets() == {t for t in written if not t.startswith("hydra_plugins.")}
    assert "vitlab.tasks.classification.ClassificationTask" in allowed_targets()
    assert not {"torch.load", "torch.hub.load", "builtins.eval", "os.system"} & allowed_targets()


@pytest.mark.parametrize("where", ["data", "module", "backbone", "module.head"])
def test_check_targets_refuses_every_payload_anywhere(where, tmp_path, pickle_payload):
    for name, node in _payloads(str(pickle_payload), tmp_path).items():
        config = {"data": {}, "module": {}, "backbone": {}}
        parent, _, key = where.rpartition(".")
        (config[parent] if parent else config)[key] = node
        with pytest.raises(UntrustedTargetError, match=r"refusing") as err:
            check_targets(config)
        assert where in str(err.value) or where.split(".")[0] in str(err.value), name
    assert not pickle_payload.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torch.load of a pickle", "torch.hub.load of a local dir", "torch.jit.load",
                                  "cpp_extension.load_inline", "timm.create_model with checkpoint_path",
                                  "Lightning load_from_checkpoint", "builtins.eval", "_args_ on an allowed class",
                                  "_partial_ torch.load", "os.system"])
def test_eval_refuses_a_crafted_checkpoint(name, tmp_path, data_dir, pickle_payload):
    node = _payloads(str(pickle_payload), tmp_path)[name]
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "vitlab_config": {
        "data": node, "module": {"_target_": "vitlab.tasks.classification.ClassificationTask"},
        "backbone": {}, "schedule": {},
    }}, ckpt)
    proc = run_script("eval.py", [f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"], data_dir, check=False)
    assert proc.returncode != 0
    assert "refusing" in proc.stderr and "evil.ckpt: data" in proc.stderr, proc.stderr[-2000:]
    assert not pickle_payload.exists()
    assert not (tmp_path / "eval").exists()  # a failed command leaves no run directory


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


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, data_dir, content):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(content)
    proc = run_script("eval.py", [f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'eval'}"], data_dir, check=False)
    assert proc.returncode != 0
    assert f"ckpt_path={path}: not a checkpoint" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "eval").exists()
