"""The manifest contract every source adapter writes: one row per image.

Columns: `image_id, study_id, patient_id` (strings), `source`, `split`
(train / val / dev / test), `view` (frontal / lateral / unknown), `view_position`
(the raw code), `path` (image file, relative to the repository root or absolute), then one
float column per class of the label space: 1 positive, 0 negative, NaN unknown (the source
does not annotate it, or the annotation is uncertain and the policy says ignore).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrlt.errors import DataError

META_COLUMNS: tuple[str, ...] = (
    "image_id", "study_id", "patient_id", "source", "split", "view", "view_position", "path",
)  # fmt: skip
SPLITS = ("train", "val", "dev", "test")
VIEWS = ("frontal", "lateral", "unknown")

FRONTAL_CODES = {"AP", "PA", "LAO", "RAO", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD",
                 "LLD", "RLD", "FRONTAL"}  # fmt: skip
LATERAL_CODES = {"LATERAL", "LL", "RL", "XTABLE LATERAL", "SWIMMERS", "LAT"}


def view_group(code: object) -> str:
    """Map a DICOM ViewPosition code (or a Frontal/Lateral word) to frontal / lateral / unknown."""
    if code is None or (isinstance(code, float) and np.isnan(code)):
        return "unknown"
    text = str(code).strip().upper()
    if text in FRONTAL_CODES:
        return "frontal"
    if text in LATERAL_CODES:
        return "lateral"
    return "unknown"


def label_matrix(df: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """(n_images, n_classes) float32 matrix of 1 / 0 / NaN, columns selected by name."""
    missing = [c for c in classes if c not in df.columns]
    if missing:
        raise DataError(f"manifest lacks label columns {missing}")
    return df.loc[:, list(classes)].to_numpy(dtype=np.float32, na_value=np.nan)


def validate_manifest(df: pd.DataFrame, classes: Sequence[str], where: str) -> None:
    """Check the contract; `where` names the file in the message."""
    missing = [c for c in (*META_COLUMNS, *classes) if c not in df.columns]
    if missing:
        raise DataError(f"{where}: missing columns {missing}")
    dup = df["image_id"].duplicated(keep=False)
    if dup.any():
        ids = df.loc[dup, "image_id"].unique()[:5].tolist()
        raise DataError(f"{where}: duplicate image_id values, e.g. {ids}")
    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        row = int(np.flatnonzero(bad_split.to_numpy())[0])
        raise DataError(f"{where}: row {row} has split {df['split'].iloc[row]!r}; expected {SPLITS}")
    values = df.loc[:, list(classes)].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~(np.isnan(values) | (values == 0) | (values == 1))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{where}: row {r} column {classes[c]!r} holds {values[r, c]!r}; expected 0, 1 or empty")
    leaks = df.groupby("patient_id")["split"].nunique()
    leaks = leaks[leaks > 1]
    if len(leaks):
        raise DataError(f"{where}: patients in more than one split, e.g. {leaks.index[:5].tolist()}")


def summary(df: pd.DataFrame, classes: Sequence[str]) -> str:
    """A readable one-paragraph description of a manifest (sizes, views, label counts)."""
    lines = [
        f"{len(df)} images, {df['study_id'].nunique()} studies, {df['patient_id'].nunique()} patients",
        "splits: " + ", ".join(f"{k}={v}" for k, v in df["split"].value_counts().items()),
        "views: " + ", ".join(f"{k}={v}" for k, v in df["view"].value_counts().items()),
    ]
    y = label_matrix(df, classes)
    pos = np.nansum(y, axis=0).astype(int)
    unk = np.isnan(y).sum(axis=0)
    lines.append("positives: " + ", ".join(f"{c}={p}" + (f" (unknown {u})" if u else "")
                                           for c, p, u in zip(classes, pos, unk, strict=True)))
    return "\n".join(lines)
