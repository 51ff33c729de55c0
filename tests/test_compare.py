"""`cxrlt compare`: the paired study bootstrap, run alignment and grouping (no DVC here; the
DVC-level test lives in test_pipeline_e2e.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from cxrlt import metrics as M
from cxrlt.compare import (
    Run,
    _git_commit,
    _without_params,
    align,
    at_levels,
    compare_aligned,
    format_table,
    group_runs,
    paired_bootstrap,
    paired_difference,
    parse_exp_show,
    select_runs,
)
from cxrlt.errors import DataError

CLASSES = ["a", "b", "c", "d", "e", "f"]
GROUPS = {"a": "head", "b": "head", "c": "medium", "d": "medium", "e": "tail", "f": "tail"}
PREVALENCE = np.array([0.4, 0.3, 0.08, 0.05, 0.03, 0.02])


def _data(n_studies: int = 150, per_study: int = 2, seed: int = 0):
    """Labels with unknowns, study ids, and a moderately informative score matrix."""
    rng = np.random.default_rng(seed)
    n = n_studies * per_study
    y = (rng.random((n, len(CLASSES))) < PREVALENCE).astype(float)
    y[:, 5][:3] = 1.0  # a few positives of the rarest class for sure
    y[rng.random(y.shape) < 0.05] = np.nan
    ids = np.repeat(np.arange(n_studies), per_study)
    s = np.clip(0.3 * np.nan_to_num(y) + 0.7 * rng.random(y.shape), 0, 1)
    return y, s, ids


def _interval_width(reps: np.ndarray) -> float:
    lo, hi = np.percentile(reps[~np.isnan(reps)], [2.5, 97.5])
    return float(hi - lo)


def test_identical_scores_differ_by_exactly_zero_in_every_replicate():
    y, s, ids = _data()
    pb = paired_bootstrap(y, [s, s.copy()], CLASSES, GROUPS, ids, n_bootstrap=200, seed=3)
    assert pb.keys == ("mAP", "mAP_head", "mAP_medium", "mAP_tail")
    diff = pb.replicates[1] - pb.replicates[0]
    assert np.array_equal(diff[~np.isnan(diff)], np.zeros((~np.isnan(diff)).sum()))
    assert not np.isnan(diff[:, 0]).any()  # overall mAP is defined in every replicate
    d = paired_difference(pb, [(0, 1)])
    for v in d.values():
        assert v["delta"] == 0.0 and v["ci"] == [0.0, 0.0] and v["frac_le_0"] == 1.0


def test_point_difference_is_the_difference_of_the_evaluate_means():
    y, s, ids = _data()
    s_b = np.clip(s + np.random.default_rng(1).normal(0, 0.1, s.shape), 0, 1)
    pb = paired_bootstrap(y, [s, s_b], CLASSES, GROUPS, ids, n_bootstrap=50)
    ea, eb = (M.evaluate(y, x, CLASSES, GROUPS, n_bootstrap=0) for x in (s, s_b))
    d = paired_difference(pb, [(0, 1)])
    for key in pb.keys:
        assert d[key]["a"] == pytest.approx(ea[key], abs=1e-12)
        assert d[key]["b"] == pytest.approx(eb[key], abs=1e-12)
        assert d[key]["delta"] == pytest.approx(eb[key] - ea[key], abs=1e-12)
        lo, hi = d[key]["ci"]
        assert lo <= hi


def test_replicates_are_the_evaluate_stages_replicates():
    """Same seed, same draws as metrics.bootstrap_ap: the paired replicate is the one the
    evaluate stage's interval uses."""
    y, s, ids = _data()
    pb = paired_bootstrap(y, [s], CLASSES, GROUPS, ids, n_bootstrap=40, seed=5)
    ref = M.bootstrap_ap(y, s, ids, n_bootstrap=40, seed=5)
    np.testing.assert_allclose(pb.class_ap[0], ref, rtol=0, atol=1e-12, equal_nan=True)


def test_replicate_ap_matches_sklearn_on_an_explicitly_expanded_replicate():
    y, s, ids = _data(n_studies=60, per_study=3)
    s_b = np.clip(s + np.random.default_rng(2).normal(0, 0.2, s.shape), 0, 1)
    pb = paired_bootstrap(y, [s, s_b], CLASSES, GROUPS, ids, n_bootstrap=20, seed=7)
    codes = np.unique(ids, return_inverse=True)[1]
    weights = np.concatenate(list(M.bootstrap_weights(pb.n_clusters, 20, 7)), axis=1)
    for b in (0, 19):
        rows = np.repeat(np.arange(len(y)), weights[codes, b].astype(int))  # row x draw count
        for i, scores in enumerate((s, s_b)):
            for c in range(len(CLASSES)):
                yc, sc = y[rows, c], scores[rows, c]
                known = ~np.isnan(yc)
                if (yc[known] == 1).sum() == 0:
                    assert np.isnan(pb.class_ap[i, b, c])
                    continue
                expected = average_precision_score(yc[known], sc[known])
                assert pb.class_ap[i, b, c] == pytest.approx(expected, abs=1e-6)


