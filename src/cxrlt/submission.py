"""Predictions table and CXR-LT submission files.

A submission holds probabilities (mAP needs a ranking; labels binarised at 0.5 rank nothing),
one row per dicom_id with its study_id, class columns named and ordered as the task's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.io import write_csv

ID_COLUMNS = ("image_id", "study_id", "patient_id", "split", "view")
IMAGE_PREFIX = "image:"
FUSED_PREFIX = "fused:"


def predictions_frame(
    rows: pd.DataFrame, classes: Sequence[str], probs: np.ndarray, image_probs: np.ndarray | None = None,
    fused_probs: np.ndarray | None = None,
) -> pd.DataFrame:
    """Ids of `rows` + one probability column per class (`p:<class>` keeps them apart from labels).

    `probs` is what is submitted (after any aggregation and calibration), kept at its own
    precision: rounding calibrated values to float32 could tie two images a strictly
    increasing map had kept apart. `image_probs`, the image model's own output, goes into
    `image:<class>` columns, from which evaluate recomputes every aggregation level;
    `fused_probs`, the fusion model's study predictions, into `fused:<class>`.
    """
    for name, value in (("probabilities", probs), ("image probabilities", image_probs),
                        ("fused probabilities", fused_probs)):  # fmt: skip
        if value is not None and value.shape != (len(rows), len(classes)):
            raise ValueError(f"{name} {value.shape} do not match {len(rows)} rows x {len(classes)} classes")
    out = rows.loc[:, list(ID_COLUMNS)].reset_index(drop=True).copy()
    columns = {f"p:{c}": probs[:, i] for i, c in enumerate(classes)}
    if image_probs is not None:
        columns.update({f"{IMAGE_PREFIX}{c}": image_probs[:, i].astype(np.float32) for i, c in enumerate(classes)})
    if fused_probs is not None:
        columns.update({f"{FUSED_PREFIX}{c}": fused_probs[:, i] for i, c in enumerate(classes)})
    return pd.concat([out, pd.DataFrame(columns)], axis=1)


def probabilities(preds: pd.DataFrame, classes: Sequence[str], prefix: str = "p:") -> np.ndarray:
    return preds[[f"{prefix}{c}" for c in classes]].to_numpy(dtype=np.float64)


def submission_path(directory: str | os.PathLike, task: str) -> Path:
    """`<directory>/<task>_test.csv`: the file is named after the task it answers.

    dvc.yaml declares the same path (`${predict.submission_dir}/${task}_test.csv`); DVC does
    not interpolate inside params.yaml, so the name is built here rather than written there.
    """
    return Path(directory) / f"{task}_test.csv"


def write_submission(path: str | os.PathLike, preds: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """One row per dicom_id: `dicom_id, study_id, <classes in task order>` (probabilities)."""
    if preds["image_id"].duplicated().any():
        raise ValueError("duplicate image ids in predictions")
    sub = pd.DataFrame({"dicom_id": preds["image_id"].to_numpy(), "study_id": preds["study_id"].to_numpy()})
    sub[list(classes)] = probabilities(preds, classes)
    # full precision: rounding (e.g. "%.6g") turns distinct float32 probabilities into ties
    # (0.99999994 and 0.9999997 both print "1"), so `cxrlt score` would disagree with evaluate
    write_csv(path, sub)
    return sub
