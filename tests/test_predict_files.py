"""`cxrlt predict` on files: the pipeline's pixels and probabilities, DICOM included; skipping,
--strict, folder walking, batch size; the checkpoint's preprocessing record."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlt.cli import main
from cxrlt.data.cache import PREPROCESSING_FORMAT, ImageCache, Preprocessing, build_cache
from cxrlt.data.files import find_images, load_image
from cxrlt.errors import DataError
from cxrlt.inference import predict
from cxrlt.models import Classifier, ModelConfig
from cxrlt.predict_files import predict_files
from cxrlt.training.fit import save_checkpoint

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "No Finding"]
CFG = ModelConfig(backbone="mobilenetv3_small_050", head="linear")
SIZE = 32
COLUMNS = [f"image:{c}" for c in CLASSES]


def _model() -> Classifier:
    torch.manual_seed(0)
    model = Classifier(CFG, len(CLASSES)).eval()
    with torch.no_grad():  # larger head weights: the probabilities vary clearly between images
        for name, p in model.named_parameters():
            if "head" in name:
                p.mul_(40.0)
    return model


def _save(path: Path, model: Classifier, pre: Preprocessing | None) -> Path:
    info = {"classes": CLASSES, "model": CFG.to_dict()}
    if pre is not None:
        info["preprocessing"] = pre.to_dict()
    save_checkpoint(path, model.state_dict(), info)
    return path


def _write_images(root: Path) -> list[Path]:
    """8-bit PNGs, RGB and gray JPEGs large enough for draft decoding, a 16-bit PNG, in
    nested folders."""
    rng = np.random.default_rng(0)
    paths = []

    def smooth(h: int, w: int) -> np.ndarray:
        # structure at several scales, so resizing and JPEG decoding matter
        y, x = np.mgrid[0:h, 0:w]
        base = 128 + 60 * np.sin(x / (5 + rng.integers(0, 20))) * np.cos(y / (4 + rng.integers(0, 20)))
        return np.clip(base + rng.normal(0, 25, (h, w)), 0, 255)

    for i, (h, w) in enumerate([(48, 40), (40, 64), (33, 33)]):
        paths.append(root / "png" / f"a{i}.png")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth(h, w).astype(np.uint8)).save(paths[-1])
    for i, (h, w) in enumerate([(300, 260), (200, 310)]):
        paths.append(root / "jpg" / "deep" / f"b{i}.jpg")
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth(h, w).astype(np.uint8)).save(paths[-1], quality=90)
    rgb = np.stack([smooth(120, 100), smooth(120, 100), smooth(120, 100)], -1).astype(np.uint8)
    paths.append(root / "jpg" / "rgb.JPEG")
    Image.fromarray(rgb).save(paths[-1])
    paths.append(root / "png" / "wide16.png")
    Image.fromarray((smooth(50, 70) * 200).astype(np.uint16)).save(paths[-1])
    paths.append(root / "png" / "rgb.png")
    Image.fromarray(rgb).save(paths[-1])
    return paths


def _pipeline(paths: list[Path], cache_dir: Path, model: Classifier, pre: Preprocessing) -> np.ndarray:
    """The pipeline's own path: cache builder, then `inference.predict` on the cache."""
    ids = [f"id{i}" for i in range(len(paths))]
    manifest = pd.DataFrame({"image_id": ids, "path": [str(p) for p in paths]})
    build_cache(manifest, cache_dir, pre.size, workers=1, progress=False, bits_stored=pre.bits_stored)
    return predict(model, ImageCache(cache_dir), ids, batch_size=128, device="cpu")


def _read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    model = _model()
    pre = Preprocessing(SIZE)
    images = _write_images(root / "images")
    expected = _pipeline(images, root / "cache", model, pre)
    return {"root": root, "model": model, "pre": pre, "ckpt": _save(root / "stage1.pt", model, pre),
            "images": images, "expected": expected, "cache": ImageCache(root / "cache")}  # fmt: skip


