"""Coverage of the study-bootstrap intervals for mAP and group mAPs against a known population.

The population is a generative model of a scored test set: 40 classes with the CXR-LT Task 1
training prevalences (head / medium / tail as in `labels.frequency_groups`), studies of 1-4
images (sizes 1/2/3/4 with probabilities .50/.38/.10/.02, about MIMIC's 1.65 images per
study) sharing the study's labels, and per-class binormal scores: an image's score is
d_c * label + a study effect + an image effect (variances 0.5 + 0.5, so views of one study
correlate 0.5), with each class's separation d_c drawn once for an AUROC = Phi(d_c / sqrt 2)
uniform in [0.75, 0.95] (mean 0.85, about the CXR-LT 2023 winners' mAUROC). Its AP per class
is computed by numerical integration (AP = expected precision at a positive's score, with the
population's rates; `--check` compares it with mAP on one sample of 400,000 studies).

The target of every interval is this population value (a group's population mAP is the mean
of its classes' population APs), not the expected AP of a test set of that size: AP is biased
upward on small samples, strongly so for rare classes with a low AP, and an interval is
useful only if it covers what the model would score on the whole population. A test set that
has no positive of a class leaves that class out of its means, as `cxrlt.metrics` does.

Test sets are drawn from the population by study; each gives an interval per method from the
same cluster-bootstrap replicates (and, for BCa, the same jackknife) as `metrics.evaluate`:
  old          the former method: replicates shifted so their mean is the point estimate,
               then percentiles (reimplemented here only for the table)
  percentile   percentiles of the replicates
  basic        the percentile interval reflected about the point estimate
  BCa          bias-corrected and accelerated (`metrics.bootstrap_interval`, the default)
Coverage = share of test sets whose interval contains the population value; its Monte Carlo
standard error is sqrt(p (1 - p) / reps). Scenarios:
  large   --studies-large studies (default 4,000, ~6,560 images), Task 1 prevalences;
  small   --studies-small studies (default 500, ~820 images, like the demo's test split):
          Task 1 head and medium prevalences, and the 16 tail classes' prevalences set so that
          their expected positives per test set are spread evenly over 3-10 (the tail group
          with 3-10 positives per class; its halves with 3-5 and 6-10, and one class with
          ~6 positives alone, are reported too);
  xlarge  --studies-xlarge studies if given (40,000: about the real Task 1 test set).

Usage: python bench/bench_bootstrap_coverage.py [--reps 300] [--bootstrap 1000]
           [--studies-large 4000] [--studies-small 500] [--studies-xlarge 0 --reps-xlarge 100]
           [--jackknife-groups 200] [--workers 2] [--seed 0] [--only small,...] [--check]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from cxrlt import metrics
from cxrlt.labels import TASK1_CLASSES, TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, frequency_groups

STUDY_SIZES = np.array([1, 2, 3, 4])
STUDY_SIZE_P = np.array([0.50, 0.38, 0.10, 0.02])
RHO = 0.5  # correlation of two views' scores within a study, given the labels
METHODS = ("old", "percentile", "basic", "BCa")
LEVEL = 0.95


@dataclass(frozen=True)
class Population:
    """Per-class prevalence and binormal separation, plus named groups of classes."""

    prevalence: np.ndarray  # (C,) image-level = study-level (labels are per study)
    separation: np.ndarray  # (C,) d_c: positives ~ N(d_c, 1), negatives ~ N(0, 1)
    groups: dict[str, np.ndarray]  # group name -> class columns

    def ap(self) -> np.ndarray:
        """Population AP per class: integral of precision(s) over the positives' density."""
        out = np.empty(len(self.prevalence))
        for c, (pi, d) in enumerate(zip(self.prevalence, self.separation, strict=True)):
            s = np.linspace(d - 12, d + 12, 200_001)
            tpr, fpr = ndtr(d - s), ndtr(-s)  # P(score >= s) for positives / negatives
            precision = pi * tpr / (pi * tpr + (1 - pi) * fpr)
            density = np.exp(-0.5 * (s - d) ** 2) / np.sqrt(2 * np.pi)
            out[c] = np.trapezoid(precision * density, s)
        return out

    def draw(self, rng: np.random.Generator, n_studies: int) -> tuple[np.ndarray, ...]:
        """(labels, scores, study ids) of one test set of `n_studies` studies."""
        sizes = rng.choice(STUDY_SIZES, size=n_studies, p=STUDY_SIZE_P)
        study = np.repeat(np.arange(n_studies), sizes)
        n_classes = len(self.prevalence)
        y_study = (rng.random((n_studies, n_classes)) < self.prevalence).astype(np.float64)
        shared = rng.standard_normal((n_studies, n_classes)) * np.sqrt(RHO)
        y = y_study[study]
        noise = rng.standard_normal(y.shape) * np.sqrt(1 - RHO)
        scores = self.separation * y + shared[study] + noise
        return y, scores, study


