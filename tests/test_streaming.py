"""data.format=litdata: python -m vitlab.data.pack, the packed reader against the folder reader,
bad shards, the DDP split over 2 gloo processes and mid-epoch resume of the training loader."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import call_in_children
from vitlab.data.base import CorruptImageError
from vitlab.data.imagenet import ImageNetDataModule
from vitlab.data.synthetic import make_imagenet


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    from vitlab.data.pack import main

    base = tmp_path_factory.mktemp("pack")
    folder = make_imagenet(base / "folder", num_classes=3, num_train=6, num_val=3, size=48)
    main(["imagenet", "--root", str(folder), "--out", str(base / "packed"), "--shard-size", "16KB", "--workers", "1"])
    return folder, base / "packed"


@pytest.fixture(scope="module")
def packed_shuffled(packed) -> Path:
    """The same generated ImageNet packed with ``--order shuffled`` (for ``data.shuffle=block``)."""
    from vitlab.data.pack import main

    folder, out = packed
    shuffled = out.parent / "shuffled"
    main(["imagenet", "--root", str(folder), "--out", str(shuffled), "--shard-size", "16KB", "--workers", "1",
          "--order", "shuffled"])
    return shuffled


def module(root, fmt, **kw) -> ImageNetDataModule:
    dm = ImageNetDataModule(str(root), num_workers=0, batch_size=3, img_size=32, format=fmt, **kw)
    dm.setup("fit")
    return dm


def checksum(img) -> torch.Tensor:  # an image's identity (the generated images are random noise)
    a = np.asarray(img, dtype=np.int64)
    return torch.tensor(int((a * np.arange(1, a.size + 1).reshape(a.shape)).sum() % (2**61)))


def test_pack_verifies_and_reads_as_the_folder(packed):
    """Counts, labels and shard hashes in the manifest; every item equal to the folder's image
    (pixels, label); the same DatasetInfo and, under the same seeds, the same augmented samples."""
    from torchvision.datasets import ImageFolder

    folder, out = packed
    manifest = json.loads((out / "vitlab_pack.json").read_text())
    assert manifest["splits"]["train"]["images"] == 18 and manifest["splits"]["train"]["label_counts"] == [6, 6, 6]
    assert len(manifest["splits"]["train"]["chunks"]) > 1  # several shards at 16 KB
    ref = ImageFolder(str(folder / "train"))
    fd, ld = module(folder, "folder"), module(out, "litdata")
    assert fd.info == ld.info
    for i in range(len(ref)):
        img, label = ld.train_set.stream[i]["jpeg"], ld.train_set.stream[i]["label"]
        assert label == ref.samples[i][1]
        assert bytes(img) == Path(ref.samples[i][0]).read_bytes()  # the original file, not re-encoded
    for i in (0, 7, 17):
        for dm in (fd, ld):
            torch.manual_seed(i), np.random.seed(i)
            random.seed(i)
            dm.sample = dm.train_set[i]
        assert torch.equal(fd.sample[0], ld.sample[0]) and fd.sample[1] == ld.sample[1]
    assert fd.val_set[4][0].equal(ld.val_set[4][0])


def test_chunk_reader_equals_litdata(packed):
    """The packed reader's own chunk reading (ChunkFiles): every item's JPEG bytes and label equal to
    LitData's reader's; a layout other than pack's (here: compressed) is left to LitData."""
    from litdata import StreamingDataset

    from vitlab.data.streaming import PackedImages, packed_fields

    _, out = packed
    for split in ("train", "val"):
        ours, theirs = PackedImages(out / split), StreamingDataset(str(out / split))
        assert ours.chunks is not None and len(ours) == len(theirs)
        for i in range(len(theirs)):
            jpeg, label = ours.read(i)
            assert bytes(jpeg) == theirs[i]["jpeg"] and label == theirs[i]["label"]
    index = json.loads((out / "train" / "index.json").read_text())
    assert packed_fields(index) == [("index", "int"), ("label", "int"), ("jpeg", "bytes")]
    index["config"]["compression"] = "zstd"
    assert packed_fields(index) is None


