"""Train the stage-1 image classifier from params and write a self-describing checkpoint.

The best epoch (by val mAP) is kept in memory, not in a checkpoint file: under DDP each rank
would otherwise need rank 0's file, which another node cannot see and which rank 0 may delete
first. val mAP is computed on predictions gathered from every rank, so all ranks see the same
value; rank 0's decision and, at the end, rank 0's best weights are broadcast anyway, so every
rank ends with the same weights whatever their buffers did. Rank 0 writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from cxrlt.checkpoint import _plain, save_checkpoint  # noqa: F401 (re-exported)
from cxrlt.data.cache import ImageCache, Preprocessing, keep_cached
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.models import ModelConfig
from cxrlt.params import check_keys
from cxrlt.text.embeddings import text_queries
from cxrlt.training.augment import AugmentConfig
from cxrlt.training.crt import CRTConfig, retrain_classifier
from cxrlt.training.data import CachedImages, ConcatImages, Loaders
from cxrlt.training.init import InitWeights
from cxrlt.training.launch import Layout
from cxrlt.training.module import ImageClassifierModule, OptimConfig
from cxrlt.training.resume import AtomicCheckpointIO, EpochState, TrainState, fingerprint
from cxrlt.training.samplers import build_sampler, check_sampler

log = logging.getLogger(__name__)


def _sub(cls: type, params: Mapping[str, Any], where: str) -> Any:
    check_keys(params, cls.__dataclass_fields__, where)
    return cls(**params)


def train_counts(manifest: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, int]:
    """Positives per class and number of images in the training split (head/medium/tail)."""
    y = label_matrix(manifest[manifest["split"] == "train"], classes)
    return np.nansum(y, axis=0), int((manifest["split"] == "train").sum())


class BestWeights(L.Callback):
    """Keeps a CPU copy of the weights of the epoch with the highest `monitor` (first on ties).

    The same rule as Lightning's ModelCheckpoint(mode="max", save_top_k=1): the first
    validation is always taken, later ones only when strictly better, NaN counts as -inf.
    """

    def __init__(self, monitor: str = "val/mAP"):
        self.monitor = monitor
        self.history: list[float] = []  # the monitored value of every validation, in order
        self.best_epoch: int | None = None
        self.best_score: float | None = None
        self.state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _copy(module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        score = None if value is None else float(value)
        improved = False
        if score is not None:
            current = -math.inf if math.isnan(score) else score
            best = self.best_score
            improved = self.state is None or current > (-math.inf if best is None or math.isnan(best) else best)
        # Rank 0 decides for all (the values agree; this makes agreement a guarantee).
        improved, score = trainer.strategy.broadcast((improved, score), src=0)
        if score is not None:
            self.history.append(score)
        if improved:
            self.state = self._copy(pl_module)
            self.best_epoch, self.best_score = trainer.current_epoch, score

    def state_dict(self) -> dict[str, Any]:
        """In the resumable state (train.state_dir): a resumed run picks from every epoch."""
        return {"history": list(self.history), "best_epoch": self.best_epoch,
                "best_score": self.best_score, "state": self.state}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.best_epoch, self.best_score = state_dict["best_epoch"], state_dict["best_score"]
        self.state = state_dict["state"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.state is None:  # no validation ran: the last weights
            self.state = self._copy(pl_module)
        # Every rank takes rank 0's copy: identical weights and buffers everywhere.
        self.state, self.best_epoch, self.best_score = trainer.strategy.broadcast(
            (self.state, self.best_epoch, self.best_score), src=0
        )


@dataclass
class Trained:
    """What `train_model` returns on every rank: the module holding the selected weights."""

    module: ImageClassifierModule
    info: dict[str, Any]
    global_rank: int = 0
    history: list[float] = field(default_factory=list)  # val mAP per epoch
    state: TrainState | None = None  # the resumable state (train.state_dir), cleared by `fit`


def fit(
    manifest: pd.DataFrame,
    classes: list[str],
    cache_dir: str | os.PathLike,
    params: Mapping[str, Any],
    out_checkpoint: str | os.PathLike,
    live_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train on split "train", select the epoch by val mAP, save weights + config (rank 0)."""
    trained = train_model(manifest, classes, cache_dir, params, live_dir)
    if trained.global_rank == 0:  # under DDP every rank holds the same weights; one writes
        save_checkpoint(out_checkpoint, trained.module.model.state_dict(), trained.info)
    if trained.state is not None:  # written: the next run starts from scratch
        trained.state.clear()
    return trained.info


@dataclass
class TrainingData:
    """The images one training run fits and selects on, and the class statistics its loss
    and sampler use (from the training images actually used)."""

    train: CachedImages | ConcatImages
    val: CachedImages | ConcatImages
    counts: np.ndarray  # (soft) positives per class among the training images
    prevalence: np.ndarray  # counts / images whose label is known, per class

    @classmethod
    def of(cls, train: CachedImages | ConcatImages, val: CachedImages | ConcatImages) -> TrainingData:
        counts = (train.targets * train.mask).sum(axis=0, dtype=np.float64)
        known = train.mask.sum(axis=0)
        return cls(train, val, counts, counts / np.maximum(known, 1))


