"""The evaluate stage (`cxrlt.evaluation.run`) and the submission that must score the same.

One small synthetic manifest (Task 2 classes, train/val/dev/test, some unknown labels) and a
predictions frame built by `predictions_frame`; the stage writes into tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrlt import evaluation, metrics, scoring
from cxrlt.errors import DataError
from cxrlt.labels import TASK2_CLASSES, frequency_groups
from cxrlt.submission import predictions_frame, write_submission

ROOT = Path(__file__).resolve().parents[1]
CLASSES = list(TASK2_CLASSES)
EMPTY = "Pneumomediastinum"  # no positive in the test split (a few unknowns, the rest 0)
SIZES = {"train": 200, "val": 120, "dev": 80, "test": 88}  # multiples of 4: studies, patients
N_BOOT = 20
SPLITS = ("dev", "test")
LABEL_META = ["dicom_id", "subject_id", "study_id", "ViewPosition",
              "ViewCodeSequence_CodeMeaning", "fpath"]  # fmt: skip
# float32 probabilities that print alike with 6 significant digits ("1"): a submission
# must keep them apart, or the top of class 0's test ranking becomes a tie
TOP_POS, TOP_NEG = np.float32(0.99999994), np.float32(0.9999997)


def make_manifest(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    split = np.repeat(list(SIZES), list(SIZES.values()))
    n, n_cls = len(split), len(CLASSES)
    study = 50_000_000 + np.arange(n) // 2  # two views per study, studies never cross splits
    df = pd.DataFrame({
        "image_id": [f"{rng.integers(16**8):08x}-{i:04d}" for i in range(n)],
        "study_id": study.astype(str),
        "patient_id": (10_000_000 + np.arange(n) // 4).astype(str),
        "source": "synth", "split": split,
        "view": np.where(np.arange(n) % 2, "frontal", "lateral"),
        "view_position": np.where(np.arange(n) % 2, "PA", "LATERAL"),
        "path": [f"files/p1/s{s}/{i}.jpg" for i, s in enumerate(study)],
    })  # fmt: skip
    y = np.zeros((n, n_cls))
    train = np.flatnonzero(split == "train")
    # training positives: head (> 10 %), medium (1-10 %), tail (< 1 %) of 200 images
    for j in range(n_cls):
        y[rng.choice(train, (60, 12, 1)[j % 3], replace=False), j] = 1
    other = split != "train"
    prevalence = rng.uniform(0.1, 0.4, n_cls)
    y[other] = rng.random((other.sum(), n_cls)) < prevalence
    unknown = (rng.random((n, n_cls)) < 0.06) & (other[:, None] | (y == 0))
    y[unknown] = np.nan
    test = np.flatnonzero(split == "test")
    e = CLASSES.index(EMPTY)
    y[test, e] = np.where(np.isnan(y[test, e]), np.nan, 0.0)
    y[test[:2], 0] = [1.0, 0.0]  # TOP_POS / TOP_NEG rows of class 0
    for j, c in enumerate(CLASSES):
        df[c] = y[:, j]
    return df


def make_preds(manifest: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = manifest[manifest["split"].isin(["val", "dev", "test"])].reset_index(drop=True)
    y = rows[CLASSES].to_numpy(dtype=float)
    logit = 1.5 * np.where(np.isnan(y), 0.0, 2 * y - 1) + rng.normal(0, 1.2, y.shape)
    probs = (1 / (1 + np.exp(-logit))).astype(np.float32)
    test = np.flatnonzero(rows["split"] == "test")
    probs[test[:2], 0] = [TOP_POS, TOP_NEG]
    probs[test[2:], 0] = np.minimum(probs[test[2:], 0], 0.99)
    return predictions_frame(rows, CLASSES, probs, image_probs=probs)


def make_info(manifest: pd.DataFrame) -> dict:
    train = manifest[manifest["split"] == "train"]
    return {
        "classes": CLASSES,
        "train_counts": np.nansum(train[CLASSES].to_numpy(dtype=float), axis=0).tolist(),
        "n_train_images": len(train),
        "model": {"backbone": "tiny_net", "head": "linear"},
        "loss": "bce", "seed": 0, "val_mAP": 0.5,
    }  # fmt: skip


def make_params(out: Path) -> dict:
    with open(ROOT / "params.yaml") as f:
        e = dict(yaml.safe_load(f)["evaluate"])
    e.update(n_bootstrap=N_BOOT, metrics_dir=str(out / "metrics"), plots_dir=str(out / "plots"),
             report_dir=str(out / "reports"))  # fmt: skip
    assert tuple(e["splits"]) == SPLITS and e["cluster"] == "study_id"
    return {"seed": 0, "evaluate": e}


def run_stage(out: Path, manifest: pd.DataFrame, preds: pd.DataFrame) -> dict:
    return evaluation.run(preds, manifest, make_info(manifest), make_params(out))


def read_metrics(out: Path, split: str) -> dict:
    return json.loads((out / "metrics" / f"{split}.json").read_text())


def read_full(out: Path, split: str) -> dict:
    """The split's entry of reports/evaluation.json (intervals, per-class values)."""
    return json.loads((out / "reports" / "evaluation.json").read_text())[split]


