"""``data.gpu_decode=true``: JPEGs decoded and augmented on the accelerator.

Loader workers only read the files' bytes (``read_bytes``; a packed dataset's items as they are)
and hand over one uint8 tensor of a batch's files (``JpegBytes``). The batch's transfer to the device
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

from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF2
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torch.utils.data import default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from vitlab.data.base import CorruptImageError, ImageBatch
from vitlab.data.report import skip_or_raise


def read_bytes(path: str, data: bytearray | None = None) -> torch.Tensor:
    """A worker's whole job: the file's bytes (ImageFolder's ``loader``; ``data``: read already)."""
    if data is not None:
        return torch.frombuffer(data, dtype=torch.uint8)
    try:
        return read_file(path)
    except RuntimeError as err:
        raise CorruptImageError(f"{path}: cannot be read ({err})") from err


class JpegBytes(NamedTuple):
    """A batch's files end to end in one uint8 tensor (one shared-memory block from a worker; a list
    of small tensors would need a file descriptor each) and each file's length."""

    data: torch.Tensor
    lengths: torch.Tensor

    def split(self) -> list[torch.Tensor]:
        return list(self.data.split(self.lengths.tolist()))  # host tensors: decode_jpeg reads them there


def collate_bytes(batch, shared: bool | None = None) -> ImageBatch:
    """Byte tensors of different lengths -> ``JpegBytes``; skipped items (None) are counted.
    ``shared``: into a new shared-memory block (default: in a loader worker, as default_collate)."""
    kept = [b for b in batch if b is not None]
    data = [d for d, _ in kept]
    targets = default_collate([t for _, t in kept]) if kept else torch.zeros(0, dtype=torch.long)
    lengths = torch.tensor([len(d) for d in data], dtype=torch.long)
    out = torch.empty(0, dtype=torch.uint8)
    if shared is None:
        shared = get_worker_info() is not None
    if data and shared:  # as default_collate: in a worker, straight into shared memory
        out = out.new(torch.UntypedStorage._new_shared(int(lengths.sum())))  # (one copy, not two)
    images = JpegBytes(torch.cat(data, out=out) if data else out, lengths)
    return ImageBatch(images, targets, torch.tensor(len(batch) - len(kept)))


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
        # one crop per image: the decoded sizes differ (torchvision has no batched ragged crop)
        for k, img in enumerate(self.decode(batch.split(), device)):
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
