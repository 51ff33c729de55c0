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
sparse matrix product and a few cumulative sums (see `ClusterAP`). So does the jackknife
that BCa intervals need: a jackknife value is a weight vector with a cluster zeroed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtr, ndtri

from cxrlt.labels import GROUPS

__all__ = [
    "average_precision",
    "roc_auc",
    "f1_at",
    "tune_thresholds",
    "expected_calibration_error",
    "ClusterAP",
    "Interval",
    "bootstrap_weights",
    "jackknife_groups",
    "jackknife_weights",
    "bootstrap_ap",
    "bootstrap_interval",
    "bootstrap_ci",
    "ci_caveats",
    "evaluate",
]

DEFAULT_THRESHOLD = 0.5
_BOOTSTRAP_CHUNK = 16  # replicates per sparse product: ~(positives x 16) floats stay cache-sized
_CHUNK_FLOATS = 2**18  # small problems take more replicates per product (fewer Python rounds)
CI_METHODS = ("bca", "percentile", "basic")
METHOD_NAMES = {"bca": "BCa", "percentile": "percentile", "basic": "basic"}  # JSON, tables
# BCa's jackknife: exact leave-one-cluster-out up to this many clusters, random groups beyond
JACKKNIFE_MAX_GROUPS = 200


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
        self.n_segments = len(seg_end)
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


def bootstrap_weights(
    n_clusters: int, n_bootstrap: int, seed: int = 0, chunk: int = _BOOTSTRAP_CHUNK
) -> Iterator[np.ndarray]:
    """Cluster-bootstrap weights, yielded as (n_clusters, b) chunks of `chunk` replicates.

    Column j counts how often each cluster was drawn in replicate j (n_clusters draws with
    replacement). The draws depend on `(n_clusters, n_bootstrap, seed)` only, not on `chunk`,
    so two statistics fed the same arguments see the same resamples: that is how a paired
    bootstrap of two experiments on one test set is built (see `ClusterAP`).
    """
    rng = np.random.default_rng(seed)
    for lo in range(0, n_bootstrap, chunk):
        yield _replicate_weights(rng, n_clusters, min(chunk, n_bootstrap - lo))


def jackknife_groups(
    n_clusters: int, max_groups: int = JACKKNIFE_MAX_GROUPS, seed: int = 0
) -> np.ndarray:
    """(n_clusters,) jackknife group of each cluster.

    Up to `max_groups` clusters, each cluster is its own group: the exact leave-one-cluster-out
    jackknife. Beyond that, clusters are dealt at random into `max_groups` groups of equal size
    (+-1), the delete-a-group jackknife: its acceleration estimates the same quantity (the
    skewness of the influence values over sqrt(n)) at a fixed cost, with a little more noise.
    """
    if max_groups < 2:
        raise ValueError(f"max_groups must be >= 2, got {max_groups}")
    if n_clusters <= max_groups:
        return np.arange(n_clusters, dtype=np.int64)
    rng = np.random.default_rng((seed, 1))  # its own stream, apart from the bootstrap draws
    return (rng.permutation(n_clusters) % max_groups).astype(np.int64)


def jackknife_weights(
    groups: np.ndarray, chunk: int = _BOOTSTRAP_CHUNK
) -> Iterator[np.ndarray]:
    """Jackknife weights, yielded as (n_clusters, j) chunks: column g zeroes group g's clusters
    and keeps every other cluster once (`groups` from `jackknife_groups`)."""
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    for lo in range(0, n_groups, chunk):
        deleted = np.arange(lo, min(lo + chunk, n_groups))
        yield (groups[:, None] != deleted[None, :]).astype(np.float64)