@pytest.mark.parametrize("damage", ["offsets zeroed", "offsets swapped", "item count", "past the end"])
def test_damaged_chunk_header_named_not_skipped(packed, tmp_path, damage):
    """A chunk whose header disagrees with index.json or the file (the reader would otherwise hand
    out other bytes or an empty item) stops with the chunk's name, also under data.skip_corrupt."""
    import struct

    from vitlab.data.streaming import PackedImages, ShardError

    _, out = packed
    split = tmp_path / "train"
    shutil.copytree(out / "train", split)
    chunk = sorted(split.glob("*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    n = struct.unpack_from("<I", data)[0]
    assert n >= 2
    offsets = list(struct.unpack_from(f"<{n + 1}I", data, 4))
    if damage == "offsets zeroed":  # the tail of the offset table read as zeros
        offsets[1:] = [0] * n
    elif damage == "offsets swapped":
        offsets[0], offsets[1] = offsets[1], offsets[0]
    elif damage == "item count":
        struct.pack_into("<I", data, 0, n + 1)
    else:
        offsets[-1] = len(data) + 1
    struct.pack_into(f"<{n + 1}I", data, 4, *offsets)
    chunk.write_bytes(data)
    for skip_corrupt in (False, True):
        items = PackedImages(split, skip_corrupt=skip_corrupt)
        assert items.chunks is not None
        with pytest.raises(ShardError, match=f"{chunk.name}: the chunk's header does not match index.json's {n} items"):
            items[0]


def test_a_chunk_of_thousands_of_items_reads_back_through_workers_from_a_cold_cache(tmp_path):
    """A chunk as ImageNet's hold (~2,300 items; the H200 run's had 2,048 and stopped on an empty
    item): its offset table spans pages (1,300 items: 5.2 KB), read by two loader workers after its
    pages are dropped from the cache; every item's bytes and label equal the folder's file."""
    from vitlab.data.pack import main
    from vitlab.data.streaming import PackedImages
    from vitlab.data.throughput import dataset_files, evict

    folder = make_imagenet(tmp_path / "folder", num_classes=2, num_train=650, num_val=1, size=8)
    main(["imagenet", "--root", str(folder), "--out", str(tmp_path / "packed"), "--workers", "1", "--order", "shuffled"])
    chunks = dataset_files(tmp_path / "packed", "litdata")
    assert len(chunks) == 1
    files = sorted((folder / "train").rglob("*.JPEG"))
    by_bytes = {f.read_bytes(): int(f.parent.name != files[0].parent.name) for f in files}
    assert len(by_bytes) == 1300  # every file's bytes its own (noise backgrounds)
    items = PackedImages(tmp_path / "packed" / "train", raw=True)
    assert len(items) == 1300 and items.chunks is not None
    evict(chunks)
    loader = torch.utils.data.DataLoader(items, batch_size=50, num_workers=2, collate_fn=list)
    seen = [(bytes(jpeg.numpy()), label) for batch in loader for jpeg, label in batch]
    assert len(seen) == 1300 and dict(seen) == by_bytes  # each file once, with its folder's label


def test_more_chunks_than_open_files_close_the_least_recently_used(packed, monkeypatch):
    """A dataset of more chunks than a process may keep open (ImageNet-21k: ~5,000 at 256 MB) reads
    on with at most that many open, the least recently used closed; every item as LitData reads it."""
    import random as random_

    from litdata import StreamingDataset

    from vitlab.data import streaming

    _, out = packed
    monkeypatch.setattr(streaming, "open_files_limit", lambda needed: 1)
    items, theirs = streaming.PackedImages(out / "train"), StreamingDataset(str(out / "train"))
    assert len(items.chunks.paths) >= 2
    order = list(range(len(items))) * 2
    random_.Random(0).shuffle(order)
    before, read = len(os.listdir("/proc/self/fd")), []
    for i in order:  # ours alone first: LitData's reader below opens the chunks too
        jpeg, label = items.read(i)
        read.append((bytes(jpeg), label))
        assert len(items.chunks._open) <= 1
    assert len(os.listdir("/proc/self/fd")) <= before + 1  # the others were closed
    assert read == [(theirs[i]["jpeg"], theirs[i]["label"]) for i in order]


def test_open_files_limit_raises_the_soft_limit_towards_the_hard_one():
    import resource

    from vitlab.data.streaming import FILES_KEPT_FREE, open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * FILES_KEPT_FREE + 100:
        pytest.skip(f"the hard limit on open files ({hard}) is too low to test raising towards it")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FILES_KEPT_FREE + 10, hard))
        assert open_files_limit(100) == 100  # raised: 100 chunks and the files kept free fit
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 100 + FILES_KEPT_FREE
        if hard != resource.RLIM_INFINITY:  # more chunks than the hard limit allows: what it leaves
            assert open_files_limit(hard) == hard - FILES_KEPT_FREE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_gpu_decode_loader_with_a_worker_hands_over_the_files(packed, monkeypatch):
    """data.gpu_decode on the packed format through a loader worker (batches built in shared memory):
    an epoch's bytes are the folder's files, each once."""
    from torchvision.datasets import ImageFolder

    from vitlab.data import gpu_decode

    parts = [torch.arange(5, dtype=torch.uint8), torch.arange(3, dtype=torch.uint8)]
    assert not gpu_decode.collate_bytes([(p, 0) for p in parts]).images.data.is_shared()
    monkeypatch.setattr(gpu_decode, "get_worker_info", lambda: type("Info", (), {"id": 0})())  # as in loader worker 0
    in_worker = gpu_decode.collate_bytes([(p, 0) for p in parts]).images
    assert in_worker.data.is_shared() and in_worker.data.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    monkeypatch.undo()
    folder, out = packed
    dm = ImageNetDataModule(str(out), num_workers=1, batch_size=3, img_size=32, format="litdata", gpu_decode=True,
                            auto_augment=None, color_jitter=0)
    dm.setup("fit")
    got = []
    for batch in dm.train_dataloader():
        got += [bytes(t.numpy()) for t in batch.images.split()]
    assert sorted(got) == sorted(Path(p).read_bytes() for p, _ in ImageFolder(str(folder / "train")).samples)


