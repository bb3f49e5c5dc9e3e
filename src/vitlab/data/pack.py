"""Pack a dataset's on-disk layout into LitData's sharded streaming format, once.

    python -m vitlab.data.pack imagenet --root data/imagenet --out data/imagenet_litdata [--shard-size 256MB]
    python -m vitlab.data.pack coco --root data/coco --out data/coco_litdata
    python -m vitlab.data.pack ade20k --root data/ade20k/ADEChallengeData2016 --out data/ade20k_litdata

Writes one LitData dataset per split (``index.json`` + chunk files of about ``--shard-size``) and
``<out>/vitlab_pack.json``: the dataset kind, what describes it (ImageNet: the class folders and
names; COCO: the categories), per split the item count and a SHA-256 per chunk, and the files kept
beside the chunks with their sizes and hashes. Image bytes are the original files' (not re-encoded:
the same pixels, the same augmentation). Items:

- imagenet (``train``, ``val``): the JPEG bytes, the label, the image's index in the folder listing;
- coco (``train2017``, ``val2017``): the JPEG bytes, the image's ``images`` entry (id, file name,
  width, height) and its annotations as the folder reader uses them (boxes, categories, iscrowd,
  area, polygons / RLE, after its checks: ``--clip-boxes`` / ``--skip-corrupt`` as
  ``data.clip_boxes`` / ``data.skip_corrupt``). Beside the chunks: ``<split>/images.json`` (per
  item: image id, width, height, annotations a training step learns from; the reader's image
  filter and aspect-ratio groups without reading a chunk) and the val JSON as given,
  ``annotations/instances_val2017.json`` (the ground-truth file pycocotools' evaluation reads);
- ade20k (``training``, ``validation``): the image bytes, the label PNG's bytes, the file stem.

Read with ``data.format=litdata data.root=<out>`` (``vitlab.data.streaming``). Local directories
here; LitData reads the same layout from ``s3://``, ``gs://`` or ``azure://`` URLs (credentials from
the usual environment).

LitData rather than WebDataset: it is Lightning's own format, reads items by index (so the
existing resumable sampler and the exact distributed split keep working unchanged: each process
reads its disjoint share, resume restores the sampler's position), and it streams chunks from
object storage into a bounded local cache; WebDataset's tar shards are read sequentially only,
which leaves exact mid-epoch resume and disjoint DDP shares to hand-written code.

Resumable: LitData's ``use_checkpoint`` keeps what an interrupted split had written; a re-run
continues it. A split already packed and verified is skipped. Each split is verified after
writing: every item read back once and checked against its source (label, image id and
annotation count, file stem), and every chunk hashed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Callable

MANIFEST = "vitlab_pack.json"


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
    if manifest and (manifest.get("kind") != kind or any(manifest.get(k) != v for k, v in identity.items())):
        raise SystemExit(f"{out}: already holds another packed dataset ({manifest.get('kind')}); use another --out")
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


def pack_split(out: Path, manifest: dict, split: str, inputs: list, read_item: Callable, check_item: Callable,
               shard_size: str, workers: int, beside: Callable[[list[int]], dict[str, bytes]] | None = None,
               **summary) -> None:
    """Write ``read_item(input)`` for every input into ``out/split`` (resumable), verify it, keep
    ``beside(order)``'s files next to its chunks and record the split in the manifest."""
    from litdata import optimize

    split_dir = out / split
    if manifest["splits"].get(split, {}).get("images") == len(inputs):
        print(f"{split}: already packed ({len(inputs)} items), skipped")
        return
    if split_dir.exists() and not (split_dir / ".checkpoints").exists():
        shutil.rmtree(split_dir)  # a finished split of another run: written anew
    # fork (where there is one): the workers start without importing torch again
    optimize(read_item, inputs, str(split_dir), chunk_bytes=shard_size, num_workers=workers, use_checkpoint=True,
             reorder_files=False, start_method="fork" if "fork" in mp.get_all_start_methods() else None)
    chunks, order = verify_split(split_dir, len(inputs), check_item)
    for name, data in (beside(order) if beside else {}).items():
        keep_file(out, manifest, f"{split}/{name}", data)
    manifest["splits"][split] = {"images": len(inputs), **summary, "chunks": chunks}
    save_manifest(out, manifest)
    print(f"{split}: {len(inputs)} items in {len(chunks)} chunks, verified")


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---- ImageNet ---------------------------------------------------------------------------------

def _imagenet_item(sample: tuple[str, int, int]) -> dict:
    path, label, index = sample
    return {"index": index, "label": label, "jpeg": _read(path)}


def pack_imagenet(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1) -> dict:
    from torchvision.datasets import ImageFolder

    from vitlab.data.folder_layout import has_image_suffix, read_synset_names

    root, out = Path(root), Path(out)
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    manifest = open_manifest(out, "imagenet", classes=wnids)
    manifest["class_names"] = read_synset_names(root, wnids)
    for split in ("train", "val"):
        folder = ImageFolder(str(root / split), is_valid_file=has_image_suffix)
        if folder.classes != wnids:
            raise SystemExit(f"{root / split}: class folders differ from train/'s")
        samples = folder.samples
        counts = [0] * len(wnids)
        for _, label in samples:
            counts[label] += 1
        pack_split(out, manifest, split, [(p, y, i) for i, (p, y) in enumerate(samples)], _imagenet_item,
                   lambda i, item: None if int(item["label"]) == samples[i][1] else "wrong label",
                   shard_size, workers, label_counts=counts)
    return manifest


# ---- COCO -------------------------------------------------------------------------------------

COCO_SPLITS = ("train2017", "val2017")


