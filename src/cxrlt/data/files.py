"""Image files as the model's input, torch-free so that loader processes start quickly.

A file gets exactly what the pipeline did to the training images, as a checkpoint's
preprocessing record (`cache.Preprocessing`) describes it: a DICOM goes through the pipeline's
DICOM conversion (`dicom.py`: modality and VOI LUTs, MONOCHROME1 inverted) at the recorded
depth, then every image through the cache's decode, resize and padding (`cache.py`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cxrlt.data.cache import Preprocessing, resize_pad
from cxrlt.data.dicom import dicom_to_array
from cxrlt.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: str | os.PathLike) -> bool:
    """By suffix, else by the `DICM` marker after the 128-byte preamble (DICOM files often
    have no suffix at all)."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given (any name), and under folders, recursively and sorted, the JPEG, PNG and
    DICOM files (hidden ones left out); each file once, in the order first met."""
    found: list[Path] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            inside = [f for f in sorted(p.rglob("*"))
                      if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                      and (f.suffix.lower() in IMAGE_SUFFIXES + DICOM_SUFFIXES or is_dicom(f))]  # fmt: skip
            if not inside:
                raise DataError(f"{p}: no JPEG, PNG or DICOM files in this folder")
            found.extend(inside)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def load_image(path: str | os.PathLike, pre: Preprocessing) -> np.ndarray:
    """uint8 (size, size) model input of one file: the pipeline's own functions, in its order."""
    if is_dicom(path):
        # The pipeline writes this array as a PNG and the cache reads it back: the same pixels.
        return resize_pad(Image.fromarray(dicom_to_array(path, bits=pre.dicom_bits)), pre.size, pre.bits_stored,
                          pre.decoder)  # fmt: skip
    return pre.load(path)


def load_batch(args: tuple[list[str], Preprocessing]) -> tuple[np.ndarray, list[str | None]]:
    """Worker: the batch's pixels (readable files only) and per file None or the reason."""
    paths, pre = args
    images, errors = [], []
    for p in paths:
        try:
            images.append(load_image(p, pre))
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure is reported per file
            errors.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
    stack = np.stack(images) if images else np.zeros((0, pre.size, pre.size), dtype=np.uint8)
    return stack, errors
