"""Study-level aggregation and per-class calibration (src/cxrlt/postprocess.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlt import metrics as M
from cxrlt.errors import DataError
from cxrlt.postprocess import (
    MIN_SLOPE,
    aggregate,
    fit_calibration,
    level_scores,
    postprocess,
    settings,
)

CLASSES = ["A", "B"]


def _study_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # study s1: two frontal views and one lateral; study s2: a single view of unknown type
    study = np.array(["s1", "s1", "s2", "s1"])
    view = np.array(["frontal", "frontal", "unknown", "lateral"])
    probs = np.array([[0.1, 0.9], [0.3, 0.5], [0.7, 0.2], [0.8, 0.1]])
    return probs, study, view


def test_aggregation_levels_by_hand():
    probs, study, view = _study_rows()
    assert np.array_equal(aggregate(probs, study, view, "image"), probs)
    mean = aggregate(probs, study, view, "mean")
    np.testing.assert_allclose(mean[[0, 1, 3]], [[0.4, 0.5]] * 3)
    np.testing.assert_allclose(mean[2], probs[2])
    np.testing.assert_allclose(aggregate(probs, study, view, "max")[0], [0.8, 0.9])
    # view groups: frontal mean (0.2, 0.7) and lateral (0.8, 0.1) weigh half each
    grouped = aggregate(probs, study, view, "view_group")
    np.testing.assert_allclose(grouped[[0, 1, 3]], [[0.5, 0.4]] * 3)
    np.testing.assert_allclose(grouped[2], probs[2])


def test_level_scores_read_a_predictions_file_as_the_predict_stage_aggregates():
    probs, study, view = _study_rows()
    fused = probs[::-1].copy()
    preds = pd.DataFrame({"study_id": study, "view": view,
                          **{f"image:{c}": probs[:, i] for i, c in enumerate(CLASSES)},
                          **{f"fused:{c}": fused[:, i] for i, c in enumerate(CLASSES)}})  # fmt: skip
    for level in ("image", "mean", "max", "view_group"):
        np.testing.assert_array_equal(level_scores(preds, CLASSES, level), aggregate(probs, study, view, level))
    np.testing.assert_array_equal(level_scores(preds, CLASSES, "fused"), fused)
    image_only = preds.drop(columns=["study_id", "view", "fused:A", "fused:B"])
    np.testing.assert_array_equal(level_scores(image_only, CLASSES, "image"), probs)
    with pytest.raises(DataError, match=r"run7.csv: no fused:<class> columns"):
        level_scores(image_only, CLASSES, "fused", where="run7.csv")
    with pytest.raises(DataError, match=r"\['study_id', 'view'\].*'mean'"):
        level_scores(image_only, CLASSES, "mean")
    with pytest.raises(DataError, match="unknown level 'median'"):
        level_scores(preds, CLASSES, "median")


def test_aggregation_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    n = 60
    study = rng.integers(0, 15, n).astype(str)
    view = rng.choice(["frontal", "lateral", "unknown"], n)
    probs = rng.random((n, 3))
    perm = rng.permutation(n)
    for level in ("mean", "max", "view_group"):
        a = aggregate(probs, study, view, level)
        b = aggregate(probs[perm], study[perm], view[perm], level)
        np.testing.assert_allclose(a[perm], b, rtol=0, atol=1e-15)
        # every image of a study holds one value
        assert pd.DataFrame(a).groupby(study).nunique().max().max() == 1


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from sigmoid(z); scores sigmoid(3 z - 2): over-confident and shifted."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.0, 1.5, (n, 2))
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-z))).astype(float)
    return y, 1 / (1 + np.exp(-(3 * z - 2)))


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_calibration_keeps_ranks_and_lowers_ece_on_held_out_data(method):
    y_val, s_val = _miscalibrated(4000, 0)
    y_test, s_test = _miscalibrated(4000, 1)
    cal = fit_calibration(y_val, s_val, CLASSES, method)
    out = cal.apply(s_test)
    np.testing.assert_array_equal(M.average_precision(y_test, out), M.average_precision(y_test, s_test))
    np.testing.assert_array_equal(M.roc_auc(y_test, out), M.roc_auc(y_test, s_test))
    before = M.expected_calibration_error(y_test, s_test)
    after = M.expected_calibration_error(y_test, out)
    assert (after < before).all(), (before, after)
    if method == "platt":  # the inverse of 3 z - 2: slope 1/3, intercept 2/3 (smoothed targets)
        np.testing.assert_allclose(cal.slope, 1 / 3, atol=0.03)
        np.testing.assert_allclose(cal.intercept, 2 / 3, atol=0.1)
        assert (after < 0.02).all()
    else:
        assert np.all(cal.intercept == 0) and np.all(cal.slope > 0)


def test_calibration_makes_no_new_ties_and_keeps_order():
    # distinct float32 probabilities up to 1 - 6e-8 and exactly 1.0 stay distinct and ordered
    s = np.array([0.5, 0.9, 0.999, 0.9999999, np.float32(0.99999994), 1.0, 1e-9, 0.0], dtype=np.float32)
    y = np.array([0, 1, 1, 1, 1, 1, 0, 0], dtype=float)
    cal = fit_calibration(np.tile(y, 3)[:, None], np.tile(s, 3)[:, None].astype(np.float64), ["A"], "platt")
    out = cal.apply(s.astype(np.float64)[:, None])[:, 0]
    assert np.array_equal(np.argsort(out, kind="stable"), np.argsort(s, kind="stable"))
    assert len(np.unique(out)) == len(np.unique(s))


def test_reversed_scores_hold_the_minimum_slope_and_keep_order():
    rng = np.random.default_rng(3)
    s = rng.random(500)
    y = (rng.random(500) < 1 - s).astype(float)  # the scores point the wrong way on val
    cal = fit_calibration(y[:, None], s[:, None], ["A"], "platt")
    assert cal.slope[0] == MIN_SLOPE
    out = cal.apply(s[:, None])[:, 0]
    assert np.array_equal(np.argsort(out), np.argsort(s))
    # nearly constant at the (smoothed) val positive rate
    assert abs(out.mean() - y.mean()) < 0.02


def test_classes_without_labels_or_positives():
    s = np.linspace(0.01, 0.99, 50)[:, None].repeat(2, axis=1)
    y = np.zeros((50, 2))
    y[:, 1] = np.nan  # class B: no known label -> identity
    cal = fit_calibration(y, s, CLASSES, "platt")
    assert cal.slope[1] == 1 and cal.intercept[1] == 0
    out = cal.apply(s)
    assert np.isfinite(out).all() and out[:, 0].max() < 0.2  # no positives: low, but not 0
    assert (np.diff(out[:, 0]) > 0).all()


def test_unknown_labels_are_left_out_of_the_fit():
    y_val, s_val = _miscalibrated(2000, 4)
    with_nan = np.vstack([y_val, np.full((500, 2), np.nan)])
    scores = np.vstack([s_val, np.random.default_rng(5).random((500, 2))])
    a = fit_calibration(y_val, s_val, CLASSES, "platt")
    b = fit_calibration(with_nan, scores, CLASSES, "platt")
    np.testing.assert_allclose(a.slope, b.slope)
    np.testing.assert_allclose(a.intercept, b.intercept)


def test_postprocess_fits_on_val_rows_only():
    rng = np.random.default_rng(6)
    n = 300
    rows = pd.DataFrame({
        "study_id": rng.integers(0, 100, n).astype(str),
        "view": rng.choice(["frontal", "lateral"], n),
        "split": rng.choice(["val", "dev", "test"], n),
    })  # fmt: skip
    probs = rng.random((n, 2))
    n_val = int((rows["split"] == "val").sum())
    y_val = (rng.random((n_val, 2)) < 0.3).astype(float)
    out = postprocess(probs, rows, y_val, CLASSES, "view_group", "platt")
    again = postprocess(probs, rows, y_val, CLASSES, "view_group", "platt")
    np.testing.assert_array_equal(out.probs, again.probs)
    with pytest.raises(ValueError, match="val label rows"):
        postprocess(probs, rows, np.zeros((n, 2)), CLASSES, "image", "platt")


def test_bad_settings_name_the_key_and_the_choices():
    with pytest.raises(DataError, match=r"predict.level.*'study'.*image, mean, max, view_group"):
        settings({"predict": {"level": "study"}})
    with pytest.raises(DataError, match=r"calibrate.*'isotonic'.*none, temperature, platt"):
        settings({"calibrate": "isotonic"})
    assert settings({}) == ("image", "none")
