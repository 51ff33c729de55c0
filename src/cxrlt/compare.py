"""`cxrlt compare`: experiments side by side, read through DVC, with a paired bootstrap.

Two questions a researcher asks after `dvc exp run -S loss=asl`:

* How much does a method vary with the training seed? Experiments whose params are equal
  except `seed` form a group; each group gets mean ± SD over its runs.
* Did B really beat A? Both models are scored on the same test images, so most of the
  sampling noise in their mAPs is shared: an image set that is hard for A is hard for B. A
  *paired* bootstrap keeps that correlation: every replicate resamples the same studies for
  both experiments, and each class's AP is computed on that same resample for both. The
  difference then varies far less across replicates than either mAP, and two overlapping
  per-experiment intervals stop hiding a consistent gain. Two groups are paired seed by
  seed, and the mean of the per-seed differences gets its own interval (the replicate-wise
  mean over seeds). That interval covers the test-set sampling with the seeds fixed; the
  spread over seeds is reported beside it.

Everything comes from DVC, never from copied files: `dvc exp show --json` lists the runs
and their params, and `dvc.api.read` at each run's commit returns its predictions
(`predict.out`) and manifest (`data.manifest`). Metrics are recomputed from the predictions
with `cxrlt.metrics`, so the table and the differences come from the same numbers (and
equal the evaluate stage's).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlt import metrics as M
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.labels import frequency_groups
from cxrlt.postprocess import LEVELS, level_scores
from cxrlt.submission import IMAGE_PREFIX

__all__ = [
    "Run",
    "PairedBootstrap",
    "paired_bootstrap",
    "paired_difference",
    "find_runs",
    "list_runs",
    "compare",
    "format_table",
]

SUMMARY = ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC")  # per run, mean ± SD
DEFAULT_PARAMS_FILE = "params.yaml"
_SHOW = 5  # how many offending ids or names a message lists


# --------------------------------------------------------------------------------------------
# the paired bootstrap (arrays only)


@dataclass(frozen=True)
class PairedBootstrap:
    """Per-run point estimates and replicates that share every resample.

    `keys` are the macro means ("mAP", "mAP_head", ...); `point[i]` and `replicates[i]` are
    score matrix i's (G,) means and (B, G) replicate means; `class_ap[i]` is its (B, C)
    per-class replicate AP; `jackknife[i]` (J, G) its means with each jackknife group of
    studies left out (BCa only, else None). Classes without positives in the full set are NaN
    throughout, as in the evaluate stage.
    """

    keys: tuple[str, ...]
    point: np.ndarray
    replicates: np.ndarray
    class_ap: np.ndarray
    n_clusters: int
    jackknife: np.ndarray | None = None


def paired_bootstrap(
    y: np.ndarray,
    scores: Sequence[np.ndarray],
    classes: Sequence[str],
    groups: Mapping[str, str] | None = None,
    ids: Sequence[Any] | np.ndarray | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    jackknife: bool = False,
) -> PairedBootstrap:
    """Cluster-bootstrap AP of several score matrices on one label matrix, same resamples.

    Each chunk of `metrics.bootstrap_weights` goes to every score matrix, so replicate b of
    run A and replicate b of run B weigh the same studies the same way; the draws are those
    of `metrics.bootstrap_ap` for `seed`. One sort per run (`metrics.ClusterAP`), then one
    sparse product per chunk of replicates. `jackknife`: also the leave-group-out values that
    BCa needs, with the same deletions for every run.
    """
    if not scores:
        raise ValueError("need at least one score matrix")
    engines = [M.ClusterAP(y, s, ids) for s in scores]
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n_classes = y.shape[1]
    if len(classes) != n_classes:
        raise ValueError(f"{len(classes)} class names for {n_classes} columns")
    n_clusters = engines[0].n_clusters
    has_pos = (y == 1).any(axis=0)
    point_ap = np.stack([e.point() for e in engines])
    class_ap = np.full((len(engines), n_bootstrap, n_classes), np.nan)
    jack = None
    if n_clusters > 0:
        class_ap[:] = _stack(engines, M.bootstrap_weights(n_clusters, n_bootstrap, seed))
        if jackknife:
            deleted = M.jackknife_groups(n_clusters, M.JACKKNIFE_MAX_GROUPS, seed)
            jack_ap = _stack(engines, M.jackknife_weights(deleted))
            jack_ap[..., ~has_pos] = np.nan
            jack = np.stack(list(M._group_means(jack_ap, classes, groups).values()), axis=-1)
    point_ap[:, ~has_pos] = np.nan
    class_ap[..., ~has_pos] = np.nan
    points = M._group_means(point_ap, classes, groups)
    reps = M._group_means(class_ap, classes, groups)
    return PairedBootstrap(
        keys=tuple(f"mAP{suffix}" for suffix in points),
        point=np.stack(list(points.values()), axis=-1),
        replicates=np.stack(list(reps.values()), axis=-1),
        class_ap=class_ap,
        n_clusters=n_clusters,
        jackknife=jack,
    )


def _stack(engines: Sequence[M.ClusterAP], chunks: Iterator[np.ndarray]) -> np.ndarray:
    """(runs, B, C) per-class AP, every run fed the same weight chunks."""
    parts = [np.stack([e.ap(w) for e in engines]) for w in chunks]
    n_classes = engines[0].n_classes
    return np.concatenate(parts, axis=1) if parts else np.empty((len(engines), 0, n_classes))


def paired_difference(
    pb: PairedBootstrap,
    pairs: Sequence[tuple[int, int]],
    ci: float = 0.95,
    method: str = "percentile",
) -> dict[str, dict[str, Any]]:
    """B − A for pairs of run indices (a, b) in `pb`, averaged over the pairs.

    With one pair this is that pair's difference; with one pair per seed it is the mean of
    the per-seed differences, its replicates the replicate-wise means (every seed's pair sees
    the same resample). Per key: A, B, Δ, the interval (`metrics.bootstrap_interval`;
    percentile by default, the usual choice for a paired difference, where the resampling
    bias of AP is nearly the same for both runs and cancels) and the fraction of replicates
    with Δ <= 0.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if not pairs:
        raise ValueError("no pairs to compare")
    if method == "bca" and pb.jackknife is None:
        raise ValueError("BCa needs paired_bootstrap(..., jackknife=True)")
    a = [i for i, _ in pairs]
    b = [j for _, j in pairs]
    point = (pb.point[b] - pb.point[a]).mean(axis=0)
    reps = (pb.replicates[b] - pb.replicates[a]).mean(axis=0)
    jack = None if pb.jackknife is None else (pb.jackknife[b] - pb.jackknife[a]).mean(axis=0)
    out = {}
    for g, key in enumerate(pb.keys):
        r = reps[:, g][~np.isnan(reps[:, g])]
        jg = None if jack is None or method != "bca" else jack[:, g]
        iv = M.bootstrap_interval(r, point[g], jg, ci, method) if len(r) else None
        out[key] = {
            "a": _json(pb.point[a, g].mean()),
            "b": _json(pb.point[b, g].mean()),
            "delta": _json(point[g]),
            "ci": None if iv is None else [iv.low, iv.high],
            "ci_method": None if iv is None else iv.method,
            "frac_le_0": float((r <= 0).mean()) if iv is not None else None,
        }
        if iv is not None and iv.note:
            out[key]["ci_note"] = iv.note
    return out


