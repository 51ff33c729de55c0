"""Offline scoring of a CXR-LT submission against the (now public) labelled test CSVs.

All validation happens here, at the CSV boundary, so `cxrlt.metrics` only sees clean arrays.
Rows are matched by `dicom_id` and classes by name, never by position (the official task-2
development CSV orders Normal and Nodule differently from the training CSV). Every problem is
a `DataError` whose message names the file and the offending ids, rows or columns.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlt import metrics
from cxrlt.errors import DataError
from cxrlt.labels import (
    GROUPS,
    TASK1_TRAIN_COUNTS,
    TASK1_TRAIN_IMAGES,
    TASK2023_TRAIN_COUNTS,
    TASK2023_TRAIN_IMAGES,
    frequency_groups,
)
from cxrlt.labels import task_classes as _task_classes

ID = "dicom_id"
STUDY = "study_id"
LABEL_META = ("dicom_id", "subject_id", "study_id", "ViewPosition",
              "ViewCodeSequence_CodeMeaning", "fpath")  # fmt: skip
SUBMISSION_META = (ID, STUDY)  # the only non-class columns a submission may carry
_SHOW = 5  # how many offending ids a message lists
_ID_DTYPES = {"dicom_id": str, "subject_id": str, "study_id": str}
DEFAULT_GROUPS_SOURCE = "official CXR-LT training positive counts (2024 train_labeled.csv or 2023 train.csv)"


def task_classes(task: str) -> tuple[str, ...]:
    """The task's classes; an unknown task is a DataError (bad input, not a bug)."""
    try:
        return _task_classes(task)
    except KeyError as err:
        raise DataError(str(err.args[0])) from None


def _read_csv(path: str | os.PathLike, what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=_ID_DTYPES)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as CSV ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    dup_cols = sorted({c for c in df.columns if list(df.columns).count(c) > 1})
    if dup_cols:
        raise DataError(f"{path}: repeated column names {dup_cols}")
    return df


def _few(values: Sequence[Any] | np.ndarray) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_SHOW])
    return shown + (", ..." if len(values) > _SHOW else "")


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    if ID not in df.columns:
        raise DataError(f"{path}: no {ID!r} column (columns: {_few(df.columns)})")
    if df[ID].isna().any():
        row = int(np.flatnonzero(df[ID].isna().to_numpy())[0])
        raise DataError(f"{path}: empty {ID} in data row {row + 1}")
    dup = df[ID].duplicated(keep=False)
    if dup.any():
        ids = df.loc[dup, ID].unique()
        raise DataError(f"{path}: {len(ids)} duplicate {ID} values, e.g. {_few(ids)}")


def _numeric(df: pd.DataFrame, classes: Sequence[str], path: Path) -> np.ndarray:
    """(n, C) float64 of the class columns; a non-numeric cell is named by id and column."""
    out = np.empty((len(df), len(classes)))
    for j, c in enumerate(classes):
        col = pd.to_numeric(df[c], errors="coerce")
        bad = col.isna() & df[c].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: non-numeric value {df[c].iloc[i]!r} in column {c!r} "
                f"for {ID} {df[ID].iloc[i]} ({int(bad.sum())} such cells in that column)"
            )
        out[:, j] = col.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _for_task(task: str | None) -> str:
    return f" for {task} (is --task right?)" if task else ""


def _first_cell(mask: np.ndarray) -> tuple[int, int]:
    r, c = np.argwhere(mask)[0]
    return int(r), int(c)


