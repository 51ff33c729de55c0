"""Patient-level validation split with iterative multi-label stratification.

Splitting over image rows leaks studies and patients between train and validation (views
of one study are near-duplicates); here the unit is the patient, and patients are assigned
by iterative multi-label stratification so that rare labels reach both sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cxrlt.data.manifest import label_matrix


def iterative_stratification(
    y: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """Assign each row of the 0/1 matrix `y` (n, C) to a fold; returns fold index per row.

    Greedy: repeatedly take the label with the fewest remaining positives and hand its rows
    to the fold that most lacks that label (ties: most lacking rows overall, then random).
    """
    n = y.shape[0]
    fractions = np.asarray(fractions, dtype=float) / np.sum(fractions)
    y = y.astype(bool)
    fold = np.full(n, -1, dtype=np.int64)
    want_rows = fractions * n
    want_label = np.outer(fractions, y.sum(axis=0))  # (k, C)
    remaining = y.copy()
    left = np.ones(n, dtype=bool)
    while left.any():
        counts = remaining.sum(axis=0)
        if counts.max() == 0:
            rows = np.flatnonzero(left)
            for r in rng.permutation(rows):
                best = np.flatnonzero(want_rows == want_rows.max())
                f = rng.choice(best)
                fold[r] = f
                want_rows[f] -= 1
            break
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        rows = np.flatnonzero(remaining[:, label])
        for r in rng.permutation(rows):
            need = want_label[:, label]
            cand = np.flatnonzero(need == need.max())
            if len(cand) > 1:
                sub = want_rows[cand]
                cand = cand[sub == sub.max()]
            f = int(rng.choice(cand))
            fold[r] = f
            want_rows[f] -= 1
            want_label[f] -= y[r]
            remaining[r] = False
            left[r] = False
    return fold


def patient_val_split(
    df: pd.DataFrame, classes: Sequence[str], val_fraction: float, seed: int
) -> pd.Series:
    """Move `val_fraction` of the training patients to split "val", stratified on labels.

    A patient's label vector is the union of its images' positives, so a patient counts for
    every label it carries. Returns the new split column; other splits are untouched.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train = df["split"] == "train"
    sub = df.loc[train, ["patient_id"]].copy()
    y = np.nan_to_num(label_matrix(df.loc[train], classes), nan=0.0) > 0
    per_patient = pd.DataFrame(y, index=sub.index).groupby(sub["patient_id"].to_numpy()).max()
    rng = np.random.default_rng(seed)
    folds = iterative_stratification(
        per_patient.to_numpy(), [1.0 - val_fraction, val_fraction], rng
    )
    val_patients = set(per_patient.index[folds == 1])
    split = df["split"].copy()
    split.loc[train & df["patient_id"].isin(val_patients)] = "val"
    return split