def _json(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


# --------------------------------------------------------------------------------------------
# experiments through DVC


@dataclass(frozen=True)
class Run:
    """One experiment (or the baseline commit) as `dvc exp show` lists it."""

    name: str
    rev: str | None  # commit holding its results; None: the workspace
    params: dict[str, Any]  # flattened: "predict.out"; other params files as "file:key"
    outs: dict[str, str] = field(default_factory=dict)  # path -> content hash
    baseline: bool = False

    @property
    def seed(self) -> Any:
        return self.params.get("seed")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _run_from(entry: Mapping[str, Any], name: str | None, baseline: bool) -> Run | None:
    data = entry.get("data")
    if not data or entry.get("error"):
        return None
    params: dict[str, Any] = {}
    for file, content in (data.get("params") or {}).items():
        prefix = "" if file == DEFAULT_PARAMS_FILE else f"{file}:"
        params.update(_flatten((content or {}).get("data") or {}, prefix))
    outs = {p: o["hash"] for p, o in (data.get("outs") or {}).items() if o and o.get("hash")}
    rev = entry["rev"]
    return Run(name or rev[:7], rev, params, outs, baseline)


def parse_exp_show(rows: Sequence[Mapping[str, Any]]) -> list[Run]:
    """Runs from `dvc exp show --json`: each baseline commit, then its finished experiments.

    The workspace row is left out (it duplicates the baseline or holds unsaved work);
    queued, running and failed experiments are skipped.
    """
    runs = []
    for row in rows:
        if row.get("rev") == "workspace":
            continue
        base = _run_from(row, row.get("name"), baseline=True)
        if base is not None:
            runs.append(base)
        for exp in row.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state in ("queued", "running", "failed"):
                continue
            for rev in exp.get("revs") or []:
                run = _run_from(rev, rev.get("name") or exp.get("name"), baseline=False)
                if run is not None:
                    runs.append(run)
    return runs


def _workspace_run(rows: Sequence[Mapping[str, Any]]) -> Run | None:
    ws = next((r for r in rows if r.get("rev") == "workspace"), None)
    run = _run_from(ws, "workspace", baseline=False) if ws else None
    return None if run is None else Run("workspace", None, run.params, run.outs)


def _exp_show(repo: str | Path, all_commits: bool = False) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *(["-A"] if all_commits else [])]
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"`dvc exp show --json` failed in {repo}: {last}")
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError as err:
        raise DataError(f"`dvc exp show --json` in {repo} printed no JSON ({err})") from None


