"""Decode, resize (aspect kept, zero-padded) and store every image once, as one uint8 array.

Loaders read only the cache: a (N, S, S) `.npy` that is memory-mapped, so a training epoch
costs a memcpy per image instead of a JPEG decode of a 2,500 px original. Building it:
- JPEGs are decoded at reduced scale (PIL draft mode: DCT scaling to 1/2, 1/4, 1/8) before
  the final antialiased resize, which makes decoding several times faster on large originals;
- several processes, a progress bar;
- resumable: rows are written into a partial memmap beside a done-mask, so a killed build
  continues where it stopped; the finished array is renamed into place only when complete.
  A partial build is keyed by the image list, the size, the bit depth and a code version (a
  hash of this module and Pillow's version), so one made with other settings or code is
  never continued (it is deleted);
- 16-bit images are scaled by their declared depth, never by a guess from their values:
  `bits_stored` (default 16, the container's depth; 12 for raw 12-bit values in a 16-bit PNG)
  maps 0 .. 2**bits_stored - 1 to 0 .. 255. 8-bit images are 8-bit whatever it says;
- unreadable or truncated images are listed in the report and either fail the build with
  the list (`on_error: fail`) or are skipped and marked `ok = False` in the index.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
from PIL import Image, ImageFile
from tqdm import tqdm

from cxrlt.errors import DataError
from cxrlt.io import write_json, write_parquet

ImageFile.LOAD_TRUNCATED_IMAGES = False
ON_ERROR = ("fail", "skip")
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")  # more than 8 bits per sample


def _code_version() -> str:
    """This module's source and Pillow's version: together they decide every cached pixel."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"Pillow {PIL.__version__}".encode())
    return h.hexdigest()[:16]


CODE_VERSION = _code_version()


def check_bits_stored(bits_stored: object) -> int:
    """The significant bits of 16-bit images: an integer in [8, 16]."""
    if isinstance(bits_stored, bool) or not isinstance(bits_stored, int) or not 8 <= bits_stored <= 16:
        raise DataError(f"cache.bits_stored must be an integer in [8, 16], got {bits_stored!r}")
    return bits_stored


