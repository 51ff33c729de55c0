"""End to end: `dvc repro` of the whole pipeline on a tiny configuration in a temporary git repo."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxrlt.labels import TASK1_CLASSES

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "synth": {"n_patients": 45, "height": 96, "width_range": [80, 112], "workers": 1},
    "cache": {"size": 48, "workers": 1},
    "model": {"backbone": "mobilenetv3_small_050"},
    "train": {"epochs": 1, "batch_size": 16},
    "fuse": {"epochs": 1, "batch_size": 8,
             "model": {"tokens_dim": 32, "ff_dim": 32, "head_args": {"dim": 32, "ff_dim": 32}}},
    "evaluate": {"n_bootstrap": 20},
    # At 45 patients every image carries some finding, so "Normal" has no training positive
    # and the default class-aware sampler refuses, by design, to draw it.
    "sampler": "random",
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) else v
    return out


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repo holding the project's tracked and untracked files, with tiny params."""
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for f in filter(None, files):
        src = ROOT / f
        if (
            src.is_file()
            and not f.startswith(
                ("data/", "models/", "metrics/", "plots/", "reports/", "dvclive/", "submissions/")
            )
            and f != "dvc.lock"
        ):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    _run(["git", "init", "-q"], dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-qm", "tiny"], dest)
    _run(["dvc", "repro"], dest)
    return dest


def test_repro_writes_every_declared_output(repo: Path):
    full = json.loads((repo / "reports" / "evaluation.json").read_text())
    for split in ("dev", "test"):
        m = json.loads((repo / "metrics" / f"{split}.json").read_text())
        assert 0.0 <= m["mAP"] <= 1.0 and m["prevalence_baseline_mAP"] > 0 and m["labelled"]
        assert set(full[split]["per_class"]) == set(TASK1_CLASSES)
        lo, hi = full[split]["ci"]["mAP"]
        assert lo <= hi
    for name in ("per_class_ap.csv", "pr_curves_test.csv", "reliability_test.csv"):
        assert (repo / "plots" / name).stat().st_size > 0
    assert (repo / "plots" / "figures" / "ap_vs_frequency_test.png").exists()
    assert "Per-class results" in (repo / "reports" / "evaluation.md").read_text()
    assert (repo / "dvclive" / "train" / "metrics.json").exists()
    assert (repo / "dvc.lock").exists()


def test_submission_format(repo: Path):
    sub = pd.read_csv(repo / "submissions" / "task1_test.csv")
    truth = pd.read_csv(repo / "data/raw/synth/cxr-lt-2024/test_labeled_task1.csv")
    assert list(sub.columns) == ["dicom_id", "study_id", *TASK1_CLASSES]
    assert sorted(sub["dicom_id"]) == sorted(truth["dicom_id"])
    probs = sub[list(TASK1_CLASSES)].to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and len(set(probs.ravel().round(6))) > 2


def test_pipeline_is_up_to_date_and_metrics_readable(repo: Path):
    status = _run(["dvc", "status"], repo).stdout
    assert "up to date" in status
    shown = _run(["dvc", "metrics", "show"], repo).stdout
    assert "metrics/test.json" in shown and "mAP" in shown


def test_cxrlt_score_agrees_with_the_evaluate_stage(repo: Path):
    labels = repo / "data/raw/synth/cxr-lt-2024/test_labeled_task1.csv"
    out = repo / "score.json"
    _run([str(Path(sys.executable).parent / "cxrlt"), "score", "--labels", str(labels), "--predictions",
          str(repo / "submissions/task1_test.csv"), "--out", str(out), "--bootstrap", "0"], repo)
    scored = json.loads(out.read_text())
    stage = json.loads((repo / "metrics" / "test.json").read_text())
    assert scored["mAP"] == pytest.approx(stage["mAP"], abs=1e-9)
    full = json.loads((repo / "reports" / "evaluation.json").read_text())["test"]
    for c, ap in ((c, v["ap"]) for c, v in full["per_class"].items()):
        assert (scored["per_class"][c]["ap"] is None) == (ap is None)
        if ap is not None:
            assert scored["per_class"][c]["ap"] == pytest.approx(ap, abs=1e-9)


def test_experiment_with_another_loss_is_compared(repo: Path):
    """`dvc exp run -S loss=asl` runs; exp show / metrics diff / plots diff compare the runs."""
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline run"], repo)
    _run(["dvc", "exp", "run", "-S", "loss=asl", "-n", "asl-run"], repo)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = []
    for rev in shown:
        names += [e.get("name") for e in (rev.get("experiments") or [])]
    assert "asl-run" in names
    table = _run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout
    assert "asl-run" in table and "metrics/test.json:mAP" in table
    # readable in a terminal: the metrics files hold summary numbers only, so two runs that
    # differ in one param show a few dozen columns (DVC itself adds about a dozen)
    changed = _run(["dvc", "exp", "show", "--no-pager", "--csv", "--only-changed"], repo).stdout
    header = next(csv.reader(io.StringIO(changed)))
    assert len(header) <= 40, header
    assert any(h.endswith("loss") for h in header) and "metrics/test.json:mAP" in header
    assert not any("ci_" in h or "per_class" in h for h in header), header
    diff = _run(["dvc", "metrics", "diff", "HEAD", "asl-run", "--json"], repo).stdout
    assert "metrics/test.json" in json.loads(diff)
    _run(["dvc", "plots", "diff", "HEAD", "asl-run", "-o", str(repo / "plots_diff")], repo)
    assert (repo / "plots_diff" / "index.html").exists()


def _exp_rows(repo: Path) -> dict[str, dict]:
    """name -> `dvc exp show --json` data of HEAD and its experiments."""
    out = {}
    for row in json.loads(_run(["dvc", "exp", "show", "--json"], repo).stdout):
        if row["rev"] != "workspace":
            out["HEAD"] = row["data"]
            for exp in row.get("experiments") or []:
                out[exp["name"]] = exp["revs"][0]["data"]
    return out


@pytest.mark.slow
def test_seeded_experiments_compared_through_dvc(repo: Path, tmp_path: Path):
    """`-S seed=N` re-trains without touching the data; `cxrlt compare` reads the runs through
    DVC, groups them by params but seed, pairs seed with seed, and agrees with evaluate."""
    _run(["git", "add", "-A"], repo)  # the workspace's run becomes the baseline commit
    if _run(["git", "status", "--porcelain"], repo).stdout.strip():
        _run(["git", "commit", "-qm", "baseline for compare"], repo)
    for loss in ("bce", "asl"):
        for seed in (0, 1):
            out = _run(["dvc", "exp", "run", "-S", f"loss={loss}", "-S", f"seed={seed}",
                        "-n", f"cmp-{loss}-{seed}"], repo).stdout  # fmt: skip
            for stage in ("synth", "prepare", "cache"):
                assert f"Running stage '{stage}'" not in out, out
    rows = _exp_rows(repo)
    names = [f"cmp-{loss}-{seed}" for loss in ("bce", "asl") for seed in (0, 1)]
    data_outs = {(n, p): rows[n]["outs"][p]["hash"] for n in names
                 for p in ("data/manifests/mimic.parquet", "data/cache/mimic")}  # fmt: skip
    assert len(set(data_outs.values())) == 2  # one manifest, one cache for every seed and loss
    preds = {rows[n]["outs"]["data/predictions/stage1.parquet"]["hash"] for n in names}
    assert len(preds) == 4  # the seed changes the model

    cxrlt = str(Path(sys.executable).parent / "cxrlt")
    out_json = tmp_path / "compare.json"
    shown = _run([cxrlt, "compare", *names, "--bootstrap", "200", "--json", str(out_json)], repo)
    result = json.loads(out_json.read_text())
    assert [g["runs"] for g in result["groups"]] == [names[:2], names[2:]]
    assert result["differing_params"] == ["loss"]
    (c,) = result["comparisons"]
    assert [(p["a"], p["b"]) for p in c["pairs"]] == [(names[0], names[2]), (names[1], names[3])]
    for r in result["runs"]:  # recomputed from the predictions = what evaluate wrote
        assert r["metrics"]["mAP"] == pytest.approx(
            rows[r["name"]]["metrics"]["metrics/test.json"]["data"]["mAP"], abs=1e-9
        )
    assert result["n_images"] == rows["HEAD"]["metrics"]["metrics/test.json"]["data"]["n_images"]
    table = shown.stdout
    assert "groups differ in: loss" in table and "mean of 2" in table and "Δ (B−A)" in table

    # no names: HEAD and its experiments; the run equal to HEAD is counted once
    default = _run([cxrlt, "compare", "--bootstrap", "50"], repo).stdout
    assert "(same params and predictions): left out" in default and "mean of 2" in default


def test_outputs_round_trip_through_a_dvc_remote(repo: Path, tmp_path: Path):
    """Push the pipeline's outputs to a (local) DVC remote, pull them into a fresh clone: the
    clone reports everything up to date and holds the same outputs, without re-running."""
    remote = tmp_path / "remote"
    # --local: the remote goes to .dvc/config.local, which git does not track
    _run(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], repo)
    _run(["git", "add", "-A"], repo)
    if _run(["git", "status", "--porcelain"], repo).stdout.strip():
        _run(["git", "commit", "-qm", "outputs to push"], repo)
    _run(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    _run(["dvc", "remote", "add", "--local", "-d", "store", str(remote)], clone)
    _run(["dvc", "pull"], clone)
    assert "up to date" in _run(["dvc", "status"], clone).stdout
    for path in ("models/stage1.pt", "models/fusion.pt", "data/predictions/stage1.parquet",
                 "submissions/task1_test.csv"):  # fmt: skip
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
