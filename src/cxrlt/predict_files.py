"""`cxrlt predict`: a trained checkpoint applied to JPEG, PNG and DICOM files outside the pipeline.

Files are read as the checkpoint's preprocessing record says, with the pipeline's own DICOM
conversion and cache functions (`data/files.py`), and scored by `inference.predict_pixels`, the
forward pass the predict stage runs: the same pixels give the same probabilities as the
pipeline (a test pins it), whatever the batch size.

The output is one CSV row per file, in input order: `path`, `error` (empty when scored) and
`image:<class>`, the image model's probability, for every class of the model (empty when not
scored). An unreadable file is reported and skipped, or, with `strict`, stops the run before
anything is written.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrlt.data.cache import Preprocessing
from cxrlt.data.files import find_images, load_batch
from cxrlt.errors import DataError
from cxrlt.inference import load_checkpoint, predict_pixels, resolve_device
from cxrlt.io import write_csv
from cxrlt.submission import IMAGE_PREFIX

# The image model's own probabilities are `image:<class>` in the pipeline's predictions table
# too; its `p:<class>` are study-level and calibrated, which a single file has no use for.
PREFIX = IMAGE_PREFIX


def _batches(jobs: list[tuple[list[str], Preprocessing]], workers: int) -> Iterator[tuple[np.ndarray, list]]:
    """Loaded batches in order; with workers, at most 2 per worker are held ahead of the model."""
    if workers <= 0:
        yield from map(load_batch, jobs)
        return
    # forkserver: the parent holds torch (maybe CUDA); the workers need neither.
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque[Future] = deque()
        todo = iter(jobs)
        for job in todo:
            pending.append(pool.submit(load_batch, job))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            job = next(todo, None)
            if job is not None:
                pending.append(pool.submit(load_batch, job))
            yield result


@dataclass
class PredictReport:
    """What `predict_files` did; `skipped` maps each unreadable file to the reason."""

    out: str
    device: str
    classes: list[str]
    scored: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def predict_files(
    model_path: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    batch_size: int = 32,
    device: str = "auto",
    strict: bool = False,
    tta_hflip: bool = False,
    workers: int = 0,
    progress: bool = True,
) -> PredictReport:
    """Score every image under `paths` and write the CSV `out` atomically (see the module doc)."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if Path(out).is_dir():
        raise DataError(f"--out {out} is a folder; give a CSV file name")
    files = find_images(paths)
    model, info = load_checkpoint(model_path)
    pre = Preprocessing.from_checkpoint(info, f"checkpoint {model_path}")
    classes = [str(c) for c in info["classes"]]
    dev = resolve_device(device, where="--device")
    model = model.to(dev).eval()
    names = [str(f) for f in files]
    probs = np.full((len(names), len(classes)), np.nan, dtype=np.float32)
    errors: list[str] = [""] * len(names)
    report = PredictReport(str(out), str(dev), classes)
    jobs = [(names[i : i + batch_size], pre) for i in range(0, len(names), batch_size)]
    bar = tqdm(total=len(names), desc="predict", unit="img", disable=not progress)
    try:
        for k, (pixels, batch_errors) in enumerate(_batches(jobs, workers)):
            start = k * batch_size
            good = [start + i for i, e in enumerate(batch_errors) if e is None]
            for i, e in enumerate(batch_errors):
                if e is not None:
                    if strict:
                        raise DataError(f"{names[start + i]}: unreadable ({e}); nothing written (--strict)")
                    errors[start + i] = e
                    report.skipped[names[start + i]] = e
            if good:
                probs[good] = predict_pixels(model, pixels, tta_hflip, dev)
            report.scored += len(good)
            bar.update(len(batch_errors))
    finally:
        bar.close()
    table = pd.DataFrame({"path": names, "error": errors})
    table = pd.concat([table, pd.DataFrame(probs, columns=[f"{PREFIX}{c}" for c in classes])], axis=1)
    write_csv(out, table)
    return report
