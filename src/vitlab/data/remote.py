"""A packed dataset in an S3 bucket as ``data.root`` (``data.format=litdata data.root=s3://bucket/prefix``).

The pack's small files (``vitlab_pack.json``, each split's ``index.json``, the files kept beside the
chunks: COCO's ``images.json`` tables and val JSON) are copied into a local directory under
``data.cache_dir``. Everything else - the checks, the manifest's classes, the readers - reads that
copy as it reads a local pack, so the two paths share their code. The chunks stay in the bucket:
``data.shuffle=block`` downloads each whole beside the copy when first needed (``fetch_chunk``) and
reads it as a local chunk; otherwise each item is fetched alone, one ranged GET (``S3Pack.read_range``;
``vitlab.data.streaming.ChunkFiles``), a batch's items ``REQUESTS_IN_FLIGHT`` at a time.

One listing of the prefix gives every object's size and ETag: the chunks' sizes are checked against
each split's ``index.json`` before training (a missing or truncated chunk is named by its URL), and
a small file is fetched again only when its ETag changed. ``data.verify=full`` streams every chunk
through SHA-256 (a read of the whole dataset).

S3 only, and S3-compatible stores (MinIO, Ceph, Cloudflare R2, GCS's XML API) through
``AWS_ENDPOINT_URL``, all with boto3 (the usual AWS environment, profile or instance role; an
``http://`` or a private-CA endpoint as boto3 reaches it). Not LitData's remote readers: their item
path makes two requests an image (~7 ms of client CPU, against ~2 for one boto3 ranged GET, both
measured here: README) and their chunk path cannot serve the block order (``PackedImages.read_whole_chunks``).
``gs://`` and ``azure://`` would need their own clients; a mount is the way there.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from vitlab.data.base import DatasetLayoutError
from vitlab.data.packing import MANIFEST, ShardError

# in a remote pack's local copy: the URL its chunks are read from, and every object's size and ETag
ORIGIN = "vitlab_remote.json"
SCHEMES = ("s3",)
# ranged GETs one loader process keeps in flight for a batch (and its client's connection pool)
REQUESTS_IN_FLIGHT = 16


class RemoteError(DatasetLayoutError):
    """The bucket cannot be listed or read (credentials, endpoint, name)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitlab"


