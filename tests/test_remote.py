"""A packed dataset read from an S3 bucket (``data.root=s3://...``, vitlab.data.remote): moto's S3
server on this machine stands in for the bucket (boto3 and LitData's chunk reads reach it through
AWS_ENDPOINT_URL, as they reach MinIO or R2), so the real clients, listings and range reads run.
Every item equal to the local pack's; the epoch complete through forked loader workers; the shard
errors named by URL; COCO's ground truth and ADE20K's label maps through the local copy."""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

from support import local_s3
from vitlab.data.imagenet import ImageNetDataModule
from vitlab.data.streaming import PackedImages, ShardError

pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3():
    """A boto3 client of a local S3 server (``support.local_s3``) holding the bucket ``data``, its
    endpoint in the environment (for LitData's readers too, and for the processes a test starts)."""
    with local_s3() as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="data")
        yield client


def upload(folder: Path, prefix: str) -> str:
    """``aws s3 sync folder s3://data/prefix`` (the bench's upload of a generated pack)."""
    from vitlab.data.throughput import bucket_copy

    return bucket_copy(folder, f"s3://data/{prefix}")


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    from vitlab.data.pack import main
    from vitlab.data.synthetic import make_imagenet

    base = tmp_path_factory.mktemp("remote_pack")
    folder = make_imagenet(base / "folder", num_classes=3, num_train=6, num_val=3, size=48)
    main(["imagenet", "--root", str(folder), "--out", str(base / "packed"), "--shard-size", "16KB", "--workers", "1",
          "--order", "shuffled"])  # for data.shuffle=block
    return base / "packed"


def module(root, cache, **kw) -> ImageNetDataModule:
    dm = ImageNetDataModule(str(root), num_workers=0, batch_size=3, img_size=32, format="litdata",
                            cache_dir=str(cache), **kw)
    dm.setup("fit")
    return dm