def list_runs(repo: str | Path = ".", all_commits: bool = False) -> tuple[list[Run], Run | None]:
    """The finished runs `dvc exp show` lists (with `all_commits`, the experiments of every
    commit, as `dvc exp show -A`), and the workspace (selectable by name)."""
    rows = _exp_show(repo, all_commits)
    return parse_exp_show(rows), _workspace_run(rows)


def find_runs(
    repo: str | Path, names: Sequence[str]
) -> tuple[list[Run], Run | None, list[Run]]:
    """All runs `dvc exp show` lists, the workspace, and those named (all when none are).

    A name not found among HEAD's experiments is looked up across every commit
    (`dvc exp show -A`): experiments stay attached to the commit they were run on, so after
    HEAD moves on (a README commit) they are no longer in the default listing.
    """
    all_runs, workspace = list_runs(repo)
    names = [_git_commit(repo, n, all_runs) for n in names]
    try:
        return all_runs, workspace, select_runs(all_runs, names, workspace)
    except DataError:
        all_runs, workspace = list_runs(repo, all_commits=True)
        return all_runs, workspace, select_runs(all_runs, names, workspace)


def _git_commit(repo: str | Path, name: str, runs: Sequence[Run]) -> str:
    """A name that is no run's but a git revision (HEAD, HEAD~2, a tag) as its full commit id,
    which `select_runs` matches as a commit prefix; any other name unchanged."""
    if name == "workspace" or any(r.name == name for r in runs):
        return name
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=repo,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else name


def select_runs(
    runs: Sequence[Run], names: Sequence[str], workspace: Run | None = None
) -> list[Run]:
    """Runs by experiment name, branch name or commit prefix, in the order named."""
    if not names:
        return list(runs)
    chosen = []
    for name in names:
        if name == "workspace" and workspace is not None:
            hits = [workspace]
        else:
            hits = [r for r in runs if r.name == name]
            if not hits and len(name) >= 4:
                hits = [r for r in runs if r.rev and r.rev.startswith(name)]
        if not hits:
            named = [r.name for r in runs if r.name and not re.fullmatch(r"[0-9a-f]{7,40}", r.name)]
            known = ", ".join(named[:30]) + (f" and {len(named) - 30} more" if len(named) > 30 else "")
            raise DataError(f"no experiment or commit {name!r} in `dvc exp show -A`; named runs: "
                            f"{known or 'none'} (or a commit id, HEAD, a branch or tag)")  # fmt: skip
        if len(hits) > 1:
            raise DataError(f"{name!r} names {len(hits)} runs: {', '.join(r.name for r in hits)}")
        if hits[0] not in chosen:
            chosen.append(hits[0])
    return chosen


