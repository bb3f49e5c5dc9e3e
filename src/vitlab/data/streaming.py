"""Reading a dataset packed by ``python -m vitlab.data.pack`` (LitData chunks): ``data.format=litdata``.

``PackedImages`` is a map-style dataset over the packed split (items by index: a local split in
pack's layout read straight from the chunk files by ``ChunkFiles``, anything else through LitData's
``StreamingDataset``; a pack in a bucket, ``data.root=s3://...``, is read from a local copy of its
small files, its chunks downloaded whole by ``ChunkFiles`` in the block order, else its items
fetched by LitData: ``vitlab.data.remote``), so the
DataModule's resumable sampler and exact evaluation split apply unchanged: each DDP process reads
its own disjoint share, and a resumed run continues at the sampler's saved position. The JPEG
bytes are decoded here exactly as the folder reader decodes files, so the augmentation and the
``DatasetInfo`` are the same for both formats.

``check_packed`` runs before training: the manifest, each split's ``index.json`` and every chunk
(present, of the size the index records; ``full``: its SHA-256 as written), and the files kept
beside the chunks (COCO's ``images.json`` tables and val JSON) likewise - an error names the shard
or the file.

``PackedSplit`` reads any packed split's items (dicts) by index: the COCO and ADE20K readers
(``vitlab.data.coco.PackedCocoDataset``, ``vitlab.data.ade20k.PackedADE20KDataset``) build on it.
"""
from __future__ import annotations

import bisect
import io
import itertools
import json
import os
import random
import resource
import struct
from collections import OrderedDict
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vitlab.data import remote
from vitlab.data.base import CorruptImageError, VitlabDataModule, is_url, reject_url
from vitlab.data.packing import MANIFEST, ShardError, sha256
from vitlab.data.report import DataReport, skip_or_raise


def read_manifest(root: str | Path, kind: str) -> dict:
    reject_url(root)
    path = Path(root) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path} is missing: {root} is not a dataset packed by python -m vitlab.data.pack "
                         f"(pack the folder layout with: python -m vitlab.data.pack {kind} --root DIR --out {root})")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != kind:
        raise ShardError(f"{path}: packed from a {manifest.get('kind')!r} dataset, expected {kind!r}")
    return manifest


def check_packed(root: str | Path, kind: str, full: bool = False) -> dict:
    """The manifest, after checking every split's index and chunks against it (see the module). A
    remote pack's local copy (``vitlab.data.remote``) is checked against the bucket's listing."""
    manifest = read_manifest(root, kind)
    origin = remote.origin_of(root)
    bucket = remote.S3Pack(origin["url"]) if origin and full else None
    for split, written in manifest["splits"].items():
        index_path = Path(root) / split / "index.json"
        if not index_path.exists():
            raise ShardError(f"{index_path} is missing (the shards' index); re-run python -m vitlab.data.pack")
        chunks = json.loads(index_path.read_text())["chunks"]
        if [c["filename"] for c in chunks] != list(written["chunks"]):
            raise ShardError(f"{index_path}: its shards are not the ones packed into {root} (another dataset's?)")
        if sum(c["chunk_size"] for c in chunks) != written["images"]:
            raise ShardError(f"{index_path}: {sum(c['chunk_size'] for c in chunks)} items, the manifest says "
                             f"{written['images']}")
        for chunk in chunks:
            name = f"{split}/{chunk['filename']}"
            if origin is None:
                shard, size = Path(root) / name, None
                if shard.exists():
                    size = shard.stat().st_size
            else:
                shard, size = f"{origin['url']}/{name}", origin["objects"].get(name, [None])[0]
            if size is None:
                raise ShardError(f"{shard}: shard is missing")
            if size != chunk["chunk_bytes"]:
                raise ShardError(f"{shard}: shard is {size} bytes, its index says "
                                 f"{chunk['chunk_bytes']} (truncated or replaced)")
            if full and (bucket.sha256(name) if bucket else sha256(shard)) != written["chunks"][chunk["filename"]]:
                raise ShardError(f"{shard}: shard's SHA-256 differs from the one written (corrupt or replaced)")
    for name, kept in manifest.get("files", {}).items():
        path = Path(root) / name
        if not path.exists():
            raise ShardError(f"{path} is missing (packed beside the shards); re-run python -m vitlab.data.pack")
        if path.stat().st_size != kept["bytes"] or (full and sha256(path) != kept["sha256"]):
            raise ShardError(f"{path}: differs from the file packed into {root} (size or SHA-256; corrupt or replaced)")
    return manifest


