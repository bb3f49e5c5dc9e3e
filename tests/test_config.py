"""One compose (``vitlab.runtime.config``) and no process-global side channels: vitlab inside a user's own
Hydra application, ``run.train`` on a plainly composed config (leaving this process as it was), and
two sweeps in one process. Hydra's own runs (the user's app, the sweeps) configure logging and
Hydra's global state, as in a user's process: they run in a child (``support.call_in_child``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from support import FAST, call_in_child
from vitlab.runtime.config import compose, hydra_app


def _users_hydra_app(tmp_path: Path) -> tuple[int, dict, str]:
    """A user's Hydra application (``initialize`` + its own run, as ``@hydra.main`` does) that calls
    vitlab inside its task; returns what the task saw."""
    import vitlab
    from hydra import compose as user_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    def user_task(cfg):
        assert cfg.lr == 0.5
        model = vitlab.create_model("pvt_v2_b0", num_classes=3)
        backbone = vitlab.create_backbone("pvt_v2_b0", pretrained="imagenet")
        assert GlobalHydra.instance().is_initialized()
        assert user_compose("app").model == "mine"  # the app's own search path, still in place
        assert HydraConfig.get().job.name == "user_app"
        return model.head.out_features, backbone.state_dict(), backbone.pretrained_file

    with initialize_config_dir(config_dir=str(tmp_path / "app"), job_name="user_app", version_base="1.3"):
        ret = GlobalHydra.instance().hydra.run("app", user_task, [f"hydra.run.dir={tmp_path / 'run'}"])
    return ret.return_value


def test_create_model_and_imagenet_weights_inside_a_users_hydra_app(tmp_path, monkeypatch):
    """A user's ``@hydra.main`` app with its own, unrelated config dir: vitlab composes its own conf/,
    and the app's Hydra (its configs, its HydraConfig) is as it was afterwards."""
    import vitlab

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "app.yaml").write_text("lr: 0.5\nmodel: mine\n")
    torch.manual_seed(0)
    release = vitlab.create_backbone("pvt_v2_b0")
    (tmp_path / "weights").mkdir()
    torch.save({f"backbone.{k}": v for k, v in release.state_dict().items()}, tmp_path / "weights" / "pvt_v2_b0.pth")
    monkeypatch.setenv("VITLAB_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("VITLAB_OFFLINE", "1")
    classes, state, pretrained_file = call_in_child(_users_hydra_app, tmp_path)
    assert classes == 3
    assert pretrained_file == str(tmp_path / "weights" / "pvt_v2_b0.pth")
    for (name, a), b in zip(release.state_dict().items(), state.values()):
        assert torch.equal(a, b), name


def test_train_runs_a_plainly_composed_config(tmp_path, data_dir):
    """No Hydra run: the config composed as lightning-hydra-template's tests compose it, the run
    directory from ``paths.output_dir``."""
    from vitlab.runtime.run import train

    cfg = compose("train", [*FAST, "debug=smoke", f"paths.output_dir={tmp_path / 'run'}",
                            f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}"])
    before = process_state()
    summary = train(cfg)
    assert process_state() == before  # nothing to put back after a run called from Python
    assert summary["status"] == "finished" and summary["run_dir"] == str(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val/top1"] == summary["val/top1"]
    assert summary["backbone"] == "pvt_v2_b0" and summary["task"] == "imagenet_cls"  # the config's variant
    assert summary["overrides"] == []


def _sweep_job_dirs(root: Path, sweep: str) -> list[Path]:
    """The output directory of each job of ``train.py -m <sweep>``, in this process (jobs do nothing)."""
    from hydra.core.hydra_config import HydraConfig

    with hydra_app(job_name="train") as hydra:
        batches = hydra.multirun("train", lambda cfg: Path(HydraConfig.get().runtime.output_dir),
                                 [sweep, "hydra.mode=MULTIRUN"])
    return [job.return_value for batch in batches for job in batch]


def _two_sweeps(root: Path) -> tuple[list[Path], list[Path], Path]:
    """Two sweeps in one process (a notebook's): their jobs' directories, and the sweep directory the
    process hands to its SLURM/submitit jobs."""
    import os

    from vitlab.runtime.rundir import SWEEP_DIR_ENV

    first = _sweep_job_dirs(root, "seed=1,2")
    second = _sweep_job_dirs(root, "seed=3,4")
    return first, second, Path(os.environ[SWEEP_DIR_ENV])


def process_state() -> dict:
    """What a run could leave changed in its process: signal handlers, logging handlers, the working
    directory, torch's global switches, Hydra's global instance and config."""
    import logging
    import os
    import signal

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    return {
        "signals": {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)},
        "logging": {name: list(lg.handlers) for name, lg in [("", logging.root), *logging.root.manager.loggerDict.items()]
                    if isinstance(lg, logging.Logger) and lg.handlers},
        "cwd": os.getcwd(),
        "torch": (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                  torch.get_float32_matmul_precision(), torch.get_default_dtype()),
        "hydra": (GlobalHydra.instance().is_initialized(), HydraConfig.instance().cfg),
    }


def test_two_sweeps_in_one_process_get_two_directories(tmp_path, monkeypatch):
    from vitlab.runtime.rundir import SWEEP_DIR_ENV, sweep_dir

    monkeypatch.setenv("VITLAB_OUTPUT", str(tmp_path))
    monkeypatch.delenv(SWEEP_DIR_ENV, raising=False)
    first, second, handed = call_in_child(_two_sweeps, tmp_path)
    assert [p.name for p in first] == [p.name for p in second] == ["0", "1"]
    assert first[0].parent == first[1].parent != second[0].parent == second[1].parent  # one directory per sweep
    assert {first[0].parent.parent, second[0].parent.parent} == {tmp_path}
    assert handed == second[0].parent
    # a SLURM/submitit job of the second sweep (its own process: the environment inherited, its own values)
    monkeypatch.setenv(SWEEP_DIR_ENV, str(handed))
    assert sweep_dir(str(tmp_path), None, ["seed=4"], "auto", 1) == str(handed)


def test_dataset_facts_live_on_the_datamodules_and_match_torchvision():
    """One home per dataset fact: the DataModule's ``FACTS``, against torchvision's category lists; the
    tools (zoo, plan, loader throughput) read them from there."""
    import inspect

    from torchvision.models import ResNet50_Weights
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights

    from vitlab.data import throughput
    from vitlab.data.ade20k import ADE20KDataModule
    from vitlab.data.coco import CocoDataModule
    from vitlab.data.imagenet import ImageNetDataModule
    from vitlab.tools import plan, zoo
    from vitlab.tools.bench import cli as bench_cli
    from vitlab.tools.bench import workloads

    assert ImageNetDataModule.FACTS.num_classes == len(ResNet50_Weights.DEFAULT.meta["categories"]) == 1000
    coco = [c for c in RetinaNet_ResNet50_FPN_Weights.DEFAULT.meta["categories"] if c not in ("__background__", "N/A")]
    assert CocoDataModule.FACTS.num_classes == len(coco) == 80
    assert ADE20KDataModule.FACTS.num_classes == 150 and ADE20KDataModule.FACTS.flops_input == (512, 512)
    assert throughput.SIZES["coco"] == CocoDataModule.FACTS.image_size
    assert zoo._task_config("coco_retinanet")[2] is CocoDataModule.FACTS
    assert zoo._task_config("ade20k_fpn")[2] is ADE20KDataModule.FACTS
    # the benchmark's dense steps at the papers' training sizes, from the task's DataModule
    assert workloads.task_data("coco_maskrcnn") is CocoDataModule and CocoDataModule.FACTS.train_input == (800, 1333)
    assert workloads.make_workload("upernet", 1, None, torch.device("cpu")).input_size == (512, 512)
    for module in (zoo, plan, workloads, bench_cli):  # no dataset table left in the tools, nothing keyed by a task name's prefix
        source = inspect.getsource(module)
        assert 'split("_")[0]' not in source and "117_266" not in source and "150}" not in source, module.__name__


def test_config_files_are_parsed_once_and_changes_are_seen(tmp_path):
    """``compose`` reuses Hydra's parse of each file (a deep copy each time: what one compose's
    overrides change, the next one does not see), parses a file that changed on disk again, and leaves
    Hydra's config sources as they were."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra._internal.sources_registry import SourcesRegistry

    from vitlab.runtime import config

    FileConfigSource = SourcesRegistry.instance().resolve("file")  # the class Hydra uses

    original = FileConfigSource.load_config
    changed = compose(None, ["+backbone=pvt_v2_b0", "backbone.depths=[1,1,1,1]"])
    plain = compose(None, ["+backbone=pvt_v2_b0"])
    assert list(changed.backbone.depths) == [1, 1, 1, 1] and list(plain.backbone.depths) == [2, 2, 2, 2]
    assert any("pvt_v2_b0" in key[2] for key in config._PARSED)
    (tmp_path / "app.yaml").write_text("value: 1\n")
    with config.files_parsed_once(), initialize_config_dir(str(tmp_path), version_base=config.VERSION_BASE):
        assert hydra_compose("app").value == 1
        (tmp_path / "app.yaml").write_text("value: 22\n")  # another size: a new stamp even within one mtime tick
        assert hydra_compose("app").value == 22
        wrapped = FileConfigSource.load_config
        with config.files_parsed_once():  # nested (``compose`` inside a run of the CLI): the outer one serves
            assert FileConfigSource.load_config is wrapped and hydra_compose("app").value == 22
        assert FileConfigSource.load_config is wrapped
    assert FileConfigSource.load_config is original