def _separations(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sqrt(2) * ndtri(rng.uniform(0.75, 0.95, n))


def task1_population(tail_prevalence: np.ndarray | None = None, seed: int = 0) -> Population:
    """Task 1 classes and prevalences; optionally other prevalences for the tail classes."""
    prevalence = np.array([TASK1_TRAIN_COUNTS[c] for c in TASK1_CLASSES]) / TASK1_TRAIN_IMAGES
    names = frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, TASK1_CLASSES)
    groups = {g: np.array([i for i, c in enumerate(TASK1_CLASSES) if names[c] == g])
              for g in ("head", "medium", "tail")}  # fmt: skip
    if tail_prevalence is not None:
        prevalence = prevalence.copy()
        prevalence[groups["tail"]] = tail_prevalence
    separation = _separations(np.random.default_rng(seed), len(prevalence))
    return Population(prevalence, separation, {"all": np.arange(len(prevalence)), **groups})


def old_interval(reps: np.ndarray, point: float, ci: float) -> tuple[float, float]:
    """The former method: shift the replicates by their bias estimate, then percentiles."""
    shifted = reps - (reps.mean() - point)
    lo, hi = np.clip(np.percentile(shifted, [50 * (1 - ci), 50 * (1 + ci)]), 0.0, 1.0)
    return float(lo), float(hi)


def intervals(
    y: np.ndarray,
    scores: np.ndarray,
    study: np.ndarray,
    groups: dict[str, np.ndarray],
    n_bootstrap: int,
    jackknife_groups: int,
    seed: int,
) -> dict[str, tuple[float, dict[str, tuple[float, float] | None]]]:
    """Per group: (point mAP, {method: interval}) from one set of replicates."""
    engine = metrics.ClusterAP(y, scores, study)
    point = engine.point()
    boot = engine.bootstrap(n_bootstrap, seed)
    jack = engine.jackknife(jackknife_groups, seed)
    out = {}
    for name, cols in groups.items():
        p = float(np.nanmean(point[cols])) if np.isfinite(point[cols]).any() else np.nan
        reps = metrics._nanmean(boot[:, cols])
        jk = metrics._nanmean(jack[:, cols])
        finite = reps[~np.isnan(reps)]
        if np.isnan(p) or len(finite) == 0:
            out[name] = (p, dict.fromkeys(METHODS))
            continue
        per = metrics.bootstrap_interval(reps, p, None, LEVEL, "percentile")
        bca = metrics.bootstrap_interval(reps, p, jk, LEVEL, "bca")
        out[name] = (p, {"old": old_interval(finite, p, LEVEL),
                         "percentile": (per.low, per.high),
                         "basic": (2 * p - per.high, 2 * p - per.low),
                         "BCa": (bca.low, bca.high)})  # fmt: skip
    return out


def _one_test_set(task: tuple) -> dict[str, tuple[float, float, dict]]:
    """Worker: draw test set number r and return per group (point, median positives, intervals)."""
    pop, n_studies, n_bootstrap, jackknife_groups, seed, r = task
    y, s, study = pop.draw(np.random.default_rng((seed, r)), n_studies)
    n_pos = (y == 1).sum(axis=0)
    ivs = intervals(y, s, study, pop.groups, n_bootstrap, jackknife_groups, seed + r)
    return {g: (p, float(np.median(n_pos[pop.groups[g]])), iv) for g, (p, iv) in ivs.items()}


