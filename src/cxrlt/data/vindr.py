"""VinDr-CXR adapter (the VinBigData Kaggle release): reader annotations -> one row per image.

Layout under `root`: `train.csv` (one row per box or "No finding" vote: `image_id,
class_name, class_id, rad_id, x_min, y_min, x_max, y_max`) and `train/<image_id>.dicom`.
Each image was read by three radiologists (17 readers in all), so an image has several
rows; `read_vindr` aggregates them under a reader policy (see there). Labels built per
annotation row would turn one image into many contradicting samples.

Images are DICOM; the manifest's `path` points at the converted PNG
`<png_root>/<image_id>.png` (write them with `cxrlt.data.dicom.convert_dicoms` on
`dicom_paths(...)`). VinDr is de-identified without patient links: `image_id` doubles as
patient and study id, so a patient-level split is image-level here (the best available).
All images are frontal (the release holds posteroanterior CXRs); the raw view code is not
in the CSV, so `view_position` is empty.

VinDr draws nodules and masses as one box class, "Nodule/Mass"; CXR-LT has Nodule and Mass
apart. Turning one finding into two labels is a choice, made by `nodule_mass` (see
`split_nodule_mass`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from cxrlt.data.harmonise import (
    assemble_manifest,
    csv_line,
    missing_files_error,
    read_table,
    source_label_names,
)
from cxrlt.errors import DataError

SOURCE = "vindr"
CSV_NAME = "train.csv"
DICOM_DIR = "train"
DICOM_SUFFIXES = (".dicom", ".dcm")
REQUIRED_COLUMNS = ("image_id", "class_name", "rad_id")
NO_FINDING = "No finding"
VINDR_LABELS: tuple[str, ...] = source_label_names(SOURCE)
FINDINGS: tuple[str, ...] = tuple(c for c in VINDR_LABELS if c != NO_FINDING)
READER_POLICIES = ("any", "majority")
NODULE_MASS = "Nodule/Mass"
NODULE_MASS_POLICIES = ("both", "unknown")

ReaderPolicy = Literal["any", "majority"]
NoduleMassPolicy = Literal["both", "unknown"]


def read_annotations(root: Path) -> pd.DataFrame:
    """train.csv as it is, validated: required columns, known class names, non-empty ids."""
    path = root / CSV_NAME
    df = read_table(path, REQUIRED_COLUMNS, dtype=dict.fromkeys(REQUIRED_COLUMNS, str))
    for col in REQUIRED_COLUMNS:
        values = df[col].str.strip()
        empty = (values.isna() | (values == "")).to_numpy()
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise DataError(f"{path}: line {csv_line(row)} has an empty {col!r}")
        df[col] = values
    unknown = ~df["class_name"].isin(VINDR_LABELS).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}: line {csv_line(row)} (image {df['image_id'].iloc[row]}) has unknown "
            f"class_name {df['class_name'].iloc[row]!r}; valid: {list(VINDR_LABELS)}"
        )
    return df


def aggregate_readers(ann: pd.DataFrame, policy: ReaderPolicy, where: str) -> pd.DataFrame:
    """(image, reader, class) votes -> one 0/1 row per image over VINDR_LABELS, sorted by id.

    A reader counts once per class however many boxes they drew. "any": a finding is positive
    if at least one reader marked it, and the image is "No finding" only if no reader marked
    any finding (dropped classes such as Aortic enlargement included). "majority": positive
    if more than half of the image's readers marked it (2 of 3), and "No finding" if more
    than half said so. Under both, "No finding" and a positive finding never coexist.
    """
    if policy not in READER_POLICIES:
        raise DataError(f"reader_policy {policy!r}; valid: {READER_POLICIES}")
    votes = ann.loc[:, ["image_id", "rad_id", "class_name"]].drop_duplicates()
    said_nothing = votes["class_name"] == NO_FINDING
    per_reader = votes.groupby(["image_id", "rad_id"])["class_name"].agg("size")
    nf_reader = votes.loc[said_nothing, ["image_id", "rad_id"]].set_index(["image_id", "rad_id"])
    contradict = per_reader.loc[nf_reader.index] > 1
    if contradict.any():
        image, reader = contradict.index[int(np.flatnonzero(contradict.to_numpy())[0])]
        raise DataError(
            f"{where}: reader {reader} marked image {image} both 'No finding' and a finding"
        )
    counts = votes.groupby(["image_id", "class_name"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(VINDR_LABELS), fill_value=0).sort_index()
    readers = votes.groupby("image_id")["rad_id"].nunique().reindex(counts.index).to_numpy()
    c = counts.to_numpy()
    nf = VINDR_LABELS.index(NO_FINDING)
    finding_cols = [VINDR_LABELS.index(f) for f in FINDINGS]
    if policy == "any":
        positive = c >= 1
        positive[:, nf] = c[:, finding_cols].sum(axis=1) == 0
    else:
        positive = 2 * c > readers[:, None]
    return pd.DataFrame(positive.astype(np.float32), columns=list(VINDR_LABELS), index=counts.index)


def split_nodule_mass(labels: pd.DataFrame, policy: NoduleMassPolicy) -> pd.DataFrame:
    """Apply the Nodule/Mass policy to aggregated labels (before relabelling to CXR-LT).

    "both": a Nodule/Mass positive is positive for Nodule and for Mass, so every such image
    gets one label the radiologists did not give (a nodule is not a mass; CXR-LT tells them
    apart by size, 3 cm). "unknown": a positive leaves Nodule and Mass unknown (NaN, masked
    out of losses and metrics), since it says one of them is there but not which. Either
    way an image without a Nodule/Mass box is negative for both, and one with it is not Normal.
    """
    if policy not in NODULE_MASS_POLICIES:
        raise DataError(
            f"params external.sources.vindr.nodule_mass: {policy!r}; "
            f"valid: {list(NODULE_MASS_POLICIES)}"
        )
    if policy == "both":
        return labels
    out = labels.copy()
    out[NODULE_MASS] = out[NODULE_MASS].where(out[NODULE_MASS] != 1, np.float32(np.nan))
    return out


def scan_dicoms(folder: Path) -> dict[str, str]:
    """image_id -> DICOM path, from one listing of the folder (not a stat per image)."""
    found: dict[str, str] = {}
    if folder.is_dir():
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in DICOM_SUFFIXES:
                    found[stem] = entry.path
    return found


def dicom_paths(root: str | os.PathLike, image_ids: Iterable[str]) -> list[Path]:
    """DICOM file of each image (`train/<id>.dicom`, or `.dcm` where that is what exists)."""
    root = Path(root)
    found = scan_dicoms(root / DICOM_DIR)
    return [Path(found.get(i, root / DICOM_DIR / f"{i}.dicom")) for i in image_ids]


def read_vindr(
    root: str | os.PathLike,
    classes: Sequence[str],
    reader_policy: ReaderPolicy = "any",
    check_files: bool = True,
    png_root: str | os.PathLike | None = None,
    nodule_mass: NoduleMassPolicy = "both",
) -> pd.DataFrame:
    """Manifest of the VinDr-CXR (VinBigData) download at `root`, one row per image.

    `nodule_mass`: "both" or "unknown", how the one Nodule/Mass box class becomes CXR-LT's
    Nodule and Mass (see `split_nodule_mass`).

    `png_root`: folder of the converted PNGs (default `<root>/train_png`); `path` is
    `<png_root>/<image_id>.png` whether or not the PNG exists yet. `check_files` checks the
    source DICOMs under `train/` (one folder listing). Every image is 'train': the release's
    test labels are not public on Kaggle.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VinDr root folder not found")
    if not (root / CSV_NAME).is_file():
        raise DataError(f"{root}: no {CSV_NAME} (is this the VinDr-CXR / VinBigData folder?)")
    where = str(root / CSV_NAME)
    ann = read_annotations(root)
    labels = split_nodule_mass(aggregate_readers(ann, reader_policy, where), nodule_mass)
    ids = labels.index.to_series(index=None).astype(str).reset_index(drop=True)
    if check_files:
        found = scan_dicoms(root / DICOM_DIR)
        if not found:
            raise DataError(f"{root / DICOM_DIR}: no DICOM files (pass check_files=False to skip)")
        missing = ids[~ids.isin(set(found))].tolist()
        if missing:
            raise missing_files_error(root, missing, len(ids), CSV_NAME)
    png_root = Path(png_root) if png_root is not None else root / "train_png"
    meta = pd.DataFrame({
        "image_id": ids,
        "study_id": ids,
        "patient_id": ids,
        "source": SOURCE,
        "split": "train",
        "view": "frontal",
        "view_position": ids.where(np.zeros(len(ids), dtype=bool)),  # all missing, string dtype
        "path": str(png_root) + os.sep + ids + ".png",
    })  # fmt: skip
    return assemble_manifest(meta, labels, SOURCE, classes, where)
