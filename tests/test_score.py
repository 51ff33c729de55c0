"""`cxrlt score`: CSV boundary checks, name-based matching, and JSON equal to metrics.evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrlt import metrics, scoring
from cxrlt.cli import COMMANDS, main
from cxrlt.labels import (
    TASK1_TRAIN_COUNTS,
    TASK1_TRAIN_IMAGES,
    TASK2_CLASSES,
    frequency_groups,
    task_classes,
)

META = ["dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning",
        "fpath"]  # fmt: skip
N = 120
META_SCORE = ("task", "labels", "predictions", "groups_from", "clusters", "warnings")


def _make(task="task2", seed=0):
    classes = list(task_classes(task))
    rng = np.random.default_rng(seed)
    study = np.repeat(np.arange(N // 2), 2) + 50_000_000
    ids = [f"{rng.integers(16**8):08x}-{i:04d}" for i in range(N)]
    labels = pd.DataFrame(
        {
            "dicom_id": ids,
            "subject_id": (study // 3).astype(str),
            "study_id": study.astype(str),
            "ViewPosition": np.where(np.arange(N) % 2, "PA", "LATERAL"),
            "ViewCodeSequence_CodeMeaning": "postero-anterior",
            "fpath": [f"files/p10/p1/s{s}/{d}.jpg" for s, d in zip(study, ids, strict=True)],
        }
    )
    y = (rng.random((N, len(classes))) < 0.25).astype(int)
    y[:, 3] = 0  # a class without positives in this test set
    for j, c in enumerate(classes):
        labels[c] = y[:, j]
    p = np.clip(rng.random((N, len(classes))) * 0.7 + 0.3 * y, 0, 1)
    sub = pd.DataFrame({"dicom_id": ids, "study_id": study.astype(str)})
    for j, c in enumerate(classes):
        sub[c] = p[:, j]
    return classes, labels, sub, y.astype(float), p, study


def _write(tmp_path, labels, sub):
    lp, sp = tmp_path / "labels.csv", tmp_path / "sub.csv"
    labels.to_csv(lp, index=False)
    sub.to_csv(sp, index=False)
    return lp, sp


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_equals_evaluate(tmp_path, capsys):
    classes, labels, sub, y, p, study = _make("task2")
    lp, sp = _write(tmp_path, labels, sub.sample(frac=1, random_state=1))  # rows shuffled
    out = tmp_path / "m" / "metrics.json"
    code, stdout, err = _run(capsys, "score", "--labels", str(lp), "--predictions", str(sp),
                             "--task", "task2", "--out", str(out), "--bootstrap", "50")  # fmt: skip
    assert code == 0, err
    result = json.loads(out.read_text())
    groups = frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES, TASK2_CLASSES)
    expected = metrics.evaluate(y, p, classes, groups, ids=study.astype(str), n_bootstrap=50)
    assert {k: v for k, v in result.items() if k not in META_SCORE} == json.loads(
        json.dumps(expected)
    )
    assert result["clusters"] == "study_id" and result["bootstrap"]["n_clusters"] == N // 2
    assert result["undefined_classes"] == [classes[3]]
    assert "mAP" in stdout and classes[0] in stdout and "[" in stdout


def test_task2_groups_from_training_counts():
    groups, source = scoring.training_groups(TASK2_CLASSES)
    counts = {g: sum(v == g for v in groups.values()) for g in ("head", "medium", "tail")}
    assert counts == {"head": 9, "medium": 11, "tail": 6}
    assert source
    assert scoring.training_groups(task_classes("task3")) == (None, None)


def test_train_labels_csv_defines_groups(tmp_path):
    classes = task_classes("task3")
    train = pd.DataFrame({"dicom_id": [str(i) for i in range(1000)]})
    for j, c in enumerate(classes):
        train[c] = (np.arange(1000) < [200, 50, 5, 101, 9][j]).astype(int)
    path = tmp_path / "train.csv"
    train.to_csv(path, index=False)
    groups, source = scoring.training_groups(classes, path)
    assert groups == dict(zip(classes, ["head", "medium", "tail", "head", "tail"], strict=True))
    assert source == str(path)


def test_class_order_permuted_scores_identically(tmp_path, capsys):
    classes, labels, sub, *_ = _make("task1")
    lp, sp = _write(tmp_path, labels, sub)
    base = scoring.score(lp, sp, "task1", n_bootstrap=20)
    perm = list(np.random.default_rng(0).permutation(classes))
    labels2 = labels[META + perm[::-1]]
    sub2 = sub[["study_id", *perm, "dicom_id"]]
    lp2, sp2 = tmp_path / "l2.csv", tmp_path / "s2.csv"
    labels2.to_csv(lp2, index=False)
    sub2.to_csv(sp2, index=False)
    other = scoring.score(lp2, sp2, "task1", n_bootstrap=20)
    drop = ("labels", "predictions")
    assert {k: v for k, v in other.items() if k not in drop} == {
        k: v for k, v in base.items() if k not in drop
    }


def test_nan_labels_are_masked(tmp_path):
    classes, labels, sub, y, p, study = _make("task3")
    labels[classes[0]] = labels[classes[0]].astype(float)
    labels.loc[labels.index[:30], classes[0]] = np.nan
    y[:30, 0] = np.nan
    lp, sp = _write(tmp_path, labels, sub)
    r = scoring.score(lp, sp, "task3", n_bootstrap=0)
    assert r["per_class"][classes[0]]["known"] == N - 30
    assert r["per_class"][classes[0]]["ap"] == pytest.approx(metrics.average_precision(y, p)[0])
    assert "mAP_head" not in r and r["groups_from"] is None


def _expect_error(tmp_path, capsys, labels, sub, *needles, task="task2"):
    lp, sp = _write(tmp_path, labels, sub)
    code, _, err = _run(capsys, "score", "--labels", str(lp), "--predictions", str(sp),
                        "--task", task, "--bootstrap", "0")  # fmt: skip
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_ids(tmp_path, capsys):
    _, labels, sub, *_ = _make()
    dropped = sub["dicom_id"].iloc[:7].tolist()
    _expect_error(tmp_path, capsys, labels, sub.iloc[7:], "sub.csv", "7 of 120", dropped[0])


def test_extra_ids(tmp_path, capsys):
    _, labels, sub, *_ = _make()
    extra = sub.iloc[:2].copy()
    extra["dicom_id"] = ["not-a-real-id-1", "not-a-real-id-2"]
    _expect_error(
        tmp_path, capsys, labels, pd.concat([sub, extra]), "2 dicom_ids", "not-a-real-id-1"
    )


def test_duplicate_ids(tmp_path, capsys):
    _, labels, sub, *_ = _make()
    dup = pd.concat([sub, sub.iloc[[5]]])
    _expect_error(tmp_path, capsys, labels, dup, "sub.csv", "duplicate", sub["dicom_id"].iloc[5])


def test_duplicate_ids_in_labels(tmp_path, capsys):
    _, labels, sub, *_ = _make()
    _expect_error(tmp_path, capsys, pd.concat([labels, labels.iloc[[0]]]), sub, "labels.csv",
                  "duplicate")  # fmt: skip


def test_missing_and_extra_class_columns(tmp_path, capsys):
    classes, labels, sub, *_ = _make()
    bad = sub.drop(columns=[classes[2]]).rename(columns={classes[5]: classes[5].lower()})
    bad["Foo"] = 0.1
    err = _expect_error(tmp_path, capsys, labels, bad, "sub.csv", classes[2], classes[5], "Foo")
    assert "missing class columns" in err and "unexpected columns" in err


def test_task1_classes_in_task2_submission_are_extra(tmp_path, capsys):
    _, labels, sub, *_ = _make()
    sub["Tuberculosis"] = 0.1
    _expect_error(tmp_path, capsys, labels, sub, "Tuberculosis", "unexpected")


def test_missing_label_columns(tmp_path, capsys):
    classes, labels, sub, *_ = _make()
    _expect_error(tmp_path, capsys, labels.drop(columns=[classes[1]]), sub, "labels.csv",
                  classes[1])  # fmt: skip


@pytest.mark.parametrize("value", [1.5, -0.01, np.inf])
def test_out_of_range(tmp_path, capsys, value):
    classes, labels, sub, *_ = _make()
    sub.loc[sub.index[9], classes[4]] = value
    _expect_error(tmp_path, capsys, labels, sub, "outside [0, 1]", classes[4],
                  sub["dicom_id"].iloc[9])  # fmt: skip


def test_nan_probability(tmp_path, capsys):
    classes, labels, sub, *_ = _make()
    sub.loc[sub.index[11], classes[6]] = np.nan
    _expect_error(tmp_path, capsys, labels, sub, "missing probability", classes[6],
                  sub["dicom_id"].iloc[11])  # fmt: skip


def test_non_numeric(tmp_path, capsys):
    classes, labels, sub, *_ = _make()
    sub[classes[0]] = sub[classes[0]].astype(object)
    sub.loc[sub.index[3], classes[0]] = "high"
    _expect_error(tmp_path, capsys, labels, sub, "non-numeric", "'high'", classes[0],
                  sub["dicom_id"].iloc[3])  # fmt: skip


def test_bad_label_values(tmp_path, capsys):
    classes, labels, sub, *_ = _make()
    labels.loc[labels.index[2], classes[1]] = -1
    _expect_error(tmp_path, capsys, labels, sub, "labels.csv", "expected 0, 1 or empty", classes[1])


def test_missing_file_and_dicom_id_column(tmp_path, capsys):
    _, labels, sub, *_ = _make()
    lp, _ = _write(tmp_path, labels, sub)
    code, _, err = _run(capsys, "score", "--labels", str(lp), "--predictions",
                        str(tmp_path / "nope.csv"), "--task", "task2")  # fmt: skip
    assert code == 2 and "nope.csv" in err and "does not exist" in err
    _expect_error(tmp_path, capsys, labels, sub.rename(columns={"dicom_id": "image"}), "dicom_id")


def test_thresholds_file(tmp_path):
    classes, labels, sub, y, p, _ = _make("task3")
    lp, sp = _write(tmp_path, labels, sub)
    tp = tmp_path / "t.json"
    tp.write_text(json.dumps({c: 0.4 for c in classes}))
    r = scoring.score(lp, sp, "task3", thresholds=tp, n_bootstrap=0)
    assert r["mF1@tuned"] == pytest.approx(np.nanmean(metrics.f1_at(y, p, 0.4)))
    tp.write_text(json.dumps({classes[0]: 0.4}))
    with pytest.raises(scoring.DataError, match=classes[1]):
        scoring.score(lp, sp, "task3", thresholds=tp, n_bootstrap=0)


def test_commands_registry():
    assert "score" in COMMANDS
    with pytest.raises(SystemExit):
        main(["--help"])


# --- thresholds must be numbers in [0, 1]; hard 0/1 submissions are scored with a warning ----


@pytest.mark.parametrize(
    ("value", "shown"),
    [("NaN", "NaN"), ("true", "true"), ("1.5", "1.5"), ("-0.1", "-0.1"), ("Infinity", "Infinity"),
     ('"0.5"', '"0.5"'), ("null", "null")],
)  # fmt: skip
def test_thresholds_must_be_finite_numbers_in_unit_interval(tmp_path, capsys, value, shown):
    classes, labels, sub, *_ = _make("task3")
    lp, sp = _write(tmp_path, labels, sub)
    tp = tmp_path / "thresholds.json"
    body = ", ".join(f'"{c}": {value if i == 2 else "0.4"}' for i, c in enumerate(classes))
    tp.write_text("{" + body + "}")
    code, _, err = _run(capsys, "score", "--labels", str(lp), "--predictions", str(sp),
                        "--task", "task3", "--thresholds", str(tp), "--bootstrap", "0")  # fmt: skip
    assert code == 2 and err.count("\n") == 1, err
    assert "thresholds.json" in err and repr(classes[2]) in err and f" {shown};" in err


def test_threshold_bounds_are_allowed(tmp_path):
    classes, labels, sub, y, p, _ = _make("task3")
    lp, sp = _write(tmp_path, labels, sub)
    tp = tmp_path / "t.json"
    tp.write_text(json.dumps(dict(zip(classes, [0, 1, 0.0, 1.0, 0.5], strict=True))))
    r = scoring.score(lp, sp, "task3", thresholds=tp, n_bootstrap=0)
    expected = metrics.f1_at(y, p, np.array([0, 1, 0, 1, 0.5]))
    assert r["mF1@tuned"] == pytest.approx(np.nanmean(expected))


def test_hard_labels_score_with_one_warning(tmp_path, capsys):
    classes, labels, sub, y, *_ = _make("task2")
    hard = sub.copy()
    hard[classes] = (sub[classes].to_numpy() >= 0.5).astype(int)
    lp, sp = _write(tmp_path, labels, hard)
    out = tmp_path / "m.json"
    code, stdout, err = _run(capsys, "score", "--labels", str(lp), "--predictions", str(sp),
                             "--task", "task2", "--out", str(out), "--bootstrap", "0")  # fmt: skip
    assert code == 0, err
    warning = [line for line in err.splitlines() if "0 or 1" in line]
    assert len(warning) == 1 and "sub.csv" in warning[0] and "probabilities" in warning[0]
    result = json.loads(out.read_text())
    assert len(result["warnings"]) == 1 and "probabilities" in result["warnings"][0]
    assert result["mAP"] is not None and "mAP" in stdout  # still scored
    # real probabilities: no warning
    lp, sp = _write(tmp_path, labels, sub)
    code, _, err = _run(capsys, "score", "--labels", str(lp), "--predictions", str(sp),
                        "--task", "task2", "--out", str(out), "--bootstrap", "0")  # fmt: skip
    assert code == 0 and "0 or 1" not in err
    assert json.loads(out.read_text())["warnings"] == []


# --- the bootstrap interval: named in JSON and table, selectable, caveats printed ------------


def test_interval_method_named_selectable_and_caveats_printed(tmp_path, capsys):
    _, labels, sub, *_ = _make("task2")
    lp, sp = _write(tmp_path, labels, sub)
    out = tmp_path / "m.json"
    args = ["score", "--labels", str(lp), "--predictions", str(sp), "--task", "task2",
            "--bootstrap", "50", "--out", str(out)]  # fmt: skip
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["bootstrap"]["method"] == "BCa"
    assert "95% BCa CI from 50 bootstrap replicates" in stdout and "percentile" not in stdout
    # 120 images: few positives per class, so the study's coverage caveats apply and are shown
    assert result["ci_caveats"] and set(result["ci_caveats"]) <= set(result["ci"])
    for text in result["ci_caveats"].values():
        assert f"caveat: {text}" in stdout
    code, stdout, err = _run(capsys, *args, "--ci-method", "percentile")
    assert code == 0, err
    assert json.loads(out.read_text())["bootstrap"]["method"] == "percentile"
    assert "95% percentile CI" in stdout
    with pytest.raises(SystemExit):
        main([*args, "--ci-method", "shifted"])
    assert "invalid choice: 'shifted'" in capsys.readouterr().err
