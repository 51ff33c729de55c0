"""Noisy student: pseudo-labels (observed kept, unknowns = the teacher's flip-averaged
probabilities), a fresh student per round, selection by val mAP, what never reaches training,
and rounds 0 = plain stage 1 byte for byte."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import CLASSES, _params, prepared  # noqa: F401 - `prepared` is a fixture

import cxrlt.training.student as S
from cxrlt.data.cache import ImageCache, build_cache
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.inference import predict
from cxrlt.labels import TASK3_CLASSES
from cxrlt.losses import build_loss
from cxrlt.training.data import CachedImages, ConcatImages
from cxrlt.training.fit import fit
from cxrlt.training.module import ImageClassifierModule
from cxrlt.training.samplers import build_sampler

UNANNOTATED = CLASSES[:25]  # the external source says nothing about these


@pytest.fixture(scope="module")
def external(prepared, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path, Path]:  # noqa: F811
    """An NIH-like source (its own ids, cache and train/val split) made of CXR-LT train pixels,
    with many labels unknown; and a Task 3 column that must never be trained on."""
    df, _ = prepared
    root = tmp_path_factory.mktemp("external")
    ext = df[df["split"] == "train"].head(30).copy()
    for col in ("image_id", "study_id", "patient_id"):
        ext[col] = "nih-" + ext[col].astype(str)
    ext["source"] = "nih"
    ext["split"] = ["train"] * 24 + ["val"] * 6
    ext[UNANNOTATED] = np.nan
    ext.loc[ext.index[::4], CLASSES[30:33]] = np.nan  # a few more unknowns, row by row
    ext["Bulla"] = 1.0
    ext.to_parquet(root / "nih.parquet")
    build_cache(ext, root / "cache" / "nih", 40, workers=1, progress=False)
    return ext, root / "nih.parquet", root / "cache"


def _ns_params(external, out: Path, **ns) -> dict:
    _, manifest, cache_root = external
    params = _params()
    params["train"]["threads"] = 1  # two cores shared: one thread is the fastest here
    params["external"] = {"cache_root": str(cache_root), "sources": {"nih": {"manifest": str(manifest)}}}
    params["noisy_student"] = {"rounds": 0, "sources": ["nih"], "tta_hflip": True, "batch_size": 7,
                               "pseudo_dir": str(out / "pseudo"), "device": "cpu", **ns}  # fmt: skip
    return params


def _ids(dataset: CachedImages) -> list[str]:
    """The image ids a dataset reads, from its cache's own index."""
    by_row = pd.Series(dataset.cache.row.index, index=dataset.cache.row.to_numpy())
    return by_row.loc[dataset.rows].tolist()