@pytest.mark.parametrize("decoder", ["cv2", "turbo"])
def test_the_recorded_decoder_is_the_one_used(setup, tmp_path: Path, decoder: str):
    """A model trained on a `cache.decoder: cv2` (or `turbo`) cache records it, and its files
    get that cache's pixels (area resize), not the default decoder's."""
    images = setup["images"]
    manifest = pd.DataFrame({"image_id": [f"id{i}" for i in range(len(images))], "path": [str(p) for p in images]})
    build_cache(manifest, tmp_path / decoder, SIZE, workers=1, progress=False, decoder=decoder)
    cv2_cache = ImageCache(tmp_path / decoder)
    pre = Preprocessing.from_checkpoint({"preprocessing": Preprocessing(SIZE, decoder=decoder).to_dict()}, "m.pt")
    assert pre.decoder == decoder
    differ = 0
    for i, path in enumerate(images):
        got = load_image(path, pre)
        np.testing.assert_array_equal(got, cv2_cache.read([i])[0], err_msg=str(path))
        differ += not np.array_equal(got, setup["cache"].read([i])[0])
    assert differ  # the two decoders do give different pixels on these files
    with pytest.raises(DataError, match="decoder"):
        Preprocessing.from_checkpoint({"preprocessing": {**pre.to_dict(), "decoder": "magic"}}, "m.pt")


def test_files_get_the_pipelines_pixels_and_probabilities(setup, tmp_path: Path, capsys):
    images, cache = setup["images"], setup["cache"]
    for i, path in enumerate(images):  # the very pixels the cache holds
        np.testing.assert_array_equal(load_image(path, setup["pre"]), cache.images[i], err_msg=str(path))
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(setup["ckpt"]), "--out", str(out), "--device", "cpu",
                 "--no-progress", *map(str, images)]) == 0  # fmt: skip
    table = _read(out)
    assert list(table.columns) == ["path", "error", *COLUMNS]
    assert table["path"].tolist() == [str(p) for p in images] and table["error"].isna().all()
    got = table[COLUMNS].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(got, setup["expected"], rtol=0, atol=1e-6)
    assert np.ptp(setup["expected"], axis=0).min() > 1e-3  # outputs differ between images far beyond the tolerance
    assert f"{len(images)} images scored, 0 skipped" in capsys.readouterr().out


# 8- and 16-bit conversions give the same pixels when bits_stored is 16; with 12 they do not
# (the 16-bit PNG is read as 12-bit and clips), so (8, 12) shows the recorded depth is used.
@pytest.mark.parametrize(("dicom_bits", "bits_stored"), [(16, 16), (8, 12)])
def test_dicom_goes_through_the_pipelines_conversion(setup, tmp_path: Path, dicom_bits: int, bits_stored: int):
    from cxrlt.data.dicom import convert_dicoms

    data = pytest.importorskip("pydicom.data")
    names = ["RG1_UNCI.dcm", "RG3_UNCI.dcm", "CT_small.dcm"]  # MONOCHROME1 CR, windowed CR, rescaled CT
    sources = [data.get_testdata_file(n, download=False) for n in names]
    if None in sources:
        pytest.skip("pydicom-data test files not available offline")
    folder = tmp_path / "dicoms"
    folder.mkdir()
    dicoms = [Path(shutil.copy(s, folder / n)) for s, n in zip(sources, names, strict=True)]
    dicoms.append(Path(shutil.copy(dicoms[2], folder / "IM0001")))  # no suffix: found by its marker
    pre = Preprocessing(SIZE, bits_stored=bits_stored, dicom_bits=dicom_bits)
    ckpt = _save(tmp_path / "m.pt", setup["model"], pre)
    # the pipeline: DICOM -> PNG (convert_vindr), PNG -> cache, predict on the cache
    pngs = convert_dicoms(dicoms[:3], tmp_path / "png", bits=dicom_bits, workers=1, progress=False)
    assert not pngs.failed
    expected = _pipeline([tmp_path / "png" / (Path(n).stem + ".png") for n in names], tmp_path / "cache",
                         setup["model"], pre)  # fmt: skip
    cache = ImageCache(tmp_path / "cache")
    for i, path in enumerate(dicoms[:3]):  # the very pixels the pipeline caches
        np.testing.assert_array_equal(load_image(path, pre), cache.images[i], err_msg=str(path))
    out = tmp_path / "pred.csv"
    report = predict_files(ckpt, [folder], out, device="cpu", progress=False)
    table = _read(out)
    assert report.scored == 4 and table["path"].tolist() == [str(folder / n) for n in ["CT_small.dcm", "IM0001",
                                                                                       "RG1_UNCI.dcm", "RG3_UNCI.dcm"]]
    got = table.set_index("path").loc[[str(d) for d in dicoms], COLUMNS].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(got[:3], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[3], got[2])