def _read_frame(repo: str | Path, run: Run, key: str, cache: dict) -> pd.DataFrame:
    """The Parquet file params key `key` names, at the run's commit, read once per content."""
    if key not in run.params:
        raise DataError(f"{run.name}: params.yaml has no {key!r}")
    path = str(run.params[key])
    tag = (path, run.outs.get(path) or run.rev or "workspace")
    if tag not in cache:
        import dvc.api
        from dvc.exceptions import DvcException

        try:
            raw = dvc.api.read(path, repo=str(repo), rev=run.rev, mode="rb")
        except (DvcException, OSError) as err:
            at = run.rev[:7] if run.rev else "the workspace"
            raise DataError(f"{run.name}: cannot read {path} at {at} through DVC: {err}") from None
        try:
            cache[tag] = pd.read_parquet(io.BytesIO(raw))
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{run.name}: {path} is not a Parquet table ({err})") from None
    return cache[tag]


# --------------------------------------------------------------------------------------------
# aligning runs on the same images


@dataclass(frozen=True)
class Aligned:
    """Every run's scores on one split, rows in one image order, one label matrix."""

    split: str
    image_ids: np.ndarray
    y: np.ndarray
    clusters: np.ndarray
    classes: list[str]
    groups: dict[str, str] | None
    scores: list[np.ndarray]
    notes: list[str]


def _classes_of(preds: pd.DataFrame) -> list[str]:
    return [c[2:] for c in preds.columns if str(c).startswith("p:")]


def _split_rows(preds: pd.DataFrame, split: str, name: str) -> pd.DataFrame:
    if "split" not in preds.columns or "image_id" not in preds.columns:
        raise DataError(f"{name}: predictions lack the 'split' or 'image_id' column")
    rows = preds[preds["split"] == split]
    if rows.empty:
        found = sorted(map(str, preds["split"].unique()))
        raise DataError(f"{name}: predictions hold no {split!r} rows (splits: {found})")
    dup = rows["image_id"].duplicated()
    if dup.any():
        raise DataError(f"{name}: image_id {rows['image_id'][dup].iloc[0]!r} is predicted twice")
    return rows.set_index("image_id")


def _groups_from(manifest: pd.DataFrame, classes: Sequence[str]) -> dict[str, str] | None:
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        return None
    counts = np.nansum(label_matrix(train, classes), axis=0)
    return frequency_groups(counts, len(train), classes)


def align(
    runs: Sequence[Run],
    predictions: Sequence[pd.DataFrame],
    manifests: Sequence[pd.DataFrame],
    split: str = "test",
    cluster: str = "study_id",
) -> Aligned:
    """One label matrix and every run's scores on it; refuses runs that are not comparable.

    Comparable means the same images of `split`, the same classes (matched by name) and the
    same labels: a paired difference on different test sets means nothing. Head / medium /
    tail come from the first run's training counts.
    """
    ref, ref_preds = runs[0], _split_rows(predictions[0], split, runs[0].name)
    classes = _classes_of(ref_preds)
    if not classes:
        raise DataError(f"{ref.name}: predictions have no 'p:<class>' columns")
    ids = np.sort(ref_preds.index.to_numpy())
    ref_manifest = manifests[0].set_index("image_id")
    missing = ref_manifest.index.intersection(ids).size != len(ids)
    if missing:
        raise DataError(f"{ref.name}: manifest lacks some {split} images of its predictions")
    y = label_matrix(ref_manifest.loc[ids], classes).astype(np.float64)
    if cluster not in ref_manifest.columns:
        raise DataError(f"{ref.name}: manifest has no cluster column {cluster!r}")
    clusters = ref_manifest.loc[ids, cluster].to_numpy()
    groups = _groups_from(manifests[0], classes)
    scores, notes = [], []
    for run, preds, manifest in zip(runs, predictions, manifests, strict=True):
        rows = _split_rows(preds, split, run.name)
        other = _classes_of(rows)
        if set(other) != set(classes):
            only_b = sorted(set(other) - set(classes))[:_SHOW]
            only_a = sorted(set(classes) - set(other))[:_SHOW]
            raise DataError(
                f"{run.name} and {ref.name} predict different classes "
                f"(only {run.name}: {only_b}; only {ref.name}: {only_a})"
            )
        if len(rows) != len(ids) or not rows.index.isin(ids).all():
            extra = sorted(set(rows.index) ^ set(ids))
            raise DataError(
                f"{run.name} and {ref.name} were scored on different {split} images "
                f"({len(extra)} not shared, e.g. {extra[:_SHOW]}); "
                "a paired comparison needs the same images"
            )
        scores.append(rows.loc[ids, [f"p:{c}" for c in classes]].to_numpy(dtype=np.float64))
        if manifest is manifests[0]:
            continue
        m = manifest.set_index("image_id")
        if m.index.intersection(ids).size != len(ids) or not np.array_equal(
            label_matrix(m.loc[ids], classes).astype(np.float64), y, equal_nan=True
        ):
            raise DataError(
                f"{run.name} and {ref.name} have different {split} labels; "
                "a paired comparison needs the same labelled images"
            )
        if _groups_from(manifest, classes) != groups:
            notes.append(
                f"{run.name}'s training counts give other head/medium/tail groups; "
                f"groups here are {ref.name}'s"
            )
    return Aligned(split, ids, y, clusters, classes, groups, scores, notes)