def test_pairing_narrows_the_interval_of_a_small_difference():
    """B = A + small noise: pairing removes the shared sampling noise of the test images."""
    y, s, ids = _data(n_studies=200)
    s_b = np.clip(s + np.random.default_rng(4).normal(0, 0.02, s.shape), 0, 1)
    pb = paired_bootstrap(y, [s, s_b], CLASSES, GROUPS, ids, n_bootstrap=300, seed=0)
    paired = pb.replicates[1, :, 0] - pb.replicates[0, :, 0]
    # unpaired: each run resampled on its own (independent draws)
    ma = M._group_means(M.bootstrap_ap(y, s, ids, 300, seed=1), CLASSES, GROUPS)[""]
    mb = M._group_means(M.bootstrap_ap(y, s_b, ids, 300, seed=2), CLASSES, GROUPS)[""]
    unpaired = mb - ma
    assert _interval_width(paired) < 0.25 * _interval_width(unpaired)
    d = paired_difference(pb, [(0, 1)])["mAP"]
    assert d["ci"][1] - d["ci"][0] == pytest.approx(_interval_width(paired), rel=1e-9)


def test_mean_of_pairs_is_the_mean_of_the_per_pair_differences():
    y, s, ids = _data()
    rng = np.random.default_rng(9)
    runs = [np.clip(s + rng.normal(0, 0.1, s.shape), 0, 1) for _ in range(4)]
    pb = paired_bootstrap(y, runs, CLASSES, GROUPS, ids, n_bootstrap=60)
    pairs = [(0, 2), (1, 3)]
    mean = paired_difference(pb, pairs)
    single = [paired_difference(pb, [p]) for p in pairs]
    reps = ((pb.replicates[2] - pb.replicates[0]) + (pb.replicates[3] - pb.replicates[1])) / 2
    for g, key in enumerate(pb.keys):
        assert mean[key]["delta"] == pytest.approx(
            (single[0][key]["delta"] + single[1][key]["delta"]) / 2, abs=1e-12
        )
        r = reps[:, g][~np.isnan(reps[:, g])]
        assert mean[key]["frac_le_0"] == pytest.approx((r <= 0).mean())


def test_class_without_positives_is_left_out_of_every_mean():
    y, s, ids = _data()
    y[:, 4] = np.where(np.isnan(y[:, 4]), np.nan, 0.0)
    pb = paired_bootstrap(y, [s], CLASSES, GROUPS, ids, n_bootstrap=10)
    assert np.isnan(pb.class_ap[0, :, 4]).all()
    e = M.evaluate(y, s, CLASSES, GROUPS, n_bootstrap=0)
    assert pb.point[0, 3] == pytest.approx(e["mAP_tail"], abs=1e-12)


# --------------------------------------------------------------------------------------------
# runs: alignment, grouping, exp show


def _frames(y: np.ndarray, s: np.ndarray, ids: np.ndarray, classes=CLASSES):
    n = len(y)
    image_id = [f"img{i:04d}" for i in range(n)]
    manifest = pd.DataFrame({"image_id": image_id, "study_id": ids, "split": "test"})
    manifest[classes] = y[:, : len(classes)]
    train = manifest.iloc[:40].assign(split="train", image_id=[f"tr{i}" for i in range(40)])
    manifest = pd.concat([manifest, train], ignore_index=True)
    preds = pd.DataFrame({"image_id": image_id, "study_id": ids, "split": "test"})
    preds[[f"p:{c}" for c in classes]] = s[:, : len(classes)]
    return preds, manifest


def _run(name: str, seed: int, **params) -> Run:
    return Run(name, "0" * 40, {"seed": seed, "loss": "bce", **params})


