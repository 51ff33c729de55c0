"""NIH ChestX-ray14 adapter: the official download (NIH box or Kaggle) -> an image manifest.

Layout under `root` (as downloaded, nothing renamed):
    Data_Entry_2017_v2020.csv  or  Data_Entry_2017.csv   (v2020 preferred when both exist)
    train_val_list.txt, test_list.txt                     (official patient-level split)
    images/*.png                                          (NIH box tarballs)
    images_001/images/*.png ... images_012/images/*.png   (Kaggle)

All 14 NIH findings plus "No Finding" are fully observed (0/1); CXR-LT classes NIH does not
annotate are unknown (NaN). Ids: `image_id` = `Image Index` (the file name, as the split
lists spell it), `patient_id` = `Patient ID` zero-padded to 8 digits as in the file names,
`study_id` = `<patient>_<follow-up>` (one image per study). The v2020 release renumbered
`Follow-up #` chronologically, so the study id no longer always equals the file stem.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrlt.data.harmonise import (
    LABEL_MAP,
    assemble_manifest,
    check_ids,
    csv_line,
    missing_files_error,
    read_table,
)
from cxrlt.data.manifest import view_group
from cxrlt.errors import DataError

SOURCE = "nih"
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # preference order
TRAIN_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position")
NIH_LABELS: tuple[str, ...] = tuple(LABEL_MAP[SOURCE])
NO_FINDING = "No Finding"


def find_metadata_csv(root: Path) -> Path:
    """The label CSV under `root`, preferring the 2020 revision."""
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise DataError(
        f"{root}: no NIH label file; expected one of {list(CSV_NAMES)} "
        "(is this the root of the NIH ChestX-ray14 download?)"
    )


def parse_findings(labels: pd.Series, path: Path, image_ids: pd.Series) -> pd.DataFrame:
    """'A|B|...' / 'No Finding' -> 0/1 columns NIH_LABELS; unknown names raise naming the line."""
    text = labels.astype("string").str.replace(r"\s*\|\s*", "|", regex=True).str.strip()
    empty = (text.isna() | (text == "")).to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError(
            f"{path}: line {csv_line(row)} ({image_ids.iloc[row]}) has empty 'Finding Labels'"
        )
    dummies = text.str.get_dummies(sep="|")
    unknown = [c for c in dummies.columns if c not in NIH_LABELS]
    if unknown:
        row = int(np.flatnonzero(dummies[unknown[0]].to_numpy())[0])
        raise DataError(
            f"{path}: line {csv_line(row)} ({image_ids.iloc[row]}) has unknown finding "
            f"{unknown[0]!r} in 'Finding Labels' = {labels.iloc[row]!r}; valid: {list(NIH_LABELS)}"
        )
    out = pd.DataFrame(0.0, index=labels.index, columns=list(NIH_LABELS), dtype=np.float32)
    for c in dummies.columns:
        out[c] = dummies[c].to_numpy(dtype=np.float32)
    both = (out[NO_FINDING] == 1) & (out.drop(columns=NO_FINDING).sum(axis=1) > 0)
    if both.any():
        row = int(np.flatnonzero(both.to_numpy())[0])
        raise DataError(
            f"{path}: line {csv_line(row)} ({image_ids.iloc[row]}) lists 'No Finding' together "
            f"with findings: {labels.iloc[row]!r}"
        )
    return out


def read_split_lists(root: Path, image_ids: pd.Series) -> np.ndarray:
    """Split per image from the official lists: 'test' if in test_list.txt, else 'train'."""
    lists = {}
    for name in (TRAIN_LIST, TEST_LIST):
        path = root / name
        if not path.is_file():
            raise DataError(
                f"{path}: official split list not found (pass official_split=False to put every "
                "image in 'train' and split by patient later)"
            )
        lists[name] = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    both = lists[TRAIN_LIST] & lists[TEST_LIST]
    if both:
        raise DataError(
            f"{root}: {len(both)} images are in both {TRAIN_LIST} and {TEST_LIST}, "
            f"e.g. {sorted(both)[:5]}"
        )
    return np.where(image_ids.isin(lists[TEST_LIST]).to_numpy(), "test", "train")


def scan_images(root: Path) -> tuple[dict[str, str], list[Path]]:
    """File name -> path for every PNG under images/ and images_*/images/, one listing per folder.

    One `os.scandir` per folder instead of a stat per image: 112k stats are slow on network
    file systems, twelve listings are not.
    """
    folders = [root / "images", *sorted(root.glob("images_*/images"))]
    folders = [f for f in folders if f.is_dir()]
    found: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.lower().endswith(".png"):
                    continue
                if entry.name in found:
                    raise DataError(
                        f"{entry.name} exists twice: {found[entry.name]} and {entry.path}"
                    )
                found[entry.name] = entry.path
    return found, folders


def read_nih(
    root: str | os.PathLike,
    classes: Sequence[str],
    check_files: bool = True,
    official_split: bool = True,
) -> pd.DataFrame:
    """Manifest of the NIH ChestX-ray14 download at `root`, labels aligned to `classes`.

    Splits: images in test_list.txt are 'test', all others 'train' (a patient-level
    validation split is carved from 'train' later). With `official_split=False` every image
    is 'train'. `check_files` raises when an image is not on disk; without it, images not
    found get the path `images/<Image Index>` under root.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: NIH root folder not found")
    csv = find_metadata_csv(root)
    text_columns = ("Image Index", "Finding Labels", "View Position")
    df = read_table(csv, REQUIRED_COLUMNS, dtype=dict.fromkeys(text_columns, str))
    ids = df["Image Index"].str.strip()
    check_ids(ids, csv, "Image Index")
    numbers = {}
    for col in ("Patient ID", "Follow-up #"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = (values.isna() | (values < 0) | (values != values.round())).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{csv}: line {csv_line(row)} ({ids.iloc[row]}) has {col} = {df[col].iloc[row]!r}; "
                "expected a non-negative integer"
            )
        numbers[col] = values.astype(np.int64)
    labels = parse_findings(df["Finding Labels"], csv, ids)

    split = read_split_lists(root, ids) if official_split else np.full(len(df), "train")

    found, folders = scan_images(root)
    if check_files:
        if not folders:
            raise DataError(f"{root}: no images/ or images_*/images/ folder with the NIH PNGs")
        missing = ids[~ids.isin(set(found))].tolist()
        if missing:
            raise missing_files_error(root, missing, len(ids), csv.name)
    paths = ids.map(found).fillna(str(root / "images") + os.sep + ids)

    patient = numbers["Patient ID"].astype(str).str.zfill(8)
    view_position = df["View Position"].str.strip().str.upper()
    views = {code: view_group(code) for code in view_position.unique()}
    meta = pd.DataFrame({
        "image_id": ids,
        "study_id": patient + "_" + numbers["Follow-up #"].astype(str).str.zfill(3),
        "patient_id": patient,
        "source": SOURCE,
        "split": split,
        "view": view_position.map(views).fillna("unknown"),
        "view_position": view_position,
        "path": paths,
    })  # fmt: skip
    return assemble_manifest(meta, labels, SOURCE, classes, str(csv))
