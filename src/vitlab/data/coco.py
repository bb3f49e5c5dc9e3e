"""COCO 2017 detection / instance segmentation data, read with pycocotools.

Layout (the official one)::

    <root>/train2017/*.jpg   <root>/val2017/*.jpg
    <root>/annotations/instances_train2017.json   instances_val2017.json

Training follows mmdetection's COCO pipeline: images without (non-crowd)
annotations are dropped, crowd regions are ignored, shorter side resized to
800 (or a random choice of ``train_scales`` for multi-scale 3x training) with
the longer side <= 1333, horizontal flip. ``crop_policy=detr`` is the 3x policy of the
official PVTv2 / GPViT configs (mmdet's AutoAugment of DETR's): half of the images are resized
to ``train_scales``, the other half resized to a shorter side of 400/500/600, cropped to a random
384-600 x 384-600 window and resized to ``train_scales``; ``max_crop`` (GPViT: 1024) then crops
whatever exceeds that size. Transforms are torchvision v2 on tv_tensors, so boxes and masks follow
the image.

Padding to a multiple of 32 and the mean/std normalisation happen inside the
model (torchvision's ``GeneralizedRCNNTransform``, see ``vitlab.heads.detection``):
batches here are lists of images of different sizes, uint8 out of the loader (a quarter of the
bytes a worker hands over as float32: measured 2x the CPU per image through a worker) and scaled to
float [0, 1] after the transfer to the device (``CocoDataModule.on_after_batch_transfer``).

Labels are contiguous ``0..K-1`` in the order of the sorted category ids;
``category_ids[label]`` maps back (used when writing the results JSON).

Validation targets stay in the original image's coordinates and keep crowd
regions (``iscrowd=1``), so the metric is COCO's own protocol; the task maps
predictions back to the original size.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.errors import VitlabUserError
from vitlab.data.base import (
    DatasetFacts,
    IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, DatasetInfo, DatasetLayoutError, DetectionBatch, EpochSampler,
)
from vitlab.data.imagenet import load_rgb, read_header, read_problem
from vitlab.data.packing import file_bytes, keep_file, open_manifest, pack_split, save_manifest
from vitlab.data.streaming import PackableDataModule, PackedSplit, decode_rgb, read_manifest
from vitlab.data.report import (
    BAD_ANNOTATION_FILE, BAD_BOX, BAD_SEGMENTATION, BOX_OUTSIDE, CATEGORIES_DIFFER, CLIPPED_BOX, EMPTY, MISSING,
    SIZE_MISMATCH, UNKNOWN_CATEGORY, UNKNOWN_IMAGE, ZERO_AREA_BOX, DataReport, check_all, skip_or_raise,
)


class RandomSizeCrop(v2.Transform):
    """mmdetection's ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``: a window whose
    height and width are drawn from [low, high] (at most the image's), at a uniform position; crops
    without boxes are kept. (torchvision's RandomCrop takes one fixed size.)"""

    def __init__(self, low: int, high: int):
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs) -> dict:
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(h, self.low), min(h, self.high) + 1, ()))
        cw = int(torch.randint(min(w, self.low), min(w, self.high) + 1, ()))
        top, left = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.crop, inpt, **params)


class AnnotationError(VitlabUserError, ValueError):
    """A malformed annotation file or annotation; the message names the file and the item."""


BOX_TOLERANCE = 1.0  # px: COCO boxes derived from polygons may overshoot the border by rounding


def load_coco_json(path: Path) -> COCO:
    """Parse and check an instances JSON; a bad file is an ``AnnotationError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: missing or non-list '{key}' (COCO instances format)")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= img.keys():
            raise AnnotationError(f"{path}: images[{i}] needs id, file_name, width, height; got {img!r:.200}")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise AnnotationError(f"{path}: categories[{i}] has no id")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not {"id", "image_id", "category_id", "bbox"} <= ann.keys():
            raise AnnotationError(
                f"{path}: annotations[{i}] needs id, image_id, category_id, bbox; got {ann!r:.200}"
            )
    coco = COCO()  # pycocotools' documented way to index an already-loaded dict
    coco.dataset = data
    index(coco)
    return coco


def index(coco: COCO) -> None:
    """pycocotools' ``createIndex`` without its progress prints on stdout (check reports go there)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()


