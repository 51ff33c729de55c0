"""Datasets and loaders over the image cache."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix


class CachedImages(Dataset):
    """Images of a manifest subset from the cache, with targets and a known-label mask."""

    def __init__(self, cache: ImageCache, manifest: pd.DataFrame, classes: Sequence[str]):
        self.images = cache.images
        self.rows = cache.rows(manifest["image_id"])
        y = label_matrix(manifest, classes) if len(classes) else np.zeros((len(manifest), 0), np.float32)
        self.mask = ~np.isnan(y)
        self.targets = np.nan_to_num(y, nan=0.0).astype(np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.from_numpy(np.array(self.images[self.rows[i]])),
            "target": torch.from_numpy(self.targets[i]),
            "mask": torch.from_numpy(self.mask[i]),
            "index": torch.tensor(i),
        }


def keep_cached(manifest: pd.DataFrame, cache: ImageCache) -> pd.DataFrame:
    """Drop images the cache recorded as unreadable (cache.on_error: skip)."""
    ok = cache.ok.reindex(manifest["image_id"].astype(str)).fillna(False).to_numpy(bool)
    return manifest.loc[ok].reset_index(drop=True)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=g,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
