"""ADE20K (SceneParsing, 150 classes) in its release layout::

    <root>/images/training/ADE_train_*.jpg      <root>/annotations/training/ADE_train_*.png
    <root>/images/validation/ADE_val_*.jpg      <root>/annotations/validation/ADE_val_*.png

Label maps: 8-bit PNG, 0 = "other" (ignored), 1..150 = classes, 255 = ignored too.
With ``reduce_zero_label`` (mmseg's default for ADE20K) 0 becomes 255 (ignore) and the
others shift to 0..149.

Training is mmsegmentation's pipeline: random rescale (ratio 0.5-2.0 of
2048x512, aspect kept), random 512x512 crop whose most frequent class covers at
most 75% (cat_max_ratio), flip, photometric distortion, normalise, pad to the
crop size (image 0, label 255). Validation: image resized into 2048x512 (shorter
side 512), label at its original size (the task resizes logits back, as mmseg).
Inference mode (whole / slide) and TTA belong to the task module.
"""
from __future__ import annotations

import io
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.errors import VitlabUserError
from vitlab.data.base import (
    DatasetFacts,
    IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, DatasetInfo, DatasetLayoutError, SegmentationBatch,
)
from vitlab.data.imagenet import load_rgb, read_header, read_problem, reading
from vitlab.data.packing import file_bytes, open_manifest, pack_split
from vitlab.data.streaming import PackableDataModule, PackedSplit, decode_rgb
from vitlab.data.report import (
    EMPTY, LABEL_FORMAT, LABEL_IDS, LABEL_SIZE, MISSING, DataReport, check_all, skip_or_raise,
)

IGNORE_INDEX = 255

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
assert len(ADE20K_CLASSES) == 150


class LabelMapError(VitlabUserError, ValueError):
    """A label map that does not fit its image or holds unknown class ids; names the file."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def decode_label(path: Path | str, data: bytes | None = None) -> tuple[np.ndarray, str]:
    """The label map's values and its PIL mode (from ``data``, the file's bytes, where given); errors
    as ``load_rgb``'s, naming ``path``."""
    with reading(path), Image.open(path if data is None else io.BytesIO(data)) as f:
        return np.asarray(f), f.mode


def label_format_problem(path: Path, size: tuple[int, int], mode: str,
                         image_size: tuple[int, int]) -> tuple[str, str] | None:
    """A label map must be 8-bit single-channel and as large as its image (both from headers)."""
    if mode not in ("L", "P"):
        return LABEL_FORMAT, f"{path}: label maps must be 8-bit single-channel PNGs, got mode {mode}"
    if size != image_size:
        return LABEL_SIZE, (f"{path}: label map is {size[0]}x{size[1]} but its image is "
                            f"{image_size[0]}x{image_size[1]}")
    return None


def label_ids_problem(path: Path, label: np.ndarray, num_classes: int, reduce_zero_label: bool) -> str | None:
    """Class ids 0..K (0 = "other" with reduce_zero_label) or 0..K-1, and 255 = ignored."""
    top = num_classes if reduce_zero_label else num_classes - 1
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if v > top and v != IGNORE_INDEX]
    if not bad:
        return None
    allowed = f"0 = other (ignored), 1..{top}" if reduce_zero_label else f"0..{top}"
    return f"{path}: class ids {bad[:10]} out of range ({allowed}, {IGNORE_INDEX} = ignored)"