# --------------------------------------------------------------------------------------------
# groups of runs and the comparison


def group_runs(runs: Sequence[Run]) -> tuple[list[list[int]], list[str]]:
    """Indices of runs with equal params except `seed` (in order of first appearance), and
    the param keys whose values differ between groups."""
    keys: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        key = json.dumps({k: v for k, v in run.params.items() if k != "seed"},
                         sort_keys=True, default=str)  # fmt: skip
        keys.setdefault(key, []).append(i)
    groups = [sorted(g, key=lambda i: _seed_key(runs[i].seed)) for g in keys.values()]
    all_keys = sorted({k for r in runs for k in r.params if k != "seed"})
    differ = [
        k for k in all_keys
        if len({json.dumps(runs[g[0]].params.get(k), sort_keys=True, default=str)
                for g in groups}) > 1
    ]  # fmt: skip
    return groups, differ


def _seed_key(seed: Any) -> tuple:
    """Seeds in numeric order; a run without a `seed` param last."""
    return (seed is None, str(type(seed)), seed if seed is not None else 0)


def _label(run: Run, differ: Sequence[str], max_len: int = 48) -> str:
    if not differ:
        return "all runs"
    text = " ".join(f"{k}={_value(run.params.get(k))}" for k in differ)
    return text if len(text) <= max_len else text[: max_len - 1] + "…"


def _value(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (dict, list)) else str(v)


def _mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    v = v[~np.isnan(v)]
    return {
        "mean": float(v.mean()) if len(v) else None,
        "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
        "n": int(len(v)),
    }


def _pairs(runs: Sequence[Run], ga: Sequence[int], gb: Sequence[int]) -> tuple[list, list[str]]:
    """Seed i of A with seed i of B; two single runs pair whatever their seeds."""
    if len(ga) == 1 and len(gb) == 1:
        return [(ga[0], gb[0])], []
    by_seed: list[dict[Any, int]] = []
    for g in (ga, gb):
        seen: dict[Any, int] = {}
        for i in g:
            s = runs[i].seed
            if s in seen:
                raise DataError(
                    f"{runs[seen[s]].name} and {runs[i].name} have the same params "
                    f"and seed {s}; name the experiments to compare"
                )
            seen[s] = i
        by_seed.append(seen)
    common = [s for s in by_seed[0] if s in by_seed[1]]
    common.sort(key=_seed_key)
    left = [runs[i].name for s, i in (*by_seed[0].items(), *by_seed[1].items())
            if s not in common]  # fmt: skip
    if not common:
        one_sided = sorted(set(runs[ga[0]].params) ^ set(runs[gb[0]].params))
        hint = (f"; params only one of them has: {', '.join(one_sided)} (if added to params.yaml "
                f"between the runs, leave them out with --ignore)") if one_sided else ""  # fmt: skip
        raise DataError(f"groups of {runs[ga[0]].name} and {runs[gb[0]].name} share no seed{hint}")
    return [(by_seed[0][s], by_seed[1][s]) for s in common], left


