"""Decode, resize (aspect kept, zero-padded) and store every image once.

Loaders read only the cache, through `ImageCache.read`. Two storage formats (`cache.format`):
- `raw` (default): a (N, S, S) uint8 `.npy`, memory-mapped, so a training epoch costs a memcpy
  per image instead of a JPEG decode of a 2,500 px original. At 1024 px it is 1 MiB an image:
  ~395 GB for MIMIC's 377k images, several times the originals;
- `jpeg` / `png`: each image's encoded bytes in one file (`images.bin`) with an (N, 2)
  offset/length table (`offsets.npy`): ~10x smaller as JPEG (within the codec's few grey
  levels), exact as PNG; a read decodes (a few ms at 1024 px; batched on the GPU with
  `ImageCache.read_tensor`).
Building it:
- three decoders (`cache.decoder`): `pil` (default) decodes JPEGs at reduced scale (PIL draft
  mode: DCT scaling to 1/2, 1/4, 1/8) before an antialiased bilinear resize; `cv2` lets
  libjpeg-turbo pick the largest of those reductions that still covers the long side and
  area-averages the rest (OpenCV); `turbo` (simplejpeg) also uses libjpeg-turbo's finer M/8
  scales (3/8 takes a 3,000 px original to 1,125 px, where 1/2 gives 1,500), then a bilinear
  resize (area when more than 4/3 is left) to the size set by the original's dimensions.
  Decoding the entropy-coded data, which no DCT scaling avoids, is most of the time, and
  `turbo` leaves the least on top of it (`bench/bench_speed.py` measures all three against the
  reference path). They give different pixels (within a few grey levels), so switching
  rebuilds the cache;
- several processes, a progress bar;
- resumable: rows are written into a partial memmap (or appended to a partial bytes file whose
  table is saved with each checkpoint) beside a done-mask, so a killed build continues where
  it stopped; the finished files are renamed into place only when complete. A partial build
  is keyed by the image list, the size, the bit depth, the decoder and format and a code
  version (a hash of this module and Pillow's and OpenCV's versions), so one made with other
  settings or code is never continued (it is deleted);
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


def resize_pad(img: Image.Image, size: int, bits_stored: int = 16, decoder: str = "pil") -> np.ndarray:
    """A decoded image as the cache stores it: uint8 gray, long side `size`, centred, zero-padded,
    resized as `decoder` resizes (`pil`: bilinear with PIL's reducing gap; `cv2`, `turbo`: area).

    Shared by the cache and by `cxrlt predict` (which also feeds it converted DICOM pixels), so
    a file scored outside the pipeline gets exactly the pixels the model was trained on.
    """
    img = _to_uint8_gray(img, bits_stored)
    if decoder in ("cv2", "turbo"):
        return _cv2_resize_pad(np.asarray(img, dtype=np.uint8), size)
    w, h = img.size
    nw, nh = _fit(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return _pad(np.asarray(img, dtype=np.uint8), size)


def _cv2_resize_pad(a: np.ndarray, size: int, target: tuple[int, int] | None = None) -> np.ndarray:
    """`a` resized to `target` (width, height; default: `a`'s own fit to `size`) and padded."""
    h, w = a.shape
    nw, nh = target or _fit(w, h, size)
    if (nw, nh) != (w, h):
        # Area averaging when shrinking (antialiased); bilinear when enlarging a small original.
        shrink = nw < w or nh < h
        a = _cv2().resize(a, (nw, nh), interpolation=_cv2().INTER_AREA if shrink else _cv2().INTER_LINEAR)
    return _pad(a, size)


def load_resized_cv2(path: str | os.PathLike, size: int, bits_stored: int = 16) -> np.ndarray:
    """`load_resized` through OpenCV: a JPEG is decoded by libjpeg-turbo at the largest DCT
    reduction (1/2, 1/4, 1/8) whose long side still covers `size`, grey, then area-averaged
    down; other formats are decoded as `load_resized` does and resized the same way.
    """
    cv2 = _cv2()
    with Image.open(path) as img:  # the header only: format and size
        fmt, (w, h) = img.format, img.size
        if fmt != "JPEG":
            img.load()
            return resize_pad(img, size, bits_stored, "cv2")
    if fmt == "JPEG":
        data = Path(path).read_bytes()
        # libjpeg pads a truncated file with grey and only warns; PIL (the `pil` decoder)
        # refuses it, and so must this: the end-of-image marker must follow the last scan.
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise OSError("image file is truncated (no end-of-image marker after the last scan)")
        k = next((k for k in (8, 4, 2) if -(-max(w, h) // k) >= size), 1)
        flags = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}  # fmt: skip
        a = cv2.imdecode(np.frombuffer(data, np.uint8), flags[k] | cv2.IMREAD_IGNORE_ORIENTATION)
        if a is None:
            raise ValueError("OpenCV cannot decode this JPEG")
    return _cv2_resize_pad(a, size)


def load_resized_turbo(path: str | os.PathLike, size: int, bits_stored: int = 16) -> np.ndarray:
    """`load_resized` through libjpeg-turbo's own scaled decode (simplejpeg): a JPEG is decoded
    grey at the smallest of the library's M/8 scales whose width and height still cover the
    target, then resized to the target computed from the original's dimensions (so the
    geometry is the other decoders'): bilinear when at most 4/3 is left to shrink, area
    averaging otherwise; other formats go as `load_resized_cv2` sends them."""
    data = Path(path).read_bytes()
    if not data.startswith(b"\xff\xd8"):  # not a JPEG: PIL reads it, OpenCV resizes
        with Image.open(path) as img:
            img.load()
            return resize_pad(img, size, bits_stored, "turbo")
    sj = _simplejpeg()
    h, w, _, _ = sj.decode_jpeg_header(data)
    nw, nh = _fit(w, h, size)
    # strict: a truncated or corrupt file raises (libjpeg alone would pad it with grey).
    a = np.ascontiguousarray(sj.decode_jpeg(data, colorspace="GRAY", min_height=nh, min_width=nw, strict=True)[:, :, 0])
    if nh <= a.shape[0] <= nh * 4 / 3 and a.shape[1] <= nw * 4 / 3:
        # At most 4/3 left to shrink (the DCT scale did the low-pass): bilinear does not alias
        # there and costs a seventh of an area resize.
        return _pad(_cv2().resize(a, (nw, nh), interpolation=_cv2().INTER_LINEAR), size)
    return _cv2_resize_pad(a, size, (nw, nh))


DECODERS = {"pil": load_resized, "cv2": load_resized_cv2, "turbo": load_resized_turbo}
FORMATS = ("raw", "jpeg", "png")


def check_decoder(decoder: object) -> str:
    if decoder not in DECODERS:
        raise DataError(f"cache.decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
    return str(decoder)


def check_format(fmt: object, quality: object = 95) -> str:
    if fmt not in FORMATS:
        raise DataError(f"cache.format must be one of {list(FORMATS)}, got {fmt!r}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise DataError(f"cache.quality (JPEG quality of cache.format jpeg) must be an integer in [1, 100], "
                        f"got {quality!r}")  # fmt: skip
    return str(fmt)


def _fit(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the long side `size`, aspect kept."""
    scale = size / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """`a` centred on a zero (size, size) canvas."""
    out = np.zeros((size, size), dtype=np.uint8)
    nh, nw = a.shape
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = a
    return out


def _cv2():  # noqa: ANN202 - the cv2 module
    """OpenCV, imported on first use (the default `pil` / `raw` path never needs it), one
    thread per process: the build and the loaders parallelise over processes instead."""
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _simplejpeg():  # noqa: ANN202 - the simplejpeg module
    """simplejpeg (libjpeg-turbo's TurboJPEG API), imported on first use by `cache.decoder: turbo`."""
    import simplejpeg

    return simplejpeg


def encode(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """One cached image as `fmt` bytes (grey, 8-bit)."""
    cv2 = _cv2()
    ext, opts = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality]) if fmt == "jpeg" else (".png", [cv2.IMWRITE_PNG_COMPRESSION, 1])
    ok, buf = cv2.imencode(ext, image, opts)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()


def decode(data: np.ndarray | bytes, size: int) -> np.ndarray:
    """Bytes written by `encode` back to uint8 (size, size)."""
    cv2 = _cv2()
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if a is None or a.shape != (size, size):
        raise DataError(f"a cached image does not decode to {size}x{size} (rebuild the cache: dvc repro cache)")
    return a


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
    decoder: str = "pil"  # the cache's resize (`cache.decoder`)

    def to_dict(self) -> dict[str, object]:
        return {"format": PREPROCESSING_FORMAT, "size": self.size, "bits_stored": self.bits_stored,
                "dicom_bits": self.dicom_bits, "decoder": self.decoder, "pixels": PIXELS}  # fmt: skip

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """One image file (not DICOM) as the cache stored it."""
        return DECODERS[self.decoder](path, self.size, self.bits_stored)

    @classmethod
    def from_params(cls, params: dict, size: int) -> Preprocessing:
        """The record of a model trained on a cache of side `size` built with these params."""
        bits_stored = check_bits_stored((params.get("cache") or {}).get("bits_stored", 16))
        dicom_bits = ((params.get("external") or {}).get("dicom") or {}).get("bits", 16)
        if dicom_bits not in (8, 16) or isinstance(dicom_bits, bool):
            raise DataError(f"params external.dicom.bits must be 8 or 16, got {dicom_bits!r}")
        decoder = check_decoder((params.get("cache") or {}).get("decoder", "pil"))
        return cls(int(size), bits_stored, dicom_bits, decoder)

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
        decoder = record.get("decoder", "pil")
        if decoder not in DECODERS:
            raise DataError(f"{where}: preprocessing.decoder is {decoder!r}, not one of {sorted(DECODERS)}")
        return cls(record["size"], record["bits_stored"], record["dicom_bits"], decoder)


def _load_chunk(
    args: tuple[np.ndarray, list[str], int, int, str, str, int, str | None],
) -> tuple[np.ndarray, list[bytes] | None, np.ndarray, list[str]]:
    """Decode a chunk of rows. A raw build's worker writes its rows straight into the partial
    memmap (`target`, shared through the page cache) and returns none: sending 1 MiB per
    1024 px image back through a pipe made the parent the bottleneck of a parallel build.
    Compressed formats are encoded here, in the worker, and their bytes returned."""
    rows, paths, size, bits_stored, decoder, fmt, quality, target = args
    load = DECODERS[decoder]
    out = np.load(target, mmap_mode="r+") if target is not None else np.zeros((len(rows), size, size), np.uint8)
    where = rows if target is not None else range(len(rows))
    errors: list[str] = []
    ok = np.ones(len(rows), dtype=bool)
    for i, (r, p) in enumerate(zip(where, paths, strict=True)):
        try:
            out[r] = load(p, size, bits_stored)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            out[r] = 0
            ok[i] = False
            errors.append(f"{p}: {type(e).__name__}: {e}")
    if target is not None:
        del out  # the pages are in the page cache; the parent's checkpoint msyncs the file
        return rows, None, ok, errors
    return rows, [encode(a, fmt, quality) if good else b"" for a, good in zip(out, ok, strict=True)], ok, errors


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


def _key(image_ids: list[str], paths: list[str], size: int, bits_stored: int, decoder: str = "pil",
         fmt: str = "raw", quality: int = 95) -> str:  # fmt: skip
    """What decides a partial build's pixels: images, size, bit depth, decoder, format and code."""
    settings = f"{size}\t{bits_stored}\t{CODE_VERSION}"
    if decoder != "pil" or fmt != "raw":
        settings += f"\t{decoder}\t{fmt}\t{quality}\tOpenCV {_cv2().__version__}"
    if decoder == "turbo":
        settings += f"\tsimplejpeg {_simplejpeg().__version__}"
    h = hashlib.sha1(f"{settings}\n".encode())
    for i, p in zip(image_ids, paths, strict=True):
        h.update(f"{i}\t{p}\n".encode())
    return h.hexdigest()[:16]


class _RawPart:
    """A partial raw cache: a (N, S, S) memmap written in place."""

    def __init__(self, stem: Path, n: int, size: int, resume: bool):
        self.path = Path(f"{stem}.npy")
        if resume:
            self.arr = np.load(self.path, mmap_mode="r+")
        else:
            self.arr = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.uint8, shape=(n, size, size))

    def put(self, rows: np.ndarray, images: None, ok: np.ndarray) -> None:
        """Nothing to copy: the workers wrote the rows into this file."""

    def flush(self) -> None:
        self.arr.flush()  # msync: the file's dirty pages, whichever process mapped them

    def finish(self, out_dir: Path) -> None:
        self.arr.flush()
        del self.arr
        os.replace(self.path, out_dir / "images.npy")


class _PackedPart:
    """A partial compressed cache: encoded images appended to one bytes file, with an (N, 2)
    offset/length table saved (after the bytes are on disk) at every checkpoint. Rows come in
    row order from the pool, so a fresh build's file is in row order too."""

    def __init__(self, stem: Path, n: int, resume: bool):
        self.path, self.table_path = Path(f"{stem}.bin"), Path(f"{stem}.offsets.npy")
        if resume:
            self.table = np.load(self.table_path)
        else:
            self.table = np.zeros((n, 2), dtype=np.int64)
            self.path.write_bytes(b"")
        self.file = open(self.path, "r+b")  # noqa: SIM115 - closed in finish()

    def resume_at(self, done: np.ndarray) -> None:
        """Drop bytes written after the last checkpoint (rows not marked done)."""
        end = int((self.table[done, 0] + self.table[done, 1]).max()) if done.any() else 0
        self.file.truncate(end)
        self.table[~done] = 0

    def put(self, rows: np.ndarray, blobs: list[bytes], ok: np.ndarray) -> None:
        self.file.seek(0, os.SEEK_END)
        for r, blob in zip(rows, blobs, strict=True):
            self.table[r] = (self.file.tell(), len(blob))
            self.file.write(blob)

    def flush(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        tmp = self.table_path.with_suffix(".tmp.npy")
        np.save(tmp, self.table)
        os.replace(tmp, self.table_path)

    def finish(self, out_dir: Path) -> None:
        self.flush()
        self.file.close()
        np.save(out_dir / "offsets.npy", self.table)
        os.replace(self.path, out_dir / "images.bin")
        self.table_path.unlink()


OUTPUT_FILES = {"raw": ("images.npy",), "packed": ("images.bin", "offsets.npy")}


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
    decoder: str = "pil",
    fmt: str = "raw",
    quality: int = 95,
) -> CacheReport:
    """Write `out_dir/index.parquet`, `out_dir/report.json` and the pixels: `images.npy` (raw)
    or `images.bin` + `offsets.npy` (jpeg, png)."""
    if on_error not in ON_ERROR:
        raise DataError(f"cache.on_error must be one of {ON_ERROR}, got {on_error!r}")
    bits_stored = check_bits_stored(bits_stored)
    decoder = check_decoder(decoder)
    fmt = check_format(fmt, quality)
    out_dir = Path(out_dir)
    partial_dir = Path(partial_dir) if partial_dir else out_dir.parent / ".partial"
    ids = manifest["image_id"].astype(str).tolist()
    paths = manifest["path"].astype(str).tolist()
    n = len(ids)
    key = _key(ids, paths, size, bits_stored, decoder, fmt, quality)
    prefix = f"{out_dir.name}-"
    stem = partial_dir / f"{prefix}{key}"
    done_path = partial_dir / f"{prefix}{key}.done.npy"
    fail_path = partial_dir / f"{prefix}{key}.failed.json"
    partial_dir.mkdir(parents=True, exist_ok=True)
    ours = re.compile(re.escape(prefix) + r"[0-9a-f]{16}\.")
    for stale in partial_dir.iterdir():
        # A partial build of this output under other images, settings or code: never reused.
        if ours.match(stale.name) and not stale.name.startswith(f"{prefix}{key}."):
            stale.unlink(missing_ok=True)
    part_files = [Path(f"{stem}.npy")] if fmt == "raw" else [Path(f"{stem}.bin"), Path(f"{stem}.offsets.npy")]
    resume = all(f.exists() for f in part_files) and done_path.exists()
    part = _RawPart(stem, n, size, resume) if fmt == "raw" else _PackedPart(stem, n, resume)
    if resume:
        done = np.load(done_path)
        if isinstance(part, _PackedPart):
            part.resume_at(done)
        # Images that failed last time are tried again (they may have been re-downloaded).
        previous = json.loads(fail_path.read_text()) if fail_path.exists() else {}
        done[[int(k) for k in previous]] = False
    else:
        done = np.zeros(n, dtype=bool)
    failed: dict[str, str] = {}
    resumed = int(done.sum())
    todo = np.flatnonzero(~done)
    target = str(part.path) if isinstance(part, _RawPart) else None
    jobs = [(todo[i : i + chunk], [paths[j] for j in todo[i : i + chunk]], size, bits_stored, decoder, fmt, quality,
             target) for i in range(0, len(todo), chunk)]  # fmt: skip
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=resumed, desc=f"cache {size}px", disable=not progress, unit="img")

    def consume(result: tuple) -> None:
        rows, images, ok, errors = result
        part.put(rows, images, ok)
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
                        _checkpoint(part, done, done_path, failed, fail_path)
        else:
            for k, job in enumerate(jobs):
                consume(_load_chunk(job))
                if k % 16 == 15:
                    _checkpoint(part, done, done_path, failed, fail_path)
    finally:
        bar.close()
        _checkpoint(part, done, done_path, failed, fail_path)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "index.parquet", pd.DataFrame({"image_id": ids, "row": np.arange(n), "ok": ok}))
    part.finish(out_dir)
    kind = "raw" if fmt == "raw" else "packed"
    for other in OUTPUT_FILES["packed" if kind == "raw" else "raw"]:
        (out_dir / other).unlink(missing_ok=True)  # a build of the other format, left here
    done_path.unlink()
    fail_path.unlink(missing_ok=True)
    done_count = n - resumed
    report = CacheReport(n, size, round(seconds, 3), round(done_count / max(seconds, 1e-9), 1), failures, resumed)
    # Only what describes the content: timings would make the output's hash change per run.
    # A raw cache's report stays as it always was, so existing caches keep their hash.
    content: dict = {"n_images": n, "size": size, "failed": failures}
    if fmt != "raw":
        content.update(format=fmt, decoder=decoder, **({"quality": quality} if fmt == "jpeg" else {}))
    write_json(out_dir / "report.json", content)
    return report


def _checkpoint(part: _RawPart | _PackedPart, done: np.ndarray, done_path: Path, failed: dict,
                fail_path: Path) -> None:  # fmt: skip
    """Flush pixels (and the offset table) before the done-mask, so a row marked done is always on disk."""
    part.flush()
    tmp = done_path.with_suffix(".tmp.npy")
    np.save(tmp, done)
    os.replace(tmp, done_path)
    tmp_f = fail_path.with_suffix(".tmp")
    tmp_f.write_text(json.dumps(failed))
    os.replace(tmp_f, fail_path)


def keep_cached(manifest: pd.DataFrame, cache: ImageCache) -> pd.DataFrame:
    """Drop images the cache recorded as unreadable (cache.on_error: skip)."""
    ok = cache.ok.reindex(manifest["image_id"].astype(str)).fillna(False).to_numpy(bool)
    return manifest.loc[ok].reset_index(drop=True)


class ImageCache:
    """Read-only view of a built cache (either format): image_id -> row -> uint8 (S, S) pixels.

    Every reader goes through `read` (NumPy, CPU) or `read_tensor` (a torch batch on a device;
    JPEG caches decode there in one batched call on CUDA). It pickles as its folder, so
    DataLoader workers reopen the files instead of copying the pixels.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        cache_dir = Path(cache_dir)
        self.dir = cache_dir
        raw, packed = ((cache_dir / "images.npy").exists(),
                       all((cache_dir / f).exists() for f in OUTPUT_FILES["packed"]))  # fmt: skip
        if raw and packed:
            raise DataError(f"{cache_dir}: holds both images.npy and images.bin; rebuild it (dvc repro cache)")
        if not (raw or packed):
            raise DataError(f"{cache_dir}: no images.npy or images.bin; run the cache stage first (dvc repro cache)")
        if raw:
            self.format = "raw"
            self._images = np.load(cache_dir / "images.npy", mmap_mode="r")
            self._pixels = np.asarray(self._images)  # the same mapped bytes, without np.memmap's per-index overhead
            self.size = int(self._images.shape[-1])
        else:
            report = json.loads((cache_dir / "report.json").read_text())
            self.format, self.size = str(report["format"]), int(report["size"])
            self._spans = np.load(cache_dir / "offsets.npy")
            nbytes = (cache_dir / "images.bin").stat().st_size
            # np.memmap refuses an empty file (every image unreadable, on_error: skip).
            self._bytes = np.memmap(cache_dir / "images.bin", np.uint8, "r") if nbytes else np.empty(0, np.uint8)
        index = pd.read_parquet(cache_dir / "index.parquet")
        self.row = pd.Series(index["row"].to_numpy(), index=index["image_id"].astype(str))
        self.ok = pd.Series(index["ok"].to_numpy(), index=index["image_id"].astype(str))
        # A plain dict: Index.isin on arrow strings scans the whole index per call, which
        # made batched reads (prediction, stage 2) spend most of their time looking up rows.
        self._row_of: dict[str, int] = dict(zip(self.row.index, self.row.to_numpy().tolist(), strict=True))

    def __getstate__(self) -> dict:
        return {"dir": str(self.dir)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["dir"])

    @property
    def images(self) -> np.memmap:
        """The raw cache's (N, S, S) memmap; readers use `read`, which works for every format."""
        if self.format != "raw":
            raise DataError(f"{self.dir}: a {self.format} cache has no pixel array; read it with ImageCache.read(rows)")
        return self._images

    def read(self, rows: np.ndarray | list[int]) -> np.ndarray:
        """uint8 (n, S, S) pixels of cache rows (as `rows` returns them), in the order given.

        Raw: one memmap read in file order (sorted, then put back). Compressed: each image
        decoded (an unreadable image, on_error: skip, reads as zeros, as in a raw cache)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.size, self.size), dtype=np.uint8)
        if self.format == "raw":
            if len(rows) == 1:  # a loader's per-item read: no sort, one copy
                out[0] = self._pixels[rows[0]]
                return out
            order = np.argsort(rows, kind="stable")
            out[order] = self._pixels[rows[order]]
            return out
        for k, r in enumerate(rows):
            start, n = self._spans[r]
            if n:
                out[k] = decode(self._bytes[start : start + n], self.size)
            else:
                out[k] = 0
        return out

    def read_tensor(self, rows: np.ndarray | list[int], device: str | object = "cpu"):  # noqa: ANN201 - torch.Tensor
        """`read` as a uint8 torch tensor on `device`; a JPEG cache is decoded on a CUDA device
        in one batched nvJPEG call (only the encoded bytes cross the bus)."""
        import torch

        device = torch.device(device)
        if self.format == "jpeg" and device.type == "cuda":
            return decode_jpeg_batch(self.blobs(rows), self.size, device)
        return torch.from_numpy(self.read(rows)).to(device)

    def blobs(self, rows: np.ndarray | list[int]) -> list[np.ndarray]:
        """The encoded bytes of compressed-cache rows (empty for an unreadable image)."""
        if self.format == "raw":
            raise DataError(f"{self.dir}: a raw cache holds no encoded images")
        return [np.asarray(self._bytes[s : s + n]) for s, n in self._spans[np.asarray(rows, dtype=np.int64)]]

    def rows(self, image_ids: pd.Series | list[str]) -> np.ndarray:
        out = np.empty(len(image_ids), dtype=np.int64)
        for k, i in enumerate(image_ids):
            row = self._row_of.get(str(i))
            if row is None:
                raise DataError(f"image_id {str(i)!r} is not in the cache (rebuild it: dvc repro cache)")
            out[k] = row
        return out


def decode_jpeg_batch(blobs: list[np.ndarray], size: int, device: object):  # noqa: ANN201 - torch.Tensor
    """uint8 (n, size, size) on `device` from JPEG bytes, decoded in one batched torchvision
    call there (nvJPEG on CUDA, libjpeg-turbo on the CPU); empty blobs give zeros."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    out = torch.zeros((len(blobs), size, size), dtype=torch.uint8, device=device)
    have = [k for k, b in enumerate(blobs) if len(b)]
    if have:
        data = [torch.from_numpy(np.array(blobs[k], dtype=np.uint8)) for k in have]
        images = decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)
        out[torch.as_tensor(have, device=device)] = torch.stack(images)[:, 0]
    return out
