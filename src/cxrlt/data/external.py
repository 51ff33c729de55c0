"""External sources (NIH, CheXpert, VinDr-CXR) behind one entry point driven by params.

Each source section of `params.yaml` (`external.sources.<name>`) holds its `root`, its
`manifest` path and the adapter's own options; unknown options are an error that lists the
valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import pandas as pd

from cxrlt.data.chexpert import read_chexpert
from cxrlt.data.nih import read_nih
from cxrlt.data.vindr import read_vindr
from cxrlt.errors import DataError

READERS = {"nih": read_nih, "chexpert": read_chexpert, "vindr": read_vindr}
PATH_KEYS = ("root", "manifest")


def read_source(name: str, cfg: Mapping[str, Any], classes: list[str]) -> pd.DataFrame:
    """Run the source's adapter with the params options (unknown keys are an error)."""
    where = f"params.yaml external.sources.{name}"
    if name not in READERS:
        raise DataError(f"{where}: unknown source; valid: {sorted(READERS)}")
    missing = [k for k in PATH_KEYS if k not in cfg]
    if missing:
        raise DataError(f"{where}: missing keys {missing}")
    reader = READERS[name]
    accepted = set(inspect.signature(reader).parameters) - {"root", "classes"}
    options = {k: v for k, v in cfg.items() if k not in PATH_KEYS}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(
            f"{where}: unknown keys {unknown}; valid: {sorted(accepted | set(PATH_KEYS))}"
        )
    return reader(cfg["root"], classes, **options)
