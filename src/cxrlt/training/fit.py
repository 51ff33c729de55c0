"""Train the stage-1 image classifier from params and write a self-describing checkpoint."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.io import atomic_path
from cxrlt.models import ModelConfig
from cxrlt.training.augment import AugmentConfig
from cxrlt.training.data import CachedImages, keep_cached, make_loader
from cxrlt.training.module import ImageClassifierModule, OptimConfig

log = logging.getLogger(__name__)


def _sub(cls: type, params: Mapping[str, Any], where: str) -> Any:
    unknown = sorted(set(params) - set(cls.__dataclass_fields__))
    if unknown:
        raise DataError(f"params {where}: unknown keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
    return cls(**params)


def train_counts(manifest: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, int]:
    """Positives per class and number of images in the training split (head/medium/tail)."""
    y = label_matrix(manifest[manifest["split"] == "train"], classes)
    return np.nansum(y, axis=0), int((manifest["split"] == "train").sum())


def fit(
    manifest: pd.DataFrame,
    classes: list[str],
    cache_dir: str | os.PathLike,
    params: Mapping[str, Any],
    out_checkpoint: str | os.PathLike,
    live_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train on split "train", select the epoch by val mAP, save weights + config."""
    tp = params["train"]
    seed = int(params.get("seed", 0))
    L.seed_everything(seed, workers=True)
    if int(tp.get("threads", 0)) > 0:
        torch.set_num_threads(int(tp["threads"]))
    cache = ImageCache(cache_dir)
    manifest = keep_cached(manifest, cache)
    train_df = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_df = manifest[manifest["split"] == "val"].reset_index(drop=True)
    if len(train_df) == 0 or len(val_df) == 0:
        raise ValueError(f"need train and val images, got {len(train_df)} and {len(val_df)}")
    counts, n_train = train_counts(manifest, classes)
    prevalence = counts / n_train
    model_cfg = ModelConfig.from_params(dict(params["model"]))
    module = ImageClassifierModule(
        model_cfg=model_cfg,
        classes=classes,
        loss=params["loss"],
        loss_settings=params.get("losses", {}).get(params["loss"], {}),
        prevalence=prevalence,
        optim=_sub(OptimConfig, tp.get("optim", {}), "train.optim"),
        augment=_sub(AugmentConfig, tp.get("augment", {}), "train.augment"),
        seed=seed,
    )
    workers = int(tp.get("num_workers", 0))
    bs = int(tp["batch_size"])
    train_loader = make_loader(CachedImages(cache, train_df, classes), bs, True, workers, seed, drop_last=True)
    val_loader = make_loader(CachedImages(cache, val_df, classes), int(tp.get("eval_batch_size", bs)), False, workers, seed)

    loggers: list[Any] = []
    if live_dir is not None:
        from dvclive.lightning import DVCLiveLogger

        # dvcyaml=None: dvc.yaml is ours; dvclive must not rewrite it.
        loggers.append(DVCLiveLogger(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None))
    with tempfile.TemporaryDirectory(prefix="cxrlt-ckpt-") as ckpt_dir:
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, monitor="val/mAP", mode="max", save_top_k=1, save_weights_only=True,
            filename="best",
        )
        trainer = L.Trainer(
            max_epochs=int(tp["epochs"]),
            accelerator=tp.get("accelerator", "auto"),
            devices=tp.get("devices", "auto"),
            strategy=tp.get("strategy", "auto"),
            precision=tp.get("precision", "32-true"),
            deterministic=True,
            logger=loggers or False,
            callbacks=[checkpoint],
            enable_progress_bar=bool(tp.get("progress_bar", True)),
            log_every_n_steps=int(tp.get("log_every_n_steps", 10)),
            num_sanity_val_steps=0,
            limit_train_batches=tp.get("limit_train_batches", 1.0),
            enable_model_summary=False,
        )
        trainer.fit(module, train_loader, val_loader)
        best = checkpoint.best_model_path
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"] if best else module.state_dict()
        module.load_state_dict(state)
        best_score = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None
    info = {
        "classes": classes,
        "model": model_cfg.to_dict(),
        "train_counts": counts.tolist(),
        "n_train_images": n_train,
        "val_mAP": best_score,
        "loss": params["loss"],
        "seed": seed,
    }
    if trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes
        save_checkpoint(out_checkpoint, module.model.state_dict(), info)
    return info


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Atomic and byte-reproducible: torch.save names its zip folder after the file, so the
    archive is built in memory (fixed name) rather than in a randomly named temp file."""
    buffer = io.BytesIO()
    torch.save({"state_dict": state_dict, **info}, buffer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        tmp.write_bytes(buffer.getvalue())
