"""CXR-LT metrics as plain vectorised functions of (labels, scores) arrays.

Conventions shared by every function here:

* `y` is an (n, C) float array of 1 / 0 / NaN. NaN means "label unknown": that image is
  left out of that class's metric (and only that class's), never counted as a negative.
* `scores` is an (n, C) float array of probabilities (finite; checked at the boundary).
* A per-class value that is mathematically undefined (AP without positives, AUROC with one
  class present, ...) is NaN in the arrays and `None` in `evaluate`'s JSON-ready dict; it is
  excluded from every macro mean, never reported as 0 or 1.

All ranking metrics share one preparation (`_rank`): per class, the known entries sorted by
descending score, concatenated into flat arrays, with the tie group of each entry. Average
precision and AUROC then reduce to cumulative sums evaluated at tie-group ends, which is
what scikit-learn does (it places thresholds at distinct score values). The cluster
bootstrap reuses that sort: a replicate only changes the weights, so each replicate is a
sparse matrix product and a few cumulative sums (see `bootstrap_ap`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from cxrlt.labels import GROUPS

__all__ = [
    "average_precision",
    "roc_auc",
    "f1_at",
    "tune_thresholds",
    "expected_calibration_error",
    "bootstrap_ap",
    "bootstrap_ci",
    "evaluate",
]

DEFAULT_THRESHOLD = 0.5
_BOOTSTRAP_CHUNK = 16  # replicates per sparse product: ~(positives x 16) floats stay cache-sized


# --------------------------------------------------------------------------------------------
# shared preparation


def _as_2d(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 (n, C) views of labels and scores; a 1-D input is one class."""
    y = np.asarray(y, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if scores.ndim == 1:
        scores = scores[:, None]
    if y.shape != scores.shape or y.ndim != 2:
        raise ValueError(f"labels {y.shape} and scores {scores.shape} must both be (n, C)")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return y, scores


@dataclass(frozen=True)
class _Ranked:
    """Known entries of every class, sorted by descending score, concatenated class by class.

    `start[c]:start[c+1]` is class c's slice. `group_end[i]` / `group_start[i]` are the flat
    indices of the last / first entry tied with entry i (ties never cross classes).
    """

    n_images: int
    n_classes: int
    start: np.ndarray  # (C+1,) int64
    cls: np.ndarray  # (L,) int64 class of each entry
    image: np.ndarray  # (L,) int64 row in the input
    positive: np.ndarray  # (L,) bool
    score: np.ndarray  # (L,) float64
    group_end: np.ndarray  # (L,) int64
    group_start: np.ndarray  # (L,) int64


def _rank(y: np.ndarray, scores: np.ndarray) -> _Ranked:
    """Sort once per class; everything else is cumulative sums over this order."""
    n, n_classes = y.shape
    s_t = np.ascontiguousarray(scores.T)
    # the order inside a tie group never matters (ties are grouped), so the fast unstable sort
    order = np.argsort(-s_t, axis=1)
    s_sorted = np.take_along_axis(s_t, order, axis=1)
    y_sorted = np.take_along_axis(np.ascontiguousarray(y.T), order, axis=1)
    known = ~np.isnan(y_sorted)
    if known.all():  # the usual case: flattening is a free reshape
        counts = np.full(n_classes, n)
        image, score = order.reshape(-1), s_sorted.reshape(-1)
        positive = y_sorted.reshape(-1) == 1
    else:  # boolean indexing walks class by class
        counts = known.sum(axis=1)
        image, score, positive = order[known], s_sorted[known], y_sorted[known] == 1
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    length = int(start[-1])
    cls = np.repeat(np.arange(n_classes, dtype=np.int64), counts)
    idx = np.arange(length, dtype=np.int64)
    new_group = np.ones(length, dtype=bool)
    if length > 1:
        new_group[1:] = (score[1:] != score[:-1]) | (cls[1:] != cls[:-1])
    is_end = np.ones(length, dtype=bool)
    is_end[:-1] = new_group[1:]
    group_start = np.maximum.accumulate(np.where(new_group, idx, 0)) if length else idx
    group_end = np.minimum.accumulate(np.where(is_end, idx, length)[::-1])[::-1] if length else idx
    return _Ranked(n, n_classes, start, cls, image, positive, score, group_end, group_start)


def _cum_at(values: np.ndarray, ranked: _Ranked) -> tuple[np.ndarray, np.ndarray]:
    """Within-class inclusive cumulative sums of `values` at each entry's group end and at the
    entry just before its group starts (i.e. counts at score >= s and at score > s)."""
    cum0 = np.concatenate([[0.0], np.cumsum(values)])
    before_class = cum0[ranked.start[:-1]][ranked.cls]
    at_end = cum0[ranked.group_end + 1] - before_class
    before_group = cum0[ranked.group_start] - before_class
    return at_end, before_group


def _weights(ranked: _Ranked, sample_weight: np.ndarray | None) -> np.ndarray:
    if sample_weight is None:
        return np.ones(len(ranked.image))
    w = np.asarray(sample_weight, dtype=np.float64)
    if w.shape != (ranked.n_images,):
        raise ValueError(f"sample_weight must have shape ({ranked.n_images},), got {w.shape}")
    return w[ranked.image]


def _ap_from_ranked(ranked: _Ranked, w: np.ndarray) -> np.ndarray:
    """AP = sum over positives of weight x precision at the end of its tie group / total
    positive weight: scikit-learn's step-wise sum over distinct thresholds, rearranged."""
    wpos = np.where(ranked.positive, w, 0.0)
    tp, _ = _cum_at(wpos, ranked)
    total, _ = _cum_at(w, ranked)
    prec = np.divide(tp, total, out=np.zeros_like(tp), where=total > 0)
    num = np.bincount(ranked.cls, wpos * prec, minlength=ranked.n_classes)
    den = np.bincount(ranked.cls, wpos, minlength=ranked.n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


# --------------------------------------------------------------------------------------------
# point metrics


def average_precision(
    y: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """Per-class AP, equal to `sklearn.metrics.average_precision_score` on the known rows.

    NaN for a class without (weighted) positives among its known labels.
    """
    y, scores = _as_2d(y, scores)
    ranked = _rank(y, scores)
    return _ap_from_ranked(ranked, _weights(ranked, sample_weight))


def roc_auc(
    y: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """Per-class AUROC, equal to `sklearn.metrics.roc_auc_score` (ties count 1/2).

    Computed as the Mann-Whitney statistic: for each positive, the weight of negatives scored
    strictly lower plus half the tied ones. NaN when a class has only one label value.
    """
    y, scores = _as_2d(y, scores)
    ranked = _rank(y, scores)
    return _auc_from_ranked(ranked, _weights(ranked, sample_weight))


def _auc_from_ranked(ranked: _Ranked, w: np.ndarray) -> np.ndarray:
    wpos = np.where(ranked.positive, w, 0.0)
    wneg = w - wpos
    fp_end, fp_before = _cum_at(wneg, ranked)
    n_pos = np.bincount(ranked.cls, wpos, minlength=ranked.n_classes)
    n_neg = np.bincount(ranked.cls, wneg, minlength=ranked.n_classes)
    below = n_neg[ranked.cls] - 0.5 * (fp_end + fp_before)  # strictly lower + half of ties
    num = np.bincount(ranked.cls, wpos * below, minlength=ranked.n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), num / (n_pos * n_neg), np.nan)


def _thresholds(thresholds: float | Sequence[float] | np.ndarray, n_classes: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(n_classes, float(t))
    if t.shape != (n_classes,):
        raise ValueError(f"thresholds must be a scalar or ({n_classes},), got {t.shape}")
    return t


def f1_at(
    y: np.ndarray, scores: np.ndarray, thresholds: float | Sequence[float] | np.ndarray = 0.5
) -> np.ndarray:
    """Per-class F1 of the prediction `score >= threshold` on the known rows.

    F1 = 2TP / (2TP + FP + FN). NaN when the class has no known positives: F1 is then 0 or
    undefined whatever the model does, so it would only add noise to a macro mean
    (scikit-learn reports 0 there with a warning).
    """
    y, scores = _as_2d(y, scores)
    t = _thresholds(thresholds, y.shape[1])
    pred = scores >= t
    pos = y == 1
    neg = y == 0
    tp = (pred & pos).sum(axis=0)
    fp = (pred & neg).sum(axis=0)
    n_pos = pos.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, 2 * tp / (tp + fp + n_pos), np.nan)


def tune_thresholds(y_val: np.ndarray, scores_val: np.ndarray) -> np.ndarray:
    """Per-class threshold maximising F1 on the validation split, to apply unchanged elsewhere.

    Candidates are the distinct validation scores (prediction `score >= t`); the chosen
    threshold is the lowest score still called positive. Among equal F1 the highest threshold
    wins, so the result is deterministic. Classes without validation positives get 0.5.
    A function of validation arrays only: test labels can never leak into it.
    """
    y_val, scores_val = _as_2d(y_val, scores_val)
    return _tune_from_ranked(_rank(y_val, scores_val))


def _tune_from_ranked(ranked: _Ranked) -> np.ndarray:
    wpos = ranked.positive.astype(np.float64)
    tp, _ = _cum_at(wpos, ranked)
    predicted, _ = _cum_at(np.ones_like(wpos), ranked)
    n_pos = np.bincount(ranked.cls, wpos, minlength=ranked.n_classes)
    f1 = 2 * tp / (predicted + n_pos[ranked.cls])  # predicted >= 1 always
    out = np.full(ranked.n_classes, DEFAULT_THRESHOLD)
    for c in np.flatnonzero(n_pos > 0):
        lo, hi = ranked.start[c], ranked.start[c + 1]
        out[c] = ranked.score[lo + int(np.argmax(f1[lo:hi]))]
    return out


def expected_calibration_error(y: np.ndarray, scores: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Per-class ECE with `n_bins` equal-width bins on [0, 1] (score 1.0 goes in the last bin).

    ECE_c = sum_b (n_b / n) * |mean label in b - mean score in b| over the known rows of
    class c, i.e. sum_b |sum of labels in b - sum of scores in b| / n. CXR-LT's mECE is the
    mean over classes. Defined without positives too; NaN only with no known labels.
    """
    y, scores = _as_2d(y, scores)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    n_classes = y.shape[1]
    known = ~np.isnan(y)
    bins = np.clip(np.floor(scores * n_bins).astype(np.int64), 0, n_bins - 1)
    key = (bins + n_bins * np.arange(n_classes)).ravel()
    size = n_bins * n_classes
    lab = np.bincount(key, np.where(known, y, 0.0).ravel(), minlength=size)
    sco = np.bincount(key, np.where(known, scores, 0.0).ravel(), minlength=size)
    gap = np.abs(lab - sco).reshape(n_classes, n_bins).sum(axis=1)
    n_known = known.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_known > 0, gap / n_known, np.nan)


# --------------------------------------------------------------------------------------------
# cluster bootstrap


def _cluster_codes(ids: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Integer cluster code per image; without ids every image is its own cluster."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {ids.shape}")
    return np.unique(ids, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _replicate_weights(rng: np.random.Generator, n_clusters: int, n_replicates: int) -> np.ndarray:
    """(n_clusters, B) counts: each replicate draws n_clusters clusters with replacement."""
    draws = rng.integers(0, n_clusters, size=(n_replicates, n_clusters))
    draws += (np.arange(n_replicates) * n_clusters)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_replicates * n_clusters)
    return np.ascontiguousarray(counts.reshape(n_replicates, n_clusters).T, dtype=np.float64)


class _APBootstrapper:
    """Weighted AP for many weight vectors at once, reusing one sort.

    With the entries of each class sorted, AP under cluster weights only needs, at every tie
    group holding a positive, (a) the positive weight and (b) the total weight from the top of
    the ranking down to the group's end. Cutting each class's ranking into segments that end
    at those groups makes both a sparse (segments x clusters) matrix times the (clusters x B)
    replicate weights, followed by within-class cumulative sums over segments. Entries below
    a class's last positive never matter and are dropped.

    Weights are integer draw counts, so float32 sums are exact (and about twice as fast) while
    a replicate's total weight stays below 2**24; larger ones fall back to float64.
    """

    def __init__(self, ranked: _Ranked, clusters: np.ndarray, n_clusters: int) -> None:
        self.n_classes = ranked.n_classes
        self.sizes = np.bincount(clusters, minlength=n_clusters).astype(np.float64)
        pos_idx = np.flatnonzero(ranked.positive)
        # one segment per distinct tie group that holds a positive
        seg_end = np.unique(ranked.group_end[pos_idx])
        seg_cls = ranked.cls[seg_end]
        self.classes = np.unique(seg_cls)  # classes with at least one positive
        counts = np.bincount(seg_cls, minlength=ranked.n_classes)[self.classes]
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.seg_first = bounds[:-1]
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

        last_end = np.full(ranked.n_classes, -1, dtype=np.int64)
        last_end[self.classes] = seg_end[bounds[1:] - 1]
        keep = np.flatnonzero(np.arange(len(ranked.cls)) <= last_end[ranked.cls])
        cl = clusters[ranked.image]
        shape = (len(seg_end), n_clusters)
        total = sp.csr_matrix(
            (np.ones(len(keep)), (np.searchsorted(seg_end, keep), cl[keep])), shape=shape
        )
        pos = sp.csr_matrix(
            (np.ones(len(pos_idx)), (np.searchsorted(seg_end, pos_idx), cl[pos_idx])), shape=shape
        )
        self._matrices = {
            np.dtype(np.float64): (pos, total),
            np.dtype(np.float32): (pos.astype(np.float32), total.astype(np.float32)),
        }

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """(clusters, B) weights -> (B, C) AP; NaN where a class got no positive weight."""
        out = np.full((weights.shape[1], self.n_classes), np.nan)
        if len(self.classes) == 0:
            return out
        exact32 = float((self.sizes @ weights).max(initial=0.0)) < 2**24
        dtype = np.dtype(np.float32 if exact32 else np.float64)
        pos, total = self._matrices[dtype]
        weights = np.ascontiguousarray(weights, dtype=dtype)
        pos_w = np.asarray(pos @ weights)
        total = np.asarray(total @ weights)
        tp = pos_w.copy()
        for s in self._slices:  # in place: no fresh pages for big temporaries
            np.cumsum(tp[s], axis=0, out=tp[s])
            np.cumsum(total[s], axis=0, out=total[s])
        np.maximum(total, 1, out=total)  # total == 0 only where tp == 0
        tp /= total  # precision at each positive group
        tp *= pos_w
        num = np.add.reduceat(tp, self.seg_first, axis=0, dtype=np.float64)
        den = np.add.reduceat(pos_w, self.seg_first, axis=0, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, self.classes] = np.where(den > 0, num / den, np.nan).T
        return out


def _bootstrap_ap_ranked(
    ranked: _Ranked, clusters: np.ndarray, n_bootstrap: int, seed: int
) -> np.ndarray:
    out = np.full((n_bootstrap, ranked.n_classes), np.nan)
    if len(clusters) == 0:
        return out
    n_clusters = int(clusters.max()) + 1
    boot = _APBootstrapper(ranked, clusters, n_clusters)
    rng = np.random.default_rng(seed)
    for lo in range(0, n_bootstrap, _BOOTSTRAP_CHUNK):
        b = min(_BOOTSTRAP_CHUNK, n_bootstrap - lo)
        out[lo : lo + b] = boot(_replicate_weights(rng, n_clusters, b))
    return out


def bootstrap_ap(
    y: np.ndarray,
    scores: np.ndarray,
    ids: Sequence[Any] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """(n_bootstrap, C) per-class AP over cluster-bootstrap replicates.

    Each replicate draws as many clusters as there are, with replacement (`ids` gives each
    image's cluster, e.g. its study, so correlated views of one study move together; None:
    every image is its own cluster), and weights every image by its cluster's draw count.
    AP is NaN in a replicate that drew no positive of the class. Same seed, same replicates.
    """
    y, scores = _as_2d(y, scores)
    clusters = _cluster_codes(ids, y.shape[0])
    return _bootstrap_ap_ranked(_rank(y, scores), clusters, n_bootstrap, seed)


def _group_means(
    per_class: np.ndarray, classes: Sequence[str], groups: Mapping[str, str] | None
) -> dict[str, np.ndarray]:
    """Macro means over the last axis: overall ("") and per head/medium/tail ("_head", ...)."""
    means = {"": _nanmean(per_class)}
    if groups:
        for g in GROUPS:
            cols = [i for i, c in enumerate(classes) if groups.get(c) == g]
            if cols:
                means[f"_{g}"] = _nanmean(per_class[..., cols])
    return means


def _nanmean(a: np.ndarray) -> np.ndarray:
    """nan-mean over the last axis, NaN (not a warning) when nothing is defined."""
    defined = ~np.isnan(a)
    n = defined.sum(axis=-1)
    total = np.where(defined, a, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _percentile_ci(
    aps: np.ndarray,
    point_ap: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None,
    ci: float,
) -> dict[str, list[float] | None]:
    """Bias-shifted percentile intervals of the replicate means.

    AP of a class with few positives is biased upward under resampling (duplicated positives
    raise it, and replicates that miss a rare, poorly ranked class drop it from the mean), so
    the plain percentile interval can lie entirely above the point estimate. The replicates
    are shifted by the bootstrap bias estimate (mean of replicates minus point estimate)
    before taking percentiles: the spread and skew are the bootstrap's, the centre is the
    point estimate's.
    """
    out: dict[str, list[float] | None] = {}
    points = _group_means(point_ap[None, :], classes, groups)
    for suffix, values in _group_means(aps, classes, groups).items():
        values = values[~np.isnan(values)]
        point = float(points[suffix][0])
        if len(values) == 0 or np.isnan(point):
            out[f"mAP{suffix}"] = None
        else:
            values = values - (values.mean() - point)
            lo, hi = np.clip(np.percentile(values, [50 * (1 - ci), 50 * (1 + ci)]), 0.0, 1.0)
            out[f"mAP{suffix}"] = [float(lo), float(hi)]
    return out


def bootstrap_ci(
    y: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None = None,
    ids: Sequence[Any] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, list[float] | None]:
    """Percentile cluster-bootstrap intervals for mAP and head/medium/tail mAP.

    Classes without positives in the full set are excluded from every replicate, as from the
    point estimate; a class that a replicate happens to draw no positive for is left out of
    that replicate's mean. The interval is the [(1-ci)/2, (1+ci)/2] percentiles of the
    replicate means after shifting them by the bootstrap bias estimate (see `_percentile_ci`),
    so it is centred on the point estimate even for classes with a handful of positives.
    """
    y, scores = _as_2d(y, scores)
    return _bootstrap_ci_ranked(
        _rank(y, scores), _cluster_codes(ids, y.shape[0]), classes, groups, n_bootstrap, seed, ci
    )


def _bootstrap_ci_ranked(
    ranked: _Ranked,
    clusters: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None,
    n_bootstrap: int,
    seed: int,
    ci: float,
) -> dict[str, list[float] | None]:
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if len(classes) != ranked.n_classes:
        raise ValueError(f"{len(classes)} class names for {ranked.n_classes} columns")
    aps = _bootstrap_ap_ranked(ranked, clusters, n_bootstrap, seed)
    has_pos = np.bincount(ranked.cls[ranked.positive], minlength=ranked.n_classes) > 0
    aps[:, ~has_pos] = np.nan
    point = np.where(has_pos, _ap_from_ranked(ranked, _weights(ranked, None)), np.nan)
    return _percentile_ci(aps, point, classes, groups, ci)


# --------------------------------------------------------------------------------------------
# everything at once


def _json(x: float) -> float | None:
    """NaN -> None so the dict survives `json.dumps(allow_nan=False)`."""
    x = float(x)
    return None if np.isnan(x) else x


def evaluate(
    y: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None = None,
    thresholds: Sequence[float] | np.ndarray | None = None,
    ids: Sequence[Any] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """All CXR-LT metrics in one JSON-ready dict (undefined values are None, never NaN).

    Classes without known positives are listed in `undefined_classes` and left out of every
    mean. `groups` maps class -> head/medium/tail (None: no group means, e.g. Task 3).
    `thresholds` are validation-tuned per-class thresholds for `mF1@tuned`. `ids` are the
    bootstrap clusters (study or patient per image); `n_bootstrap=0` skips the intervals.
    """
    y, scores = _as_2d(y, scores)
    classes = list(classes)
    if len(classes) != y.shape[1]:
        raise ValueError(f"{len(classes)} class names for {y.shape[1]} columns")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    ranked = _rank(y, scores)  # one sort shared by AP, AUROC and the bootstrap
    ones = np.ones(len(ranked.image))
    positives = (y == 1).sum(axis=0)
    known = (~np.isnan(y)).sum(axis=0)
    undefined = positives == 0
    per_metric = {
        "ap": _ap_from_ranked(ranked, ones),
        "auroc": _auc_from_ranked(ranked, ones),
        "f1": f1_at(y, scores, DEFAULT_THRESHOLD),
        "f1_tuned": None,
        "threshold": None,
        "ece": expected_calibration_error(y, scores),
    }
    if thresholds is not None:
        per_metric["threshold"] = _thresholds(thresholds, len(classes))
        per_metric["f1_tuned"] = f1_at(y, scores, per_metric["threshold"])
    # undefined classes leave every mean (their ECE is still reported per class)
    means = {k: np.where(undefined, np.nan, v) for k, v in per_metric.items() if v is not None}

    result: dict[str, Any] = {"n_images": int(y.shape[0])}
    for suffix, value in _group_means(means["ap"], classes, groups).items():
        result[f"mAP{suffix}"] = _json(value)
    result["mAUROC"] = _json(_nanmean(means["auroc"]))
    result["mF1@0.5"] = _json(_nanmean(means["f1"]))
    if thresholds is not None:
        result["mF1@tuned"] = _json(_nanmean(means["f1_tuned"]))
    result["mECE"] = _json(_nanmean(means["ece"]))
    result["per_class"] = {
        c: {
            **{k: None if v is None else _json(v[i]) for k, v in per_metric.items()},
            "positives": int(positives[i]),
            "known": int(known[i]),
            "group": groups.get(c) if groups else None,
        }
        for i, c in enumerate(classes)
    }
    result["undefined_classes"] = [c for c, u in zip(classes, undefined, strict=True) if u]
    if n_bootstrap > 0:
        clusters = _cluster_codes(ids, y.shape[0])
        result["bootstrap"] = {
            "replicates": int(n_bootstrap),
            "seed": int(seed),
            "level": float(ci),
            "unit": "image" if ids is None else "cluster",
            "n_clusters": int(clusters.max()) + 1 if len(clusters) else 0,
            "method": "percentile, shifted by the bootstrap bias estimate",
        }
        result["ci"] = _bootstrap_ci_ranked(
            ranked, clusters, classes, groups, n_bootstrap, seed, ci
        )
    return result
