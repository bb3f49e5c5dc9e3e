"""The body of ``src/predict.py``: run a checkpoint on image files.

    python src/predict.py ckpt_path=outputs/.../checkpoints/best.ckpt inputs=photos/
    python src/predict.py ckpt_path=... inputs=[a.jpg,b.jpg] out=preds topk=3
    python src/predict.py ckpt_path=... inputs=val2017/ score_thresh=0.5

Model, class names, normalisation and preprocessing come from the checkpoint alone (its run config
and dataset description); the dataset need not be on disk. Each image goes through the task's own
evaluation path: the DataModule's evaluation transform (classification: resize + centre crop;
detection: shorter side ``test_scale``, longer at most ``max_size``; segmentation: into
``test_scale``), then the task's ``predict_step`` (classification: top-k classes; detection:
boxes, masks and scores on the original image; segmentation: the evaluation's inference, class map
at the original size). Written to ``out``: ``<name>.png`` per image (the figure, drawn as the
validation images logged in training), for segmentation ``<name>_labels.png`` (class ids), and
``predictions.json`` with every image's results.
"""
from __future__ import annotations

import glob
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
import hydra
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from vitlab.data.base import PredictBatch
from vitlab.data.imagenet import IMG_EXTENSIONS, load_rgb
from vitlab.errors import VitlabUserError, user_errors_as_messages
from vitlab.runtime.build import instantiate
from vitlab.runtime.resources import conf_dir
from vitlab.runtime.run import module_from_checkpoint

log = logging.getLogger("vitlab")


class InputsNotFoundError(VitlabUserError, FileNotFoundError):
    """``inputs=`` names no image file."""


def find_images(inputs: str | list[str]) -> list[Path]:
    """Image files named by ``inputs``: files, directories (searched recursively, sorted) or glob
    patterns, one or a list of them."""
    found = []
    for item in [inputs] if isinstance(inputs, str) else list(inputs):
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            found += sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise InputsNotFoundError(f"inputs={item}: no such file or directory (give image files, directories or "
                                    f"glob patterns)")
    if not found:
        raise InputsNotFoundError(f"inputs={inputs}: no image files ({', '.join(IMG_EXTENSIONS)}) found")
    return found


def output_names(paths: list[Path]) -> dict[str, str]:
    """A distinct output name per input file: its stem, numbered where stems repeat."""
    counts, seen, names = Counter(p.stem for p in paths), Counter(), {}
    for path in paths:
        seen[path.stem] += 1
        names[str(path)] = path.stem if counts[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}"
    return names


class ImageFiles(Dataset):
    """Items: (the image as the evaluation transform leaves it, the decoded original uint8 CHW, path)."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        pil = load_rgb(str(self.paths[index]))
        return self.transform(pil).as_subclass(torch.Tensor), TF.pil_to_tensor(pil), str(self.paths[index])


def collate(items) -> PredictBatch:
    return PredictBatch(*(list(column) for column in zip(*items)))


class PredictionWriter(BasePredictionWriter):
    """Writes each image's figure (and label map) as soon as it is predicted, predictions.json at the end."""

    def __init__(self, out: Path, names: dict[str, str]):
        super().__init__(write_interval="batch")
        self.out, self.names, self.records = out, names, []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for record, original, path in zip(prediction, batch.originals, batch.paths):
            name = self.names[path]
            entry = {"file": path, "height": int(original.shape[-2]), "width": int(original.shape[-1]),
                     "figure": f"{name}.png"}
            Image.fromarray(record.pop("figure")).save(self.out / entry["figure"])
            label_map = record.pop("label_map", None)
            if label_map is not None:
                entry["label_map"] = f"{name}_labels.png"
                dtype = np.uint8 if pl_module.info.num_classes <= 256 else np.uint16
                Image.fromarray(label_map.astype(dtype)).save(self.out / entry["label_map"])
            self.records.append({**entry, **record})

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        info = pl_module.info
        (self.out / "predictions.json").write_text(json.dumps(
            {"task": type(pl_module).__name__, "class_names": list(info.class_names), "images": self.records}, indent=1))


def predict(cfg: DictConfig) -> dict:
    """Predict every image ``cfg.inputs`` names with the checkpoint ``cfg.ckpt_path``; returns
    predictions.json's content."""
    overrides = OmegaConf.to_container(cfg.overrides, resolve=True) if cfg.get("overrides") else {}
    module_overrides = OmegaConf.to_container(cfg.module, resolve=True) if cfg.get("module") else None
    datamodule, module, _ = module_from_checkpoint(cfg.ckpt_path, overrides, module_overrides, with_data=False)
    module.predict_topk = int(cfg.topk)
    if cfg.get("score_thresh") is not None:
        if not hasattr(module, "vis_score_thresh"):
            raise ValueError(f"score_thresh={cfg.score_thresh}: only detection checkpoints have scored boxes; "
                             f"{cfg.ckpt_path} holds a {type(module).__name__}")
        module.vis_score_thresh = float(cfg.score_thresh)
    paths = find_images(cfg.inputs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # evaluation's batch size: dense tasks validate one image at a time (padding a batch changes results)
    batch_size = cfg.get("batch_size") or getattr(datamodule, "val_batch_size", datamodule.batch_size)
    loader = DataLoader(ImageFiles(paths, datamodule.eval_image_transform()), batch_size=batch_size,
                        num_workers=cfg.num_workers, collate_fn=collate)
    writer = PredictionWriter(out, output_names(paths))
    trainer_cfg = {**OmegaConf.to_container(cfg.trainer, resolve=True), "devices": 1, "num_nodes": 1, "strategy": "auto"}
    trainer = instantiate(trainer_cfg, "trainer", trusted=True, logger=False, callbacks=[writer])
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    log.info("predicted %d images: %s (figures and predictions.json)", len(paths), out)
    return json.loads((out / "predictions.json").read_text())


def main() -> None:
    """Run a checkpoint on image files: ``vitlab-predict ckpt_path=.../best.ckpt inputs=photos/``."""
    from vitlab.runtime.config import register_resolvers

    register_resolvers()  # the run directory's (conf/hydra/default.yaml), before Hydra resolves it
    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="predict")
    app(user_errors_as_messages(predict))()
