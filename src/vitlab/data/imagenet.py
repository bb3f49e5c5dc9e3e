"""ImageNet-1K classification data in its folder layout (``train/<wnid>/*``, ``val/<wnid>/*``).

Transforms, mixup/cutmix and the repeated-augmentation sampler are timm's: the
DeiT recipe the papers train with is exactly what timm implements.

Training batches leave the loader workers as uint8 images (timm's ``use_prefetcher`` form, its
train.py's default); normalisation + random erasing run on the device after the transfer
(``on_after_batch_transfer``, as timm's own ``PrefetchLoader`` does); mixup / cutmix already run
there (the task).

``fast_decode``: the same augmentation, cheaper for the loader workers (``python -m vitlab.tools.bench
--loader imagenet --fast-decode`` shows the images/s): JPEGs are decoded at a reduced DCT scale
where the random crop allows it and resized by torch (``FastRandomResizedCrop``).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import math
import multiprocessing
import os
import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF2
from PIL import Image, UnidentifiedImageError
from timm.data import auto_augment, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, DistributedSampler, Subset, default_collate
from torchvision.datasets import ImageFolder

from vitlab.data.base import (
    DatasetFacts,
    IMAGENET_MEAN, IMAGENET_STD, BlockShuffleSampler, CorruptImageError, DatasetInfo, DatasetLayoutError, ImageBatch,
    MissingFileError, block_sizes, is_url,
)
from vitlab.data.packing import IDENTITY_BEFORE, MANIFEST, file_bytes, open_manifest, pack_split
from vitlab.data.streaming import PackableDataModule
from vitlab.data.report import EMPTY, IGNORED_FILE, MISSING, UNDECODABLE, DataReport, check_all, skip_or_raise

log = logging.getLogger(__name__)  # a child of "vitlab": same handlers

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
# data.gpu_decode's shared batch slots (gpu_decode.ByteRing): room per image of a batch. ImageNet's JPEGs
# average ~110 KB; a batch that does not fit (rare) is handed over in a block of its own
RING_BYTES_PER_IMAGE = 192 << 10


def has_image_suffix(path: str) -> bool:
    return path.lower().endswith(IMG_EXTENSIONS)


def read_synset_names(root: Path, wnids: list[str]) -> list[str]:
    """Readable class names from ImageNet's ``LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca")
    next to train/ (or one level up); the wnids themselves where there is none."""
    for path in (root / "LOC_synset_mapping.txt", root.parent / "LOC_synset_mapping.txt"):
        if path.is_file():
            mapping = dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)
            return [mapping.get(w, w).split(",")[0].strip() for w in wnids]
    return list(wnids)


_timm_posterize = auto_augment.posterize


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's Posterize op, with 0 bits giving a black image as it did on Pillow < 13.

    RandAugment ``inc1`` (PosterizeIncreasing: 4 - 4 = 0 bits at magnitude 10, which ``mstd0.5``
    draws around m9) and AutoAugment ``v0`` (``('Posterize', 0.8, 2)``: 0 bits) ask for 0 bits.
    Pillow 13's ``ImageOps.posterize`` refuses them (ValueError); older Pillow masked every bit
    away (``i & ~255 == 0``), a black image, which is what the recipes were tuned with (timm's v0
    policy notes it). Registered into timm's op table below, so every timm policy uses it.
    """
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return _timm_posterize(img, bits_to_keep, **kwargs)


# AugmentOp looks its function up in this table when it is built, i.e. inside create_transform.
for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
    auto_augment.NAME_TO_OP[_name] = posterize


@contextmanager
def reading(path):
    """Pillow's errors for ``path`` as a ``MissingFileError`` or a ``CorruptImageError`` naming it."""
    try:
        yield
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file is missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise CorruptImageError(f"{path}: cannot be decoded as an image ({err})") from err


def load_rgb(path: str, data: bytearray | None = None) -> Image.Image:
    """The file decoded to RGB (``data``: its bytes, read already: ``ImageFolderDataset.__getitems__``)."""
    with reading(path), (open(path, "rb") if data is None else io.BytesIO(data)) as f:
        return Image.open(f).convert("RGB")


def open_lazy(path: str, data: bytearray | None = None) -> Image.Image:
    """The image with only its header read (size, mode): ``FastRandomResizedCrop`` decodes it."""
    with reading(path):
        img = Image.open(path if data is None else io.BytesIO(data))
        img.filename = path  # errors in the lazy crop name the file
        return img