class RandomRescale(torch.nn.Module):
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``: fit into ``scale x ratio``.

    torchvision's ScaleJitter compares height to height and width to width; mmseg fits the
    longer side to the larger number whatever the orientation, so portrait images differ.
    """

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]):
        super().__init__()
        self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

    def forward(self, image, label):
        r = float(torch.empty(1).uniform_(*self.ratio_range))
        h, w = image.shape[-2:]
        f = min(max(self.scale) * r / max(h, w), min(self.scale) * r / min(h, w))
        size = [max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))]
        return TF.resize(image, size, antialias=True), TF.resize(label, size)  # Mask -> nearest


class CatMaxRandomCrop(torch.nn.Module):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``: retry (10x) until no class covers > ratio.

    torchvision's RandomCrop has no class-balance criterion.
    """

    def __init__(self, size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size, self.cat_max_ratio, self.ignore_index = tuple(size), cat_max_ratio, ignore_index

    def _params(self, h: int, w: int):
        top = int(torch.randint(0, max(h - self.size[0], 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.size[1], 0) + 1, ()))
        return top, left, min(self.size[0], h), min(self.size[1], w)

    def forward(self, image, label):
        h, w = label.shape[-2:]
        box = self._params(h, w)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = TF.crop(label, *box)
                _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._params(h, w)
        return TF.crop(image, *box), TF.crop(label, *box)


def photometric_distortion() -> v2.Transform:
    """mmseg's PhotoMetricDistortion from torchvision pieces, each applied with p=0.5.

    Brightness delta 32/255 is additive in mmseg, multiplicative (x0.875-1.125) here;
    hue delta 18 of OpenCV's 180 = 0.1 of the circle. torchvision's
    RandomPhotometricDistort would also permute channels, which mmseg does not.
    """
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness=32 / 255)], p=0.5),
        v2.RandomApply([v2.ColorJitter(contrast=(0.5, 1.5))], p=0.5),
        v2.RandomApply([v2.ColorJitter(saturation=(0.5, 1.5))], p=0.5),
        v2.RandomApply([v2.ColorJitter(hue=0.1)], p=0.5),
    ])


class TrainTransform:
    def __init__(self, img_scale, ratio_range, crop_size, cat_max_ratio, flip_prob, photometric, mean, std):
        self.rescale = RandomRescale(img_scale, ratio_range)
        self.crop = CatMaxRandomCrop(crop_size, cat_max_ratio)
        self.flip = v2.RandomHorizontalFlip(flip_prob)
        self.photometric = photometric_distortion() if photometric else v2.Identity()
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
        self.crop_size = tuple(crop_size)

    def __call__(self, image: tv_tensors.Image, label: tv_tensors.Mask):
        image, label = self.rescale(image, label)
        image, label = self.crop(image, label)
        image, label = self.flip(image, label)
        image = self.normalize(self.photometric(image))
        pad = [0, 0, self.crop_size[1] - image.shape[-1], self.crop_size[0] - image.shape[-2]]  # right, bottom
        if pad[2] > 0 or pad[3] > 0:
            image, label = TF.pad(image, pad, fill=0), TF.pad(label, pad, fill=IGNORE_INDEX)
        return image, label


class ADE20KDataset(Dataset):
    """Items: ``(image float CHW normalised, label int64 HW, name)`` or ``None`` (skipped corrupt file)."""

    def __init__(
        self,
        root: Path,
        split: str,
        transform,
        train: bool,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        skip_corrupt: bool = False,
    ):
        self.image_dir = Path(root) / "images" / split
        self.label_dir = Path(root) / "annotations" / split
        self.transform, self.train = transform, train
        self.num_classes, self.reduce_zero_label, self.skip_corrupt = num_classes, reduce_zero_label, skip_corrupt
        images = sorted(p for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = {e.name for e in os.scandir(self.label_dir)}
        report = DataReport(str(self.label_dir))
        for img in images:
            if f"{img.stem}.png" not in labels:
                report.problem(MISSING, f"{img}: no label map {self.label_dir / (img.stem + '.png')}")
        report.enforce(skip_corrupt, DatasetLayoutError)  # skip_corrupt: images without one are left out
        self.images = [img for img in images if f"{img.stem}.png" in labels]

    def __len__(self) -> int:
        return len(self.images)

    def read_label(self, path: Path | str, image_size: tuple[int, int], data: bytes | None = None) -> torch.Tensor:
        label, mode = decode_label(path, data)
        problem = label_format_problem(path, (label.shape[1], label.shape[0]), mode, image_size)
        problem = problem[1] if problem else label_ids_problem(path, label, self.num_classes, self.reduce_zero_label)
        if problem:
            raise LabelMapError(problem)
        label = torch.from_numpy(label.astype(np.int64))
        if self.reduce_zero_label:  # 0 ("other") -> ignore; classes 1..K -> 0..K-1; 255 stays ignored
            label = torch.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)
        return label

    def load(self, index: int) -> tuple[Image.Image, torch.Tensor, str]:
        """Item ``index``'s decoded image, label map and file stem."""
        path = self.images[index]
        pil = load_rgb(str(path))
        return pil, self.read_label(self.label_dir / f"{path.stem}.png", pil.size), path.stem

    def __getitem__(self, index: int):
        try:
            pil, label, name = self.load(index)
        except (CorruptImageError, LabelMapError) as err:
            return skip_or_raise(err, self.skip_corrupt)
        image = tv_tensors.Image(TF.pil_to_tensor(pil))
        if self.train:
            image, label = self.transform(image, tv_tensors.Mask(label))
            return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor), name
        return self.transform(image).as_subclass(torch.Tensor), label, name


