"""Post-processing of the image-level model's probabilities: study-level aggregation over
views and per-class calibration fitted on the validation split.

Both need no training of the network, so they run inside the predict stage (what is
submitted) and the evaluate stage (every level side by side). Calibration is a strictly
increasing map per class: ranks, hence AP and AUROC, do not change; probabilities (ECE) do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cxrlt.errors import DataError
from cxrlt.submission import FUSED_PREFIX, IMAGE_PREFIX, probabilities

# image: the image model's own output. mean / max over a study's images. view_group: mean
# within frontal, within lateral and within unknown-view images, then the mean of the groups
# present, so each view type weighs the same whatever the image counts. fused: the stage-2
# fusion model's study prediction (the fuse stage).
AGGREGATIONS = ("image", "mean", "max", "view_group")
LEVELS = (*AGGREGATIONS, "fused")
CALIBRATIONS = ("none", "temperature", "platt")
# Probabilities are mapped to logits after clipping to [EPS, 1 - EPS]; float32 outputs of a
# sigmoid lie well inside, so distinct probabilities keep distinct logits (no new ties).
EPS = 1e-12
MIN_SLOPE = 1e-3  # a slope fitted <= 0 (no association on val) is held here: order is kept


def check_level(level: str, where: str = "params predict.level") -> str:
    if level not in LEVELS:
        raise DataError(f"{where}: unknown level {level!r}; valid: {', '.join(LEVELS)}")
    return level


def check_calibration(method: str, where: str = "params calibrate") -> str:
    if method not in CALIBRATIONS:
        raise DataError(f"{where}: unknown calibration {method!r}; valid: {', '.join(CALIBRATIONS)}")
    return method


def aggregate(
    probs: np.ndarray, study_ids: Sequence[Any] | np.ndarray, views: Sequence[str] | np.ndarray,
    level: str,
) -> np.ndarray:  # fmt: skip
    """(n, C) image probabilities -> (n, C) where every image holds its study's value."""
    if level not in AGGREGATIONS:
        raise DataError(f"aggregation level {level!r}; valid: {', '.join(AGGREGATIONS)}")
    probs = np.asarray(probs, dtype=np.float64)
    if level == "image":
        return probs.copy()
    if len(study_ids) != len(probs) or len(views) != len(probs):
        raise ValueError(f"{len(probs)} rows of probabilities, {len(study_ids)} study ids, {len(views)} views")
    study = pd.factorize(pd.Series(study_ids), sort=False)[0]
    frame = pd.DataFrame(probs)
    if level == "mean":
        table = frame.groupby(study, sort=False).mean()
    elif level == "max":
        table = frame.groupby(study, sort=False).max()
    else:
        view = pd.Series(views, dtype="string").fillna("unknown").to_numpy()
        per_view = frame.groupby([study, view], sort=False).mean()
        table = per_view.groupby(level=0, sort=False).mean()
    return table.loc[study].to_numpy(dtype=np.float64)


def level_scores(preds: pd.DataFrame, classes: Sequence[str], level: str, where: str = "predictions") -> np.ndarray:
    """(n, C) uncalibrated scores of a predictions file's rows at `level`, from its stored
    `image:` (and `fused:`) columns: the aggregations recomputed as the predict stage makes
    them, so the evaluate stage and `cxrlt compare --level` score one trained model at every
    level without re-running it."""
    check_level(level, where=f"{where}: level")
    if level == "fused":
        if not all(f"{FUSED_PREFIX}{c}" in preds.columns for c in classes):
            raise DataError(f"{where}: no {FUSED_PREFIX}<class> columns (the fuse stage did not run); "
                            "score another level")  # fmt: skip
        return probabilities(preds, classes, FUSED_PREFIX)
    image = probabilities(preds, classes, IMAGE_PREFIX)
    if level == "image":
        return image
    missing = [c for c in ("study_id", "view") if c not in preds.columns]
    if missing:
        raise DataError(f"{where}: no {missing} column(s), which the {level!r} aggregation needs")
    return aggregate(image, preds["study_id"].to_numpy(), preds["view"].to_numpy(), level)


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


