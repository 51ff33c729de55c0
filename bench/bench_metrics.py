"""Metric and cluster-bootstrap speed on a Task-1-test-sized problem (80,000 images x 40 classes).

Labels follow the long-tailed training prevalences (`TASK1_TRAIN_COUNTS`), two images per
study, scores are noisy and rounded to 4 decimals (ties, as in real submissions). Compares
`cxrlt.metrics` with a naive per-class scikit-learn loop; the naive bootstrap is timed on a
few replicates and extrapolated to the same count.
Usage: python bench/bench_metrics.py [--n 80000] [--bootstrap 1000] [--naive-replicates 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cxrlt import metrics
from cxrlt.labels import TASK1_CLASSES, TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, frequency_groups


def make_problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prevalence = np.array([TASK1_TRAIN_COUNTS[c] for c in TASK1_CLASSES]) / TASK1_TRAIN_IMAGES
    y = (rng.random((n, len(TASK1_CLASSES))) < prevalence).astype(np.float64)
    logits = rng.normal(0, 1, y.shape) + 1.2 * y + np.log(prevalence / (1 - prevalence))
    scores = np.round(1 / (1 + np.exp(-logits)), 4)
    ids = np.arange(n) // 2
    return y, scores, ids


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def naive_point(y: np.ndarray, s: np.ndarray) -> None:
    for c in range(y.shape[1]):
        average_precision_score(y[:, c], s[:, c])
        roc_auc_score(y[:, c], s[:, c])
        f1_score(y[:, c], s[:, c] >= 0.5)


def naive_bootstrap(y: np.ndarray, s: np.ndarray, ids: np.ndarray, b: int) -> None:
    rng = np.random.default_rng(0)
    clusters = np.unique(ids)
    members = np.split(np.argsort(ids, kind="stable"), np.cumsum(np.bincount(ids))[:-1])
    for _ in range(b):
        rows = np.concatenate([members[k] for k in rng.choice(clusters, len(clusters))])
        for c in range(y.shape[1]):
            if (y[rows, c] == 1).any():
                average_precision_score(y[rows, c], s[rows, c])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=80_000)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--naive-replicates", type=int, default=3)
    args = ap.parse_args()

    y, s, ids = make_problem(args.n)
    groups = frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, TASK1_CLASSES)
    thresholds = metrics.tune_thresholds(y, s)
    rows: list[tuple[str, float, float | None]] = []

    point = timed(lambda: metrics.average_precision(y, s), repeat=3)
    auc = timed(lambda: metrics.roc_auc(y, s), repeat=3)
    f1 = timed(lambda: metrics.f1_at(y, s, 0.5), repeat=3)
    naive = timed(lambda: naive_point(y, s))
    rows.append(("AP + AUROC + F1@0.5 (40 classes)", point + auc + f1, naive))
    rows.append(("  average_precision", point, None))
    rows.append(("  roc_auc", auc, None))
    rows.append(
        (
            "expected_calibration_error",
            timed(lambda: metrics.expected_calibration_error(y, s), 3),
            None,
        )
    )
    rows.append(("tune_thresholds", timed(lambda: metrics.tune_thresholds(y, s), 3), None))
    rows.append((
        "evaluate, no bootstrap",
        timed(lambda: metrics.evaluate(y, s, TASK1_CLASSES, groups, thresholds, n_bootstrap=0), 3),
        None,
    ))  # fmt: skip
    b = args.bootstrap
    boot = timed(lambda: metrics.bootstrap_ap(y, s, ids=ids, n_bootstrap=b, seed=0))
    per_rep = timed(lambda: naive_bootstrap(y, s, ids, args.naive_replicates))
    rows.append(
        (f"{b} study-bootstrap replicates of AP", boot, per_rep / args.naive_replicates * b)
    )
    rows.append((
        f"evaluate + {b}-replicate CIs",
        timed(lambda: metrics.evaluate(y, s, TASK1_CLASSES, groups, thresholds, ids=ids,
                                       n_bootstrap=b)),
        None,
    ))  # fmt: skip

    print(f"{args.n:,} images x {y.shape[1]} classes, {len(np.unique(ids)):,} studies, "
          f"{int((y == 1).sum()):,} positives")  # fmt: skip
    print(f"{'operation':<40} {'cxrlt':>10} {'sklearn loop':>14} {'speed-up':>9}")
    for name, ours, theirs in rows:
        ref = f"{theirs:>13.2f}s" if theirs is not None else f"{'':>14}"
        gain = f"{theirs / ours:>8.0f}x" if theirs is not None else ""
        print(f"{name:<40} {ours:>9.3f}s {ref} {gain}")
    print(f"(sklearn bootstrap extrapolated from {args.naive_replicates} replicates)")


if __name__ == "__main__":
    main()