def check_annotations(coco: COCO, path: Path, clip_boxes: bool, report: DataReport, with_masks: bool = False) -> set[int]:
    """Every annotation's image, category and box (and segmentation, with masks) into ``report``.

    Boxes that leave their image are clipped (and counted) with ``clip_boxes``, problems without;
    zero-area boxes are counted as warnings (COCO 2017 train has two: they are left out of the
    training targets). Returns the ids of the invalid annotations (``data.skip_corrupt`` drops them).
    """
    invalid = set()
    for ann in coco.dataset["annotations"]:
        where = f"{path}: annotation id {ann['id']}"
        img = coco.imgs.get(ann["image_id"])
        if img is None:
            report.problem(UNKNOWN_IMAGE, f"{where}: image_id {ann['image_id']} is not in 'images'")
            invalid.add(ann["id"])
            continue
        where += f" (image {img['file_name']})"
        if ann["category_id"] not in coco.cats:
            report.problem(UNKNOWN_CATEGORY,
                           f"{where}: category_id {ann['category_id']} is not one of the {len(coco.cats)} categories")
            invalid.add(ann["id"])
        if with_masks and "segmentation" not in ann:
            report.problem(BAD_SEGMENTATION, f"{where}: no segmentation (data.with_masks=true needs one)")
            invalid.add(ann["id"])
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            report.problem(BAD_BOX, f"{where}: bbox must be [x, y, width, height]; got {box!r}")
            invalid.add(ann["id"])
            continue
        x, y, w, h = box
        if not all(math.isfinite(v) for v in box) or w < 0 or h < 0:
            report.problem(BAD_BOX, f"{where}: bbox {box} has a negative or non-finite size")
            invalid.add(ann["id"])
            continue
        W, H = img["width"], img["height"]
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
            if not clip_boxes:
                report.problem(BOX_OUTSIDE, f"{where}: bbox {box} (xywh) lies outside its {W}x{H} image")
                invalid.add(ann["id"])
                continue
            x0, y0 = min(max(x, 0.0), W), min(max(y, 0.0), H)
            x1, y1 = min(max(x + w, 0.0), W), min(max(y + h, 0.0), H)
            ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
            report.warn(CLIPPED_BOX, f"{where}: bbox {box} -> {ann['bbox']}")
        if ann["bbox"][2] == 0 or ann["bbox"][3] == 0:
            report.warn(ZERO_AREA_BOX, f"{where}: bbox {ann['bbox']}")
    return invalid


def learnable(ann: dict) -> bool:
    """Training uses non-crowd annotations with a box of positive area (mmdetection's rule)."""
    return not ann.get("iscrowd", 0) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0


def annotation_mask(ann: dict, info: dict) -> np.ndarray:
    """pycocotools' ``annToMask`` (polygons, compressed and uncompressed RLE) of one annotation of the
    image ``info``: a COCO index holding that image alone (``annToMask`` reads the size from it)."""
    coco = COCO()
    coco.imgs[ann["image_id"]] = info
    return coco.annToMask(ann)


def image_problems(item: tuple[Path, dict, str], full: bool) -> list[tuple[str, str]]:
    """The image file of one ``images`` entry: readable (decoded with ``full``), of the listed size."""
    path, info, listed_in = item
    try:
        size = load_rgb(str(path)).size if full else read_header(str(path))[0]
    except CorruptImageError as err:
        return [read_problem(err)]
    if size != (info["width"], info["height"]):
        return [(SIZE_MISMATCH, f"{path} is {size[0]}x{size[1]} but {listed_in} says "
                                f"{info['width']}x{info['height']} (image id {info['id']})")]
    return []