def _coco_item(source: tuple[int, str, dict, list[dict]]) -> dict:
    index, path, info, anns = source
    return {"index": index, "image_id": info["id"], "file_name": info["file_name"], "width": info["width"],
            "height": info["height"], "jpeg": _read(path), "annotations": json.dumps(anns)}


def pack_coco(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1,
              clip_boxes: bool = False, skip_corrupt: bool = False) -> dict:
    """Each split's images in image-id order, with their annotations as ``CocoDetectionDataset`` reads
    them (its checks, with these options); the val JSON kept as given."""
    from vitlab.data.coco import CocoDetectionDataset, learnable

    root, out = Path(root), Path(out)
    sets = {}
    for split in COCO_SPLITS:
        ann_file, image_dir = root / "annotations" / f"instances_{split}.json", root / split
        if not ann_file.is_file() or not image_dir.is_dir():
            raise SystemExit(f"COCO not found: {ann_file} and {image_dir}/ are expected")
        sets[split] = CocoDetectionDataset(image_dir, ann_file, None, train=False, with_masks=False,
                                           clip_boxes=clip_boxes, skip_corrupt=skip_corrupt)
    categories = [[c["id"], c.get("name", str(c["id"]))] for c in sorted(sets["val2017"].coco.dataset["categories"],
                                                                          key=lambda c: c["id"])]
    if sets["train2017"].category_ids != sets["val2017"].category_ids:
        raise SystemExit(f"{root / 'annotations'}: the train and val JSON list different categories")
    manifest = open_manifest(out, "coco", categories=categories)
    manifest["options"] = {"clip_boxes": clip_boxes, "skip_corrupt": skip_corrupt}
    for split, ds in sets.items():
        sources, table, missing = [], [], 0
        for k, image_id in enumerate(ds.ids):
            info, anns = ds.coco.imgs[image_id], ds.coco.imgToAnns.get(image_id, [])
            path = ds.image_dir / info["file_name"]
            if not path.is_file():
                raise SystemExit(f"{path}: listed in {ds.ann_file.name} (image id {image_id}) but not on disk")
            sources.append((k, str(path), info, anns))
            table.append([image_id, info["width"], info["height"], sum(learnable(a) for a in anns)])
            missing += sum("segmentation" not in a for a in anns)

        def check(i, item, sources=sources):
            _, _, info, anns = sources[i]
            same = int(item["image_id"]) == info["id"] and len(json.loads(item["annotations"])) == len(anns)
            return None if same else "image id or annotation count differs from the JSON"

        def beside(order, table=table):
            rows = [table[i] for i in order]
            return {"images.json": json.dumps({"columns": ["image_id", "width", "height", "learnable"],
                                               "rows": rows}, separators=(",", ":")).encode()}

        pack_split(out, manifest, split, sources, _coco_item, check, shard_size, workers, beside,
                   annotations=sum(len(s[3]) for s in sources), without_segmentation=missing)
    keep_file(out, manifest, "annotations/instances_val2017.json",
              (root / "annotations" / "instances_val2017.json").read_bytes())
    save_manifest(out, manifest)
    return manifest


# ---- ADE20K -----------------------------------------------------------------------------------

ADE20K_SPLITS = ("training", "validation")


def _ade20k_item(source: tuple[int, str, str]) -> dict:
    index, image, label = source
    return {"index": index, "name": Path(image).stem, "image": _read(image), "label": _read(label)}


def pack_ade20k(root: str | Path, out: str | Path, shard_size: str = "256MB", workers: int = 1,
                skip_corrupt: bool = False) -> dict:
    """Each split's image / label-map pairs in file-name order, as ``ADE20KDataset`` lists them
    (``--root``: ADEChallengeData2016 or the folder holding it)."""
    from vitlab.data.ade20k import ADE20KDataset

    root, out = Path(root), Path(out)
    base = root / "ADEChallengeData2016" if (root / "ADEChallengeData2016").is_dir() else root
    manifest = open_manifest(out, "ade20k")
    for split in ADE20K_SPLITS:
        if not (base / "images" / split).is_dir() or not (base / "annotations" / split).is_dir():
            raise SystemExit(f"ADE20K not found: {base}/images/{split} and {base}/annotations/{split} are expected")
        ds = ADE20KDataset(base, split, None, train=False, skip_corrupt=skip_corrupt)
        sources = [(k, str(p), str(ds.label_dir / f"{p.stem}.png")) for k, p in enumerate(ds.images)]
        pack_split(out, manifest, split, sources, _ade20k_item,
                   lambda i, item, s=sources: None if item["name"] == Path(s[i][1]).stem else "another image",
                   shard_size, workers)
    return manifest


PACKERS = {"imagenet": pack_imagenet, "coco": pack_coco, "ade20k": pack_ade20k}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.data.pack", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("kind", choices=list(PACKERS))
    p.add_argument("--root", required=True, help="the dataset in its own layout (as data.root reads it)")
    p.add_argument("--out", required=True, help="where the packed dataset goes (a directory)")
    p.add_argument("--shard-size", default="256MB", help="bytes per chunk file (LitData's chunk_bytes)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1) - 1)))
    p.add_argument("--clip-boxes", action="store_true", help="coco: clip boxes that leave their image (data.clip_boxes)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="coco, ade20k: leave out bad annotations / images without a label map (data.skip_corrupt)")
    args = p.parse_args(argv)
    options = {"coco": {"clip_boxes": args.clip_boxes, "skip_corrupt": args.skip_corrupt},
               "ade20k": {"skip_corrupt": args.skip_corrupt}}.get(args.kind, {})
    if args.kind == "imagenet" and (args.clip_boxes or args.skip_corrupt):
        p.error("--clip-boxes and --skip-corrupt are for coco / ade20k")
    PACKERS[args.kind](args.root, args.out, args.shard_size, args.workers, **options)


if __name__ == "__main__":
    main()
