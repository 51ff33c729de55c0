"""Checkpoint loading refuses anything but weights and plain data; prediction on any device."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlt.data.cache import ImageCache, build_cache
from cxrlt.errors import DataError
from cxrlt.inference import load_checkpoint, predict, resolve_device
from cxrlt.models import Classifier, ModelConfig
from cxrlt.training.fit import save_checkpoint

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion"]
CFG = ModelConfig(backbone="mobilenetv3_small_050", head="linear")


class RunsCode:
    """Unpickling this object calls os.mkdir(marker): what a crafted checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(CFG, len(CLASSES)).eval()


@pytest.fixture(scope="module")
def checkpoint(model: Classifier, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model.state_dict(), {"classes": CLASSES, "model": CFG.to_dict(), "val_mAP": 0.5})
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        paths.append(root / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 40), dtype=np.uint8)).save(paths[-1])
    manifest = pd.DataFrame({"image_id": [f"id{i}" for i in range(20)], "path": map(str, paths)})
    build_cache(manifest, root / "cache", 32, workers=1, progress=False)
    return ImageCache(root / "cache")


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(model, tmp_path: Path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.pt"
    torch.save({"state_dict": model.state_dict(), "model": CFG.to_dict(), "classes": CLASSES,
                "note": RunsCode(marker)}, path)  # fmt: skip
    with pytest.raises(DataError, match=r"crafted\.pt is not a valid cxrlt checkpoint") as err:
        load_checkpoint(path)
    assert not marker.exists()
    assert "\n" not in str(err.value)


def _garbage(path: Path, model: Classifier) -> None:
    path.write_bytes(b"\x00garbage, not a checkpoint" * 40)


def _truncated(path: Path, model: Classifier) -> None:
    save_checkpoint(path, model.state_dict(), {"classes": CLASSES, "model": CFG.to_dict()})
    path.write_bytes(path.read_bytes()[:5000])


def _not_a_dict(path: Path, model: Classifier) -> None:
    torch.save([1, 2, 3], path)


def _missing_keys(path: Path, model: Classifier) -> None:
    torch.save({"state_dict": model.state_dict()}, path)


def _other_weights(path: Path, model: Classifier) -> None:
    other = Classifier(CFG, len(CLASSES) + 2)  # a head of another width
    save_checkpoint(path, other.state_dict(), {"classes": CLASSES, "model": CFG.to_dict()})


def _unknown_config(path: Path, model: Classifier) -> None:
    save_checkpoint(path, model.state_dict(), {"classes": CLASSES, "model": {**CFG.to_dict(), "depth": 3}})


@pytest.mark.parametrize(("write", "reason"), [
    (_garbage, ""), (_truncated, ""), (_not_a_dict, "expected a dict"),
    (_missing_keys, r"missing keys \['model', 'classes'\]"),
    (_other_weights, "do not fit its model config: .*size mismatch"),
    (_unknown_config, "do not fit its model config"),
])  # fmt: skip
def test_an_invalid_checkpoint_is_one_line_naming_the_file(model, tmp_path: Path, write, reason: str):
    path = tmp_path / "bad.pt"
    write(path, model)
    with pytest.raises(DataError, match=rf"bad\.pt is not a valid cxrlt checkpoint.*{reason}") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 500


def test_saved_info_is_plain_data_that_loads_with_weights_only(model, tmp_path: Path):
    info = {"classes": CLASSES, "model": CFG.to_dict(), "val_mAP": np.float32(0.25),
            "train_counts": np.array([3.0, 1.0, 2.0]), "n_train_images": np.int64(9),
            "groups": {"head": (np.int64(0),)}}  # fmt: skip
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), info)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["val_mAP"] == 0.25 and type(raw["val_mAP"]) is float
    assert raw["train_counts"] == [3.0, 1.0, 2.0] and type(raw["n_train_images"]) is int
    assert raw["groups"] == {"head": (0,)}
    _, loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded["classes"] == CLASSES
    with pytest.raises(TypeError, match="checkpoint info.when: .*not plain data"):
        save_checkpoint(tmp_path / "x.pt", model.state_dict(), {**info, "when": pd.Timestamp(0)})


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DataError, match="predict.device: 'gpu please' is not a device"):
        resolve_device("gpu please")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or the first of none
    with pytest.raises(DataError, match=f"predict.device: '{missing}' is not available"):
        resolve_device(missing)
    if not torch.backends.mps.is_available():
        with pytest.raises(DataError, match="'mps' is not available"):
            resolve_device("mps")


def test_predict_on_cpu_is_the_default_path(checkpoint: Path, cache: ImageCache):
    ids = [f"id{i}" for i in range(20)]
    model, _ = load_checkpoint(checkpoint)
    default = predict(model, cache, ids, batch_size=8)
    np.testing.assert_array_equal(predict(model, cache, ids, batch_size=8, device="cpu"), default)
    np.testing.assert_array_equal(predict(model, cache, ids, batch_size=8, device=torch.device("cpu")), default)
    if resolve_device("auto").type == "cpu":
        np.testing.assert_array_equal(predict(model, cache, ids, batch_size=8, device="auto"), default)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_the_gpu_agrees_with_the_cpu(checkpoint: Path, cache: ImageCache):
    ids = [f"id{i}" for i in range(20)]
    model, _ = load_checkpoint(checkpoint)
    cpu = predict(model, cache, ids, batch_size=8, device="cpu", tta_hflip=True)
    gpu = predict(model, cache, ids, batch_size=8, device="cuda", tta_hflip=True)
    # Convolutions may use TF32 on the GPU: agreement to 1e-3, not bit for bit.
    np.testing.assert_allclose(gpu, cpu, atol=1e-3, rtol=0)
    assert next(model.parameters()).device.type == "cuda"