def test_unreadable_files_are_skipped_and_listed_or_fail_with_strict(setup, tmp_path: Path, capsys):
    good = setup["images"][:2]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(setup["images"][3].read_bytes()[:400])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    inputs = [good[0], truncated, not_image, good[1]]
    out = tmp_path / "pred.csv"
    args = ["predict", "--model", str(setup["ckpt"]), "--out", str(out), "--device", "cpu", "--no-progress",
            "--batch-size", "3", *map(str, inputs)]  # fmt: skip
    assert main(args) == 0
    table = _read(out)
    assert table["path"].tolist() == [str(p) for p in inputs]
    assert table["error"].isna().tolist() == [True, False, False, True]
    assert "UnidentifiedImageError" in table.loc[2, "error"]
    assert table.loc[[1, 2], COLUMNS].isna().all().all()
    np.testing.assert_allclose(table.loc[[0, 3], COLUMNS].to_numpy(dtype=np.float64), setup["expected"][:2],
                               rtol=0, atol=1e-6)  # fmt: skip
    err = capsys.readouterr().err
    assert f"skipped {truncated}: " in err and f"skipped {not_image}: " in err

    out.unlink()
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {truncated}: unreadable (") and err.endswith("nothing written (--strict)")
    assert "\n" not in err and not out.exists() and not list(tmp_path.glob(".pred.csv*"))


def test_a_folder_is_walked_recursively(setup, tmp_path: Path):
    root = setup["root"] / "images"
    (root / ".hidden").mkdir(exist_ok=True)
    shutil.copy(setup["images"][0], root / ".hidden" / "x.png")
    (root / "png" / "readme.txt").write_text("not an image")
    found = find_images([root, setup["images"][0]])  # a file met twice is scored once
    assert found == sorted(setup["images"])
    out = tmp_path / "pred.csv"
    predict_files(setup["ckpt"], [root], out, device="cpu", progress=False)
    table = _read(out).set_index("path")
    got = table.loc[[str(p) for p in setup["images"]], COLUMNS].to_numpy(dtype=np.float64)
    np.testing.assert_allclose(got, setup["expected"], rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="no such file or folder"):
        find_images([root / "missing"])


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (4, 0), (3, 2)])
def test_results_do_not_depend_on_batch_size_or_workers(setup, tmp_path: Path, batch_size: int, workers: int):
    out = tmp_path / "pred.csv"
    predict_files(setup["ckpt"], setup["images"], out, batch_size=batch_size, workers=workers, device="cpu",
                  progress=False)  # fmt: skip
    np.testing.assert_allclose(_read(out)[COLUMNS].to_numpy(dtype=np.float64), setup["expected"], rtol=0, atol=1e-6)


def test_a_checkpoint_without_or_with_a_newer_preprocessing_record_is_one_line(setup, tmp_path: Path, capsys):
    old = _save(tmp_path / "old.pt", setup["model"], None)
    out = tmp_path / "pred.csv"
    assert main(["predict", "--model", str(old), "--out", str(out), str(setup["images"][0])]) == 2
    err = capsys.readouterr().err.strip()
    assert "old.pt has no preprocessing record" in err and "dvc repro train" in err and "\n" not in err
    newer = {**setup["pre"].to_dict(), "format": PREPROCESSING_FORMAT + 1}
    save_checkpoint(tmp_path / "new.pt", setup["model"].state_dict(),
                    {"classes": CLASSES, "model": CFG.to_dict(), "preprocessing": newer})  # fmt: skip
    with pytest.raises(DataError, match=r"new\.pt: preprocessing format 2 is newer"):
        predict_files(tmp_path / "new.pt", setup["images"][:1], out, device="cpu", progress=False)
    bad = {**setup["pre"].to_dict(), "size": "32"}
    save_checkpoint(tmp_path / "bad.pt", setup["model"].state_dict(),
                    {"classes": CLASSES, "model": CFG.to_dict(), "preprocessing": bad})  # fmt: skip
    with pytest.raises(DataError, match=r"bad\.pt: preprocessing\.size is '32'"):
        predict_files(tmp_path / "bad.pt", setup["images"][:1], out, device="cpu", progress=False)
    assert not out.exists()


def test_the_record_round_trips_and_bad_params_are_named():
    pre = Preprocessing.from_params({"cache": {"bits_stored": 12}, "external": {"dicom": {"bits": 8}}}, 64)
    assert pre == Preprocessing(64, 12, 8)
    assert Preprocessing.from_checkpoint({"preprocessing": pre.to_dict()}, "x") == pre
    assert Preprocessing.from_params({}, 64) == Preprocessing(64, 16, 16)  # the builders' defaults
    with pytest.raises(DataError, match="external.dicom.bits"):
        Preprocessing.from_params({"external": {"dicom": {"bits": 12}}}, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_names_the_option(setup, tmp_path: Path, capsys):
    args = ["predict", "--model", str(setup["ckpt"]), "--out", str(tmp_path / "p.csv"), "--device", "cuda:0",
            str(setup["images"][0])]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: --device: 'cuda:0' is not available")
