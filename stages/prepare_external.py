"""Stage prepare_external: NIH / CheXpert / VinDr downloads -> one image manifest per source.

`python stages/prepare_external.py [source ...]` (default: every source under
`external.sources`). Each source is read by its adapter with the options its params section
gives (root and manifest aside), gets a patient-level "val" split carved from its "train"
rows, is validated and written atomically to its `manifest` path. Label space: the Task 1
classes; classes a source does not annotate are unknown (NaN).
"""

import sys

from cxrlt.data.external import read_source
from cxrlt.data.manifest import summary, validate_manifest
from cxrlt.data.splits import patient_val_split
from cxrlt.errors import DataError
from cxrlt.io import write_parquet
from cxrlt.labels import TASK1_CLASSES
from cxrlt.params import load_params, section
from cxrlt.stage import run_stage


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
