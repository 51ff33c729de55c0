"""Metrics against scikit-learn, on random and adversarial inputs, and the cluster bootstrap."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlt import metrics
from cxrlt.labels import TASK1_CLASSES, TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, frequency_groups


def _sk_per_class(fn, y, s, w=None):
    """sklearn metric per class on the known rows; NaN where sklearn's value is undefined."""
    out = []
    for c in range(y.shape[1]):
        k = ~np.isnan(y[:, c])
        yc, sc = y[k, c], s[k, c]
        wc = None if w is None else w[k]
        pos = yc == 1 if wc is None else (yc == 1) & (wc > 0)
        neg = yc == 0 if wc is None else (yc == 0) & (wc > 0)
        if not pos.any() or (fn is roc_auc_score and not neg.any()):
            out.append(np.nan)
            continue
        out.append(fn(yc, sc, sample_weight=wc))
    return np.array(out)


def _random(seed, n=400, c=7, nan_frac=0.0, decimals=None):
    rng = np.random.default_rng(seed)
    prevalence = rng.uniform(0.005, 0.6, c)
    y = (rng.random((n, c)) < prevalence).astype(float)
    s = np.clip(rng.random((n, c)) * 0.7 + 0.3 * y * rng.random((n, c)), 0, 1)
    if decimals is not None:
        s = np.round(s, decimals)  # many ties
    if nan_frac:
        y[rng.random((n, c)) < nan_frac] = np.nan
    return y, s


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("nan_frac", [0.0, 0.2])
def test_ap_and_auroc_equal_sklearn(seed, decimals, nan_frac):
    y, s = _random(seed, decimals=decimals, nan_frac=nan_frac)
    np.testing.assert_allclose(
        metrics.average_precision(y, s), _sk_per_class(average_precision_score, y, s), atol=1e-12
    )
    np.testing.assert_allclose(
        metrics.roc_auc(y, s), _sk_per_class(roc_auc_score, y, s), atol=1e-12
    )


def test_weighted_ap_and_auroc_equal_sklearn():
    y, s = _random(5, decimals=2, nan_frac=0.1)
    w = np.random.default_rng(0).integers(0, 4, len(y)).astype(float)
    np.testing.assert_allclose(
        metrics.average_precision(y, s, w),
        _sk_per_class(average_precision_score, y, s, w),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        metrics.roc_auc(y, s, w), _sk_per_class(roc_auc_score, y, s, w), atol=1e-12
    )


def test_adversarial_columns():
    n = 50
    rng = np.random.default_rng(1)
    s = rng.random((n, 6))
    y = np.zeros((n, 6))
    y[:, 1] = 1  # all positive: AP = 1, AUROC undefined
    y[7, 2] = 1  # a single positive
    y[::2, 3] = 1
    s[:, 3] = 0.4  # constant scores: AP = prevalence, AUROC = 0.5
    y[::3, 4] = 1
    s[:, 4] = np.where(y[:, 4] == 1, 0.9, 0.1)  # perfect separation
    y[:, 5] = np.nan
    y[:10, 5] = [1, 0, 1, 0, 0, 0, 1, 0, 0, 0]  # mostly unknown
    ap = metrics.average_precision(y, s)
    auc = metrics.roc_auc(y, s)
    assert np.isnan(ap[0]) and np.isnan(auc[0])  # no positives: undefined, not 0
    assert ap[1] == 1.0 and np.isnan(auc[1])
    assert ap[2] == pytest.approx(average_precision_score(y[:, 2], s[:, 2]))
    assert ap[3] == pytest.approx(0.5) and auc[3] == pytest.approx(0.5)
    assert ap[4] == 1.0 and auc[4] == 1.0
    assert ap[5] == pytest.approx(average_precision_score(y[:10, 5], s[:10, 5]))
    assert auc[5] == pytest.approx(roc_auc_score(y[:10, 5], s[:10, 5]))


