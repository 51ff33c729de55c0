"""The train stage: stage 1 (the teacher), then optional noisy-student rounds.

`noisy_student.rounds` (0: plain stage 1, the checkpoint exactly as `fit` writes it). Round r:
the current teacher predicts the *train* split of the enabled external sources (the mean of
the image and its mirror with `tta_hflip`); each source's observed labels are kept exactly and
only its unknown ones (NaN) are filled with the teacher's probabilities. The table goes to
`<pseudo_dir>/round<r>.parquet`. A fresh student (new weights from the same `train.init`, new
optimizer, schedule and best-epoch selection, made by `train_model` as the teacher was, never
resumed) trains on CXR-LT train plus those images, and its best epoch is picked by mAP on
CXR-LT val, a patient-level split carved from train. The student is the next round's teacher.

Saved model (`train.checkpoint`): the highest val mAP among the stage-1 teacher (round 0)
and every student, the earliest on ties (so a student must beat the teacher to replace it).
The per-round records go to `<pseudo_dir>/rounds.json` and, when rounds > 0, to the
checkpoint's `noisy_student` entry.

What never reaches training: CXR-LT dev/test images (students train on CXR-LT train only and
select on val), the external sources' val splits, and Task 3 labels (the tables hold the
training classes only).

Soft targets: every loss in SOFT_TARGET_LOSSES is a sum t * (positive term) + (1 - t) *
(negative term) or a smooth form of it (focal's p_t, ldam's margin t * m), so a target in
[0, 1] has a loss minimised at an interior probability that rises with t
(tests/test_student.py checks each). A loss not listed is refused when rounds > 0. Samplers
(`class_aware`, `repeat_factor`) count a soft target as a positive when it is > 0.5, the
same rule as for hard labels (`cxrlt.training.samplers`): a pseudo-label counts where the
teacher calls it positive.

Resume: the teacher keeps `train.state_dir` as plain stage 1 does, and its state is cleared
only once the checkpoint is written, so a run killed during a round takes the finished teacher
from it instead of training it again; students are never resumed. Under DDP every rank
predicts with the same weights and then takes rank 0's table; rank 0 writes the files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cxrlt.checkpoint import save_checkpoint
from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.inference import predict, resolve_device
from cxrlt.io import write_json, write_parquet
from cxrlt.models import Classifier
from cxrlt.params import settings_section
from cxrlt.training.data import CachedImages, ConcatImages
from cxrlt.training.fit import TrainingData, check_training_params, cxrlt_data, fit, train_model
from cxrlt.training.init import InitWeights
from cxrlt.training.sources import Source, check_sources, load_sources

KEYS = ("rounds", "sources", "tta_hflip", "batch_size", "pseudo_dir", "epochs", "device")
SOFT_TARGET_LOSSES = ("bce", "wbce", "focal", "asl", "ral", "cb", "db", "ldam", "la")
RECORDS = "rounds.json"


def _int(value: object, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DataError(f"params {where} must be an integer >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class NoisyStudentConfig:
    rounds: int
    sources: tuple[str, ...]
    pseudo_dir: str
    tta_hflip: bool = True
    batch_size: int = 128
    epochs: int | None = None  # of each student; None: train.epochs
    device: str = "auto"  # where the teacher predicts

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> NoisyStudentConfig:
        """The `noisy_student` section, checked before any data loads."""
        p = settings_section(params, "noisy_student", KEYS)
        pseudo_dir = p.get("pseudo_dir")
        if not isinstance(pseudo_dir, str) or not pseudo_dir:
            raise DataError(f"params noisy_student.pseudo_dir must be a folder path, got {pseudo_dir!r}")
        tta = p.get("tta_hflip", True)
        if not isinstance(tta, bool):
            raise DataError(f"params noisy_student.tta_hflip must be true or false, got {tta!r}")
        epochs = p.get("epochs")
        device = p.get("device", "auto")
        resolve_device(str(device), "params noisy_student.device")
        cfg = cls(
            rounds=_int(p.get("rounds", 0), "noisy_student.rounds", 0),
            sources=tuple(check_sources(params, p.get("sources") or [], "noisy_student.sources")),
            pseudo_dir=pseudo_dir,
            tta_hflip=tta,
            batch_size=_int(p.get("batch_size", 128), "noisy_student.batch_size", 1),
            epochs=None if epochs is None else _int(epochs, "noisy_student.epochs", 1),
            device=str(device),
        )
        if cfg.rounds > 0:
            if not cfg.sources:
                raise DataError("params noisy_student.rounds > 0 needs at least one source in noisy_student.sources")
            loss = str(params.get("loss", "bce"))
            if loss not in SOFT_TARGET_LOSSES:
                raise DataError(f"loss {loss!r} is not checked for soft targets (pseudo-labels in [0, 1]); "
                                f"noisy_student.rounds > 0 works with: {', '.join(SOFT_TARGET_LOSSES)}")  # fmt: skip
        return cfg

    def student_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The training params of a student: the teacher's, never resumed, own epoch count."""
        train = {**params["train"], "state_dir": None}
        if self.epochs is not None:
            train["epochs"] = self.epochs
        return {**params, "train": train}