def test_a_url_where_a_directory_is_read_says_what_to_do():
    """The folder layout and the checks of a local pack read directories: a URL there names the
    packed bucket (data.format=litdata, tests/test_remote.py) or a mount."""
    from vitlab.data.base import DatasetLayoutError
    from vitlab.data.streaming import check_packed

    expected = r"data.root=s3://bucket/imagenet: a URL; only a packed dataset.*data.format=litdata.*mount the bucket"
    with pytest.raises(DatasetLayoutError, match=expected):
        check_packed("s3://bucket/imagenet", "imagenet")
    with pytest.raises(DatasetLayoutError, match=expected):
        ImageNetDataModule("s3://bucket/imagenet", format="folder").setup("fit")


def test_bad_shards_named(packed, tmp_path):
    from vitlab.data.streaming import ShardError, check_packed

    _, out = packed
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = sorted((bad / "train").glob("*.bin"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=shard.name + ".*truncated"):
        module(bad, "litdata")
    shard.write_bytes(data.replace(b"\xff\xd8\xff", b"\x00\x00\x00", 1))  # same size, one JPEG broken
    with pytest.raises(ShardError, match=shard.name + ".*SHA-256"):
        check_packed(bad, "imagenet", full=True)
    dm = module(bad, "litdata")  # the cheap check passes; the broken image names its item ...
    broken = next(i for i in range(len(dm.train_set)) if _fails(dm.train_set, i))
    with pytest.raises(CorruptImageError, match=f"train item {broken}.*skip_corrupt"):
        dm.train_set[broken]
    assert module(bad, "litdata", skip_corrupt=True).train_set[broken] is None  # ... or is skipped
    (bad / "val" / "index.json").unlink()
    with pytest.raises(ShardError, match="val/index.json is missing"):
        module(bad, "litdata")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = json.loads((other / "vitlab_pack.json").read_text())
    manifest["kind"] = "coco"
    (other / "vitlab_pack.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="'coco' dataset, expected 'imagenet'"):
        module(other, "litdata")
    with pytest.raises(ShardError, match="vitlab_pack.json is missing"):
        module(tmp_path, "litdata")


def _fails(dataset, i) -> bool:
    try:
        dataset[i]
    except CorruptImageError:
        return True
    return False


def _ranks_ids(rank: int, world: int, port: int, root: str, shuffle: str) -> tuple[list[int], list[int]]:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dm = ImageNetDataModule(root, num_workers=0, batch_size=3, img_size=32, format="litdata", shuffle=shuffle,
                            shuffle_window=2)
    dm.world = lambda: (world, rank)
    dm.setup("fit")
    dm.train_set.transform = dm.val_set.transform = checksum
    train = [int(v) for b in dm.train_dataloader() for v in b.images]
    val = [int(v) for b in dm.val_dataloader() for v in b.images]
    dist.destroy_process_group()
    return train, val


@pytest.mark.parametrize("shuffle", ["uniform", "block"])
def test_ddp_two_processes_read_disjoint_complete_shares(shuffle, packed, packed_shuffled):
    import socket

    from vitlab.data.streaming import PackedImages

    out = packed_shuffled if shuffle == "block" else packed[1]
    epoch = {split: sorted(int(checksum(PackedImages(out / split)[i][0])) for i in range(n))
             for split, n in (("train", 18), ("val", 9))}
    assert all(len(set(v)) == len(v) for v in epoch.values())  # the checksums identify the images
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = call_in_children(_ranks_ids, [(rank, 2, port, str(out), shuffle) for rank in (0, 1)])  # two processes at once
    for k, split in enumerate(("train", "val")):
        shares = [got[0][k], got[1][k]]
        assert sorted(shares[0] + shares[1]) == epoch[split]  # the epoch, each image once
        assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])


