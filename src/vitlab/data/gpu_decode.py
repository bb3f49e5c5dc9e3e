"""``data.gpu_decode=true``: JPEGs decoded and augmented on the accelerator.

Loader workers only read the files' bytes (``read_bytes``; a packed dataset's items as they are)
and hand over a batch's files end to end (``JpegBytes``), written into a shared slot that the
training process gives back once decoded (``ByteRing``). The batch's transfer to the device
(``ImageNetDataModule.transfer_batch_to_device``; the bytes stay on the host) is ``DeviceAugment``: it
decodes the batch with ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG, batched, on a GPU;
libjpeg on the CPU when there is none: the same code), then draws timm's random-resized-crop box
for each image exactly as the CPU pipeline draws it (``RandomResizedCropAndInterpolation
.get_params``, Python's ``random``), resizes with torch's antialiased kernel and flips as
torchvision's ``RandomHorizontalFlip`` does (``torch.rand(1) < p``); normalisation and random
erasing follow (``ImageNetDataModule.on_after_batch_transfer``). Per image, the random draws and
their order are the CPU pipeline's, so both give the same distribution (tested on the CPU).

RandAugment / AutoAugment and colour jitter are PIL operations of the CPU pipeline, with no device
form here: ``gpu_decode`` asks for ``data.auto_augment=null data.color_jitter=0``.
"""
from __future__ import annotations

import mmap
import multiprocessing
import uuid
import weakref
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF2
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torch.utils.data import default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from vitlab.data.base import CorruptImageError, ImageBatch, reduce_batch
from vitlab.data.report import skip_or_raise


def read_bytes(path: str, data: bytearray | None = None) -> torch.Tensor:
    """A worker's whole job: the file's bytes (ImageFolder's ``loader``; ``data``: read already)."""
    if data is not None:
        return torch.frombuffer(data, dtype=torch.uint8)
    try:
        return read_file(path)
    except RuntimeError as err:
        raise CorruptImageError(f"{path}: cannot be read ({err})") from err


class ByteRing:
    """Shared memory the training loader's workers write batches of JPEG bytes into, slot after slot,
    instead of a new shared-memory block per batch: torch hands a worker's tensor over as a fresh block
    whose pages both processes fault in again (~100 us of CPU per 60 KB image here, more than reading
    it; README "Data at scale"). Made by the DataModule before the workers start (an anonymous shared
    mapping, which forked workers inherit; not bounded by /dev/shm's size). Each worker owns ``slots``
    slots; a slot is taken by its worker (flag 0 -> 1) and given back by the training process once the
    batch is decoded (``RingSlot.release``; also when a batch is dropped undecoded). A batch that finds
    no free slot or does not fit one goes the old way (a new block): nothing waits, nothing is lost.
    The flags change under one lock: its acquire and release order the slot's bytes between processes."""

    def __init__(self, workers: int, slots: int, slot_bytes: int):
        self.workers, self.slots, self.slot_bytes = workers, slots, slot_bytes
        self.memory = mmap.mmap(-1, workers * slots * slot_bytes + workers * slots)  # MAP_SHARED | ANONYMOUS
        self.taken = np.frombuffer(self.memory, np.uint8, workers * slots, workers * slots * slot_bytes)
        self.lock = multiprocessing.get_context("fork").Lock()
        self.key = uuid.uuid4().hex  # how a batch unpickled in the training process finds this ring
        _RINGS[self.key] = self

    def __getstate__(self):  # a spawned or forkserver worker (no inherited mapping) uses a new block per batch
        return {"key": None}

    def __setstate__(self, state):
        self.key = None

    def claim(self, nbytes: int, worker: int) -> RingSlot | None:
        """A free slot of loader worker ``worker``'s for ``nbytes`` (marked taken), or None."""
        if self.key is None or worker >= self.workers or nbytes > self.slot_bytes:
            return None
        first = worker * self.slots
        with self.lock:
            free = np.flatnonzero(self.taken[first:first + self.slots] == 0)
            if not len(free):
                return None
            index = first + int(free[0])
            self.taken[index] = 1
        return RingSlot(self.key, index, nbytes)

    def view(self, index: int, nbytes: int) -> torch.Tensor:
        return torch.frombuffer(self.memory, dtype=torch.uint8, count=nbytes, offset=index * self.slot_bytes)

    def give_back(self, index: int) -> None:
        with self.lock:
            self.taken[index] = 0


_RINGS: weakref.WeakValueDictionary[str, ByteRing] = weakref.WeakValueDictionary()


