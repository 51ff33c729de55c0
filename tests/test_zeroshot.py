"""Zero-shot Task 3: a head trained on Task 1 labels scores five findings it never saw from
their names; Task 3 labels only measure it; its submission is what `cxrlt score` accepts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlt import scoring
from cxrlt.data.cache import build_cache
from cxrlt.data.mimic import read_cxrlt
from cxrlt.data.splits import patient_val_split
from cxrlt.errors import DataError
from cxrlt.io import write_parquet
from cxrlt.labels import TASK1_CLASSES, TASK3_CLASSES
from cxrlt.text.embeddings import LabelEmbeddings, save_label_embeddings
from cxrlt.training.fit import fit
from cxrlt.zeroshot import ZeroShotConfig, build_head, fit_zeroshot, run, score

CLASSES = list(TASK1_CLASSES)
HEAD = {"epochs": 2, "batch_size": 16, "dim": 16, "heads": 2, "ff_dim": 32, "feature_batch_size": 32}


@pytest.fixture(scope="module")
def workdir(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny dataset's labels (so tests may edit them), its manifest, cache,
    a one-epoch stage-1 model and random label embeddings for all 45 names."""
    tmp = tmp_path_factory.mktemp("zeroshot")
    labels = tmp / "cxr-lt-2024"
    shutil.copytree(tiny_synth / "cxr-lt-2024", labels)
    df = read_cxrlt(labels, tiny_synth / "mimic-cxr-jpg", "task1")
    df["split"] = patient_val_split(df, CLASSES, 0.2, seed=0)
    write_parquet(tmp / "manifest.parquet", df)
    build_cache(df, tmp / "cache", 64, workers=1, progress=False)
    params = {
        "seed": 1, "loss": "bce", "losses": {},
        "model": {"backbone": "mobilenetv3_small_050", "pretrained": False, "head": "linear"},
        "train": {"epochs": 1, "batch_size": 16, "progress_bar": False, "limit_train_batches": 3},
    }  # fmt: skip
    fit(df, CLASSES, tmp / "cache", params, tmp / "stage1.pt")
    names = (*TASK1_CLASSES, *TASK3_CLASSES)
    vectors = torch.nn.functional.normalize(torch.randn(len(names), 24, generator=torch.Generator().manual_seed(0)), dim=1)
    save_label_embeddings(tmp / "labels.safetensors", LabelEmbeddings(names, vectors, {"encoder": "random (test)"}))
    return tmp


def _params(d: Path, out: Path) -> dict:
    return {
        "seed": 0,
        "train": {"checkpoint": str(d / "stage1.pt")},
        "text": {"out": str(d / "labels.safetensors")},
        "data": {"manifest": str(d / "manifest.parquet"), "cxrlt_root": str(d / "cxr-lt-2024")},
        "cache": {"dir": str(d / "cache")},
        "evaluate": {"cluster": "study_id", "n_bootstrap": 20, "ci": 0.95, "ci_method": "percentile"},
        "predict": {"submission_dir": str(out / "submissions")},
        "zeroshot": {"checkpoint": str(out / "zs.pt"), "predictions": str(out / "task3.parquet"),
                     "report": str(out / "report.json"), "metrics_dir": str(out / "metrics"), "head": HEAD},
    }  # fmt: skip


def test_task3_labels_never_reach_the_zero_shot_model(workdir: Path, tmp_path: Path):
    """Flipping every Task 3 label in dev and test changes the metrics, never a probability."""
    first = run(_params(workdir, tmp_path / "a"))
    sub_a = pd.read_csv(tmp_path / "a" / "submissions" / "task3_test.csv")
    assert list(sub_a.columns) == ["dicom_id", "study_id", *TASK3_CLASSES]
    flipped = tmp_path / "flipped"
    shutil.copytree(workdir, flipped, ignore=shutil.ignore_patterns("cache"))
    (flipped / "cache").symlink_to(workdir / "cache")
    for name in ("development_labeled_task3.csv", "test_labeled_task3.csv"):
        f = flipped / "cxr-lt-2024" / name
        t = pd.read_csv(f)
        t[list(TASK3_CLASSES)] = 1 - t[list(TASK3_CLASSES)]
        t.to_csv(f, index=False)
    second = run(_params(flipped, tmp_path / "b"))
    sub_b = pd.read_csv(tmp_path / "b" / "submissions" / "task3_test.csv")
    pd.testing.assert_frame_equal(sub_a, sub_b)
    heads = [torch.load(tmp_path / d / "zs.pt", weights_only=True)["state_dict"] for d in ("a", "b")]
    for k, v in heads[0].items():
        assert torch.equal(v, heads[1][k]), k
    assert first["val_mAP"] == second["val_mAP"]
    assert first["test_mAP"] != second["test_mAP"]  # the labels did change what is measured
    # the submission is what the offline scorer takes for Task 3
    r = scoring.score(workdir / "cxr-lt-2024" / "test_labeled_task3.csv",
                      tmp_path / "a" / "submissions" / "task3_test.csv", "task3", n_bootstrap=0)  # fmt: skip
    assert r["mAP"] == pytest.approx(first["test_mAP"])


def test_a_label_set_never_trained_on_is_scored_per_image():
    """Trained with 6 text queries, the head scores 3 other names; an image's score does not
    depend on which images share its batch."""
    g = torch.Generator().manual_seed(0)
    feats, val = torch.randn(40, 8, 3, 3, generator=g), torch.randn(12, 8, 3, 3, generator=g)
    y = (torch.rand(40, 6, generator=g) < 0.3).float().numpy()
    y[0, 0] = np.nan  # unknown: masked
    y_val = (torch.rand(12, 6, generator=g) < 0.3).float().numpy()
    seen, unseen = torch.randn(6, 10, generator=g), torch.randn(3, 10, generator=g)
    cfg = ZeroShotConfig(epochs=2, batch_size=8, dim=8, heads=2, ff_dim=16)
    head, info = fit_zeroshot(feats, y, val, y_val, seen, cfg, seed=0, device=torch.device("cpu"))
    assert len(info["history"]) == 2 and info["val_mAP"] == max(info["history"])
    p_all = score(head, val, unseen, batch_size=512)
    p_one = score(head, val, unseen, batch_size=1)
    assert p_all.shape == (12, 3)
    np.testing.assert_allclose(p_all, p_one, rtol=0, atol=1e-6)
    # another label set changes only the query buffer, not a trained weight; a name's score
    # does not depend on which other names are scored with it
    weights = {k: v.clone() for k, v in head.state_dict().items() if k != "query_embeddings"}
    assert score(head, val, seen).shape == (12, 6)
    for k, v in head.state_dict().items():
        if k != "query_embeddings":
            assert torch.equal(v, weights[k]), k
    np.testing.assert_allclose(score(head, val, unseen[1:]), p_all[:, 1:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="width"):
        score(head, val, torch.randn(3, 11))


def test_bad_zero_shot_settings_are_one_clear_error():
    with pytest.raises(DataError, match="unknown keys"):
        ZeroShotConfig.from_params({"epoch": 3})
    with pytest.raises(DataError, match="zeroshot.dim"):
        ZeroShotConfig.from_params({"dim": 10, "heads": 4})
    assert build_head(8, torch.randn(5, 4), ZeroShotConfig(dim=8, heads=2)).num_classes == 5
