"""One table from each external source's label names to the CXR-LT names, and `relabel`.

Every adapter builds a frame of its *source* labels (1 / 0 / NaN) and calls `relabel`, which
aligns it to any target label space by name. A target class that no source label maps to is
NaN (unknown, masked by the loss), never 0: NIH does not annotate Fracture, so an NIH image
says nothing about fractures. Several source labels mapping to one target combine with max
(a positive wins; NaN only where all are NaN); one source label may feed several targets
(VinDr's "Nodule/Mass" feeds Nodule and Mass; its policy is in `cxrlt.data.vindr`).

Source labels with no faithful CXR-LT counterpart are dropped and listed in `DROPPED_LABELS`
with the reason, so the README can show them. A wrong mapping is worse than none: it adds
false positives *and* false negatives for the target, whereas an unmapped label only leaves
the target unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlt.data.manifest import META_COLUMNS, validate_manifest
from cxrlt.errors import DataError

# source -> source label -> CXR-LT target names (a tuple: one label may feed several targets).
LABEL_MAP: dict[str, dict[str, tuple[str, ...]]] = {
    "nih": {
        "No Finding": ("Normal",),
        "Atelectasis": ("Atelectasis",),
        "Cardiomegaly": ("Cardiomegaly",),
        "Consolidation": ("Consolidation",),
        "Edema": ("Edema",),
        "Effusion": ("Pleural Effusion",),
        "Emphysema": ("Emphysema",),
        "Fibrosis": ("Fibrosis",),
        "Hernia": ("Hernia",),
        "Infiltration": ("Infiltration",),
        "Mass": ("Mass",),
        "Nodule": ("Nodule",),
        "Pleural_Thickening": ("Pleural Thickening",),
        "Pneumonia": ("Pneumonia",),
        "Pneumothorax": ("Pneumothorax",),
    },
    "chexpert": {
        "No Finding": ("Normal",),
        "Enlarged Cardiomediastinum": ("Enlarged Cardiomediastinum",),
        "Cardiomegaly": ("Cardiomegaly",),
        "Lung Opacity": ("Lung Opacity",),
        "Lung Lesion": ("Lung Lesion",),
        "Edema": ("Edema",),
        "Consolidation": ("Consolidation",),
        "Pneumonia": ("Pneumonia",),
        "Atelectasis": ("Atelectasis",),
        "Pneumothorax": ("Pneumothorax",),
        "Pleural Effusion": ("Pleural Effusion",),
        "Pleural Other": ("Pleural Other",),
        "Fracture": ("Fracture",),
        "Support Devices": ("Support Devices",),
    },
    "vindr": {
        "No finding": ("Normal",),
        "Atelectasis": ("Atelectasis",),
        "Cardiomegaly": ("Cardiomegaly",),
        "Consolidation": ("Consolidation",),
        "Infiltration": ("Infiltration",),
        "Lung Opacity": ("Lung Opacity",),
        # VinDr annotates nodules and masses as one box class; a negative rules out both. A
        # positive is evidence for both, or for neither in particular: the adapter's
        # `nodule_mass` policy (both | unknown) decides before relabelling.
        "Nodule/Mass": ("Nodule", "Mass"),
        "Pleural effusion": ("Pleural Effusion",),
        "Pleural thickening": ("Pleural Thickening",),
        "Pneumothorax": ("Pneumothorax",),
        "Pulmonary fibrosis": ("Fibrosis",),
    },
}

# source -> source label -> why it has no CXR-LT target. Still a finding: an image with one of
# these is not Normal (the adapters account for that before relabelling).
DROPPED_LABELS: dict[str, dict[str, str]] = {
    "nih": {},
    "chexpert": {},
    "vindr": {
        "Aortic enlargement": (
            "a dilated aorta, not a widened cardiomediastinal silhouette; mapping it to "
            "Enlarged Cardiomediastinum would add ~3k positives of a different finding and "
            "call every other VinDr image negative for it"
        ),
        "Calcification": (
            "any calcification (granulomas, nodes, costal cartilage, aortic knob); only a "
            "fraction is Calcification of the Aorta, so a positive would often be wrong"
        ),
        "ILD": "interstitial lung disease is broader than Fibrosis; CXR-LT has no ILD class",
        "Other lesion": "a catch-all box class with no single CXR-LT counterpart",
    },
}

SOURCES: tuple[str, ...] = tuple(LABEL_MAP)


def source_label_names(source: str) -> tuple[str, ...]:
    """All label names a source annotates (mapped and dropped), as the source spells them."""
    _check_source(source)
    return (*LABEL_MAP[source], *DROPPED_LABELS[source])


def mapping_table() -> pd.DataFrame:
    """(source, source_label, target, note) rows, dropped labels with an empty target; for docs."""
    rows = []
    for source in SOURCES:
        for label, targets in LABEL_MAP[source].items():
            rows += [(source, label, target, "") for target in targets]
        for label, why in DROPPED_LABELS[source].items():
            rows.append((source, label, None, f"dropped: {why}"))
    return pd.DataFrame(rows, columns=["source", "source_label", "target", "note"])


def relabel(source_labels: pd.DataFrame, source: str, classes: Sequence[str]) -> pd.DataFrame:
    """Align a frame of source label columns (1 / 0 / NaN) to `classes`, by name.

    Columns of `source_labels` must be label names of `source` (unknown names raise, since a
    typo would otherwise silently become an unknown class); a mapped label absent from the
    frame counts as not annotated. Returns float32 columns `classes` on the same index.
    """
    _check_source(source)
    classes = list(classes)
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise DataError(f"target classes {dup} are listed more than once")
    known = set(LABEL_MAP[source]) | set(DROPPED_LABELS[source])
    unknown = [c for c in source_labels.columns if c not in known]
    if unknown:
        raise DataError(f"{source}: unknown source label columns {unknown}; valid: {sorted(known)}")
    n = len(source_labels)
    out = np.full((n, len(classes)), np.nan, dtype=np.float32)
    col = {c: j for j, c in enumerate(classes)}
    for label, targets in LABEL_MAP[source].items():
        if label not in source_labels.columns:
            continue
        values = source_labels[label].to_numpy(dtype=np.float32, na_value=np.nan)
        for target in targets:
            if target in col:
                j = col[target]
                out[:, j] = np.fmax(out[:, j], values)  # fmax: NaN only where both are NaN
    return pd.DataFrame(out, columns=classes, index=source_labels.index)


def _check_source(source: str) -> None:
    if source not in LABEL_MAP:
        raise DataError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")


# --- plumbing shared by the source adapters (nih, chexpert, vindr) ---------------------------


def read_table(path: Path, required: Sequence[str], **kwargs: Any) -> pd.DataFrame:
    """Read a metadata CSV as it is; raise naming the file and the missing columns."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot parse as CSV ({exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; found {list(df.columns)}")
    return df