def load_resized(path: str | os.PathLike, size: int, bits_stored: int = 16) -> np.ndarray:
    """Read one image as uint8 (size, size): long side scaled to `size`, centred, zero-padded.

    An image of more than 8 bits per sample maps 0 .. 2**bits_stored - 1 linearly to 0 .. 255.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            # Let libjpeg decode at the smallest DCT scale that still covers `size`.
            img.draft("L", (size, size))
        img.load()
        return resize_pad(img, size, bits_stored)


def resize_pad(img: Image.Image, size: int, bits_stored: int = 16) -> np.ndarray:
    """A decoded image as the cache stores it: uint8 gray, long side `size`, centred, zero-padded.

    Shared by the cache and by `cxrlt predict` (which also feeds it converted DICOM pixels), so
    a file scored outside the pipeline gets exactly the pixels the model was trained on.
    """
    img = _to_uint8_gray(img, bits_stored)
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.asarray(img, dtype=np.uint8)
    return out


def _to_uint8_gray(img: Image.Image, bits_stored: int = 16) -> Image.Image:
    if img.mode == "L":
        return img
    if img.mode in WIDE_MODES:
        # The declared depth, not the image's own maximum: a dark 16-bit image stays dark and
        # 12-bit values (bits_stored 12) fill the range. The DICOM conversion writes full-range
        # 16-bit PNGs, so the default of 16 is right for them.
        a = np.asarray(img, dtype=np.float32)
        top = float(2**bits_stored - 1)
        return Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8))
    return img.convert("L")


PREPROCESSING_FORMAT = 1  # bump when a field is added or changes meaning
PIXELS = ("uint8 gray; long side scaled to size (bilinear, JPEG draft decode), centred, zero-padded; "
          "normalised inside the model (model.mean, model.std)")  # fmt: skip


@dataclass(frozen=True)
class Preprocessing:
    """How a file became the model's input, recorded in the checkpoint so that the model file
    alone says how to feed it (`cxrlt predict`): the cache's side and the depth of 16-bit
    images, and for DICOMs the depth of the DICOM -> PNG conversion (`data/dicom.py`) that
    precedes the cache in the pipeline."""

    size: int
    bits_stored: int = 16
    dicom_bits: int = 16

    def to_dict(self) -> dict[str, object]:
        return {"format": PREPROCESSING_FORMAT, "size": self.size, "bits_stored": self.bits_stored,
                "dicom_bits": self.dicom_bits, "pixels": PIXELS}  # fmt: skip

    @classmethod
    def from_params(cls, params: dict, size: int) -> Preprocessing:
        """The record of a model trained on a cache of side `size` built with these params."""
        bits_stored = check_bits_stored((params.get("cache") or {}).get("bits_stored", 16))
        dicom_bits = ((params.get("external") or {}).get("dicom") or {}).get("bits", 16)
        if dicom_bits not in (8, 16) or isinstance(dicom_bits, bool):
            raise DataError(f"params external.dicom.bits must be 8 or 16, got {dicom_bits!r}")
        return cls(int(size), bits_stored, dicom_bits)

    @classmethod
    def from_checkpoint(cls, info: dict, where: str) -> Preprocessing:
        """The checkpoint's record; one without (written before it was recorded), of a newer
        format or with a bad field is refused with one line naming `where`."""
        record = info.get("preprocessing")
        if record is None:
            raise DataError(f"{where} has no preprocessing record (it predates format {PREPROCESSING_FORMAT}); "
                            "re-run the train stage (dvc repro train) to write one")  # fmt: skip
        if not isinstance(record, dict) or not isinstance(record.get("format"), int):
            raise DataError(f"{where}: 'preprocessing' must be a dict with an integer 'format'")
        if record["format"] > PREPROCESSING_FORMAT:
            raise DataError(f"{where}: preprocessing format {record['format']} is newer than this cxrlt "
                            f"reads ({PREPROCESSING_FORMAT}); update cxrlt")  # fmt: skip
        checks = {"size": lambda v: v >= 1, "bits_stored": lambda v: 8 <= v <= 16,
                  "dicom_bits": lambda v: v in (8, 16)}  # fmt: skip
        for key, ok in checks.items():
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
                raise DataError(f"{where}: preprocessing.{key} is {value!r}, not a valid value")
        return cls(record["size"], record["bits_stored"], record["dicom_bits"])


def _load_chunk(
    args: tuple[np.ndarray, list[str], int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    rows, paths, size, bits_stored = args
    out = np.zeros((len(rows), size, size), dtype=np.uint8)
    errors: list[str] = []
    ok = np.ones(len(rows), dtype=bool)
    for i, p in enumerate(paths):
        try:
            out[i] = load_resized(p, size, bits_stored)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            ok[i] = False
            errors.append(f"{p}: {type(e).__name__}: {e}")
    return rows, out, ok, errors


@dataclass
class CacheReport:
    n_images: int
    size: int
    seconds: float
    images_per_second: float
    failed: list[str]
    resumed_from: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _key(image_ids: list[str], paths: list[str], size: int, bits_stored: int) -> str:
    """What decides a partial build's pixels: images, size, bit depth and code version."""
    h = hashlib.sha1(f"{size}\t{bits_stored}\t{CODE_VERSION}\n".encode())
    for i, p in zip(image_ids, paths, strict=True):
        h.update(f"{i}\t{p}\n".encode())
    return h.hexdigest()[:16]


