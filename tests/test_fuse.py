"""Stage 2 end to end on the tiny built-in data: the fusion model trains on the stage-1
backbone, predictions are per study and reach every image, features and pixels agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlt.data.cache import ImageCache, build_cache
from cxrlt.data.mimic import read_cxrlt
from cxrlt.data.splits import patient_val_split
from cxrlt.errors import DataError
from cxrlt.inference import StudyTable, image_features, load_fusion_checkpoint, study_logits
from cxrlt.labels import TASK1_CLASSES
from cxrlt.training.fit import fit
from cxrlt.training.fusion import fit_fusion

CLASSES = list(TASK1_CLASSES)
FUSE = {
    "checkpoint": "unused", "live_dir": "unused", "epochs": 2, "batch_size": 4, "lr": 0.003,
    "model": {"tokens_dim": 16, "heads": 2, "ff_dim": 32, "layers": 1, "max_views": 2,
              "head": "ml_decoder", "head_args": {"dim": 16, "heads": 2, "ff_dim": 32}},
}  # fmt: skip


@pytest.fixture(scope="module")
def stage1(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory):
    df = read_cxrlt(tiny_synth / "cxr-lt-2024", tiny_synth / "mimic-cxr-jpg", "task1")
    df["split"] = patient_val_split(df, CLASSES, 0.2, seed=0)
    tmp = tmp_path_factory.mktemp("fuse")
    cache_dir = tmp / "cache"
    build_cache(df, cache_dir, 64, workers=1, progress=False)
    params = {
        "seed": 3, "loss": "bce", "losses": {},
        "model": {"backbone": "mobilenetv3_small_050", "pretrained": False, "head": "linear"},
        "train": {"epochs": 1, "batch_size": 16, "progress_bar": False, "limit_train_batches": 3},
    }  # fmt: skip
    fit(df, CLASSES, cache_dir, params, tmp / "stage1.pt")
    return df, cache_dir, tmp / "stage1.pt", params


def _params(base: dict, **fuse: object) -> dict:
    return {**base, "fuse": {**FUSE, **fuse}}


def test_fuse_trains_selects_and_reproduces(stage1, tmp_path: Path):
    df, cache_dir, ckpt, base = stage1
    info = fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base), tmp_path / "a.pt", live_dir=tmp_path / "live")
    fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base), tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert len(info["history"]) == 2 and info["val_mAP"] == max(info["history"])
    assert (tmp_path / "live" / "metrics.json").exists()
    model, saved = load_fusion_checkpoint(tmp_path / "a.pt")
    assert saved["classes"] == CLASSES and saved["fusion"]["max_views"] == 2
    # the frozen backbone is the stage-1 one, bit for bit
    stage1_state = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, stage1_state[f"backbone.{k}"], rtol=0, atol=0)


def test_study_predictions_reach_every_image_whatever_the_batch(stage1, tmp_path: Path):
    df, cache_dir, ckpt, base = stage1
    fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epochs=1), tmp_path / "f.pt")
    model, _ = load_fusion_checkpoint(tmp_path / "f.pt")
    rows = df[df["split"] != "train"].reset_index(drop=True)
    table = StudyTable(rows, CLASSES, cap=2)
    assert any(len(s.all_image_ids) > 2 for s in table.studies)  # some study is over the cap
    cache = ImageCache(cache_dir)
    device = torch.device("cpu")
    p1 = table.predict(model, cache, 1, device)
    p_big = table.predict(model, cache, 64, device)
    np.testing.assert_allclose(p1, p_big, rtol=0, atol=1e-5)
    assert p1.shape == (len(rows), len(CLASSES))
    per_study = pd.DataFrame(p1).groupby(rows["study_id"].to_numpy()).nunique()
    assert per_study.max().max() == 1  # every image of a study holds the study's value
    # precomputed feature maps give what the pixels give
    feats = image_features(model, cache, table.image_ids, 7, device)
    index = {i: k for k, i in enumerate(table.image_ids)}
    np.testing.assert_allclose(table.predict(model, cache, 5, device, feats, index), p1, rtol=0, atol=1e-5)
    slots = table.slots(None)
    with torch.no_grad():
        a = study_logits(model, cache, slots, np.arange(3), device)
        b = study_logits(model, cache, slots, np.arange(3), device, feats, index)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fine_tuned_backbone_changes_and_bad_settings(stage1, tmp_path: Path):
    df, cache_dir, ckpt, base = stage1
    model_cfg = {**FUSE["model"], "freeze_backbone": False}
    fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epochs=1, model=model_cfg), tmp_path / "t.pt")
    tuned = torch.load(tmp_path / "t.pt", weights_only=True)["state_dict"]
    stage1_state = torch.load(ckpt, weights_only=True)["state_dict"]
    changed = [k for k, v in tuned.items() if k.startswith("backbone.") and not torch.equal(v, stage1_state[k])]
    assert changed
    with pytest.raises(DataError, match=r"fuse: unknown keys \['epoch'\]"):
        fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epoch=3), tmp_path / "x.pt")
    with pytest.raises(DataError, match="fuse.epochs must be an integer >= 1"):
        fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epochs=0), tmp_path / "x.pt")


def test_residual_fusion_trains_saves_its_prior_and_predicts_from_the_file(stage1, tmp_path: Path):
    df, cache_dir, ckpt, base = stage1
    model_cfg = {**FUSE["model"], "residual": True}
    fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epochs=1, model=model_cfg), tmp_path / "r.pt")
    model, saved = load_fusion_checkpoint(tmp_path / "r.pt")
    assert saved["fusion"]["residual"] is True
    stage1_state = torch.load(ckpt, weights_only=True)["state_dict"]
    for k, v in model.prior.state_dict().items():  # the stage-1 head, untouched by training
        torch.testing.assert_close(v, stage1_state[f"head.{k}"], rtol=0, atol=0)
    rows = df[df["split"] != "train"].reset_index(drop=True)
    table = StudyTable(rows, CLASSES, cap=2)
    cache = ImageCache(cache_dir)
    p1 = table.predict(model, cache, 1, torch.device("cpu"))
    np.testing.assert_allclose(p1, table.predict(model, cache, 64, torch.device("cpu")), rtol=0, atol=1e-5)


def test_fuse_sampler_draws_studies_by_name_or_as_stage_1_did(stage1, tmp_path: Path):
    """`fuse.sampler` over studies and their union labels: `stage1` takes the top-level
    sampler and its settings; the default checkpoint records nothing new; a bad name is a
    one-line error before training."""
    df, cache_dir, ckpt, base = stage1
    as_stage1 = {**_params(base, epochs=1, sampler="stage1"), "sampler": "repeat_factor",
                 "samplers": {"repeat_factor": {"threshold": 0.5}}}  # fmt: skip
    assert fit_fusion(df, CLASSES, cache_dir, ckpt, as_stage1, tmp_path / "r.pt")["sampler"] == "repeat_factor"
    assert "sampler" not in fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epochs=1), tmp_path / "d.pt")
    assert (tmp_path / "r.pt").read_bytes() != (tmp_path / "d.pt").read_bytes()
    with pytest.raises(DataError, match="fuse.sampler: unknown sampler 'balanced'; valid: stage1, class_aware, random"):
        fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, sampler="balanced"), tmp_path / "x.pt")
    ca = fit_fusion(df, CLASSES, cache_dir, ckpt, _params(base, epochs=1, sampler="class_aware"), tmp_path / "c.pt")
    assert ca["sampler"] == "class_aware"


def test_fuse_sampler_that_cannot_draw_a_class_fails_before_the_feature_pass(stage1, tmp_path: Path, monkeypatch):
    """A class with no positive training study is the sampler's one-line error, raised before
    the backbone's pass over every image (minutes on real data), not after it."""
    df, cache_dir, ckpt, base = stage1
    no_hernia = df.copy()
    no_hernia.loc[no_hernia["split"] == "train", "Hernia"] = 0.0

    def feature_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the feature pass ran before the sampler was checked")

    monkeypatch.setattr("cxrlt.training.fusion.image_features", feature_pass)
    with pytest.raises(DataError, match=r"sampler class_aware: no known positive .* \['Hernia'\]"):
        fit_fusion(no_hernia, CLASSES, cache_dir, ckpt, _params(base, sampler="class_aware"), tmp_path / "x.pt")