def csv_line(row: int) -> int:
    """1-based line number of a CSV data row (line 1 is the header), for error messages."""
    return int(row) + 2


def check_ids(ids: pd.Series, path: Path, column: str) -> None:
    """Raise naming the lines of the first empty or duplicated id."""
    empty = ids.isna() | (ids.astype(str).str.strip() == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(f"{path}: line {csv_line(row)} has an empty {column!r}")
    dup = ids.duplicated(keep=False).to_numpy()
    if dup.any():
        rows = np.flatnonzero(dup)
        first = ids.iloc[rows[0]]
        lines = [csv_line(r) for r in rows[ids.iloc[rows].to_numpy() == first][:5]]
        raise DataError(
            f"{path}: {column} {first!r} appears more than once (lines {lines}); "
            f"{int(ids.duplicated().sum())} duplicate rows in all"
        )


def missing_files_error(root: Path, missing: Sequence[str], total: int, where: str) -> DataError:
    """One message for images listed in the metadata but absent on disk."""
    return DataError(
        f"{root}: {len(missing)} of {total} images listed in {where} are missing on disk, "
        f"e.g. {list(missing[:5])} (pass check_files=False to build the manifest anyway)"
    )


def assemble_manifest(
    meta: pd.DataFrame, source_labels: pd.DataFrame, source: str, classes: Sequence[str], where: str
) -> pd.DataFrame:
    """META_COLUMNS from `meta` + `relabel`-ed label columns, checked against the contract."""
    labels = relabel(source_labels.reset_index(drop=True), source, classes)
    out = pd.concat([meta.reset_index(drop=True).loc[:, list(META_COLUMNS)], labels], axis=1)
    validate_manifest(out, list(classes), where)
    return out