def test_nan_masked_labels_equal_sklearn_on_known_rows():
    y, s = _random(3, nan_frac=0.3, decimals=2)
    for c in range(y.shape[1]):
        k = ~np.isnan(y[:, c])
        assert metrics.average_precision(y[:, [c]], s[:, [c]])[0] == pytest.approx(
            average_precision_score(y[k, c], s[k, c])
        )
        assert metrics.f1_at(y[:, [c]], s[:, [c]], 0.5)[0] == pytest.approx(
            f1_score(y[k, c], s[k, c] >= 0.5)
        )


def test_one_dimensional_input_is_one_class():
    y, s = _random(0, c=1)
    assert metrics.average_precision(y[:, 0], s[:, 0]).shape == (1,)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_f1_equals_sklearn(threshold):
    y, s = _random(2, decimals=1)
    ours = metrics.f1_at(y, s, threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [f1_score(y[:, c], s[:, c] >= threshold) for c in range(y.shape[1])]
    has_pos = (y == 1).any(axis=0)
    np.testing.assert_allclose(ours[has_pos], np.array(theirs)[has_pos])
    assert np.isnan(ours[~has_pos]).all()


def test_f1_per_class_thresholds_and_no_positives():
    y = np.array([[1, 0], [0, 0], [1, 0]], dtype=float)
    s = np.array([[0.6, 0.9], [0.7, 0.1], [0.2, 0.2]])
    f1 = metrics.f1_at(y, s, [0.6, 0.5])
    assert f1[0] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    assert np.isnan(f1[1])


def test_tune_thresholds_maximise_validation_f1_and_apply_unchanged():
    y_val, s_val = _random(10, n=300, decimals=2)
    y_val[:, 0] = 0  # no validation positives -> 0.5
    t = metrics.tune_thresholds(y_val, s_val)
    assert t[0] == 0.5
    f1_val = metrics.f1_at(y_val, s_val, t)
    for c in range(1, y_val.shape[1]):  # no candidate threshold beats the chosen one
        candidates = np.unique(s_val[:, c])
        best = max(metrics.f1_at(y_val[:, [c]], s_val[:, [c]], u)[0] for u in candidates)
        assert f1_val[c] == pytest.approx(best)
        assert t[c] in candidates
    # deterministic, and a function of the validation arrays only
    np.testing.assert_array_equal(t, metrics.tune_thresholds(y_val.copy(), s_val.copy()))
    y_test, s_test = _random(11, n=200)
    expected = metrics.f1_at(y_test, s_test, t)
    result = metrics.evaluate(y_test, s_test, [f"c{i}" for i in range(7)], thresholds=t,
                              n_bootstrap=0)  # fmt: skip
    for i in range(7):
        got = result["per_class"][f"c{i}"]["f1_tuned"]
        assert (got is None and np.isnan(expected[i])) or got == pytest.approx(expected[i])


def test_tune_thresholds_ties_pick_highest():
    y = np.array([[1.0], [0.0], [1.0], [0.0]])
    s = np.array([[0.9], [0.8], [0.7], [0.1]])
    # threshold 0.9: F1 = 2/3; 0.7: F1 = 4/5; 0.1: F1 = 2/3
    assert metrics.tune_thresholds(y, s)[0] == 0.7


def test_ece_definition():
    y = np.array([[1], [0], [1], [1]], dtype=float)
    s = np.array([[0.95], [0.05], [0.55], [1.0]])
    # bins: [0.9,1.0] holds 0.95 and 1.0 (labels 1,1): |2 - 1.95|; [0.0,0.1): |0 - 0.05|;
    # [0.5,0.6): |1 - 0.55|
    expected = (0.05 + 0.05 + 0.45) / 4
    assert metrics.expected_calibration_error(y, s)[0] == pytest.approx(expected)
    y[:, 0] = np.nan
    assert np.isnan(metrics.expected_calibration_error(y, s)[0])


def test_ece_masks_unknown_and_is_vectorised_per_class():
    y, s = _random(4, nan_frac=0.3)
    ece = metrics.expected_calibration_error(y, s, n_bins=15)
    for c in range(y.shape[1]):
        k = ~np.isnan(y[:, c])
        bins = np.minimum((s[k, c] * 15).astype(int), 14)
        manual = (
            sum(abs(y[k, c][bins == b].sum() - s[k, c][bins == b].sum()) for b in range(15))
            / k.sum()
        )
        assert ece[c] == pytest.approx(manual)


def _groups(classes):
    return {c: ("head", "medium", "tail")[i % 3] for i, c in enumerate(classes)}


def test_evaluate_json_ready_and_undefined_classes_excluded():
    y, s = _random(6, n=300, c=6)
    y[:, 2] = 0  # undefined class
    y[:, 4] = np.nan
    classes = [f"c{i}" for i in range(6)]
    groups = _groups(classes)
    ids = np.arange(300) // 3
    r = metrics.evaluate(y, s, classes, groups, ids=ids, n_bootstrap=50)
    text = json.dumps(r, allow_nan=False)  # no NaN anywhere
    assert json.loads(text) == r
    assert r["undefined_classes"] == ["c2", "c4"]
    for c in ("c2", "c4"):
        assert r["per_class"][c]["ap"] is None and r["per_class"][c]["auroc"] is None
        assert r["per_class"][c]["f1"] is None
    ap = metrics.average_precision(y, s)
    assert r["mAP"] == pytest.approx(np.nanmean(ap))
    assert r["mAP_tail"] == pytest.approx(np.mean(ap[[5]]))  # c2 (tail) left out
    assert r["mAP_medium"] == pytest.approx(np.mean(ap[[1]]))  # c4 (medium) left out
    assert r["mAUROC"] == pytest.approx(np.nanmean(metrics.roc_auc(y, s)))
    ece = metrics.expected_calibration_error(y, s)
    assert r["mECE"] == pytest.approx(np.mean(ece[[0, 1, 3, 5]]))
    assert r["n_images"] == 300 and r["bootstrap"]["n_clusters"] == 100
    assert set(r["ci"]) == {"mAP", "mAP_head", "mAP_medium", "mAP_tail"}
    assert "mF1@tuned" not in r


def test_evaluate_all_undefined_gives_none():
    y = np.zeros((20, 2))
    s = np.full((20, 2), 0.3)
    r = metrics.evaluate(y, s, ["a", "b"], n_bootstrap=20)
    assert r["mAP"] is None and r["mAUROC"] is None and r["mF1@0.5"] is None
    assert r["ci"]["mAP"] is None
    json.dumps(r, allow_nan=False)


def test_weighted_ap_engine_matches_sample_weights():
    """Every bootstrap replicate equals AP with the replicate's image weights."""
    y, s = _random(7, n=240, decimals=2, nan_frac=0.1)
    ids = np.repeat(np.arange(80), 3)
    reps = metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=20, seed=4)
    w = metrics._replicate_weights(np.random.default_rng(4), 80, 20)
    for b in range(20):
        expected = metrics.average_precision(y, s, sample_weight=w[ids, b])
        np.testing.assert_allclose(reps[b], expected, rtol=1e-6, atol=1e-9)