def open_stream(split_dir: str | Path):
    """LitData's reader of a packed split; for a remote pack's local copy it reads each item from the
    bucket alone (ranged GETs; its index.json cached beside the copy). ``batch_decode=0``: deserialise
    only the item asked for. LitData's
    default for a ``bytes`` leaf of < 64 KB (a JPEG) deserialises an aligned window of 256 items
    around it, which the sampler's random order then throws away: ~13x the CPU per item (measured,
    README)."""
    from litdata import StreamingDataset

    origin = remote.origin_of(Path(split_dir).parent)
    if origin is None:
        return StreamingDataset(str(split_dir), batch_decode=0)
    remote.chunk_reads_over_plain_http()
    return StreamingDataset(f"{origin['url']}/{Path(split_dir).name}", cache_dir=str(Path(split_dir) / "chunks"),
                            batch_decode=0)


# the item layout python -m vitlab.data.pack writes (LitData's PyTreeLoader of {"index", "label", "jpeg"})
PACKED_FORMAT = (["int", "int", "bytes"], ["index", "label", "jpeg"])


# open files a process keeps for other uses than chunks (sockets, pipes, loader workers, logs)
FILES_KEPT_FREE = 256


def open_files_limit(needed: int) -> int:
    """How many chunk files a process may keep open: ``needed`` when the limit on open files leaves
    ``FILES_KEPT_FREE`` beside them (the soft limit is raised towards the hard one if need be, as a
    shell's ``ulimit -n`` would), else what it leaves (at least 8; the rest are closed least recently
    used first)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + FILES_KEPT_FREE
    if soft != resource.RLIM_INFINITY and soft < want and (hard == resource.RLIM_INFINITY or hard > soft):
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    room = want if soft == resource.RLIM_INFINITY else soft
    return max(8, min(needed, room - FILES_KEPT_FREE))


class ChunkFiles:
    """Items of a local packed split read straight from its chunk files (the item offsets each
    chunk's header records, then one read per item), for the training loader's hot path.

    Hand-written because LitData's per-item path (index lookup, cache and item-loader layers) costs
    ~5x the CPU of this one, a bisect and one read (measured in README "Data at scale"). It reads
    only the layout pack writes (LitData chunk: uint32 item count, uint32 offsets, then per
    item uint32 leaf sizes and the leaves int64 index, int64 label, JPEG bytes); tested item for item
    against LitData's own reader. Other layouts and remote data read through LitData.
    """

    def __init__(self, split_dir: str | Path, chunks: list[dict], bucket_url: str | None = None):
        self.paths = [str(Path(split_dir) / c["filename"]) for c in chunks]
        # a remote pack's local copy (data.shuffle=block): each chunk downloaded whole beside the copy's
        # index.json when first opened (vitlab.data.remote.fetch_chunk), then read as a local one
        self.bucket_url, self.bytes = bucket_url, [c["chunk_bytes"] for c in chunks]
        self.sizes = [c["chunk_size"] for c in chunks]
        self.starts = list(itertools.accumulate(self.sizes, initial=0))
        # chunk -> (file descriptor, item offsets), per process, least recently used first: a dataset
        # of more chunks than the process may keep open (ImageNet-21k: ~5,000) closes the oldest
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self._max_open = 0
        self._pid = None
        # data.shuffle=block: a chunk's file is read ahead whole when first opened (the kernel reads it
        # in large requests; the block order reads all its items soon). Not in the uniform order, which
        # would read every chunk ahead for one item each.
        self.read_ahead = False

    @staticmethod
    def readable(split_dir: str | Path, index: dict, from_bucket: bool = False) -> bool:
        """Whether the split is in pack's layout and local (``from_bucket``: or a remote pack's copy)."""
        config = index.get("config", {})
        spec = json.loads(config.get("data_spec") or "[0, {}]")[1]
        return ((from_bucket or remote.origin_of(Path(split_dir).parent) is None) and config.get("compression") is None
                and config.get("encryption") is None and config.get("item_loader") == "PyTreeLoader"
                and (config.get("data_format"), json.loads(spec.get("context") or "null")) == PACKED_FORMAT)

    def chunk(self, k: int) -> tuple:
        if self._pid != os.getpid():  # a forked worker opens the files itself
            self._open, self._pid = OrderedDict(), os.getpid()
            self._max_open = open_files_limit(len(self.paths))
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        if len(self._open) >= self._max_open:
            os.close(self._open.popitem(last=False)[1][0])
        fd = self.open_chunk(k)
        if self.read_ahead:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        self._open[k] = fd, self.header(k, fd)
        return self._open[k]

    def open_chunk(self, k: int) -> int:
        if self.bucket_url is None:
            return os.open(self.paths[k], os.O_RDONLY)
        for _ in range(3):  # another process making room may delete the chunk between its download and this open
            remote.fetch_chunk(self.bucket_url, Path(self.paths[k]), self.bytes[k])
            try:
                return os.open(self.paths[k], os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise ShardError(f"{self.paths[k]}: deleted as soon as downloaded three times: the disk of data.cache_dir "
                         f"cannot hold the chunks being read at once (give data.cache_dir more room)")

    def header(self, k: int, fd: int) -> np.ndarray:
        """Chunk ``k``'s item offsets (uint32: 4 bytes an item, ~9x less than a tuple of ints), checked
        against index.json and the file: a damaged header would otherwise hand out wrong items (a read
        of the wrong bytes is no error), so it stops here, naming the chunk. ~10 us per chunk of
        ImageNet's ~2,300 items, once per process."""
        n = self.sizes[k]
        head = os.pread(fd, 4 * (n + 2), 0)
        if len(head) == 4 * (n + 2) and struct.unpack_from("<I", head)[0] == n:
            offsets = np.frombuffer(head, "<u4", n + 1, 4)
            sizes = np.diff(offsets.astype(np.int64))  # 28: an item's three sizes, its index and its label
            if offsets[0] == 4 * (n + 2) and (n == 0 or sizes.min() >= 28) and offsets[-1] <= os.fstat(fd).st_size:
                return offsets
        root = self.bucket_url.rsplit("/", 1)[0] if self.bucket_url else Path(self.paths[k]).parents[1]
        raise ShardError(f"{self.paths[k]}: the chunk's header does not match index.json's {n} items (item "
                         f"offsets missing, out of order or past the file's end): the chunk is damaged; check every "
                         f"chunk's hash with python -m vitlab.tools.check_data data.format=litdata data.root={root} "
                         f"data.verify=full, or pack it again")

    def item(self, index: int) -> tuple[memoryview, int]:
        """(the JPEG bytes, the label) of item ``index``: one read of the item's bytes (a read, not an
        mmap: on a cold page cache a fault reads around each page, a read reads what is asked)."""
        k = bisect.bisect_right(self.starts, index) - 1
        fd, offsets = self.chunk(k)
        j = index - self.starts[k]
        start, end = int(offsets[j]), int(offsets[j + 1])
        buf = bytearray(end - start)  # writable: torch.frombuffer shares it without a copy
        if os.preadv(fd, [buf], start) != len(buf):
            raise ValueError(f"{self.paths[k]}: item {j} is cut short (truncated chunk)")
        index_size, label_size, jpeg_size = struct.unpack_from("<3I", buf, 0)
        at = 12 + index_size + label_size
        return memoryview(buf)[at:at + jpeg_size], struct.unpack_from("<q", buf, 12 + index_size)[0]