@pytest.mark.parametrize("shuffle", ["uniform", "block"])
def test_training_loader_resumes_mid_epoch_exactly(shuffle, packed, packed_shuffled):
    """The training loader's state after 2 batches, loaded into a new loader (as a re-run restores
    it from last.ckpt): the rest of the epoch is exactly the uninterrupted run's, in either order."""
    out = packed_shuffled if shuffle == "block" else packed[1]
    assert_resumes_exactly(lambda: module(out, "litdata", shuffle=shuffle, shuffle_window=2))


def assert_resumes_exactly(make_module) -> None:
    """An epoch of ``make_module()``'s training loader equals 2 batches of it, then the rest from a new
    module's loader given the first's state (18 images, batches of 3)."""
    dm = make_module()
    dm.train_set.transform = checksum
    straight = [b.images.tolist() for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    it = iter(loader)
    seen = [next(it).images.tolist() for _ in range(2)]
    state = loader.state_dict()
    again = make_module()
    again.train_set.transform = checksum
    resumed = again.train_dataloader()
    resumed.load_state_dict(state)
    assert seen + [b.images.tolist() for b in resumed] == straight and len(straight) == 6


def test_block_order_reads_a_few_chunks_at_a_time():
    """data.shuffle=block's sampler: each epoch every item once, chunks in a random order, the items
    of ``window`` chunks at a time shuffled among themselves; another order each epoch, the same for
    the same epoch (what exact resume needs); under DDP each process a contiguous run of the padded
    order (its own windows), the processes together the whole epoch."""
    from vitlab.data.base import BlockShuffleSampler

    blocks = [10] * 10 + [3]
    dataset = list(range(sum(blocks)))
    chunk_of = np.repeat(np.arange(len(blocks)), blocks)
    sampler = BlockShuffleSampler(dataset, blocks, window=3, seed=5)
    order = list(sampler)
    assert sorted(order) == dataset and order != dataset
    at = 0
    for _ in range(0, len(blocks), 3):  # a window: whole chunks, at most 3 of them
        chunks = set(chunk_of[order[at]:order[at] + 1])
        size = 0
        while size < 30 and at + size < len(order) and len(chunks | {chunk_of[order[at + size]]}) <= 3:
            chunks.add(chunk_of[order[at + size]])
            size += 1
        assert size == sum(blocks[c] for c in chunks) and len(chunks) <= 3
        at += size
    assert at == len(order)
    assert list(BlockShuffleSampler(dataset, blocks, window=3, seed=5)) == order  # a re-run's epoch 0
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == dataset
    for world in (2, 3):
        shares = [list(BlockShuffleSampler(dataset, blocks, 3, num_replicas=world, rank=r, seed=5)) for r in range(world)]
        assert sum(shares, []) == list(np.resize(order, len(shares[0]) * world))  # contiguous runs, padded
        assert set(sum(shares, [])) == set(dataset) and len({len(s) for s in shares}) == 1


def test_shuffled_pack_and_the_block_order_through_the_data_module(packed, packed_shuffled, monkeypatch, tmp_path):
    """``--order shuffled``: the training split holds the folder's files, each once, in another order,
    labels kept; val stays in the folders' order. data.shuffle=block reads it (each chunk's file read
    ahead when first opened), and says what to do with a pack in the folders' order or no pack."""
    import os

    from torchvision.datasets import ImageFolder

    from vitlab.data.base import DatasetLayoutError
    from vitlab.data.pack import main

    folder, out = packed
    assert json.loads((packed_shuffled / "vitlab_pack.json").read_text())["order"] == "shuffled"
    ref = ImageFolder(str(folder / "train"))
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: advised.append((start, length, advice)))
    dm = module(packed_shuffled, "litdata", shuffle="block", shuffle_window=2)
    assert sum(len(b.targets) for b in dm.train_dataloader()) == 18
    assert advised == [(0, 0, os.POSIX_FADV_WILLNEED)] * len(dm.train_set.block_sizes)  # each chunk's file, once
    items = [dm.train_set.read(i) for i in range(len(dm.train_set))]
    files = {Path(p).read_bytes(): label for p, label in ref.samples}
    assert sorted(bytes(j) for j, _ in items) == sorted(files) and all(files[bytes(j)] == y for j, y in items)
    assert [bytes(j) for j, _ in items] != [Path(p).read_bytes() for p, _ in ref.samples]
    assert dm.val_set[4][0].equal(module(out, "litdata").val_set[4][0])
    with pytest.raises(DatasetLayoutError, match=f"{out} was packed in the folders' order.*--order shuffled"):
        module(out, "litdata", shuffle="block")
    with pytest.raises(ValueError, match="data.shuffle=block .* needs data.format=litdata"):
        module(folder, "folder", shuffle="block")
    with pytest.raises(SystemExit, match="already holds a packed imagenet with another order"):
        main(["imagenet", "--root", str(folder), "--out", str(out), "--order", "shuffled", "--workers", "1"])


