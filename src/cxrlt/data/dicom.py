"""DICOM -> PNG for the DICOM sources (VinDr-CXR): the display pipeline, then nothing else.

Pixels go through the DICOM grayscale pipeline in the standard's order: modality LUT
(rescale slope/intercept or Modality LUT Sequence), VOI LUT (VOI LUT Sequence, else the
first Window Center/Width), presentation (MONOCHROME1 is inverted so that air is dark as in
MONOCHROME2). The result is min-max scaled to the full 8- or 16-bit range per image, as
windowing already clips to the intended range and the DICOMs of one source vary in bit
depth. The PNG carries pixels only: no text chunks, so no patient name, id or date leaks
from the DICOM header into the image cache.

The output folder persists between runs (conversion is slow and resumable), so it records
what produced each PNG in `provenance.json`: the source file and its size, the bit depth and
a code version (a hash of this module and the pydicom version). A PNG is reused only when its
record matches what this run would write; anything else is converted again, and PNGs no
longer listed are removed, so a change of settings or code never leaves stale images behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from tqdm import tqdm

from cxrlt.errors import DataError
from cxrlt.io import atomic_path, write_text

log = logging.getLogger(__name__)

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
ErrorPolicy = Literal["fail", "skip"]
PROVENANCE = "provenance.json"  # in the output folder: what produced each PNG


def _code_version() -> str:
    """This module's source and pydicom's version: together they decide every output pixel."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"pydicom {pydicom.__version__}".encode())
    return h.hexdigest()[:16]


CODE_VERSION = _code_version()


def dataset_to_array(ds: pydicom.Dataset, bits: int = 16) -> np.ndarray:
    """Pixels of a read dataset through modality LUT, VOI LUT, MONOCHROME1 inversion, scaling."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in GRAYSCALE:
        raise DataError(f"photometric interpretation {photometric!r}; expected one of {GRAYSCALE}")
    arr = ds.pixel_array
    if arr.ndim != 2:
        raise DataError(f"pixel data of shape {arr.shape}; expected one 2-D frame")
    arr = apply_modality_lut(arr, ds)
    if ds.get("VOILUTSequence") and arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)):
        arr = arr.astype(np.int64)  # a VOI LUT indexes by integer stored value
    arr = np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
    top = float(2**bits - 1)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) * (top / (hi - lo)) if hi > lo else np.zeros_like(arr)
    if photometric == "MONOCHROME1":
        scaled = top - scaled
    return np.rint(scaled).astype(np.uint8 if bits == 8 else np.uint16)


def dicom_to_array(path: str | os.PathLike, bits: int = 16) -> np.ndarray:
    """Read a DICOM file and return its display-ready grayscale image (uint8 or uint16)."""
    return dataset_to_array(pydicom.dcmread(path), bits=bits)


def write_png(arr: np.ndarray, path: str | os.PathLike, compress_level: int = 3) -> None:
    """Atomically write a uint8 ('L') or uint16 ('I;16') PNG with no metadata chunks."""
    mode = {np.dtype(np.uint8): "L", np.dtype(np.uint16): "I;16"}.get(arr.dtype)
    if mode is None:
        raise ValueError(f"expected uint8 or uint16 pixels, got {arr.dtype}")
    image = Image.fromarray(arr)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", compress_level=compress_level)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the image cache is read by other users


@dataclass
class ConversionReport:
    """What `convert_dicoms` did; `failed` maps each unreadable DICOM to the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # up to date: its record matches
    removed: list[str] = field(default_factory=list)  # PNGs of sources no longer listed
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"converted": len(self.converted), "skipped": len(self.skipped),
                "removed": len(self.removed), "failed": dict(self.failed)}  # fmt: skip

    def __str__(self) -> str:
        return (f"{len(self.converted)} converted, {len(self.skipped)} up to date, "
                f"{len(self.removed)} removed, {len(self.failed)} failed")  # fmt: skip


def _record(src: str, bits: int) -> dict[str, object] | None:
    """What a conversion of `src` now would be made from; None if the source is unreadable.

    The source's content digest, not its size or time: a re-rendered DICOM of the same size
    must not leave its old PNG "up to date", and times would differ between clones.
    """
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.stat(src).st_size
    except OSError:
        return None
    return {"source": src, "source_bytes": size, "source_md5": digest.hexdigest(),
            "bits": bits, "code": CODE_VERSION}  # fmt: skip


def read_provenance(out_dir: str | os.PathLike) -> dict[str, dict[str, object]]:
    """PNG name -> record of what produced it; empty when the folder has no (readable) record."""
    path = Path(out_dir) / PROVENANCE
    try:
        files = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s unreadable (%s): every PNG there is converted again", path, exc)
        return {}
    return files if isinstance(files, dict) else {}