def test_s3_pack_reads_as_the_local_pack(s3, packed, tmp_path, caplog):
    """Every item's bytes and label, the DatasetInfo and an evaluation sample equal the local pack's;
    only the small files are copied before training; the uniform order reads items in place: one
    ranged GET an item and one per chunk for its header (no chunk in the cache), and says the block
    order would not; a second run fetches no small file again (ETags unchanged)."""
    import logging

    import boto3

    url = upload(packed, "imagenet")
    local = module(packed, tmp_path / "unused")
    assert "two requests an image" not in caplog.text  # a local pack: nothing to say
    with caplog.at_level(logging.WARNING, logger="vitlab"):
        remote = module(url, tmp_path / "cache")
    assert "data.shuffle=uniform: each training image is fetched from the bucket alone" in caplog.text
    copy = tmp_path / "cache" / "packed" / "s3" / "data" / "imagenet"
    assert remote.data_root() == copy
    assert remote.packed_report(False).title.startswith(f"imagenet packed at {url} via its local copy {copy} (cheap")
    assert remote.info == local.info
    assert remote.train_set.chunks.in_place
    n = len(local.train_set)
    assert len(remote.train_set) == n == 18
    boto3.setup_default_session()  # the session the readers' clients come from, their GETs counted
    gets = []
    count = lambda params, **_: gets.append(params.get("Range"))  # noqa: E731
    boto3.DEFAULT_SESSION.events.register("before-parameter-build.s3.GetObject", count)
    try:
        for i in range(n):
            (jpeg, label), (ref, ref_label) = remote.train_set.read(i), local.train_set.read(i)
            assert bytes(jpeg) == bytes(ref) and label == ref_label
    finally:
        boto3.DEFAULT_SESSION.events.unregister("before-parameter-build.s3.GetObject", count)
    chunks = len(remote.train_set.block_sizes)
    assert chunks >= 2 and len(gets) == n + chunks and sum(g.startswith("bytes=0-") for g in gets) == chunks
    assert remote.val_set[2][0].equal(local.val_set[2][0])
    assert not list(copy.rglob("*.bin"))
    stamp = (copy / "vitlab_pack.json").stat().st_mtime_ns
    module(url, tmp_path / "cache")
    assert (copy / "vitlab_pack.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("shuffle", ["uniform", "block"])
def test_s3_epoch_through_forked_workers(shuffle, s3, packed, tmp_path):
    """A bucket read through two forked loader workers (the clients, request threads and downloads
    start in them, not in the parent): a complete epoch, every training image once (6 labels per
    class); the uniform order's batches read in place (no chunk in the cache), the block order's
    chunks downloaded whole beside the local copy's index.json."""
    url = upload(packed, f"imagenet_workers_{shuffle}")
    dm = ImageNetDataModule(url, num_workers=2, batch_size=2, img_size=32, format="litdata", cache_dir=str(tmp_path),
                            auto_augment=None, reprob=0, shuffle=shuffle, shuffle_window=1)
    dm.setup("fit")
    labels = torch.cat([batch[1] for batch in dm.train_dataloader()])
    assert labels.bincount().tolist() == [6, 6, 6]
    chunks = json.loads((packed / "vitlab_pack.json").read_text())["splits"]["train"]["chunks"]
    copy = tmp_path / "packed" / "s3" / "data" / f"imagenet_workers_{shuffle}"
    if shuffle == "uniform":
        assert not list(copy.rglob("*.bin"))
    for name in chunks if shuffle == "block" else ():  # each downloaded whole, beside the copy's index.json
        assert (copy / "train" / name).read_bytes() == (packed / "train" / name).read_bytes()


def test_s3_shard_errors_named_by_url(s3, packed, tmp_path):
    from vitlab.data.remote import RemoteError
    from vitlab.data.streaming import check_packed

    with pytest.raises(ShardError, match=r"s3://data/nothing/vitlab_pack.json is missing.*aws s3 sync"):
        module("s3://data/nothing", tmp_path)
    url = upload(packed, "bad")
    chunks = sorted(p.name for p in (packed / "train").glob("*.bin"))
    s3.delete_object(Bucket="data", Key=f"bad/train/{chunks[1]}")
    with pytest.raises(ShardError, match=rf"{url}/train/{chunks[1]}: shard is missing"):
        module(url, tmp_path)
    data = (packed / "train" / chunks[1]).read_bytes()
    s3.put_object(Bucket="data", Key=f"bad/train/{chunks[1]}", Body=data[: len(data) // 2])
    with pytest.raises(ShardError, match=rf"{url}/train/{chunks[1]}: shard is \d+ bytes.*truncated"):
        module(url, tmp_path)
    s3.put_object(Bucket="data", Key=f"bad/train/{chunks[1]}", Body=data.replace(b"\xff\xd8\xff", b"\0\0\0", 1))
    copy = module(url, tmp_path).data_root()  # same size: the cheap check passes, the full one hashes
    with pytest.raises(ShardError, match=rf"{url}/train/{chunks[1]}: shard's SHA-256 differs"):
        check_packed(copy, "imagenet", full=True)
    s3.delete_object(Bucket="data", Key="bad/val/index.json")
    with pytest.raises(ShardError, match=rf"{url}/val/index.json is missing"):
        module(url, tmp_path)
    with pytest.raises(Exception, match=r"data.root=gs://data/imagenet: .*s3://bucket/prefix.*mount the bucket"):
        module("gs://data/imagenet", tmp_path)
    with pytest.MonkeyPatch.context() as mp:  # nothing listens there: the error says where credentials come from
        mp.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), mp.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(RemoteError, match=r"data.root=s3://data/imagenet: cannot list the bucket.*AWS_ENDPOINT_URL"):
            module("s3://data/imagenet", tmp_path)


def test_s3_dense_packs(s3, tmp_path):
    """COCO and ADE20K: every item of the local pack, read from its chunks, equals LitData's reader's
    (every field); from a bucket every item equals the local one and every validation sample (image,
    targets / label map) the local pack's, one at a time and as the loader fetches a batch (its items
    requested at once); the files kept beside the chunks (COCO's tables and val JSON) are copied as
    packed."""
    from litdata import StreamingDataset

    from vitlab.data.ade20k import ADE20KDataModule
    from vitlab.data.coco import CocoDataModule
    from vitlab.data.pack import main
    from vitlab.data.streaming import PackedSplit
    from vitlab.data.synthetic_dense import make_ade20k, make_coco

    folders = {"coco": make_coco(tmp_path / "coco", num_train=4, num_val=3, size=48),
               "ade20k": make_ade20k(tmp_path / "ade20k", num_train=3, num_val=2, size=48) / "ADEChallengeData2016"}
    make = {"coco": lambda root: CocoDataModule(str(root), num_workers=0, format="litdata", with_masks=True, smoke=True,
                                                smoke_scale=48, smoke_images=99, cache_dir=str(tmp_path / "cache")),
            "ade20k": lambda root: ADE20KDataModule(str(root), num_workers=0, format="litdata", smoke=True,
                                                    smoke_scale=32, smoke_images=99, cache_dir=str(tmp_path / "cache"))}
    for kind, folder in folders.items():
        out = tmp_path / f"{kind}_packed"
        main([kind, "--root", str(folder), "--out", str(out), "--shard-size", "16KB", "--workers", "1"])
        local, remote = make[kind](out), make[kind](upload(out, kind))
        local.setup("fit"), remote.setup("fit")
        assert remote.info == local.info
        for split in json.loads((out / "vitlab_pack.json").read_text())["splits"]:
            ours, theirs, far = PackedSplit(out / split), StreamingDataset(str(out / split)), PackedSplit(
                remote.data_root() / split)
            assert ours.chunks is not None and far.chunks.in_place and len(ours) == len(theirs) == len(far) >= 2
            for i in range(len(theirs)):
                assert ours[i] == theirs[i] == far[i]
        for i in range(len(local.val_set)):
            torch.manual_seed(i)
            a = local.val_set[i]
            torch.manual_seed(i)
            b = remote.val_set[i]
            assert torch.equal(a[0], b[0]) and repr(a[1]) == repr(b[1])
        batch = remote.val_set.__getitems__(list(range(len(local.val_set))))
        for i, b in enumerate(batch):
            torch.manual_seed(i)
            a = local.val_set[i]
            assert torch.equal(a[0], b[0]) and repr(a[1]) == repr(b[1])
        manifest = json.loads((out / "vitlab_pack.json").read_text())
        for name in manifest.get("files", {}):  # COCO: images.json tables, the val JSON, copied as packed
            assert (remote.data_root() / name).read_bytes() == (out / name).read_bytes()
        assert str(tmp_path / "cache") in str(remote.data_root())
    assert "annotations/instances_val2017.json" in json.loads((tmp_path / "coco_packed" / "vitlab_pack.json")
                                                              .read_text())["files"]


@pytest.mark.parametrize("shuffle", ["uniform", "block"])
def test_s3_ddp_two_processes_read_disjoint_complete_shares(shuffle, s3, packed, tmp_path, monkeypatch):
    """Two gloo processes on one node, one bucket, one cache (both make the local copy at once): the
    union of their shares of the training and validation epochs is each epoch, every image once."""
    import socket

    from support import call_in_children
    from test_streaming import _ranks_ids, checksum
    from vitlab.data.streaming import PackedImages

    url = upload(packed, f"imagenet_ddp_{shuffle}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # data.cache_dir's default, for the children
    epoch = {split: sorted(int(checksum(PackedImages(packed / split)[i][0])) for i in range(n))
             for split, n in (("train", 18), ("val", 9))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    got = call_in_children(_ranks_ids, [(rank, 2, port, url, shuffle) for rank in (0, 1)])
    for k, split in enumerate(("train", "val")):
        shares = [got[0][k], got[1][k]]
        assert sorted(shares[0] + shares[1]) == epoch[split]
        assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert (tmp_path / "vitlab" / "packed" / "s3" / "data" / f"imagenet_ddp_{shuffle}" / "vitlab_remote.json").exists()


@pytest.mark.parametrize("shuffle", ["uniform", "block"])
def test_s3_training_loader_resumes_mid_epoch_exactly(shuffle, s3, packed, tmp_path):
    """The training loader's state after 2 batches, loaded into a new loader reading the bucket (as a
    re-run restores it from last.ckpt): the rest of the epoch is the uninterrupted run's."""
    from test_streaming import assert_resumes_exactly

    url = upload(packed, f"imagenet_resume_{shuffle}")
    assert_resumes_exactly(lambda: module(url, tmp_path, shuffle=shuffle, shuffle_window=2))


def test_loader_bench_reads_from_a_bucket(s3, tmp_path):
    """bench --loader imagenet --format ... --bucket: the generated pack uploaded once to the prefix,
    the packed formats timed reading from it (the uniform order's items alone, the block order's
    chunks into an emptied cache when cold), the folder from disk."""
    from vitlab.data.throughput import format_bench, format_rows_table

    kw = dict(dataset_images=12, images=4, formats=("folder", "litdata", "litdata-block"), workers=(0,), batch=2,
              data_dir=str(tmp_path), size=(64, 48), bucket="s3://data/bench")
    rows = format_bench(**kw)
    assert [(r.format, r.cache) for r in rows] == [(f, c) for c in ("cold", "warm")
                                                   for f in ("folder", "litdata s3", "litdata-block s3")]
    assert all(r.images == 4 and r.cpu_s > 0 for r in rows)
    listed = s3.list_objects_v2(Bucket="data", Prefix="bench/")["Contents"]
    assert "bench/vitlab_pack.json" in {o["Key"] for o in listed}
    assert "litdata-block s3" in format_rows_table(rows)
    import boto3

    puts = []
    boto3.setup_default_session()  # the session S3Pack's client comes from, its PUTs counted
    boto3.DEFAULT_SESSION.events.register("before-call.s3.PutObject", lambda **_: puts.append(1))
    format_bench(**{**kw, "caches": ("warm",)})  # the same pack: not uploaded again
    assert puts == []
    s3.delete_object(Bucket="data", Key="bench/vitlab_pack.json")
    format_bench(**{**kw, "caches": ("warm",)})  # a file missing there: uploaded again
    assert len(puts) == len(listed)


def test_chunk_cache_makes_room_least_recently_downloaded_first(tmp_path, monkeypatch):
    """Before a download that would leave under a twentieth of the disk free, the cache's oldest
    chunks go (by download time), of any pack copied into it (a pack no longer read does not fill the
    disk), until it would not; nothing else is touched."""
    import shutil
    from collections import namedtuple

    from vitlab.data import remote

    scope = tmp_path / "packed" / "s3"
    new, old = scope / "data" / "inet" / "v2" / "train", scope / "other" / "inet" / "train"
    assert remote.cache_scope("s3://data/inet/v2/train", new) == remote.cache_scope("s3://other/inet/train", old) == scope
    for age, chunk in enumerate((new / "new.bin", new / "mid.bin", old / "old.bin")):
        chunk.parent.mkdir(parents=True, exist_ok=True)
        chunk.write_bytes(b"x" * 100)
        os.utime(chunk, (1_000_000 - age, 1_000_000 - age))
    (new / "index.json").write_text("{}")
    (old / "old.bin.etag").write_text('"etag"')
    usage = namedtuple("usage", "total used free")
    free = {"now": 1000}  # total 10,000: 500 must stay free
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10_000, 10_000 - free["now"], free["now"]))
    remote.make_room(scope, 650)  # 1000 - 650 = 350 < 500: two chunks (200 bytes) make it 550
    assert sorted(p.name for p in new.iterdir()) == ["index.json", "new.bin"] and list(old.iterdir()) == []
    free["now"] = 5000
    remote.make_room(scope, 650)
    assert (new / "new.bin").exists()


def test_a_chunk_deleted_between_download_and_open_is_downloaded_again(s3, packed, tmp_path, monkeypatch):
    """Another process making room may delete a chunk this one has just found or downloaded: it is
    fetched again; a disk that loses it every time stops with a message naming data.cache_dir."""
    from vitlab.data import remote

    url = upload(packed, "imagenet_race")
    dm = module(url, tmp_path, shuffle="block")
    real, calls = remote.fetch_chunk, []

    def fetch_then_lose(url, path, size, etag, lose=1):
        real(url, path, size, etag)
        calls.append(path.name)
        if len(calls) <= lose:
            path.unlink()

    monkeypatch.setattr(remote, "fetch_chunk", fetch_then_lose)
    jpeg, label = dm.train_set.read(0)
    assert bytes(jpeg) == bytes(PackedImages(packed / "train").read(0)[0]) and len(calls) == 2
    monkeypatch.setattr(remote, "fetch_chunk", lambda *a: fetch_then_lose(*a, lose=99))
    last = len(dm.train_set) - 1  # in another chunk, not opened yet
    with pytest.raises(ShardError, match=r"deleted as soon as downloaded three times.*data.cache_dir"):
        dm.train_set.read(last)


def test_a_batch_from_a_bucket_is_requested_at_once(s3, packed, tmp_path, monkeypatch):
    """The loader's fetch of a batch read in place (the uniform order): its items' ranged GETs are in
    flight together (each waits at a barrier that opens only when all of them wait: one after
    another they would time out), every image equal to the local pack's; a request that fails stops
    the batch naming the object, under data.skip_corrupt=true too (a lost connection or object is
    no corrupt image to skip)."""
    import threading

    from vitlab.data import remote
    from vitlab.data.remote import RemoteError

    url = upload(packed, "imagenet_batch")
    copy = module(url, tmp_path).data_root()
    far, local = PackedImages(copy / "train", raw=True, skip_corrupt=True), PackedImages(packed / "train", raw=True)
    batch = [0, 17, 5, 9, 3, 12]
    real, barrier = remote.S3Pack.read_range, threading.Barrier(len(batch), timeout=30)

    def together(self, name, start, end):
        if start > 0:  # an item (a chunk's header starts at 0)
            barrier.wait()
        return real(self, name, start, end)

    monkeypatch.setattr(remote.S3Pack, "read_range", together)
    got = far.__getitems__(batch)
    assert [bytes(g[0].numpy()) for g in got] == [bytes(local[i][0].numpy()) for i in batch]
    assert [g[1] for g in got] == [local[i][1] for i in batch]
    monkeypatch.setattr(remote.S3Pack, "read_range", real)
    from vitlab.data.streaming import ChunkFiles

    fetched, prefetch = [], ChunkFiles.prefetch  # the training loader hands the dataset whole batches
    monkeypatch.setattr(ChunkFiles, "prefetch", lambda self, indices: fetched.append(len(indices)) or prefetch(
        self, indices))
    dm = module(url, tmp_path, auto_augment=None, reprob=0)
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 18 and fetched == [3] * 6
    chunk = far.chunks.names[0]
    s3.delete_object(Bucket="data", Key=f"imagenet_batch/train/{chunk}")
    with pytest.raises(RemoteError, match=rf"{url}/train/{chunk}: bytes \d+-\d+ cannot be read.*NoSuchKey"):
        far.__getitems__([1])


def test_a_bucket_pack_in_another_layout_is_refused(tmp_path):
    """vitlab reads from a bucket only the item layout its packer writes (LitData's remote readers are
    not used): a pack in another (here: compressed) stops at once, saying to pack it again."""
    from vitlab.data.remote import ORIGIN

    (tmp_path / ORIGIN).write_text(json.dumps({"url": "s3://data/other", "objects": {}}))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "index.json").write_text(json.dumps({"chunks": [], "config": {"compression": "zstd"}}))
    with pytest.raises(ShardError, match=r"s3://data/other/train/index.json: its items are not in the layout python "
                                         r"-m vitlab.data.pack writes.*pack the dataset"):
        PackedImages(tmp_path / "train")


def test_a_ranged_read_cut_off_midway_is_asked_for_again(s3, packed, monkeypatch):
    """botocore retries a request that fails before its body, not a body cut off midway: read_range
    asks again (three tries in all, then the error names the object and range); the store's own
    answer (no such key) is not asked again."""
    from botocore.exceptions import ResponseStreamingError

    from vitlab.data.remote import RemoteError, S3Pack

    url = upload(packed, "imagenet_cut")
    pack, chunk = S3Pack(f"{url}/train"), sorted(p.name for p in (packed / "train").glob("*.bin"))[0]
    real, calls = pack.client.get_object, []

    def cut_off(fail: int):
        def get_object(**kw):
            calls.append(kw["Range"])
            if len(calls) <= fail:
                raise ResponseStreamingError(error="Connection broken: IncompleteRead")
            return real(**kw)
        return get_object

    monkeypatch.setattr(pack.client, "get_object", cut_off(2))
    assert pack.read_range(chunk, 10, 30) == (packed / "train" / chunk).read_bytes()[10:30] and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(pack.client, "get_object", cut_off(3))
    with pytest.raises(RemoteError, match=rf"{url}/train/{chunk}: bytes 10-29 cannot be read \(ResponseStreamingError"):
        pack.read_range(chunk, 10, 30)
    calls.clear()
    monkeypatch.setattr(pack.client, "get_object", cut_off(0))
    with pytest.raises(RemoteError, match=r"missing.bin: bytes 10-29 cannot be read \(NoSuchKey"):
        pack.read_range("missing.bin", 10, 30)
    assert len(calls) == 1


def test_a_cache_too_small_for_the_block_order_stops_before_training(s3, tmp_path, monkeypatch, caplog):
    """A block-order run from a bucket checks data.cache_dir's disk first: room for twice a window of
    the largest chunks (beside the twentieth make_room keeps free) or it stops, naming data.cache_dir;
    with room for less than the whole split it says chunks are downloaded again each epoch, with
    room for all that the bucket is read once."""
    import logging
    import shutil
    from collections import namedtuple

    from vitlab.data.pack import main
    from vitlab.data.remote import RemoteError
    from vitlab.data.synthetic import make_imagenet

    folder = make_imagenet(tmp_path / "folder", num_classes=3, num_train=6, num_val=3, size=48)
    main(["imagenet", "--root", str(folder), "--out", str(tmp_path / "packed"), "--shard-size", "6KB", "--workers",
          "1", "--order", "shuffled"])
    url = upload(tmp_path / "packed", "imagenet_room")
    chunk_bytes = [p.stat().st_size for p in (tmp_path / "packed" / "train").glob("*.bin")]
    assert len(chunk_bytes) >= 4
    usage, real = namedtuple("usage", "total used free"), shutil.disk_usage
    for free, said in ((3 * max(chunk_bytes), "downloaded again each epoch"), (10 * sum(chunk_bytes), "read once")):
        monkeypatch.setattr(shutil, "disk_usage", lambda path, free=free: usage(free * 10 // 9, 0, free))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vitlab"):
            module(url, tmp_path / "cache", shuffle="block", shuffle_window=1)
        assert said in caplog.text
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - max(chunk_bytes), max(chunk_bytes)))
    with pytest.raises(RemoteError, match=r"data.cache_dir: .*train has room for .* MiB of chunks.*block order needs "
                                          r"[\d.]+ MiB for the node's 1 process\(es\) \(2 chunks each.*larger local"):
        module(url, tmp_path / "cache", shuffle="block", shuffle_window=1)
    # a node's DDP processes share its disk: room for one process's chunks is not room for four
    free = 3 * max(chunk_bytes)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(free * 10 // 9, 0, free))
    dm = ImageNetDataModule(url, num_workers=0, batch_size=3, img_size=32, format="litdata",
                            cache_dir=str(tmp_path / "cache"), shuffle="block", shuffle_window=1)
    dm.trainer = types.SimpleNamespace(num_devices=4, world_size=4, global_rank=0)
    with pytest.raises(RemoteError, match=r"for the node's 4 process\(es\)"):
        dm.setup("fit")
    # another pack's chunks in the same cache are room: making room deletes them
    other = tmp_path / "cache" / "packed" / "s3" / "data" / "another" / "train" / "chunk-0-0.bin"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"\0" * (4 * max(chunk_bytes)))
    free = max(chunk_bytes)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(free * 10 // 9, 0, free))
    module(url, tmp_path / "cache", shuffle="block", shuffle_window=1)
    other.unlink()
    with pytest.raises(RemoteError, match=r"block order needs"):
        module(url, tmp_path / "cache", shuffle="block", shuffle_window=1)
    monkeypatch.setattr(shutil, "disk_usage", real)
    module(url, tmp_path / "cache")  # the uniform order downloads no chunk: no room needed


def test_an_https_store_behind_a_private_authority(packed, tmp_path):
    """The same reads over HTTPS from a store whose certificate a private authority signed
    (AWS_CA_BUNDLE): the listing and copy, the uniform order's ranged GETs and the block order's
    chunk downloads, every image equal to the local pack's; without the bundle the listing stops
    naming the bucket (the certificate is not trusted)."""
    from support import local_s3
    from vitlab.data.remote import RemoteError

    with local_s3(tmp_path / "tls") as env, pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert env["AWS_ENDPOINT_URL"].startswith("https://")
        import boto3

        boto3.client("s3").create_bucket(Bucket="data")
        url = upload(packed, "imagenet_tls")
        local = PackedImages(packed / "train")
        for shuffle in ("uniform", "block"):
            dm = module(url, tmp_path / "cache", shuffle=shuffle)
            assert dm.train_set.chunks.in_place == (shuffle == "uniform")
            got = dm.train_set.__getitems__(list(range(len(local))))
            assert [bytes(jpeg) for jpeg, _ in map(local.read, range(len(local)))] == [
                bytes(dm.train_set.read(i)[0]) for i in range(len(local))]
            assert len(got) == len(local)
        mp.delenv("AWS_CA_BUNDLE")
        with pytest.raises(RemoteError, match=r"data.root=s3://data/imagenet_tls: cannot list the bucket.*SSL"):
            module(url, tmp_path / "cache2")


def test_a_pack_uploaded_again_replaces_the_cached_chunks(s3, packed, tmp_path):
    """A chunk replaced in the bucket by one of the same name and size (a pack uploaded again to the
    same prefix) is downloaded again by the next run (its ETag changed), not read from the cache."""
    from vitlab.data.remote import stamp

    url = upload(packed, "imagenet_again")
    first = module(url, tmp_path, shuffle="block")
    for i in range(len(first.train_set)):
        first.train_set.read(i)
    chunk = first.train_set.chunks.names[0]
    cached = first.data_root() / "train" / chunk
    assert cached.read_bytes() == (packed / "train" / chunk).read_bytes() and stamp(cached).exists()
    data = bytearray(cached.read_bytes())
    at = first.train_set.chunks.chunk(0)[1][0] + 40  # inside the first item's JPEG
    data[at] ^= 0xFF
    s3.put_object(Bucket="data", Key=f"imagenet_again/train/{chunk}", Body=bytes(data))
    again = module(url, tmp_path, shuffle="block")
    again.train_set.read(0)
    assert cached.read_bytes() == bytes(data)