class PackedImages(Dataset):
    """(image, label) items of a packed split; ``loader(file-like, name)`` opens the JPEG bytes as
    the folder reader opens files (``load_rgb``, or lazily for ``fast_decode``). Local splits in
    pack's layout are read by ``ChunkFiles``, others through LitData's ``StreamingDataset``."""

    def __init__(self, split_dir: str | Path, transform=None, skip_corrupt: bool = False, lazy: bool = False,
                 raw: bool = False):
        self.split_dir, self.transform, self.skip_corrupt, self.lazy = str(split_dir), transform, skip_corrupt, lazy
        self.raw = raw  # data.gpu_decode: the JPEG bytes as a uint8 tensor, decoded on the device
        self._stream = None
        index = json.loads((Path(split_dir) / "index.json").read_text())
        self._len = sum(c["chunk_size"] for c in index["chunks"])
        self.chunks = ChunkFiles(split_dir, index["chunks"]) if ChunkFiles.readable(split_dir, index) else None
        self.index = index
        if self.chunks is None:
            import litdata  # noqa: F401  here, so that forked loader workers start with it (~0.2 CPU-s each otherwise)

    @property
    def stream(self):
        if self._stream is None:  # opened in the process that reads (each loader worker its own)
            self._stream = open_stream(self.split_dir)
        return self._stream

    def read_whole_chunks(self) -> None:
        """``data.shuffle=block`` (it reads all of a chunk's items soon): each chunk read whole when
        first needed - a local chunk file read ahead by the kernel, a bucket's chunk downloaded in one
        request (instead of two ranged requests per item) and then read as a local one.

        Not LitData's whole-chunk mode for a bucket: its map-style reader deletes the chunk it read last
        whenever an item of another chunk is asked for (made for reading chunk after chunk), so the
        block order's items of ``shuffle_window`` chunks, shuffled together, downloaded the same chunks
        again and again (11 images/s here against a local S3 server, README)."""
        origin = remote.origin_of(Path(self.split_dir).parent)
        if self.chunks is None and origin is not None and ChunkFiles.readable(self.split_dir, self.index, True):
            self.chunks = ChunkFiles(self.split_dir, self.index["chunks"], f"{origin['url']}/{Path(self.split_dir).name}")
        if self.chunks is not None:
            self.chunks.read_ahead = True

    def __len__(self) -> int:
        return self._len

    @property
    def block_sizes(self) -> list[int]:
        """Items per chunk, in index order (``data.shuffle=block``)."""
        return [c["chunk_size"] for c in self.index["chunks"]]

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}

    def read(self, index: int) -> tuple:
        """(the JPEG bytes: a buffer, the label) of item ``index``."""
        if self.chunks is not None:
            return self.chunks.item(index)
        item = self.stream[index]
        return item["jpeg"], int(item["label"])

    def __getitem__(self, index: int):
        name = f"{self.split_dir} item {index}"
        try:
            jpeg, label = self.read(index)
            if self.raw:  # the bytes as a tensor (no copy: collate_bytes copies them into the batch)
                return torch.frombuffer(jpeg, dtype=torch.uint8), label
            img = Image.open(io.BytesIO(jpeg))
            img.filename = name  # errors in the lazy crop name the item
            if not self.lazy:
                img = img.convert("RGB")
        except ShardError:
            raise  # a damaged chunk is no image to skip
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as err:
            return skip_or_raise(CorruptImageError(f"{name}: cannot be decoded as an image ({err})"),
                                 self.skip_corrupt)
        return (self.transform(img) if self.transform else img), label


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Image bytes decoded as ``load_rgb`` decodes the file they came from; errors name ``name``."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"{name}: cannot be decoded as an image ({err})") from err


