"""Pack a dataset's folder layout into LitData's sharded streaming format, once.

    python -m vitlab.data.pack imagenet --root data/imagenet --out data/imagenet_litdata [--shard-size 256MB]

Writes ``<out>/train`` and ``<out>/val``, each a LitData dataset (``index.json`` + chunk files of
about ``--shard-size``) whose items are the original JPEG bytes (not re-encoded: the same pixels,
the same augmentation), the label and the image's index in the folder listing; and
``<out>/vitlab_pack.json``: the dataset kind, the class folders (wnids) and names, per split the
image count, the per-label counts and a SHA-256 per chunk. Read with ``data.format=litdata
data.root=<out>`` (``vitlab.data.streaming``). Local directories here; LitData reads the same
layout from ``s3://``, ``gs://`` or ``azure://`` URLs (credentials from the usual environment).

LitData rather than WebDataset: it is Lightning's own format, reads items by index (so the
existing resumable sampler and the exact distributed split keep working unchanged: each process
reads its disjoint share, resume restores the sampler's position), and it streams chunks from
object storage into a bounded local cache; WebDataset's tar shards are read sequentially only,
which leaves exact mid-epoch resume and disjoint DDP shares to hand-written code.

Resumable: LitData's ``use_checkpoint`` keeps what an interrupted split had written; a re-run
continues it. A split already packed and verified is skipped. Each split is verified after
writing: counts and labels read back from the written dataset, and every chunk hashed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

MANIFEST = "vitlab_pack.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_item(sample: tuple[str, int, int]) -> dict:
    path, label, index = sample
    with open(path, "rb") as f:
        return {"index": index, "label": label, "jpeg": f.read()}


def chunk_files(split_dir: Path) -> list[str]:
    index = json.loads((split_dir / "index.json").read_text())
    return [c["filename"] for c in index["chunks"]]


def verify_split(split_dir: Path, samples: list[tuple[str, int]]) -> dict:
    """Read the written split back: count, every index once with its label; hash every chunk."""
    from litdata import StreamingDataset

    ds = StreamingDataset(str(split_dir))
    if len(ds) != len(samples):
        raise SystemExit(f"{split_dir}: {len(ds)} items written, {len(samples)} images in the folder")
    seen = [False] * len(samples)
    for k in range(len(ds)):
        item = ds[k]
        i = int(item["index"])
        if seen[i] or int(item["label"]) != samples[i][1]:
            raise SystemExit(f"{split_dir}: item {k} (image {i}) is duplicated or has the wrong label")
        seen[i] = True
    counts = [0] * (max((s[1] for s in samples), default=-1) + 1)
    for _, label in samples:
        counts[label] += 1
    return {"images": len(samples), "label_counts": counts,
            "chunks": {name: sha256(split_dir / name) for name in chunk_files(split_dir)}}


def pack_imagenet(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1) -> dict:
    from litdata import optimize
    from torchvision.datasets import ImageFolder

    from vitlab.data.folder_layout import has_image_suffix, read_synset_names

    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if manifest and manifest.get("classes") != wnids:
        raise SystemExit(f"{out}: already holds a packed dataset of other classes; use another --out")
    manifest.update(kind="imagenet", classes=wnids, class_names=read_synset_names(root, wnids),
                    splits=manifest.get("splits", {}))
    for split in ("train", "val"):
        folder = ImageFolder(str(root / split), is_valid_file=has_image_suffix)
        if folder.classes != wnids:
            raise SystemExit(f"{root / split}: class folders differ from train/'s")
        samples = folder.samples
        split_dir = out / split
        if split in manifest["splits"] and manifest["splits"][split]["images"] == len(samples):
            print(f"{split}: already packed ({len(samples)} images), skipped")
            continue
        if split_dir.exists() and not (split_dir / ".checkpoints").exists():
            shutil.rmtree(split_dir)  # a finished split of another run: written anew
        # fork (where there is one): the workers start without importing torch again
        optimize(_read_item, [(p, y, i) for i, (p, y) in enumerate(samples)], str(split_dir),
                 chunk_bytes=shard_size, num_workers=workers, use_checkpoint=True, reorder_files=False,
                 start_method="fork" if "fork" in mp.get_all_start_methods() else None)
        manifest["splits"][split] = verify_split(split_dir, samples)
        manifest_path.write_text(json.dumps(manifest, indent=1))
        print(f"{split}: {len(samples)} images in {len(manifest['splits'][split]['chunks'])} chunks, verified")
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.data.pack", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("kind", choices=["imagenet"])
    p.add_argument("--root", required=True, help="the dataset in its folder layout (<root>/train, <root>/val)")
    p.add_argument("--out", required=True, help="where the packed dataset goes (a directory)")
    p.add_argument("--shard-size", default="256MB", help="bytes per chunk file (LitData's chunk_bytes)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1) - 1)))
    args = p.parse_args(argv)
    pack_imagenet(args.root, args.out, args.shard_size, args.workers)


if __name__ == "__main__":
    main()