def test_bootstrap_resamples_whole_clusters():
    n_clusters = 60
    ids = np.repeat(np.arange(n_clusters), 4)
    w = metrics._replicate_weights(np.random.default_rng(0), n_clusters, 30)
    assert w.shape == (n_clusters, 30)
    assert (w.sum(axis=0) == n_clusters).all()  # n_clusters draws per replicate
    # image weight = its cluster's draw count, so all images of a cluster move together
    image_w = w[metrics._cluster_codes(ids, len(ids))]
    assert (image_w.reshape(n_clusters, 4, 30) == image_w[::4][:, None, :]).all()


def test_bootstrap_cluster_duplication_does_not_shrink_the_interval():
    """Copying every image of a study twice adds no information: with study clusters the
    replicate spread stays the same; treating images as independent would shrink it."""
    y, s = _random(8, n=300, c=3)
    y[:, :] = (np.random.default_rng(8).random((300, 3)) < 0.3).astype(float)
    ids = np.arange(300)
    y2, s2, ids2 = np.repeat(y, 4, axis=0), np.repeat(s, 4, axis=0), np.repeat(ids, 4)
    sd_once = np.nanstd(metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=300, seed=1), axis=0)
    sd_clustered = np.nanstd(
        metrics.bootstrap_ap(y2, s2, ids=ids2, n_bootstrap=300, seed=1), axis=0
    )
    sd_naive = np.nanstd(metrics.bootstrap_ap(y2, s2, ids=None, n_bootstrap=300, seed=1), axis=0)
    np.testing.assert_allclose(sd_clustered, sd_once, rtol=0.25)
    assert (sd_naive < 0.75 * sd_clustered).all()


