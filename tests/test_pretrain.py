"""Pretraining on external sources and taking its backbone into stage 1 (train.init)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxrlt.checkpoint import save_checkpoint
from cxrlt.data.cache import build_cache
from cxrlt.errors import DataError
from cxrlt.inference import load_checkpoint
from cxrlt.models import Classifier, ModelConfig
from cxrlt.training.fit import fit
from cxrlt.training.init import InitWeights
from cxrlt.training.pretrain import MODEL_KEYS, TRAIN_KEYS, PretrainConfig, pretrain
from tests import test_training
from tests.test_training import CLASSES, _params

ROOT = Path(__file__).resolve().parents[1]
prepared = test_training.prepared  # the tiny CXR-LT set and its cache (fixture)


def _sources(df: pd.DataFrame, root: Path) -> dict:
    """Two external sources cut from the tiny CXR-LT set, each annotating only some classes."""
    ext = df[df["split"].isin(["train", "val"])].reset_index(drop=True)
    halves = {"nih": ext.iloc[::2].copy(), "chexpert": ext.iloc[1::2].copy()}
    halves["nih"][CLASSES[20:]] = np.nan  # nih does not annotate these
    halves["chexpert"][CLASSES[:5]] = np.nan
    halves["chexpert"][CLASSES[-1]] = 0.0  # annotated, never positive: nothing to learn
    sources = {}
    for name, part in halves.items():
        part["image_id"] = name + "-" + part["image_id"].astype(str)
        manifest = root / f"{name}.parquet"
        part.to_parquet(manifest)
        build_cache(part, root / "cache" / name, 40, workers=1, progress=False)
        sources[name] = {"manifest": str(manifest), "root": str(root)}
    return sources


def _pretrain_params(df: pd.DataFrame, root: Path, names: list[str]) -> dict:
    p = _params()
    p.update(task="task1", external={"cache_root": str(root / "cache"), "sources": _sources(df, root)},
             pretrain={"sources": names, "checkpoint": str(root / "pretrain.pt"), "epochs": 1})  # fmt: skip
    return p


def test_pretrain_learns_annotated_classes_and_stage1_starts_from_its_backbone(prepared, tmp_path: Path):
    df, cache_dir = prepared
    params = _pretrain_params(df, tmp_path, ["nih", "chexpert"])
    info = pretrain(params)
    model, saved = load_checkpoint(tmp_path / "pretrain.pt")  # a full, strict checkpoint
    assert saved["sources"] == ["nih", "chexpert"] and saved["classes"] == info["classes"]
    # classes with a positive training label in some source, in Task 1 order; never-positive ones dropped
    ext = pd.concat([pd.read_parquet(s["manifest"]) for s in params["external"]["sources"].values()])
    positive = [c for c in CLASSES if (ext.loc[ext["split"] == "train", c] == 1).any()]
    assert info["classes"] == positive and len(positive) < len(CLASSES)
    assert info["images"]["train"] == int((ext["split"] == "train").sum())

    fresh = Classifier(ModelConfig(**{**params["model"], "pretrained": False}), len(CLASSES))
    head_before = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    record = InitWeights.from_params({**params, "train": {"init": "pretrained"}}).apply(fresh)
    assert record["kind"] == "pretrained" and record["head"] == "new" and record["sources"] == ["nih", "chexpert"]
    for k, v in model.backbone.state_dict().items():  # every backbone tensor taken over
        torch.testing.assert_close(fresh.backbone.state_dict()[k], v, rtol=0, atol=0)
    for k, v in fresh.head.state_dict().items():  # the head is left as initialised
        torch.testing.assert_close(v, head_before[k], rtol=0, atol=0)

    params["train"]["init"] = "pretrained"
    out = fit(df, CLASSES, cache_dir, params, tmp_path / "stage1.pt")
    assert out["init"]["sha256"] == record["sha256"] and out["init"]["file"] == str(tmp_path / "pretrain.pt")
    params["train"]["init"] = "scratch"
    assert "init" not in fit(df, CLASSES, cache_dir, params, tmp_path / "scratch.pt")  # default checkpoint unchanged


def test_pretrain_without_sources_is_skipped_and_stage1_says_so(prepared, tmp_path: Path):
    df, cache_dir = prepared
    params = _pretrain_params(df, tmp_path, [])
    params["pretrain"]["live_dir"] = str(tmp_path / "live")
    assert "skipped" in pretrain(params)
    assert (tmp_path / "live" / "metrics.json").is_file()  # the stage's outputs exist either way
    fresh = Classifier(ModelConfig(**{**params["model"], "pretrained": False}), len(CLASSES))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    record = InitWeights.from_params({**params, "train": {"init": "pretrained"}}).apply(fresh)
    assert "no external source" in record["skipped"]
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_init_errors_are_one_line_before_data(tmp_path: Path):
    with pytest.raises(DataError, match="run the pretrain stage"):
        InitWeights.from_params({"train": {"init": "pretrained"}, "pretrain": {"checkpoint": str(tmp_path / "no.pt")}})
    with pytest.raises(DataError, match="no checkpoint file"):
        InitWeights.from_params({"train": {"init": str(tmp_path / "missing.pt")}})
    with pytest.raises(DataError, match="train.init must be one of"):
        InitWeights.from_params({"train": {"init": 3}})
    assert InitWeights.from_params({"train": {}}).kind == "scratch"
    # another backbone: refused by name, not by a torch size-mismatch traceback
    other = Classifier(ModelConfig(backbone="resnet18", pretrained=False, in_chans=1), 3)
    save_checkpoint(tmp_path / "r18.pt", other.state_dict(),
                    {"model": other.cfg.to_dict(), "classes": ["a", "b", "c"]})  # fmt: skip
    model = Classifier(ModelConfig(backbone="mobilenetv3_small_050", pretrained=False, in_chans=1), 4)
    with pytest.raises(DataError, match="model.backbone 'resnet18'"):
        InitWeights.from_params({"train": {"init": str(tmp_path / "r18.pt")}}).apply(model)
    # same backbone, a tensor missing: the keys are listed
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("conv_stem.weight")}
    save_checkpoint(tmp_path / "cut.pt", state, {"model": model.cfg.to_dict(), "classes": ["a"] * 4})
    with pytest.raises(DataError, match=r"does not fit: Missing keys \(1\): conv_stem.weight"):
        InitWeights.from_params({"train": {"init": str(tmp_path / "cut.pt")}}).apply(model)


def test_pretrain_params_are_checked(tmp_path: Path):
    base = {"external": {"sources": {"nih": {}, "vindr": {}}}, "pretrain": {"checkpoint": "x.pt"}}
    assert PretrainConfig.from_params(base).sources == []
    for bad, msg in (({"sources": ["nih", "padchest"]}, r"unknown sources \['padchest'\]"),
                     ({"sources": "nih"}, "must be a list"), ({"epochs": 0}, "epochs must be"),
                     ({"lr": 1}, r"unknown keys \['lr'\]")):  # fmt: skip
        with pytest.raises(DataError, match=msg):
            PretrainConfig.from_params({**base, "pretrain": {"checkpoint": "x.pt", **bad}})


def test_dvc_yaml_declares_exactly_the_params_pretraining_reads():
    """-S loss=asl or -S train.epochs=10 must not re-run pretraining, and what it reads must re-run it."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["pretrain"]
    declared = {p for p in stage["params"] if isinstance(p, str)}
    assert {f"train.{k}" for k in TRAIN_KEYS} | {f"model.{k}" for k in MODEL_KEYS} <= declared
    assert not {"train", "model", "loss", "losses", "sampler"} & declared
    run = PretrainConfig.from_params({"external": {"sources": {}}, "pretrain": {"checkpoint": "x"}}).training_params(
        {"task": "task1", "loss": "asl", "train": {"epochs": 99, "crt": {"epochs": 5}, "init": "pretrained",
                                                   "augment": {"hflip": 0.5}},
         "model": {"backbone": "b", "head": "ml_decoder", "head_args": {"queries": "text"}}})  # fmt: skip
    assert run["loss"] == "bce" and run["train"]["epochs"] == 4 and run["train"]["crt"] == {"epochs": 0}
    assert run["train"]["augment"] == {"hflip": 0.5} and run["model"]["head"] == "linear"
    assert "init" not in run["train"] and run["model"]["backbone"] == "b"