def test_align_orders_rows_by_image_and_refuses_other_images_classes_or_labels():
    y, s, ids = _data()
    preds, manifest = _frames(y, s, ids)
    shuffled = preds.sample(frac=1.0, random_state=0)
    data = align([_run("a", 0), _run("b", 0)], [preds, shuffled], [manifest, manifest])
    np.testing.assert_array_equal(data.scores[0], data.scores[1])
    np.testing.assert_array_equal(data.y, y)

    fewer = preds.iloc[1:]
    with pytest.raises(DataError, match="different test images"):
        align([_run("a", 0), _run("b", 0)], [preds, fewer], [manifest, manifest])
    other = preds.drop(columns=["p:f"])
    with pytest.raises(DataError, match="predict different classes"):
        align([_run("a", 0), _run("b", 0)], [preds, other], [manifest, manifest])
    relabelled = manifest.copy()
    relabelled.loc[0, "a"] = 1 - np.nan_to_num(relabelled.loc[0, "a"])
    with pytest.raises(DataError, match="different test labels"):
        align([_run("a", 0), _run("b", 0)], [preds, preds], [manifest, relabelled])
    with pytest.raises(DataError, match="no 'dev' rows"):
        align([_run("a", 0)], [preds], [manifest], split="dev")


def test_runs_group_by_every_param_but_seed():
    runs = [_run("base", 0), _run("b1", 1), _run("asl0", 0, loss="asl"), _run("asl1", 1, loss="asl"),
            _run("lr", 0, **{"train.optim.lr": 0.1})]  # fmt: skip
    runs[4].params["loss"] = "bce"
    groups, differ = group_runs(runs)
    assert groups == [[0, 1], [2, 3], [4]]
    assert differ == ["loss", "train.optim.lr"]


def test_a_param_added_after_older_runs_splits_them_until_ignored():
    y, s, ids = _data()
    runs = [_run("old0", 0), _run("old1", 1), _run("new2", 2, **{"train.compile": False})]
    preds, manifest = _frames(y, s, ids)
    data = align(runs, [preds] * 3, [manifest] * 3)
    with pytest.raises(DataError, match=r"share no seed; params only one of them has: train.compile .*--ignore"):
        compare_aligned(runs, data, n_bootstrap=10)
    kept, notes = _without_params(runs, ["train.compile"])
    assert group_runs(kept)[0] == [[0, 1, 2]] and "train.compile" in notes[0]
    assert runs[2].params["train.compile"] is False  # the caller's runs are not modified
    with pytest.raises(DataError, match="--ignore train.compil: no compared run has that param"):
        _without_params(runs, ["train.compil"])


def test_git_revisions_resolve_to_commits_and_run_names_win(tmp_path):
    import subprocess

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert _git_commit(tmp_path, "HEAD", []) == sha
    assert _git_commit(tmp_path, "nosuch", []) == "nosuch"
    assert _git_commit(tmp_path, "HEAD", [_run("HEAD", 0)]) == "HEAD"  # an experiment's own name
    assert _git_commit(tmp_path, "workspace", []) == "workspace"
    assert select_runs([Run("x", sha, {})], [_git_commit(tmp_path, "HEAD", [])])[0].name == "x"


def test_compare_pairs_seed_with_seed_and_prints_the_table():
    y, s, ids = _data()
    rng = np.random.default_rng(11)
    scores = [np.clip(s + rng.normal(0, 0.1, s.shape) + (0.05 * np.nan_to_num(y) if i >= 2 else 0),
                      0, 1) for i in range(4)]  # fmt: skip
    runs = [_run("bce-s0", 0), _run("bce-s1", 1), _run("asl-s1", 1, loss="asl"),
            _run("asl-s0", 0, loss="asl")]  # fmt: skip
    frames = [_frames(y, x, ids) for x in scores]
    data = align(runs, [f[0] for f in frames], [frames[0][1]] * 4)
    result = compare_aligned(runs, data, n_bootstrap=100, seed=0)
    assert [g["runs"] for g in result["groups"]] == [
        ["bce-s0", "bce-s1"],
        ["asl-s0", "asl-s1"],
    ]  # by seed
    (c,) = result["comparisons"]
    assert [(p["a"], p["b"]) for p in c["pairs"]] == [("bce-s0", "asl-s0"), ("bce-s1", "asl-s1")]
    per_run = {r["name"]: r["metrics"]["mAP"] for r in result["runs"]}
    assert c["pairs"][0]["delta"]["mAP"]["delta"] == pytest.approx(
        per_run["asl-s0"] - per_run["bce-s0"], abs=1e-12
    )
    assert c["mean"]["mAP"]["delta"] == pytest.approx(
        np.mean([per_run["asl-s0"] - per_run["bce-s0"], per_run["asl-s1"] - per_run["bce-s1"]]),
        abs=1e-12,
    )
    g = result["groups"][0]["metrics"]["mAP"]
    assert g["mean"] == pytest.approx(np.mean([per_run["bce-s0"], per_run["bce-s1"]]))
    assert g["sd"] == pytest.approx(np.std([per_run["bce-s0"], per_run["bce-s1"]], ddof=1))
    table = format_table(result)
    assert "groups differ in: loss" in table and "loss=asl" in table
    assert "seed 0" in table and "mean of 2" in table and "percentile interval" in table