def test_bootstrap_reproducible_seeded_and_contains_point():
    y, s = _random(9, n=500, c=6)
    classes = [f"c{i}" for i in range(6)]
    groups = _groups(classes)
    ids = np.arange(500) // 2
    a = metrics.bootstrap_ci(y, s, classes, groups, ids=ids, n_bootstrap=200, seed=3)
    b = metrics.bootstrap_ci(y, s, classes, groups, ids=ids, n_bootstrap=200, seed=3)
    c = metrics.bootstrap_ci(y, s, classes, groups, ids=ids, n_bootstrap=200, seed=4)
    assert a == b
    assert a != c
    point = metrics.evaluate(y, s, classes, groups, n_bootstrap=0)
    for key, (lo, hi) in a.items():
        assert lo < point[key] < hi, key
    # the replicates do not depend on how they are chunked internally
    one = metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=metrics._BOOTSTRAP_CHUNK + 3, seed=3)
    two = metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=2 * metrics._BOOTSTRAP_CHUNK, seed=3)
    np.testing.assert_array_equal(one, two[: len(one)])


def test_evaluate_with_task1_groups_and_long_tail():
    rng = np.random.default_rng(0)
    prev = np.array([TASK1_TRAIN_COUNTS[c] for c in TASK1_CLASSES]) / TASK1_TRAIN_IMAGES
    n = 3000
    y = (rng.random((n, 40)) < prev).astype(float)
    s = np.clip(rng.random((n, 40)) * 0.6 + 0.4 * y * rng.random((n, 40)), 0, 1)
    groups = frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, TASK1_CLASSES)
    r = metrics.evaluate(y, s, TASK1_CLASSES, groups, ids=np.arange(n) // 2, n_bootstrap=100)
    ap = metrics.average_precision(y, s)
    for g in ("head", "medium", "tail"):
        cols = [i for i, c in enumerate(TASK1_CLASSES) if groups[c] == g]
        assert r[f"mAP_{g}"] == pytest.approx(np.nanmean(ap[cols]))
    assert sorted(r["undefined_classes"]) == sorted(
        c for i, c in enumerate(TASK1_CLASSES) if not (y[:, i] == 1).any()
    )


def test_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        metrics.average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        metrics.average_precision(np.zeros((2, 1)), np.array([[np.nan], [0.1]]))
    with pytest.raises(ValueError, match="thresholds"):
        metrics.f1_at(np.zeros((3, 2)), np.zeros((3, 2)), [0.1, 0.2, 0.3])



def test_interval_is_shifted_by_the_bootstrap_bias():
    """Rare classes bias resampled AP upward: the replicates are re-centred on the point estimate."""
    from cxrlt.metrics import average_precision, bootstrap_ap, bootstrap_ci

    rng = np.random.default_rng(3)
    n = 400
    y = np.hstack([(rng.random((n, 10)) < 0.3).astype(float), np.zeros((n, 30))])
    for j in range(10, 40):
        y[rng.choice(n, size=2, replace=False), j] = 1  # tail: two positives per class
    scores = rng.random(y.shape) + y * np.r_[np.full(10, 1.5), np.full(30, 0.3)] * rng.random(y.shape)
    ids = np.arange(n) // 2
    point = float(np.nanmean(average_precision(y, scores)))
    reps = np.nanmean(bootstrap_ap(y, scores, ids=ids, n_bootstrap=300, seed=0), axis=1)
    assert reps.mean() > point + 0.01  # the upward bias this guards against
    lo, hi = bootstrap_ci(y, scores, [str(j) for j in range(40)], ids=ids, n_bootstrap=300, seed=0)["mAP"]
    expected = np.percentile(reps - (reps.mean() - point), [2.5, 97.5])
    np.testing.assert_allclose([lo, hi], expected, rtol=1e-6)
    assert lo <= point <= hi
