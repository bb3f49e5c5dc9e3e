"""Reading a dataset packed by ``python -m vitlab.data.pack`` (LitData chunks): ``data.format=litdata``.

``PackedImages`` is a map-style dataset over the packed split (items by index, read straight from
the chunks by ``ChunkFiles``; a local split in another layout through LitData's ``StreamingDataset``;
a pack in a bucket, ``data.root=s3://...``, from a local copy of its small files, its chunks
downloaded whole in the block order, else each item fetched by one ranged GET: ``vitlab.data.remote``),
so the DataModule's resumable sampler and exact evaluation split apply unchanged: each DDP process reads
its own disjoint share, and a resumed run continues at the sampler's saved position. The JPEG
bytes are decoded here exactly as the folder reader decodes files, so the augmentation and the
``DatasetInfo`` are the same for both formats.

``check_packed`` runs before training: the manifest, each split's ``index.json`` and every chunk
(present, of the size the index records; ``full``: its SHA-256 as written), and the files kept
beside the chunks (COCO's ``images.json`` tables and val JSON) likewise - an error names the shard
or the file.

``PackedSplit`` reads any packed split's items (dicts) by index: ``PackedImages`` and the COCO and
ADE20K readers (``vitlab.data.coco.PackedCocoDataset``, ``vitlab.data.ade20k.PackedADE20KDataset``)
build on it.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vitlab.data import remote
from vitlab.data.base import CorruptImageError, DatasetLayoutError, VitlabDataModule, is_url, reject_url
from vitlab.data.packing import MANIFEST, ShardError, sha256
from vitlab.data.remote import REQUESTS_IN_FLIGHT
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
    """LitData's reader of a local packed split in a layout ``ChunkFiles`` does not read (an older or
    another packer's). ``batch_decode=0``: deserialise only the item asked for. LitData's default for
    a ``bytes`` leaf of < 64 KB (a JPEG) deserialises an aligned window of 256 items around it, which
    the sampler's random order then throws away: ~13x the CPU per item (measured, README)."""
    from litdata import StreamingDataset

    return StreamingDataset(str(split_dir), batch_decode=0)


# the leaf types python -m vitlab.data.pack writes, as LitData serialises them (int64, UTF-8, raw bytes)
LEAF_TYPES = ("int", "str", "bytes")
INT64 = struct.Struct("<q")


