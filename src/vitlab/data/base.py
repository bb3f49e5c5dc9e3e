"""What every vitlab DataModule shares: where the data is, generated data, loaders.

Each task reads its dataset's real on-disk format. ``synthetic=true`` writes a
small dataset in exactly that format under ``synthetic_root`` (once, then
cached) and reads it with the same code; without it a missing dataset is an
error naming the path and the layout, never a silent fallback.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class DatasetLayoutError(FileNotFoundError):
    pass


class CorruptImageError(RuntimeError):
    pass


class VitlabDataModule(L.LightningDataModule):
    #: shown in the "dataset not found" message
    layout_help: str = ""

    def __init__(
        self,
        root: str,
        synthetic: bool = False,
        synthetic_root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        smoke: bool = False,
        skip_corrupt: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.root = root
        self.synthetic = synthetic
        self.synthetic_root = synthetic_root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.smoke = smoke
        self.skip_corrupt = skip_corrupt
        self.seed = seed

    # ---- subclasses --------------------------------------------------------------------
    def check_layout(self, root: Path) -> None:
        """Raise ``DatasetLayoutError`` unless ``root`` holds the dataset in its real layout."""
        raise NotImplementedError

    def generate_synthetic(self, root: Path) -> None:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------
    def data_root(self) -> Path:
        if self.synthetic:
            root = Path(self.synthetic_root or Path(self.root) / "synthetic")
            marker = root / ".complete"
            if not marker.exists():  # generate once; a half-written folder is regenerated
                root.mkdir(parents=True, exist_ok=True)
                self.generate_synthetic(root)
                marker.touch()
            self.check_layout(root)
            return root
        root = Path(self.root)
        try:
            self.check_layout(root)
        except DatasetLayoutError as err:
            raise DatasetLayoutError(
                f"{err}\nExpected layout:\n{self.layout_help}\n"
                f"Either point data.root=/path/to/dataset at the real data, or train on a small "
                f"generated dataset in the same format with data.synthetic=true."
            ) from None
        return root

    def prepare_data(self) -> None:
        self.data_root()  # generation happens once, on one process

    def make_loader(self, dataset: Dataset, train: bool, collate_fn=None, batch_size: int | None = None) -> DataLoader:
        sampler = None
        if train:
            # An epoch-seeded sampler (Lightning calls set_epoch) makes the shuffle order a
            # function of (seed, epoch): resuming from a checkpoint replays the same order.
            world, rank = 1, 0
            if self.trainer is not None:
                world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            drop_last=train,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
