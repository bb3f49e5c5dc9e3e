"""predict.py on image files, per task: it needs the checkpoint only (the training data is moved
away first), writes figures and predictions.json, and predicts what the task's own validation computes
for the same image. Also the per-class results of a run (summary.json and W&B). The checkpoints are
the shared smoke runs (conftest): the smoke sweep's first job, ``detection_run``, ``segmentation_run``."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from support import TINY_PVT, run_script, wandb_records

from vitlab.runtime.run import module_from_checkpoint
from vitlab.tasks.visualize import PANEL_WIDTH
from vitlab.tools.predict import find_images, predict


@contextlib.contextmanager
def data_moved_away(ckpt: Path):
    """The checkpoint's generated data (its ``data.synthetic_root``) is absent inside the block:
    predict needs the checkpoint only. It is put back afterwards for the other tests of the run."""
    root = Path(torch.load(ckpt, weights_only=True)["vitlab_config"]["data"]["synthetic_root"])
    away = root.with_name(root.name + "-away")
    root.rename(away)
    try:
        yield
    finally:
        away.rename(root)


def validate(ckpt: Path, root: Path, overrides: dict | None = None, batches: int | None = None):
    """The checkpoint's task validated on its data (the first ``batches``) by a plain Trainer (what eval.py does)."""
    datamodule, module, _ = module_from_checkpoint(str(ckpt), overrides)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), limit_val_batches=batches)
    return datamodule, module, trainer, lambda: trainer.validate(module, datamodule=datamodule, verbose=False)


def copy_inputs(files: list[Path], to: Path) -> list[Path]:
    to.mkdir(parents=True)
    return [Path(shutil.copy(f, to / f.name)) for f in files]


def predict_in_process(ckpt: Path, inputs: Path, out: Path, **options) -> dict:
    cfg = {"ckpt_path": str(ckpt), "inputs": str(inputs), "out": str(out), "topk": 5, "score_thresh": None,
           "batch_size": None, "num_workers": 0, "overrides": {},
           "trainer": {"_target_": "lightning.Trainer", "accelerator": "cpu", "enable_progress_bar": False,
                       "enable_model_summary": False}}
    return predict(OmegaConf.create({**cfg, **options}))


def check_figures(result: dict, out: Path, panels: int) -> None:
    for record in result["images"]:
        with Image.open(out / record["figure"]) as figure:
            assert figure.width >= panels * PANEL_WIDTH and figure.mode == "RGB"


@pytest.fixture
def classifier(smoke_sweep) -> Path:
    """A 10-class smoke run logged to W&B (offline): the smoke sweep's first job."""
    return smoke_sweep / "0" / "checkpoints" / "last.ckpt"


def test_classification_top_k_on_files(classifier, tmp_path, data_dir):
    datamodule, module, _, run_validation = validate(classifier, tmp_path, batches=3)
    logits = []
    module.model.register_forward_hook(lambda m, i, out: logits.append(out))
    run_validation()
    probs = torch.cat(logits).softmax(1)
    files = [Path(path) for path, _ in datamodule.val_set.samples][:len(probs)]  # validation's order
    inputs = copy_inputs(files, tmp_path / "inputs")

    out = tmp_path / "out"
    with data_moved_away(classifier):
        run_script("predict.py", [f"ckpt_path={classifier}", f"inputs={tmp_path / 'inputs'}", f"out={out}", "topk=3"],
                   data_dir)
    result = json.loads((out / "predictions.json").read_text())
    assert result["task"] == "ClassificationTask" and result["class_names"] == list(module.info.class_names)
    assert [r["file"] for r in result["images"]] == [str(p) for p in sorted(inputs)]
    order = [inputs.index(Path(r["file"])) for r in result["images"]]
    for record, i in zip(result["images"], order):
        expected = probs[i].topk(3)
        assert [t["label"] for t in record["topk"]] == expected.indices.tolist()
        assert [t["score"] for t in record["topk"]] == pytest.approx(expected.values.tolist(), abs=1e-5)
        assert [t["class"] for t in record["topk"]] == [result["class_names"][t["label"]] for t in record["topk"]]
        assert (record["width"], record["height"]) == Image.open(inputs[i]).size
    check_figures(result, out, panels=2)  # image | top-k bars
    assert (out / ".hydra" / "config.yaml").is_file()  # the run directory is `out`


