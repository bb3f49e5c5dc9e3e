"""COCO's masks as RLEs, made fast: Mask R-CNN's RoI masks pasted into their boxes and encoded box by
box (``paste_masks_rle``), full-size masks encoded from their bounding crops (``encode_masks``), both
byte-equal to torchvision's paste and pycocotools' encoding (tested); and ``PastePool``, which does
the pasting in worker processes while validation goes on.

Light on purpose (torch, torchvision's box helpers, numpy, pycocotools): it is what a pool's process
started by forkserver imports beyond the main module the forkserver preloaded, not the tasks and Lightning.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks


def paste_masks_rle(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> list[dict]:
    """Mask R-CNN's RoI masks (N x 1 x M x M probabilities) pasted into their boxes (N x 4 xyxy) on an
    image of ``size`` (H, W) and thresholded, as COCO RLEs: byte-equal to ``pycocotools.mask.encode`` of
    torchvision's ``paste_masks_in_image(masks, boxes, size)[:, 0] > threshold`` (tested), without
    making the full-size masks: each mask is resized to its box as torchvision does (its padding, box
    expansion and the same ``F.interpolate``) and encoded from the part inside the image
    (``crops_to_rle``). torchvision pastes each mask on a zeroed full image and pycocotools encodes whole
    images: 100 full-size masks per image made that the dominant cost of validating Mask R-CNN."""
    height, width = size
    crops, corners = [], []
    # F.interpolate's own kernel for a 4-D input and an output size (what it calls): its Python checks
    # cost more than resizing a box's mask (~17 us of ~45 per mask, measured)
    resize = torch._C._nn.upsample_bilinear2d
    with one_thread():
        masks, scale = expand_masks(masks.detach().float().cpu(), padding=1)
        boxes = expand_boxes(boxes.detach().float().cpu(), scale).to(torch.int64).tolist()
        for mask, (x0, y0, x1, y1) in zip(masks.unbind(0), boxes):
            local = resize(mask[None], (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1)), False).numpy()[0, 0]
            top, left = max(y0, 0), max(x0, 0)
            bottom, right = max(min(y1 + 1, height), top), max(min(x1 + 1, width), left)
            # thresholded here: crops_to_rle then copies bytes rather than floats into column order; in
            # numpy, whose slicing and comparison cost a fraction of torch's per-call overhead (~11 us a mask)
            crops.append(local[top - y0:bottom - y0, left - x0:right - x0] > threshold)
            corners.append((top, left))
    return crops_to_rle(crops, corners, size)


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads off for a while: each box's resize is too small to share, yet torch
    starts its thread team for it, which made the pasting 10x slower on two busy cores (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """N x H x W masks -> COCO RLEs, byte-equal to ``pycocotools.mask.encode`` (tested): each mask
    encoded from its bounding crop (``crops_to_rle``), which spares pycocotools' column-major copy of
    every whole image."""
    masks = masks.detach().cpu().numpy().astype(bool, copy=False)
    rows, cols = masks.any(2), masks.any(1)  # N x H, N x W: where each mask has pixels
    top, bottom = rows.argmax(1), rows.shape[1] - rows[:, ::-1].argmax(1)
    left, right = cols.argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1)
    bottom, right = np.where(rows.any(1), bottom, top), np.where(rows.any(1), right, left)  # empty: 0 x 0
    crops = [m[t:b, l:r] for m, t, b, l, r in zip(masks, top.tolist(), bottom.tolist(), left.tolist(), right.tolist())]
    return crops_to_rle(crops, list(zip(top.tolist(), left.tolist())), masks.shape[1:])


def crops_to_rle(crops: list[np.ndarray], corners: list[tuple[int, int]], size: tuple[int, int]) -> list[dict]:
    """Boolean crops (h x w, each inside the image) placed at ``corners`` (top, left) on an otherwise
    empty image of ``size`` (H, W) -> COCO's compressed RLEs of those images (the runs of the
    column-major image; pycocotools encodes whole images only, so the runs are hand-made and
    pycocotools compresses them)."""
    if not crops:
        return []
    height, width = (int(v) for v in size)
    # every crop column-major with a zero row above and below, one after the other: a run of ones
    # never crosses a column's end there, so the runs of all crops are found in one pass
    heights = np.array([c.shape[0] + 2 for c in crops], dtype=np.int64)
    widths = np.array([c.shape[1] for c in crops], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(heights * widths)])
    flat = np.zeros(int(starts[-1]) + 1, dtype=bool)  # one more zero: every run ends inside
    for crop, start, h, w in zip(crops, starts.tolist(), heights.tolist(), widths.tolist()):
        flat[start:start + h * w].reshape(w, h)[:, 1:-1] = crop.T
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # starts and ends of the runs of ones, in turn
    run_starts, run_ends = changes[0::2], changes[1::2]
    det = np.searchsorted(starts, run_starts, side="right") - 1  # the crop of each run
    top, left = np.array(corners, dtype=np.int64).reshape(-1, 2).T
    column, row = np.divmod(run_starts - starts[det], heights[det])
    run_ends = run_ends - run_starts  # lengths for a moment
    run_starts = (left[det] + column) * height + top[det] + row - 1  # index in the column-major image
    run_ends = run_starts + run_ends
    # a crop as tall as the image: a run ending at a column's bottom goes on at the next one's top
    joined = np.r_[False, (det[1:] == det[:-1]) & (run_starts[1:] == run_ends[:-1])]
    run_starts, det, run_ends = run_starts[~joined], det[~joined], run_ends[np.r_[~joined[1:], True]]
    previous_end = np.r_[0, run_ends[:-1]]
    previous_end[np.r_[True, det[1:] != det[:-1]]] = 0  # a crop's first run follows zeros from 0
    # the counts: (zeros, ones) per run, then the zeros after a crop's last run unless there are none
    bounds = np.searchsorted(det, np.arange(len(crops) + 1))
    tail = height * width - np.where(bounds[1:] > bounds[:-1], run_ends[bounds[1:] - 1], 0)
    counts = np.insert(np.stack([run_starts - previous_end, run_ends - run_starts], 1).ravel(), 2 * bounds[1:], tail)
    ends = 2 * bounds[1:] + np.arange(1, len(crops) + 1)  # where each crop's counts end, its tail included
    keep = np.ones(len(counts), dtype=bool)
    keep[ends - 1] = tail > 0
    per_crop = np.split(counts[keep], np.cumsum(keep)[ends - 1][:-1])
    return mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in per_crop], height, width)


class PastePool:
    """``paste_masks_rle`` in ``workers`` processes while the validation loop goes on: ~7 ms of CPU for
    each COCO image (100 masks), which the loop otherwise waited for between batches; here the next
    batches' forward passes, and on a CPU the other cores, run meanwhile. ``paste`` returns the RLEs,
    or a ``Future`` of them; ``close`` waits for every paste and ends the processes (their manager is a
    thread in this process, and ``CocoEvaluator.compute`` forks its mask evaluation only when this
    process has no other thread).

    The first ``inline_first`` images of a pass are pasted here: a small validation (a smoke run's
    few images) is over before processes would have started. Processes are forked when this process
    has no other Python thread (cheap, copy-on-write); otherwise started by forkserver (forking a process
    with threads can copy a lock one of them holds): its server starts once per process (seconds of
    imports), its processes fork from it and import this module.
    The masks travel as numpy arrays (not torch's shared-memory tensors: one file descriptor each). At
    most ``max_pending`` pastes a process wait in the queue (a loop faster than the pastes waits for the
    oldest), so the RoI masks queued stay a few MB however long the validation."""

    def __init__(self, workers: int, inline_first: int = 16, max_pending: int = 32):
        self.workers = workers
        self.inline_first = inline_first
        self.max_pending = max_pending
        self._pool: ProcessPoolExecutor | None = None
        self._pending: collections.deque[Future] = collections.deque()
        self._seen = 0

    def paste(self, masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> list[dict] | Future:
        self._seen += 1
        if self.workers < 1 or self._seen <= self.inline_first:
            return paste_masks_rle(masks, boxes, size)
        if self._pool is None:
            alone = threading.active_count() == 1
            context = multiprocessing.get_context("fork" if alone else "forkserver")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                             initargs=(os.getpid() if alone else None,))
        while len(self._pending) >= self.max_pending * self.workers:
            self._pending.popleft().result()
        future = self._pool.submit(_paste_arrays, masks.detach().float().cpu().numpy(),
                                   boxes.detach().float().cpu().numpy(), tuple(size))
        self._pending.append(future)
        return future

    def close(self) -> None:
        """Wait for the pastes submitted and end the processes (a new pass starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()
        self._seen = 0


def die_with_parent(parent: int | None) -> None:
    """This process is killed when its parent ends (Linux's ``PR_SET_PDEATHSIG``). A forked process holds
    copies of its parent's files, the run directory's lock (``vitlab.runtime.rundir``) among them, and a
    pool's process waits on a pipe whose other end it holds too: after a ``kill -9`` of the training
    process neither would end, and the same command run again would find its run directory locked.
    ``parent``: the process forked from (it may have ended already); None: started by forkserver,
    whose server ends with the process that started it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: no such call
        pass
    if parent is not None and os.getppid() != parent:  # it ended before the call above
        os._exit(1)


def _start_worker(parent: int | None) -> None:
    """A ``PastePool`` process: tied to its parent's life, one torch thread (the pastes are per mask)."""
    die_with_parent(parent)
    torch.set_num_threads(1)


def _paste_arrays(masks: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> list[dict]:
    """In a ``PastePool`` process."""
    return paste_masks_rle(torch.from_numpy(masks), torch.from_numpy(boxes), size)
