"""What every vitlab DataModule shares: where the data is, generated data, loaders.

Each task reads its dataset's real on-disk format. ``synthetic=true`` writes a
small dataset in exactly that format under ``synthetic_root`` (once, then
cached) and reads it with the same code; without it a missing dataset is an
error naming the path and the layout, never a silent fallback.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata 0.11 calls a torch API that torch 2.14 deprecated, once per loader; nothing to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

from vitlab.errors import VitlabUserError
from vitlab.data.report import DataReport

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Everything a task needs to know about its dataset, settled once by the DataModule.

    The task receives it at construction (``info=``) and stores it in its checkpoints, so a
    model can be rebuilt, exported or run on images without the dataset. Reading it is cheap:
    no image is decoded and no generated dataset is written.
    """

    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W) the network sees at evaluation: the FLOP count's input
    mean: tuple[float, ...] = IMAGENET_MEAN  # normalisation of the images (in the loader or the model)
    std: tuple[float, ...] = IMAGENET_STD
    category_ids: tuple[int, ...] | None = None  # COCO: the dataset's id of each label 0..K-1
    ignore_index: int | None = None  # segmentation: the label value that is never scored
    with_masks: bool = False  # detection: targets carry instance masks

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers: checkpoints are read with ``weights_only=True``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: "DatasetInfo | dict") -> "DatasetInfo":
        if isinstance(d, DatasetInfo):
            return d
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# A loader worker hands each tensor of a batch to the training process in a shared-memory block of
# its own, passed as a file descriptor over a socket (torch.multiprocessing's reduction): ~0.5 ms of
# CPU per tensor on the two sides together here, whatever its size (README "Data at scale"). A
# batch's small tensors (targets, counts, byte lengths, a detection target's boxes and labels) are
# therefore pickled with the batch itself; large ones (images, masks) keep shared memory.
SMALL_TENSOR_BYTES = 1 << 18