def test_format_bench_tiny(tmp_path, capsys):
    """python -m vitlab.tools.bench --loader imagenet --format folder litdata, tiny: every (cache, format,
    workers) row with images per wall- and CPU-second, the packed copy made once beside the folder."""
    from vitlab.tools.bench.cli import main

    main(["--loader", "imagenet", "--format", "folder", "litdata", "litdata-block", "--workers", "1", "--images", "4",
          "--dataset-images", "8", "--image-size", "48", "36", "--data-dir", str(tmp_path), "--gpu-decode",
          "--model", "pvt_v2_b0", "--input", "32", "32", "--batch", "1", "--steps", "1", "--warmup", "0",
          "--rounds", "1"])
    out = capsys.readouterr().out
    table, needed = out.split("\nmodel=pvt_v2_b0")
    rows = [line.split() for line in table.splitlines() if line.startswith(("deit ", "gpu_decode "))]
    assert len(rows) == 12  # 2 pipelines x 2 caches x 3 formats x 1 worker count
    assert {(r[0], r[1], r[2]) for r in rows} == {(p, c, f) for p in ("deit", "gpu_decode") for c in ("cold", "warm")
                                                 for f in ("folder", "litdata", "litdata-block")}
    assert all(int(r[4]) == 4 and float(r[5]) > 0 and float(r[6]) > 0 for r in rows)
    manifest = tmp_path / "bench" / "imagenet_48x36_8_litdata_shuffled" / "vitlab_pack.json"
    assert json.loads(manifest.read_text())["order"] == "shuffled"
    # --model: the model's training images/s here, and per pipeline, format and cache the workers that feed it
    model_ips = float(needed.split(": ")[1].split()[0])
    assert model_ips > 0 and "NOT A GPU FIGURE" in needed
    workers = [line.split() for line in needed.splitlines() if line.startswith(("deit ", "gpu_decode "))]
    per_cpu = {(r[0], r[1], r[2]): float(r[6]) for r in rows}
    assert len(workers) == 12
    for w in workers:  # ceil(model images/s / loader images per CPU-second), from the printed (rounded) figures
        need = model_ips / per_cpu[w[0], w[1], w[2]]
        assert need * 0.99 <= int(w[5]) < need * 1.01 + 1
    # --gpu-decode: the device part's images/s (here libjpeg on the CPU), and the device's rate doing both
    decode_ips = float(re.search(r"gpu_decode's device part on cpu \(.*\): ([\d.]+) images/s -- NOT A GPU", table)[1])
    both = float(re.search(r"trains and decodes: ([\d.]+) images/s", needed)[1])
    assert decode_ips > 0 and both == pytest.approx(1 / (1 / model_ips + 1 / decode_ips), rel=0.01)