def cxrlt_data(
    manifest: pd.DataFrame, classes: list[str], cache: ImageCache
) -> tuple[TrainingData, pd.DataFrame]:
    """Splits train and val of the CXR-LT manifest (images the cache could not read dropped)."""
    manifest = keep_cached(manifest, cache)
    train_df = manifest[manifest["split"] == "train"].reset_index(drop=True)
    val_df = manifest[manifest["split"] == "val"].reset_index(drop=True)
    if len(train_df) == 0 or len(val_df) == 0:
        raise ValueError(f"need train and val images, got {len(train_df)} and {len(val_df)}")
    counts, n_train = train_counts(manifest, classes)
    data = TrainingData(CachedImages(cache, train_df, classes), CachedImages(cache, val_df, classes),
                        counts, counts / n_train)  # fmt: skip
    return data, manifest


def train_model(
    manifest: pd.DataFrame,
    classes: list[str],
    cache_dir: str | os.PathLike,
    params: Mapping[str, Any],
    live_dir: str | os.PathLike | None = None,
    *,
    data: TrainingData | None = None,
    init: InitWeights | None = None,
) -> Trained:
    """Train on split "train" and load the weights of the best val mAP epoch, on every rank.

    `data` replaces the CXR-LT train/val images (noisy-student rounds); `manifest` still gives
    the training counts recorded for head/medium/tail. `init` (default: from `train.init`)
    sets the starting weights. With `train.state_dir` set, a run killed after an epoch
    resumes from it (see `cxrlt.training.resume`); the caller clears the state once the
    result is safe."""
    check_training_params(params)  # bad settings fail before data loads
    if init is None:
        init = InitWeights.from_params(params)
    cache = ImageCache(cache_dir)
    # what made the pixels, for the checkpoint (a bad setting fails before training)
    preprocessing = Preprocessing.from_params(dict(params), cache.size)
    own, manifest = cxrlt_data(manifest, classes, cache)

    def key() -> dict[str, Any]:
        return fingerprint(params, classes, manifest, cache_dir, init.identity())

    return train_on(own if data is None else data, classes, params, live_dir, init=init,
                    preprocessing=preprocessing, group_counts=(own.counts, len(own.train)), resume_key=key)  # fmt: skip


@dataclass(frozen=True)
class TrainSettings:
    """The checked settings `train_on` reads (everything but the model and the loss)."""

    sampler: str
    sampler_settings: Mapping[str, Any]
    layout: Layout  # devices, nodes, strategy, precision, compile
    drw_epoch: int | None
    ema_decay: float
    crt: CRTConfig


def check_training_params(params: Mapping[str, Any]) -> TrainSettings:
    """The settings `train_on` reads, checked without touching data: callers run it before
    loading anything, and `train_on` takes its values from here."""
    tp = params["train"]
    name = str(params.get("sampler", "random"))
    settings = (params.get("samplers") or {}).get(name) or {}
    check_sampler(name, settings)
    layout = Layout.from_params(tp)
    drw_epoch, ema_decay = _schedules(tp)
    crt = CRTConfig.from_params(tp.get("crt"), params.get("samplers"))
    return TrainSettings(name, settings, layout, drw_epoch, ema_decay, crt)


