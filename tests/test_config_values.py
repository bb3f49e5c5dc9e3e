"""Config values are checked before anything is built: the error names the key, the value and
what is allowed, and a command that fails this way leaves no run directory behind."""
from __future__ import annotations

import pytest

from support import FAST, run_script
from vitlab.runtime.validate import ConfigValueError, check_run_config

GOOD = {"seed": 42, "resume": "auto", "data": {"batch_size": 8, "num_workers": 0, "synthetic": True},
        "schedule": {"epochs": 3, "max_steps": -1, "optimizer": {"lr": 1e-3, "weight_decay": 0.05},
                     "lr_policy": {"name": "cosine", "warmup_epochs": 1, "milestones": None}},
        "module": {"compile": False}}


def with_value(key: str, value):
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    cfg["schedule"] = {**GOOD["schedule"], "optimizer": dict(GOOD["schedule"]["optimizer"]),
                       "lr_policy": dict(GOOD["schedule"]["lr_policy"])}
    node, *path = key.split(".")
    target = cfg
    for part in [node, *path][:-1]:
        target = target[part]
    target[key.split(".")[-1]] = value
    return cfg


def test_a_good_config_passes():
    check_run_config(GOOD)


@pytest.mark.parametrize("key,value,message", [
    ("data.batch_size", 0, "data.batch_size=0: expected an integer >= 1"),
    ("data.batch_size", "two", "data.batch_size='two': expected an integer >= 1"),
    ("data.batch_size", 2.5, "expected an integer"),
    ("data.num_workers", -1, "data.num_workers=-1: expected an integer >= 0"),
    ("data.read_threads", -1, "data.read_threads=-1: expected an integer >= 0"),
    ("data.shuffle_window", 0, "data.shuffle_window=0: expected an integer >= 1"),
    ("data.synthetic", "yes", "data.synthetic='yes': expected true or false"),
    ("schedule.optimizer.lr", "fast", "schedule.optimizer.lr='fast': expected a number > 0"),
    ("schedule.optimizer.lr", 0, "schedule.optimizer.lr=0: expected a number > 0"),
    ("schedule.optimizer.weight_decay", -0.1, "expected a number >= 0"),
    ("schedule.epochs", 0, "schedule.epochs=0: expected an integer >= 1"),
    ("schedule.lr_policy.name", "linear", "expected one of cosine, poly, multistep"),
    ("schedule.lr_policy.milestones", [8, "x"], "schedule.lr_policy.milestones"),
    ("resume", "maybe", "resume='maybe': expected one of auto, never"),
    ("seed", -1, "seed=-1"),
    ("data.auto_augment", "rand-x9", "data.auto_augment='rand-x9': expected null or a timm augmentation string"),
    ("data.auto_augment", "bogus", "data.auto_augment='bogus': expected null or a timm augmentation string"),
    ("module.compile", "fastest", "module.compile='fastest': expected true, false or a torch.compile backend (aot_eager"),
])
def test_bad_values_name_key_value_and_what_is_allowed(key, value, message):
    with pytest.raises(ConfigValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_run_config(with_value(key, value))


def test_every_problem_is_listed_at_once():
    cfg = with_value("data.batch_size", 0)
    cfg["schedule"]["optimizer"]["lr"] = "fast"
    with pytest.raises(ConfigValueError) as err:
        check_run_config(cfg)
    assert "data.batch_size=0" in str(err.value) and "schedule.optimizer.lr='fast'" in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=two", "data.batch_size='two': expected an integer >= 1"),
    ("schedule.optimizer.lr=fast", "schedule.optimizer.lr='fast': expected a number > 0"),
    ("backbone.depths=[1,1]", "backbone.depths=[1,1] has 2 entries but the model has 4 stages"),
])
def test_the_command_fails_early_and_leaves_no_run_directory(override, message, tmp_path, data_dir):
    output = tmp_path / "outputs"
    proc = run_script("train.py", [*FAST, "debug=smoke", override], data_dir, env={"VITLAB_OUTPUT": str(output)},
                      check=False, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not output.exists() or not any(output.rglob("*")), list(output.rglob("*"))