def test_per_class_results_in_summary_and_wandb(classifier):
    summary = json.loads((classifier.parents[1] / "summary.json").read_text())
    per_class = summary["extra"]["per_class_top1"]
    assert len(per_class) == 10 and any(v is not None for v in per_class.values())
    for pair in summary["extra"]["top_confusions"]:
        assert pair["true"] != pair["predicted"] and pair["count"] > 0
    (log,) = classifier.parents[1].glob("wandb/offline-run-*/run-*.wandb")
    logged = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            logged.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    assert logged["val/per_class/_type"] == "table-file" and logged["val/confusion/_type"] == "images/separated"
    table = json.loads((log.parent / "files" / logged["val/per_class/path"]).read_text())
    assert table["columns"] == ["class", "top1", "images"]
    assert {row[0]: row[1] for row in table["data"]} == per_class


def test_bad_input_is_named(classifier, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"inputs=.*nowhere.jpg: no such file"):
        find_images(str(tmp_path / "nowhere.jpg"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        find_images(str(tmp_path / "empty"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="score_thresh=0.5: only detection checkpoints"):
        predict_in_process(classifier, tmp_path / "a.png", tmp_path / "out", score_thresh=0.5)


def test_detection_boxes_and_masks_on_files(tmp_path, detection_run):
    ckpt = detection_run / "checkpoints" / "last.ckpt"
    # an untrained detector scores below the recipe's 0.05: keep everything, but only 5 per image
    head = {"box_score_thresh": 0.0, "box_detections_per_img": 5}
    datamodule, module, _, run_validation = validate(ckpt, tmp_path, {"module": {"head": head}})
    run_validation()
    coco = datamodule.val_set.coco
    files = [datamodule.val_set.image_dir / coco.imgs[i]["file_name"] for i in datamodule.val_set.ids]
    copy_inputs(files, tmp_path / "inputs")

    with data_moved_away(ckpt):
        result = predict_in_process(ckpt, tmp_path / "inputs", tmp_path / "out", score_thresh=0.0,
                                    overrides={"module": {"head": head}})
    assert len(result["images"]) == len(files)
    by_name = {coco.imgs[i]["file_name"]: i for i in datamodule.val_set.ids}
    info = module.info
    for record in result["images"]:
        image_id = by_name[Path(record["file"]).name]
        expected = [{k: v for k, v in r.items() if k != "image_id"} for r in module.results if r["image_id"] == image_id]
        got = [{k: v for k, v in d.items() if k not in ("label", "class")} for d in record["detections"]]
        assert len(got) == 5 and got == expected  # boxes, scores, categories and RLE masks of validation
        for d in record["detections"]:
            assert d["class"] == info.class_names[d["label"]] and d["category_id"] == info.category_ids[d["label"]]
    check_figures(result, tmp_path / "out", panels=1)


def test_segmentation_class_maps_on_files(tmp_path, segmentation_run):
    ckpt = segmentation_run / "checkpoints" / "last.ckpt"
    datamodule, module, _, run_validation = validate(ckpt, tmp_path)
    maps, inference = [], module.inference

    def recording(image, out_size):
        probs = inference(image, out_size)
        maps.append(probs.argmax(1)[0])
        return probs

    module.inference = recording
    run_validation()
    inputs = copy_inputs(list(datamodule.val_set.images), tmp_path / "inputs")

    with data_moved_away(ckpt):
        result = predict_in_process(ckpt, tmp_path / "inputs", tmp_path / "out")
    assert len(result["images"]) == len(inputs) == len(maps)
    for record, expected in zip(result["images"], maps):  # both in file-name order
        label_map = torch.from_numpy(np.array(Image.open(tmp_path / "out" / record["label_map"])))
        assert torch.equal(label_map.long(), expected)  # the validation's prediction, pixel for pixel
        names = module.info.class_names
        shares = {names[c]: float((expected == c).float().mean() * 100) for c in expected.unique().tolist()}
        assert record["classes"] == pytest.approx(shares, abs=0.01)
    check_figures(result, tmp_path / "out", panels=2)  # image | prediction


def test_classification_per_class_top1_and_confusions(tmp_path):
    """A stand-in model whose logits are its input: per-class top-1, the confusions and the confusion
    image from a real validation loop, against counting by hand."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset, default_collate

    from vitlab.api import backbone_config
    from vitlab.data.base import DatasetInfo, ImageBatch
    from vitlab.tasks.classification import ClassificationTask

    names = ("cat", "dog", "owl", "eel", "yak")
    info = DatasetInfo(class_names=names, input_size=(32, 32))
    schedule = {"optimizer": {"lr": 1e-3}, "lr_policy": {"name": "cosine"}}
    task = ClassificationTask(backbone_config("pvt_v2_b0", [o.split(".", 1)[1] for o in TINY_PVT[1:]]), schedule,
                              info, mixup=0, cutmix=0)
    task.model = nn.Flatten()  # images of shape (B, 5, 1, 1) are their own logits
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (60,), generator=g)  # "yak" never occurs
    logits = torch.randn(60, 5, generator=g) + 2 * nn.functional.one_hot(targets, 5)
    loader = DataLoader(TensorDataset(logits[:, :, None, None], targets), batch_size=16,
                        collate_fn=lambda items: ImageBatch(*default_collate(items), torch.tensor(0)))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path)).validate(task, dataloaders=loader, verbose=False)
    extra = task.extra_summary()
    predicted = logits.argmax(1)
    for c, name in enumerate(names):
        n = int((targets == c).sum())
        expected = None if n == 0 else round(float(((predicted == c) & (targets == c)).sum()) / n * 100, 2)
        assert extra["per_class_top1"][name] == expected, name
    top = extra["top_confusions"][0]
    t, p = names.index(top["true"]), names.index(top["predicted"])
    counts = {(a, b): int(((targets == a) & (predicted == b)).sum()) for a in range(5) for b in range(5) if a != b}
    assert top["count"] == counts[(t, p)] == max(counts.values())
    assert (tmp_path / "predictions" / "epoch_000" / "val_confusion_0.png").is_file()


def test_compare_lists_per_class_results_by_setting(tmp_path):
    from vitlab.tools.compare import main as compare_main, per_class_rows

    runs = [{"extra": {"per_class_iou": {"wall": 50.0, "sky": None}}}, {"extra": {"per_class_iou": {"wall": 60.0}}},
            {"extra": {"per_class_iou": {"wall": 61.5, "sky": 20.0}}}]
    rows = per_class_rows(runs, [{"setting": "a"}, {"setting": "a"}, {"setting": "b"}])  # a: two seeds
    assert rows == [{"per_class_iou": "wall", "a": 55.0, "b": 61.5}, {"per_class_iou": "sky", "a": None, "b": 20.0}]
    for name, backbone, run in (("a", "pvt_v2_b0", runs[0]), ("b", "pvt_v2_b1", runs[2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"val/miou": 1.0, "overrides": [f"backbone={backbone}"],
                                                                  **run}))
    compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path)])
    lines = (tmp_path / "compare_per_class.csv").read_text().splitlines()
    assert lines == ["per_class_iou,backbone=pvt_v2_b0,backbone=pvt_v2_b1", "wall,50.0,61.5", "sky,,20.0"]