@pytest.fixture(scope="module")
def two_rounds(prepared, external, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """One real run with 2 rounds; spies record every training run's data, result and weights at
    its first training step."""
    df, cache_dir = prepared
    df = df.copy()
    df["Bulla"] = 1.0  # a Task 3 label in the CXR-LT manifest too
    out = tmp_path_factory.mktemp("rounds")
    params = _ns_params(external, out, rounds=2)
    params["train"]["state_dir"] = str(out / "state")
    calls, first_step = [], []
    real_train, real_step = S.train_model, ImageClassifierModule.training_step

    def train_spy(*args, **kwargs):
        trained = real_train(*args, **kwargs)
        calls.append({"params": args[3], "data": kwargs.get("data"), "init": kwargs.get("init"), "trained": trained})
        return trained

    def step_spy(self, batch, batch_idx):
        if self.global_step == 0 and batch_idx == 0:
            first_step.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return real_step(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S, "train_model", train_spy)
        mp.setattr(ImageClassifierModule, "training_step", step_spy)
        info = S.train_stage1(df, CLASSES, cache_dir, params, out / "stage1.pt")
    return {"df": df, "out": out, "params": params, "info": info, "calls": calls, "first_step": first_step}


def test_pseudo_labels_keep_observed_labels_and_fill_unknowns_with_the_flip_averaged_teacher(two_rounds, external):
    ext, _, cache_root = external
    train = ext[ext["split"] == "train"].reset_index(drop=True)
    observed = label_matrix(train, CLASSES)
    unknown = np.isnan(observed)
    cache = ImageCache(cache_root / "nih")
    tables = []
    for r in (1, 2):
        table = pd.read_parquet(two_rounds["out"] / "pseudo" / f"round{r}.parquet")
        assert list(table.columns) == ["image_id", "source", *CLASSES]
        assert table["image_id"].tolist() == train["image_id"].tolist() and set(table["source"]) == {"nih"}
        got = table[CLASSES].to_numpy(np.float32)
        np.testing.assert_array_equal(got[~unknown], observed[~unknown])  # never overwritten
        # round r's teacher: the model trained just before it
        teacher = two_rounds["calls"][r - 1]["trained"].module.model
        flipped = predict(teacher, cache, train["image_id"], 5, tta_hflip=True)
        plain = predict(teacher, cache, train["image_id"], 5, tta_hflip=False)
        np.testing.assert_allclose(got[unknown], flipped[unknown], rtol=0, atol=1e-6)
        assert np.abs(got[unknown] - plain[unknown]).max() > 1e-4  # the mirror was averaged in
        tables.append(got)
    assert np.abs(tables[0][unknown] - tables[1][unknown]).max() > 1e-4  # a new teacher each round


def test_every_student_starts_from_the_init_weights_with_a_fresh_run(two_rounds):
    calls, first = two_rounds["calls"], two_rounds["first_step"]
    assert len(calls) == 3 and len(first) == 3  # the teacher and two students, each trained from step 0
    teacher_trained = calls[0]["trained"].module.model.state_dict()
    for student in first[1:]:
        for k, v in first[0].items():  # the same init as the teacher (scratch, same seed) ...
            assert torch.equal(student[k], v), k
    changed = [k for k, v in teacher_trained.items() if v.is_floating_point() and not torch.equal(v, first[1][k])]
    assert changed  # ... not the teacher's trained weights
    assert len({id(c["trained"].module) for c in calls}) == 3
    assert all(c["init"] == calls[0]["init"] for c in calls)
    # the teacher resumes from train.state_dir; students never do, and the state is cleared at the end
    assert calls[0]["params"]["train"]["state_dir"] == str(two_rounds["out"] / "state")
    assert all(c["params"]["train"]["state_dir"] is None for c in calls[1:])
    assert not any((two_rounds["out"] / "state").glob("*.ckpt"))


def test_rounds_are_recorded_and_the_best_val_map_is_saved(two_rounds, external):
    calls, info, out = two_rounds["calls"], two_rounds["info"], two_rounds["out"]
    ext = external[0]
    records = json.loads((out / "pseudo" / "rounds.json").read_text())
    ckpt = torch.load(out / "stage1.pt", weights_only=True)
    assert ckpt["noisy_student"] == records == info["noisy_student"]
    scores = [c["trained"].info["val_mAP"] for c in calls]
    assert records["teacher"]["val_mAP"] == scores[0]
    train = ext[ext["split"] == "train"]
    unknown = np.isnan(label_matrix(train, CLASSES))
    for r, rec in enumerate(records["rounds"], start=1):
        assert rec["round"] == r and rec["val_mAP"] == scores[r]
        assert rec["best_epoch"] == calls[r]["trained"].info["best_epoch"]
        assert rec["pseudo_images"] == len(train) == rec["pseudo_images_per_source"]["nih"]
        assert rec["train_images"] == int((two_rounds["df"]["split"] == "train").sum()) + len(train)
        assert rec["filled_labels"] == int(unknown.sum())
        table = pd.read_parquet(rec["file"])
        filled = table[CLASSES].to_numpy(np.float64)[unknown]
        assert math.isclose(rec["mean_filled_probability"], filled.mean(), rel_tol=1e-9)
    chosen = records["selected"]
    assert chosen == S.select(scores)
    assert ckpt["val_mAP"] == scores[chosen] and ckpt["best_epoch"] == calls[chosen]["trained"].info["best_epoch"]
    kept = calls[chosen]["trained"].module.model.state_dict()
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, kept[k].cpu()), k
    assert ckpt["n_train_images"] == int((two_rounds["df"]["split"] == "train").sum())  # CXR-LT's, as stage 1


@pytest.mark.parametrize(("scores", "chosen"), [
    ([0.5, 0.7, 0.6], 1), ([0.5, 0.5, 0.4], 0), ([0.5, 0.6, 0.6], 1), ([float("nan"), None, 0.1], 2),
    ([float("nan"), float("nan")], 0), ([0.2], 0),
])  # fmt: skip
def test_selection_is_the_highest_val_map_earliest_on_ties(scores, chosen):
    assert S.select(scores) == chosen


def test_no_dev_test_val_image_or_task3_label_reaches_a_student(two_rounds, external):
    df, calls = two_rounds["df"], two_rounds["calls"]
    ext = external[0]
    train_ids = set(df.loc[df["split"] == "train", "image_id"].astype(str))
    held_out = set(df.loc[df["split"] != "train", "image_id"].astype(str))
    ext_train = set(ext.loc[ext["split"] == "train", "image_id"])
    for c in calls[1:]:
        data = c["data"]
        assert isinstance(data.train, ConcatImages)
        ids = [i for part in data.train.parts for i in _ids(part)]
        assert set(ids) == train_ids | ext_train and len(ids) == len(train_ids) + len(ext_train)
        assert not set(ids) & held_out
        assert set(_ids(data.val)) == set(df.loc[df["split"] == "val", "image_id"].astype(str))
        assert data.train.targets.shape[1] == len(CLASSES) == data.val.targets.shape[1]
    for r in (1, 2):
        columns = pd.read_parquet(two_rounds["out"] / "pseudo" / f"round{r}.parquet").columns
        assert not set(columns) & set(TASK3_CLASSES)
    assert not set(TASK3_CLASSES) & set(CLASSES)


