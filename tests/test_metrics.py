"""Metrics against scikit-learn, on random and adversarial inputs, and the cluster bootstrap."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy import stats
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


# --------------------------------------------------------------------------------------------
# bootstrap intervals


def test_bca_equals_scipy_on_the_same_replicates():
    """`bootstrap_interval` is scipy's BCa (and percentile) fed the same bootstrap distribution;
    scipy computes its own leave-one-out values, we are given them."""
    x = np.random.default_rng(0).exponential(size=40)  # skewed: BCa differs from percentile
    first = stats.bootstrap((x,), np.mean, n_resamples=2000, rng=np.random.default_rng(1))
    reps = first.bootstrap_distribution
    jackknife = (x.sum() - x) / (len(x) - 1)
    for level in (0.9, 0.95):
        for ours, theirs in (("bca", "BCa"), ("percentile", "percentile"), ("basic", "basic")):
            expected = stats.bootstrap(
                (x,), np.mean, n_resamples=0, bootstrap_result=first, method=theirs,
                confidence_level=level,
            ).confidence_interval  # fmt: skip
            got = metrics.bootstrap_interval(reps, x.mean(), jackknife, level, ours)
            assert got.method == ours and got.note is None
            assert (got.low, got.high) == pytest.approx(tuple(expected), rel=1e-12)
    bca = metrics.bootstrap_interval(reps, x.mean(), jackknife)
    pct = metrics.bootstrap_interval(reps, x.mean(), method="percentile")
    assert bca.acceleration > 0.01 and bca.high > pct.high  # right skew moves BCa up


@pytest.mark.parametrize("clustered", [False, True])
def test_bca_of_ap_equals_scipy_with_the_cluster_jackknife(clustered):
    """The whole chain for one class: study-bootstrap AP replicates plus the leave-one-cluster-
    out jackknife done by zeroing a cluster's weight give scipy's BCa interval of the statistic
    'AP with every image weighted by how often its cluster was drawn'."""
    rng = np.random.default_rng(3)
    n = 120
    y = (rng.random(n) < 0.2).astype(float)
    s = np.round(rng.random(n) + 0.6 * y * rng.random(n), 2)  # ties too
    ids = np.sort(rng.integers(0, 50, n)) if clustered else None
    codes = metrics._cluster_codes(ids, n)
    k = int(codes.max()) + 1

    def ap(drawn):
        w = np.bincount(drawn, minlength=k)[codes].astype(float)
        return metrics.average_precision(y, s, sample_weight=w)[0]

    reps = metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=500, seed=2)[:, 0]
    first = stats._resampling.BootstrapResult(
        confidence_interval=None, bootstrap_distribution=reps, standard_error=None
    )
    expected = stats.bootstrap((np.arange(k),), ap, n_resamples=0, bootstrap_result=first,
                               method="BCa", vectorized=False).confidence_interval  # fmt: skip
    got = metrics.bootstrap_ci(y, s, ["a"], ids=ids, n_bootstrap=500, seed=2)["mAP"]
    assert got == pytest.approx(tuple(expected), rel=1e-6)  # replicates summed in float32


def test_grouped_jackknife_deletes_random_whole_groups():
    np.testing.assert_array_equal(metrics.jackknife_groups(50, 200), np.arange(50))
    groups = metrics.jackknife_groups(1003, 100, seed=5)
    sizes = np.bincount(groups)
    assert len(sizes) == 100 and sizes.max() - sizes.min() <= 1
    assert not np.array_equal(groups, metrics.jackknife_groups(1003, 100, seed=6))
    y, s = _random(12, n=300, c=4, decimals=2, nan_frac=0.1)
    ids = np.arange(300) // 3
    engine = metrics.ClusterAP(y, s, ids)
    jack = engine.jackknife(max_groups=8, seed=1)
    g = metrics.jackknife_groups(100, 8, seed=1)
    assert jack.shape == (8, 4)
    for j in range(8):
        kept = (g[ids] != j).astype(float)  # a deleted group's images weigh 0
        np.testing.assert_allclose(jack[j], metrics.average_precision(y, s, kept), rtol=1e-6)


def test_bootstrap_weights_shared_by_two_score_matrices():
    """The paired-comparison building block: same seed, same resamples, whatever the chunks."""
    a = np.hstack(list(metrics.bootstrap_weights(50, 40, seed=1, chunk=7)))
    b = np.hstack(list(metrics.bootstrap_weights(50, 40, seed=1)))
    np.testing.assert_array_equal(a, b)
    y, s1 = _random(13, n=200, c=3)
    s2 = np.random.default_rng(0).random(s1.shape)
    ids = np.arange(200) // 4
    one, two = metrics.ClusterAP(y, s1, ids), metrics.ClusterAP(y, s2, ids)
    paired = [(one.ap(w), two.ap(w)) for w in metrics.bootstrap_weights(one.n_clusters, 30, 4)]
    np.testing.assert_array_equal(np.vstack([p[0] for p in paired]),
                                  metrics.bootstrap_ap(y, s1, ids, 30, seed=4))  # fmt: skip
    np.testing.assert_array_equal(np.vstack([p[1] for p in paired]),
                                  metrics.bootstrap_ap(y, s2, ids, 30, seed=4))  # fmt: skip

    def delta(w):  # the recipe in ClusterAP's docstring
        return np.nanmean(one.ap(w), axis=1) - np.nanmean(two.ap(w), axis=1)

    reps = np.concatenate([delta(w) for w in metrics.bootstrap_weights(one.n_clusters, 200, 0)])
    groups = metrics.jackknife_groups(one.n_clusters, seed=0)
    jack = np.concatenate([delta(w) for w in metrics.jackknife_weights(groups)])
    point = delta(np.ones((one.n_clusters, 1)))[0]
    expected = np.nanmean(metrics.average_precision(y, s1)) - np.nanmean(
        metrics.average_precision(y, s2)
    )
    assert point == pytest.approx(expected) and len(jack) == one.n_clusters
    iv = metrics.bootstrap_interval(reps, point, jack)
    assert iv.method == "bca" and iv.low < point < iv.high


def test_bootstrap_interval_edge_cases():
    reps = np.linspace(0.5, 0.9, 101)
    jack = np.array([0.70, 0.71, 0.69, 0.75, 0.60])
    # every replicate above the point estimate: z0 is infinite -> percentile, with a note
    iv = metrics.bootstrap_interval(reps, 0.4, jack)
    assert iv.method == "percentile" and "above the point estimate" in iv.note
    assert (iv.low, iv.high) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    assert "below" in metrics.bootstrap_interval(reps, 0.95, jack).note
    # no jackknife (or no spread in it): acceleration 0, the bias-corrected percentile
    for j in (None, np.full(5, 0.3), np.array([0.3])):
        iv = metrics.bootstrap_interval(reps, 0.7, j)
        assert iv.method == "bc" and iv.acceleration == 0 and "acceleration 0" in iv.note
    # undefined replicates and jackknife values are left out; nothing defined -> None
    full = metrics.bootstrap_interval(reps, 0.7, jack)
    assert metrics.bootstrap_interval(np.r_[reps, np.nan], 0.7, np.r_[jack, np.nan]) == full
    assert metrics.bootstrap_interval(np.full(10, np.nan), 0.5) is None
    assert metrics.bootstrap_interval(reps, np.nan) is None
    assert metrics.bootstrap_interval(np.ones(20), 1.0, np.ones(5)) == metrics.Interval(
        1.0, 1.0, "bca"
    )  # nothing varies: no fallback to report
    # |a| < 1/6, so the level formula breaks (a (z0 + z) >= 1) only for a point estimate in the
    # far tail of many replicates: that endpoint is the extreme replicate
    many = np.linspace(0.5, 0.9, 100_001)
    one_outlier = np.r_[1.0, np.zeros(999)]
    iv = metrics.bootstrap_interval(many, 0.500001, one_outlier)
    assert iv.acceleration < -0.16 and iv.z0 < -4
    assert iv.low == many.min() and "extreme replicate" in iv.note
    with pytest.raises(ValueError, match="unknown interval method"):
        metrics.bootstrap_interval(reps, 0.7, method="student")
    with pytest.raises(ValueError, match="ci must be"):
        metrics.bootstrap_interval(reps, 0.7, ci=1.0)


def test_evaluate_names_the_method_and_offers_percentile():
    y, s = _random(9, n=500, c=6)
    classes = [f"c{i}" for i in range(6)]
    groups = _groups(classes)
    ids = np.arange(500) // 2  # 250 studies: more than JACKKNIFE_MAX_GROUPS
    r = metrics.evaluate(y, s, classes, groups, ids=ids, n_bootstrap=200, seed=3)
    assert r["bootstrap"]["method"] == "BCa"
    assert r["bootstrap"]["jackknife"] == {"values": metrics.JACKKNIFE_MAX_GROUPS,
                                           "deletes": "a random group of clusters"}  # fmt: skip
    assert r["bootstrap"]["fallbacks"] == {}
    small = metrics.evaluate(y[:100], s[:100], classes, groups, ids=ids[:100], n_bootstrap=50)
    assert small["bootstrap"]["jackknife"] == {"values": 50, "deletes": "one cluster"}
    p = metrics.evaluate(y, s, classes, groups, ids=ids, n_bootstrap=200, seed=3,
                         ci_method="percentile")  # fmt: skip
    assert p["bootstrap"]["method"] == "percentile" and "jackknife" not in p["bootstrap"]
    reps = metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=200, seed=3)
    assert p["ci"]["mAP"] == pytest.approx(np.quantile(reps.mean(axis=1), [0.025, 0.975]))
    assert r["ci"]["mAP"] != p["ci"]["mAP"]
    with pytest.raises(ValueError, match="unknown interval method"):
        metrics.evaluate(y, s, classes, groups, ids=ids, n_bootstrap=20, ci_method="shifted")


def test_rare_classes_move_bca_below_the_percentile_interval():
    """AP of rare classes is biased upward and so are its bootstrap replicates: BCa's bias
    correction moves the interval down, where percentile keeps the bias (the former method
    re-centred the replicates on the point estimate instead)."""
    rng = np.random.default_rng(3)
    n = 400
    y = np.hstack([(rng.random((n, 10)) < 0.3).astype(float), np.zeros((n, 30))])
    for j in range(10, 40):
        y[rng.choice(n, size=3, replace=False), j] = 1  # tail: three positives per class
    scores = rng.random(y.shape) + y * np.r_[np.full(10, 1.5), np.full(30, 0.3)] * rng.random(
        y.shape
    )
    ids = np.arange(n) // 2
    classes = [str(j) for j in range(40)]
    point = float(np.nanmean(metrics.average_precision(y, scores)))
    engine = metrics.ClusterAP(y, scores, ids)
    reps = np.nanmean(engine.bootstrap(300, seed=0), axis=1)
    jack = np.nanmean(engine.jackknife(seed=0), axis=1)
    assert reps.mean() > point + 0.01  # the upward bias
    bca = metrics.bootstrap_ci(y, scores, classes, ids=ids, n_bootstrap=300, seed=0)["mAP"]
    pct = metrics.bootstrap_ci(y, scores, classes, ids=ids, n_bootstrap=300, seed=0,
                               method="percentile")["mAP"]  # fmt: skip
    iv = metrics.bootstrap_interval(reps, point, jack)
    assert iv.z0 < 0 and bca == pytest.approx([iv.low, iv.high])
    assert bca[0] < pct[0] and bca[1] < pct[1]
    assert bca[0] <= point <= bca[1]


def _binormal_population_ap(prevalence: float, d: float) -> float:
    """AP of an infinite population: positives score N(d, 1), negatives N(0, 1)."""
    s = np.linspace(d - 12, d + 12, 100_001)
    tpr, fpr = stats.norm.sf(s - d), stats.norm.sf(s)
    precision = prevalence * tpr / (prevalence * tpr + (1 - prevalence) * fpr)
    return float(np.trapezoid(precision * stats.norm.pdf(s - d), s))


def _coverage(n_classes, prevalence, auroc, n, reps=200, n_bootstrap=200):
    """Share of `reps` simulated test sets whose BCa / percentile mAP interval holds the
    population mAP (binormal scores, one image per cluster)."""
    d = np.sqrt(2) * stats.norm.ppf(auroc)
    truth = _binormal_population_ap(prevalence, d)
    rng = np.random.default_rng(0)
    hits = {"bca": 0, "percentile": 0}
    for r in range(reps):
        y = (rng.random((n, n_classes)) < prevalence).astype(float)
        engine = metrics.ClusterAP(y, rng.standard_normal(y.shape) + d * y)
        point = float(np.nanmean(engine.point()))
        boot = np.nanmean(engine.bootstrap(n_bootstrap, seed=r), axis=1)
        jack = np.nanmean(engine.jackknife(max_groups=50, seed=r), axis=1)
        for method in hits:
            iv = metrics.bootstrap_interval(boot, point, jack, 0.95, method)
            hits[method] += iv.low <= truth <= iv.high
    return {m: h / reps for m, h in hits.items()}


def test_bca_coverage_of_the_population_map():
    """A small coverage study (the full one is bench/bench_bootstrap_coverage.py). With many
    positives per class BCa covers close to nominal. With rare classes of low AP, AP's upward
    small-sample bias pushes the replicates up: the percentile interval then misses the
    population value most of the time, and BCa's bias correction recovers much of it (not
    all: see the README's table). Seeded; every bound is >= 3 Monte Carlo SE (~0.02 and
    ~0.04 at 150 test sets) from the simulated value."""
    ok = _coverage(n_classes=5, prevalence=0.3, auroc=0.85, n=300, reps=150)
    assert ok["bca"] >= 0.87
    rare = _coverage(n_classes=10, prevalence=0.02, auroc=0.8, n=1000, reps=150)
    assert rare["percentile"] <= 0.5
    assert rare["bca"] - rare["percentile"] >= 0.12


def test_ci_caveats_quote_the_simulated_coverage_for_few_positives():
    classes = [f"c{i}" for i in range(6)]
    groups = dict(zip(classes, ["head", "head", "tail", "tail", "tail", "medium"], strict=True))
    cis = {"mAP": [0.2, 0.3], "mAP_head": [0.6, 0.7], "mAP_medium": [0.2, 0.3],
           "mAP_tail": [0.0, 0.2]}  # fmt: skip
    positives = np.array([20_000, 30_000, 5, 7, 0, 1052])  # c4 has none: not in the median
    caveats = metrics.ci_caveats(cis, positives, classes, groups, "bca")
    tail_6 = metrics.SIMULATED_COVERAGE["mAP_tail"][0]
    assert tail_6[0] == 6 and tail_6[2]["bca"] < 0.9  # the study's few-positives tail row
    assert caveats["mAP_tail"] == (
        f"6 positives per class (median): simulated coverage {tail_6[2]['bca']:.2f} "
        "for a nominal 0.95"
    )
    # many positives: the simulated coverage is within Monte Carlo error of nominal
    assert "mAP_head" not in caveats and "mAP_medium" not in caveats
    # fewer positives than simulated: the smallest simulated test set, said to be optimistic
    few = metrics.ci_caveats({"mAP_tail": [0.0, 0.2]}, np.array([0, 0, 2, 3, 4, 0]), classes,
                             groups, "bca")  # fmt: skip
    assert few["mAP_tail"].endswith("with 6, likely lower here")
    # between simulated sizes: interpolated in log(positives)
    (m0, _, c0), (m1, _, c1) = metrics.SIMULATED_COVERAGE["mAP"][:2]
    mid = float(np.sqrt(m0 * m1))
    between = metrics.ci_caveats({"mAP": [0.2, 0.3]}, np.full(6, mid), classes, groups, "bca")
    assert f"coverage {(c0['bca'] + c1['bca']) / 2:.2f} for" in between["mAP"]
    # a fallback note is appended; an undefined interval gets none
    notes = metrics.ci_caveats({"mAP_tail": None, "mAP_head": [0.6, 0.7]}, positives, classes,
                               groups, "bca", {"mAP_head": "all 9 replicates above"})  # fmt: skip
    assert notes == {"mAP_head": "all 9 replicates above"}


def test_evaluate_reports_caveats_next_to_the_intervals():
    y, s = _random(14, n=300, c=6)
    classes = [f"c{i}" for i in range(6)]
    groups = _groups(classes)
    r = metrics.evaluate(y, s, classes, groups, ids=np.arange(300) // 2, n_bootstrap=50)
    positives = np.array([r["per_class"][c]["positives"] for c in classes])
    assert r["ci_caveats"] == metrics.ci_caveats(r["ci"], positives, classes, groups, "bca")
    assert "mAP_tail" in r["ci_caveats"]  # 300 images: a handful of positives per tail class
    assert "ci_caveats" not in metrics.evaluate(y, s, classes, groups, n_bootstrap=0)
