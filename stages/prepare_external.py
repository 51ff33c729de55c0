"""Stage prepare_external: NIH / CheXpert / VinDr downloads -> one image manifest per source.

`python stages/prepare_external.py [source ...]` (default: every source under
`external.sources`). Each source is read by its adapter with the options its params section
gives (root and manifest aside), gets a patient-level "val" split carved from its "train"
rows, is validated and written atomically to its `manifest` path. Label space: the Task 1
classes; classes a source does not annotate are unknown (NaN).
"""

import inspect
import sys
from collections.abc import Mapping
from typing import Any

import pandas as pd

from cxrlt.data.chexpert import read_chexpert
from cxrlt.data.manifest import summary, validate_manifest
from cxrlt.data.nih import read_nih
from cxrlt.data.splits import patient_val_split
from cxrlt.data.vindr import read_vindr
from cxrlt.errors import DataError
from cxrlt.io import write_parquet
from cxrlt.labels import TASK1_CLASSES
from cxrlt.params import load_params, section
from cxrlt.stage import run_stage

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


def main() -> None:
    params = load_params()
    sources = section(params, "external.sources")
    val_fraction = float(section(params, "external.val_fraction"))
    seed = int(section(params, "external.seed"))
    classes = list(TASK1_CLASSES)
    names = sys.argv[1:] or list(sources)
    for name in names:
        if name not in sources:
            raise DataError(
                f"params.yaml external.sources: no source {name!r}; have {list(sources)}"
            )
        cfg = sources[name]
        df = read_source(name, cfg, classes)
        df["split"] = patient_val_split(df, classes, val_fraction, seed)
        validate_manifest(df, classes, cfg["manifest"])
        write_parquet(cfg["manifest"], df)
        print(f"{name} -> {cfg['manifest']}\n{summary(df, classes)}")


if __name__ == "__main__":
    run_stage(main)