def train_on(
    data: TrainingData,
    classes: list[str],
    params: Mapping[str, Any],
    live_dir: str | os.PathLike | None,
    *,
    init: InitWeights,
    preprocessing: Preprocessing,
    group_counts: tuple[np.ndarray, int],
    resume_key: Callable[[], dict[str, Any]] | None = None,
) -> Trained:
    """The training run itself on any images (CXR-LT, external sources, pseudo-labelled).

    `group_counts` (positives per class, training images) is what the checkpoint records for
    the head/medium/tail rule; `resume_key` (the fingerprint) is needed for `train.state_dir`.
    """
    tp = params["train"]
    seed = int(params.get("seed", 0))
    ts = check_training_params(params)
    sampler_name, sampler_settings, layout = ts.sampler, ts.sampler_settings, ts.layout
    drw_epoch, ema_decay, crt = ts.drw_epoch, ts.ema_decay, ts.crt
    L.seed_everything(seed, workers=True)
    if int(tp.get("threads", 0)) > 0:
        torch.set_num_threads(int(tp["threads"]))
    counts, n_train = group_counts
    model_cfg = ModelConfig.from_params(dict(params["model"]))
    queries = text_queries(params, classes)  # None unless model.head_args.queries is text
    module = ImageClassifierModule(
        model_cfg=model_cfg,
        classes=classes,
        loss=params["loss"],
        loss_settings=params.get("losses", {}).get(params["loss"], {}),
        prevalence=data.prevalence,
        optim=_sub(OptimConfig, tp.get("optim", {}), "train.optim"),
        augment=_sub(AugmentConfig, tp.get("augment", {}), "train.augment"),
        seed=seed,
        counts=data.counts,
        drw_epoch=drw_epoch,
        ema_decay=ema_decay,
        query_embeddings=None if queries is None else queries.vectors,
        compile_model=layout.compile,
    )
    init_record = init.apply(module.model)
    if init_record is not None and module.ema is not None:  # the average starts from the initial weights
        module.ema.load_state_dict(module.model.state_dict())
    workers = int(tp.get("num_workers", 0))
    bs = int(tp["batch_size"])
    sampler = build_sampler(
        sampler_name, sampler_settings, data.train.targets, data.train.mask, classes, seed
    )
    if sampler.epoch_length < bs:  # training drops the last partial batch: no step at all
        raise DataError(f"{sampler.epoch_length} training images per epoch, fewer than train.batch_size {bs}: "
                        "no full batch to train on; lower train.batch_size")  # fmt: skip
    loaders = Loaders(
        data.train, data.val, sampler, bs, int(tp.get("eval_batch_size", bs)), workers, seed,
    )  # fmt: skip

    state, callbacks = None, []
    if tp.get("state_dir"):
        if resume_key is None:
            raise ValueError("train.state_dir needs a resume_key (the run's fingerprint)")
        state = TrainState(tp["state_dir"], resume_key(), rank_zero_only.rank)
        state.prepare()
        callbacks.append(EpochState(state.ckpt, state.fp["digest"], state.resume_from is not None,
                                    None if live_dir is None else Path(live_dir)))  # fmt: skip
    loggers: list[Any] = []
    if live_dir is not None:
        from dvclive.lightning import DVCLiveLogger

        resuming = state is not None and state.resume_from is not None
        if resuming and rank_zero_only.rank == 0:
            state.restore_live(live_dir)
        # dvcyaml=None: dvc.yaml is ours; dvclive must not rewrite it.
        loggers.append(DVCLiveLogger(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None,
                                     resume=resuming))  # fmt: skip
    best = BestWeights("val/mAP")
    trainer = L.Trainer(
        max_epochs=int(tp["epochs"]),
        **layout.trainer_kwargs(os.environ),
        deterministic=True,
        logger=loggers or False,
        callbacks=[best, *callbacks],
        enable_checkpointing=False,  # no ModelCheckpoint: the best weights stay in memory
        plugins=[AtomicCheckpointIO()] if state is not None else None,
        enable_progress_bar=bool(tp.get("progress_bar", True)),
        log_every_n_steps=int(tp.get("log_every_n_steps", 10)),
        num_sanity_val_steps=0,
        limit_train_batches=tp.get("limit_train_batches", 1.0),
        enable_model_summary=False,
        use_distributed_sampler=False,  # Loaders shard train (sampler) and val per rank
    )
    resume_from = None if state is None else state.resume_from
    trainer.fit(module, datamodule=loaders, ckpt_path=resume_from, weights_only=True if resume_from else None)
    module.load_state_dict(best.state)
    if module.ema is not None:  # the selected epoch's EMA weights are the model
        module.model.load_state_dict(module.ema.state_dict())
    info = {
        "classes": classes,
        "model": model_cfg.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "train_counts": counts.tolist(),
        "n_train_images": n_train,
        "val_mAP": best.best_score,
        "best_epoch": best.best_epoch,  # 0-based
        "loss": params["loss"],
        "sampler": sampler_name,
        "drw_epoch": drw_epoch,
        "ema_decay": ema_decay,
        "epoch_length": sampler.epoch_length,
        "seed": seed,
    }
    if init_record is not None:  # recorded only when not from scratch: default checkpoints stay as they were
        info["init"] = init_record
    if queries is not None:  # what a new label set's embeddings must match (zero-shot scoring)
        info["label_embeddings"] = {**queries.recipe, "file": str(params["text"]["out"])}
    if crt.epochs > 0:  # recorded only when on: the default checkpoint stays as it was
        info["crt"] = retrain_classifier(
            module.model, module.criterion, data.train, data.val, classes, crt,
            (params.get("samplers") or {}).get(crt.sampler), seed, best.best_score,
        )  # fmt: skip
    return Trained(module, info, int(trainer.global_rank), list(best.history), state)


def _schedules(tp: Mapping[str, Any]) -> tuple[int | None, float]:
    """train.drw_epoch (None or an epoch >= 0) and train.ema_decay (0 = off, else in (0, 1))."""
    drw = tp.get("drw_epoch")
    if drw is not None and (isinstance(drw, bool) or not isinstance(drw, int) or drw < 0):
        raise DataError(f"params train.drw_epoch must be null or an epoch number >= 0, got {drw!r}")
    ema = tp.get("ema_decay", 0.0) or 0.0
    if isinstance(ema, bool) or not isinstance(ema, int | float) or not 0 <= ema < 1:
        raise DataError(f"params train.ema_decay must be 0 (off) or in (0, 1), got {ema!r}")
    return drw, float(ema)
