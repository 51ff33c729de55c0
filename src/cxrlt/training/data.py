"""Datasets and loaders over the image cache."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix


class CachedImages(Dataset):
    """Images of a manifest subset from the cache, with targets and a known-label mask.

    Targets may be soft (noisy-student pseudo-labels in [0, 1]); NaN means unknown.
    """

    def __init__(self, cache: ImageCache, manifest: pd.DataFrame, classes: Sequence[str]):
        self.cache = cache
        self.rows = cache.rows(manifest["image_id"])
        y = label_matrix(manifest, classes) if len(classes) else np.zeros((len(manifest), 0), np.float32)
        self.mask = ~np.isnan(y)
        self.targets = np.nan_to_num(y, nan=0.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.from_numpy(self.cache.read(self.rows[i : i + 1])[0]),
            "target": torch.from_numpy(self.targets[i]),
            "mask": torch.from_numpy(self.mask[i]),
            "index": torch.tensor(i),
        }


class ConcatImages(Dataset):
    """Several `CachedImages` (each with its own cache: one per data source) as one dataset,
    with the concatenated targets and mask that samplers and loss statistics read."""

    def __init__(self, parts: Sequence[CachedImages]):
        if not parts:
            raise ValueError("ConcatImages needs at least one part")
        widths = {p.targets.shape[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(f"parts disagree on the number of classes: {sorted(widths)}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])
        self.targets = np.concatenate([p.targets for p in self.parts])
        self.mask = np.concatenate([p.mask for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        item = self.parts[k][i - int(self.offsets[k])]
        item["index"] = torch.tensor(i)
        return item


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        generator=g,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class Loaders(L.LightningDataModule):
    """Train and val loaders, built when Lightning asks for them (after the DDP process group
    exists): the train sampler shards itself per rank; val is split over ranks without
    shuffling (the module counts each image once after gathering)."""

    def __init__(
        self, train: Dataset, val: Dataset, sampler: Sampler, batch_size: int,
        eval_batch_size: int, num_workers: int, seed: int,
    ):  # fmt: skip
        super().__init__()
        self.train, self.val, self.sampler = train, val, sampler
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train, self.batch_size, False, self.num_workers, self.seed,
                           drop_last=True, sampler=self.sampler)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = DistributedSampler(self.val, shuffle=False) if dist else None
        return make_loader(self.val, self.eval_batch_size, False, self.num_workers, self.seed,
                           sampler=sampler)  # fmt: skip
