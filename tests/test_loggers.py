"""logger=tensorboard and logger=mlflow (Lightning's own loggers) beside the CSV logger, read back with
TensorBoard's and MLflow's own readers: the same metric keys as metrics.csv, the same hyper-parameters as
the CSV logger's hparams.yaml, the per-class table and the summary as summary.json holds them."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from support import TINY_PVT

pytest.importorskip("tensorboard")
mlflow = pytest.importorskip("mlflow")


def flat_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        keys |= flat_keys(v, f"{prefix}{k}/") if isinstance(v, dict) and v else {f"{prefix}{k}"}
    return keys


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, data_dir):
    from support import run_script

    root = tmp_path_factory.mktemp("loggers")
    run, uri = root / "run", f"sqlite:///{root / 'mlflow.db'}"
    run_script("train.py", [*TINY_PVT, "experiment=demo", "debug=smoke", "data.img_size=32",
                            "logger=[csv,tensorboard,mlflow]", f"logger.mlflow.artifact_location={root / 'artifacts'}",
                            f"data.synthetic_root={root / 'data'}",
                            f"hydra.run.dir={run}"], data_dir, env={"MLFLOW_TRACKING_URI": uri})
    return run, uri


def test_tensorboard_and_mlflow_hold_what_csv_and_summary_hold(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run, uri = logged_run
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "csv" / "metrics.csv", newline="") as f:
        csv_metrics = set(next(csv.reader(f))) - {"step"}
    csv_hparams = flat_keys(yaml.safe_load((run / "csv" / "hparams.yaml").read_text()))
    per_class = summary["extra"]["per_class_top1"]
    assert {"train/loss", "val/top1", "val/top5"} <= csv_metrics and len(per_class) == 10

    # TensorBoard: the scalars, the hyper-parameters (HPARAMS tab, with the final val/ metrics), the table
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == csv_metrics
    plugin = lambda tag: plugin_data_pb2.HParamsPluginData.FromString(  # noqa: E731
        events.SummaryMetadata(tag).plugin_data.content)
    assert set(plugin("_hparams_/session_start_info").session_start_info.hparams) == csv_hparams
    assert {m.name.tag for m in plugin("_hparams_/experiment").experiment.metric_infos} == \
        {k for k, v in summary.items() if k.startswith("val/")}
    table = events.Tensors("val/per_class/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| class | top1 | images |"
    assert {line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()[2:]} == set(per_class)

    # MLflow: the run named from the overrides, its metrics, params, the table and summary.json as artifacts
    client = mlflow.MlflowClient(uri)
    logged = client.get_run((run / "mlflow_run_id").read_text())
    assert logged.info.run_name == ",".join(summary["overrides"])[:250]  # MLflow: at most 250 characters
    assert client.get_experiment(logged.info.experiment_id).name == "imagenet_cls"
    assert set(logged.data.metrics) == csv_metrics
    assert set(logged.data.params) == {k.replace("@", "_") for k in csv_hparams}  # MLflow refuses '@' in names
    assert logged.data.params["backbone"] == "pvt_v2_b0"
    assert logged.data.metrics["val/top1"] == pytest.approx(summary["val/top1"])
    steps = [a.path for a in client.list_artifacts(logged.info.run_id, "val/per_class")]
    last = max(steps, key=lambda p: int(p.rsplit("_", 1)[1].removesuffix(".json")))
    table = mlflow.artifacts.load_dict(f"{logged.info.artifact_uri}/{last}")
    assert table["columns"] == ["class", "top1", "images"]
    assert {row[0]: row[1] for row in table["data"]} == pytest.approx(per_class)
    assert mlflow.artifacts.load_dict(f"{logged.info.artifact_uri}/summary.json")["val/top1"] == summary["val/top1"]


def test_mlflow_tracking_uri_comes_from_the_environment(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_dir

    from vitlab.runtime.resources import conf_dir

    def uri():
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("train", ["logger=[csv,mlflow]", f"paths.root_dir={tmp_path}"])
        assert set(cfg.logger) == {"csv", "mlflow"}
        return cfg.logger.mlflow.tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert uri() == "http://mlflow.example:5000"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    """Each attempt of a run (resume, requeue) builds its loggers again: the MLflow run id kept in the
    run directory brings it back to the same MLflow run (read back from the store)."""
    from omegaconf import OmegaConf

    from vitlab.runtime.run import RunContext, build_loggers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the quick store for a test; the default is SQLite
    cfg = OmegaConf.create({"logger": {"mlflow": {
        "_target_": "lightning.pytorch.loggers.MLFlowLogger", "experiment_name": "resume",
        "tracking_uri": f"file:{tmp_path / 'mlruns'}", "run_name": None}}})
    first = build_loggers(cfg, RunContext(tmp_path / "run"), None)[0]
    first.log_metrics({"train/loss": 2.0}, step=0)
    again = build_loggers(cfg, RunContext(tmp_path / "run"), None)[0]
    again.log_metrics({"train/loss": 1.0}, step=1)
    assert again.run_id == first.run_id == (tmp_path / "run" / "mlflow_run_id").read_text()
    history = mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}").get_metric_history(first.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0)]
    assert len(mlflow.MlflowClient(f"file:{tmp_path / 'mlruns'}").search_runs([first.experiment_id])) == 1