class PackedADE20KDataset(ADE20KDataset):
    """A split packed by ``python -m vitlab.data.pack ade20k`` (``data.format=litdata``): the same items
    as ``ADE20KDataset`` over the folder layout, each image and its label map's bytes in one item."""

    def __init__(self, split_dir: Path, transform, train: bool, num_classes: int = 150,
                 reduce_zero_label: bool = True, skip_corrupt: bool = False, read_threads: int = 0):
        self.items = PackedSplit(split_dir, read_threads)
        self.transform, self.train = transform, train
        self.num_classes, self.reduce_zero_label, self.skip_corrupt = num_classes, reduce_zero_label, skip_corrupt
        self.images = list(range(len(self.items)))  # item positions (debug=smoke keeps the first few)

    def __getitems__(self, indices: list[int]) -> list:
        """A batch (the loader's fetch): from a bucket its items requested at once."""
        self.items.prefetch([self.images[i] for i in indices])
        return [self[i] for i in indices]

    def load(self, index: int) -> tuple[Image.Image, torch.Tensor, str]:
        k = self.images[index]
        item = self.items[k]
        name = f"{self.items.split_dir} item {k} ({item['name']}"
        pil = decode_rgb(item["image"], name + ")")
        return pil, self.read_label(name + " label map)", pil.size, item["label"]), item["name"]


def collate_train(batch) -> SegmentationBatch:
    kept = [b for b in batch if b is not None]
    return SegmentationBatch(torch.stack([b[0] for b in kept]), torch.stack([b[1] for b in kept]),
                             [b[2] for b in kept], torch.tensor(len(batch) - len(kept)))


def collate_val(batch) -> SegmentationBatch:
    """Lists: validation images and labels keep their own sizes."""
    kept = [b for b in batch if b is not None]
    return SegmentationBatch([b[0] for b in kept], [b[1] for b in kept], [b[2] for b in kept],
                             torch.tensor(len(batch) - len(kept)))


