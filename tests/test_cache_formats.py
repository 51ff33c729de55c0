"""The fast decoder and the compressed cache formats: equivalence with the reference path and
the raw cache (stated tolerances, exact for PNG), resumable atomic builds, and every reader
(training dataset, cRT features, prediction, stage 2) going through `ImageCache.read`."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_cache import _manifest, _write  # the same image-file and manifest helpers

from cxrlt.data.cache import (
    ImageCache,
    build_cache,
    decode_jpeg_batch,
    load_resized,
    load_resized_cv2,
    load_resized_turbo,
)
from cxrlt.errors import DataError
from cxrlt.speed import reference_resized

# Tolerances, in grey levels (0-255), on band-limited content (structure coarser than an
# output pixel). The reference (LANCZOS4 without antialiasing) aliases detail finer than that;
# the cache's area/antialiased resizes average it, so noise is where the two paths differ.
REF_MEAN_ABS = 1.0  # mean |cache - reference| over the image
REF_P999_ABS = 4  # 99.9th percentile
JPEG_MEAN_ABS = 1.0  # mean |jpeg cache - raw cache| at quality 95
JPEG_MAX_ABS = 12


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 110 + 60 * np.sin(xx / 90 + seed) * np.cos(yy / 110) + 40 * np.exp(-((xx - w / 2) / (w / 5)) ** 2)
    return (img + rng.normal(0, 1.0, img.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [128, 256, 512, 1024])
def test_every_decoder_matches_the_reference_path_within_tolerance(tmp_path: Path, size: int):
    """2,000 x 1,600 originals: DCT reduction 1/8 (128 px), 1/4 (256), 1/2 (512; `turbo`: 3/8,
    a 750 px long side area-averaged to 512), none (1024; `turbo`: 5/8, 1,250 px, bilinear)."""
    p = _write(tmp_path / "big.jpg", _smooth(2000, 1600))
    ref = reference_resized(p, size, str(tmp_path / "ref.jpg")).astype(int)
    assert (tmp_path / "ref.jpg").exists()
    for load in (load_resized, load_resized_cv2, load_resized_turbo):
        out = load(p, size).astype(int)
        assert out.shape == ref.shape == (size, size)
        # Same geometry: the padding columns are zero in both.
        np.testing.assert_array_equal(out == 0, ref == 0)
        diff = np.abs(out - ref)
        assert diff.mean() <= REF_MEAN_ABS, (load.__name__, diff.mean())
        assert np.percentile(diff, 99.9) <= REF_P999_ABS, (load.__name__, np.percentile(diff, 99.9))


@pytest.mark.parametrize("load", [load_resized_cv2, load_resized_turbo])
def test_fast_decoders_handle_what_the_pil_decoder_does(tmp_path: Path, load):
    """Aspect and padding, colour JPEGs, small originals (enlarged), 16-bit PNGs by declared depth."""
    wide = _write(tmp_path / "w.png", np.full((100, 200), 200, np.uint8), "PNG")
    np.testing.assert_array_equal(load(wide, 64), load_resized(wide, 64))
    colour = np.stack([_smooth(300, 240)] * 3, axis=-1)
    c = _write(tmp_path / "c.jpg", colour)
    assert np.abs(load(c, 128).astype(int) - load_resized(c, 128)).mean() <= REF_MEAN_ABS
    small = _write(tmp_path / "s.jpg", _smooth(100, 80))
    assert np.abs(load(small, 200).astype(int) - load_resized(small, 200)).mean() <= 2.0
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    twelve = _write(tmp_path / "twelve.png", ramp, "PNG")
    np.testing.assert_array_equal(load(twelve, 64, 12), load_resized(twelve, 64, 12))


@pytest.mark.parametrize("decoder", ["cv2", "turbo"])
def test_fast_decoders_refuse_truncated_and_garbage_jpegs(tmp_path: Path, decoder: str):
    good = Path(_write(tmp_path / "g.jpg", _smooth(400, 300))).read_bytes()
    (tmp_path / "t.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    load = {"cv2": load_resized_cv2, "turbo": load_resized_turbo}[decoder]
    with pytest.raises((OSError, ValueError)):
        load(tmp_path / "t.jpg", 64)
    paths = [str(tmp_path / n) for n in ("g.jpg", "t.jpg", "x.jpg")]
    with pytest.raises(DataError, match=r"2 unreadable images[\s\S]*t\.jpg[\s\S]*x\.jpg"):
        build_cache(_manifest(paths), tmp_path / "cache", 32, workers=1, progress=False, decoder=decoder)


def test_turbo_decodes_below_half_scale_with_the_other_decoders_geometry(tmp_path: Path):
    """A 3,000 x 2,500 original to 1,024 px: PIL and OpenCV stop at 1/2 (1,500 px); turbo
    decodes at 3/8 (1,125 px), yet its padding columns, hence its width, are theirs."""
    p = _write(tmp_path / "big.jpg", _smooth(3000, 2500))
    import simplejpeg

    data = Path(p).read_bytes()
    assert simplejpeg.decode_jpeg(data, colorspace="GRAY", min_height=1024, min_width=853).shape[:2] == (1125, 938)
    turbo, pil = load_resized_turbo(p, 1024).astype(int), load_resized(p, 1024).astype(int)
    np.testing.assert_array_equal(turbo == 0, pil == 0)
    assert np.abs(turbo - pil).mean() <= REF_MEAN_ABS


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("originals")
    paths = [_write(root / f"{i}.jpg", _smooth(90 + 7 * i, 70 + 3 * i, seed=i)) for i in range(11)]
    (root / "bad.jpg").write_bytes(b"not an image")
    return paths[:5] + [str(root / "bad.jpg")] + paths[5:]


def test_compressed_reads_equal_the_raw_cache(images: list[str], tmp_path: Path):
    """PNG exactly; JPEG (quality 95) within its tolerance; unreadable rows are zeros in all;
    the batched torchvision decode (the CUDA path, run on the CPU here) equals `read`."""
    m = _manifest(images)
    caches = {}
    for fmt in ("raw", "png", "jpeg"):
        build_cache(m, tmp_path / fmt, 48, workers=2 if fmt == "jpeg" else 1, chunk=3, on_error="skip", progress=False,
                    partial_dir=tmp_path / "partial", fmt=fmt)  # fmt: skip
        caches[fmt] = ImageCache(tmp_path / fmt)
    raw, png, jpeg = caches["raw"], caches["png"], caches["jpeg"]
    assert (png.format, jpeg.format, raw.format) == ("png", "jpeg", "raw")
    # what a resumable training run keys its saved state on exists for every format
    from cxrlt.training.resume import cache_identity

    ids = {fmt: cache_identity(tmp_path / fmt) for fmt in caches}
    assert "images.npy" in ids["raw"] and "images.bin" in ids["jpeg"] and "offsets.npy" in ids["png"]
    assert len({str(v) for v in ids.values()}) == 3
    assert not (tmp_path / "jpeg" / "images.npy").exists() and not list((tmp_path / "partial").iterdir())
    rows = raw.rows(m["image_id"].sample(frac=1, random_state=0))  # out of file order
    expected = raw.read(rows)
    assert expected.shape == (12, 48, 48)
    np.testing.assert_array_equal(png.read(rows), expected)
    got = jpeg.read(rows).astype(int)
    assert np.abs(got - expected).mean() <= JPEG_MEAN_ABS and np.abs(got - expected).max() <= JPEG_MAX_ABS
    bad = int(raw.rows(["id5"])[0])
    assert not jpeg.ok["id5"] and (jpeg.read([bad]) == 0).all() and (raw.read([bad]) == 0).all()
    batched = decode_jpeg_batch(jpeg.blobs(rows), 48, "cpu").numpy().astype(int)
    assert np.abs(batched - got).max() <= 1  # two libjpeg builds: at most a rounding step apart
    np.testing.assert_array_equal(jpeg.read_tensor(rows, "cpu").numpy(), jpeg.read(rows))
    np.testing.assert_array_equal(raw.read_tensor(rows, "cpu").numpy(), expected)
    # Loader workers get the cache by pickle: they reopen the folder, not a copy of the pixels.
    assert len(pickle.dumps(jpeg)) < 1000
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(jpeg)).read(rows), jpeg.read(rows))
    report = json.loads((tmp_path / "jpeg" / "report.json").read_text())
    assert report["format"] == "jpeg" and report["quality"] == 95
    assert json.loads((tmp_path / "raw" / "report.json").read_text()).keys() == {"n_images", "size", "failed"}
    with pytest.raises(DataError, match="ImageCache.read"):
        jpeg.images  # noqa: B018


def test_compressed_build_fails_atomically_then_resumes(images: list[str], tmp_path: Path):
    """A failed build leaves no output; the retry reads only what was not done, drops bytes
    written after the last checkpoint, and ends equal to a fresh build."""
    m = _manifest(images)
    out, partial = tmp_path / "cache", tmp_path / "partial"
    with pytest.raises(DataError, match="1 unreadable images"):
        build_cache(m, out, 40, workers=1, chunk=2, progress=False, partial_dir=partial, fmt="png")
    assert not out.exists()
    (bin_path,) = partial.glob("*.bin")
    with open(bin_path, "ab") as f:
        f.write(b"bytes of a chunk whose checkpoint never came")
    Path(images[5]).write_bytes(Path(images[4]).read_bytes())  # the bad image, re-downloaded
    try:
        report = build_cache(m, out, 40, workers=1, chunk=2, progress=False, partial_dir=partial, fmt="png")
    finally:
        Path(images[5]).write_bytes(b"not an image")
    assert report.resumed_from == 11 and report.failed == []
    fresh = tmp_path / "fresh"
    build_cache(m.drop(index=5), fresh, 40, workers=2, chunk=3, progress=False, partial_dir=partial,
                fmt="png")  # fmt: skip
    got, want = ImageCache(out), ImageCache(fresh)
    ids = m["image_id"].drop(index=5)
    np.testing.assert_array_equal(got.read(got.rows(ids)), want.read(want.rows(ids)))
    np.testing.assert_array_equal(got.read(got.rows(["id5"])), want.read(want.rows(["id4"])))
    assert not list(partial.iterdir())


def test_bad_format_decoder_quality_are_one_line_errors(images: list[str], tmp_path: Path):
    m = _manifest(images[:2])
    for kwargs, message in (({"fmt": "webp"}, "cache.format"), ({"decoder": "magic"}, "cache.decoder"),
                            ({"fmt": "jpeg", "quality": 0}, "cache.quality")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            build_cache(m, tmp_path / "c", 16, progress=False, **kwargs)


@pytest.fixture(scope="module")
def synth_caches(tiny_synth: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """The built-in data's tiny layout, a few dozen images per split, cached in each format."""
    from cxrlt.data.mimic import read_cxrlt
    from cxrlt.data.splits import patient_val_split
    from cxrlt.labels import TASK1_CLASSES

    df = read_cxrlt(tiny_synth / "cxr-lt-2024", tiny_synth / "mimic-cxr-jpg", "task1")
    df["split"] = patient_val_split(df, list(TASK1_CLASSES), 0.2, seed=0)
    df = df.groupby("split", group_keys=False).head(24).reset_index(drop=True)
    root = tmp_path_factory.mktemp("caches")
    for fmt in ("jpeg", "png", "raw"):
        build_cache(df, root / fmt, 32, workers=1, progress=False, partial_dir=root / "p", decoder="cv2", fmt=fmt)
    return df, root