def read_header(path: str) -> tuple[tuple[int, int], str]:
    """(width, height) and mode from the file's header, no pixel decoded; errors as ``load_rgb``'s."""
    with reading(path), Image.open(path) as img:  # lazy: reads the header only
        return img.size, img.mode


def read_problem(err: CorruptImageError) -> tuple[str, str]:
    """A check's finding for a file the loaders could not read."""
    return (MISSING if isinstance(err, MissingFileError) else UNDECODABLE), str(err)


def decode_problems(path: str) -> list[tuple[str, str]]:
    """A full check's finding for one image: decoded exactly as the loaders decode it."""
    try:
        load_rgb(path)
    except CorruptImageError as err:
        return [read_problem(err)]
    return []


class FastRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop, cheaper: a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or
    1/8, PIL's ``draft``) that leaves the crop at least the output size, and the crop is resized by
    torch's antialiased resize on the uint8 tensor (4x faster than PIL's on one core; within one
    grey level of PIL's bicubic / bilinear filter, which it reproduces).

    Takes a lazily opened image (``open_lazy``), returns a PIL image for the rest of timm's pipeline.
    The crop box is drawn exactly as timm draws it (same ``get_params`` on the header's size, same
    random calls), so crops have the default pipeline's distribution. A reduced decode moves the
    box to whole pixels of the reduced image (under half a reduced pixel).
    """

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        interpolation = (random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list))
                         else self.interpolation)
        width, height = img.size
        out_h, out_w = self.size
        with reading(getattr(img, "filename", "") or "<image>"):
            # draft picks the largest reduction keeping the image >= this size: the crop stays >= the output
            img.draft("RGB", (math.ceil(width * out_w / w), math.ceil(height * out_h / h)))
            img = img.convert("RGB") if img.mode != "RGB" else img
            pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H', W') uint8 view
        sx, sy = pixels.shape[2] / width, pixels.shape[1] / height
        top, left = round(i * sy), round(j * sx)
        crop = pixels[:, top: top + max(1, round(h * sy)), left: left + max(1, round(w * sx))]
        # v2's resize keeps uint8 through the antialiased bicubic / bilinear kernels (v1's goes via float: 4x slower)
        out = TF2.resize(crop, [out_h, out_w], interpolation=interpolation, antialias=True)
        return Image.fromarray(out.permute(1, 2, 0).numpy())


def normalise_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, (x / 255 - mean) / std (what ToTensor + Normalize give a worker)."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return images.float().sub_(mean).div_(std)


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder with a clear error for corrupt files, or skipping them.

    With ``skip_corrupt`` a bad file yields ``None``; ``collate_skipping`` drops it and
    counts it in the batch, so the count survives worker processes. A class folder without
    images is an error unless ``skip_corrupt`` (then the class simply has no training images).
    """

    def __init__(self, root: str, transform=None, skip_corrupt: bool = False, loader=load_rgb, read_threads: int = 0):
        super().__init__(root, transform=transform, loader=loader, is_valid_file=has_image_suffix,
                         allow_empty=skip_corrupt)
        self.skip_corrupt = skip_corrupt
        # data.read_threads: a batch's files read by this many threads at once (__getitems__), then
        # decoded one after another from those bytes by ``file_loader(path, data)``
        self.read_threads = read_threads
        self._pool, self._pid, self._ready = None, None, {}

    @property
    def loader(self):  # what ImageFolder calls with a path: the file's loader, given the bytes read ahead
        return lambda path: self.file_loader(path, self._ready.get(path))

    @loader.setter
    def loader(self, loader) -> None:  # ImageFolder's __init__ sets it
        self.file_loader = loader

    def __getstate__(self):  # a spawned worker starts its own threads
        return {**self.__dict__, "_pool": None, "_pid": None, "_ready": {}}

    def __getitems__(self, indices: list[int]) -> list:
        """A batch (the loader's fetch): with ``read_threads`` its files are read at once, so a worker
        waits about one read's latency (a shared filesystem's open and read: a millisecond or more)
        per that many files instead of one per file. A file that cannot be read here is read again
        by its loader, whose error names it."""
        if self.read_threads:
            if self._pid != os.getpid():
                self._pool, self._pid = ThreadPoolExecutor(self.read_threads, thread_name_prefix="vitlab-read"), os.getpid()
            paths = [self.samples[i][0] for i in indices]
            self._ready = dict(zip(paths, self._pool.map(read_whole_file, paths)))
        try:
            return [self[i] for i in indices]
        finally:
            self._ready = {}

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except CorruptImageError as err:
            return skip_or_raise(err, self.skip_corrupt)


