"""CheXpert adapter: the official download (CheXpert-v1.0 or CheXpert-v1.0-small) -> a manifest.

Layout: `root` is the dataset folder holding `train.csv`, `valid.csv` (optional: some
mirrors ship train only), `train/` and `valid/`. The CSV `Path` column names images as
`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`, i.e. relative to the
root's *parent*; we drop that first folder and resolve the rest under `root`, so a renamed
dataset folder still works (paths that start at `train/` are taken as they are).

Labels: 14 columns holding 1 (positive), 0 (negative), -1 (uncertain) or blank (not
mentioned in the report). `read_chexpert_raw` returns them untouched; `read_chexpert`
applies two explicit policies, one per kind of missing certainty (see `apply_policies`).
Ids from the path: `patient_id` = `patient00001`, `study_id` = `patient00001_study1`,
`image_id` = `patient00001_study1_view1_frontal`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

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
from cxrlt.data.manifest import SPLITS, view_group
from cxrlt.errors import DataError

SOURCE = "chexpert"
CHEXPERT_LABELS: tuple[str, ...] = tuple(LABEL_MAP[SOURCE])
NO_FINDING = "No Finding"
# Not a pathology: CheXpert's "No Finding" images may still carry support devices.
NOT_A_FINDING = ("No Finding", "Support Devices")
REQUIRED_COLUMNS = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS)
CSV_SPLITS = {"train.csv": "train", "valid.csv": None}  # None: the `valid_split` argument
PATH_RE = (
    r"^(?:(?P<top>[^/]+)/)?(?P<part>train|valid|test)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)/(?P<view>[^/]+)(?P<ext>\.(?:jpg|jpeg|png))$"
)
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
BLANK_POLICIES = ("zeros", "ignore")

UncertainPolicy = Literal["ignore", "ones", "zeros"]
BlankPolicy = Literal["zeros", "ignore"]


def read_chexpert_raw(root: str | os.PathLike, valid_split: str = "test") -> pd.DataFrame:
    """train.csv (+ valid.csv) as they are; labels keep -1 and blank (NaN) apart.

    Adds `split`, and `csv_file` / `csv_row` so messages can name the line. Validated:
    required columns present, label values in {1, 0, -1, blank}, `Path` unique.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CheXpert root folder not found")
    if valid_split not in SPLITS:
        raise DataError(f"valid_split {valid_split!r} is not one of {SPLITS}")
    if not (root / "train.csv").is_file():
        raise DataError(
            f"{root}: no train.csv (is this the CheXpert-v1.0 or CheXpert-v1.0-small folder?)"
        )
    frames = []
    for name, split in CSV_SPLITS.items():
        path = root / name
        if not path.is_file():
            continue
        text = ("Path", "Frontal/Lateral", "AP/PA")
        df = read_table(path, REQUIRED_COLUMNS, dtype=dict.fromkeys(text, str))
        check_ids(df["Path"], path, "Path")
        for label in CHEXPERT_LABELS:
            values = pd.to_numeric(df[label], errors="coerce")
            bad = (values.isna() & df[label].notna()) | ~(values.isna() | values.isin([1, 0, -1]))
            if bad.any():
                row = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"{path}: line {csv_line(row)} column {label!r} holds {_cell(df[label].iloc[row])}; "
                    "expected 1, 0, -1 or blank"
                )
            df[label] = values.astype(np.float32)
        df["split"] = split or valid_split
        frames.append(df.assign(csv_file=name, csv_row=np.arange(len(df))))
    raw = pd.concat(frames, ignore_index=True)
    check_ids(raw["Path"], root / "train.csv + valid.csv", "Path")
    return raw


def _cell(value: object) -> str:
    """A CSV cell as the user wrote it: '2' rather than np.float64(2.0)."""
    return repr(value) if isinstance(value, str) else repr(f"{float(value):g}")


