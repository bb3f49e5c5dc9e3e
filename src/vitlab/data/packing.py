"""Writing a packed dataset (``python -m vitlab.data.pack``), the parts every dataset shares: the
manifest ``vitlab_pack.json``, one split at a time into LitData chunks (resumable, LitData's
progress bar), verified by reading every item back, each chunk's SHA-256, and files kept beside
the chunks with their sizes and hashes. Each dataset module packs its own layout with these
(``pack_imagenet``, ``pack_coco``, ``pack_ade20k``); ``vitlab.data.streaming`` reads and checks.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

from vitlab.data.base import DatasetLayoutError

MANIFEST = "vitlab_pack.json"


class ShardError(DatasetLayoutError):
    """A packed dataset's shard (chunk) or index is missing, truncated or not this dataset's."""

# what a manifest written before a field was recorded means by its absence
IDENTITY_BEFORE = {"order": "folder"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def chunk_files(split_dir: Path) -> list[str]:
    index = json.loads((split_dir / "index.json").read_text())
    return [c["filename"] for c in index["chunks"]]


# ---- generic: one manifest, one split at a time ---------------------------------------------

def open_manifest(out: Path, kind: str, **identity) -> dict:
    """The manifest of ``out`` (a new one, or the one an earlier run of the same dataset left)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    if manifest and manifest.get("kind") != kind:
        raise SystemExit(f"{out}: already holds another packed dataset ({manifest.get('kind')}); use another --out")
    for k, v in identity.items() if manifest else ():
        if manifest.get(k, IDENTITY_BEFORE.get(k)) != v:
            raise SystemExit(f"{out}: already holds a packed {kind} with another {k} "
                             f"({str(manifest.get(k, IDENTITY_BEFORE.get(k)))[:80]}); use another --out")
    manifest.update(kind=kind, **identity, splits=manifest.get("splits", {}), files=manifest.get("files", {}))
    return manifest


def save_manifest(out: Path, manifest: dict) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def keep_file(out: Path, manifest: dict, name: str, data: bytes) -> None:
    """A file beside the chunks (``name`` relative to ``out``), recorded with its size and hash."""
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_bytes(data)
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def verify_split(split_dir: Path, count: int, check_item: Callable[[int, dict], str | None]) -> tuple[dict, list[int]]:
    """Read the written split back: ``count`` items, every input once, each as ``check_item(input,
    item)`` expects (it returns what is wrong, or None); hash every chunk. Returns the hashes and
    the input of each item position (LitData's workers may write the inputs in another order)."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(split_dir))
    if len(ds) != count:
        raise SystemExit(f"{split_dir}: {len(ds)} items written, {count} in the source")
    order, seen = [], [False] * count
    for k in range(len(ds)):
        item = ds[k]
        i = int(item["index"])
        wrong = "duplicated" if not 0 <= i < count or seen[i] else check_item(i, item)
        if wrong:
            raise SystemExit(f"{split_dir}: item {k} (source item {i}): {wrong}")
        seen[i] = True
        order.append(i)
    return {name: sha256(split_dir / name) for name in chunk_files(split_dir)}, order


def _indexed_item(k: int, read_item: Callable, sources: list) -> dict:
    return {"index": k, **read_item(sources[k])}


def pack_split(out: Path, manifest: dict, split: str, sources: list, read_item: Callable, check_item: Callable,
               shard_size: str, workers: int, beside: Callable[[list[int]], dict[str, bytes]] | None = None,
               **summary) -> None:
    """Write ``{"index": k, **read_item(sources[k])}`` for every source into ``out/split`` (resumable),
    verify it, keep ``beside(order)``'s files next to its chunks and record the split in the manifest."""
    from litdata import optimize

    split_dir = out / split
    if manifest["splits"].get(split, {}).get("images") == len(sources):
        print(f"{split}: already packed ({len(sources)} items), skipped")
        return
    if split_dir.exists() and not (split_dir / ".checkpoints").exists():
        shutil.rmtree(split_dir)  # a finished split of another run: written anew
    # LitData's inputs are the source positions: its checkpoint stores them as JSON and resumes only
    # when they read back equal (tuples would not), and positions keep that file small.
    # fork (where there is one): the workers start without importing torch again
    optimize(partial(_indexed_item, read_item=read_item, sources=sources), list(range(len(sources))), str(split_dir),
             chunk_bytes=shard_size, num_workers=workers, use_checkpoint=True, reorder_files=False,
             start_method="fork" if "fork" in mp.get_all_start_methods() else None)
    chunks, order = verify_split(split_dir, len(sources), check_item)
    for name, data in (beside(order) if beside else {}).items():
        keep_file(out, manifest, f"{split}/{name}", data)
    manifest["splits"][split] = {"images": len(sources), **summary, "chunks": chunks}
    save_manifest(out, manifest)
    print(f"{split}: {len(sources)} items in {len(chunks)} chunks, verified")


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()