def test_two_groups_without_a_common_seed_are_refused():
    y, s, ids = _data()
    runs = [_run("a0", 0), _run("a1", 1), _run("b2", 2, loss="asl"), _run("b3", 3, loss="asl")]
    preds, manifest = _frames(y, s, ids)
    data = align(runs, [preds] * 4, [manifest] * 4)
    with pytest.raises(DataError, match="share no seed"):
        compare_aligned(runs, data, n_bootstrap=10)


def test_parse_exp_show_keeps_finished_runs_with_nested_params():
    def data(rev: str, seed: int, loss: str) -> dict:
        return {"rev": rev, "params": {"params.yaml": {"data": {
                    "seed": seed, "loss": loss, "predict": {"out": "p.parquet"}}}},
                "outs": {"p.parquet": {"hash": f"h{rev}"}}}  # fmt: skip

    rows = [
        {"rev": "workspace", "name": None, "data": data("workspace", 0, "bce"), "error": None},
        {"rev": "a" * 40, "name": "main", "data": data("a" * 40, 0, "bce"), "error": None,
         "experiments": [
             {"name": "done", "executor": None,
              "revs": [{"rev": "b" * 40, "name": "done", "data": data("b" * 40, 1, "asl")}]},
             {"name": "queued", "executor": {"state": "queued"},
              "revs": [{"rev": "c" * 40, "name": "queued", "data": data("c" * 40, 2, "asl")}]},
             {"name": "broken", "executor": {"state": "failed"},
              "revs": [{"rev": "d" * 40, "name": "broken", "data": data("d" * 40, 3, "asl")}]},
         ]},
    ]  # fmt: skip
    runs = parse_exp_show(rows)
    assert [(r.name, r.baseline, r.seed) for r in runs] == [("main", True, 0), ("done", False, 1)]
    assert runs[1].params["predict.out"] == "p.parquet" and runs[1].outs == {
        "p.parquet": "h" + "b" * 40
    }


