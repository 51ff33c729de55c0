"""The evaluate stage's logic: metrics per split, DVC plot data, PNG figures and a report.

Thresholds for mF1@tuned are tuned on the validation split only and applied unchanged to
dev and test. Head/medium/tail groups come from the training counts stored in the
checkpoint. Bootstrap intervals resample clusters (studies by default), not images.

A split without any known label (e.g. an official test file before its labels were
released) still has predictions and a submission; here it is listed as unlabelled, its
metrics file holds nulls and `"labelled": false`, and it gets no figures. Everything is
computed (figures rendered in memory) before the first file is written, so a failure
leaves no mix of new and old outputs behind.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlt import metrics as M
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.io import atomic_path, write_text
from cxrlt.labels import GROUPS, frequency_groups
from cxrlt.params import section
from cxrlt.postprocess import AGGREGATIONS, level_scores, settings
from cxrlt.submission import FUSED_PREFIX, IMAGE_PREFIX, probabilities

SUMMARY_KEYS = (
    "mAP",
    "mAP_head",
    "mAP_medium",
    "mAP_tail",
    "mAUROC",
    "mF1@0.5",
    "mF1@tuned",
    "mECE",
)
# What the metrics files DVC tabulates hold (`dvc exp show` gets one column per key and
# split): the summary numbers only. Intervals and per-class values live in
# reports/evaluation.json and plots/per_class_ap.csv, which DVC does not tabulate.
METRICS_FILE_KEYS = (
    *SUMMARY_KEYS, "mECE_uncalibrated", "prevalence_baseline_mAP", "n_images", "labelled",
)  # fmt: skip
LEVEL_KEYS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC", "mECE")
CLUSTER_WORDS = {"study_id": "studies", "patient_id": "patients", "image_id": "images"}
PR_COLUMNS = ("class", "recall", "precision")
RELIABILITY_COLUMNS = ("bin_centre", "mean_predicted", "fraction_positive", "count")


def aligned(preds: pd.DataFrame, manifest: pd.DataFrame, classes: Sequence[str], split: str):
    """Labels, scores and rows of one split, joined by image_id (never by position)."""
    p = preds[preds["split"] == split].reset_index(drop=True)
    labels = manifest.set_index("image_id").loc[p["image_id"]]
    return label_matrix(labels, classes), probabilities(p, classes), p


def evaluate_predictions(
    preds: pd.DataFrame,
    manifest: pd.DataFrame,
    classes: Sequence[str],
    train_counts: Sequence[float],
    n_train: int,
    splits: Sequence[str],
    n_bootstrap: int,
    cluster: str,
    ci: float,
    seed: int,
    ci_method: str = "bca",
) -> tuple[dict[str, dict[str, Any]], np.ndarray, dict[str, str]]:
    """Full metric dicts per split, the val-tuned thresholds and the frequency groups.

    `ci_method` (params `evaluate.ci_method`): "bca", "percentile" or "basic" intervals.
    """
    if ci_method not in M.CI_METHODS:
        raise DataError(f"params.yaml evaluate.ci_method: {ci_method!r} is not one of "
                        f"{', '.join(M.CI_METHODS)}")  # fmt: skip
    groups = frequency_groups(train_counts, n_train, classes)
    y_val, s_val, _ = aligned(preds, manifest, classes, "val")
    thresholds = M.tune_thresholds(y_val, s_val)
    results = {}
    for split in splits:
        y, s, rows = aligned(preds, manifest, classes, split)
        results[split] = M.evaluate(
            y, s, classes, groups, thresholds=thresholds, ids=rows[cluster].to_numpy(),
            n_bootstrap=n_bootstrap, seed=seed, ci=ci, ci_method=ci_method,
        )
    return results, thresholds, groups


def summary_metrics(
    result: Mapping[str, Any], prevalence_baseline_map: float | None,
    uncalibrated_ece: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """What `dvc metrics show/diff` and `dvc exp show` tabulate for a labelled split.

    Only the summary numbers (METRICS_FILE_KEYS), so that two experiments compare in a
    terminal; a metric the result lacks (mF1@tuned without thresholds) is null.
    `uncalibrated_ece`: mECE of the same level before calibration (= mECE without one).
    """
    out: dict[str, Any] = {k: result.get(k) for k in SUMMARY_KEYS}
    out["mECE_uncalibrated"] = uncalibrated_ece
    out["prevalence_baseline_mAP"] = prevalence_baseline_map
    out["n_images"] = int(result["n_images"])
    out["labelled"] = True
    return out


def level_comparison(
    y: np.ndarray,
    rows: pd.DataFrame,
    classes: Sequence[str],
    groups: Mapping[str, str],
    cluster: str,
    n_bootstrap: int,
    seed: int,
    ci: float,
    ci_method: str = "bca",
) -> dict[str, dict[str, Any]]:
    """Every aggregation level from the image model's raw output, side by side, per image.

    Scored per image as the challenge scores (each image holds its study's value). Δ vs the
    image level: paired cluster bootstrap (the same resampled studies for every level) with
    the `evaluate.ci_method` interval; BCa by default, because resampling studies biases AP
    differently when a study's images share one score, so the percentile interval of this
    difference is off-centre. Uncalibrated: calibration changes neither AP nor AUROC.
    """
    from cxrlt.compare import paired_bootstrap, paired_difference

    names = list(AGGREGATIONS)
    if all(f"{FUSED_PREFIX}{c}" in rows.columns for c in classes):
        names.append("fused")
    scores = [level_scores(rows, classes, lv) for lv in names]
    pb = None
    if n_bootstrap > 0:
        pb = paired_bootstrap(y, scores, classes, groups, ids=rows[cluster].to_numpy(),
                              n_bootstrap=n_bootstrap, seed=seed, jackknife=ci_method == "bca")  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for i, level in enumerate(names):
        res = M.evaluate(y, scores[i], classes, groups, n_bootstrap=0)
        out[level] = {k: res.get(k) for k in LEVEL_KEYS}
        if pb is not None and i > 0:
            diff = paired_difference(pb, [(0, i)], ci=ci, method=ci_method)
            out[level]["delta_vs_image"] = {k: {"delta": d["delta"], "ci": d["ci"]} for k, d in diff.items()}
    return out


def unlabelled_summary(n_images: int) -> dict[str, Any]:
    """The metrics file of a split without known labels: same keys, null values."""
    out: dict[str, Any] = dict.fromkeys(METRICS_FILE_KEYS)
    out["n_images"] = int(n_images)
    out["labelled"] = False
    return out


def prevalence_baseline(y: np.ndarray, prevalence: np.ndarray) -> float | None:
    """mAP of predicting each class's training prevalence for every image (= mean positive rate).

    Undefined classes are left out, as from mAP; None (JSON null) when none is defined.
    """
    return baseline_means(y, prevalence, [str(i) for i in range(y.shape[1])], None)["mAP"]


def baseline_means(
    y: np.ndarray, prevalence: np.ndarray, classes: Sequence[str], groups: Mapping[str, str] | None
) -> dict[str, float | None]:
    """Prevalence-baseline mAP overall ("mAP") and per group ("mAP_head", ...).

    A constant score ranks nothing, so each class's AP is its positive rate among the known
    labels of the split: the floor a model's AP is read against (lift = AP / baseline).
    """
    ap = M.average_precision(y, np.broadcast_to(np.asarray(prevalence, dtype=float), y.shape))
    out: dict[str, float | None] = {"mAP": _mean_defined(ap)}
    for g in GROUPS if groups else ():
        cols = [i for i, c in enumerate(classes) if groups.get(c) == g]
        if cols:
            out[f"mAP_{g}"] = _mean_defined(ap[cols])
    return out


def _mean_defined(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


# -------------------------------------------------------------------------------------------
# plot data (DVC) and figures (PNG)


def per_class_table(
    results: Mapping[str, Mapping[str, Any]],
    classes: Sequence[str],
    train_counts: Sequence[float],
    n_train: int,
    groups: Mapping[str, str],
    splits: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per class: group, training counts, and per split AP, AUROC, prevalence, lift.

    Prevalence is positives / known labels in the split; lift = AP / prevalence (the
    prevalence-baseline AP), so 1 means "not learned". A split of `splits` without results
    (unlabelled) gets empty columns, so plot definitions naming them still find them.
    """
    table = pd.DataFrame({
        "class": list(classes), "group": [groups[c] for c in classes],
        "train_positives": np.asarray(train_counts, dtype=int),
        "train_frequency": np.asarray(train_counts, dtype=float) / n_train,
    })  # fmt: skip
    for split in results if splits is None else splits:
        per_class = results[split]["per_class"] if split in results else {}
        nan = {"ap": None, "auroc": None, "positives": 0, "known": 0}
        rows = [per_class.get(c, nan) for c in classes]
        ap = np.array([np.nan if r["ap"] is None else r["ap"] for r in rows], dtype=float)
        known = np.array([r["known"] for r in rows], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            prevalence = np.where(
                known > 0, np.array([r["positives"] for r in rows]) / known, np.nan
            )
            lift = np.where(prevalence > 0, ap / prevalence, np.nan)
        table[f"ap_{split}"] = ap
        table[f"auroc_{split}"] = [np.nan if r["auroc"] is None else r["auroc"] for r in rows]
        table[f"prevalence_{split}"] = prevalence
        table[f"lift_{split}"] = lift
    return table


def pr_curve_rows(
    y: np.ndarray, s: np.ndarray, classes: Sequence[str], chosen: Sequence[str]
) -> pd.DataFrame:
    """Precision-recall points (one block per chosen class) at every distinct threshold."""
    from sklearn.metrics import precision_recall_curve

    rows = []
    for c in chosen:
        i = list(classes).index(c)
        known = ~np.isnan(y[:, i])
        if (y[known, i] == 1).sum() == 0:
            continue
        precision, recall, _ = precision_recall_curve(y[known, i], s[known, i])
        rows.append(pd.DataFrame({"class": c, "recall": recall, "precision": precision}))
    return (
        pd.concat(rows, ignore_index=True)
        if rows
        else pd.DataFrame(columns=list(PR_COLUMNS))
    )


def reliability_rows(y: np.ndarray, s: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Pooled over classes: mean predicted probability vs observed positive rate per bin."""
    known = ~np.isnan(y)
    yy, ss = y[known], s[known]
    bins = np.minimum((ss * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean_p = np.bincount(bins, weights=ss, minlength=n_bins) / np.maximum(count, 1)
    frac = np.bincount(bins, weights=yy, minlength=n_bins) / np.maximum(count, 1)
    centre = (np.arange(n_bins) + 0.5) / n_bins
    keep = count > 0
    return pd.DataFrame(
        {
            "bin_centre": centre[keep],
            "mean_predicted": mean_p[keep],
            "fraction_positive": frac[keep],
            "count": count[keep],
        }
    )


def choose_pr_classes(
    groups: Mapping[str, str],
    train_counts: Sequence[float],
    classes: Sequence[str],
    per_group: int = 2,
) -> list[str]:
    """The most frequent classes of each group: readable curves for head, medium and tail."""
    order = np.argsort(-np.asarray(train_counts, dtype=float), kind="stable")
    chosen = []
    for g in ("head", "medium", "tail"):
        chosen += [classes[i] for i in order if groups[classes[i]] == g][:per_group]
    return chosen


def _png(fig: Any) -> bytes:
    """A figure as PNG bytes (rendered now, written with the other outputs later)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return buffer.getvalue()


GROUP_COLOURS = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}


def draw_figures(
    table: pd.DataFrame, pr: pd.DataFrame, rel: pd.DataFrame, split: str
) -> dict[str, bytes]:
    """PNG bytes per figure name for one split.

    A figure with nothing defined to draw (no defined AP, no curve) is left out rather than
    drawn empty, and never crashes the stage (a log axis with no positive value would).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figures: dict[str, bytes] = {}
    col = f"ap_{split}"
    ap_all = table[col].to_numpy(dtype=float)
    # a log axis cannot show classes without training positives
    drawable = table[np.isfinite(ap_all) & (table["train_positives"].to_numpy() > 0)]
    if len(drawable):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for g, part in drawable.groupby("group"):
            ax.scatter(part["train_positives"], part[col], label=g, color=GROUP_COLOURS[g], s=28)
        for _, r in drawable.iterrows():
            ax.annotate(
                r["class"],
                (r["train_positives"], r[col]),
                fontsize=6,
                alpha=0.7,
                xytext=(3, 2),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel("training positives (log scale)")
        ax.set_ylabel(f"AP ({split})")
        ax.set_ylim(0, 1.02)
        ax.legend(title="group")
        ax.set_title(f"Per-class AP vs training frequency ({split})")
        figures["ap_vs_frequency"] = _png(fig)

    if np.isfinite(ap_all).any():
        fig, ax = plt.subplots(figsize=(11, 4.5))
        t = table.assign(order=table["group"].map({"head": 0, "medium": 1, "tail": 2}))
        t = t.sort_values(["order", col], ascending=[True, False])
        # an undefined AP (no positives) gets no bar and a mark, never a bar of height 0
        ap = t[col].to_numpy(dtype=float)
        ax.bar(np.arange(len(t)), np.nan_to_num(ap), color=[GROUP_COLOURS[g] for g in t["group"]])
        for i in np.flatnonzero(np.isnan(ap)):
            ax.text(i, 0.01, "undefined", rotation=90, ha="center", va="bottom", fontsize=6)
        ax.set_xticks(np.arange(len(t)), t["class"], rotation=90, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.legend(handles=[Patch(color=GROUP_COLOURS[g], label=g) for g in GROUP_COLOURS
                           if g in set(t["group"])], title="group", fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.0, 1.0))  # fmt: skip
        ax.set_ylabel(f"AP ({split})")
        ax.set_title(f"Per-class AP by group ({split}; head / medium / tail)")
        figures["ap_by_group"] = _png(fig)

    if len(pr) or len(rel):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        for c, part in pr.groupby("class", sort=False):
            axes[0].plot(part["recall"], part["precision"], label=c, drawstyle="steps-post")
        axes[0].set_xlabel("recall")
        axes[0].set_ylabel("precision")
        axes[0].set_title(f"Precision-recall ({split})")
        if len(pr):
            axes[0].legend(fontsize=7)
        axes[1].plot([0, 1], [0, 1], "k--", lw=0.8)
        axes[1].plot(rel["mean_predicted"], rel["fraction_positive"], "o-")
        axes[1].set_xlabel("mean predicted probability")
        axes[1].set_ylabel("fraction positive")
        axes[1].set_title(f"Reliability, all classes pooled ({split})")
        figures["pr_reliability"] = _png(fig)
    return figures


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "undefined"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _vs_baseline(value: float | None, baseline: float | None) -> str:
    """ "0.782 vs 0.250 (3.1×)": a metric read against its prevalence baseline."""
    if value is None or baseline is None:
        return "undefined"
    lift = f" ({value / baseline:.1f}×)" if baseline > 0 else ""
    return f"{value:.3f} vs {baseline:.3f}{lift}"


def _recipe(info: Mapping[str, Any]) -> str:
    """The training choices beyond the loss that the checkpoint records (older ones may not)."""
    parts = [f", sampler `{info['sampler']}`"] if info.get("sampler") else []
    if info.get("drw_epoch") is not None:
        parts.append(f", deferred re-weighting (`drw_epoch` {info['drw_epoch']})")
    if info.get("ema_decay"):
        parts.append(f", EMA weights (decay {info['ema_decay']})")
    if info.get("crt"):
        parts.append(", classifier re-trained (cRT)")
    return "".join(parts)


def render_report(
    results: Mapping[str, Mapping[str, Any]],
    summaries: Mapping[str, Mapping[str, Any]],
    baselines: Mapping[str, Mapping[str, float | None]],
    table: pd.DataFrame,
    figures: Mapping[str, Mapping[str, str]],
    info: Mapping[str, Any],
    cluster: str,
    levels: Mapping[str, Mapping[str, Any]] | None = None,
    post: Mapping[str, str] | None = None,
) -> str:
    """The Markdown report: summary with intervals, lift per group, levels, figures, per-class table.

    `results` holds the full metric dicts of the labelled splits, `summaries` every split's
    metrics file (unlabelled ones too), `baselines` the prevalence-baseline means of each
    labelled split, `figures` per split the figure links relative to the report.
    """
    labelled = list(results)
    unlabelled = [s for s in summaries if s not in results]
    model = info["model"]
    lines = [
        "# Evaluation report",
        "",
        f"Model: `{model['backbone']}` + `{model['head']}` head, loss `{info['loss']}`"
        f"{_recipe(info)}, seed {info['seed']}, best val mAP {_fmt(info.get('val_mAP'))}.",
        "",
    ]
    if unlabelled:
        lines += [
            "Unlabelled (no known label; predictions and submission only, no metrics or "
            "figures): "
            + ", ".join(f"**{s}** ({summaries[s]['n_images']} images)" for s in unlabelled),
            "",
        ]
    if labelled:
        lines += ["| metric | " + " | ".join(labelled) + " |", "|---|" + "---|" * len(labelled)]
        for key in SUMMARY_KEYS:
            cells = []
            for res in results.values():
                cell = _fmt(res.get(key))
                ci = (res.get("ci") or {}).get(key)
                if ci:
                    cell += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
                    caveat = (res.get("ci_caveats") or {}).get(key)
                    cell += f" ({caveat})" if caveat else ""
                cells.append(cell)
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append(
            "| prevalence baseline mAP | "
            + " | ".join(_fmt(baselines[s]["mAP"]) for s in labelled)
            + " |"
        )
        boot = next((r["bootstrap"] for r in results.values() if r.get("bootstrap")), None)
        if boot:
            unit = CLUSTER_WORDS.get(cluster, cluster)
            brackets = (f"Brackets: {100 * boot['level']:g}% cluster-bootstrap intervals, method: "
                        f"{boot.get('method', 'not recorded')} ({boot['replicates']} replicates "
                        f"resampling {unit}).")  # fmt: skip
        else:
            brackets = "No intervals (evaluate.n_bootstrap is 0)."
        lines += [
            "",
            f"{brackets} mF1@tuned uses per-class thresholds tuned on the validation "
            "split. The prevalence baseline predicts each class's training prevalence for every "
            "image; its AP is the class's positive rate in the split, so lift = AP / baseline "
            "and 1× means not learned.",
        ]
        lines += [
            "",
            "mAP vs prevalence baseline (lift) per group:",
            "",
            "| group | " + " | ".join(labelled) + " |",
            "|---|" + "---|" * len(labelled),
        ]
        for key in ("mAP", *(f"mAP_{g}" for g in GROUPS)):
            if any(key in baselines[s] for s in labelled):
                name = "all" if key == "mAP" else key.removeprefix("mAP_")
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        _vs_baseline(results[s].get(key), baselines[s].get(key)) for s in labelled
                    )
                    + " |"
                )
        for split, res in results.items():
            if res["undefined_classes"]:
                lines += [
                    "",
                    f"**{split}**: AP undefined (no positives, excluded from every mean): "
                    + ", ".join(res["undefined_classes"]),
                ]
    if levels:
        lines += _level_lines(levels, summaries, post or {"level": "image", "calibrate": "none"})
    if any(figures.values()):
        lines += ["", "## Figures", ""]
        for split, figs in figures.items():
            lines += [f"![{name} {split}]({link})" for name, link in figs.items()]
    if labelled:
        head = (
            "| class | group | train positives | "
            + " | ".join(f"{s} prevalence | {s} AP | {s} lift | {s} AUROC" for s in labelled)
            + " |"
        )
        lines += [
            "",
            "## Per-class results",
            "",
            "Prevalence: positives / known labels in the split. Lift: AP / prevalence.",
            "",
            head,
            "|---|---|---|" + "---|" * (4 * len(labelled)),
        ]
        for _, r in table.iterrows():
            c, cells = r["class"], []
            for s in labelled:
                m = results[s]["per_class"][c]
                prevalence = (f"{m['positives'] / m['known']:.4f} ({m['positives']}/{m['known']})"
                              if m["known"] else "no labels")  # fmt: skip
                lift = _fmt(r[f"lift_{s}"], 1)
                cells += [
                    prevalence,
                    _fmt(m["ap"]),
                    lift if lift == "undefined" else f"{lift}×",
                    _fmt(m["auroc"]),
                ]
            lines.append(
                f"| {c} | {r['group']} | {r['train_positives']} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def _level_lines(
    levels: Mapping[str, Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any]],
    post: Mapping[str, str],
) -> list[str]:  # fmt: skip
    lines = [
        "",
        "## Aggregation levels and calibration",
        "",
        f"Submitted: level `{post['level']}`, calibration `{post['calibrate']}` (fitted per class "
        "on the val split). Every level below is computed from the same image-level "
        "predictions, uncalibrated, and scored per image (each image holds its study's value). "
        "Δ: paired cluster-bootstrap difference to the image level (same resamples for every "
        "level, the report's interval method).",
        "",
        "| split | level | mAP | Δ mAP vs image | head | medium | tail | mAUROC | mECE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for split, table in levels.items():
        for level, m in table.items():
            d = (m.get("delta_vs_image") or {}).get("mAP")
            delta = "—" if d is None or d["delta"] is None else (
                f"{d['delta']:+.4f}" + (f" [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d["ci"] else ""))
            cells = [_fmt(m.get(k)) for k in ("mAP",)] + [delta] + [
                _fmt(m.get(k)) for k in ("mAP_head", "mAP_medium", "mAP_tail", "mAUROC", "mECE")]
            lines.append(f"| {split} | {level} | " + " | ".join(cells) + " |")
    lines += ["", "mECE of the submitted predictions: " + ", ".join(
        f"{s} {_fmt(m.get('mECE'))} (uncalibrated {_fmt(m.get('mECE_uncalibrated'))})"
        for s, m in summaries.items() if m.get("labelled"))]  # fmt: skip
    return lines


# -------------------------------------------------------------------------------------------
# the stage: check the inputs, compute everything, then write


def _where(params: Mapping[str, Any], key: str, default: str) -> str:
    """A file's params path for messages (tests call `run` without the other sections)."""
    try:
        return str(section(params, key))
    except DataError:
        return default


def _settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The `evaluate` params, checked: a bad value names its key instead of failing later."""
    keys = ("splits", "n_bootstrap", "cluster", "ci", "metrics_dir", "plots_dir", "report_dir")
    e = {k: section(params, f"evaluate.{k}") for k in keys}
    splits = e["splits"]
    if isinstance(splits, str) or not isinstance(splits, Sequence) or not splits:
        raise DataError(
            f"params.yaml evaluate.splits: expected a list such as [dev, test], got {splits!r}"
        )
    e["splits"] = [str(s) for s in splits]
    if len(set(e["splits"])) != len(e["splits"]):
        raise DataError(f"params.yaml evaluate.splits: repeated split in {e['splits']}")
    try:
        e["n_bootstrap"], e["ci"] = int(e["n_bootstrap"]), float(e["ci"])
    except (TypeError, ValueError):
        raise DataError(
            f"params.yaml evaluate: n_bootstrap {e['n_bootstrap']!r} and ci {e['ci']!r} "
            "must be numbers"
        ) from None
    if e["n_bootstrap"] < 0 or not 0 < e["ci"] < 1:
        raise DataError(
            f"params.yaml evaluate: need n_bootstrap >= 0 and 0 < ci < 1, got "
            f"{e['n_bootstrap']} and {e['ci']}"
        )
    return e


def check_inputs(
    preds: pd.DataFrame,
    manifest: pd.DataFrame,
    info: Mapping[str, Any],
    splits: Sequence[str],
    cluster: str,
    where: Mapping[str, str],
) -> None:
    """Everything `run` relies on, as one-line DataErrors naming the file and the key."""
    missing = [
        k
        for k in ("classes", "train_counts", "n_train_images", "model", "loss", "seed")
        if k not in info
    ]
    if missing:
        raise DataError(
            f"{where['checkpoint']}: checkpoint lacks {missing} (re-run the train stage)"
        )
    classes = list(info["classes"])
    if len(info["train_counts"]) != len(classes) or int(info["n_train_images"]) <= 0:
        raise DataError(
            f"{where['checkpoint']}: train_counts / n_train_images do not match its "
            f"{len(classes)} classes"
        )
    needed = ["image_id", "split", "study_id", "view", cluster, *(f"p:{c}" for c in classes),
              *(f"{IMAGE_PREFIX}{c}" for c in classes)]  # fmt: skip
    missing = [c for c in needed if c not in preds.columns]
    if missing:
        raise DataError(
            f"{where['predictions']}: missing columns {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} (evaluate.cluster is {cluster!r}; "
            "re-run the predict stage)"
        )
    missing = [c for c in ("image_id", "split", *classes) if c not in manifest.columns]
    if missing:
        raise DataError(
            f"{where['manifest']}: missing columns {missing} needed by the checkpoint's "
            f"classes (was the manifest prepared for another task?)"
        )
    if manifest["image_id"].duplicated().any():
        raise DataError(
            f"{where['manifest']}: duplicate image_id "
            f"{manifest.loc[manifest['image_id'].duplicated(), 'image_id'].iloc[0]!r}"
        )
    unknown = ~preds["image_id"].isin(manifest["image_id"])
    if unknown.any():
        raise DataError(
            f"{where['predictions']}: {int(unknown.sum())} image_ids not in {where['manifest']}, "
            f"e.g. {preds.loc[unknown, 'image_id'].iloc[0]!r} (re-run the predict stage)"
        )
    for split in splits:
        if not (preds["split"] == split).any():
            in_manifest = int((manifest["split"] == split).sum())
            raise DataError(
                f"{where['predictions']}: no predictions for split {split!r} of evaluate.splits "
                f"({where['manifest']} has {in_manifest} such images; splits predicted: "
                f"{sorted(preds['split'].unique())})"
            )
    fused = all(f"{FUSED_PREFIX}{c}" in preds.columns for c in classes)
    for prefix in ("p:", IMAGE_PREFIX, *((FUSED_PREFIX,) if fused else ())):
        probs = probabilities(preds, classes, prefix)
        bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(
                f"{where['predictions']}: probability {probs[r, c]!r} in column "
                f"'{prefix}{classes[c]}' for image_id {preds['image_id'].iloc[r]!r}"
            )


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def write_outputs(files: Mapping[Path, str | bytes]) -> None:
    """Write every output, each atomically; called only once all of them are computed."""
    for path, content in files.items():
        if isinstance(content, bytes):
            with atomic_path(path) as tmp:
                tmp.write_bytes(content)
        else:
            write_text(path, content)


def run(
    preds: pd.DataFrame, manifest: pd.DataFrame, info: Mapping[str, Any], params: Mapping[str, Any]
) -> dict:
    """Everything the evaluate stage writes; returns the metrics-file dict per split.

    Splits without any known label are reported as unlabelled (no metrics, no figures).
    Nothing is written until every output is computed.
    """
    e = _settings(params)
    level, calibrate = settings(params)
    ci_method = str(params["evaluate"].get("ci_method", "bca"))
    where = {"predictions": _where(params, "predict.out", "predictions"),
             "manifest": _where(params, "data.manifest", "manifest"),
             "checkpoint": _where(params, "train.checkpoint", "checkpoint")}  # fmt: skip
    splits, cluster = e["splits"], str(e["cluster"])
    check_inputs(preds, manifest, info, splits, cluster, where)
    if level == "fused" and not all(f"{FUSED_PREFIX}{c}" in preds.columns for c in info["classes"]):
        raise DataError(f"{where['predictions']}: predict.level is 'fused' but there are no fused: "
                        "columns (re-run the predict stage)")  # fmt: skip
    classes = list(info["classes"])
    counts, n_train = info["train_counts"], int(info["n_train_images"])
    split_data = {s: aligned(preds, manifest, classes, s) for s in splits}
    labelled = [s for s in splits if (~np.isnan(split_data[s][0])).any()]
    results, thresholds, groups = evaluate_predictions(
        preds,
        manifest,
        classes,
        counts,
        n_train,
        labelled,
        e["n_bootstrap"],
        cluster,
        e["ci"],
        int(params.get("seed", 0)),
        ci_method=ci_method,
    )
    metrics_dir, plots_dir, report_dir = (
        Path(e["metrics_dir"]),
        Path(e["plots_dir"]),
        Path(e["report_dir"]),
    )
    prevalence = np.asarray(counts, dtype=float) / n_train
    table = per_class_table(results, classes, counts, n_train, groups, splits)
    chosen = choose_pr_classes(groups, counts, classes)
    files: dict[Path, str | bytes] = {
        plots_dir / "per_class_ap.csv": table.to_csv(index=False),
        plots_dir / "thresholds.csv": pd.DataFrame(
            {"class": classes, "threshold": thresholds}
        ).to_csv(index=False),
    }
    seed = int(params.get("seed", 0))
    levels = {
        split: level_comparison(split_data[split][0], split_data[split][2], classes, groups, cluster,
                                e["n_bootstrap"], seed, e["ci"], ci_method)
        for split in results
    }  # fmt: skip
    summaries: dict[str, dict[str, Any]] = {}
    baselines: dict[str, dict[str, float | None]] = {}
    figures: dict[str, dict[str, str]] = {}
    for split in splits:
        y, s, rows = split_data[split]
        if split not in results:
            summaries[split] = unlabelled_summary(len(rows))
            # header-only plot data: the plot definitions in dvc.yaml still find their files
            for name, columns in (("pr_curves", PR_COLUMNS), ("reliability", RELIABILITY_COLUMNS)):
                empty = pd.DataFrame(columns=list(columns))
                files[plots_dir / f"{name}_{split}.csv"] = empty.to_csv(index=False)
        else:
            baselines[split] = baseline_means(y, prevalence, classes, groups)
            summaries[split] = summary_metrics(results[split], baselines[split]["mAP"],
                                               levels[split].get(level, {}).get("mECE"))  # fmt: skip
            pr, rel = pr_curve_rows(y, s, classes, chosen), reliability_rows(y, s)
            files[plots_dir / f"pr_curves_{split}.csv"] = pr.to_csv(index=False)
            files[plots_dir / f"reliability_{split}.csv"] = rel.to_csv(index=False)
            figures[split] = {}
            for name, png in draw_figures(table, pr, rel, split).items():
                path = plots_dir / "figures" / f"{name}_{split}.png"
                files[path] = png
                figures[split][name] = os.path.relpath(path, report_dir)
        files[metrics_dir / f"{split}.json"] = _json_text(summaries[split])
    post = {"level": level, "calibrate": calibrate}
    files[report_dir / "evaluation.md"] = render_report(
        results, summaries, baselines, table, figures, info, cluster, levels, post
    )
    tuned = dict(zip(classes, map(float, thresholds), strict=True))
    full: dict[str, Any] = {"thresholds": tuned, "postprocess": post}
    for split in splits:
        if split in results:
            baseline = {"prevalence_baseline": baselines[split]}
            full[split] = {"labelled": True, **results[split], **baseline, "levels": levels[split]}
        else:
            full[split] = {"labelled": False, "n_images": summaries[split]["n_images"]}
    files[report_dir / "evaluation.json"] = _json_text(full)
    # The format `cxrlt score --thresholds` reads.
    files[report_dir / "thresholds.json"] = _json_text(tuned)
    write_outputs(files)
    return summaries