def _tensor_from(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


class _ByValue:
    """A small tensor pickled as its values (a numpy array) instead of a shared-memory block."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return _tensor_from, (self.tensor.numpy(),)


def _small_by_value(t: torch.Tensor):
    if t.nbytes > SMALL_TENSOR_BYTES or t.device.type != "cpu" or t.requires_grad or t.dtype == torch.bfloat16:
        return t  # (numpy has no bfloat16; nothing here hands one over)
    return _ByValue(t)


def reduce_batch(batch: tuple):
    """``__reduce__`` of the batch types: the fields, their small tensors by value (see above)."""
    return _rebuild_batch, (type(batch), tuple(apply_to_collection(field, torch.Tensor, _small_by_value)
                                               for field in batch))


def _rebuild_batch(cls, fields: tuple):
    # unpickled, the small tensors are tensors again; copy.copy passes the wrappers as they are
    return cls(*apply_to_collection(fields, _ByValue, lambda wrapped: wrapped.tensor))


class ImageBatch(NamedTuple):
    """Classification: a stacked image tensor, integer targets, and how many files were skipped."""

    images: torch.Tensor
    targets: torch.Tensor
    skipped: torch.Tensor

    __reduce__ = reduce_batch


class DetectionBatch(NamedTuple):
    """Detection: images of different sizes (uint8 from the loader, float in [0, 1] after the
    DataModule's transfer hook) and their target dicts (boxes, labels, ...)."""

    images: list[torch.Tensor]
    targets: list[dict]
    skipped: torch.Tensor

    __reduce__ = reduce_batch


class SegmentationBatch(NamedTuple):
    """Segmentation: normalised images and label maps (stacked crops in training, lists in
    validation where each image keeps its size), the images' file stems."""

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | list[torch.Tensor]
    names: list[str]
    skipped: torch.Tensor

    __reduce__ = reduce_batch


class PredictBatch(NamedTuple):
    """``predict.py``: images as the evaluation transform leaves them (each its own size), the decoded
    originals (uint8 CHW) and their file paths."""

    images: list[torch.Tensor]
    originals: list[torch.Tensor]
    paths: list[str]

    __reduce__ = reduce_batch


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (shuffled by seed + epoch), lazily: the order is drawn at the first
    index, not when the iterator is made. The resumable loader makes its iterator before Lightning
    sets a resumed run's epoch, and would otherwise replay the first epoch's order."""

    def __iter__(self):
        yield from super().__iter__()


class BlockShuffleSampler(EpochSampler):
    """``data.shuffle=block``: an epoch's order reads a packed split a few chunks at a time. Each epoch
    (seeded by seed + epoch) the chunks come in a random order; consecutive groups of ``window``
    chunks are read together, their items shuffled among themselves. A process's share is a
    contiguous run of that order (its own windows), padded as torch's DistributedSampler pads.

    What it buys: the files of ``window`` chunks (and the page cache they fill) at a time instead of
    random reads across the whole dataset, as LitData's and WebDataset's shuffles do. What it costs:
    a batch draws from ``window`` chunks only, so the pack must be in random order (``python -m
    vitlab.data.pack imagenet --order shuffled``) for batches to mix classes.

    ``blocks``: the item count of each chunk, in the dataset's index order (``block_sizes``)."""

    def __init__(self, dataset, blocks: list[int], window: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if sum(blocks) != len(dataset) or window < 1:
            raise ValueError(f"blocks of {sum(blocks)} items for a dataset of {len(dataset)}, window {window}")
        self.starts = np.cumsum([0, *blocks])
        self.window = window

    def epoch_order(self) -> np.ndarray:
        """Every index of the dataset once, in this epoch's block-shuffled order (all processes)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks = rng.permutation(len(self.starts) - 1)
        windows = [np.concatenate([np.arange(self.starts[c], self.starts[c + 1]) for c in chunks[w:w + self.window]])
                   for w in range(0, len(chunks), self.window)]
        return np.concatenate([rng.permutation(items) for items in windows])

    def __iter__(self):
        order = np.resize(self.epoch_order(), self.total_size)  # padded with its own start, as torch does
        yield from order[self.rank * self.num_samples:(self.rank + 1) * self.num_samples].tolist()


def block_sizes(dataset) -> list[int]:
    """The items of each chunk of a packed dataset, in its index order; through a ``Subset`` of sorted
    indices (a smoke run's), the chunks' counts of the kept items."""
    if isinstance(dataset, Subset):
        starts = np.cumsum([0, *block_sizes(dataset.dataset)])
        chunk = np.searchsorted(starts, np.asarray(dataset.indices), side="right") - 1
        if len(chunk) and np.any(np.diff(chunk) < 0):
            raise ValueError("block_sizes: a Subset of unsorted indices has no chunk runs")
        return [int(n) for n in np.bincount(chunk, minlength=len(starts) - 1) if n]
    return list(dataset.block_sizes)


class EvalDistributedSampler(DistributedSampler):
    """Every evaluation image exactly once across the processes: rank r takes r, r+W, r+2W, ...

    torch's DistributedSampler pads the index list to a multiple of the world size, so some
    images would be scored twice; Lightning leaves a DistributedSampler in place. Ranks may get
    one image fewer: the metrics (torchmetrics) gather uneven states.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class DatasetLayoutError(VitlabUserError, FileNotFoundError):
    pass


class CorruptImageError(VitlabUserError, RuntimeError):
    pass


def is_url(root) -> bool:
    return "://" in str(root)


def reject_url(root) -> None:
    """A URL (``s3://b/x``, which ``Path`` would make the missing directory ``s3:/b/x``) where a
    directory is read is named with what to do instead."""
    if is_url(root):
        raise DatasetLayoutError(
            f"data.root={root}: a URL; only a packed dataset is read from a bucket (data.format=litdata, "
            f"s3:// URLs: pack with python -m vitlab.data.pack, then upload the packed directory); otherwise "
            f"mount the bucket as a file system (mountpoint-s3, gcsfuse, blobfuse2) and set data.root to the mount")


class MissingFileError(CorruptImageError):
    """A file the dataset lists is not on disk (``data.skip_corrupt`` skips these too)."""


VERIFY_MODES = ("cheap", "full", "none")
FORMATS = ("folder", "litdata")  # data.format: the dataset's own layout, or packed by python -m vitlab.data.pack


@dataclass(frozen=True)
class DatasetFacts:
    """The full dataset as published, known without reading it: what the tools that count, plan and
    benchmark need (the zoo's class counts and FLOP inputs, the planner's steps, loader throughput)."""

    num_classes: int
    train_images: int
    image_size: tuple[int, int]  # (width, height) of a typical image: the loader benchmark's generated size
    flops_input: tuple[int, int]  # (H, W) the papers count FLOPs at (COCO: 1280x800, as mmdet's get_flops)
    train_input: tuple[int, int]  # (H, W) of a training step in the papers (COCO: the 1333x800 scale)


class VitlabDataModule(L.LightningDataModule):
    #: shown in the "dataset not found" message
    layout_help: str = ""
    #: the published dataset's facts (each subclass)
    FACTS: ClassVar[DatasetFacts]

    def __init__(
        self,
        root: str,
        synthetic: bool = False,
        synthetic_root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        smoke: bool = False,
        skip_corrupt: bool = False,
        seed: int = 0,
        verify: str = "cheap",
        format: str = "folder",
        cache_dir: str | None = None,
        read_threads: int = 0,
    ):
        super().__init__()
        if verify not in VERIFY_MODES:
            raise ValueError(f"data.verify={verify!r}: expected one of {', '.join(VERIFY_MODES)}")
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}: expected one of {', '.join(FORMATS)}")
        self.format = format
        self.cache_dir = cache_dir  # data.format=litdata with an s3:// data.root: the local copy and chunk cache
        if int(read_threads) < 0:
            raise ValueError(f"data.read_threads={read_threads}: expected a thread count >= 0")
        self.read_threads = int(read_threads)  # a batch's images read at once (ImageNet's folder layout, chunk files)
        self.root = root
        self.synthetic = synthetic
        self.synthetic_root = synthetic_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.smoke = smoke
        self.skip_corrupt = skip_corrupt
        self.seed = seed
        self.verify = verify

    # ---- subclasses --------------------------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        """The dataset's description for the task (cheap: no decoding, no generation)."""
        raise NotImplementedError

    def eval_image_transform(self):
        """The evaluation transform of one decoded image (PIL RGB) -> what the task's model takes,
        exactly as the validation set applies it (``predict.py`` uses it on any image file)."""
        raise NotImplementedError

    def check_layout(self, root: Path) -> None:
        """Raise ``DatasetLayoutError`` unless ``root`` holds the dataset in its real layout."""
        raise NotImplementedError

    def generate_synthetic(self, root: Path) -> None:
        raise NotImplementedError

    def check(self, full: bool = False) -> DataReport:
        """Every problem of the dataset (both splits) in one pass, with counts. Cheap by default:
        file listings (``os.scandir``), image headers where the format needs them, annotations;
        ``full`` decodes every image and label map as the loaders do."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------
    def data_root(self) -> Path:
        if self.synthetic:
            root = Path(self.synthetic_root or Path(self.root) / "synthetic")
            self.say_root_unread(root)
            marker = root / ".complete"
            if not marker.exists():  # generate once; a half-written folder is regenerated
                root.mkdir(parents=True, exist_ok=True)
                self.generate_synthetic(root)
                marker.touch()
            self.check_layout(root)
            return root
        reject_url(self.root)
        root = Path(self.root)
        try:
            self.check_layout(root)
        except DatasetLayoutError as err:
            raise DatasetLayoutError(
                f"{err}\nExpected layout:\n{self.layout_help}\n"
                f"Either point data.root=/path/to/dataset at the real data, or train on a small "
                f"generated dataset in the same format with data.synthetic=true."
            ) from None
        return root

    def say_root_unread(self, generated: Path) -> None:
        """``data.synthetic=true`` next to a ``data.root`` that holds data (a bucket, a directory not the
        generated one's): the run would train on the generated dataset without a word (``experiment=demo``
        sets synthetic), so it says so, once."""
        root = str(self.root)
        if getattr(self, "_said_unread", False) or not (is_url(root) or Path(root).is_dir()):
            return
        if Path(root).resolve() in (generated.resolve(), *generated.resolve().parents):
            return
        self._said_unread = True
        log.warning("data.synthetic=true: this run reads the generated dataset at %s, not data.root=%s "
                    "(data.synthetic=false reads it; experiment=demo sets data.synthetic=true)", generated, root)

    def preflight(self) -> DataReport | None:
        """The data check at the start of a run, as ``data.verify`` says: ``cheap`` (the default; no
        pixel decoded), ``full`` (every image and label map decoded) or ``none`` (skipped).

        Raises ``DataCheckError`` listing every problem with its count and examples, unless
        ``data.skip_corrupt=true``: then it warns, and the loaders leave those files and annotations
        out (skipped images are counted in each batch's ``skipped``). Warnings (e.g. zero-area
        boxes) are reported either way. Returns the report (``None`` with ``verify=none``).
        """
        if self.verify == "none":
            return None
        report = self.check(full=self.verify == "full")
        report.enforce(skip=self.skip_corrupt)
        return report

    def prepare_data(self) -> None:
        self.data_root()  # generation happens once, on one process

    def world(self) -> tuple[int, int]:
        """(number of processes, this process's rank)."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def make_loader(self, dataset: Dataset, train: bool, collate_fn=None, batch_size: int | None = None,
                    sampler: DistributedSampler | None = None, pin_memory: bool | None = None) -> DataLoader:
        """Training: torchdata's ``StatefulDataLoader``, whose position in the epoch Lightning saves in
        checkpoints, so a run resumed mid-epoch sees exactly the batches it had not seen; an
        epoch-seeded sampler (Lightning calls set_epoch) makes the order a function of (seed, epoch),
        and the loader's own generator keeps its iterator from drawing on the global RNG (which the
        checkpoint restores for the model's dropout, drop-path and mixup). Evaluation: every image
        exactly once over the processes. ``pin_memory``: default, where a GPU is."""
        world, rank = self.world()
        pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        common = dict(batch_size=batch_size or self.batch_size, num_workers=self.num_workers, collate_fn=collate_fn,
                      persistent_workers=self.num_workers > 0, pin_memory=pin_memory)
        if not train:
            return DataLoader(dataset, sampler=EvalDistributedSampler(dataset, world, rank), shuffle=False, **common)
        if sampler is None:
            sampler = EpochSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return StatefulDataLoader(dataset, sampler=sampler, drop_last=True,
                                  generator=torch.Generator().manual_seed(self.seed), **common)