def per_class_ap(out: Path, split: str) -> dict:
    return {c: v["ap"] for c, v in read_full(out, split)["per_class"].items()}


def assert_same_intervals(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and expected
    for key, interval in expected.items():
        assert (got[key] is None) == (interval is None), key
        if interval is not None:
            assert got[key] == pytest.approx(interval), key


def joined(manifest: pd.DataFrame, preds: pd.DataFrame, split: str):
    """Labels and scores of one split, joined by image_id independently of the module."""
    p = preds[preds["split"] == split]
    lab = manifest.set_index("image_id").loc[p["image_id"].to_numpy()]
    scores = p[[f"p:{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    return lab[CLASSES].to_numpy(dtype=float), scores, p["study_id"].to_numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    manifest = make_manifest()
    preds = make_preds(manifest)
    out = tmp_path_factory.mktemp("evaluate")
    summaries = run_stage(out, manifest, preds)
    return manifest, preds, out, summaries


@pytest.fixture
def no_figures(monkeypatch):
    """Extra runs that only compare numbers skip the (slow-ish) matplotlib figures."""
    monkeypatch.setattr(evaluation, "draw_figures", lambda *a, **k: {})


def _approx(d: dict) -> dict:
    return {k: (pytest.approx(v, rel=1e-12, abs=1e-12) if isinstance(v, float) else v)
            for k, v in d.items()}  # fmt: skip


def test_setup_has_all_groups_and_unknowns(base):
    manifest, preds, *_ = base
    info = make_info(manifest)
    groups = frequency_groups(info["train_counts"], info["n_train_images"], CLASSES)
    assert set(groups.values()) == {"head", "medium", "tail"}
    assert manifest[CLASSES].isna().any().any()
    assert preds["image_id"].is_unique and len(preds) == sum(SIZES.values()) - SIZES["train"]


def test_metrics_equal_evaluate_and_sklearn(base):
    manifest, preds, out, summaries = base
    info = make_info(manifest)
    groups = frequency_groups(info["train_counts"], info["n_train_images"], CLASSES)
    y_val, s_val, _ = joined(manifest, preds, "val")
    thresholds = metrics.tune_thresholds(y_val, s_val)
    report = json.loads((out / "reports" / "evaluation.json").read_text())
    assert report["thresholds"] == pytest.approx(dict(zip(CLASSES, thresholds, strict=True)))
    for split in SPLITS:
        got = read_metrics(out, split)
        assert got == summaries[split]
        full = read_full(out, split)
        y, s, study = joined(manifest, preds, split)
        exp = metrics.evaluate(y, s, CLASSES, groups, thresholds=thresholds, ids=study,
                               n_bootstrap=N_BOOT, seed=0, ci=0.95)  # fmt: skip
        for key in ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC", "mF1@0.5",
                    "mF1@tuned", "mECE"):  # fmt: skip
            assert got[key] == pytest.approx(exp[key], rel=1e-12), (split, key)
        assert_same_intervals(full["ci"], exp["ci"])
        assert got["n_images"] == SIZES[split] and got["labelled"] is True
        assert per_class_ap(out, split) == {c: v["ap"] for c, v in exp["per_class"].items()}
        # sklearn on the known rows of each class with positives
        aps, aucs = [], []
        for j, c in enumerate(CLASSES):
            known = ~np.isnan(y[:, j])
            if (y[known, j] == 1).sum() == 0:
                continue
            aps.append(average_precision_score(y[known, j], s[known, j]))
            aucs.append(roc_auc_score(y[known, j], s[known, j]))
            assert per_class_ap(out, split)[c] == pytest.approx(aps[-1], rel=1e-12), (split, c)
        assert got["mAP"] == pytest.approx(np.mean(aps), rel=1e-12)
        assert got["mAUROC"] == pytest.approx(np.mean(aucs), rel=1e-12)
        assert full["ci"]["mAP"][0] <= got["mAP"] <= full["ci"]["mAP"][1]
        assert report[split]["bootstrap"]["n_clusters"] == SIZES[split] // 2  # studies


def test_thresholds_depend_on_val_rows_only(base, tmp_path, no_figures):
    manifest, preds, out, _ = base
    thresholds = (out / "plots" / "thresholds.csv").read_bytes()
    changed_test = manifest.copy()
    is_test = changed_test["split"] == "test"
    changed_test.loc[is_test, CLASSES] = 1.0 - changed_test.loc[is_test, CLASSES]
    changed_test.loc[is_test, EMPTY] = 1.0  # keep the test split fully defined here
    run_stage(tmp_path / "a", changed_test, preds)
    assert (tmp_path / "a" / "plots" / "thresholds.csv").read_bytes() == thresholds
    assert read_metrics(tmp_path / "a", "test")["mAP"] != read_metrics(out, "test")["mAP"]
    assert read_metrics(tmp_path / "a", "dev") == read_metrics(out, "dev")

    changed_val = manifest.copy()
    is_val = changed_val["split"] == "val"
    changed_val.loc[is_val, CLASSES] = 1.0 - changed_val.loc[is_val, CLASSES]
    run_stage(tmp_path / "b", changed_val, preds)
    assert (tmp_path / "b" / "plots" / "thresholds.csv").read_bytes() != thresholds
    b = read_metrics(tmp_path / "b", "test")
    assert b["mF1@tuned"] != read_metrics(out, "test")["mF1@tuned"]
    assert b["mAP"] == read_metrics(out, "test")["mAP"]  # threshold-free metrics unchanged


def test_class_without_positives_is_undefined(base):
    _, _, out, _ = base
    test, dev = read_metrics(out, "test"), per_class_ap(out, "dev")
    assert per_class_ap(out, "test")[EMPTY] is None
    assert dev[EMPTY] is not None
    assert read_full(out, "dev")["undefined_classes"] == []
    defined = [v for v in per_class_ap(out, "test").values() if v is not None]
    assert len(defined) == len(CLASSES) - 1
    assert test["mAP"] == pytest.approx(np.mean(defined), rel=1e-12)
    report = (out / "reports" / "evaluation.md").read_text()
    line = next(s for s in report.splitlines() if s.startswith("**test**"))
    assert "undefined" in line and EMPTY in line
    assert not any(s.startswith("**dev**") for s in report.splitlines())
    row = next(s for s in report.splitlines() if s.startswith(f"| {EMPTY} |"))
    assert "undefined" in row
    full = json.loads((out / "reports" / "evaluation.json").read_text())
    assert full["test"]["undefined_classes"] == [EMPTY]
    assert full["test"]["per_class"][EMPTY]["ap"] is None
    table = pd.read_csv(out / "plots" / "per_class_ap.csv")
    assert np.isnan(table.set_index("class").loc[EMPTY, "ap_test"])  # never 0 in plot data


def test_prevalence_baseline_is_mean_positive_rate(base):
    manifest, preds, out, _ = base
    for split in SPLITS:
        y, _, _ = joined(manifest, preds, split)
        known = ~np.isnan(y)
        pos = (y == 1).sum(axis=0)
        rate = pos / known.sum(axis=0)
        expected = rate[pos > 0].mean()
        got = read_metrics(out, split)["prevalence_baseline_mAP"]
        assert got == pytest.approx(expected, rel=1e-12)
        assert got < read_metrics(out, split)["mAP"]
    # no class defined: null (JSON has no NaN), not a crash in write_json
    assert evaluation.prevalence_baseline(np.zeros((4, 2)), np.array([0.1, 0.2])) is None


def test_rows_joined_by_image_id(base, tmp_path, no_figures):
    manifest, preds, out, _ = base
    shuffled = preds.sample(frac=1, random_state=7)  # index kept: a positional join would break
    run_stage(tmp_path / "a", manifest, shuffled)
    reset = preds.sample(frac=1, random_state=8).reset_index(drop=True)
    run_stage(tmp_path / "b", manifest.sample(frac=1, random_state=9), reset)
    for split in SPLITS:
        ref = read_metrics(out, split)
        for d in ("a", "b"):
            got = read_metrics(tmp_path / d, split)
            assert got.keys() == ref.keys()
            assert _approx(got) == ref
            assert _approx(per_class_ap(tmp_path / d, split)) == per_class_ap(out, split)
    assert (tmp_path / "a" / "plots" / "thresholds.csv").read_bytes() == (
        out / "plots" / "thresholds.csv"
    ).read_bytes()


def test_plot_data_figures_and_report_exist(base):
    manifest, _, out, _ = base
    plots = out / "plots"
    table = pd.read_csv(plots / "per_class_ap.csv")
    assert list(table["class"]) == CLASSES
    assert {"group", "train_positives", "train_frequency", "ap_dev", "ap_test"} <= set(table)
    assert set(table["group"]) == {"head", "medium", "tail"}
    thr = pd.read_csv(plots / "thresholds.csv")
    assert list(thr["class"]) == CLASSES and thr["threshold"].between(0, 1).all()
    for split in SPLITS:
        pr = pd.read_csv(plots / f"pr_curves_{split}.csv")
        assert list(pr.columns) == ["class", "recall", "precision"]
        groups = table.set_index("class").loc[pr["class"].unique(), "group"]
        assert set(groups) == {"head", "medium", "tail"}
        rel = pd.read_csv(plots / f"reliability_{split}.csv")
        n_known = manifest.loc[manifest["split"] == split, CLASSES].notna().to_numpy().sum()
        assert rel["count"].sum() == n_known
        assert rel["mean_predicted"].between(0, 1).all()
    figures = sorted(p.name for p in (plots / "figures").glob("*.png"))
    assert figures == sorted(f"{k}_{s}.png" for k in ("ap_vs_frequency", "ap_by_group",
                                                      "pr_reliability") for s in SPLITS)  # fmt: skip
    for name in figures:
        assert (plots / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_md = out / "reports" / "evaluation.md"
    text = report_md.read_text()
    links = [s[s.index("](") + 2 : -1] for s in text.splitlines() if s.startswith("![")]
    assert len(links) == len(figures)
    assert all((report_md.parent / link).resolve().is_file() for link in links)
    assert "prevalence baseline" in text and "tiny_net" in text and "95% cluster-bootstrap" in text


def _labels_csv(rows: pd.DataFrame, path: Path) -> Path:
    """The official CXR-LT 2024 layout: metadata columns, then 1 / 0 / empty per class."""
    out = pd.DataFrame({
        "dicom_id": rows["image_id"].to_numpy(), "subject_id": rows["patient_id"].to_numpy(),
        "study_id": rows["study_id"].to_numpy(), "ViewPosition": rows["view_position"].to_numpy(),
        "ViewCodeSequence_CodeMeaning": "postero-anterior", "fpath": rows["path"].to_numpy(),
    })  # fmt: skip
    out[CLASSES] = rows[CLASSES].to_numpy(dtype=float)
    out.to_csv(path, index=False, float_format="%.0f")  # 1, 0 or empty
    return path


def test_submission_scores_like_evaluate(base, tmp_path):
    manifest, preds, out, _ = base
    test_preds = preds[preds["split"] == "test"]
    # p: columns in another order: the submission must still follow the task's class order
    shuffled_cols = test_preds[[*test_preds.columns[:5], *test_preds.columns[5:][::-1]]]
    sub_path = tmp_path / "task2_test.csv"
    sub = write_submission(sub_path, shuffled_cols, CLASSES)
    written = pd.read_csv(sub_path, dtype={"dicom_id": str, "study_id": str})
    assert list(written.columns) == ["dicom_id", "study_id", *CLASSES]
    assert (
        list(written["dicom_id"]) == list(test_preds["image_id"]) and written["dicom_id"].is_unique
    )
    assert list(written["study_id"]) == list(test_preds["study_id"])
    probs = written[CLASSES].to_numpy()
    assert written[CLASSES].nunique().min() > 2 and ((probs >= 0) & (probs <= 1)).all()  # not 0/1
    # exact round trip of the float32 probabilities (no ties made by rounding)
    np.testing.assert_array_equal(probs, test_preds[[f"p:{c}" for c in CLASSES]].to_numpy(float))
    assert len(sub) == len(test_preds)

    labels = _labels_csv(manifest[manifest["split"] == "test"], tmp_path / "test_labels.csv")
    train = _labels_csv(manifest[manifest["split"] == "train"], tmp_path / "train_labels.csv")
    thresholds = tmp_path / "thresholds.json"
    full = json.loads((out / "reports" / "evaluation.json").read_text())
    thresholds.write_text(json.dumps(full["thresholds"]))
    scored = scoring.score(labels, sub_path, task="task2", train_labels=train,
                           thresholds=thresholds, n_bootstrap=N_BOOT, seed=0)  # fmt: skip
    summary, stage_ap = read_metrics(out, "test"), per_class_ap(out, "test")
    for key in ("mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC", "mF1@0.5", "mF1@tuned",
                "mECE"):  # fmt: skip
        assert scored[key] == pytest.approx(summary[key], rel=1e-12), key
    assert {c: v["ap"] for c, v in scored["per_class"].items()} == _approx(stage_ap)
    assert scored["undefined_classes"] == [EMPTY]
    # same seed, same studies: same replicates
    assert_same_intervals(scored["ci"], read_full(out, "test")["ci"])
    assert scored["per_class"][CLASSES[0]]["ap"] == stage_ap[CLASSES[0]]


def test_write_submission_rejects_duplicate_ids(tmp_path):
    manifest = make_manifest()
    preds = make_preds(manifest)
    test = preds[preds["split"] == "test"]
    with pytest.raises(ValueError, match="duplicate"):
        write_submission(tmp_path / "s.csv", pd.concat([test, test.iloc[:1]]), CLASSES)
    assert not (tmp_path / "s.csv").exists()


def test_predictions_frame_checks_shape():
    manifest = make_manifest()
    rows = manifest[manifest["split"] == "test"]
    with pytest.raises(ValueError, match="do not match"):
        predictions_frame(rows, CLASSES, np.zeros((len(rows), len(CLASSES) - 1), np.float32))


# --- metrics files DVC tabulates: the summary numbers only ---------------------------------

SUMMARY_FILE_KEYS = {"mAP", "mAP_head", "mAP_medium", "mAP_tail", "mAUROC", "mF1@0.5", "mF1@tuned",
                     "mECE", "mECE_uncalibrated", "prevalence_baseline_mAP", "n_images", "labelled"}  # fmt: skip


def test_summary_metrics_keys_are_the_summary_numbers():
    manifest = make_manifest()
    y, s, study = joined(manifest, make_preds(manifest), "test")
    groups = frequency_groups(make_info(manifest)["train_counts"], SIZES["train"], CLASSES)
    result = metrics.evaluate(y, s, CLASSES, groups, thresholds=np.full(len(CLASSES), 0.5),
                              ids=study, n_bootstrap=5)  # fmt: skip
    summary = evaluation.summary_metrics(result, 0.1)
    assert set(summary) == SUMMARY_FILE_KEYS
    assert set(evaluation.unlabelled_summary(7)) == SUMMARY_FILE_KEYS
    # scalars only: no intervals, no per-class mapping for `dvc exp show` to spread over columns
    assert all(v is None or isinstance(v, bool | int | float) for v in summary.values())
    assert summary["prevalence_baseline_mAP"] == 0.1 and summary["n_images"] == SIZES["test"]


def test_metrics_files_hold_only_summary_numbers(base):
    _, _, out, _ = base
    for split in SPLITS:
        assert set(read_metrics(out, split)) == SUMMARY_FILE_KEYS
        assert read_full(out, split)["ci"]["mAP"] is not None  # the intervals moved here
    table = pd.read_csv(out / "plots" / "per_class_ap.csv")  # the per-class values here
    assert {f"{k}_{s}" for k in ("ap", "auroc", "prevalence", "lift") for s in SPLITS} <= set(table)


# --- unlabelled splits and undefined figures ------------------------------------------------


def test_unlabelled_split_is_reported_not_scored(tmp_path):
    """A test file without labels (released before its labels): predictions, no metrics."""
    manifest = make_manifest()
    preds = make_preds(manifest)
    manifest.loc[manifest["split"] == "test", CLASSES] = np.nan
    summaries = run_stage(tmp_path, manifest, preds)
    test = read_metrics(tmp_path, "test")
    assert test == summaries["test"]
    assert test["labelled"] is False and test["n_images"] == SIZES["test"]
    assert all(test[k] is None for k in SUMMARY_FILE_KEYS - {"labelled", "n_images"})
    assert read_metrics(tmp_path, "dev")["labelled"] is True
    assert read_metrics(tmp_path, "dev")["mAP"] is not None
    full = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    assert full["test"] == {"labelled": False, "n_images": SIZES["test"]}
    figures = sorted(p.name for p in (tmp_path / "plots" / "figures").glob("*.png"))
    assert figures == ["ap_by_group_dev.png", "ap_vs_frequency_dev.png", "pr_reliability_dev.png"]
    for name in ("pr_curves_test.csv", "reliability_test.csv"):  # header only, for dvc plots
        assert len(pd.read_csv(tmp_path / "plots" / name)) == 0
    assert pd.read_csv(tmp_path / "plots" / "per_class_ap.csv")["ap_test"].isna().all()
    report = (tmp_path / "reports" / "evaluation.md").read_text()
    assert f"**test** ({SIZES['test']} images)" in report
    unlabelled = next(s for s in report.splitlines() if s.startswith("Unlabelled"))
    assert "test" in unlabelled and "dev" not in unlabelled
    assert "| metric | dev |" in report and "test AP" not in report


def test_split_without_positives_skips_its_ap_figures(tmp_path):
    """Labels known but no positive anywhere: every AP undefined; no figure of AP, no crash."""
    manifest = make_manifest()
    preds = make_preds(manifest)
    dev = manifest["split"] == "dev"
    known = manifest.loc[dev, CLASSES].notna()
    manifest.loc[dev, CLASSES] = manifest.loc[dev, CLASSES].where(~known, 0.0)
    run_stage(tmp_path, manifest, preds)
    dev_metrics = read_metrics(tmp_path, "dev")
    assert dev_metrics["labelled"] is True and dev_metrics["mAP"] is None
    assert dev_metrics["mECE"] is None  # undefined classes leave every mean
    figures = {p.name for p in (tmp_path / "plots" / "figures").glob("*_dev.png")}
    assert figures == {"pr_reliability_dev.png"}  # the reliability curve is still defined


def test_draw_figures_skips_what_is_all_undefined():
    table = pd.DataFrame({"class": ["a", "b"], "group": ["head", "tail"],
                          "train_positives": [5, 0], "ap_test": [np.nan, 0.4]})  # fmt: skip
    empty_pr = pd.DataFrame(columns=["class", "recall", "precision"])
    empty_rel = evaluation.reliability_rows(np.full((3, 2), np.nan), np.zeros((3, 2)))
    # b's AP is defined, but a log axis cannot show 0 training positives
    assert set(evaluation.draw_figures(table, empty_pr, empty_rel, "test")) == {"ap_by_group"}
    table["ap_test"] = np.nan
    assert evaluation.draw_figures(table, empty_pr, empty_rel, "test") == {}


def test_a_failure_leaves_nothing_written(tmp_path, monkeypatch):
    """Everything is computed (figures too) before the first file is written."""
    manifest = make_manifest()

    def fail(table, pr, rel, split, *_):
        if split == "test":
            raise RuntimeError("figure failed")
        return {}

    monkeypatch.setattr(evaluation, "draw_figures", fail)
    with pytest.raises(RuntimeError, match="figure failed"):
        run_stage(tmp_path / "out", manifest, make_preds(manifest))
    assert not (tmp_path / "out").exists()


# --- report: which classes are learned ------------------------------------------------------


def test_report_per_class_prevalence_lift_and_group_baselines(base):
    _, _, out, _ = base
    text = (out / "reports" / "evaluation.md").read_text()
    lines = text.splitlines()
    header = next(s for s in lines if s.startswith("| class |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:3] == ["class", "group", "train positives"]
    assert cells[3:7] == ["dev prevalence", "dev AP", "dev lift", "dev AUROC"]
    assert cells[7:11] == ["test prevalence", "test AP", "test lift", "test AUROC"]
    table = pd.read_csv(out / "plots" / "per_class_ap.csv").set_index("class")
    c = CLASSES[1]
    m = read_full(out, "test")["per_class"][c]
    line = next(s for s in lines if s.startswith(f"| {c} |"))
    row = [x.strip() for x in line.strip("|").split("|")]
    assert row[1] == table.loc[c, "group"] and int(row[2]) == table.loc[c, "train_positives"]
    prevalence = m["positives"] / m["known"]
    assert row[7] == f"{prevalence:.4f} ({m['positives']}/{m['known']})"
    assert row[8] == f"{m['ap']:.4f}" and row[10] == f"{m['auroc']:.4f}"
    assert row[9] == f"{m['ap'] / prevalence:.1f}×"
    assert table.loc[c, "lift_test"] == pytest.approx(m["ap"] / prevalence)
    # one line per group: mAP vs its prevalence baseline, with the lift
    full = read_full(out, "test")
    for g in ("head", "medium", "tail"):
        line = next(s for s in lines if s.startswith(f"| {g} |"))
        mAP, base_mAP = full[f"mAP_{g}"], full["prevalence_baseline"][f"mAP_{g}"]
        assert f"{mAP:.3f} vs {base_mAP:.3f} ({mAP / base_mAP:.1f}×)" in line
    baseline = read_metrics(out, "test")["prevalence_baseline_mAP"]
    assert full["prevalence_baseline"]["mAP"] == baseline
    # the bootstrap method is named as the result records it
    assert full["bootstrap"]["method"] in text


def test_report_prints_interval_caveats_next_to_the_interval(base):
    manifest, _, out, _ = base
    full = json.loads((out / "reports" / "evaluation.json").read_text())
    results = {s: dict(full[s]) for s in SPLITS}
    results["test"]["ci_caveats"] = {"mAP_tail": "covers less than nominal here"}
    summaries = {s: read_metrics(out, s) for s in SPLITS}
    baselines = {s: full[s]["prevalence_baseline"] for s in SPLITS}
    table = pd.read_csv(out / "plots" / "per_class_ap.csv")
    text = evaluation.render_report(results, summaries, baselines, table, {}, make_info(manifest),
                                    "study_id")  # fmt: skip
    row = next(s for s in text.splitlines() if s.startswith("| mAP_tail |"))
    lo, hi = full["test"]["ci"]["mAP_tail"]
    assert f"[{lo:.3f}, {hi:.3f}] (covers less than nominal here)" in row
    assert row.count("covers less") == 1  # dev has no caveat


def test_levels_side_by_side_with_the_fused_row(tmp_path, no_figures):
    """Every aggregation level is recomputed from the image: columns; the fused: columns add a
    row; with predict.level fused the submitted mECE before calibration is the fused one."""
    manifest = make_manifest()
    preds = make_preds(manifest)
    rows = preds[["study_id"]].copy()
    image = preds[[f"image:{c}" for c in CLASSES]].to_numpy()
    fused = pd.DataFrame(image).groupby(rows["study_id"].to_numpy()).transform("mean").to_numpy() ** 0.5
    for j, c in enumerate(CLASSES):
        preds[f"fused:{c}"] = fused[:, j]
        preds[f"p:{c}"] = fused[:, j]
    params = {**make_params(tmp_path), "predict": {"level": "fused"}}
    summaries = evaluation.run(preds, manifest, make_info(manifest), params)
    full = json.loads((tmp_path / "reports" / "evaluation.json").read_text())
    for split in ("dev", "test"):
        levels = full[split]["levels"]
        assert list(levels) == ["image", "mean", "max", "view_group", "fused"]
        y, _, split_rows = evaluation.aligned(preds, manifest, CLASSES, split)
        ap = metrics.average_precision(y, split_rows[[f"fused:{c}" for c in CLASSES]].to_numpy())
        assert levels["fused"]["mAP"] == pytest.approx(np.nanmean(ap[(y == 1).any(axis=0)]))
        d = levels["fused"]["delta_vs_image"]["mAP"]
        assert d["delta"] == pytest.approx(levels["fused"]["mAP"] - levels["image"]["mAP"])
        assert summaries[split]["mECE_uncalibrated"] == levels["fused"]["mECE"] == summaries[split]["mECE"]
    assert "| test | fused |" in (tmp_path / "reports" / "evaluation.md").read_text()
    with pytest.raises(DataError, match="no fused: columns"):
        evaluation.run(preds.drop(columns=[f"fused:{c}" for c in CLASSES]), manifest, make_info(manifest), params)


def test_report_header_names_the_training_recipe_the_checkpoint_records():
    assert evaluation._recipe({"loss": "bce"}) == ""  # a checkpoint from before samplers were recorded
    assert evaluation._recipe({"sampler": "random", "drw_epoch": None, "ema_decay": None}) == ", sampler `random`"
    got = evaluation._recipe({"sampler": "class_aware", "drw_epoch": 4, "ema_decay": 0.999, "crt": {"epochs": 10}})
    assert got == (", sampler `class_aware`, deferred re-weighting (`drw_epoch` 4), EMA weights (decay 0.999), "
                   "classifier re-trained (cRT)")  # fmt: skip