def _dedupe(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """Drop a run whose params and predictions equal an earlier one's (e.g. an experiment
    that reproduced the baseline commit), so it is not counted as a second seed."""
    keep, notes, seen = [], [], {}
    for run in runs:
        pred = str(run.params.get("predict.out"))
        h = run.outs.get(pred)
        key = (json.dumps(run.params, sort_keys=True, default=str), h)
        if h is not None and key in seen:
            notes.append(f"{run.name} repeats {seen[key]} (same params and predictions): left out")
            continue
        seen[key] = run.name
        keep.append(run)
    return keep, notes


def compare(
    repo: str | Path = ".",
    names: Sequence[str] = (),
    baseline: str | None = None,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    method: str = "percentile",
    ignore: Sequence[str] = (),
    levels: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything `cxrlt compare` prints, as a JSON-ready dict. `ignore`: params left out of
    the grouping, e.g. a setting added to params.yaml after the older runs were made.
    `levels`: score each run at these prediction levels instead of its submitted one
    (`at_levels`)."""
    if not 0 < ci < 1:
        raise DataError(f"--ci must be between 0 and 1, got {ci}")
    if method not in M.CI_METHODS:
        raise DataError(
            f"unknown interval method {method!r}; choose from {', '.join(M.CI_METHODS)}"
        )
    wanted = list(names)
    if baseline is not None and names and baseline not in wanted:
        wanted.insert(0, baseline)
    all_runs, workspace, runs = find_runs(repo, wanted)
    if baseline is not None:
        base = select_runs(all_runs, [baseline], workspace)[0]
        runs = [base, *[r for r in runs if r != base]]
    runs, ignored = _without_params(runs, ignore)
    runs, notes = _dedupe(runs)
    notes = ignored + notes
    if not runs:
        raise DataError(f"`dvc exp show` in {repo} lists no finished runs")
    cache: dict = {}
    preds = [_read_frame(repo, r, "predict.out", cache) for r in runs]
    manifests = [_read_frame(repo, r, "data.manifest", cache) for r in runs]
    if levels:
        runs, preds, manifests, level_notes = at_levels(runs, preds, manifests, levels)
        notes += level_notes
    cluster = str(runs[0].params.get("evaluate.cluster", "study_id"))
    data = align(runs, preds, manifests, split, cluster)
    return compare_aligned(runs, data, n_bootstrap, seed, ci, notes + data.notes, method)


def at_levels(
    runs: Sequence[Run],
    predictions: Sequence[pd.DataFrame],
    manifests: Sequence[pd.DataFrame],
    levels: Sequence[str],
) -> tuple[list[Run], list[pd.DataFrame], list[pd.DataFrame], list[str]]:
    """Each run once per level, as if it had been run with `-S predict.level=<level>`.

    Every run's predictions file holds the stage-1 image probabilities (`image:`) and, when
    the fuse stage ran, the fusion model's (`fused:`); the aggregations are recomputed from
    the image columns exactly as the evaluate stage does. So the levels of the same trained
    models are compared seed by seed, with no re-run. The scores are uncalibrated
    (calibration changes neither AP nor AUROC). The first level is the A of every contrast.
    """
    wanted = list(dict.fromkeys(levels))
    bad = [lv for lv in wanted if lv not in LEVELS]
    if bad:
        raise DataError(f"--level {', '.join(bad)}: unknown level; valid: {', '.join(LEVELS)}")
    out_runs, out_preds, out_manifests = [], [], []
    for run, preds, manifest in zip(runs, predictions, manifests, strict=True):
        classes = [c[len(IMAGE_PREFIX):] for c in preds.columns if str(c).startswith(IMAGE_PREFIX)]
        if not classes:
            raise DataError(f"{run.name}: predictions have no {IMAGE_PREFIX}<class> columns "
                            "(written before levels were stored); --level needs them")  # fmt: skip
        for level in wanted:
            scores = level_scores(preds, classes, level, where=f"{run.name}: predictions")
            frame = preds.drop(columns=[c for c in preds.columns if str(c).startswith("p:")])
            frame = frame.assign(**{f"p:{c}": scores[:, i] for i, c in enumerate(classes)})
            out_runs.append(replace(run, name=f"{run.name}@{level}",
                                    params={**run.params, "predict.level": level}))  # fmt: skip
            out_preds.append(frame)
            out_manifests.append(manifest)
    note = f"levels ({', '.join(wanted)}) recomputed from each run's image-level and fused predictions, uncalibrated"
    return out_runs, out_preds, out_manifests, [note]


def _without_params(runs: list[Run], ignore: Sequence[str]) -> tuple[list[Run], list[str]]:
    """The runs with the `ignore` params dropped (each must be a param of some run)."""
    if not ignore:
        return runs, []
    known = {k for r in runs for k in r.params}
    unknown = [k for k in ignore if k not in known]
    if unknown:
        raise DataError(f"--ignore {', '.join(unknown)}: no compared run has that param "
                        f"(flattened names such as train.compile)")  # fmt: skip
    runs = [replace(r, params={k: v for k, v in r.params.items() if k not in ignore}) for r in runs]
    return runs, [f"params not used to group runs (--ignore): {', '.join(ignore)}"]


def compare_aligned(
    runs: Sequence[Run],
    data: Aligned,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    notes: Sequence[str] = (),
    method: str = "percentile",
) -> dict[str, Any]:
    """Per-run metrics, per-group mean ± SD, and paired differences against the first group."""
    per_run = []
    for run, s in zip(runs, data.scores, strict=True):
        m = M.evaluate(data.y, s, data.classes, data.groups, n_bootstrap=0)
        per_run.append({"name": run.name, "rev": run.rev, "seed": run.seed,
                        "metrics": {k: m.get(k) for k in SUMMARY}})  # fmt: skip
    groups, differ = group_runs(runs)
    group_out = []
    for g in groups:
        group_out.append({
            "label": _label(runs[g[0]], differ),
            "params": {k: runs[g[0]].params.get(k) for k in differ},
            "runs": [runs[i].name for i in g],
            "seeds": [runs[i].seed for i in g],
            "metrics": {k: _mean_sd([per_run[i]["metrics"][k] for i in g]) for k in SUMMARY},
        })  # fmt: skip
    n_groups = [len(g) for g in groups]
    if len(groups) == 1 and n_groups[0] == 2:  # two runs of one config: compare them
        first, second = sorted(groups[0])  # A is the run named (or listed) first
        contrasts = [([first], [second])]
    else:
        contrasts = [(groups[0], g) for g in groups[1:]]
    comparisons = []
    pb = None
    if contrasts:
        pb = paired_bootstrap(data.y, data.scores, data.classes, data.groups, data.clusters,
                              n_bootstrap, seed, jackknife=method == "bca")  # fmt: skip
    for ga, gb in contrasts:
        pairs, left = _pairs(runs, ga, gb)
        rows = []
        for ia, ib in pairs:
            same_seed = runs[ia].seed == runs[ib].seed
            rows.append({
                "label": f"seed {runs[ia].seed}" if same_seed else f"{runs[ia].name} → {runs[ib].name}",
                "a": runs[ia].name, "b": runs[ib].name,
                "delta": paired_difference(pb, [(ia, ib)], ci, method),
            })  # fmt: skip
        entry: dict[str, Any] = {
            "a": _label(runs[ga[0]], differ) if len(groups) > 1 else runs[ga[0]].name,
            "b": _label(runs[gb[0]], differ) if len(groups) > 1 else runs[gb[0]].name,
            "pairs": rows,
            "left_out": left,
        }
        if len(pairs) > 1:
            entry["mean"] = paired_difference(pb, pairs, ci, method)
            per_seed = pb.point[[b for _, b in pairs]] - pb.point[[a for a, _ in pairs]]
            entry["seed_sd"] = {k: _json(per_seed[:, g].std(ddof=1))
                                for g, k in enumerate(pb.keys)}  # fmt: skip
        comparisons.append(entry)
    group_counts = {}
    if data.groups:
        for g in ("head", "medium", "tail"):
            group_counts[g] = sum(1 for c in data.classes if data.groups[c] == g)
    return {
        "split": data.split,
        "n_images": int(len(data.image_ids)),
        "n_clusters": int(len(np.unique(data.clusters))),
        "n_classes": len(data.classes),
        "class_groups": group_counts,
        "differing_params": differ,
        "runs": per_run,
        "groups": group_out,
        "comparisons": comparisons,
        "bootstrap": {
            "replicates": int(n_bootstrap),
            "seed": int(seed),
            "level": float(ci),
            "unit": "study",
            "method": M.METHOD_NAMES[method],
            "paired": "every replicate resamples the same studies for all runs; each class's "
            "AP is computed on that resample for each run",
        },
        "notes": list(notes),
    }


# --------------------------------------------------------------------------------------------
# the printed table


def _f(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _ms(d: Mapping[str, Any]) -> str:
    if d["mean"] is None:
        return "—"
    return _f(d["mean"]) + (f" ± {d['sd']:.4f}" if d["sd"] is not None else "")


def format_table(result: Mapping[str, Any]) -> str:
    """The readable form of `compare`'s result: groups first, then the paired differences."""
    r = result
    cg = r["class_groups"]
    split_line = (f"{r['split']} split: {r['n_images']} images, {r['n_clusters']} studies, "
                  f"{r['n_classes']} classes")  # fmt: skip
    if cg:
        split_line += (
            f" (head {cg['head']} / medium {cg['medium']} / tail {cg['tail']}, "
            "from training counts)"
        )
    lines = [split_line]
    if r["differing_params"]:
        lines.append("groups differ in: " + ", ".join(r["differing_params"]))
    lines.append("")
    heads = {"mAP": "mAP", "mAP_head": "head", "mAP_medium": "medium", "mAP_tail": "tail",
             "mAUROC": "mAUROC"}  # fmt: skip
    keys = [k for k in SUMMARY if any(g["metrics"][k]["n"] for g in r["groups"])]
    cells = [[g["label"], str(len(g["runs"])), ",".join(map(str, g["seeds"]))]
             + [_ms(g["metrics"][k]) for k in keys] for g in r["groups"]]  # fmt: skip
    lines += _grid(["group", "runs", "seeds", *(heads[k] for k in keys)], cells, right_from=1)
    lines.append("(mean ± SD over runs; SD needs two runs)")
    for g in r["groups"]:
        members = ", ".join(f"{n} (seed {s})" for n, s in zip(g["runs"], g["seeds"], strict=True))
        lines.append(f"  {g['label']}: {members}")
    boot = r["bootstrap"]
    for c in r["comparisons"]:
        lines += ["", f"Paired study-bootstrap difference, B − A on the same {r['n_images']} "
                  f"{r['split']} images:", f"  A = {c['a']}", f"  B = {c['b']}"]  # fmt: skip
        level = f"{boot['level']:.0%}"
        lines.append(f"  {boot['replicates']} replicates over {r['n_clusters']} studies "
                     f"(seed {boot['seed']}), {level} {boot['method']} interval")  # fmt: skip
        lines.append("")
        rows = [(p["label"], p["delta"]) for p in c["pairs"]]
        if "mean" in c:
            rows.append((f"mean of {len(c['pairs'])}", c["mean"]))
        cells, footnotes = [], []
        for label, delta in rows:
            for i, (k, d) in enumerate(delta.items()):
                ci_text = "—" if d["ci"] is None else f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                if d.get("ci_note"):
                    footnotes.append(f"* {label} {heads.get(k, k)}: {d['ci_note']}")
                    ci_text += "*"
                frac = "—" if d["frac_le_0"] is None else f"{d['frac_le_0']:.3f}"
                cells.append([label if i == 0 else "", heads.get(k, k), _f(d["a"]), _f(d["b"]),
                              _f(d["delta"], signed=True), ci_text, frac])  # fmt: skip
        lines += _grid(["pair", "metric", "A", "B", "Δ (B−A)", f"{level} interval", "Δ≤0"],
                       cells, right_from=2)  # fmt: skip
        lines += footnotes
        if "seed_sd" in c:
            sd = ", ".join(f"{heads.get(k, k)} {_f(v)}" for k, v in c["seed_sd"].items())
            lines.append(f"SD of Δ over seeds: {sd}")
        if c["left_out"]:
            lines.append("unpaired (no run with the same seed): " + ", ".join(c["left_out"]))
    if not r["comparisons"]:
        lines += ["", "one group: no paired difference (name two experiments or groups)"]
    lines.append("Δ≤0: fraction of replicates in which B does not beat A.")
    for n in r["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]], right_from: int) -> list[str]:
    """Columns padded to their widest cell; columns from `right_from` on are right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if i >= right_from else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]  # fmt: skip
        return "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]