class CocoDetectionDataset(Dataset):
    """One COCO split. Items: ``(image uint8 CHW, target dict)`` or ``None`` (skipped corrupt file).

    Training targets: ``boxes`` (XYXY ``BoundingBoxes``), ``labels``, ``masks`` (``Mask``, N x H x W)
    after the transforms, crowd regions removed. Validation targets: original coordinates,
    crowd regions kept with ``iscrowd``; the image is transformed alone.
    Both carry ``image_id`` (COCO's) and ``orig_size`` (H, W).
    """

    def __init__(
        self,
        image_dir: Path,
        ann_file: Path,
        transforms,
        train: bool,
        with_masks: bool,
        clip_boxes: bool = False,
        skip_corrupt: bool = False,
        coco: COCO | None = None,
    ):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.transforms = transforms
        self.train = train
        self.with_masks = with_masks
        self.skip_corrupt = skip_corrupt
        self.coco = coco or load_coco_json(self.ann_file)
        report = DataReport(str(self.ann_file))
        invalid = check_annotations(self.coco, self.ann_file, clip_boxes, report, with_masks)
        report.enforce(skip_corrupt, AnnotationError)
        self.num_clipped = report.count(CLIPPED_BOX)
        if invalid:  # data.skip_corrupt=true: left out (enforce warned with their count)
            self.coco.dataset["annotations"] = [a for a in self.coco.dataset["annotations"] if a["id"] not in invalid]
            index(self.coco)
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {cat: i for i, cat in enumerate(self.category_ids)}
        ids = sorted(self.coco.imgs)
        if train:  # mmdet's filter_empty_gt: an image with nothing to learn from is dropped
            ids = [i for i in ids if any(learnable(a) for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_groups(self) -> list[int]:
        """0 for landscape (w >= h), 1 for portrait: batches are drawn from one group."""
        return [int(self.coco.imgs[i]["width"] < self.coco.imgs[i]["height"]) for i in self.ids]

    def _target(self, info: dict, anns: list[dict]) -> dict:
        H, W = info["height"], info["width"]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), H, W), dtype=np.uint8)
            for k, ann in enumerate(anns):
                if "segmentation" not in ann:
                    raise AnnotationError(f"{self.ann_file}: annotation id {ann['id']} has no segmentation")
                try:  # pycocotools reads polygons, compressed and uncompressed RLE
                    masks[k] = annotation_mask(ann, info)
                except Exception as err:
                    raise AnnotationError(
                        f"{self.ann_file}: annotation id {ann['id']} (image {info['file_name']}): "
                        f"unreadable segmentation ({type(err).__name__}: {err})"
                    ) from None
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return target

    def load(self, index: int) -> tuple[Image.Image, dict, list[dict], str]:
        """Item ``index``'s decoded image, ``images`` entry and annotations, and the image's name in errors."""
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        return load_rgb(str(path)), info, self.coco.imgToAnns.get(info["id"], []), str(path)

    def __getitem__(self, index: int):
        try:
            pil, info, anns, name = self.load(index)
            if pil.size != (info["width"], info["height"]):
                raise AnnotationError(
                    f"{self.ann_file}: image id {info['id']}: {name} is {pil.size[0]}x{pil.size[1]} but the JSON "
                    f"says {info['width']}x{info['height']}"
                )
        except (CorruptImageError, AnnotationError) as err:
            return skip_or_raise(err, self.skip_corrupt)
        image_id = info["id"]
        image = tv_tensors.Image(TF.pil_to_tensor(pil))
        if self.train:  # crowd regions are ignored in training, and so are zero-area boxes (counted)
            anns = [a for a in anns if learnable(a)]
        target = self._target(info, anns)
        target["image_id"] = image_id
        target["orig_size"] = (info["height"], info["width"])
        if self.train:
            image, target = self.transforms(image, target)
        else:
            image = self.transforms(image)
        return image, target


