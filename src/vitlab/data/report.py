"""What a dataset check finds: every problem of a dataset in one pass, by kind, with counts.

Each DataModule's ``check(full)`` fills a ``DataReport``; ``VitlabDataModule.preflight()`` runs it
at the start of a run and ``python -m vitlab.tools.check_data`` prints it. The same per-file and
per-annotation rules raise in the loaders, so a run with ``data.verify=none`` fails (or skips,
with ``data.skip_corrupt=true``) on the same files, only later.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable

from vitlab.errors import VitlabUserError


# Problems: a run stops on them (unless data.skip_corrupt=true leaves the items out).
MISSING = "missing file"
UNDECODABLE = "undecodable file"
EMPTY = "folder or split without images"
SIZE_MISMATCH = "image size differs from its annotation"
LABEL_SIZE = "label map of the wrong size"
LABEL_FORMAT = "label map not an 8-bit single-channel image"
LABEL_IDS = "out-of-range class id"
UNKNOWN_CATEGORY = "unknown category id"
UNKNOWN_IMAGE = "annotation of an unknown image id"
BAD_BOX = "malformed box"
BOX_OUTSIDE = "box outside its image"
BAD_SEGMENTATION = "missing or unreadable segmentation"
# Problems no skipping can get around: the run always stops.
BAD_ANNOTATION_FILE = "unreadable annotation file"
CATEGORIES_DIFFER = "train and val categories differ"
UNSKIPPABLE = {BAD_ANNOTATION_FILE, CATEGORIES_DIFFER}
# Warnings: counted and reported, the data is used as they say.
ZERO_AREA_BOX = "zero-area box (left out of training targets)"
CLIPPED_BOX = "box clipped to its image (data.clip_boxes=true)"
IGNORED_FILE = "file without an image suffix (ignored)"
ORDER = (MISSING, UNDECODABLE, EMPTY, SIZE_MISMATCH, LABEL_SIZE, LABEL_FORMAT, LABEL_IDS, UNKNOWN_CATEGORY,
         UNKNOWN_IMAGE, BAD_BOX, BOX_OUTSIDE, BAD_SEGMENTATION, BAD_ANNOTATION_FILE, CATEGORIES_DIFFER,
         ZERO_AREA_BOX, CLIPPED_BOX, IGNORED_FILE)  # of the kinds in a report

HINTS = {
    BOX_OUTSIDE: "data.clip_boxes=true clips such boxes to their image",
    LABEL_IDS: "label maps hold 0 (other) and 1..num_classes, or 255 (ignored)",
}


class DataCheckError(VitlabUserError, ValueError):
    """A dataset with problems; the message lists every kind with its count and examples."""


@dataclass
class DataReport:
    """Problems (a run stops unless told to skip them) and warnings, each kind -> its instances."""

    title: str
    checked: list[str] = field(default_factory=list)  # what was looked at, one line per split
    problems: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    def problem(self, kind: str, detail: str) -> None:
        self.problems.setdefault(kind, []).append(detail)

    def warn(self, kind: str, detail: str) -> None:
        self.warnings.setdefault(kind, []).append(detail)

    def count(self, kind: str) -> int:
        return len(self.problems.get(kind, ())) + len(self.warnings.get(kind, ()))

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self, examples: int = 5) -> str:
        lines = [self.title, *(f"  {line}" for line in self.checked)]
        for heading, found in (("problem", self.problems), ("warning", self.warnings)):
            if not found:
                continue
            total = sum(len(v) for v in found.values())
            lines.append(f"{total} {heading}{'s' * (total != 1)}:")
            for kind, details in sorted(found.items(), key=lambda item: ORDER.index(item[0])):
                hint = f" ({HINTS[kind]})" if kind in HINTS else ""
                lines.append(f"  {kind}: {len(details)}{hint}")
                lines += [f"    {d}" for d in details[:examples]]
                if len(details) > examples:
                    lines.append(f"    ... and {len(details) - examples} more")
        if self.ok and not self.warnings:
            lines.append("no problems found")
        return "\n".join(lines)

    def enforce(self, skip: bool, error: type[Exception] = DataCheckError) -> None:
        """Raise ``error`` listing every problem, unless ``skip`` (``data.skip_corrupt``) and every
        problem can be skipped; warn about what is skipped and about the warnings."""
        if self.problems and (not skip or UNSKIPPABLE & self.problems.keys()):
            ways_out = "Fix the data" + ("" if UNSKIPPABLE & self.problems.keys() else
                                         ", or set data.skip_corrupt=true to leave these files and annotations out")
            raise error(f"{self.summary()}\n{ways_out}.")
        if self.problems or self.warnings:
            warnings.warn(self.summary(), stacklevel=3)


def skip_or_raise(err: Exception, skip: bool) -> None:
    """A loader's bad item: ``None`` (skipped, counted in the batch) with ``data.skip_corrupt=true``,
    else the error with that hint."""
    if not skip:
        raise type(err)(f"{err}. Set data.skip_corrupt=true to skip and count such files.") from None
    warnings.warn(f"skipping: {err}", stacklevel=3)
    return None


def check_all(report: DataReport, inspect: Callable[[object], list[tuple[str, str]]], items: Iterable,
              workers: int, chunk: int = 256) -> None:
    """``inspect(item) -> [(kind, detail), ...]`` for every item, in threads (file reads and image
    decoding release the GIL), in order; each finding becomes a problem of ``report``."""

    def run(batch):
        return [finding for item in batch for finding in inspect(item)]

    items = iter(items)
    batches = iter(lambda: list(islice(items, chunk)), [])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for findings in pool.map(run, batches):
            for kind, detail in findings:
                report.problem(kind, detail)