@dataclass(frozen=True)
class Calibration:
    """p -> sigmoid(slope * logit(p) + intercept), one (slope, intercept) per class.

    Temperature scaling is the case intercept = 0, slope = 1 / T; `none` the identity.
    """

    method: str
    classes: tuple[str, ...]
    slope: np.ndarray
    intercept: np.ndarray

    def apply(self, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(self.classes):
            raise ValueError(f"probabilities {probs.shape} do not match {len(self.classes)} classes")
        if self.method == "none":
            return probs.copy()
        return _sigmoid(self.slope * logit(probs) + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method,
                "per_class": {c: {"slope": float(a), "intercept": float(b)} for c, a, b in
                              zip(self.classes, self.slope, self.intercept, strict=True)}}  # fmt: skip


def identity(classes: Sequence[str]) -> Calibration:
    n = len(classes)
    return Calibration("none", tuple(classes), np.ones(n), np.zeros(n))


def fit_calibration(y_val: np.ndarray, probs_val: np.ndarray, classes: Sequence[str], method: str) -> Calibration:
    """Per-class temperature or Platt scaling fitted on validation labels only.

    Maximum likelihood with Platt's (1999) smoothed targets, (N+ + 1) / (N+ + 2) for positives
    and 1 / (N- + 2) for negatives, so a class with few (or no) validation positives is not
    pushed to probabilities of exactly 0 or 1. Unknown labels (NaN) are left out; a class with
    no known label keeps the identity. The slope is kept >= MIN_SLOPE so the map stays
    strictly increasing.
    """
    check_calibration(method)
    y = np.asarray(y_val, dtype=np.float64).reshape(len(y_val), -1)
    z = logit(probs_val).reshape(y.shape)
    if y.shape[1] != len(classes):
        raise ValueError(f"{y.shape[1]} label columns for {len(classes)} classes")
    cal = identity(classes)
    if method == "none":
        return cal
    slope, intercept = cal.slope.copy(), cal.intercept.copy()
    for c in range(y.shape[1]):
        known = ~np.isnan(y[:, c])
        if not known.any():
            continue
        yc, zc = y[known, c], z[known, c]
        n_pos = float((yc == 1).sum())
        n_neg = float(len(yc) - n_pos)
        t = np.where(yc == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        if method == "temperature":
            slope[c] = max(_newton(zc[:, None], t, np.array([1.0]))[0], MIN_SLOPE)
            continue
        a, b = _newton(np.stack([zc, np.ones_like(zc)], axis=1), t, np.array([1.0, 0.0]))
        if a < MIN_SLOPE:  # no positive association on val: hold the slope, refit the intercept
            a = MIN_SLOPE
            b = _newton(np.ones((len(zc), 1)), t, np.array([b]), offset=a * zc)[0]
        slope[c], intercept[c] = a, b
    return Calibration(method, tuple(classes), slope, intercept)


def _newton(
    x: np.ndarray, t: np.ndarray, w: np.ndarray, offset: np.ndarray | float = 0.0,
    iterations: int = 100, tol: float = 1e-10,
) -> np.ndarray:  # fmt: skip
    """Logistic regression of soft targets t on features x (no penalty): Newton's method with
    step halving. The negative log-likelihood is convex in w, so this finds its minimum."""

    def nll(w: np.ndarray) -> float:
        eta = x @ w + offset
        # log(1 + e^eta) - t * eta, stably
        return float(np.sum(np.logaddexp(0.0, eta) - t * eta))

    current = nll(w)
    for _ in range(iterations):
        p = _sigmoid(x @ w + offset)
        grad = x.T @ (p - t)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6:
            candidate = w - scale * step
            value = nll(candidate)
            if value <= current:
                break
            scale *= 0.5
        else:
            break
        done = abs(current - value) <= tol * max(1.0, abs(current))
        w, current = candidate, value
        if done:
            break
    return w


@dataclass(frozen=True)
class Postprocessed:
    """What the predict stage submits: `probs` at the configured level, calibrated."""

    probs: np.ndarray
    level: str
    calibration: Calibration


def postprocess(
    image_probs: np.ndarray, rows: pd.DataFrame, y_val: np.ndarray, classes: Sequence[str],
    level: str, calibrate: str, fused: np.ndarray | None = None,
) -> Postprocessed:  # fmt: skip
    """Aggregate to `level` (or take the `fused` study predictions), then calibrate per class
    on the rows whose split is "val".

    `y_val` holds the labels of the val rows (in their order in `rows`) and nothing else:
    dev and test labels never reach the fit.
    """
    check_level(level)
    check_calibration(calibrate)
    if level == "fused":
        if fused is None:
            raise ValueError("level 'fused' needs the fusion model's predictions")
        agg = np.asarray(fused, dtype=np.float64)
    else:
        agg = aggregate(image_probs, rows["study_id"].to_numpy(), rows["view"].to_numpy(), level)
    val = (rows["split"] == "val").to_numpy()
    if calibrate != "none" and not val.any():
        raise DataError(f"params calibrate: {calibrate!r} is fitted on the val split, which has no rows here")
    if len(y_val) != int(val.sum()):
        raise ValueError(f"{len(y_val)} val label rows for {int(val.sum())} val predictions")
    cal = fit_calibration(y_val, agg[val], classes, calibrate)
    return Postprocessed(cal.apply(agg), level, cal)


def settings(params: Mapping[str, Any]) -> tuple[str, str]:
    """(predict.level, calibrate) from params, checked; defaults image / none."""
    level = str((params.get("predict") or {}).get("level", "image"))
    return check_level(level), check_calibration(str(params.get("calibrate", "none")))
