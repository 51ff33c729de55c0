"""Stage scripts run the way DVC runs them (from the repository root, reading params.yaml).

Bad input must reach the user as one line naming the file or key, exit code 2, and no
traceback; the submission file is named after the task and dvc.yaml declares that path.
A tiny workspace (manifest, cache, checkpoint of a small timm model) lives in tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from test_evaluation import CLASSES, make_info, make_manifest, make_preds

from cxrlt.data.cache import build_cache
from cxrlt.io import write_parquet
from cxrlt.models import ModelConfig, build_model
from cxrlt.stage import run_stage
from cxrlt.submission import submission_path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    ("data", "manifest"): "data/manifest.parquet",
    ("cache", "dir"): "data/cache",
    ("train", "checkpoint"): "models/model.pt",
    ("predict", "out"): "data/predictions.parquet",
    ("fuse", "checkpoint"): "models/fusion.pt",
}


def stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fails_with_one_line(name: str, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """Run a stage like `python stages/<name>.py`; it must exit 2 with one `error:` line."""
    with pytest.raises(SystemExit) as exc:
        run_stage(stage(name).main)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    return err


def set_params(**changes: object) -> None:
    """Edit ./params.yaml: keys like "predict.submission_dir"; None deletes the key."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """params.yaml (the repository's, paths moved here), a Task 2 manifest and its predictions."""
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for (section, key), path in PATHS.items():
        params[section][key] = path
    params["task"] = "task2"
    params["evaluate"]["n_bootstrap"] = 10
    params["predict"]["device"] = "cpu"
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    manifest = make_manifest()
    write_parquet(PATHS["data", "manifest"], manifest)
    write_parquet(PATHS["predict", "out"], make_preds(manifest))
    return tmp_path


def save_tiny_checkpoint(path: str, manifest: pd.DataFrame) -> None:
    """A stage-1 checkpoint and the stage-2 fusion checkpoint built on it (untrained)."""
    from cxrlt.models.fusion import FusionConfig, FusionModel
    from cxrlt.training.fit import save_checkpoint

    cfg = ModelConfig(backbone="resnet10t", head="linear")
    info = {**make_info(manifest), "model": cfg.to_dict()}
    model = build_model(cfg, len(CLASSES))
    save_checkpoint(path, model.state_dict(), info)
    fcfg = FusionConfig(tokens_dim=16, heads=2, ff_dim=16, layers=1, max_views=2,
                        head_args={"dim": 16, "heads": 2, "ff_dim": 16})  # fmt: skip
    fusion = FusionModel(model, fcfg, len(CLASSES))
    save_checkpoint(PATHS["fuse", "checkpoint"], fusion.state_dict(), {**info, "fusion": fcfg.to_dict()})


# --- one line per data problem ----------------------------------------------------------------


def test_evaluate_manifest_missing_a_class_column(workspace, capsys):
    manifest = pd.read_parquet(PATHS["data", "manifest"])
    save_tiny_checkpoint(PATHS["train", "checkpoint"], manifest)
    write_parquet(PATHS["data", "manifest"], manifest.drop(columns=["Hernia"]))
    fails_with_one_line("evaluate", capsys, PATHS["data", "manifest"], "'Hernia'")
    assert not Path("metrics").exists() and not Path("reports").exists()


def test_evaluate_missing_inputs_split_and_params(workspace, capsys):
    manifest = pd.read_parquet(PATHS["data", "manifest"])
    save_tiny_checkpoint(PATHS["train", "checkpoint"], manifest)
    Path(PATHS["predict", "out"]).rename("elsewhere.parquet")
    fails_with_one_line("evaluate", capsys, PATHS["predict", "out"], "not found", "predict.out")
    Path(PATHS["predict", "out"]).write_bytes(b"not parquet")
    fails_with_one_line("evaluate", capsys, PATHS["predict", "out"], "not a readable Parquet")
    Path("elsewhere.parquet").rename(PATHS["predict", "out"])

    # a manifest (and predictions) without the test split that evaluate.splits asks for
    preds = pd.read_parquet(PATHS["predict", "out"])
    write_parquet(PATHS["predict", "out"], preds[preds["split"] != "test"])
    fails_with_one_line("evaluate", capsys, PATHS["predict", "out"], "'test'", "evaluate.splits")

    set_params(**{"evaluate.ci": None})
    fails_with_one_line("evaluate", capsys, "evaluate.ci")
    set_params(**{"evaluate.ci": 0.95, "evaluate.cluster": "hospital_id"})
    fails_with_one_line("evaluate", capsys, PATHS["predict", "out"], "'hospital_id'")


def test_predict_missing_checkpoint_and_manifest(workspace, capsys):
    fails_with_one_line("predict", capsys, PATHS["train", "checkpoint"], "not found")
    save_tiny_checkpoint(PATHS["train", "checkpoint"], pd.read_parquet(PATHS["data", "manifest"]))
    Path(PATHS["data", "manifest"]).unlink()
    fails_with_one_line("predict", capsys, PATHS["data", "manifest"], "data.manifest", "prepare")


def test_train_and_cache_without_a_manifest(workspace, capsys, monkeypatch):
    Path(PATHS["data", "manifest"]).unlink()
    monkeypatch.setattr(sys, "argv", ["stages/cache.py"])
    manifest = PATHS["data", "manifest"]
    fails_with_one_line("cache", capsys, manifest, "not found", "dvc repro prepare")
    fails_with_one_line("train", capsys, PATHS["data", "manifest"], "not found", "data.manifest")


def test_a_missing_params_key_is_named(workspace, capsys):
    save_tiny_checkpoint(PATHS["train", "checkpoint"], pd.read_parquet(PATHS["data", "manifest"]))
    set_params(**{"evaluate.splits": None})
    fails_with_one_line("evaluate", capsys, "params.yaml", "'evaluate.splits'")
    set_params(**{"train.checkpoint": None})
    fails_with_one_line("evaluate", capsys, "params.yaml", "'train.checkpoint'")
    Path("params.yaml").write_text("task: [unclosed\n")
    fails_with_one_line("evaluate", capsys, "params.yaml", "not valid YAML")


@pytest.mark.parametrize(("name", "key"), [
    ("predict", "cache.dir"), ("train", "train.live_dir"), ("fuse", "fuse.checkpoint"),
])  # fmt: skip
def test_every_stage_names_a_missing_params_key(workspace, capsys, name, key):
    """Stages read params with plain indexing; a missing key is still one line naming it."""
    save_tiny_checkpoint(PATHS["train", "checkpoint"], pd.read_parquet(PATHS["data", "manifest"]))
    set_params(**{key: None})
    fails_with_one_line(name, capsys, "params.yaml", f"'{key}'")


# --- the submission follows the task ----------------------------------------------------------


def test_predict_names_the_submission_after_the_task(workspace, capsys):
    manifest = make_manifest()
    keep = manifest.groupby("split").head(6).reset_index(drop=True)  # a few images per split
    Path("img").mkdir()
    paths = []
    for i, image_id in enumerate(keep["image_id"]):
        paths.append(f"img/{image_id}.png")
        Image.fromarray(np.full((20, 24), 10 * i, dtype=np.uint8)).save(paths[-1])
    keep["path"] = paths
    write_parquet(PATHS["data", "manifest"], keep)
    build_cache(keep, PATHS["cache", "dir"], 16, workers=1, partial_dir="data/partial",
                progress=False)  # fmt: skip
    save_tiny_checkpoint(PATHS["train", "checkpoint"], keep)
    run_stage(stage("predict").main)
    assert "submissions/task2_test.csv" in capsys.readouterr().out
    sub = pd.read_csv("submissions/task2_test.csv", dtype={"dicom_id": str})
    assert list(sub.columns) == ["dicom_id", "study_id", *CLASSES]
    assert sorted(sub["dicom_id"]) == sorted(keep.loc[keep["split"] == "test", "image_id"])
    assert not Path("submissions/task1_test.csv").exists()


def test_predict_calibrates_on_val_labels_only(workspace, capsys):
    """Platt at the view-group level: dev/test labels are never read (changing them changes
    nothing), the submitted values differ from the raw image-level ones, and the fit is saved."""
    manifest = make_manifest()
    keep = manifest.groupby("split").head(12).reset_index(drop=True)
    Path("img").mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for image_id in keep["image_id"]:
        paths.append(f"img/{image_id}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(paths[-1])
    keep["path"] = paths
    build_cache(keep, PATHS["cache", "dir"], 16, workers=1, partial_dir="data/partial",
                progress=False)  # fmt: skip
    save_tiny_checkpoint(PATHS["train", "checkpoint"], keep)
    set_params(calibrate="platt", **{"predict.level": "view_group"})
    outputs = []
    for flip in (False, True):
        m = keep.copy()
        if flip:
            held_out = m["split"].isin(["dev", "test"])
            m.loc[held_out, CLASSES] = 1.0 - m.loc[held_out, CLASSES].fillna(0.0)
        write_parquet(PATHS["data", "manifest"], m)
        run_stage(stage("predict").main)
        outputs.append(pd.read_parquet(PATHS["predict", "out"]))
    assert "calibration platt" in capsys.readouterr().out
    pd.testing.assert_frame_equal(outputs[0], outputs[1])
    p_cols = [f"p:{c}" for c in CLASSES]
    image_cols = [f"image:{c}" for c in CLASSES]
    assert not np.allclose(outputs[0][p_cols].to_numpy(), outputs[0][image_cols].to_numpy())
    assert outputs[0].groupby("study_id")[p_cols].nunique().max().max() == 1
    fitted = json.loads(Path(yaml.safe_load(Path("params.yaml").read_text())["predict"]["calibration_out"]).read_text())
    assert fitted["method"] == "platt" and fitted["level"] == "view_group"
    assert set(fitted["per_class"]) == set(CLASSES)
    # the fusion model's study predictions, submitted as they are
    set_params(calibrate="none", **{"predict.level": "fused"})
    run_stage(stage("predict").main)
    fused = pd.read_parquet(PATHS["predict", "out"])
    fused_cols = [f"fused:{c}" for c in CLASSES]
    np.testing.assert_array_equal(fused[p_cols].to_numpy(), fused[fused_cols].to_numpy())
    assert fused.groupby("study_id")[fused_cols].nunique().max().max() == 1
    set_params(calibrate="isotonic")
    fails_with_one_line("predict", capsys, "calibrate", "'isotonic'", "platt")


def _interpolate(text: str, params: dict) -> str:
    """DVC's `${a.b}` substitution from params.yaml (dotted keys only, as dvc.yaml uses)."""

    def value(match: re.Match[str]) -> str:
        node = params
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def test_task3_is_the_zeroshot_stage(workspace, capsys):
    """Task 3 has no training labels: asking the supervised pipeline for it is one line
    that says where its answer comes from; the zeroshot stage declares that file."""
    set_params(task="task3")
    fails_with_one_line("prepare", capsys, "task3", "zeroshot")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    zeroshot = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["zeroshot"]
    outs = [_interpolate(o if isinstance(o, str) else next(iter(o)), params) for o in zeroshot["outs"]]
    assert str(submission_path(params["predict"]["submission_dir"], "task3")) in outs


@pytest.mark.parametrize("task", ["task1", "task2"])
def test_dvc_yaml_declares_the_submission_the_code_writes(task):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["task"] = task
    predict = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["predict"]
    outs = [_interpolate(o if isinstance(o, str) else next(iter(o)), params)
            for o in predict["outs"]]  # fmt: skip
    expected = submission_path(params["predict"]["submission_dir"], task)
    assert str(expected) in outs and expected.name == f"{task}_test.csv"
    assert "task" in predict["params"]  # the stage reads it


def test_no_traceback_reaches_the_user_from_a_stage_process(workspace):
    """The real command line (`python stages/evaluate.py`), as `dvc repro` runs it."""
    import subprocess

    Path(PATHS["data", "manifest"]).unlink()
    save_tiny_checkpoint(PATHS["train", "checkpoint"], make_manifest())
    script = str(ROOT / "stages" / "evaluate.py")
    res = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=workspace)
    assert res.returncode == 2, res.stderr
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert err[-1].startswith("error: ") and PATHS["data", "manifest"] in err[-1]
    assert "Traceback" not in res.stderr