def read_labels(
    path: str | os.PathLike, classes: Sequence[str], task: str | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """Labels CSV (official CXR-LT 2024 format) -> (rows, (n, C) labels of 1 / 0 / NaN).

    Empty cells mean "unknown" and are masked out of that class's metrics; anything other
    than 0, 1 or empty is an error. Label columns are selected by name; extra columns (other
    tasks' classes, metadata) are ignored.
    """
    path = Path(path)
    df = _read_csv(path, "labels")
    _check_ids(df, path)
    missing = [c for c in classes if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing label columns {missing}{_for_task(task)}")
    y = _numeric(df, classes, path)
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        r, c = _first_cell(bad)
        raise DataError(
            f"{path}: label {y[r, c]!r} in column {classes[c]!r} for {ID} {df[ID].iloc[r]}; "
            "expected 0, 1 or empty"
        )
    return df, y


def read_submission(
    path: str | os.PathLike, classes: Sequence[str], task: str | None = None
) -> pd.DataFrame:
    """Submission CSV: `dicom_id`, optional `study_id`, one probability column per class.

    Checks the columns (by name), duplicate ids, and that every probability is a number in
    [0, 1]; returns the frame with the class columns as float64. A file of hard 0/1 values
    is scored, with a one-line warning on stderr that `score` also records in its result.
    """
    path = Path(path)
    df = _read_csv(path, "predictions")
    _check_ids(df, path)
    missing = [c for c in classes if c not in df.columns]
    extra = [c for c in df.columns if c not in classes and c not in SUBMISSION_META]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing class columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra} (not classes of {task or 'this task'})")
        raise DataError(f"{path}: " + "; ".join(parts) + _for_task(task if missing else None))
    p = _numeric(df, classes, path)
    nan = np.isnan(p)
    if nan.any():
        r, c = _first_cell(nan)
        raise DataError(
            f"{path}: missing probability in column {classes[c]!r} for {ID} {df[ID].iloc[r]} "
            f"({int(nan.sum())} empty/NaN cells in all)"
        )
    outside = (p < 0) | (p > 1) | ~np.isfinite(p)
    if outside.any():
        r, c = _first_cell(outside)
        raise DataError(
            f"{path}: probability {p[r, c]!r} outside [0, 1] in column {classes[c]!r} "
            f"for {ID} {df[ID].iloc[r]} ({int(outside.sum())} such cells in all)"
        )
    out = df.loc[:, [ID, *(m for m in SUBMISSION_META[1:] if m in df.columns)]].copy()
    out[list(classes)] = p
    out.attrs["warnings"] = []
    if p.size and np.isin(p, (0.0, 1.0)).all():
        # mAP ranks images by probability: hard labels make every class two ties
        out.attrs["warnings"].append(
            f"{path}: every value is 0 or 1; mAP and AUROC need probabilities, so these are the "
            "scores of hard labels (one tie per class), not of a ranking"
        )
        print(f"warning: {out.attrs['warnings'][-1]}", file=sys.stderr)
    return out


def align(
    labels: pd.DataFrame,
    submission: pd.DataFrame,
    classes: Sequence[str],
    predictions_path: str | os.PathLike,
) -> np.ndarray:
    """(n, C) scores in the labels' row order; every labelled id must be predicted, once."""
    label_ids = pd.Index(labels[ID])
    sub_ids = pd.Index(submission[ID])
    missing = label_ids.difference(sub_ids, sort=False)
    extra = sub_ids.difference(label_ids, sort=False)
    if len(missing):
        raise DataError(
            f"{predictions_path}: {len(missing)} of {len(label_ids)} labelled {ID}s have no "
            f"prediction, e.g. {_few(missing)}"
        )
    if len(extra):
        raise DataError(
            f"{predictions_path}: {len(extra)} {ID}s are not in the labels file, e.g. {_few(extra)}"
        )
    rows = sub_ids.get_indexer(label_ids)
    return submission[list(classes)].to_numpy(dtype=np.float64)[rows]


def training_groups(
    classes: Sequence[str], train_labels: str | os.PathLike | None = None
) -> tuple[dict[str, str] | None, str | None]:
    """Head/medium/tail per class and where they came from.

    From a training CSV's positive counts when given, else from the official Task 1 training
    counts (Task 2 is the same training data restricted to its classes). Task 3's classes
    have no training labels, so it has no groups unless a CSV provides them.
    """
    if train_labels is not None:
        path = Path(train_labels)
        df = _read_csv(path, "training labels")
        missing = [c for c in classes if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing label columns {missing} needed for the groups")
        y = _numeric(df, classes, path)
        if len(df) == 0:
            raise DataError(f"{path}: no rows")
        counts = (y == 1).sum(axis=0)
        return frequency_groups(counts, len(df), classes), str(path)
    for counts, n in ((TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES), (TASK2023_TRAIN_COUNTS, TASK2023_TRAIN_IMAGES)):
        if all(c in counts for c in classes):
            return frequency_groups(counts, n, classes), DEFAULT_GROUPS_SOURCE
    return None, None


def read_thresholds(path: str | os.PathLike, classes: Sequence[str]) -> np.ndarray:
    """Per-class thresholds tuned on validation, from a JSON object {class: threshold}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"thresholds file {path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(obj, Mapping):
        raise DataError(f"{path}: expected a JSON object mapping class names to thresholds")
    missing = [c for c in classes if c not in obj]
    if missing:
        raise DataError(f"{path}: no threshold for classes {missing}")
    # a threshold is a number in [0, 1]: NaN compares false and true is an int in Python, and
    # either would silently turn every prediction of the class negative (F1 0)
    bad = [c for c in classes if isinstance(obj[c], bool) or not isinstance(obj[c], int | float)
           or not 0 <= obj[c] <= 1]  # fmt: skip
    if bad:
        raise DataError(
            f"{path}: threshold of class {bad[0]!r} is {json.dumps(obj[bad[0]])}; expected a "
            f"number in [0, 1] ({len(bad)} such classes)"
        )
    return np.asarray([obj[c] for c in classes], dtype=np.float64)


def score(
    labels: str | os.PathLike,
    predictions: str | os.PathLike,
    task: str = "task1",
    train_labels: str | os.PathLike | None = None,
    thresholds: str | os.PathLike | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    ci_method: str = "bca",
) -> dict[str, Any]:
    """Score a submission file against a labels file: `metrics.evaluate` plus provenance.

    Bootstrap clusters are the labels' `study_id` (views of one study are correlated);
    without that column every image is its own cluster. `ci_method`: "bca", "percentile" or
    "basic" (`metrics.bootstrap_interval`).
    """
    classes = task_classes(task)
    label_df, y = read_labels(labels, classes, task)
    submission = read_submission(predictions, classes, task)
    scores = align(label_df, submission, classes, predictions)
    groups, groups_from = training_groups(classes, train_labels)
    tuned = read_thresholds(thresholds, classes) if thresholds is not None else None
    ids = label_df[STUDY].to_numpy() if STUDY in label_df.columns else None
    if ids is not None and pd.isna(ids).any():
        raise DataError(f"{labels}: empty {STUDY} values (needed for the study bootstrap)")
    result = metrics.evaluate(
        y, scores, classes, groups, thresholds=tuned, ids=ids,
        n_bootstrap=n_bootstrap, seed=seed, ci=ci, ci_method=ci_method,
    )  # fmt: skip
    return {
        "task": task,
        "labels": str(labels),
        "predictions": str(predictions),
        "groups_from": groups_from,
        "clusters": STUDY if ids is not None else ID,
        "warnings": submission.attrs.get("warnings", []),
        **result,
    }


def _fmt(x: float | None, width: int = 7) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}.4f}"


def format_report(result: Mapping[str, Any]) -> str:
    """A readable per-class table followed by the summary with confidence intervals."""
    per_class = result["per_class"]
    name_w = max([len("class"), *(len(c) for c in per_class)])
    tuned = "mF1@tuned" in result
    header = (
        f"{'class':<{name_w}}  {'group':<6}  {'pos':>6}  {'AP':>7}  {'AUROC':>7}  {'F1@0.5':>7}"
    )
    header += f"  {'F1@tun':>7}" if tuned else ""
    header += f"  {'ECE':>7}"
    lines = [header, "-" * len(header)]
    for c, m in per_class.items():
        line = (
            f"{c:<{name_w}}  {m['group'] or '-':<6}  {m['positives']:>6}  {_fmt(m['ap'])}  "
            f"{_fmt(m['auroc'])}  {_fmt(m['f1'])}"
        )
        line += f"  {_fmt(m['f1_tuned'])}" if tuned else ""
        line += f"  {_fmt(m['ece'])}"
        lines.append(line)
    lines.append("")
    boot = result.get("bootstrap")
    cis = result.get("ci", {})
    caveats = result.get("ci_caveats") or {}
    title = f"{result['task']}: " if "task" in result else ""
    title += f"{result['n_images']} images"
    if boot:
        unit = f" ({result['clusters']})" if "clusters" in result else ""
        title += (
            f"; {boot['level']:.0%} {boot['method']} CI from {boot['replicates']} bootstrap "
            f"replicates over {boot['n_clusters']} clusters{unit}"
        )
    lines.append(title)
    keys = ["mAP", *(f"mAP_{g}" for g in GROUPS), "mAUROC", "mF1@0.5", "mF1@tuned", "mECE"]
    for k in keys:
        if k not in result:
            continue
        line = f"  {k:<11}{_fmt(result[k])}"
        if cis.get(k) is not None:
            lo, hi = cis[k]
            line += f"  [{lo:.4f}, {hi:.4f}]"
        lines.append(line)
        if caveats.get(k):
            lines.append(f"  {'':<11}{'':>7}  caveat: {caveats[k]}")
    if result["undefined_classes"]:
        lines.append(
            "  undefined (no positives, left out of every mean): "
            + ", ".join(result["undefined_classes"])
        )
    return "\n".join(lines)
