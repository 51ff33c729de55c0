"""DICOM -> PNG for the DICOM sources (VinDr-CXR): the display pipeline, then nothing else.

Pixels go through the DICOM grayscale pipeline in the standard's order: modality LUT
(rescale slope/intercept or Modality LUT Sequence), VOI LUT (VOI LUT Sequence, else the
first Window Center/Width), presentation (MONOCHROME1 is inverted so that air is dark as in
MONOCHROME2). The result is min-max scaled to the full 8- or 16-bit range per image, as
windowing already clips to the intended range and the DICOMs of one source vary in bit
depth. The PNG carries pixels only: no text chunks, so no patient name, id or date leaks
from the DICOM header into the image cache.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
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
from cxrlt.io import atomic_path

log = logging.getLogger(__name__)

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
ErrorPolicy = Literal["fail", "skip"]


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
    skipped: list[str] = field(default_factory=list)  # output already there (resumed run)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"converted": len(self.converted), "skipped": len(self.skipped),
                "failed": dict(self.failed)}  # fmt: skip

    def __str__(self) -> str:
        return (f"{len(self.converted)} converted, {len(self.skipped)} already present, "
                f"{len(self.failed)} failed")  # fmt: skip


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
    """Convert DICOMs to `<out_dir>/<stem>.png`, in parallel, resumably.

    PNGs already present are skipped (writes are atomic, so an existing PNG is complete);
    `overwrite=True` redoes them. Unreadable DICOMs are collected: `on_error="skip"` records
    them in the report, `"fail"` raises a DataError listing them after converting the rest
    (so a rerun after fixing them resumes). `workers=None` uses every CPU; 1 runs in-process.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    mapping = output_paths(paths, out_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    report = ConversionReport()
    todo = []
    for src, dst in mapping.items():
        if not overwrite and os.path.exists(dst):
            report.skipped.append(dst)
        else:
            todo.append((src, dst))
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    bar = tqdm(total=len(todo), desc="dicom -> png", unit="img", disable=not progress)

    def record(src: str, error: str | None) -> None:
        if error is None:
            report.converted.append(mapping[src])
        else:
            report.failed[src] = error
        bar.update()

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
    log.info("dicom -> png in %s: %s", out_dir, report)
    if report.failed and on_error == "fail":
        shown = "; ".join(f"{k}: {v}" for k, v in list(report.failed.items())[:10])
        raise DataError(f"{len(report.failed)} DICOM files could not be converted: {shown}")
    return report