def packed_fields(index: dict) -> list[tuple[str, str]] | None:
    """[(field, leaf type)] of a split's items when they are in the layout python -m vitlab.data.pack
    writes (LitData's PyTreeLoader of one flat dict of int / str / bytes leaves, neither compressed
    nor encrypted), else None."""
    config = index.get("config", {})
    if config.get("compression") or config.get("encryption") or config.get("item_loader") != "PyTreeLoader":
        return None
    spec = json.loads(config.get("data_spec") or "[0, {}]")[1]
    names, types = json.loads(spec.get("context") or "null"), config.get("data_format") or []
    if (spec.get("type") != "builtins.dict" or not isinstance(names, list) or len(names) != len(types)
            or any(child.get("type") for child in spec.get("children_spec", [])) or not set(types) <= set(LEAF_TYPES)):
        return None
    return list(zip(names, types))


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
    """Items of a packed split read straight from its chunks (the item offsets each chunk's header
    records, then one read per item), for the training loader's hot path. A local pack's chunks are
    files; a bucket's (``bucket_url``: the split's URL, ``vitlab.data.remote``) are either downloaded
    whole when first needed (``whole``: the block order, which reads all of a chunk's items soon)
    and then read as files, or read in place: the header once per process, then one ranged GET per
    item (the uniform order, COCO and ADE20K), a batch's items requested at once (``prefetch``).

    Hand-written because LitData's per-item path (index lookup, cache and item-loader layers) costs
    ~5x the CPU of this one, a bisect and one read (measured in README "Data at scale"), and from a
    bucket two requests an item where this makes one. It reads only the layout pack writes
    (``packed_fields``: LitData chunk = uint32 item count, uint32 offsets, then per item uint32 leaf
    sizes and the leaves); tested item for item against LitData's own reader.
    """

    def __init__(self, split_dir: str | Path, index: dict, bucket_url: str | None = None,
                 etags: list[str | None] | None = None, read_threads: int = 0):
        chunks = index["chunks"]
        self.read_threads = read_threads  # local chunk files: a batch's items read by this many threads (prefetch)
        self.etags = etags or [None] * len(chunks)  # a bucket's chunks' ETags (its listing): cached chunks checked
        self.fields = packed_fields(index)
        self.paths = [str(Path(split_dir) / c["filename"]) for c in chunks]
        self.names = [c["filename"] for c in chunks]
        self.bucket_url = bucket_url
        self.bytes = [c["chunk_bytes"] for c in chunks]
        self.sizes = [c["chunk_size"] for c in chunks]
        self.starts = list(itertools.accumulate(self.sizes, initial=0))
        # the smallest item: its leaf sizes and 8 bytes per int leaf (a header offering less is damaged)
        self.min_item = 4 * len(self.fields) + 8 * sum(t == "int" for _, t in self.fields)
        # data.shuffle=block (read_whole_chunks): each chunk read whole when first needed - a file read
        # ahead by the kernel in large requests, a bucket's chunk downloaded - as the block order reads all
        # its items soon. Not in the uniform order, which would read every chunk for one item each.
        self.whole = False
        self._for_this_process()

    def _for_this_process(self) -> None:
        # chunk -> (file descriptor, or None when read in place; item offsets), per process, least recently
        # used first: a dataset of more chunks than the process may keep open (ImageNet-21k: ~5,000)
        # closes the oldest
        self._open: OrderedDict[int, tuple] = OrderedDict()
        self._pid = os.getpid()
        self._max_open = len(self.paths) if self.in_place else open_files_limit(len(self.paths))
        self._pool, self._ready = None, {}  # read in place: this process's request threads, a batch's items
        self._leaf_sizes = struct.Struct(f"<{len(self.fields)}I")  # an item's first bytes

    def __getstate__(self):  # a spawned worker starts its own (no files, threads or buffers pickled)
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_pool", "_ready", "_leaf_sizes")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = None

    def read_whole_chunks(self) -> None:
        """Each chunk read whole when first needed (set before reading): a file read ahead, a bucket's
        chunk downloaded."""
        self.whole = True
        self._for_this_process()

    @property
    def in_place(self) -> bool:
        return self.bucket_url is not None and not self.whole

    def where(self, k: int) -> str:
        return f"{self.bucket_url}/{self.names[k]}" if self.in_place else self.paths[k]

    def locate(self, index: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.starts, index) - 1
        return k, index - self.starts[k]

    def _in_this_process(self) -> None:
        if self._pid != os.getpid():  # a forked or spawned worker opens the files itself
            self._for_this_process()

    def chunk(self, k: int) -> tuple:
        self._in_this_process()
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        if len(self._open) >= self._max_open:
            os.close(self._open.popitem(last=False)[1][0])
        fd = None if self.in_place else self.open_chunk(k)
        if fd is not None:  # the block order reads the whole chunk soon; the uniform one an item here and there
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED if self.whole else os.POSIX_FADV_RANDOM)
        self._open[k] = fd, self.header(k, fd)
        return self._open[k]

    def open_chunk(self, k: int) -> int:
        if self.bucket_url is None:
            return os.open(self.paths[k], os.O_RDONLY)
        for _ in range(3):  # another process making room may delete the chunk between its download and this open
            remote.fetch_chunk(self.bucket_url, Path(self.paths[k]), self.bytes[k], self.etags[k])
            try:
                return os.open(self.paths[k], os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise ShardError(f"{self.paths[k]}: deleted as soon as downloaded three times: the disk of data.cache_dir "
                         f"cannot hold the chunks being read at once (give data.cache_dir more room)")

    def read_at(self, k: int, fd: int | None, start: int, end: int) -> bytearray:
        """Bytes ``start:end`` of chunk ``k`` (writable: torch.frombuffer shares them without a copy);
        a read, not an mmap: on a cold page cache a fault reads around each page, a read what is asked."""
        if fd is None:
            return bytearray(remote.bucket(self.bucket_url).read_range(self.names[k], start, end))
        buf = bytearray(end - start)
        got = os.preadv(fd, [buf], start)
        return buf if got == len(buf) else buf[:got]  # (a slice is a copy: only for a short read)

    def header(self, k: int, fd: int | None) -> np.ndarray:
        """Chunk ``k``'s item offsets (uint32: 4 bytes an item, ~9x less than a tuple of ints), checked
        against index.json and the file: a damaged header would otherwise hand out wrong items (a read
        of the wrong bytes is no error), so it stops here, naming the chunk. ~10 us per chunk of
        ImageNet's ~2,300 items, once per process (read in place: one request)."""
        n = self.sizes[k]
        head = self.read_at(k, fd, 0, 4 * (n + 2))
        if len(head) == 4 * (n + 2) and struct.unpack_from("<I", head)[0] == n:
            offsets = np.frombuffer(head, "<u4", n + 1, 4)
            sizes = np.diff(offsets.astype(np.int64))
            end = self.bytes[k] if fd is None else os.fstat(fd).st_size
            if offsets[0] == 4 * (n + 2) and (n == 0 or sizes.min() >= self.min_item) and offsets[-1] <= end:
                return offsets
        root = self.bucket_url.rsplit("/", 1)[0] if self.bucket_url else Path(self.paths[k]).parents[1]
        raise ShardError(f"{self.where(k)}: the chunk's header does not match index.json's {n} items (item "
                         f"offsets missing, out of order or past the file's end): the chunk is damaged; check every "
                         f"chunk's hash with python -m vitlab.tools.check_data data.format=litdata data.root={root} "
                         f"data.verify=full, or pack it again")

    def read_item(self, k: int, j: int) -> bytearray:
        fd, offsets = self.chunk(k)
        return self._read_item(k, fd, offsets, j)

    def _read_item(self, k: int, fd: int | None, offsets: np.ndarray, j: int) -> bytearray:
        start, end = int(offsets[j]), int(offsets[j + 1])
        buf = self.read_at(k, fd, start, end)
        if len(buf) != end - start:
            raise ValueError(f"{self.where(k)}: item {j} is cut short (truncated chunk)")
        return buf

    def prefetch(self, indices) -> None:
        """The items ``indices`` (a batch) read at once by a few threads, so a loader worker waits about
        one read's latency per that many items instead of one per item: always from a bucket read in
        place (``REQUESTS_IN_FLIGHT``; it answers in tens of milliseconds, decoding an image takes a
        few), and with ``read_threads`` from chunk files in the uniform order (a shared filesystem's
        random reads take a millisecond or more; on a local disk's page cache threads cost more than
        they save, README). ``record`` then hands them out; a failed read fails there, for its own item."""
        threads = REQUESTS_IN_FLIGHT if self.in_place else 0 if self.whole else self.read_threads
        if not threads or not indices:
            return
        self._in_this_process()
        self._ready = {}
        located = [self.locate(i) for i in indices]
        if self._pool is None:
            if self.in_place:
                remote.bucket(self.bucket_url)  # the client, made once here (not by the threads at once)
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vitlab-read")
        needed = sorted({k for k, _ in located})
        if self.in_place:  # the chunks' headers, one request each, at once
            new = [k for k in needed if k not in self._open]
            for k, offsets in zip(new, self._pool.map(lambda k: self.header(k, None), new)):
                self._open[k] = None, offsets
        elif len(needed) > self._max_open:
            return  # more chunks than the files this process keeps open: read one after another
        else:
            for k in needed:  # opened (or kept) here, none closed while the threads read
                self.chunk(k)

        def attempt(kj):
            try:
                fd, offsets = self._open[kj[0]]
                return self._read_item(kj[0], fd, offsets, kj[1])
            except Exception as err:  # noqa: BLE001  raised by record(), for its own item
                return err

        self._ready = dict(zip(indices, self._pool.map(attempt, located)))

    def record(self, index: int) -> dict:
        """Item ``index``'s fields: ints, strs, and bytes leaves as memoryviews of one buffer. (The
        training loader's hot path: ~9 us an item here, most of it the read.)"""
        self._in_this_process()
        got = self._ready.get(index) if self._ready else None
        if isinstance(got, Exception):
            raise got
        k = bisect.bisect_right(self.starts, index) - 1
        buf = got if got is not None else self.read_item(k, index - self.starts[k])
        view, at, out = memoryview(buf), self._leaf_sizes.size, {}
        for (name, kind), size in zip(self.fields, self._leaf_sizes.unpack_from(buf)):
            out[name] = (INT64.unpack_from(buf, at)[0] if kind == "int"
                         else str(view[at:at + size], "utf-8") if kind == "str" else view[at:at + size])
            at += size
        if at != len(buf):
            raise ValueError(f"{self.where(k)}: item {index - self.starts[k]}'s field sizes do not add up to its "
                             f"{len(buf)} bytes")
        return out


def chunk_reader(split_dir: str | Path, index: dict, read_threads: int = 0) -> ChunkFiles | None:
    """The split's ``ChunkFiles`` (local, or a bucket's when ``split_dir`` is in a remote pack's local
    copy), or None for a local split in another layout (then read through LitData)."""
    origin = remote.origin_of(Path(split_dir).parent)
    url = f"{origin['url']}/{Path(split_dir).name}" if origin else None
    if packed_fields(index):
        listed = origin["objects"] if origin else {}
        etags = [listed.get(f"{Path(split_dir).name}/{c['filename']}", [None, None])[1] for c in index["chunks"]]
        return ChunkFiles(split_dir, index, url, etags, read_threads)
    if url:
        raise ShardError(f"{url}/index.json: its items are not in the layout python -m vitlab.data.pack writes "
                         f"(another packer's, or compressed); vitlab reads packs in that layout from a bucket: pack "
                         f"the dataset with python -m vitlab.data.pack and upload it")
    import litdata  # noqa: F401  here, so that forked loader workers start with it (~0.2 CPU-s each otherwise)
    return None


class PackedSplit:
    """The items (dicts of the fields ``python -m vitlab.data.pack`` wrote) of one packed split, by
    index, read by ``ChunkFiles`` (a local split in another layout: LitData's ``StreamingDataset``);
    an item that cannot be read is a ``CorruptImageError`` naming it."""

    def __init__(self, split_dir: str | Path, read_threads: int = 0):
        self.split_dir, self._stream = str(split_dir), None
        self.index = json.loads((Path(split_dir) / "index.json").read_text())
        self._len = sum(c["chunk_size"] for c in self.index["chunks"])
        self.chunks = chunk_reader(split_dir, self.index, read_threads)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        return {**self.__dict__, "_stream": None}

    @property
    def stream(self):
        if self._stream is None:  # opened in the process that reads (each loader worker its own)
            self._stream = open_stream(self.split_dir)
        return self._stream

    def prefetch(self, indices: list[int]) -> None:
        """A batch's items read at once where that pays (``ChunkFiles.prefetch``)."""
        if self.chunks is not None:
            self.chunks.prefetch(indices)

    def record(self, index: int) -> dict:
        """Item ``index``'s fields (from the chunks: bytes leaves as memoryviews of one buffer)."""
        return self.chunks.record(index) if self.chunks is not None else self.stream[index]

    def __getitem__(self, index: int) -> dict:
        try:  # bytes leaves copied out of the item's buffer, as LitData gives them
            return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in self.record(index).items()}
        except DatasetLayoutError:
            raise  # a damaged chunk or an unreadable bucket is no item to skip
        except (OSError, ValueError, KeyError, EOFError, struct.error) as err:
            raise CorruptImageError(f"{self.split_dir} item {index}: cannot be read ({err})") from err