class PackedSplit:
    """The items (dicts of the fields ``python -m vitlab.data.pack`` wrote) of one packed split, by
    index; an item that cannot be read is a ``CorruptImageError`` naming it."""

    def __init__(self, split_dir: str | Path):
        self.split_dir, self._stream = str(split_dir), None
        self._len = sum(c["chunk_size"] for c in json.loads((Path(split_dir) / "index.json").read_text())["chunks"])
        import litdata  # noqa: F401  here, so that forked loader workers start with it

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}

    def __getitem__(self, index: int) -> dict:
        if self._stream is None:  # opened in the process that reads (each loader worker its own)
            self._stream = open_stream(self.split_dir)
        try:
            return self._stream[index]
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise CorruptImageError(f"{self.split_dir} item {index}: cannot be read ({err})") from err


class PackableDataModule(VitlabDataModule):
    """A DataModule whose dataset ``python -m vitlab.data.pack <pack_kind>`` packs: ``data.format=litdata``
    reads the packed copy at ``data.root`` (checked before anything is read)."""

    pack_kind: ClassVar[str]
    pack_order = "folder"  # how the generated dataset is packed (ImageNet's block order: shuffled)

    def pack(self, folder: Path, out: Path) -> None:
        """Pack the dataset at ``folder`` (its own layout) into ``out`` (generated data: small chunks)."""
        raise NotImplementedError

    def data_root(self) -> Path:
        return self.packed_root() if self.format == "litdata" else super().data_root()

    def packed_root(self) -> Path:
        """``data.format=litdata``: ``data.root`` is a packed dataset, checked (manifest, indexes,
        shard sizes; errors name the shard and say how to pack, no folder-layout help). With
        ``synthetic``: the generated dataset, packed beside it once."""
        if is_url(self.root) and not self.synthetic:
            root = remote.local_copy(self.root, self.cache_dir)
        else:
            root = Path(self.root)
        if self.synthetic:
            self.format = "folder"  # generate and check the dataset's own layout, then pack it
            try:
                folder = self.data_root()
            finally:
                self.format = "litdata"
            order = self.pack_order
            root = folder.parent / (f"{folder.name}_litdata" + ("" if order == "folder" else f"_{order}"))
            if not (root / ".complete").exists():
                # LitData's writer draws on (or seeds) the global RNGs: a run that packs would otherwise
                # train differently from its re-run, which finds the pack made
                states = random.getstate(), np.random.get_state(), torch.get_rng_state()
                self.pack(folder, root)
                random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
                (root / ".complete").touch()
        check_packed(root, self.pack_kind)
        return root

    def packed_report(self, full: bool) -> DataReport:
        """``check`` of a packed dataset: its manifest, indexes and shard sizes; ``full`` hashes every
        shard (an error names the shard)."""
        root = self.data_root()
        how = "full: every shard hashed" if full else "cheap: indexes and shard sizes; data.verify=full hashes shards"
        report = DataReport(f"{self.pack_kind} packed at {root} ({how})")
        manifest = check_packed(root, self.pack_kind, full=full)
        for split, written in manifest["splits"].items():
            report.checked.append(f"{split}/: {written['images']} images in {len(written['chunks'])} shards")
        return report