def run_scenario(
    title: str,
    pop: Population,
    n_studies: int,
    reps: int,
    n_bootstrap: int,
    jackknife_groups: int,
    seed: int,
    workers: int,
) -> list[dict]:
    """Coverage, one-sided misses, width and bias per group over `reps` test sets."""
    truth_per_class = pop.ap()
    truth = {g: float(truth_per_class[cols].mean()) for g, cols in pop.groups.items()}
    tasks = [(pop, n_studies, n_bootstrap, jackknife_groups, seed, r) for r in range(reps)]
    start = time.perf_counter()
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            sets = pool.map(_one_test_set, tasks, chunksize=1)
    else:
        sets = [_one_test_set(t) for t in tasks]
    elapsed = time.perf_counter() - start
    n_images = STUDY_SIZES @ STUDY_SIZE_P * n_studies
    print(f"{title}: {reps} test sets of {n_studies:,} studies (~{n_images:,.0f} images), "
          f"{n_bootstrap} replicates each, {workers} worker(s): {elapsed:.0f} s", flush=True)
    rows = []
    for g in pop.groups:
        points = np.array([one[g][0] for one in sets])
        row = {"scenario": title, "group": g, "classes": len(pop.groups[g]),
               "median_positives": float(np.median([one[g][1] for one in sets])),
               "truth": truth[g], "bias": float(np.nanmean(points) - truth[g])}  # fmt: skip
        for m in METHODS:
            ivs = [one[g][2][m] for one in sets]  # None (undefined) counts as a miss
            row[f"cov_{m}"] = sum(iv is not None and iv[0] <= truth[g] <= iv[1]
                                  for iv in ivs) / reps  # fmt: skip
            row[f"above_{m}"] = sum(iv is not None and truth[g] < iv[0] for iv in ivs) / reps
            row[f"below_{m}"] = sum(iv is not None and iv[1] < truth[g] for iv in ivs) / reps
            row[f"width_{m}"] = float(np.mean([iv[1] - iv[0] for iv in ivs if iv is not None]))
        rows.append(row)
    return rows


def check_population_ap(pop: Population, seed: int) -> str:
    """Integrated population mAP per group against mAP on one sample of 400,000 studies."""
    y, s, _ = pop.draw(np.random.default_rng(seed + 999), 400_000)
    sample, truth = metrics.average_precision(y, s), pop.ap()
    parts = [f"{g} {truth[c].mean():.4f} vs {sample[c].mean():.4f}" for g, c in pop.groups.items()]
    return ("population mAP by integration vs on one sample of 400,000 studies (~656,000 "
            "images): " + ", ".join(parts))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300, help="test sets per scenario")
    ap.add_argument("--bootstrap", type=int, default=1000, help="replicates per interval")
    ap.add_argument("--studies-large", type=int, default=4000)
    ap.add_argument("--studies-small", type=int, default=500)
    ap.add_argument("--studies-xlarge", type=int, default=0,
                    help="also a test set of this many studies (40000: the real Task 1 test)")
    ap.add_argument("--reps-xlarge", type=int, default=100)
    ap.add_argument("--jackknife-groups", type=int, default=metrics.JACKKNIFE_MAX_GROUPS)
    ap.add_argument("--workers", type=int, default=2, help="processes (default: 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma-separated scenarios to run (default: all)")
    ap.add_argument("--check", action="store_true",
                    help="check the integrated population AP against one large sample")
    args = ap.parse_args()

    large = task1_population(seed=args.seed)
    n_images_small = STUDY_SIZES @ STUDY_SIZE_P * args.studies_small
    tail = np.linspace(3, 10, len(large.groups["tail"])) / n_images_small
    small = task1_population(tail, seed=args.seed)
    small.groups["tail 3-5"] = small.groups["tail"][tail * n_images_small <= 5.5]
    small.groups["tail 6-10"] = small.groups["tail"][tail * n_images_small > 5.5]
    # one class alone (~6 expected positives): how the methods fare without averaging
    six = int(np.argmin(np.abs(tail * n_images_small - 6)))
    small.groups["one tail class"] = small.groups["tail"][[six]]
    if args.check:
        print(check_population_ap(large, args.seed), flush=True)
    common = (args.bootstrap, args.jackknife_groups, args.seed, args.workers)
    rows = []
    only = set(args.only.split(",")) if args.only else {"xlarge", "large", "small"}
    if args.studies_xlarge and "xlarge" in only:
        rows += run_scenario("xlarge", large, args.studies_xlarge, args.reps_xlarge, *common)
    if "large" in only:
        rows += run_scenario("large", large, args.studies_large, args.reps, *common)
    if "small" in only:
        rows += run_scenario("small", small, args.studies_small, args.reps, *common)

    print(f"\nCoverage of nominal {LEVEL:.0%} intervals of the population value; Monte Carlo "
          f"SE {np.sqrt(LEVEL * (1 - LEVEL) / args.reps):.3f} at {LEVEL:.2f} with "
          f"{args.reps} test sets")  # fmt: skip
    print("| test set | group (classes) | positives per class (median) | population mAP | "
          "bias of the estimate | old | percentile | basic | BCa | BCa misses above / below "
          "| BCa mean width |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['group']} ({r['classes']}) | {r['median_positives']:g} | "
              f"{r['truth']:.3f} | {r['bias']:+.3f} | {r['cov_old']:.3f} | "
              f"{r['cov_percentile']:.3f} | {r['cov_basic']:.3f} | {r['cov_BCa']:.3f} | "
              f"{r['above_BCa']:.3f} / {r['below_BCa']:.3f} | {r['width_BCa']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