class PackedImages(PackedSplit, Dataset):
    """(image, label) items of a packed ImageNet split; the JPEG bytes are opened as the folder reader
    opens files (``load_rgb``, or lazily for ``fast_decode``)."""

    def __init__(self, split_dir: str | Path, transform=None, skip_corrupt: bool = False, lazy: bool = False,
                 raw: bool = False, read_threads: int = 0):
        super().__init__(split_dir, read_threads)
        self.transform, self.skip_corrupt, self.lazy = transform, skip_corrupt, lazy
        self.raw = raw  # data.gpu_decode: the JPEG bytes as a uint8 tensor, decoded on the device

    def read_whole_chunks(self) -> None:
        """``data.shuffle=block`` (it reads all of a chunk's items soon): each chunk read whole when
        first needed - a local chunk file read ahead by the kernel, a bucket's chunk downloaded in one
        request (instead of a request per item) and then read as a local one.

        Not LitData's whole-chunk mode for a bucket: its map-style reader deletes the chunk it read last
        whenever an item of another chunk is asked for (made for reading chunk after chunk), so the
        block order's items of ``shuffle_window`` chunks, shuffled together, downloaded the same chunks
        again and again (11 images/s here against a local S3 server, README)."""
        if self.chunks is not None:
            self.chunks.read_whole_chunks()

    @property
    def block_sizes(self) -> list[int]:
        """Items per chunk, in index order (``data.shuffle=block``)."""
        return [c["chunk_size"] for c in self.index["chunks"]]

    def read(self, index: int) -> tuple:
        """(the JPEG bytes: a buffer, the label) of item ``index``."""
        item = self.record(index)
        return item["jpeg"], int(item["label"])

    def __getitems__(self, indices: list[int]) -> list:
        """A batch (the loader's fetch): its items read at once where that pays (``ChunkFiles.prefetch``)."""
        self.prefetch(indices)
        return [self[i] for i in indices]

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
        except DatasetLayoutError:
            raise  # a damaged chunk or an unreadable bucket is no image to skip
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
        where = f"{self.root} via its local copy {root}" if is_url(self.root) and not self.synthetic else root
        report = DataReport(f"{self.pack_kind} packed at {where} ({how})")
        manifest = check_packed(root, self.pack_kind, full=full)
        for split, written in manifest["splits"].items():
            report.checked.append(f"{split}/: {written['images']} images in {len(written['chunks'])} shards")
        return report