def read_whole_file(path: str) -> bytearray | None:
    """The file's bytes (writable: a tensor can share them), or None where it cannot be read."""
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            return buf if f.readinto(buf) == len(buf) else None
    except OSError:
        return None


def collate_skipping(batch) -> ImageBatch:
    kept = [b for b in batch if b is not None]
    images, targets = default_collate(kept)
    return ImageBatch(images, targets, torch.tensor(len(batch) - len(kept)))


class DistributedRepeatAugSampler(RepeatAugSampler, DistributedSampler):
    """timm's repeated-augmentation sampler, marked as distributed so that Lightning leaves it in
    place (it splits the data over the processes itself) without a Trainer option."""

    def __iter__(self):  # a generator: the epoch is read at the first index (see data.base.EpochSampler)
        yield from super().__iter__()


class ImageNetDataModule(PackableDataModule):
    # ImageNet-1K (ILSVRC 2012): 1000 classes, 1,281,167 training images (typically 500x375); FLOPs at 224
    FACTS = DatasetFacts(num_classes=1000, train_images=1_281_167, image_size=(500, 375), flops_input=(224, 224),
                          train_input=(224, 224))
    layout_help = (
        "  <root>/train/<wnid>/*.JPEG   (one folder per class, e.g. n01440764)\n"
        "  <root>/val/<wnid>/*.JPEG     (the same class folders)"
    )
    pack_kind = "imagenet"

    def pack(self, folder: Path, out: Path) -> None:
        pack_imagenet(folder, out, shard_size="256KB", workers=1, order=self.pack_order)

    @property
    def pack_order(self) -> str:
        """The order the generated dataset is packed in: shuffled for the block order's reads."""
        return "shuffled" if self.shuffle == "block" else "folder"

    def __init__(
        self,
        root: str,
        synthetic: bool = False,
        synthetic_root: str | None = None,
        batch_size: int = 128,
        num_workers: int = 8,
        smoke: bool = False,
        skip_corrupt: bool = False,
        seed: int = 0,
        verify: str = "cheap",
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.4,
        reprob: float = 0.25,
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        repeated_aug: bool = False,
        synthetic_classes: int = 10,
        synthetic_size: int = 64,
        fast_decode: bool = False,
        format: str = "folder",
        cache_dir: str | None = None,
        read_threads: int = 0,
        gpu_decode: bool = False,
        shuffle: str = "uniform",
        shuffle_window: int = 4,
    ):
        if shuffle not in ("uniform", "block"):
            raise ValueError(f"data.shuffle={shuffle!r}: expected uniform or block")
        if shuffle == "block" and format != "litdata":
            raise ValueError(f"data.shuffle=block reads a packed dataset a few chunks at a time: it needs "
                             f"data.format=litdata (got data.format={format!r})")
        if shuffle == "block" and repeated_aug:
            raise ValueError("data.shuffle=block and data.repeated_aug=true: choose one (each is the training sampler)")
        if int(shuffle_window) < 1:
            raise ValueError(f"data.shuffle_window={shuffle_window}: expected a chunk count >= 1")
        self.shuffle, self.shuffle_window = shuffle, int(shuffle_window)
        super().__init__(root, synthetic, synthetic_root, batch_size, num_workers, smoke, skip_corrupt, seed, verify,
                         format, cache_dir, read_threads)
        self.img_size = 32 if smoke else img_size
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        self.auto_augment = auto_augment
        self.color_jitter = color_jitter
        self.reprob = reprob
        self.hflip = hflip
        self.scale = tuple(scale)
        self.repeated_aug = repeated_aug
        self.synthetic_classes = synthetic_classes
        self.synthetic_size = synthetic_size
        self.fast_decode = fast_decode
        if gpu_decode and (auto_augment or color_jitter):
            raise ValueError(f"data.gpu_decode=true decodes, crops and flips on the device; RandAugment / colour "
                             f"jitter have no device form (data.auto_augment={auto_augment!r}, data.color_jitter="
                             f"{color_jitter}): set data.auto_augment=null data.color_jitter=0, or data.gpu_decode=false")
        if gpu_decode and fast_decode:
            raise ValueError("data.gpu_decode=true and data.fast_decode=true: choose one (both move work off the workers)")
        self.gpu_decode = gpu_decode
        self._device_augment = None
        self.train_set = self.val_set = None
        self._info: DatasetInfo | None = None
        self._erasing: RandomErasing | None = None

    def check_layout(self, root: Path) -> None:
        for split in ("train", "val"):
            folder = root / split
            if not folder.is_dir():
                raise DatasetLayoutError(f"ImageNet not found: {folder} is missing")
            classes = [d for d in folder.iterdir() if d.is_dir()]
            if not classes:
                raise DatasetLayoutError(f"{folder} has no class folders (<wnid>/ sub-directories)")
        train_classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        val_classes = sorted(d.name for d in (root / "val").iterdir() if d.is_dir())
        if train_classes != val_classes:
            extra = sorted(set(train_classes) ^ set(val_classes))[:5]
            raise DatasetLayoutError(
                f"{root}: train/ and val/ must hold the same class folders; these differ: {extra}"
            )

    def check(self, full: bool = False) -> DataReport:
        """Class folders and their images as ImageFolder finds them (``os.walk``: directory listings
        only, no file opened, fast on the 1.28M files of ImageNet); ``full`` decodes every image."""
        if self.format == "litdata":
            return self.packed_report(full)
        root = self.data_root()
        how = "full: every image decoded" if full else "cheap: folder listings; data.verify=full decodes every image"
        report = DataReport(f"ImageNet at {root} ({how})")
        images = []
        for split in ("train", "val"):
            classes = sorted(e.name for e in os.scandir(root / split) if e.is_dir())
            count = 0
            for wnid in classes:
                found = 0
                for folder, _, files in sorted(os.walk(root / split / wnid, followlinks=True)):
                    for name in sorted(files):
                        if name.lower().endswith(IMG_EXTENSIONS):
                            found += 1
                            if full:
                                images.append(os.path.join(folder, name))
                        else:
                            report.warn(IGNORED_FILE, os.path.join(folder, name))
                if not found:
                    report.problem(EMPTY, f"{root / split / wnid}: a class folder without images")
                count += found
            report.checked.append(f"{split}/: {len(classes)} class folders, {count} images")
        if full:
            check_all(report, decode_problems, images, self.num_workers)
        return report

    def generate_synthetic(self, root: Path) -> None:
        from vitlab.data.synthetic import make_imagenet

        make_imagenet(root, seed=self.seed, num_classes=self.synthetic_classes, size=self.synthetic_size)

    @property
    def info(self) -> DatasetInfo:
        """Classes = the class folders (sorted wnids, as ImageFolder labels them), named from
        ``LOC_synset_mapping.txt`` when the dataset has it; generated data is described without
        generating it."""
        if self._info is None:
            if self.synthetic:
                from vitlab.data.synthetic import wnid

                wnids = [wnid(i) for i in range(self.synthetic_classes)]
                names = wnids
            elif self.format == "litdata":  # the packed dataset's manifest keeps the folder layout's classes
                from vitlab.data.streaming import read_manifest

                manifest = read_manifest(self.data_root(), "imagenet")
                wnids, names = manifest["classes"], manifest["class_names"]
            else:
                root = self.data_root()
                wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
                names = read_synset_names(root, wnids)
            self._info = DatasetInfo(class_names=tuple(names), input_size=(self.img_size, self.img_size),
                                     mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return self._info

    def train_transform(self):
        """timm's DeiT pipeline in timm's ``use_prefetcher`` form (its train.py's default): the workers'
        part ends with uint8 tensors, and normalisation and random erasing run where the batch lands
        (``on_after_batch_transfer``, on the device), so a worker hands over a quarter of the bytes of
        float32 images (150 KB, not 600 KB, an image at 224: README "Data at scale"). With
        ``fast_decode`` the crop decodes JPEGs at a reduced scale where it can."""
        transform = create_transform(
            self.img_size,
            is_training=True,
            scale=self.scale,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.auto_augment,
            interpolation=self.interpolation,
            re_prob=self.reprob,
            re_mode="pixel",
            use_prefetcher=True,
        )
        if self.fast_decode:
            crop = transform.transforms[0]
            assert isinstance(crop, RandomResizedCropAndInterpolation), crop  # timm's training pipeline starts with it
            transform.transforms[0] = FastRandomResizedCrop(crop.size, crop.scale, crop.ratio, self.interpolation)
        return transform

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """``gpu_decode``: a batch of JPEG bytes (``JpegBytes``) is not copied to the device as it is;
        ``decode_jpeg`` reads the bytes on the host and decodes them on ``device`` (nvJPEG on a GPU), so
        its transfer is the decode, random resized crop and flip (``DeviceAugment``). Lightning's
        default transfer would copy the bytes to the GPU and back. Other batches: Lightning's."""
        if not (isinstance(batch, ImageBatch) and hasattr(batch.images, "lengths")):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if self._device_augment is None:
            from vitlab.data.gpu_decode import DeviceAugment

            self._device_augment = DeviceAugment(self.img_size, self.scale, hflip=self.hflip,
                                                 interpolation=self.interpolation, skip_corrupt=self.skip_corrupt)
        images, kept = self._device_augment(batch.images, device)
        dropped = len(batch.images.lengths) - len(kept)
        targets = batch.targets[kept] if dropped else batch.targets
        return ImageBatch(images, targets.to(device, non_blocking=True), (batch.skipped + dropped).to(device))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training batches arrive as uint8 on the device (every pipeline: ``train_transform``,
        ``gpu_decode``); normalise them and apply timm's random erasing (per image, as in a worker) here."""
        if not isinstance(batch, ImageBatch) or batch.images.dtype != torch.uint8:
            return batch
        images = normalise_uint8(batch.images, IMAGENET_MEAN, IMAGENET_STD)
        if self.reprob > 0:
            if self._erasing is None or self._erasing.device != images.device:
                self._erasing = RandomErasing(self.reprob, mode="pixel", device=images.device)
            images = self._erasing(images)
        return batch._replace(images=images)

    def eval_transform(self):
        return create_transform(
            self.img_size, is_training=False, interpolation=self.interpolation, crop_pct=self.crop_pct
        )

    def eval_image_transform(self):
        return self.eval_transform()  # timm's, on the PIL image as ImageFolder decodes it

    def setup(self, stage: str | None = None) -> None:
        root = self.data_root()
        if self.format == "litdata":
            from vitlab.data.streaming import PackedImages

            self.train_set = PackedImages(root / "train", None if self.gpu_decode else self.train_transform(),
                                          self.skip_corrupt, lazy=self.fast_decode, raw=self.gpu_decode,
                                          read_threads=self.read_threads)
            self.val_set = PackedImages(root / "val", self.eval_transform(), self.skip_corrupt,
                                        read_threads=self.read_threads)
            if self.shuffle == "block":
                self.check_block_order(root)
                self.train_set.read_whole_chunks()
                if is_url(self.root) and not self.synthetic:
                    from vitlab.data.remote import check_cache_room

                    on_node = self.trainer.num_devices if self.trainer is not None else 1  # DDP: a process each
                    log.info("data.cache_dir %s", check_cache_room(root / "train", [
                        c["chunk_bytes"] for c in self.train_set.index["chunks"]], 2 * self.shuffle_window, on_node))
            elif is_url(self.root) and not self.synthetic:
                log.warning("data.root=%s in data.shuffle=uniform: each training image is fetched from the bucket "
                            "alone (a request an image); data.shuffle=block downloads whole chunks (a pack made "
                            "with python -m vitlab.data.pack imagenet ... --order shuffled)", self.root)
            if self.smoke:
                keep = self.batch_size * 2
                self.train_set = Subset(self.train_set, range(0, len(self.train_set), max(1, len(self.train_set) // keep))[:keep])
                self.val_set = Subset(self.val_set, range(0, len(self.val_set), max(1, len(self.val_set) // keep))[:keep])
            return
        if self.gpu_decode:
            from vitlab.data.gpu_decode import read_bytes

            self.train_set = ImageFolderDataset(str(root / "train"), None, self.skip_corrupt, loader=read_bytes,
                                                read_threads=self.read_threads)
        else:
            self.train_set = ImageFolderDataset(str(root / "train"), self.train_transform(), self.skip_corrupt,
                                                loader=open_lazy if self.fast_decode else load_rgb,
                                                read_threads=self.read_threads)
        self.val_set = ImageFolderDataset(str(root / "val"), self.eval_transform(), self.skip_corrupt,
                                          read_threads=self.read_threads)
        if self.smoke:  # a few batches are enough to exercise the whole path
            keep = self.batch_size * 2
            self.train_set.samples = self.train_set.samples[:: max(1, len(self.train_set) // keep)][:keep]
            self.val_set.samples = self.val_set.samples[:: max(1, len(self.val_set) // keep)][:keep]
            self.train_set.targets = [t for _, t in self.train_set.samples]
            self.val_set.targets = [t for _, t in self.val_set.samples]

    def check_block_order(self, root: Path) -> None:
        order = json.loads((root / MANIFEST).read_text()).get("order", IDENTITY_BEFORE["order"])
        if order != "shuffled":
            raise DatasetLayoutError(
                f"data.shuffle=block: {root} was packed in the folders' order (its {MANIFEST}: order {order!r}), so "
                f"a few chunks hold a few classes and every batch would too. Pack the training split shuffled: "
                f"python -m vitlab.data.pack imagenet --root <the folder dataset> --out <new dir> --order shuffled "
                f"(or data.shuffle=uniform)")

    def train_dataloader(self) -> DataLoader:
        sampler = None  # make_loader's: epoch-seeded uniform order
        if self.shuffle == "block":
            world, rank = self.world()
            sampler = BlockShuffleSampler(self.train_set, block_sizes(self.train_set), self.shuffle_window,
                                          num_replicas=world, rank=rank, seed=self.seed)
        elif self.repeated_aug:
            world, rank = self.world()
            # timm's RA sampler repeats each image 3x across ranks (DeiT)
            sampler = DistributedRepeatAugSampler(self.train_set, num_replicas=world, rank=rank, shuffle=True)
        # gpu_decode: decode_jpeg reads the batch's bytes on the host; pinning them would copy them for nothing
        return self.make_loader(self.train_set, train=True, collate_fn=self.train_collate(), sampler=sampler,
                                pin_memory=False if self.gpu_decode else None)

    def train_collate(self):
        if self.gpu_decode:
            from vitlab.data.gpu_decode import ByteRing, collate_bytes

            if not self.num_workers or "fork" not in multiprocessing.get_all_start_methods():
                return collate_bytes  # (the slots are inherited by forked workers; Windows has no fork)
            # the workers' batches of bytes go into shared slots made here, before the workers start:
            # prefetch_factor (2) batches in flight per worker, one held ahead by Lightning, one decoding
            self._byte_ring = ByteRing(self.num_workers, slots=4, slot_bytes=self.batch_size * RING_BYTES_PER_IMAGE)
            return functools.partial(collate_bytes, ring=self._byte_ring)
        return collate_skipping

    def val_dataloader(self) -> DataLoader:
        return self.make_loader(self.val_set, train=False, collate_fn=collate_skipping)


def _imagenet_item(sample: tuple[str, int]) -> dict:
    path, label = sample
    return {"label": label, "jpeg": file_bytes(path)}


PACK_ORDERS = ("folder", "shuffled")  # python -m vitlab.data.pack imagenet --order


def pack_imagenet(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1,
                  order: str = "folder") -> dict:
    """``python -m vitlab.data.pack imagenet``: each split's images (JPEG bytes, label, index) in
    ImageFolder's order, or with ``order="shuffled"`` the training split's in a random order (a fixed
    permutation, seed 0: chunks that mix classes, for ``data.shuffle=block``); the class folders and
    names, and the order, in the manifest."""
    if order not in PACK_ORDERS:
        raise SystemExit(f"--order {order}: expected one of {', '.join(PACK_ORDERS)}")
    root, out = Path(root), Path(out)
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    manifest = open_manifest(out, "imagenet", classes=wnids, order=order)
    manifest["class_names"] = read_synset_names(root, wnids)
    for split in ("train", "val"):
        folder = ImageFolder(str(root / split), is_valid_file=has_image_suffix)
        if folder.classes != wnids:
            raise SystemExit(f"{root / split}: class folders differ from train/'s")
        samples = folder.samples
        if split == "train" and order == "shuffled":
            samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]
        counts = [0] * len(wnids)
        for _, label in samples:
            counts[label] += 1
        pack_split(out, manifest, split, samples, _imagenet_item,
                   lambda i, item: None if int(item["label"]) == samples[i][1] else "wrong label",
                   shard_size, workers, label_counts=counts)
    return manifest