def test_handover_costs_tiny(tmp_path, capsys):
    """--handover: a gpu_decode batch's steps per image (read, into shared memory, pickle + unpickle, the
    receiver's read) per format and way of handing over."""
    from vitlab.tools.bench.cli import main

    main(["--loader", "imagenet", "--format", "folder", "litdata", "--handover", "--images", "8", "--dataset-images",
          "8", "--image-size", "48", "36", "--data-dir", str(tmp_path)])
    rows = {tuple(line.split()[:3]): [float(v) for v in line.split()[3:]]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("folder ", "litdata "))}
    assert set(rows) == {(fmt, *way.split()) for fmt in ("folder", "litdata") for way in ("new block", "ring slot")}
    for *steps, total in rows.values():
        assert len(steps) == 4 and min(steps) > 0 and total == pytest.approx(sum(steps), abs=0.3)


def test_workers_needed_takes_the_most_workers_timed():
    from vitlab.data.throughput import FormatRow, workers_needed

    rows = [FormatRow("litdata", "deit", "warm", n, 100, wall, cpu) for n, wall, cpu in
            ((0, 1.0, 0.2), (1, 1.0, 0.5), (2, 1.0, 0.4))]  # 500, 200 and 250 images per CPU-second
    assert workers_needed(rows, 1000.0) == [("deit", "litdata", "warm", 2, 250.0, 4)]


def test_read_threads_read_a_batch_at_once_from_the_chunk_files(packed, packed_shuffled, monkeypatch):
    """data.read_threads: the loader's fetch of a batch reads its items from the chunk files by that
    many threads at once (each read waits at a barrier that opens only when all of them wait: one
    after another they would time out), every image and label as read alone; a batch over more
    chunks than the process keeps open, and the block order (each chunk read ahead whole), read one
    after another; a negative count is refused naming the option."""
    import threading

    from vitlab.data import streaming

    _, out = packed
    alone = streaming.PackedImages(out / "train", raw=True)
    batch = [0, 17, 5, 9, 3, 12]
    expected = [(bytes(alone[i][0].numpy()), alone[i][1]) for i in batch]
    items = streaming.PackedImages(out / "train", raw=True, read_threads=len(batch))
    assert len({items.chunks.locate(i)[0] for i in batch}) >= 2
    real, barrier = streaming.ChunkFiles.read_at, threading.Barrier(len(batch), timeout=30)

    def together(self, k, fd, start, end):
        if start >= 4 * (self.sizes[k] + 2):  # an item (not a chunk's header)
            barrier.wait()
        return real(self, k, fd, start, end)

    monkeypatch.setattr(streaming.ChunkFiles, "read_at", together)
    got = items.__getitems__(batch)
    assert [(bytes(g[0].numpy()), g[1]) for g in got] == expected
    monkeypatch.setattr(streaming.ChunkFiles, "read_at", real)
    items.chunks._max_open = 1  # the batch's chunks would not all stay open: no threads
    items.chunks._ready = {}
    assert items.__getitems__(batch) and items.chunks._ready == {}
    dm = module(packed_shuffled, "litdata", shuffle="block", read_threads=4)
    dm.train_set.__getitems__(batch)
    assert dm.train_set.chunks._pool is None and dm.train_set.chunks._ready == {}
    with pytest.raises(ValueError, match=r"data.read_threads=-1: expected a thread count >= 0"):
        module(out, "litdata", read_threads=-1)