def _write_provenance(out_dir: Path, records: dict[str, dict[str, object]]) -> None:
    doc = {"code_version": CODE_VERSION, "pydicom": pydicom.__version__,
           "files": {k: records[k] for k in sorted(records)}}  # fmt: skip
    write_text(out_dir / PROVENANCE, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def _convert_one(src: str, dst: str, bits: int, compress_level: int) -> tuple[str, str | None]:
    """Worker: one DICOM -> one PNG; returns (src, error message or None), never raises."""
    try:
        write_png(dicom_to_array(src, bits=bits), dst, compress_level=compress_level)
    except Exception as exc:  # noqa: BLE001 - any failure is reported per file
        return src, f"{type(exc).__name__}: {exc}"
    return src, None


def output_paths(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, str]:
    """Source path -> `<out_dir>/<source stem>.png`; two sources with one stem raise."""
    out_dir = Path(out_dir)
    mapping: dict[str, str] = {}
    owner: dict[str, str] = {}
    for p in map(str, paths):
        name = Path(p).stem + ".png"
        if name in owner and owner[name] != p:
            raise DataError(f"{p} and {owner[name]} would both be written to {out_dir / name}")
        owner[name] = p
        mapping[p] = str(out_dir / name)
    return mapping


def convert_dicoms(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    bits: int = 16,
    workers: int | None = None,
    overwrite: bool = False,
    on_error: ErrorPolicy = "fail",
    progress: bool = True,
    compress_level: int = 3,
) -> ConversionReport:
    """Convert DICOMs to `<out_dir>/<stem>.png`, in parallel, resumably; `out_dir` mirrors `paths`.

    A PNG is reused only if `provenance.json` records it as made from this source (path and
    size) with these settings and this code version; writes are atomic and a PNG is recorded
    only after it is written, so a killed run resumes without trusting anything stale.
    `overwrite=True` redoes every PNG. PNGs whose source is no longer in `paths` are removed.
    Unreadable DICOMs are collected: `on_error="skip"` records them in the report, `"fail"`
    raises a DataError listing them after converting the rest (so a rerun after fixing them
    resumes). `workers=None` uses every CPU; 1 runs in-process.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    mapping = output_paths(paths, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    wanted = {Path(dst).name for dst in mapping.values()}
    for stale in sorted(out.glob("*.png")):
        if stale.name not in wanted:
            stale.unlink()
            report.removed.append(str(stale))
    for leftover in out.glob(".*.tmp"):  # temporary files of a killed run
        leftover.unlink(missing_ok=True)
    records = {name: rec for name, rec in read_provenance(out).items() if name in wanted}
    expected: dict[str, dict[str, object] | None] = {}
    todo = []
    for src, dst in mapping.items():
        expected[src] = _record(src, bits)
        name = Path(dst).name
        fresh = expected[src] is not None and records.get(name) == expected[src]
        if not overwrite and fresh and os.path.exists(dst):
            report.skipped.append(dst)
        else:
            todo.append((src, dst))
            records.pop(name, None)
    # Records of the PNGs about to be rewritten go first: a record on disk then always
    # describes the PNG on disk, whenever the run is killed.
    _write_provenance(out, records)
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    bar = tqdm(total=len(todo), desc="dicom -> png", unit="img", disable=not progress)
    last_save = time.monotonic()

    def record(src: str, error: str | None) -> None:
        nonlocal last_save
        name = Path(mapping[src]).name
        if error is None and expected[src] is not None:
            report.converted.append(mapping[src])
            records[name] = expected[src]
        else:
            report.failed[src] = error or "source file unreadable"
            records.pop(name, None)
            Path(mapping[src]).unlink(missing_ok=True)  # an older PNG would pass for this one
        bar.update()
        if time.monotonic() - last_save > 10:  # a kill loses at most ~10 s of records
            _write_provenance(out, records)
            last_save = time.monotonic()

    try:
        if workers <= 1:
            for src, dst in todo:
                record(*_convert_one(src, dst, bits, compress_level))
        else:
            ctx = mp.get_context(
                "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
            )
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(_convert_one, s, d, bits, compress_level) for s, d in todo]
                for future in as_completed(futures):
                    record(*future.result())
    finally:
        bar.close()
        _write_provenance(out, records)
    log.info("dicom -> png in %s: %s", out_dir, report)
    if report.failed and on_error == "fail":
        shown = "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:10])
        raise DataError(f"{len(report.failed)} DICOM files could not be converted: {shown}")
    return report