class ADE20KDataModule(PackableDataModule):
    # ADEChallengeData2016: 150 classes, 20,210 training images (median 683x512); FLOPs at the 512x512 crop
    FACTS = DatasetFacts(num_classes=150, train_images=20_210, image_size=(683, 512), flops_input=(512, 512),
                          train_input=(512, 512))
    layout_help = (
        "  <root>/images/training/*.jpg       <root>/annotations/training/*.png\n"
        "  <root>/images/validation/*.jpg     <root>/annotations/validation/*.png\n"
        "  (root = .../ADEChallengeData2016; label PNGs: 0 = other/ignored, 1..150 classes)"
    )
    pack_kind = "ade20k"

    def pack(self, folder: Path, out: Path) -> None:
        pack_ade20k(folder, out, shard_size="256KB", workers=1)

    def __init__(
        self,
        root: str,
        synthetic: bool = False,
        synthetic_root: str | None = None,
        batch_size: int = 2,
        num_workers: int = 4,
        smoke: bool = False,
        skip_corrupt: bool = False,
        seed: int = 0,
        verify: str = "cheap",
        format: str = "folder",
        cache_dir: str | None = None,
        read_threads: int = 0,
        num_classes: int = 150,
        reduce_zero_label: bool = True,
        img_scale: list[int] = (2048, 512),
        ratio_range: list[float] = (0.5, 2.0),
        crop_size: list[int] = (512, 512),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        test_scale: list[int] = (2048, 512),
        mean: list[float] = IMAGENET_MEAN,
        std: list[float] = IMAGENET_STD,
        val_batch_size: int = 1,
        smoke_scale: int = 64,
        smoke_images: int = 8,
        synthetic_num_train: int = 96,
        synthetic_num_val: int = 24,
        synthetic_size: int = 128,
    ):
        super().__init__(root, synthetic, synthetic_root, batch_size, num_workers, smoke, skip_corrupt, seed, verify,
                         format, cache_dir, read_threads)
        if smoke:  # seconds-long runs: small crops and images
            img_scale = test_scale = (smoke_scale * 4, smoke_scale)
            crop_size = (smoke_scale, smoke_scale)
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.img_scale, self.ratio_range = tuple(img_scale), tuple(ratio_range)
        self.crop_size, self.cat_max_ratio = tuple(crop_size), cat_max_ratio
        self.flip_prob, self.photometric = flip_prob, photometric
        self.test_scale = tuple(test_scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.val_batch_size = val_batch_size
        self.smoke_images = smoke_images
        self.synthetic_num_train, self.synthetic_num_val = synthetic_num_train, synthetic_num_val
        self.synthetic_size = synthetic_size
        self.train_set = self.val_set = None

    @property
    def info(self) -> DatasetInfo:
        """The 150 SceneParsing classes (label value 255 ignored); FLOPs at the crop size (512x512)."""
        names = ADE20K_CLASSES if self.num_classes == 150 else tuple(str(i) for i in range(self.num_classes))
        return DatasetInfo(class_names=tuple(names), input_size=tuple(self.crop_size), mean=self.mean, std=self.std,
                           ignore_index=IGNORE_INDEX)

    def dataset_dir(self, root: Path) -> Path:
        """``root`` may be ADEChallengeData2016 itself or the folder holding it (generated data)."""
        return root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root

    def check_layout(self, root: Path) -> None:
        base = self.dataset_dir(root)
        for kind in ("images", "annotations"):
            for split in ("training", "validation"):
                if not (base / kind / split).is_dir():
                    raise DatasetLayoutError(f"ADE20K not found: {base / kind / split} is missing")

    def check(self, full: bool = False) -> DataReport:
        """Every image has its label map (directory listings), both readable and of the same size
        (headers), label maps 8-bit single-channel; ``full`` decodes every image and label map and
        checks the class ids (0..num_classes, 255 = ignored). Packed: the manifest, indexes and shards."""
        if self.format == "litdata":
            return self.packed_report(full)
        base = self.dataset_dir(self.data_root())
        how = "full: every image and label map decoded" if full else \
            "cheap: listings and headers; data.verify=full decodes every file and checks the class ids"
        report = DataReport(f"ADE20K at {base} ({how})")
        pairs = []
        for split in ("training", "validation"):
            image_dir, label_dir = base / "images" / split, base / "annotations" / split
            images = sorted(e.name for e in os.scandir(image_dir) if e.name.lower().endswith(IMAGE_SUFFIXES))
            labels = {e.name for e in os.scandir(label_dir)}
            for name in images:
                label = f"{Path(name).stem}.png"
                if label in labels:
                    pairs.append((image_dir / name, label_dir / label))
                else:
                    report.problem(MISSING, f"{image_dir / name}: no label map {label_dir / label}")
            if not images:
                report.problem(EMPTY, f"{image_dir}: no images")
            report.checked.append(f"{split}: {len(images)} images, {len(labels)} label maps")
        check_all(report, partial(self.pair_problems, full=full), pairs, self.num_workers)
        return report

    def pair_problems(self, pair: tuple[Path, Path], full: bool) -> list[tuple[str, str]]:
        image, label_path = pair
        try:
            size = load_rgb(str(image)).size if full else read_header(str(image))[0]
            if full:
                label, mode = decode_label(label_path)
                label_size = (label.shape[1], label.shape[0])
            else:
                label_size, mode = read_header(str(label_path))
        except CorruptImageError as err:
            return [read_problem(err)]
        problem = label_format_problem(label_path, label_size, mode, size)
        if problem:
            return [problem]
        if full and (detail := label_ids_problem(label_path, label, self.num_classes, self.reduce_zero_label)):
            return [(LABEL_IDS, detail)]
        return []

    def generate_synthetic(self, root: Path) -> None:
        from vitlab.data.synthetic_dense import make_ade20k

        make_ade20k(root, seed=0, num_train=self.synthetic_num_train, num_val=self.synthetic_num_val,
                    size=self.synthetic_size)

    def val_transform(self):
        # keep ratio, fit into test_scale (mmseg Resize(keep_ratio=True)): shorter side 512, longer <= 2048
        return v2.Compose([
            v2.Resize(min(self.test_scale), max_size=max(self.test_scale)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ])

    def eval_image_transform(self):
        return v2.Compose([v2.ToImage(), self.val_transform()])  # uint8 tensor first, as the dataset does

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        root = self.data_root()
        common = dict(num_classes=self.num_classes, reduce_zero_label=self.reduce_zero_label,
                      skip_corrupt=self.skip_corrupt)
        self.val_set = self.split_set(root, "validation", self.val_transform(), train=False, **common)
        if stage in (None, "fit"):
            train_tf = TrainTransform(self.img_scale, self.ratio_range, self.crop_size, self.cat_max_ratio,
                                      self.flip_prob, self.photometric, self.mean, self.std)
            self.train_set = self.split_set(root, "training", train_tf, train=True, **common)
        if self.smoke:
            for ds in (self.train_set, self.val_set):
                if ds is not None:
                    ds.images = ds.images[: self.smoke_images]

    def split_set(self, root: Path, split: str, transform, **kw) -> ADE20KDataset:
        """One split: its folders in the release layout, or its packed split of the same name."""
        if self.format == "litdata":
            return PackedADE20KDataset(root / split, transform, read_threads=self.read_threads, **kw)
        return ADE20KDataset(self.dataset_dir(root), split, transform, **kw)

    def train_dataloader(self) -> DataLoader:
        return self.make_loader(self.train_set, train=True, collate_fn=collate_train)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.val_set, train=False, collate_fn=collate_val, batch_size=self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


ADE20K_SPLITS = ("training", "validation")


def _ade20k_item(source: tuple[str, str]) -> dict:
    image, label = source
    return {"name": Path(image).stem, "image": file_bytes(image), "label": file_bytes(label)}


def pack_ade20k(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1,
                skip_corrupt: bool = False) -> dict:
    """``python -m vitlab.data.pack ade20k``: each split's image / label-map pairs in file-name order, as
    ``ADE20KDataset`` lists them (``--root``: ADEChallengeData2016 or the folder holding it)."""
    root, out = Path(root), Path(out)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    manifest = open_manifest(out, "ade20k")
    for split in ADE20K_SPLITS:
        if not (base / "images" / split).is_dir() or not (base / "annotations" / split).is_dir():
            raise SystemExit(f"ADE20K not found: {base}/images/{split} and {base}/annotations/{split} are expected")
        ds = ADE20KDataset(base, split, None, train=False, skip_corrupt=skip_corrupt)
        sources = [(str(p), str(ds.label_dir / f"{p.stem}.png")) for p in ds.images]
        pack_split(out, manifest, split, sources, _ade20k_item,
                   lambda i, item, s=sources: None if item["name"] == Path(s[i][0]).stem else "another image",
                   shard_size, workers)
    return manifest