def select(scores: Sequence[float | None]) -> int:
    """Index of the highest score, the earliest on ties; None and NaN count as -inf."""
    values = [-math.inf if s is None or math.isnan(s) else float(s) for s in scores]
    return max(range(len(values)), key=lambda i: (values[i], -i))


def pseudo_labels(
    model: Classifier, sources: Sequence[Source], classes: Sequence[str], cfg: NoisyStudentConfig
) -> tuple[pd.DataFrame, np.ndarray]:
    """image_id, source and one column per class for every source's train split: observed
    labels as they are, unknown ones the teacher's probabilities; and where it filled (n, C)."""
    device = resolve_device(cfg.device, "params noisy_student.device")
    frames, filled = [], []
    for s in sources:
        df = s.split("train")
        if not len(df):
            continue
        y = label_matrix(df, classes)
        unknown = np.isnan(y)
        filled.append(unknown)
        if unknown.any():
            p = predict(model, s.cache, df["image_id"].astype(str), cfg.batch_size, cfg.tta_hflip, device)
            y = np.where(unknown, p, y).astype(np.float32)
        frame = pd.DataFrame(y, columns=list(classes))
        frame.insert(0, "source", s.name)
        frame.insert(0, "image_id", df["image_id"].astype(str).to_numpy())
        frames.append(frame)
    model.cpu()  # the GPU is the student's
    if not frames:
        raise DataError(f"noisy_student.sources {[s.name for s in sources]}: no train images to pseudo-label")
    table = pd.concat(frames, ignore_index=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # rank 0's table for all
        box = [table]
        torch.distributed.broadcast_object_list(box, src=0)
        table = box[0]
    return table, np.concatenate(filled)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _summary(info: Mapping[str, Any]) -> dict[str, Any]:
    return {"val_mAP": _finite(info["val_mAP"]), "best_epoch": info["best_epoch"]}


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _clear_outputs(pseudo_dir: Path) -> None:
    """No table or record of an earlier run survives this one."""
    if rank_zero_only.rank == 0 and pseudo_dir.is_dir():
        for f in [*pseudo_dir.glob("round*.parquet"), pseudo_dir / RECORDS]:
            f.unlink(missing_ok=True)


def train_stage1(
    manifest: pd.DataFrame,
    classes: list[str],
    cache_dir: str | os.PathLike,
    params: Mapping[str, Any],
    out_checkpoint: str | os.PathLike,
    live_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Stage 1, then `noisy_student.rounds` rounds; writes the checkpoint (the best val mAP of
    the teacher and the students) and `<pseudo_dir>/rounds.json`; returns the checkpoint info."""
    cfg = NoisyStudentConfig.from_params(params)
    check_training_params(params)
    init = InitWeights.from_params(params)  # every student starts here, as the teacher did
    pseudo_dir = Path(cfg.pseudo_dir)
    _clear_outputs(pseudo_dir)
    if cfg.rounds == 0:
        info = fit(manifest, classes, cache_dir, params, out_checkpoint, live_dir)
        if rank_zero_only.rank == 0:
            write_json(pseudo_dir / RECORDS, {"rounds": []})
        return info

    cache = ImageCache(cache_dir)
    sources = load_sources(params, cfg.sources, cache.size)  # fails before the teacher trains
    own, _ = cxrlt_data(manifest, classes, cache)
    teacher = train_model(manifest, classes, cache_dir, params, live_dir, init=init)
    state = teacher.state
    student_params = cfg.student_params(params)
    best = (_cpu_copy(teacher.module.model), teacher.info)
    scores, records, current = [teacher.info["val_mAP"]], [], teacher
    for r in range(1, cfg.rounds + 1):
        table, filled = pseudo_labels(current.module.model, sources, classes, cfg)
        path = pseudo_dir / f"round{r}.parquet"
        if rank_zero_only.rank == 0:
            write_parquet(path, table)
        parts = [CachedImages(s.cache, table[table["source"] == s.name], classes)
                 for s in sources if (table["source"] == s.name).any()]  # fmt: skip
        data = TrainingData.of(ConcatImages([own.train, *parts]), own.val)
        student = train_model(manifest, classes, cache_dir, student_params, None, data=data, init=init)
        values = table[list(classes)].to_numpy(dtype=np.float64)[filled]
        records.append({
            "round": r, **_summary(student.info), "history": [_finite(v) for v in student.history],
            "train_images": len(data.train), "pseudo_images": len(table),
            "pseudo_images_per_source": {str(k): int(v) for k, v in table["source"].value_counts(sort=False).items()},
            "filled_labels": int(filled.sum()),
            "mean_filled_probability": _finite(float(values.mean())) if len(values) else None,
            "file": str(path),
        })  # fmt: skip
        scores.append(student.info["val_mAP"])
        if select(scores) == r:
            best = (_cpu_copy(student.module.model), student.info)
        current = student
    chosen = select(scores)
    summary = {"teacher": _summary(teacher.info), "rounds": records, "selected": chosen}
    info = {**best[1], "noisy_student": summary}
    if current.global_rank == 0:
        save_checkpoint(out_checkpoint, best[0], info)
        write_json(pseudo_dir / RECORDS, summary)
    if state is not None:  # written: the next run starts from scratch
        state.clear()
    return info