def test_zero_rounds_is_plain_stage1_byte_for_byte(prepared, external, tmp_path: Path):  # noqa: F811
    df, cache_dir = prepared
    params = _ns_params(external, tmp_path)
    plain = {k: v for k, v in params.items() if k != "noisy_student"}
    fit(df, CLASSES, cache_dir, plain, tmp_path / "plain.pt")
    stale = tmp_path / "pseudo" / "round3.parquet"  # from an earlier run with more rounds
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    info = S.train_stage1(df, CLASSES, cache_dir, params, tmp_path / "ns.pt")
    assert (tmp_path / "plain.pt").read_bytes() == (tmp_path / "ns.pt").read_bytes()
    assert "noisy_student" not in info
    assert json.loads((tmp_path / "pseudo" / "rounds.json").read_text()) == {"rounds": []}
    assert sorted(p.name for p in (tmp_path / "pseudo").iterdir()) == ["rounds.json"]


@pytest.mark.parametrize(("update", "message"), [
    ({"rounds": -1}, r"noisy_student.rounds must be an integer >= 0"),
    ({"rounds": True}, r"noisy_student.rounds must be an integer"),
    ({"rounds": 1, "sources": ["nope"]}, r"noisy_student.sources: unknown sources \['nope'\]"),
    ({"rounds": 1, "sources": []}, r"needs at least one source"),
    ({"colour": 1}, r"noisy_student: unknown keys \['colour'\]"),
    ({"epochs": 0}, r"noisy_student.epochs must be an integer >= 1"),
    ({"batch_size": "big"}, r"noisy_student.batch_size"),
    ({"tta_hflip": "yes"}, r"noisy_student.tta_hflip must be true or false"),
    ({"device": "abacus"}, r"noisy_student.device"),
    ({"pseudo_dir": ""}, r"noisy_student.pseudo_dir"),
    ({"rounds": 1, "loss": "hard_only"}, r"loss 'hard_only' is not checked for soft targets.*bce, wbce"),
    ({"section": None}, r"no `noisy_student` section"),
])  # fmt: skip
def test_bad_params_fail_before_data_loads(external, tmp_path: Path, update: dict, message: str):
    params = _ns_params(external, tmp_path)
    update = dict(update)
    if "loss" in update:
        params["loss"] = update.pop("loss")
    if "section" in update:
        del params["noisy_student"]
    else:
        params["noisy_student"].update(update)
    with pytest.raises(DataError, match=message):  # no manifest, no cache: nothing is read
        S.train_stage1(pd.DataFrame(), CLASSES, tmp_path / "no-cache", params, tmp_path / "x.pt")


def test_a_missing_source_cache_fails_before_the_teacher_trains(prepared, external, tmp_path: Path):  # noqa: F811
    df, cache_dir = prepared
    params = _ns_params(external, tmp_path, rounds=1)
    params["external"]["cache_root"] = str(tmp_path / "empty")
    with pytest.raises(DataError, match=r"no image cache for source nih"):
        S.train_stage1(df, CLASSES, cache_dir, params, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("name", S.SOFT_TARGET_LOSSES)
def test_each_allowed_loss_takes_soft_targets_sensibly(name: str):
    """Per soft target t, the loss over one logit is finite, >= 0, and minimised at an
    interior probability that rises with t."""
    counts = np.array([40.0, 8.0, 2.0])
    loss = build_loss(name, {}, counts / 200, counts)
    z = torch.linspace(-8, 8, 321)
    best = []
    for t in (0.2, 0.4, 0.6, 0.8):
        values = torch.stack([loss(zi.repeat(1, 3), torch.full((1, 3), t), torch.ones(1, 3, dtype=torch.bool))
                              for zi in z])  # fmt: skip
        assert torch.isfinite(values).all() and (values >= 0).all()
        k = int(values.argmin())
        assert 0 < k < len(z) - 1, f"{name}: t={t} minimised at the edge of the grid"
        best.append(k)
    assert best == sorted(best) and best[0] < best[-1], f"{name}: minimisers {best}"


def test_samplers_count_a_soft_target_as_positive_above_one_half():
    targets = np.array([[0.6, 0.0], [0.4, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    mask = np.ones_like(targets, dtype=bool)
    rf = build_sampler("repeat_factor", {"threshold": 0.5}, targets, mask, ["a", "b"], 0)
    assert rf.factors[0] > 1 and rf.factors[1] == 1 and rf.factors[2] > 1 and rf.factors[3] == 1
    ca = build_sampler("class_aware", {}, targets, mask, ["a", "b"], 0)
    assert ca.members[0].tolist() == [0] and ca.members[1].tolist() == [2]
