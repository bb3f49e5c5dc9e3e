"""A packed dataset in an S3 bucket as ``data.root`` (``data.format=litdata data.root=s3://bucket/prefix``).

The pack's small files (``vitlab_pack.json``, each split's ``index.json``, the files kept beside the
chunks: COCO's ``images.json`` tables and val JSON) are copied into a local directory under
``data.cache_dir``. Everything else - the checks, the manifest's classes, the readers - reads that
copy as it reads a local pack, so the two paths share their code. The chunks stay in the bucket:
``data.shuffle=block`` downloads each whole beside the copy when first needed (``fetch_chunk``) and
reads it as a local chunk; otherwise LitData's ``StreamingDataset`` fetches each item alone (ranged
GETs; ``vitlab.data.streaming.open_stream``).

One listing of the prefix gives every object's size and ETag: the chunks' sizes are checked against
each split's ``index.json`` before training (a missing or truncated chunk is named by its URL), and
a small file is fetched again only when its ETag changed. ``data.verify=full`` streams every chunk
through SHA-256 (a read of the whole dataset).

S3 only, and S3-compatible stores (MinIO, Ceph, Cloudflare R2, GCS's XML API) through
``AWS_ENDPOINT_URL``: boto3, the client LitData reads chunks with, so one set of credentials
(the usual AWS environment, profile or instance role) serves both. LitData's ``gs://`` and
``azure://`` readers would need their own listing; a mount is the way there.
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


class RemoteError(DatasetLayoutError):
    """The bucket cannot be listed or read (credentials, endpoint, name)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitlab"


class S3Pack:
    """The objects under ``s3://bucket/prefix``: listed, fetched and hashed with boto3."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        if parsed.scheme not in SCHEMES or not parsed.netloc:
            raise DatasetLayoutError(
                f"data.root={url}: vitlab reads packed datasets from s3://bucket/prefix URLs (S3 and S3-compatible "
                f"stores via AWS_ENDPOINT_URL); for {parsed.scheme}:// mount the bucket as a file system (gcsfuse, "
                f"blobfuse2) and set data.root to the mount")
        import boto3

        self.url, self.bucket, self.prefix = url.rstrip("/"), parsed.netloc, parsed.path.strip("/")
        self.client = boto3.client("s3")

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
            raise RemoteError(f"data.root={self.url}: cannot list the bucket ({type(err).__name__}: {err}); "
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

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        for block in self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].iter_chunks(1 << 20):
            digest.update(block)
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


def fetch_chunk(url: str, path: Path, size: int) -> None:
    """The chunk at ``url``/``path.name`` downloaded whole to ``path`` unless there (of ``size`` bytes);
    one process of a node downloads it while the others wait for it (a file lock). Room is made first
    when the disk would keep less than a twentieth free: this cache's least recently downloaded chunks
    go (a process that has one open keeps reading it)."""
    from filelock import FileLock

    if path.exists() and path.stat().st_size == size:
        return
    with FileLock(f"{path}.lock"):
        if path.exists() and path.stat().st_size == size:
            return
        make_room(path.parent, size)
        key = (os.getpid(), url)
        if key not in _clients:
            _clients[key] = S3Pack(url)
        _clients[key].fetch(path.name, path)


def make_room(folder: Path, size: int) -> None:
    usage = shutil.disk_usage(folder)
    old = sorted(folder.glob("*.bin"), key=lambda p: p.stat().st_mtime)
    while old and usage.free - size < usage.total / 20:
        freed = old[0].stat().st_size
        old.pop(0).unlink(missing_ok=True)
        usage = usage._replace(free=usage.free + freed)


def origin_of(root: str | Path) -> dict | None:
    """``{"url", "objects"}`` when ``root`` is a remote pack's local copy, else None."""
    path = Path(root) / ORIGIN
    return json.loads(path.read_text()) if path.exists() else None


def chunk_reads_over_plain_http() -> None:
    """An ``http://`` AWS_ENDPOINT_URL (a MinIO or Ceph without TLS): LitData downloads chunks with
    obstore, which refuses plain HTTP when given client options as LitData gives them (its
    AWS_ALLOW_HTTP is then not read: "HTTP error: builder error"), so this process's downloads go
    through boto3, LitData's other client (its own fallback for a process where obstore is unusable).
    HTTPS endpoints keep obstore."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if endpoint.startswith("http://"):
        from litdata.streaming import downloader

        downloader._OBSTORE_INIT_PID = -1  # "started by another process": obstore_usable() is then False