def test_prediction_and_training_reads_go_through_a_jpeg_cache(synth_caches):
    """Every reader with `cache.format: jpeg`: the training dataset, cRT's features, prediction
    and stage 2's image reads see the decoded pixels; a png cache predicts exactly as raw."""
    from cxrlt.inference import _read_images, predict
    from cxrlt.labels import TASK1_CLASSES
    from cxrlt.models import ModelConfig, build_model
    from cxrlt.training.crt import head_inputs
    from cxrlt.training.data import CachedImages, make_loader

    df, root = synth_caches
    classes = list(TASK1_CLASSES)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenetv3_small_050"), len(classes)).eval()
    jpeg, png, raw = (ImageCache(root / f) for f in ("jpeg", "png", "raw"))
    ids = df.loc[df["split"] == "test", "image_id"].tolist()[::-1]
    x = torch.from_numpy(jpeg.read(jpeg.rows(ids)))
    with torch.inference_mode():
        direct = torch.sigmoid(model(x).float()).numpy()
    np.testing.assert_allclose(predict(model, jpeg, ids, batch_size=5), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(predict(model, png, ids, batch_size=5), predict(model, raw, ids, batch_size=5))
    np.testing.assert_array_equal(_read_images(jpeg, ids), x.numpy())
    data = CachedImages(jpeg, df[df["image_id"].isin(ids)], classes)
    batch = next(iter(make_loader(data, 4, False, 0, seed=0)))
    np.testing.assert_array_equal(batch["image"].numpy(), jpeg.read(data.rows[:4]))
    feats = head_inputs(model, data, batch_size=3)
    with torch.no_grad():
        want = model.features(model.normalise(torch.from_numpy(jpeg.read(data.rows)))).mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(feats, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_stage_1_trains_on_a_jpeg_cache(synth_caches, tmp_path: Path):
    """`fit` (Lightning loop, loaders, validation, checkpoint) on a jpeg cache (~1-2 min on 2 shared cores)."""
    from cxrlt.labels import TASK1_CLASSES
    from cxrlt.training.fit import fit

    df, root = synth_caches
    params = {"seed": 7, "loss": "bce",
              "model": {"backbone": "mobilenetv3_small_050", "pretrained": False, "head": "linear"},
              "train": {"epochs": 1, "batch_size": 16, "progress_bar": False, "limit_train_batches": 2,
                        "optim": {"lr": 0.003}, "state_dir": str(tmp_path / "state")}}  # fmt: skip
    info = fit(df, list(TASK1_CLASSES), root / "jpeg", params, tmp_path / "m.pt")
    assert info["n_train_images"] == int((df["split"] == "train").sum()) and (tmp_path / "m.pt").exists()
