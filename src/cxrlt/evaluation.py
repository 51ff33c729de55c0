"""The evaluate stage's logic: metrics per split, DVC plot data, PNG figures and a report.

Thresholds for mF1@tuned are tuned on the validation split only and applied unchanged to
dev and test. Head/medium/tail groups come from the training counts stored in the
checkpoint. Bootstrap intervals resample clusters (studies by default), not images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrlt import metrics as M
from cxrlt.data.manifest import label_matrix
from cxrlt.io import atomic_path, write_csv, write_json, write_text
from cxrlt.labels import frequency_groups
from cxrlt.submission import probabilities

SUMMARY_KEYS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC", "mF1@0.5", "mF1@tuned", "mECE")


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
) -> tuple[dict[str, dict[str, Any]], np.ndarray, dict[str, str]]:
    """Full metric dicts per split, the val-tuned thresholds and the frequency groups."""
    groups = frequency_groups(train_counts, n_train, classes)
    y_val, s_val, _ = aligned(preds, manifest, classes, "val")
    thresholds = M.tune_thresholds(y_val, s_val)
    results = {}
    for split in splits:
        y, s, rows = aligned(preds, manifest, classes, split)
        results[split] = M.evaluate(
            y, s, classes, groups, thresholds=thresholds, ids=rows[cluster].to_numpy(),
            n_bootstrap=n_bootstrap, seed=seed, ci=ci,
        )
    return results, thresholds, groups


def summary_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """What `dvc metrics show/diff` tracks: the means, their intervals and per-class AP."""
    out: dict[str, Any] = {k: result.get(k) for k in SUMMARY_KEYS if k in result}
    out["n_images"] = result["n_images"]
    for key, interval in (result.get("ci") or {}).items():
        if interval is not None:
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = interval
    out["undefined_classes"] = len(result["undefined_classes"])
    out["per_class_ap"] = {c: v["ap"] for c, v in result["per_class"].items()}
    return out


def prevalence_baseline(y: np.ndarray, prevalence: np.ndarray) -> float | None:
    """mAP of predicting each class's training prevalence for every image (= mean positive rate).

    Undefined classes are left out, as from mAP; None (JSON null) when none is defined.
    """
    s = np.broadcast_to(prevalence, y.shape)
    ap = M.average_precision(y, s)
    ap = ap[~np.isnan(ap)]
    return float(ap.mean()) if len(ap) else None


# -------------------------------------------------------------------------------------------
# plot data (DVC) and figures (PNG)


def per_class_table(results: Mapping[str, Mapping[str, Any]], classes: Sequence[str],
                    train_counts: Sequence[float], n_train: int, groups: Mapping[str, str]) -> pd.DataFrame:
    table = pd.DataFrame({
        "class": list(classes), "group": [groups[c] for c in classes],
        "train_positives": np.asarray(train_counts, dtype=int),
        "train_frequency": np.asarray(train_counts, dtype=float) / n_train,
    })  # fmt: skip
    for split, res in results.items():
        table[f"ap_{split}"] = [res["per_class"][c]["ap"] for c in classes]
    return table


def pr_curve_rows(y: np.ndarray, s: np.ndarray, classes: Sequence[str], chosen: Sequence[str]) -> pd.DataFrame:
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
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["class", "recall", "precision"])


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
    return pd.DataFrame({"bin_centre": centre[keep], "mean_predicted": mean_p[keep],
                         "fraction_positive": frac[keep], "count": count[keep]})


def choose_pr_classes(groups: Mapping[str, str], train_counts: Sequence[float], classes: Sequence[str],
                      per_group: int = 2) -> list[str]:
    """The most frequent classes of each group: readable curves for head, medium and tail."""
    order = np.argsort(-np.asarray(train_counts, dtype=float), kind="stable")
    chosen = []
    for g in ("head", "medium", "tail"):
        chosen += [classes[i] for i in order if groups[classes[i]] == g][:per_group]
    return chosen


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")


GROUP_COLOURS = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}


def draw_figures(table: pd.DataFrame, pr: pd.DataFrame, rel: pd.DataFrame, split: str,
                 out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    col = f"ap_{split}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, part in table.groupby("group"):
        ax.scatter(part["train_positives"], part[col], label=g, color=GROUP_COLOURS[g], s=28)
    for _, r in table.iterrows():
        if pd.notna(r[col]):
            ax.annotate(r["class"], (r["train_positives"], r[col]), fontsize=6, alpha=0.7,
                        xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training positives (log scale)")
    ax.set_ylabel(f"AP ({split})")
    ax.set_ylim(0, 1.02)
    ax.legend(title="group")
    ax.set_title(f"Per-class AP vs training frequency ({split})")
    paths["ap_vs_frequency"] = out_dir / f"ap_vs_frequency_{split}.png"
    save_figure(fig, paths["ap_vs_frequency"])
    plt.close(fig)

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
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=GROUP_COLOURS[g], label=g) for g in GROUP_COLOURS
                       if g in set(t["group"])], title="group", fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))  # fmt: skip
    ax.set_ylabel(f"AP ({split})")
    ax.set_title(f"Per-class AP by group ({split}; head / medium / tail)")
    paths["ap_by_group"] = out_dir / f"ap_by_group_{split}.png"
    save_figure(fig, paths["ap_by_group"])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for c, part in pr.groupby("class", sort=False):
        axes[0].plot(part["recall"], part["precision"], label=c, drawstyle="steps-post")
    axes[0].set_xlabel("recall")
    axes[0].set_ylabel("precision")
    axes[0].set_title(f"Precision-recall ({split})")
    axes[0].legend(fontsize=7)
    axes[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[1].plot(rel["mean_predicted"], rel["fraction_positive"], "o-")
    axes[1].set_xlabel("mean predicted probability")
    axes[1].set_ylabel("fraction positive")
    axes[1].set_title(f"Reliability, all classes pooled ({split})")
    paths["pr_reliability"] = out_dir / f"pr_reliability_{split}.png"
    save_figure(fig, paths["pr_reliability"])
    plt.close(fig)
    return paths


def _fmt(x: Any) -> str:
    return "undefined" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def write_report(path: str | os.PathLike, results: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, float],
                 table: pd.DataFrame, figures: Mapping[str, Mapping[str, Path]], info: Mapping[str, Any]) -> None:
    """A Markdown report with the summary, the per-class table and the figures."""
    path = Path(path)
    lines = ["# Evaluation report", "",
             f"Model: `{info['model']['backbone']}` + `{info['model']['head']}` head, loss `{info['loss']}`, "
             f"seed {info['seed']}, best val mAP {_fmt(info.get('val_mAP'))}.", "",
             "| metric | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for key in SUMMARY_KEYS:
        cells = []
        for res in results.values():
            v = res.get(key)
            ci = (res.get("ci") or {}).get(key)
            cells.append(_fmt(v) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| prevalence baseline mAP | " + " | ".join(_fmt(baselines[s]) for s in results) + " |")
    boot = next((r["bootstrap"] for r in results.values() if r.get("bootstrap")), None)
    level = f"{100 * boot['level']:g}%" if boot else "no"
    lines += ["", f"Brackets: {level} cluster-bootstrap intervals (resampling studies). mF1@tuned uses "
              "per-class thresholds tuned on the validation split. The prevalence baseline predicts "
              "each class's training prevalence for every image."]
    for split, res in results.items():
        if res["undefined_classes"]:
            lines += ["", f"**{split}**: AP undefined (no positives, excluded from every mean): "
                      + ", ".join(res["undefined_classes"])]
    lines += ["", "## Figures", ""]
    for split, figs in figures.items():
        for name, p in figs.items():
            lines.append(f"![{name} {split}]({os.path.relpath(p, path.parent)})")
    lines += ["", "## Per-class results", "",
              "| class | group | train positives | " + " | ".join(f"AP {s}" for s in results)
              + " | " + " | ".join(f"AUROC {s}" for s in results) + " | positives (" + "/".join(results) + ") |",
              "|---|---|---|" + "---|" * (2 * len(results) + 1)]
    for _, r in table.iterrows():
        c = r["class"]
        aps = " | ".join(_fmt(results[s]["per_class"][c]["ap"]) for s in results)
        aucs = " | ".join(_fmt(results[s]["per_class"][c]["auroc"]) for s in results)
        pos = "/".join(str(results[s]["per_class"][c]["positives"]) for s in results)
        lines.append(f"| {c} | {r['group']} | {r['train_positives']} | {aps} | {aucs} | {pos} |")
    write_text(path, "\n".join(lines) + "\n")


def run(preds: pd.DataFrame, manifest: pd.DataFrame, info: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """Everything the evaluate stage writes; returns the summary metrics per split."""
    e = params["evaluate"]
    classes = list(info["classes"])
    counts, n_train = info["train_counts"], int(info["n_train_images"])
    results, thresholds, groups = evaluate_predictions(
        preds, manifest, classes, counts, n_train, e["splits"], int(e["n_bootstrap"]), e["cluster"],
        float(e["ci"]), int(params.get("seed", 0)),
    )
    metrics_dir, plots_dir = Path(e["metrics_dir"]), Path(e["plots_dir"])
    prevalence = np.asarray(counts, dtype=float) / n_train
    baselines, summaries, figures = {}, {}, {}
    table = per_class_table(results, classes, counts, n_train, groups)
    write_csv(plots_dir / "per_class_ap.csv", table)
    write_csv(plots_dir / "thresholds.csv", pd.DataFrame({"class": classes, "threshold": thresholds}))
    chosen = choose_pr_classes(groups, counts, classes)
    for split in e["splits"]:
        y, s, _ = aligned(preds, manifest, classes, split)
        baselines[split] = prevalence_baseline(y, prevalence)
        summaries[split] = {**summary_metrics(results[split]), "prevalence_baseline_mAP": baselines[split]}
        write_json(metrics_dir / f"{split}.json", summaries[split])
        pr = pr_curve_rows(y, s, classes, chosen)
        rel = reliability_rows(y, s)
        write_csv(plots_dir / f"pr_curves_{split}.csv", pr)
        write_csv(plots_dir / f"reliability_{split}.csv", rel)
        figures[split] = draw_figures(table, pr, rel, split, plots_dir / "figures")
    report_dir = Path(e["report_dir"])
    write_report(report_dir / "evaluation.md", results, baselines, table, figures, info)
    tuned = dict(zip(classes, map(float, thresholds), strict=True))
    write_json(report_dir / "evaluation.json", {"thresholds": tuned, **results})
    # The format `cxrlt score --thresholds` reads.
    write_json(report_dir / "thresholds.json", tuned)
    return summaries
