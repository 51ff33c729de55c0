"""CXR-LT 2024 label files on MIMIC-CXR-JPG -> the image-level manifest.

Label columns are always selected *by name*: the official task-2 development CSV orders
Normal and Nodule differently from the training CSV.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.data.manifest import view_group
from cxrlt.errors import DataError
from cxrlt.labels import TASK3_CLASSES, training_classes

ID_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition", "fpath")

# (split, file) per task, as published on PhysioNet (cxr-lt-iccv-workshop-cvamd 2.0.0).
TASK_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "task1": (("train", "train_labeled.csv"), ("dev", "development_labeled_task1.csv"),
              ("test", "test_labeled_task1.csv")),
    "task2": (("train", "train_labeled_26.csv"), ("dev", "development_labeled_task2.csv"),
              ("test", "test_labeled_task2.csv")),
    # Task 3 trains on the Task 1 labels; its 5 classes exist only in dev/test.
    "task3": (("train", "train_labeled.csv"), ("dev", "development_labeled_task3.csv"),
              ("test", "test_labeled_task3.csv")),
    # CXR-LT 2023 (cxr-lt-iccv-workshop-cvamd 1.x): 26 classes with "No Finding".
    "cxrlt2023": (("train", "train.csv"), ("dev", "development.csv"), ("test", "test.csv")),
}  # fmt: skip


def read_labels_csv(path: Path, classes: Sequence[str], allow_unlabelled: bool = False) -> pd.DataFrame:
    """Read one CXR-LT CSV, check its columns and values, keep ids + `classes` by name.

    With `allow_unlabelled`, a file with no class column at all (a test set whose labels are
    not released) gives unknown (NaN) labels; a file with some but not all classes is an error.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"dicom_id": str, "subject_id": str, "study_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse CSV ({e})") from None
    unlabelled = allow_unlabelled and not any(c in df.columns for c in classes)
    missing = [c for c in (*ID_COLUMNS, *([] if unlabelled else classes)) if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    for col in ("dicom_id", "subject_id", "study_id", "fpath"):
        empty = df[col].isna()
        if empty.any():
            raise DataError(f"{path}: line {int(np.flatnonzero(empty)[0]) + 2} has an empty {col!r}")
    dup = df["dicom_id"].duplicated(keep="first")
    if dup.any():
        r = int(np.flatnonzero(dup)[0])
        raise DataError(f"{path}: line {r + 2} repeats dicom_id {df['dicom_id'].iloc[r]!r}")
    if unlabelled:
        out = df[list(ID_COLUMNS)].copy()
        out[list(classes)] = np.float32(np.nan)
        return out
    values = df[list(classes)].apply(pd.to_numeric, errors="coerce")
    bad = ~values.isin([0, 1])
    if bad.to_numpy().any():
        r, c = np.argwhere(bad.to_numpy())[0]
        raise DataError(
            f"{path}: line {r + 2} column {classes[c]!r} holds {df[classes[c]].iloc[r]!r}; expected 0 or 1"
        )
    out = df[list(ID_COLUMNS)].copy()
    out[list(classes)] = values.astype(np.float32)
    return out


def read_cxrlt(
    labels_root: str | os.PathLike,
    images_root: str | os.PathLike,
    task: str = "task1",
    check_files: bool = True,
    files: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Manifest of train + dev + test for `task` (val is carved from train later, by patient).

    Task 3 columns are added where their files exist (unknown = NaN elsewhere), so a
    zero-shot model can be evaluated from the same manifest. `files` overrides the file name
    of a split ({"train": ..., "dev": ..., "test": ...}); a test file without label columns
    gives unknown labels (predictions are still made for it).
    """
    labels_root, images_root = Path(labels_root), Path(images_root)
    if not labels_root.is_dir():
        raise DataError(f"CXR-LT labels folder {labels_root} does not exist (params data.cxrlt_root)")
    if task not in TASK_FILES:
        raise DataError(f"unknown task {task!r}; valid: {sorted(TASK_FILES)}")
    classes = training_classes(task)
    parts = []
    names = dict(TASK_FILES[task])
    unknown = sorted(set(files or {}) - set(names))
    if unknown:
        raise DataError(f"params data.files: unknown splits {unknown}; valid: {sorted(names)}")
    names.update(files or {})
    for split, name in names.items():
        path = labels_root / name
        wanted = TASK3_CLASSES if (task == "task3" and split != "train") else classes
        part = read_labels_csv(path, wanted, allow_unlabelled=split == "test")
        part["split"] = split
        part["_file"] = str(path)
        parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    dup = df["dicom_id"].duplicated(keep=False)
    if dup.any():
        d = df.loc[dup, ["dicom_id", "_file"]].drop_duplicates().head(4)
        raise DataError(f"dicom_id in more than one label file: {d.to_dict('records')}")
    manifest = pd.DataFrame({
        "image_id": df["dicom_id"], "study_id": df["study_id"], "patient_id": df["subject_id"],
        "source": "mimic", "split": df["split"], "view": df["ViewPosition"].map(view_group),
        "view_position": df["ViewPosition"].astype("string"),
        "path": [str(images_root / p) for p in df["fpath"]],
    })  # fmt: skip
    label_cols = [c for c in (*classes, *TASK3_CLASSES) if c in df.columns]
    manifest[label_cols] = df[label_cols].to_numpy(dtype=np.float32)
    if check_files:
        exists = np.fromiter((os.path.isfile(p) for p in manifest["path"]), bool, len(manifest))
        if not exists.all():
            r = int(np.flatnonzero(~exists)[0])
            raise DataError(
                f"{df['_file'].iloc[r]}: image for dicom_id {df['dicom_id'].iloc[r]!r} not found at "
                f"{manifest['path'].iloc[r]} ({int((~exists).sum())} images missing; check data.mimic_root)"
            )
    return manifest