def build_cache(
    manifest: pd.DataFrame,
    out_dir: str | os.PathLike,
    size: int,
    workers: int = 2,
    on_error: str = "fail",
    partial_dir: str | os.PathLike | None = None,
    chunk: int = 64,
    progress: bool = True,
    bits_stored: int = 16,
) -> CacheReport:
    """Write `out_dir/images.npy`, `out_dir/index.parquet` and `out_dir/report.json`."""
    if on_error not in ON_ERROR:
        raise DataError(f"cache.on_error must be one of {ON_ERROR}, got {on_error!r}")
    bits_stored = check_bits_stored(bits_stored)
    out_dir = Path(out_dir)
    partial_dir = Path(partial_dir) if partial_dir else out_dir.parent / ".partial"
    ids = manifest["image_id"].astype(str).tolist()
    paths = manifest["path"].astype(str).tolist()
    n = len(ids)
    key = _key(ids, paths, size, bits_stored)
    prefix = f"{out_dir.name}-"
    part = partial_dir / f"{prefix}{key}.npy"
    done_path = partial_dir / f"{prefix}{key}.done.npy"
    fail_path = partial_dir / f"{prefix}{key}.failed.json"
    partial_dir.mkdir(parents=True, exist_ok=True)
    ours = re.compile(re.escape(prefix) + r"[0-9a-f]{16}\.")
    for stale in partial_dir.iterdir():
        # A partial build of this output under other images, settings or code: never reused.
        if ours.match(stale.name) and not stale.name.startswith(f"{prefix}{key}."):
            stale.unlink(missing_ok=True)
    if part.exists() and done_path.exists():
        arr = np.load(part, mmap_mode="r+")
        done = np.load(done_path)
        # Images that failed last time are tried again (they may have been re-downloaded).
        previous = json.loads(fail_path.read_text()) if fail_path.exists() else {}
        done[[int(k) for k in previous]] = False
        failed = {}
    else:
        arr = np.lib.format.open_memmap(part, mode="w+", dtype=np.uint8, shape=(n, size, size))
        done = np.zeros(n, dtype=bool)
        failed = {}
    resumed = int(done.sum())
    todo = np.flatnonzero(~done)
    jobs = [(todo[i : i + chunk], [paths[j] for j in todo[i : i + chunk]], size, bits_stored)
            for i in range(0, len(todo), chunk)]  # fmt: skip
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=resumed, desc=f"cache {size}px", disable=not progress, unit="img")

    def consume(result: tuple) -> None:
        rows, images, ok, errors = result
        arr[rows] = images
        for r, good in zip(rows, ok, strict=True):
            if not good:
                failed[str(int(r))] = errors.pop(0)
        done[rows] = True
        bar.update(len(rows))

    try:
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for k, result in enumerate(pool.map(_load_chunk, jobs)):
                    consume(result)
                    if k % 16 == 15:
                        _checkpoint(arr, done, done_path, failed, fail_path)
        else:
            for k, job in enumerate(jobs):
                consume(_load_chunk(job))
                if k % 16 == 15:
                    _checkpoint(arr, done, done_path, failed, fail_path)
    finally:
        bar.close()
        _checkpoint(arr, done, done_path, failed, fail_path)
    seconds = time.perf_counter() - t0
    failures = [failed[k] for k in sorted(failed, key=int)]
    if failures and on_error == "fail":
        listed = "\n  ".join(failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        raise DataError(
            f"{len(failures)} unreadable images (set cache.on_error: skip to record and go on):"
            f"\n  {listed}{more}"
        )
    ok = np.ones(n, dtype=bool)
    ok[[int(k) for k in failed]] = False
    arr.flush()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "index.parquet", pd.DataFrame({"image_id": ids, "row": np.arange(n), "ok": ok}))
    os.replace(part, out_dir / "images.npy")
    done_path.unlink()
    fail_path.unlink(missing_ok=True)
    done_count = n - resumed
    report = CacheReport(n, size, round(seconds, 3), round(done_count / max(seconds, 1e-9), 1), failures, resumed)
    # Only what describes the content: timings would make the output's hash change per run.
    write_json(out_dir / "report.json", {"n_images": n, "size": size, "failed": failures})
    return report


def _checkpoint(arr: np.memmap, done: np.ndarray, done_path: Path, failed: dict, fail_path: Path) -> None:
    """Flush pixels before the done-mask, so a row marked done is always on disk."""
    arr.flush()
    tmp = done_path.with_suffix(".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, done_path)
    tmp_f = fail_path.with_suffix(".tmp")
    tmp_f.write_text(json.dumps(failed))
    os.replace(tmp_f, fail_path)


class ImageCache:
    """Read-only view of a built cache: image_id -> uint8 (S, S) array."""

    def __init__(self, cache_dir: str | os.PathLike):
        cache_dir = Path(cache_dir)
        if not (cache_dir / "images.npy").exists():
            raise DataError(f"{cache_dir}: no images.npy; run the cache stage first (dvc repro cache)")
        self.images = np.load(cache_dir / "images.npy", mmap_mode="r")
        index = pd.read_parquet(cache_dir / "index.parquet")
        self.row = pd.Series(index["row"].to_numpy(), index=index["image_id"].astype(str))
        self.ok = pd.Series(index["ok"].to_numpy(), index=index["image_id"].astype(str))
        self.size = int(self.images.shape[-1])

    def rows(self, image_ids: pd.Series | list[str]) -> np.ndarray:
        ids = pd.Index([str(i) for i in image_ids])
        missing = ~ids.isin(self.row.index)
        if missing.any():
            raise DataError(f"image_id {ids[missing][0]!r} is not in the cache (rebuild it: dvc repro cache)")
        return self.row.loc[ids].to_numpy()