class PackedCocoDataset(CocoDetectionDataset):
    """A split packed by ``python -m vitlab.data.pack coco`` (``data.format=litdata``): the same items
    as ``CocoDetectionDataset`` over the folder layout. The annotations come with each image (checked
    when packing); ``images.json`` beside the chunks gives the image filter and the aspect-ratio
    groups without reading a chunk."""

    def __init__(self, split_dir: Path, manifest: dict, transforms, train: bool, with_masks: bool,
                 skip_corrupt: bool = False, read_threads: int = 0):
        self.items, self.ann_file = PackedSplit(split_dir, read_threads), Path(split_dir)
        self.transforms, self.train, self.with_masks, self.skip_corrupt = transforms, train, with_masks, skip_corrupt
        if with_masks and manifest["splits"][self.ann_file.name]["without_segmentation"]:
            raise AnnotationError(f"{split_dir}: {manifest['splits'][self.ann_file.name]['without_segmentation']} "
                                  f"annotations have no segmentation (data.with_masks=true needs one each)")
        self.num_clipped = 0  # counted when packing
        self.category_ids = [c for c, _ in manifest["categories"]]
        self.label_of = {cat: i for i, cat in enumerate(self.category_ids)}
        self.table = json.loads((self.ann_file / "images.json").read_text())["rows"]  # image id, w, h, learnable
        self.ids = [k for k, row in enumerate(self.table) if not train or row[3]]  # item positions

    def aspect_groups(self) -> list[int]:
        return [int(self.table[k][1] < self.table[k][2]) for k in self.ids]

    def __getitems__(self, indices: list[int]) -> list:
        """A batch (the loader's fetch): from a bucket its items requested at once."""
        self.items.prefetch([self.ids[i] for i in indices])
        return [self[i] for i in indices]

    def load(self, index: int) -> tuple[Image.Image, dict, list[dict], str]:
        k = self.ids[index]
        item = self.items[k]
        name = f"{self.ann_file} item {k} ({item['file_name']})"
        try:
            anns = json.loads(item["annotations"])
        except ValueError as err:
            raise CorruptImageError(f"{name}: its annotations cannot be read ({err})") from None
        info = {key: item[key] for key in ("file_name", "width", "height")} | {"id": int(item["image_id"])}
        return decode_rgb(item["jpeg"], name), info, anns, name


class AspectRatioGroupedSampler(DistributedSampler):
    """Shuffled batches whose images share an orientation (landscape / portrait).

    mmdetection's DistributedGroupSampler: each group is padded to a multiple of
    batch x replicas with repeated images, cut into batches, batches shuffled and
    dealt to the ranks. A sampler (not a batch sampler) so Lightning recognises it
    as distributed and leaves it alone; torchvision's GroupedBatchSampler lives in
    its references/, not in the library.
    """

    def __init__(self, dataset, group_ids: list[int], batch_size: int, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.group_ids = torch.as_tensor(group_ids)
        self.batch_size = batch_size

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        chunk = self.batch_size * self.num_replicas
        batches = []
        for group in self.group_ids.unique().tolist():
            idx = torch.nonzero(self.group_ids == group).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            pad = (-len(idx)) % chunk
            idx = torch.cat([idx, idx[torch.randint(len(idx), (pad,), generator=g)]]).tolist()
            batches += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order][self.rank :: self.num_replicas]

    def __iter__(self):  # a generator: the epoch is read at the first index (see data.base.EpochSampler)
        for batch in self._batches():
            yield from batch

    def __len__(self) -> int:
        return sum(len(b) for b in self._batches())


def collate_detection(batch) -> DetectionBatch:
    """Lists of images and targets (sizes differ); skipped corrupt files counted."""
    kept = [b for b in batch if b is not None]
    return DetectionBatch([b[0] for b in kept], [b[1] for b in kept], torch.tensor(len(batch) - len(kept)))


