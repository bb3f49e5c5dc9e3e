"""How a loader worker's batch reaches the training process: the batch types pickle their small
tensors with the batch (not one shared-memory block and file descriptor each), and data.gpu_decode's
bytes go through shared slots made before the workers start (``ByteRing``), given back once
decoded. Checked with real DataLoader workers: every byte arrives as written while the worker
keeps writing the next batches (a slot reused too early would show here)."""
from __future__ import annotations

import copy
import functools
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing  # noqa: F401  registers the shared-memory reductions a worker's queue uses
from torch.utils.data import DataLoader, Dataset

from vitlab.data import gpu_decode
from vitlab.data.base import SMALL_TENSOR_BYTES, DetectionBatch, ImageBatch, SegmentationBatch
from vitlab.data.gpu_decode import ByteRing, JpegBytes, RingSlot, collate_bytes
from vitlab.data.imagenet import ImageNetDataModule


def through_queue(batch):
    """What a worker's queue does to a batch: torch's ForkingPickler, then unpickled."""
    return pickle.loads(ForkingPickler.dumps(batch))


def leaves(batch) -> list:
    if isinstance(batch, (list, tuple)):
        return [leaf for part in batch for leaf in leaves(part)]
    if isinstance(batch, dict):
        return [leaf for key in sorted(batch) for leaf in leaves(batch[key])]
    return [batch]


def test_small_tensors_travel_with_the_batch_and_large_ones_in_shared_memory():
    big = torch.rand(3, 200, 200)  # 480 KB: a shared-memory block
    small = dict(boxes=torch.rand(5, 4), labels=torch.arange(5), crowd=torch.tensor([True, False, True, False, True]),
                 masks=torch.randint(0, 2, (5, 30, 40), dtype=torch.uint8), strided=torch.arange(20).view(4, 5).t())
    batches = [
        ImageBatch(big, torch.arange(8), torch.tensor(2)),
        DetectionBatch([big, torch.rand(3, 8, 8)], [small, {}], torch.tensor(0)),
        SegmentationBatch(big, torch.zeros(1, 300, 300, dtype=torch.long), ["a"], torch.tensor(1)),
        ImageBatch(JpegBytes(torch.arange(300_000, dtype=torch.int32).to(torch.uint8), torch.tensor([100_000, 200_000])),
                   torch.tensor([3, 4]), torch.tensor(0)),
    ]
    for batch in batches:
        got = through_queue(batch)
        assert type(got) is type(batch)
        sent, arrived = leaves(batch), leaves(got)
        assert len(sent) == len(arrived) >= 3
        for a, b in zip(sent, arrived):
            if not isinstance(a, torch.Tensor):
                assert a == b
                continue
            assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
            assert b.is_shared() == (a.nbytes > SMALL_TENSOR_BYTES), (a.shape, a.dtype)
            b.copy_(b)  # writable, as a tensor from shared memory is