class S3Pack:
    """The objects under ``s3://bucket/prefix``: listed, fetched and hashed with boto3."""

    def __init__(self, url: str, option: str = "data.root"):
        parsed = urlparse(url)
        self.option = option  # where the URL was given, for the errors
        if parsed.scheme not in SCHEMES or not parsed.netloc:
            raise DatasetLayoutError(
                f"{option}={url}: vitlab reads packed datasets from s3://bucket/prefix URLs (S3 and S3-compatible "
                f"stores via AWS_ENDPOINT_URL); for {parsed.scheme}:// mount the bucket as a file system (gcsfuse, "
                f"blobfuse2) and set {option} to the mount")
        import boto3
        from botocore.config import Config

        self.url, self.bucket, self.prefix = url.rstrip("/"), parsed.netloc, parsed.path.strip("/")
        self.client = boto3.client("s3", config=Config(max_pool_connections=REQUESTS_IN_FLIGHT))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def listing(self) -> dict[str, list]:
        """Every object under the prefix: name (relative to it) -> [bytes, ETag]."""
        start = f"{self.prefix}/" if self.prefix else ""
        objects = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(start):]] = [obj["Size"], obj["ETag"]]
        except Exception as err:  # botocore's many: no credentials, no endpoint, no such bucket, access denied
            raise RemoteError(f"{self.option}={self.url}: cannot list the bucket ({type(err).__name__}: {err}); "
                              f"credentials and endpoint come from the AWS environment (AWS_PROFILE, "
                              f"AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)") from err
        return objects

    def fetch(self, name: str, dest: Path) -> None:
        """Object ``name`` to ``dest``, atomically (ranks of a node may fetch the same file at once)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.tmp.{os.getpid()}")
        try:
            self.client.download_file(self.bucket, self.key(name), str(tmp))
        except Exception as err:
            tmp.unlink(missing_ok=True)
            raise RemoteError(f"{self.url}/{name}: cannot be read ({type(err).__name__}: {err})") from err
        os.replace(tmp, dest)

    def read_range(self, name: str, start: int, end: int, tries: int = 3) -> bytes:
        """Bytes ``start:end`` of object ``name`` (one ranged GET; fewer where the object is shorter).
        botocore retries a request that fails before its body (connection, throttling, 5xx), not a
        body cut off midway: that is asked for again here, ``tries`` times in all."""
        from botocore.exceptions import ClientError

        for attempt in range(tries):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                              Range=f"bytes={start}-{end - 1}")["Body"].read()
            except Exception as err:  # ClientError: the store's answer (no such key, access denied)
                if isinstance(err, ClientError) or attempt == tries - 1:
                    raise RemoteError(f"{self.url}/{name}: bytes {start}-{end - 1} cannot be read "
                                      f"({type(err).__name__}: {err})") from err

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        try:
            for block in self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].iter_chunks(1 << 20):
                digest.update(block)
        except Exception as err:
            raise RemoteError(f"{self.url}/{name}: cannot be read ({type(err).__name__}: {err})") from err
        return digest.hexdigest()


def local_copy(url: str, cache_dir: str | Path | None) -> Path:
    """The local copy of the pack at ``url``'s small files (made or refreshed; see the module)."""
    pack = S3Pack(url)
    listed = pack.listing()
    if MANIFEST not in listed:
        raise ShardError(f"{pack.url}/{MANIFEST} is missing: {pack.url} is not a dataset packed by python -m "
                         f"vitlab.data.pack (pack locally, then upload the whole directory: aws s3 sync OUT {pack.url})")
    copy = Path(cache_dir or default_cache_dir()) / "packed" / "s3" / pack.bucket / pack.prefix
    origin = copy / ORIGIN
    before = json.loads(origin.read_text())["objects"] if origin.exists() else {}

    def fetch(name: str) -> None:
        if name not in listed:
            raise ShardError(f"{pack.url}/{name} is missing (packed beside the shards); upload the packed directory whole")
        if before.get(name) != listed[name] or not (copy / name).exists():
            pack.fetch(name, copy / name)

    fetch(MANIFEST)
    manifest = json.loads((copy / MANIFEST).read_text())
    for split in manifest.get("splits", {}):
        fetch(f"{split}/index.json")
    for name in manifest.get("files", {}):
        fetch(name)
    tmp = origin.with_name(f"{ORIGIN}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps({"url": pack.url, "objects": listed}))
    os.replace(tmp, origin)
    return copy


_clients: dict[tuple[int, str], S3Pack] = {}  # per process (a forked loader worker makes its own)


def bucket(url: str) -> S3Pack:
    """This process's client of the pack at ``url`` (made once; a forked process makes its own)."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = S3Pack(url)
    return _clients[key]


def fetch_chunk(url: str, path: Path, size: int, etag: str | None = None) -> None:
    """The chunk at ``url``/``path.name`` downloaded whole to ``path`` unless there (of ``size`` bytes,
    and of the bucket's ``etag`` when given: a pack uploaded again to the same prefix replaces chunks
    of the same names, perhaps of the same sizes); one process of a node downloads it while the
    others wait for it (a file lock). Room is made first when the disk would keep less than a
    twentieth free: the least recently downloaded chunks of the cache's packs go (``make_room``)."""
    from filelock import FileLock

    if is_cached(path, size, etag):
        return
    with FileLock(f"{path}.lock"):
        if is_cached(path, size, etag):
            return
        make_room(cache_scope(url, path.parent), size)
        bucket(url).fetch(path.name, path)
        if etag is not None:
            tmp = stamp(path).with_name(f"{stamp(path).name}.tmp.{os.getpid()}")
            tmp.write_text(etag)
            os.replace(tmp, stamp(path))


def stamp(chunk: Path) -> Path:
    """Where the ETag of a downloaded chunk is kept."""
    return chunk.with_name(f"{chunk.name}.etag")


def is_cached(path: Path, size: int, etag: str | None) -> bool:
    if not (path.exists() and path.stat().st_size == size):
        return False
    return etag is None or (stamp(path).exists() and stamp(path).read_text() == etag)


def cache_scope(url: str, split_dir: Path) -> Path:
    """The folder of every bucket pack's local copy in the cache that ``split_dir`` (the copy of the
    split at ``url``) is in: ``<data.cache_dir>/packed/s3`` (``local_copy``'s layout). Making room
    deletes chunks of any pack there, so the copies of packs no longer read do not fill the disk."""
    parsed = urlparse(url)
    parts = [parsed.netloc, *filter(None, parsed.path.split("/"))]
    return split_dir.parents[len(parts) - 1]


def make_room(folder: Path, size: int) -> None:
    """Chunks under ``folder`` deleted, least recently downloaded first, until ``size`` more bytes
    would leave a twentieth of the disk free (a process that has one open keeps reading it)."""
    usage = shutil.disk_usage(folder)
    old = sorted(folder.rglob("*.bin"), key=lambda p: p.stat().st_mtime)
    while old and usage.free - size < usage.total / 20:
        freed = old[0].stat().st_size
        chunk = old.pop(0)
        chunk.unlink(missing_ok=True)
        stamp(chunk).unlink(missing_ok=True)
        usage = usage._replace(free=usage.free + freed)


def check_cache_room(folder: Path, chunk_bytes: list[int], at_once: int, processes: int = 1) -> str:
    """Before a block-order run downloads chunks into ``folder`` (a split of a bucket pack's local
    copy): each of the node's ``processes`` holds up to ``at_once`` chunks at a time (its window, and
    the next as they change over), so room for that many of the largest, beside the twentieth of the
    disk ``make_room`` keeps free, is needed or the downloads would delete each other (a
    ``RemoteError`` naming ``data.cache_dir``). Room is free space and the cache's chunks of any pack
    (``make_room`` deletes them). Returns what the cache will do: keep the whole split (the bucket read
    once per node) or download chunks again each epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(folder)
    cached = cache_scope(origin_of(folder.parent)["url"] + f"/{folder.name}", folder).rglob("*.bin")
    room = usage.free + sum(p.stat().st_size for p in cached) - usage.total / 20
    need, total = processes * at_once * max(chunk_bytes, default=0), sum(chunk_bytes)
    if room < need:
        raise RemoteError(f"data.cache_dir: {folder} has room for {mib(room)} of chunks (free space and chunks "
                          f"already there, less the twentieth of the disk kept free), and the block order needs "
                          f"{mib(need)} for the node's {processes} process(es) ({at_once} chunks each of up to "
                          f"{mib(max(chunk_bytes))}: data.shuffle_window, twice); set data.cache_dir to a larger "
                          f"local disk")
    if room >= total:
        return f"{folder}: the {mib(total)} of chunks fit; the bucket is read once"
    return (f"{folder}: room for {mib(room)} of the {mib(total)} of chunks; the least recently downloaded make "
            f"room, so chunks are downloaded again each epoch (a larger data.cache_dir keeps them)")


def mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def origin_of(root: str | Path) -> dict | None:
    """``{"url", "objects"}`` when ``root`` is a remote pack's local copy, else None."""
    path = Path(root) / ORIGIN
    return json.loads(path.read_text()) if path.exists() else None