class CocoDataModule(PackableDataModule):
    # COCO 2017: 80 categories, 117,266 train2017 images with annotations, mostly 640x480
    FACTS = DatasetFacts(num_classes=80, train_images=117_266, image_size=(640, 480), flops_input=(800, 1280),
                          train_input=(800, 1333))
    layout_help = (
        "  <root>/train2017/*.jpg\n"
        "  <root>/val2017/*.jpg\n"
        "  <root>/annotations/instances_train2017.json\n"
        "  <root>/annotations/instances_val2017.json"
    )
    pack_kind = "coco"

    def pack(self, folder: Path, out: Path) -> None:
        pack_coco(folder, out, shard_size="256KB", workers=1)

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
        train_scales: list[int] = (800,),
        test_scale: int = 800,
        max_size: int = 1333,
        flip_prob: float = 0.5,
        crop_policy: str = "none",
        max_crop: int | None = None,
        with_masks: bool = False,
        group_by_aspect_ratio: bool = True,
        clip_boxes: bool = False,
        val_batch_size: int = 1,
        smoke_scale: int = 128,
        smoke_images: int = 8,
        synthetic_num_train: int = 96,
        synthetic_num_val: int = 24,
        synthetic_size: int = 160,
    ):
        super().__init__(root, synthetic, synthetic_root, batch_size, num_workers, smoke, skip_corrupt, seed, verify,
                         format, cache_dir, read_threads)
        if smoke:  # seconds-long runs: small images, few of them
            train_scales, test_scale, max_size = [smoke_scale], smoke_scale, smoke_scale * 5 // 3
        self.train_scales = list(train_scales)
        self.test_scale = test_scale
        self.max_size = max_size
        self.flip_prob = flip_prob
        if crop_policy not in ("none", "detr"):
            raise ValueError(f"data.crop_policy={crop_policy!r}: expected none or detr")
        self.crop_policy, self.max_crop = crop_policy, max_crop
        self.with_masks = with_masks
        self.group_by_aspect_ratio = group_by_aspect_ratio
        self.clip_boxes = clip_boxes
        self.val_batch_size = val_batch_size
        self.smoke_images = smoke_images
        self.synthetic_num_train = synthetic_num_train
        self.synthetic_num_val = synthetic_num_val
        self.synthetic_size = synthetic_size
        self.input_size = (test_scale, max_size)  # for the FLOP count (the papers' 1333x800)
        self.train_set = self.val_set = None
        self._info: DatasetInfo | None = None

    @property
    def info(self) -> DatasetInfo:
        """Categories from the validation JSON (contiguous labels in sorted id order), or the 80 COCO
        categories the generated data lists. Images are normalised inside the detector."""
        if self._info is None:
            if self.synthetic:
                from vitlab.data.synthetic_dense import COCO_CATEGORIES

                cats = sorted(COCO_CATEGORIES)
            elif self.format == "litdata":  # the packed dataset's manifest keeps the val JSON's categories
                cats = [tuple(c) for c in read_manifest(self.data_root(), "coco")["categories"]]
            else:
                ann = self.data_root() / "annotations" / "instances_val2017.json"
                cats = sorted((c["id"], c.get("name", str(c["id"]))) for c in load_coco_json(ann).dataset["categories"])
            self._info = DatasetInfo(
                class_names=tuple(name for _, name in cats), category_ids=tuple(i for i, _ in cats),
                input_size=self.input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, with_masks=self.with_masks,
            )
        return self._info

    def check_layout(self, root: Path) -> None:
        for rel in ("train2017", "val2017"):
            if not (root / rel).is_dir():
                raise DatasetLayoutError(f"COCO not found: {root / rel} is missing")
        for split in ("train", "val"):
            ann = root / "annotations" / f"instances_{split}2017.json"
            if not ann.is_file():
                raise DatasetLayoutError(f"COCO annotations not found: {ann} is missing")

    def check(self, full: bool = False) -> DataReport:
        """Both JSON files (every annotation: image, category, box), every listed image on disk
        (one directory listing per split) and its size from the file header; ``full`` decodes every
        image (and, with masks, every segmentation). Packed: the manifest, indexes and shards."""
        if self.format == "litdata":
            return self.packed_report(full)
        root = self.data_root()
        how = "full: every image decoded" if full else "cheap: listings, image headers, annotations; data.verify=full decodes every image"
        report = DataReport(f"COCO at {root} ({how})")
        categories, images = {}, []
        for split in ("train", "val"):
            ann_file, image_dir = root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"
            try:
                coco = load_coco_json(ann_file)
            except AnnotationError as err:
                report.problem(BAD_ANNOTATION_FILE, str(err))
                continue
            categories[split] = sorted(coco.cats)
            invalid = check_annotations(coco, ann_file, self.clip_boxes, report, self.with_masks)
            if full and self.with_masks:
                for ann in coco.dataset["annotations"]:
                    if ann["id"] not in invalid:
                        where = f"{ann_file}: annotation id {ann['id']}: segmentation"
                        size = coco.imgs[ann["image_id"]]["height"], coco.imgs[ann["image_id"]]["width"]
                        try:
                            shape = coco.annToMask(ann).shape
                        except Exception as err:  # pycocotools raises anything from a bad polygon or RLE
                            report.problem(BAD_SEGMENTATION, f"{where} unreadable ({type(err).__name__}: {err})")
                            continue
                        if shape != size:  # an RLE carries its own size
                            report.problem(BAD_SEGMENTATION, f"{where} is {shape[1]}x{shape[0]}, its image "
                                                             f"{size[1]}x{size[0]}")
            on_disk = {e.name for e in os.scandir(image_dir)}
            for info in coco.imgs.values():
                path = image_dir / info["file_name"]
                if info["file_name"] in on_disk or path.is_file():  # is_file: names with a sub-folder
                    images.append((path, info, ann_file.name))
                else:
                    report.problem(MISSING, f"{path}: listed in {ann_file.name} (image id {info['id']}) but not on disk")
            if not coco.imgs:
                report.problem(EMPTY, f"{ann_file}: lists no images")
            report.checked.append(f"{split}2017: {len(coco.imgs)} images and {len(coco.anns)} annotations in "
                                  f"{ann_file.name}, {len(on_disk)} files in {image_dir.name}/")
        if len(categories) == 2 and categories["train"] != categories["val"]:
            report.problem(CATEGORIES_DIFFER, f"{root / 'annotations'}: the train and val JSON list different "
                                              f"category ids ({len(categories['train'])} vs {len(categories['val'])})")
        check_all(report, partial(image_problems, full=full), images, self.num_workers)
        return report

    def generate_synthetic(self, root: Path) -> None:
        from vitlab.data.synthetic_dense import make_coco

        make_coco(root, seed=0, num_train=self.synthetic_num_train, num_val=self.synthetic_num_val,
                  size=self.synthetic_size)

    def train_transforms(self):
        resize = (
            v2.RandomShortestSize(min_size=self.train_scales, max_size=self.max_size)
            if len(self.train_scales) > 1
            else v2.Resize(self.train_scales[0], max_size=self.max_size)
        )
        if self.crop_policy == "detr":  # mmdet AutoAugment: one of the two policies, with equal chance
            resize = v2.RandomChoice([resize, v2.Compose([
                v2.RandomShortestSize(min_size=[400, 500, 600], max_size=self.max_size),
                RandomSizeCrop(384, 600), resize])])
        crops = [RandomSizeCrop(self.max_crop, self.max_crop)] if self.max_crop else []
        return v2.Compose([
            resize,
            *crops,
            v2.RandomHorizontalFlip(self.flip_prob),
            v2.SanitizeBoundingBoxes(min_size=1),  # drops boxes (and their labels, masks) squashed by the resize
            # (images stay uint8: on_after_batch_transfer scales them)
        ])

    def val_transforms(self):
        return v2.Compose([v2.Resize(self.test_scale, max_size=self.max_size)])  # uint8: scaled after the transfer

    def eval_image_transform(self):
        # uint8 tensor first, as the dataset does; scaled here (predict.py's loader has no transfer hook)
        return v2.Compose([v2.ToImage(), self.val_transforms(), v2.ToDtype(torch.float32, scale=True)])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Images leave the loader as uint8; the model takes float [0, 1] (torchvision's ToDtype, on the
        device: what the transforms did in the workers before). Normalisation stays in the model."""
        if isinstance(batch, DetectionBatch):
            batch = batch._replace(images=[TF.to_dtype(im, torch.float32, scale=True) for im in batch.images])
        return batch

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        root = self.data_root()
        ann = root / "annotations"
        if self.format == "litdata":
            self.setup_packed(root, stage)
        else:
            self.setup_folder(root, stage)
        if tuple(self.val_set.category_ids) != self.info.category_ids:
            raise AnnotationError(f"{ann}: the categories changed since the task was built")
        if self.smoke:
            for ds in (self.train_set, self.val_set):
                if ds is not None:
                    ds.ids = ds.ids[: self.smoke_images]

    def setup_packed(self, root: Path, stage: str | None) -> None:
        manifest = read_manifest(root, "coco")
        if self.clip_boxes and not manifest.get("options", {}).get("clip_boxes"):
            # boxes were checked (and clipped or not) when packing: the reader cannot clip them afterwards
            raise AnnotationError(f"data.clip_boxes=true: {self.root} was packed without --clip-boxes, so its boxes "
                                  f"are as given; pack again with python -m vitlab.data.pack coco --clip-boxes --root "
                                  f"<the COCO folder> --out <new dir>, or set data.clip_boxes=false")
        common = dict(manifest=manifest, with_masks=self.with_masks, skip_corrupt=self.skip_corrupt,
                      read_threads=self.read_threads)
        self.val_set = PackedCocoDataset(root / "val2017", transforms=self.val_transforms(), train=False, **common)
        if stage in (None, "fit"):
            self.train_set = PackedCocoDataset(root / "train2017", transforms=self.train_transforms(), train=True,
                                               **common)

    def setup_folder(self, root: Path, stage: str | None) -> None:
        ann = root / "annotations"
        self.val_set = CocoDetectionDataset(
            root / "val2017", ann / "instances_val2017.json", self.val_transforms(), train=False,
            with_masks=self.with_masks, clip_boxes=self.clip_boxes, skip_corrupt=self.skip_corrupt,
        )
        if stage in (None, "fit"):
            self.train_set = CocoDetectionDataset(
                root / "train2017", ann / "instances_train2017.json", self.train_transforms(), train=True,
                with_masks=self.with_masks, clip_boxes=self.clip_boxes, skip_corrupt=self.skip_corrupt,
            )
            if self.train_set.category_ids != self.val_set.category_ids:
                raise AnnotationError(f"{ann}: train and val JSON list different categories")

    def train_dataloader(self) -> DataLoader:
        world, rank = self.world()
        if self.group_by_aspect_ratio:
            sampler = AspectRatioGroupedSampler(
                self.train_set, self.train_set.aspect_groups(), self.batch_size, world, rank, self.seed
            )
        else:
            sampler = EpochSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return self.make_loader(self.train_set, train=True, collate_fn=collate_detection, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.val_set, train=False, collate_fn=collate_detection, batch_size=self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


COCO_SPLITS = ("train2017", "val2017")


def _coco_item(source: tuple[str, dict, list[dict]]) -> dict:
    path, info, anns = source
    return {"image_id": info["id"], "file_name": info["file_name"], "width": info["width"],
            "height": info["height"], "jpeg": file_bytes(path), "annotations": json.dumps(anns)}


def pack_coco(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1,
              clip_boxes: bool = False, skip_corrupt: bool = False) -> dict:
    """``python -m vitlab.data.pack coco``: each split's images in image-id order, with their annotations
    as ``CocoDetectionDataset`` reads them (its checks, with these options); the val JSON kept as given."""
    root, out = Path(root), Path(out)
    sets = {}
    for split in COCO_SPLITS:
        ann_file, image_dir = root / "annotations" / f"instances_{split}.json", root / split
        if not ann_file.is_file() or not image_dir.is_dir():
            raise SystemExit(f"COCO not found: {ann_file} and {image_dir}/ are expected")
        sets[split] = CocoDetectionDataset(image_dir, ann_file, None, train=False, with_masks=False,
                                           clip_boxes=clip_boxes, skip_corrupt=skip_corrupt)
    categories = [[c["id"], c.get("name", str(c["id"]))] for c in sorted(sets["val2017"].coco.dataset["categories"],
                                                                          key=lambda c: c["id"])]
    if sets["train2017"].category_ids != sets["val2017"].category_ids:
        raise SystemExit(f"{root / 'annotations'}: the train and val JSON list different categories")
    manifest = open_manifest(out, "coco", categories=categories)
    manifest["options"] = {"clip_boxes": clip_boxes, "skip_corrupt": skip_corrupt}
    for split, ds in sets.items():
        sources, table, missing = [], [], 0
        for image_id in ds.ids:
            info, anns = ds.coco.imgs[image_id], ds.coco.imgToAnns.get(image_id, [])
            path = ds.image_dir / info["file_name"]
            if not path.is_file():
                raise SystemExit(f"{path}: listed in {ds.ann_file.name} (image id {image_id}) but not on disk")
            sources.append((str(path), info, anns))
            table.append([image_id, info["width"], info["height"], sum(learnable(a) for a in anns)])
            missing += sum("segmentation" not in a for a in anns)

        def check(i, item, sources=sources):
            _, info, anns = sources[i]
            same = int(item["image_id"]) == info["id"] and len(json.loads(item["annotations"])) == len(anns)
            return None if same else "image id or annotation count differs from the JSON"

        def beside(order, table=table):
            rows = [table[i] for i in order]
            return {"images.json": json.dumps({"columns": ["image_id", "width", "height", "learnable"],
                                               "rows": rows}, separators=(",", ":")).encode()}

        pack_split(out, manifest, split, sources, _coco_item, check, shard_size, workers, beside,
                   annotations=sum(len(s[2]) for s in sources), without_segmentation=missing)
    keep_file(out, manifest, "annotations/instances_val2017.json",
              (root / "annotations" / "instances_val2017.json").read_bytes())
    save_manifest(out, manifest)
    return manifest
