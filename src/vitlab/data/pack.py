"""Pack a dataset's on-disk layout into LitData's sharded streaming format, once.

    python -m vitlab.data.pack imagenet --root data/imagenet --out data/imagenet_litdata [--shard-size 256MB]
    python -m vitlab.data.pack coco --root data/coco --out data/coco_litdata
    python -m vitlab.data.pack ade20k --root data/ade20k/ADEChallengeData2016 --out data/ade20k_litdata

Writes one LitData dataset per split (``index.json`` + chunk files of about ``--shard-size``) and
``<out>/vitlab_pack.json``: the dataset kind, what describes it (ImageNet: the class folders and
names; COCO: the categories), per split the item count and a SHA-256 per chunk, and the files kept
beside the chunks with their sizes and hashes. Image bytes are the original files' (not re-encoded:
the same pixels, the same augmentation). Items:

- imagenet (``train``, ``val``): the JPEG bytes, the label, the image's index in the listing it was
  packed from: the folders' (ImageFolder's order), or with ``--order shuffled`` for ``train`` a fixed
  random permutation of it (seed 0), so that every chunk mixes classes (``data.shuffle=block`` reads
  a few chunks at a time);
- coco (``train2017``, ``val2017``): the JPEG bytes, the image's ``images`` entry (id, file name,
  width, height) and its annotations as the folder reader uses them (boxes, categories, iscrowd,
  area, polygons / RLE, after its checks: ``--clip-boxes`` / ``--skip-corrupt`` as
  ``data.clip_boxes`` / ``data.skip_corrupt``). Beside the chunks: ``<split>/images.json`` (per
  item: image id, width, height, annotations a training step learns from; the reader's image
  filter and aspect-ratio groups without reading a chunk) and the val JSON as given,
  ``annotations/instances_val2017.json`` (for pycocotools or the official tools to evaluate a results file against);
- ade20k (``training``, ``validation``): the image bytes, the label PNG's bytes, the file stem.

Read with ``data.format=litdata data.root=<out>`` (``vitlab.data.streaming``): a directory (local or
a bucket's file-system mount), or the packed directory uploaded whole to ``s3://bucket/prefix``
(``vitlab.data.remote``: each image read by a ranged GET, or in ``data.shuffle=block`` each chunk
downloaded whole into a local cache).

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
import importlib
import os

KINDS = ("imagenet", "coco", "ade20k")  # each packed by pack_<kind> of vitlab.data.<kind>, imported when used


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vitlab.data.pack", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--root", required=True, help="the dataset in its own layout (as data.root reads it)")
    p.add_argument("--out", required=True, help="where the packed dataset goes (a directory)")
    p.add_argument("--shard-size", default="256MB", help="bytes per chunk file (LitData's chunk_bytes)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1) - 1)))
    p.add_argument("--clip-boxes", action="store_true",
                   help="coco: clip boxes that leave their image (data.clip_boxes)")
    p.add_argument("--order", choices=("folder", "shuffled"), default="folder",
                   help="imagenet: the training split in the folders' order, or shuffled (for data.shuffle=block)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="coco, ade20k: leave out bad annotations / images without a label map (data.skip_corrupt)")
    args = p.parse_args(argv)
    options = {"coco": {"clip_boxes": args.clip_boxes, "skip_corrupt": args.skip_corrupt},
               "ade20k": {"skip_corrupt": args.skip_corrupt}, "imagenet": {"order": args.order}}[args.kind]
    if args.kind == "imagenet" and (args.clip_boxes or args.skip_corrupt):
        p.error("--clip-boxes and --skip-corrupt are for coco / ade20k")
    if args.kind != "imagenet" and args.order != "folder":
        p.error("--order is for imagenet (COCO's and ADE20K's training loaders sample by image groups)")
    packer = getattr(importlib.import_module(f"vitlab.data.{args.kind}"), f"pack_{args.kind}")
    packer(args.root, args.out, args.shard_size, args.workers, **options)


if __name__ == "__main__":
    main()
