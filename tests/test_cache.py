"""cache: aspect kept + padding, draft decoding, resumable, corrupt-image policy, atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlt.data.cache import ImageCache, build_cache, load_resized
from cxrlt.errors import DataError


def _write(path: Path, array: np.ndarray, fmt: str = "JPEG") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return str(path)


def _manifest(paths: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [f"id{i}" for i in range(len(paths))], "path": paths})


def test_aspect_kept_and_padded(tmp_path: Path):
    wide = np.full((100, 200), 200, np.uint8)  # landscape: pads top and bottom
    out = load_resized(_write(tmp_path / "w.png", wide, "PNG"), 64)
    assert out.shape == (64, 64)
    assert (out[:16] == 0).all() and (out[-16:] == 0).all() and (out[17:47] == 200).all()
    tall = np.full((300, 150), 90, np.uint8)
    out = load_resized(_write(tmp_path / "t.png", tall, "PNG"), 64)
    assert (out[:, :16] == 0).all() and (out[:, 17:47] == 90).all()


def test_draft_decoding_matches_full_decode(tmp_path: Path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1024, 0:800]
    img = (128 + 60 * np.sin(xx / 60) * np.cos(yy / 80) + rng.normal(0, 3, xx.shape)).clip(0, 255)
    p = _write(tmp_path / "big.jpg", img.astype(np.uint8))
    fast = load_resized(p, 128).astype(float)
    with Image.open(p) as im:
        full = im.convert("L").resize((100, 128), Image.Resampling.LANCZOS)
    ref = np.zeros((128, 128))
    ref[:, 14:114] = np.asarray(full, dtype=float)
    assert np.abs(fast - ref)[:, 16:112].mean() < 3.0


def test_sixteen_bit_png(tmp_path: Path):
    a = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    p = tmp_path / "x.png"
    Image.fromarray(a).save(p)
    out = load_resized(p, 64)
    assert out[0, 0] == 0 and out[-1, -1] == 255


def test_build_and_read(tmp_path: Path):
    paths = [_write(tmp_path / f"{i}.jpg", np.full((60, 40), 10 * i, np.uint8)) for i in range(10)]
    report = build_cache(_manifest(paths), tmp_path / "cache", 32, workers=2, chunk=3, progress=False)
    assert report.n_images == 10 and report.failed == []
    cache = ImageCache(tmp_path / "cache")
    rows = cache.rows(["id7", "id2"])
    assert abs(int(cache.images[rows[0]][16, 16]) - 70) <= 2
    assert abs(int(cache.images[rows[1]][16, 16]) - 20) <= 2
    assert not list((tmp_path / ".partial").glob("*.npy"))  # nothing half-written left
    with pytest.raises(DataError, match="not in the cache"):
        cache.rows(["nope"])


def test_corrupt_images_fail_with_a_list_then_resume(tmp_path: Path):
    paths = [_write(tmp_path / f"{i}.jpg", np.full((50, 50), 100, np.uint8)) for i in range(8)]
    good = Path(paths[5]).read_bytes()
    Path(paths[5]).write_bytes(good[: len(good) // 3])  # truncated JPEG
    Path(paths[6]).write_bytes(b"not an image")
    m = _manifest(paths)
    with pytest.raises(DataError, match=r"2 unreadable images[\s\S]*5\.jpg[\s\S]*6\.jpg"):
        build_cache(m, tmp_path / "cache", 32, workers=1, chunk=2, progress=False)
    assert not (tmp_path / "cache" / "images.npy").exists()
    # The fixed files are re-read; everything else resumes from the partial cache.
    Path(paths[5]).write_bytes(good)
    Path(paths[6]).write_bytes(good)
    report = build_cache(m, tmp_path / "cache", 32, workers=1, chunk=2, progress=False)
    assert report.failed == [] and report.resumed_from == 6
    assert ImageCache(tmp_path / "cache").ok.all()


def test_parallel_raw_build_writes_the_serial_builds_bytes(tmp_path: Path):
    """Workers write their rows into the partial memmap themselves: the same file as one
    process, unreadable rows zero, and a resumed parallel build fills only what is missing."""
    rng = np.random.default_rng(0)
    paths = [_write(tmp_path / f"{i}.jpg", rng.integers(0, 255, (70 + i, 50), dtype=np.uint8)) for i in range(11)]
    Path(paths[4]).write_bytes(b"not an image")
    m = _manifest(paths)
    build_cache(m, tmp_path / "one", 32, workers=1, chunk=3, on_error="skip", progress=False)
    build_cache(m, tmp_path / "two", 32, workers=2, chunk=2, on_error="skip", progress=False)
    one, two = np.load(tmp_path / "one" / "images.npy"), np.load(tmp_path / "two" / "images.npy")
    np.testing.assert_array_equal(one, two)
    assert not two[4].any() and two[5].any()
    with pytest.raises(DataError, match="1 unreadable"):  # fail: the partial build is kept
        build_cache(m, tmp_path / "three", 32, workers=2, chunk=2, progress=False)
    Path(paths[4]).write_bytes(Path(paths[3]).read_bytes())
    report = build_cache(m, tmp_path / "three", 32, workers=2, chunk=2, progress=False)
    assert report.resumed_from == 10 and report.failed == []
    three = np.load(tmp_path / "three" / "images.npy")
    np.testing.assert_array_equal(three[4], three[3])
    np.testing.assert_array_equal(np.delete(three, 4, axis=0), np.delete(one, 4, axis=0))


def test_skip_policy_records_and_marks(tmp_path: Path):
    paths = [_write(tmp_path / f"{i}.jpg", np.full((50, 50), 100, np.uint8)) for i in range(4)]
    Path(paths[2]).write_bytes(b"\xff\xd8garbage")
    report = build_cache(_manifest(paths), tmp_path / "cache", 16, on_error="skip", workers=1, progress=False)
    assert len(report.failed) == 1 and "2.jpg" in report.failed[0]
    cache = ImageCache(tmp_path / "cache")
    assert cache.ok.tolist() == [True, True, False, True]


def test_sixteen_bit_images_scale_by_declared_depth_not_their_maximum(tmp_path: Path):
    """12-bit values in a 16-bit PNG fill the range when declared; a dark 16-bit image stays dark."""
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    twelve = _write(tmp_path / "twelve.png", ramp, "PNG")
    with Image.open(twelve) as im:
        assert im.mode == "I;16"
    out = load_resized(twelve, 64, bits_stored=12)
    np.testing.assert_array_equal(out, np.floor(ramp * (255 / 4095) + 0.5).astype(np.uint8))
    # Undeclared, the same file is read as full-range 16-bit: dark, never stretched by a guess.
    assert load_resized(twelve, 64).max() == round(4095 * 255 / 65535)
    dark = np.full((64, 64), 200, np.uint16)
    dark[:32] = 40
    out = load_resized(_write(tmp_path / "dark.png", dark, "PNG"), 64)
    assert out.max() <= 1  # 200 / 65535 of white, not 200 / 255
    assert load_resized(_write(tmp_path / "dark8.png", dark.astype(np.uint8), "PNG"), 64).max() == 200
    with pytest.raises(DataError, match="cache.bits_stored"):
        build_cache(_manifest([twelve]), tmp_path / "c", 16, bits_stored=20, progress=False)


def test_partial_cache_of_other_settings_or_code_is_not_continued(tmp_path: Path, monkeypatch):
    """A killed build resumes only under the same bit depth and code; otherwise it starts over."""
    import cxrlt.data.cache as cache_mod

    values = [500 * (i + 1) for i in range(6)]
    paths = [_write(tmp_path / f"{i}.png", np.full((40, 40), v, np.uint16), "PNG")
             for i, v in enumerate(values)]  # fmt: skip
    good = Path(paths[5]).read_bytes()
    Path(paths[5]).write_bytes(b"not an image")
    m = _manifest(paths)
    partial = tmp_path / "partial"
    with pytest.raises(DataError, match="1 unreadable images"):
        build_cache(m, tmp_path / "cache", 16, workers=1, chunk=2, progress=False, partial_dir=partial)
    left = sorted(p.name for p in partial.iterdir())
    assert len(left) == 3  # pixels, done-mask, failures of the 16-bit build
    Path(paths[5]).write_bytes(good)
    report = build_cache(m, tmp_path / "cache", 16, workers=1, chunk=2, progress=False,
                         partial_dir=partial, bits_stored=12)  # fmt: skip
    assert report.resumed_from == 0
    rows = ImageCache(tmp_path / "cache").images[:, 8, 8]
    np.testing.assert_array_equal(rows, [min(255, round(v * 255 / 4095)) for v in values])
    assert not set(left) & {p.name for p in partial.iterdir()}  # the stale partial is gone

    # The same settings under other code: no resume either.
    Path(paths[5]).write_bytes(b"not an image")
    with pytest.raises(DataError):
        build_cache(m, tmp_path / "cache2", 16, workers=1, chunk=2, progress=False, partial_dir=partial)
    Path(paths[5]).write_bytes(good)
    monkeypatch.setattr(cache_mod, "CODE_VERSION", "another version")
    report = build_cache(m, tmp_path / "cache2", 16, workers=1, chunk=2, progress=False, partial_dir=partial)
    assert report.resumed_from == 0
    monkeypatch.undo()
    # Unchanged settings and code: the partial build is continued (the resumable path).
    Path(paths[5]).write_bytes(b"not an image")
    with pytest.raises(DataError):
        build_cache(m, tmp_path / "cache3", 16, workers=1, chunk=2, progress=False, partial_dir=partial)
    Path(paths[5]).write_bytes(good)
    report = build_cache(m, tmp_path / "cache3", 16, workers=1, chunk=2, progress=False, partial_dir=partial)
    assert report.resumed_from == 5
