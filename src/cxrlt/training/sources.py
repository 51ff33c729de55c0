"""The external sources (NIH, CheXpert, VinDr) as training images: each source's manifest
and its own image cache (`<external.cache_root>/<source>`, written by the cache_external
stage), in the Task 1 label space with unknown labels NaN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlt.data.cache import ImageCache, keep_cached
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.stage import read_parquet
from cxrlt.training.data import CachedImages, ConcatImages


@dataclass
class Source:
    name: str
    manifest: pd.DataFrame  # images the cache could read
    cache: ImageCache

    def split(self, split: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == split].reset_index(drop=True)


def check_sources(params: Mapping[str, Any], names: object, where: str) -> list[str]:
    """A list of configured source names (before any data loads)."""
    configured = sorted((params.get("external") or {}).get("sources") or {})
    if names is None:
        return []
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise DataError(f"params {where} must be a list of source names from {configured}; got {names!r}")
    unknown = sorted(set(names) - set(configured))
    if unknown:
        raise DataError(f"params {where}: unknown sources {unknown}; configured: {configured}")
    if len(set(names)) != len(names):
        raise DataError(f"params {where} names a source twice: {list(names)}")
    return list(names)


def cache_dir(params: Mapping[str, Any], name: str) -> Path:
    return Path(str(params["external"].get("cache_root", "data/cache"))) / name


def load_sources(params: Mapping[str, Any], names: Sequence[str], size: int | None = None) -> list[Source]:
    """The named sources' manifests and caches; every cache must have side `size` (the
    CXR-LT cache's, or the first source's when None)."""
    out = []
    for name in names:
        cfg = params["external"]["sources"][name]
        manifest = read_parquet(cfg["manifest"], f"external.sources.{name}.manifest", f"prepare_external@{name}")
        directory = cache_dir(params, name)
        if not (directory / "index.parquet").is_file():
            raise DataError(f"{directory}: no image cache for source {name} (run `dvc repro cache_external@{name}`)")
        cache = ImageCache(directory)
        size = cache.size if size is None else size
        if cache.size != size:
            raise DataError(f"{directory}: cache side {cache.size} px, expected {size} (rebuild with the same cache.size)")
        out.append(Source(name, keep_cached(manifest, cache), cache))
    return out


def annotated_classes(sources: Sequence[Source], classes: Sequence[str], split: str = "train") -> list[str]:
    """The classes with at least one positive label in `split` of any source, in `classes` order."""
    pos = np.zeros(len(classes))
    for s in sources:
        pos += np.nansum(label_matrix(s.split(split), classes), axis=0)
    return [c for c, n in zip(classes, pos, strict=True) if n > 0]


def images(sources: Sequence[Source], split: str, classes: Sequence[str]) -> ConcatImages:
    """`split` of every source as one dataset (sources with no image in it left out)."""
    parts = [CachedImages(s.cache, s.split(split), classes) for s in sources if len(s.split(split))]
    if not parts:
        raise DataError(f"no {split} images in sources {[s.name for s in sources]}")
    return ConcatImages(parts)