def test_bca_interval_of_the_difference_uses_paired_jackknife_values():
    y, s, ids = _data()
    s_b = np.clip(
        s + np.random.default_rng(1).normal(0, 0.05, s.shape) + 0.1 * np.nan_to_num(y), 0, 1
    )
    pb = paired_bootstrap(y, [s, s_b], CLASSES, GROUPS, ids, n_bootstrap=200, jackknife=True)
    assert pb.jackknife.shape == (2, 150, 4)  # one study left out at a time, per run and mean
    d = paired_difference(pb, [(0, 1)], method="bca")["mAP"]
    assert d["ci_method"] == "bca" and d["ci"][0] <= d["delta"] <= d["ci"][1]
    same = paired_bootstrap(y, [s, s], CLASSES, GROUPS, ids, n_bootstrap=50, jackknife=True)
    assert paired_difference(same, [(0, 1)], method="bca")["mAP"]["ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="jackknife"):
        paired_difference(paired_bootstrap(y, [s, s_b], CLASSES), [(0, 1)], method="bca")


def test_cli_outside_a_dvc_repository_is_one_error_line(tmp_path, capsys):
    from cxrlt.cli import main

    assert main(["compare", "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: `dvc exp show --json` failed")


def test_a_named_experiment_on_an_earlier_baseline_is_found(monkeypatch, tmp_path):
    """After HEAD moves on (a README commit), `dvc exp show` lists only HEAD's experiments;
    a name not found there is looked up across all commits (`dvc exp show -A`)."""
    import cxrlt.compare as C

    def data(rev: str, seed: int) -> dict:
        return {"rev": rev, "params": {"params.yaml": {"data": {
                    "seed": seed, "loss": "bce", "predict": {"out": "p.parquet"}}}},
                "outs": {"p.parquet": {"hash": f"h{rev}"}}}  # fmt: skip

    head = {"rev": "a" * 40, "name": "main", "data": data("a" * 40, 0), "error": None}
    old = {"rev": "e" * 40, "name": None, "data": data("e" * 40, 0), "error": None,
           "experiments": [{"name": "bce-s1", "executor": None, "revs": [
               {"rev": "f" * 40, "name": "bce-s1", "data": data("f" * 40, 1)}]}]}  # fmt: skip
    calls = []

    def exp_show(repo, all_commits=False):  # the JSON `dvc exp show [-A] --json` prints
        calls.append(all_commits)
        return [head, old] if all_commits else [head]

    monkeypatch.setattr(C, "_exp_show", exp_show)
    _, _, runs = C.find_runs(tmp_path, ["main", "bce-s1"])
    assert [(r.name, r.seed) for r in runs] == [("main", 0), ("bce-s1", 1)]
    assert calls == [False, True]
    _, _, runs = C.find_runs(tmp_path, ["main"])
    assert calls == [False, True, False]  # found at HEAD: no -A listing
    with pytest.raises(DataError, match="no experiment or commit 'nope'"):
        C.find_runs(tmp_path, ["nope"])


def _with_levels(preds: pd.DataFrame, s: np.ndarray, fused: np.ndarray | None, rng) -> pd.DataFrame:
    """A predictions file as the predict stage writes it: image-level and fused columns, views."""
    out = preds.assign(view=rng.choice(["frontal", "lateral", None], size=len(preds)))
    for i, c in enumerate(CLASSES):
        out[f"image:{c}"] = s[:, i]
        if fused is not None:
            out[f"fused:{c}"] = fused[:, i]
    return out


def test_levels_of_the_same_runs_are_paired_seed_by_seed():
    from cxrlt.postprocess import aggregate

    y, s, ids = _data()
    rng = np.random.default_rng(3)
    runs = [_run("s0", 0), _run("s1", 1)]
    preds, manifests, images, fused = [], [], [], []
    for _ in runs:
        img = np.clip(s + rng.normal(0, 0.1, s.shape), 0, 1)
        fu = np.clip(s + rng.normal(0, 0.05, s.shape), 0, 1)
        p, m = _frames(y, img, ids)
        preds.append(_with_levels(p, img, fu, rng))
        manifests.append(m)
        images.append(img)
        fused.append(fu)
    xr, xp, xm, notes = at_levels(runs, preds, manifests, ["image", "view_group", "fused"])
    assert [r.name for r in xr] == ["s0@image", "s0@view_group", "s0@fused",
                                    "s1@image", "s1@view_group", "s1@fused"]  # fmt: skip
    assert [r.params["predict.level"] for r in xr[:3]] == ["image", "view_group", "fused"]
    cols = [f"p:{c}" for c in CLASSES]
    np.testing.assert_array_equal(xp[0][cols].to_numpy(), images[0])
    expected = aggregate(images[1], preds[1]["study_id"].to_numpy(), preds[1]["view"].to_numpy(), "view_group")
    np.testing.assert_array_equal(xp[4][cols].to_numpy(), expected)
    np.testing.assert_array_equal(xp[5][cols].to_numpy(), fused[1])
    assert "uncalibrated" in notes[0]
    result = compare_aligned(xr, align(xr, xp, xm), n_bootstrap=50)
    assert [g["runs"] for g in result["groups"]] == [["s0@image", "s1@image"],
                                                     ["s0@view_group", "s1@view_group"],
                                                     ["s0@fused", "s1@fused"]]  # fmt: skip
    assert [(p["a"], p["b"]) for p in result["comparisons"][1]["pairs"]] == [
        ("s0@image", "s0@fused"), ("s1@image", "s1@fused")]
    with pytest.raises(DataError, match="--level medain: unknown level; valid: image, mean"):
        at_levels(runs, preds, manifests, ["medain"])
    no_fused = [_with_levels(_frames(y, s, ids)[0], s, None, rng)]
    with pytest.raises(DataError, match="s0: predictions: no fused:<class> columns .the fuse stage did not run.; score another level"):
        at_levels(runs[:1], no_fused, manifests[:1], ["image", "fused"])
    bare = no_fused[0].drop(columns=["study_id", "view"])
    assert at_levels(runs[:1], [bare], manifests[:1], ["image"])[1][0].shape[0] == len(bare)
    with pytest.raises(DataError, match=r"s0: predictions: no \['study_id', 'view'\] column\(s\), which the 'mean' aggregation needs"):
        at_levels(runs[:1], [bare], manifests[:1], ["image", "mean"])
    with pytest.raises(DataError, match="s0: predictions have no image:<class> columns"):
        at_levels(runs[:1], [_frames(y, s, ids)[0]], manifests[:1], ["image"])