def apply_policies(
    raw: pd.DataFrame, uncertain: UncertainPolicy = "ignore", blank: BlankPolicy = "zeros"
) -> pd.DataFrame:
    """The 14 raw label columns -> 1 / 0 / NaN under the two policies.

    uncertain (-1): "ignore" -> NaN (U-Ignore, masked), "ones" -> 1 (U-Ones), "zeros" -> 0.
    blank (not mentioned): default "zeros". The labeller leaves a finding blank when the
    report does not mention it, which is how the CXR-LT MIMIC labels encode negatives (their
    training CSVs hold 0/1 only), and blank = 0 is CheXpert's own training convention. Blank as
    unknown would also leave most classes almost without negatives (Pleural Other: 3,523
    positives, 316 explicit negatives, 216,922 blank; "No Finding" is never 0).
    "ignore" keeps blank unknown except where the labeller's own rules imply the value:
    a "No Finding" image has no finding (Support Devices aside), and an image with a
    positive finding (after the uncertain policy) is not "No Finding".
    Uncertain and blank stay distinct unless both policies say "zeros".
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise DataError(f"uncertain policy {uncertain!r}; valid: {UNCERTAIN_POLICIES}")
    if blank not in BLANK_POLICIES:
        raise DataError(f"blank policy {blank!r}; valid: {BLANK_POLICIES}")
    y = raw.loc[:, list(CHEXPERT_LABELS)].to_numpy(dtype=np.float32, na_value=np.nan, copy=True)
    is_blank = np.isnan(y)
    y[y == -1] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    if blank == "zeros":
        y[is_blank] = 0.0
    else:
        col = {c: j for j, c in enumerate(CHEXPERT_LABELS)}
        findings = [col[c] for c in CHEXPERT_LABELS if c not in NOT_A_FINDING]
        nf = col[NO_FINDING]
        normal = y[:, nf] == 1
        sub = y[:, findings]
        sub[normal[:, None] & is_blank[:, findings]] = 0.0
        y[:, findings] = sub
        abnormal = (y[:, findings] == 1).any(axis=1)
        y[abnormal & is_blank[:, nf], nf] = 0.0
    return pd.DataFrame(y, columns=list(CHEXPERT_LABELS), index=raw.index)


def read_chexpert(
    root: str | os.PathLike,
    classes: Sequence[str],
    uncertain: UncertainPolicy = "ignore",
    check_files: bool = True,
    blank: BlankPolicy = "zeros",
    valid_split: str = "test",
) -> pd.DataFrame:
    """Manifest of the CheXpert download at `root`, labels aligned to `classes`.

    train.csv rows are 'train'; valid.csv rows (234 radiologist-consensus images, disjoint
    patients) get `valid_split`, default 'test': the one expert-labelled CheXpert set is
    worth keeping out of pretraining to measure it; a patient-level 'val' is carved from
    'train' later. `check_files` stats every image (CheXpert nests one folder per study, so a
    listing would cost as much); turn it off for a quick manifest.
    """
    root = Path(root)
    raw = read_chexpert_raw(root, valid_split=valid_split)
    parts = raw["Path"].str.strip().str.extract(PATH_RE)
    bad = parts["patient"].isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{root / raw['csv_file'].iloc[row]}: line {csv_line(raw['csv_row'].iloc[row])} has Path "
            f"{raw['Path'].iloc[row]!r}; expected "
            "'<folder>/train|valid/patientNNNNN/studyN/viewN_<frontal|lateral>.jpg'"
        )
    paths = str(root) + os.sep + parts["part"]
    for key in ("patient", "study"):
        paths = paths + os.sep + parts[key]
    paths = paths + os.sep + parts["view"] + parts["ext"]
    if check_files:
        if not (root / "train").is_dir():
            raise DataError(f"{root}: no train/ image folder (pass check_files=False to skip)")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise missing_files_error(root, missing, len(paths), "train.csv/valid.csv")

    study = parts["patient"] + "_" + parts["study"]
    frontal_lateral = raw["Frontal/Lateral"].str.strip()
    ap_pa = raw["AP/PA"].str.strip().str.upper()
    meta = pd.DataFrame({
        "image_id": study + "_" + parts["view"],
        "study_id": study,
        "patient_id": parts["patient"],
        "source": SOURCE,
        "split": raw["split"],
        "view": frontal_lateral.map({v: view_group(v) for v in frontal_lateral.dropna().unique()})
        .fillna("unknown"),
        "view_position": ap_pa.fillna(frontal_lateral.str.upper()),
    })  # fmt: skip
    meta["path"] = paths
    labels = apply_policies(raw, uncertain=uncertain, blank=blank)
    return assemble_manifest(meta, labels, SOURCE, classes, str(root / "train.csv"))