class RingSlot:
    """A batch's bytes in a ``ByteRing`` slot: what a worker pickles instead of the bytes. In the
    training process it holds the slot until ``release`` (after decoding) or until it is dropped."""

    def __init__(self, key: str, index: int, nbytes: int, arrived: bool = False):
        self.key, self.index, self.nbytes = key, index, nbytes
        self.ring = _RINGS[key] if arrived else None  # the receiving side gives the slot back; not the worker

    def __reduce__(self):
        return RingSlot, (self.key, self.index, self.nbytes, True)

    def tensor(self) -> torch.Tensor:
        return _RINGS[self.key].view(self.index, self.nbytes)

    def release(self) -> None:
        if self.ring is not None:
            self.ring, ring = None, self.ring
            ring.give_back(self.index)

    def __del__(self):
        self.release()


class JpegBytes(NamedTuple):
    """A batch's files end to end in one uint8 tensor (one shared-memory block from a worker; a list
    of small tensors would need a file descriptor each) or in a ``ByteRing`` slot, and each file's
    length."""

    data: torch.Tensor | RingSlot
    lengths: torch.Tensor

    __reduce__ = reduce_batch

    def bytes(self) -> torch.Tensor:
        return self.data.tensor() if isinstance(self.data, RingSlot) else self.data

    def split(self) -> list[torch.Tensor]:
        return list(self.bytes().split(self.lengths.tolist()))  # host tensors: decode_jpeg reads them there

    def release(self) -> None:
        """Decoded: its ring slot (if any) may take the next batch."""
        if isinstance(self.data, RingSlot):
            self.data.release()


def collate_bytes(batch, shared: bool | None = None, ring: ByteRing | None = None,
                  worker: int | None = None) -> ImageBatch:
    """Byte tensors of different lengths -> ``JpegBytes``; skipped items (None) are counted.
    ``shared``: into shared memory (default: in a loader worker, as default_collate): a slot of
    ``ring`` of loader worker ``worker``'s (default: this one's) when one is free, else a new
    shared-memory block."""
    kept = [b for b in batch if b is not None]
    data = [d for d, _ in kept]
    targets = default_collate([t for _, t in kept]) if kept else torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([len(d) for d in data], dtype=torch.long)
    skipped = torch.tensor(len(batch) - len(kept))
    nbytes = int(lengths.sum())
    info = get_worker_info()
    if shared is None:
        shared = info is not None
    slot = None
    if data and shared and ring is not None and (worker is not None or info is not None):
        slot = ring.claim(nbytes, info.id if worker is None else worker)
    if slot is not None:
        torch.cat(data, out=slot.tensor())
        return ImageBatch(JpegBytes(slot, lengths), targets, skipped)
    out = torch.empty(0, dtype=torch.uint8)
    if data and shared:  # as default_collate: in a worker, straight into shared memory
        out = out.new(torch.UntypedStorage._new_shared(nbytes))  # (one copy, not two)
    return ImageBatch(JpegBytes(torch.cat(data, out=out) if data else out, lengths), targets, skipped)


class DeviceAugment:
    """Decode + random resized crop + horizontal flip of a list of JPEG byte tensors, on their device."""

    def __init__(self, size: int, scale, ratio=(3 / 4, 4 / 3), hflip: float = 0.5, interpolation: str = "bicubic",
                 skip_corrupt: bool = False):
        self.size, self.scale, self.ratio, self.hflip = (size, size), tuple(scale), tuple(ratio), hflip
        self.interpolation = str_to_interp_mode(interpolation)
        self.skip_corrupt = skip_corrupt

    def decode(self, data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        cpu = data  # decode_jpeg takes the bytes on the host and decodes on `device`
        try:
            return decode_jpeg(cpu, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file is not a baseline JPEG (ImageNet has PNGs and CMYK JPEGs): one by one
            images = []
            for k, d in enumerate(cpu):
                try:
                    images.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
                except RuntimeError as err:
                    images.append(skip_or_raise(CorruptImageError(
                        f"image {k} of a training batch cannot be decoded ({err})"), self.skip_corrupt))
            return images

    def __call__(self, batch: JpegBytes, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """(uint8 B' x 3 x size x size, the indices of the B' images kept: undecodable ones are
        skipped with ``skip_corrupt``)."""
        out, kept = [], []
        try:
            decoded = self.decode(batch.split(), device)
        finally:
            batch.release()  # the bytes are read (a CUDA decode copies pageable host bytes before returning)
        # one crop per image: the decoded sizes differ (torchvision has no batched ragged crop)
        for k, img in enumerate(decoded):
            if img is None:
                continue
            kept.append(k)
            i, j, h, w = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
            crop = TF2.resized_crop(img, i, j, h, w, list(self.size), self.interpolation, antialias=True)
            if torch.rand(1) < self.hflip:  # torchvision's RandomHorizontalFlip draw
                crop = crop.flip(-1)
            out.append(crop)
        if not out:  # every image of the batch skipped
            return torch.zeros((0, 3, *self.size), dtype=torch.uint8, device=device), kept
        return torch.stack(out), kept