def test_copies_of_a_batch_hold_tensors():
    """The batch types' pickling (above) also serves copy.copy / copy.deepcopy: a shallow copy holds the
    same tensors, a deep one equal new ones; neither holds the wrappers pickling uses."""
    batch = DetectionBatch([torch.rand(3, 4, 4)], [{"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 2])}],
                           torch.tensor(0))
    shallow, deep = copy.copy(batch), copy.deepcopy(batch)
    assert type(shallow) is type(deep) is DetectionBatch
    assert shallow.targets[0]["boxes"] is batch.targets[0]["boxes"] and shallow.skipped is batch.skipped
    for a, b in zip(leaves(batch), leaves(deep)):
        assert isinstance(b, torch.Tensor) and b is not a and torch.equal(a, b)


class Numbered(Dataset):
    """Item i: ``length(i)`` bytes, each (i + k) % 251, and its label i: any byte from another item or
    batch shows."""

    def __init__(self, n: int, length=lambda i: 1000 + 37 * (i % 50)):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (torch.arange(i, i + self.length(i)) % 251).to(torch.uint8), i


def check(batch: ImageBatch) -> None:
    for part, i in zip(batch.images.split(), batch.targets.tolist()):
        assert torch.equal(part, (torch.arange(i, i + len(part)) % 251).to(torch.uint8)), f"item {i} overwritten"


def test_workers_fill_ring_slots_that_come_back_after_decoding():
    """2 workers, 300 batches; as Lightning does, the training process holds the next batch while it
    decodes one (the fetcher looks one ahead), and checks every byte only when two newer batches have
    arrived, then gives its slot back: every batch came in a slot, none overwritten."""
    ring = ByteRing(workers=2, slots=4, slot_bytes=64 * 3000)
    loader = DataLoader(Numbered(300 * 64), batch_size=64, num_workers=2,
                        collate_fn=functools.partial(collate_bytes, ring=ring))
    held, in_slots = [], 0
    for batch in loader:
        in_slots += isinstance(batch.images.data, RingSlot)
        held.append(batch)
        if len(held) == 3:
            oldest = held.pop(0)
            check(oldest)
            oldest.images.release()
    for batch in held:
        check(batch)
    assert in_slots == 300
    del batch, held, oldest
    assert not ring.taken.any()  # every slot given back


def test_a_batch_dropped_undecoded_gives_its_slot_back_and_a_full_ring_falls_back(monkeypatch):
    ring = ByteRing(workers=1, slots=2, slot_bytes=5000)
    monkeypatch.setattr(gpu_decode, "get_worker_info", lambda: type("Info", (), {"id": 0})())  # as in worker 0
    data = Numbered(8)
    sent = [collate_bytes([data[0], data[1]], ring=ring), collate_bytes([data[2], data[3]], ring=ring)]
    assert [b.images.data.index for b in sent] == [0, 1] and ring.taken.tolist() == [1, 1]
    full = collate_bytes([data[4], data[5]], ring=ring)  # no free slot: a block of its own
    assert full.images.data.is_shared()
    check(full)
    too_big = ByteRing(workers=1, slots=2, slot_bytes=100)
    assert collate_bytes([data[4]], ring=too_big).images.data.is_shared() and not too_big.taken.any()
    arrived = [through_queue(b) for b in sent]
    del sent  # the worker's side of a slot does not give it back
    assert ring.taken.tolist() == [1, 1]
    for batch in arrived:
        check(batch)
    arrived[0].images.release()
    assert ring.taken.tolist() == [0, 1]
    del arrived, batch  # dropped without decoding (a loader reset at the end of an epoch drops its prefetched batches)
    assert ring.taken.tolist() == [0, 0]


def test_a_spawned_worker_does_not_use_the_ring(monkeypatch):
    """A spawned worker inherits no memory: its copy of the ring hands every batch over as a new block."""
    ring = pickle.loads(pickle.dumps(ByteRing(workers=1, slots=2, slot_bytes=5000)))
    monkeypatch.setattr(gpu_decode, "get_worker_info", lambda: type("Info", (), {"id": 0})())
    batch = collate_bytes([Numbered(2)[0]], ring=ring)
    assert batch.images.data.is_shared()
    check(batch)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from vitlab.data.synthetic import make_imagenet

    return make_imagenet(tmp_path_factory.mktemp("ho"), num_classes=2, num_train=12, num_val=1, size=64, height=48)


def test_gpu_decode_training_loader_uses_slots_and_decoding_gives_them_back(folder, monkeypatch):
    """The DataModule's own loader (2 workers) and transfer: batches arrive in slots, the decode gives
    each slot back; the training bytes are not pinned (decode_jpeg reads them on the host), the
    validation loader's images are where a GPU is."""
    dm = ImageNetDataModule(str(folder), gpu_decode=True, auto_augment=None, color_jitter=0, reprob=0.0, img_size=32,
                            num_workers=2, batch_size=4)
    dm.setup("fit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loader = dm.train_dataloader()
    assert loader.pin_memory is False and dm.val_dataloader().pin_memory is True
    monkeypatch.undo()
    loader = dm.train_dataloader()
    ring, kinds = dm._byte_ring, []
    for batch in loader:
        kinds.append(type(batch.images.data))
        out = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        assert out.images.shape == (4, 3, 32, 32)
        assert batch.images.data.ring is None  # given back as soon as decoded, the batch still held
    assert kinds == [RingSlot] * 6
    del batch
    assert not ring.taken.any()


def _burn(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_running_workers_cpu_is_read_while_they_run():
    """The loader bench's steady state reads its running workers' CPU time from /proc (getrusage counts
    a child only after it ended); children that are not the loader's are left out."""
    import multiprocessing

    from vitlab.data.throughput import _running_children_cpu

    busy = multiprocessing.get_context("fork").Process(target=_burn, args=(30,))
    busy.start()
    try:
        import time

        time.sleep(0.6)
        got = _running_children_cpu()
        assert got is not None and got >= 0.3, got
        assert _running_children_cpu({busy.pid}) == 0.0
    finally:
        busy.terminate()
        busy.join()


def test_loader_bench_times_the_steady_state_where_the_epoch_allows(folder, monkeypatch):
    """Each worker's first batch (its start-up) is left out of the timing when the epoch has batches to
    spare; a short epoch is timed whole."""
    from vitlab.data import throughput

    calls = []
    real = throughput._running_children_cpu
    monkeypatch.setattr(throughput, "_running_children_cpu", lambda *a: calls.append(a) or real(*a))
    wall, cpu, seen = throughput.time_loader(folder, "folder", 1, 8, 4, gpu_decode=False)  # 24 images: 6 batches
    assert seen == 8 and wall > 0 and cpu > 0 and len(calls) == 3  # checked, then before and after
    calls.clear()
    wall, cpu, seen = throughput.time_loader(folder, "folder", 1, 24, 4, gpu_decode=False)  # the whole epoch
    assert seen == 24 and cpu > 0 and not calls