class ClusterAP:
    """Per-class AP of one (labels, scores) pair under many cluster weightings at once.

    Sorts once; `ap(weights)` then gives the (B, C) per-class AP for a (n_clusters, B) weight
    matrix whose column b weights every image by its cluster's entry (`ids` gives each image's
    cluster, e.g. its study; None: every image is its own cluster, coded in row order; other
    ids are coded in sorted order, as `np.unique` sorts them). AP is NaN where a column leaves
    a class no positive weight. Feed it `bootstrap_weights` for bootstrap replicates and
    `jackknife_weights` for jackknife values; `bootstrap` and `jackknife` do just that.

    Paired bootstrap of two experiments on one test set (same labels and ids, two score
    matrices): feed both the same weight chunks, so every replicate resamples the same studies
    (a class a replicate leaves without positives is NaN for both, so both means drop it):

        a, b = ClusterAP(y, scores_a, ids), ClusterAP(y, scores_b, ids)

        def delta(w):  # (n_clusters, k) weights -> (k,) mAP_a - mAP_b
            return np.nanmean(a.ap(w), axis=1) - np.nanmean(b.ap(w), axis=1)

        reps = np.concatenate([delta(w) for w in bootstrap_weights(a.n_clusters, 1000, seed)])
        jack = np.concatenate([delta(w) for w in jackknife_weights(
            jackknife_groups(a.n_clusters, seed=seed))])
        interval = bootstrap_interval(reps, delta(np.ones((a.n_clusters, 1)))[0], jack)
    """

    def __init__(
        self, y: np.ndarray, scores: np.ndarray, ids: Sequence[Any] | np.ndarray | None = None
    ) -> None:
        y, scores = _as_2d(y, scores)
        self._setup(_rank(y, scores), _cluster_codes(ids, y.shape[0]))

    @classmethod
    def _from_ranked(cls, ranked: _Ranked, clusters: np.ndarray) -> ClusterAP:
        self = cls.__new__(cls)
        self._setup(ranked, clusters)
        return self

    def _setup(self, ranked: _Ranked, clusters: np.ndarray) -> None:
        self._ranked = ranked
        self.n_classes = ranked.n_classes
        self.n_clusters = int(clusters.max()) + 1 if len(clusters) else 0
        self._engine = (
            _APBootstrapper(ranked, clusters, self.n_clusters) if self.n_clusters else None
        )
        segments = self._engine.n_segments if self._engine is not None else 0
        self._chunk = int(np.clip(_CHUNK_FLOATS // max(segments, 1), _BOOTSTRAP_CHUNK, 256))

    def point(self) -> np.ndarray:
        """(C,) AP of the data as given (every image once)."""
        return _ap_from_ranked(self._ranked, _weights(self._ranked, None))

    def ap(self, weights: np.ndarray) -> np.ndarray:
        """(n_clusters, B) cluster weights -> (B, C) per-class AP."""
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 2 or weights.shape[0] != self.n_clusters:
            raise ValueError(f"weights must be ({self.n_clusters}, B), got {weights.shape}")
        if self._engine is None:
            return np.full((weights.shape[1], self.n_classes), np.nan)
        return self._engine(weights)

    def bootstrap(self, n_bootstrap: int, seed: int = 0) -> np.ndarray:
        """(n_bootstrap, C) per-class AP over cluster-bootstrap replicates."""
        weights = bootstrap_weights(self.n_clusters, n_bootstrap, seed, self._chunk)
        return self._stack(weights, n_bootstrap)

    def jackknife(self, max_groups: int = JACKKNIFE_MAX_GROUPS, seed: int = 0) -> np.ndarray:
        """(J, C) per-class AP with each jackknife group of clusters left out in turn."""
        groups = jackknife_groups(self.n_clusters, max_groups, seed)
        n_groups = int(groups.max()) + 1 if len(groups) else 0
        return self._stack(jackknife_weights(groups, self._chunk), n_groups)

    def _stack(self, chunks: Iterator[np.ndarray], n: int) -> np.ndarray:
        out = np.full((n, self.n_classes), np.nan)
        lo = 0
        for w in chunks:
            out[lo : lo + w.shape[1]] = self.ap(w)
            lo += w.shape[1]
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
    return ClusterAP(y, scores, ids).bootstrap(n_bootstrap, seed)


def _group_means(
    per_class: np.ndarray, classes: Sequence[str], groups: Mapping[str, str] | None
) -> dict[str, np.ndarray]:
    """Macro means over the last axis: overall ("") and per head/medium/tail ("_head", ...)."""
    means = {"": _nanmean(per_class)}
    if groups:
        for g in GROUPS:
            cols = _group_columns(classes, groups, g)
            if cols:
                means[f"_{g}"] = _nanmean(per_class[..., cols])
    return means


def _group_columns(classes: Sequence[str], groups: Mapping[str, str], group: str) -> list[int]:
    return [i for i, c in enumerate(classes) if groups.get(c) == group]


def _nanmean(a: np.ndarray) -> np.ndarray:
    """nan-mean over the last axis, NaN (not a warning) when nothing is defined."""
    defined = ~np.isnan(a)
    n = defined.sum(axis=-1)
    total = np.where(defined, a, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


# --------------------------------------------------------------------------------------------
# intervals from replicates


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval and how it was made.

    `method` is what was computed: "bca", "bc" (bias-corrected, acceleration 0: no usable
    jackknife values) or "percentile"; `note` says why it differs from the method asked for.
    `z0` and `acceleration` are BCa's bias correction and acceleration (None for percentile).
    """

    low: float
    high: float
    method: str
    note: str | None = None
    z0: float | None = None
    acceleration: float | None = None


def bootstrap_interval(
    replicates: np.ndarray,
    point: float,
    jackknife: np.ndarray | None = None,
    ci: float = 0.95,
    method: str = "bca",
) -> Interval | None:
    """Two-sided bootstrap interval of any scalar statistic from its replicates.

    replicates: (B,) the statistic on each bootstrap resample; NaN (undefined on that
        resample) are left out.
    point: the statistic on the data as given.
    jackknife: (J,) the statistic with each unit (or group of units) left out in turn; NaN
        are left out. Only BCa uses it (for the acceleration).
    method: "bca" (bias-corrected and accelerated, the default), "percentile" or "basic".

    Percentile: the (1-ci)/2 and (1+ci)/2 quantiles q_lo, q_hi of the replicates. Basic:
    [2 point - q_hi, 2 point - q_lo] (the percentile interval reflected about the point
    estimate; unlike the other two it can leave the statistic's range). BCa: the
    quantiles at levels moved by the bias correction z0 = Phi^-1(share of replicates below
    the point estimate, ties counted half) and the acceleration a = sum(d^3) / (6 sum(d^2)^1.5),
    d = mean(jackknife) - jackknife; level = Phi(z0 + (z0 + z) / (1 - a (z0 + z))) for
    z = Phi^-1((1 -+ ci)/2). This is what `scipy.stats.bootstrap(method="BCa")` computes from
    the same replicates and leave-one-out values (quantiles interpolated linearly).

    Fallbacks, recorded in `note`: every replicate on one side of the point estimate (z0
    infinite) -> percentile; no jackknife values or no spread in them -> acceleration 0
    ("bc"); an endpoint whose level formula breaks down (a (z0 + z) >= 1) -> the extreme
    replicate on that side. None when the point estimate or every replicate is undefined.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if method not in CI_METHODS:
        raise ValueError(f"unknown interval method {method!r}; choose from {', '.join(CI_METHODS)}")
    reps = np.asarray(replicates, dtype=np.float64).reshape(-1)
    reps = reps[~np.isnan(reps)]
    point = float(point)
    if len(reps) == 0 or np.isnan(point):
        return None
    tail = (1 - ci) / 2
    if reps.min() == reps.max() == point:  # nothing varies (e.g. AP 1 everywhere)
        return Interval(point, point, method)
    if method in ("percentile", "basic"):
        lo, hi = np.quantile(reps, [tail, 1 - tail])
        if method == "basic":
            lo, hi = 2 * point - hi, 2 * point - lo
        return Interval(float(lo), float(hi), method)
    share = (np.count_nonzero(reps < point) + np.count_nonzero(reps <= point)) / (2 * len(reps))
    if share <= 0 or share >= 1:
        side = "above" if share <= 0 else "below"
        lo, hi = np.quantile(reps, [tail, 1 - tail])
        note = (f"all {len(reps)} replicates {side} the point estimate: BCa undefined, "
                "percentile interval")  # fmt: skip
        return Interval(float(lo), float(hi), "percentile", note)
    z0 = float(ndtri(share))
    used, notes, a = "bca", [], 0.0
    jack = None if jackknife is None else np.asarray(jackknife, dtype=np.float64).reshape(-1)
    jack = None if jack is None else jack[~np.isnan(jack)]
    d = None if jack is None or len(jack) < 2 else jack.mean() - jack
    if d is None or not np.any(d):
        used = "bc"
        what = "values" if d is None else "spread"
        notes.append(f"no jackknife {what}: acceleration 0 (bias-corrected percentile)")
    else:
        a = float((d**3).sum() / (6 * (d**2).sum() ** 1.5))
    z = z0 + ndtri(np.array([tail, 1 - tail]))
    denom = 1 - a * z
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(denom > 0, ndtr(z0 + z / denom), np.where(z > 0, 1.0, 0.0))
    if (denom <= 0).any():
        notes.append("acceleration too large for the level formula: an endpoint is the extreme "
                     "replicate")  # fmt: skip
    lo, hi = np.quantile(reps, levels)
    return Interval(float(lo), float(hi), used, "; ".join(notes) or None, z0, a)


def _interval_table(
    boot: np.ndarray,
    jack: np.ndarray | None,
    point: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None,
    ci: float,
    method: str,
) -> tuple[dict[str, list[float] | None], dict[str, str]]:
    """Intervals of mAP and the group mAPs from per-class (B, C) replicates, (J, C) jackknife
    values and (C,) point APs (NaN for undefined classes), plus any fallback notes."""
    points = _group_means(point[None, :], classes, groups)
    jacks = _group_means(jack, classes, groups) if jack is not None else {}
    out: dict[str, list[float] | None] = {}
    notes: dict[str, str] = {}
    for suffix, reps in _group_means(boot, classes, groups).items():
        key = f"mAP{suffix}"
        iv = bootstrap_interval(reps, float(points[suffix][0]), jacks.get(suffix), ci, method)
        # AP lies in [0, 1]; only the basic interval can leave it
        out[key] = None if iv is None else [max(iv.low, 0.0), min(iv.high, 1.0)]
        if iv is not None and iv.note:
            notes[key] = iv.note
    return out, notes


def bootstrap_ci(
    y: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None = None,
    ids: Sequence[Any] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    method: str = "bca",
) -> dict[str, list[float] | None]:
    """Cluster-bootstrap intervals for mAP and head/medium/tail mAP (`bootstrap_interval`).

    Classes without positives in the full set are excluded from every replicate, as from the
    point estimate; a class that a replicate (or a jackknife deletion) leaves without positives
    is left out of that replicate's mean. BCa's jackknife deletes one cluster at a time, or
    random groups of clusters beyond `JACKKNIFE_MAX_GROUPS` clusters (see `jackknife_groups`).
    """
    y, scores = _as_2d(y, scores)
    cis, _, _ = _bootstrap_ci_ranked(
        _rank(y, scores), _cluster_codes(ids, y.shape[0]), classes, groups, n_bootstrap, seed,
        ci, method,
    )  # fmt: skip
    return cis


def _bootstrap_ci_ranked(
    ranked: _Ranked,
    clusters: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None,
    n_bootstrap: int,
    seed: int,
    ci: float,
    method: str,
) -> tuple[dict[str, list[float] | None], dict[str, str], int]:
    """(intervals, fallback notes, number of jackknife values)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if method not in CI_METHODS:
        raise ValueError(f"unknown interval method {method!r}; choose from {', '.join(CI_METHODS)}")
    if len(classes) != ranked.n_classes:
        raise ValueError(f"{len(classes)} class names for {ranked.n_classes} columns")
    engine = ClusterAP._from_ranked(ranked, clusters)
    point = engine.point()  # NaN for classes without positives, in every replicate too
    boot = engine.bootstrap(n_bootstrap, seed)
    jack = engine.jackknife(JACKKNIFE_MAX_GROUPS, seed) if method == "bca" else None
    cis, notes = _interval_table(boot, jack, point, classes, groups, ci, method)
    return cis, notes, 0 if jack is None else len(jack)


# Coverage of nominal 95 % intervals of the population value in the simulation study
# `python bench/bench_bootstrap_coverage.py --reps 300 --studies-xlarge 40000 --reps-xlarge 100`
# (README "Metrics": test sets of 500, 4,000 and 40,000 studies from a CXR-LT-like population).
# Per metric, by increasing positives: (median positives per class in the simulated test sets,
# number of simulated test sets, coverage by interval method).
SIMULATION_LEVEL = 0.95
SIMULATED_COVERAGE: dict[str, tuple[tuple[float, int, dict[str, float]], ...]] = {
    "mAP": (
        (12, 300, {"bca": 0.513, "percentile": 0.123, "basic": 0.887}),
        (81, 300, {"bca": 0.690, "percentile": 0.253, "basic": 0.933}),
        (803, 100, {"bca": 0.930, "percentile": 0.760, "basic": 0.940}),
    ),
    "mAP_head": (
        (193, 300, {"bca": 0.937, "percentile": 0.947, "basic": 0.940}),
        (1586, 300, {"bca": 0.953, "percentile": 0.953, "basic": 0.953}),
        (16082, 100, {"bca": 0.970, "percentile": 0.970, "basic": 0.960}),
    ),
    "mAP_medium": (
        (15, 300, {"bca": 0.843, "percentile": 0.617, "basic": 0.877}),
        (108, 300, {"bca": 0.927, "percentile": 0.847, "basic": 0.927}),
        (1052, 100, {"bca": 0.940, "percentile": 0.940, "basic": 0.940}),
    ),
    "mAP_tail": (
        (6, 300, {"bca": 0.770, "percentile": 0.383, "basic": 0.877}),
        (17.5, 300, {"bca": 0.770, "percentile": 0.373, "basic": 0.913}),
        (173, 100, {"bca": 0.920, "percentile": 0.810, "basic": 0.910}),
    ),
}


def _simulated_coverage(key: str, median: float, method: str) -> tuple[float, int, str] | None:
    """(coverage, test sets behind it, how it was read) at `median` positives per class:
    interpolated in log(positives) between simulated medians, else the nearest end."""
    rows = SIMULATED_COVERAGE.get(key)
    if not rows:
        return None
    (m0, n0, c0), (m1, n1, c1) = rows[0], rows[-1]
    if median <= m0:
        return c0[method], n0, "" if median == m0 else f" with {m0:g}, likely lower here"
    if median >= m1:
        return c1[method], n1, "" if median == m1 else f" with {m1:g}"
    for (lo, n_lo, c_lo), (hi, n_hi, c_hi) in zip(rows[:-1], rows[1:], strict=True):
        if lo <= median <= hi:
            t = float(np.log(median / lo) / np.log(hi / lo))
            return (1 - t) * c_lo[method] + t * c_hi[method], min(n_lo, n_hi), ""
    return None  # not reached: the rows are sorted


def ci_caveats(
    cis: Mapping[str, list[float] | None],
    positives: np.ndarray,
    classes: Sequence[str],
    groups: Mapping[str, str] | None,
    method: str,
    fallbacks: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """{metric: short text} for the intervals the simulation study says to read with care.

    For each interval, the median number of positives over the metric's classes that have
    positives here is looked up in `SIMULATED_COVERAGE` (interpolated between the simulated
    test-set sizes); a caveat is given when that coverage is below the nominal level by more
    than two Monte Carlo standard errors. An approximation: coverage depends on the number of
    classes and their AP too, which the study fixes (CXR-LT's 40 classes, a model of mAUROC
    0.85). Fallback notes of the interval (`bootstrap_interval`) are appended.
    """
    positives = np.asarray(positives)
    out: dict[str, str] = {}
    for key, interval in cis.items():
        texts = []
        group = None if key == "mAP" else key.removeprefix("mAP_")
        cols = (list(range(len(classes))) if group is None
                else _group_columns(classes, groups or {}, group))  # fmt: skip
        pos = positives[cols]
        pos = pos[pos > 0]
        sim = None
        if interval is not None and len(pos):
            median = float(np.median(pos))
            sim = _simulated_coverage(key, median, method)
        if sim is not None:
            cover, n_sets, where = sim
            se = np.sqrt(SIMULATION_LEVEL * (1 - SIMULATION_LEVEL) / n_sets)
            if cover < SIMULATION_LEVEL - 2 * se:
                texts.append(
                    f"{median:g} positives per class (median): simulated coverage "
                    f"{cover:.2f} for a nominal {SIMULATION_LEVEL:.2f}{where}"
                )
        if fallbacks and fallbacks.get(key):
            texts.append(fallbacks[key])
        if texts:
            out[key] = "; ".join(texts)
    return out


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
    ci_method: str = "bca",
) -> dict[str, Any]:
    """All CXR-LT metrics in one JSON-ready dict (undefined values are None, never NaN).

    Classes without known positives are listed in `undefined_classes` and left out of every
    mean. `groups` maps class -> head/medium/tail (None: no group means, e.g. Task 3).
    `thresholds` are validation-tuned per-class thresholds for `mF1@tuned`. `ids` are the
    bootstrap clusters (study or patient per image); `n_bootstrap=0` skips the intervals.
    `ci_method` is "bca" or "percentile" (`bootstrap_interval`). With intervals, `ci` holds
    them, `bootstrap` how they were made (`fallbacks`: where BCa fell back, and why) and
    `ci_caveats` a short text for each interval whose coverage the simulation study found
    below nominal for classes with as few positives as here (`ci_caveats`).
    """
    y, scores = _as_2d(y, scores)
    classes = list(classes)
    if len(classes) != y.shape[1]:
        raise ValueError(f"{len(classes)} class names for {y.shape[1]} columns")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if ci_method not in CI_METHODS:
        raise ValueError(
            f"unknown interval method {ci_method!r}; choose from {', '.join(CI_METHODS)}"
        )
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
        n_clusters = int(clusters.max()) + 1 if len(clusters) else 0
        cis, fallbacks, n_jack = _bootstrap_ci_ranked(
            ranked, clusters, classes, groups, n_bootstrap, seed, ci, ci_method
        )
        result["bootstrap"] = {
            "replicates": int(n_bootstrap),
            "seed": int(seed),
            "level": float(ci),
            "unit": "image" if ids is None else "cluster",
            "n_clusters": n_clusters,
            "method": METHOD_NAMES[ci_method],
        }
        if ci_method == "bca":
            result["bootstrap"]["jackknife"] = {
                "values": n_jack,
                "deletes": "one cluster" if n_jack == n_clusters else "a random group of clusters",
            }
        result["bootstrap"]["fallbacks"] = fallbacks
        result["ci"] = cis
        result["ci_caveats"] = ci_caveats(cis, positives, classes, groups, ci_method, fallbacks)
    return result