@pytest.mark.parametrize("pipeline", ["deit", "fast_decode", "gpu_decode"])
def test_read_threads_read_a_batch_of_files_at_once(pipeline, packed, tmp_path, monkeypatch):
    """data.read_threads on the folder layout: a batch's files read by that many threads at once (a
    barrier that only all of them together pass), then each decoded from those bytes exactly as
    from its file (every pipeline's loader: the same samples under the same seed); a file that
    cannot be read is read by its loader, whose error names it."""
    import threading

    from vitlab.data import imagenet
    from vitlab.data.base import CorruptImageError

    folder, _ = packed
    kw = {"deit": {}, "fast_decode": {"fast_decode": True}, "gpu_decode": {"gpu_decode": True, "auto_augment": None,
                                                                        "color_jitter": 0}}[pipeline]
    alone, threaded = module(folder, "folder", **kw).train_set, module(folder, "folder", read_threads=4, **kw).train_set
    batch = [0, 7, 3, 11]

    def sample(ds, fetch):
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        return [(s[0].clone(), s[1]) for s in fetch(ds)]

    expected = sample(alone, lambda ds: [ds[i] for i in batch])
    real, barrier = imagenet.read_whole_file, threading.Barrier(len(batch), timeout=30)
    read = []

    def together(path):
        barrier.wait()
        read.append(path)
        return real(path)

    monkeypatch.setattr(imagenet, "read_whole_file", together)
    got = sample(threaded, lambda ds: ds.__getitems__(batch))
    assert sorted(read) == sorted(threaded.samples[i][0] for i in batch)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(expected, got))
    monkeypatch.setattr(imagenet, "read_whole_file", real)
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    threaded.samples = [(str(broken), 0)] + threaded.samples[1:]
    if pipeline != "gpu_decode":  # gpu_decode's workers read bytes only: the device decode names the item
        with pytest.raises(CorruptImageError, match=f"{broken}: cannot be decoded as an image"):
            threaded.__getitems__([0])


def _item_with_extra_field(k: int, folder: str) -> dict:
    files = sorted(Path(folder).rglob("*.JPEG"))
    return {"index": k, "label": k % 3, "jpeg": files[k].read_bytes(), "extra": {"source": files[k].name}}


def test_a_local_pack_in_another_layout_reads_through_litdata(packed, tmp_path):
    """A split whose items the chunk reader does not read (here a nested field, as another packer may
    write) is read through LitData's reader: the same JPEG bytes and labels as written, as images."""
    from functools import partial

    from litdata import optimize

    from vitlab.data.streaming import PackedImages, PackedSplit

    folder, _ = packed
    out = tmp_path / "other"
    optimize(partial(_item_with_extra_field, folder=str(folder)), list(range(5)), str(out), chunk_bytes="16KB",
             num_workers=1)
    items = PackedImages(out)
    assert items.chunks is None and len(items) == 5
    files = sorted(Path(folder).rglob("*.JPEG"))
    for k in range(5):
        jpeg, label = items.read(k)
        assert bytes(jpeg) == files[k].read_bytes() and label == k % 3
        assert items[k][0].size == Image.open(files[k]).size
    assert PackedSplit(out)[2]["extra"] == {"source": files[2].name}
