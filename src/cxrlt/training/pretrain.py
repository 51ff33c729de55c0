"""Pretraining the backbone on the external sources before stage 1 (`pretrain` stage).

The model is the stage-1 model (same backbone, `model.*` settings) with a linear head over
the Task 1 classes that the enabled sources label positive at least once; labels a source
does not annotate are unknown and masked out of the loss. Selection is by mAP on the
sources' own val splits. Stage 1 takes the backbone with `train.init: pretrained`
(`cxrlt.training.init`). Everything else (augmentation, precision, devices) follows `train`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrlt.checkpoint import save_checkpoint
from cxrlt.data.cache import Preprocessing
from cxrlt.errors import DataError
from cxrlt.io import write_text
from cxrlt.labels import training_classes
from cxrlt.models import ModelConfig
from cxrlt.params import settings_section
from cxrlt.training.init import InitWeights
from cxrlt.training.sources import annotated_classes, check_sources, images, load_sources

KEYS = ("sources", "checkpoint", "live_dir", "epochs", "loss", "loss_settings", "batch_size", "optim", "dropout")
# What pretraining takes from `train` and `model` (dvc.yaml lists exactly these, so that
# e.g. -S train.epochs=10 or -S loss=asl does not re-run it).
TRAIN_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "compile", "threads", "eval_batch_size",
              "num_workers", "progress_bar", "augment", "optim")  # fmt: skip
MODEL_KEYS = ("backbone", "pretrained", "in_chans", "channels_last")


@dataclass(frozen=True)
class PretrainConfig:
    sources: list[str]
    checkpoint: str
    live_dir: str | None = None
    epochs: int = 4
    loss: str = "bce"
    loss_settings: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    optim: dict[str, Any] = field(default_factory=dict)  # overrides of train.optim's keys
    dropout: float = 0.1

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PretrainConfig:
        p = settings_section(params, "pretrain", KEYS)
        if "checkpoint" not in p:
            raise DataError("params pretrain.checkpoint is missing")
        epochs = p.get("epochs", 4)
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise DataError(f"params pretrain.epochs must be an integer >= 1, got {epochs!r}")
        return cls(
            sources=check_sources(params, p.get("sources") or [], "pretrain.sources"),
            checkpoint=str(p["checkpoint"]),
            live_dir=p.get("live_dir"),
            epochs=epochs,
            loss=str(p.get("loss", "bce")),
            loss_settings=dict(p.get("loss_settings") or {}),
            batch_size=int(p.get("batch_size", 32)),
            optim=dict(p.get("optim") or {}),
            dropout=float(p.get("dropout", 0.1)),
        )

    def training_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The params `train_on` reads, for this run: only TRAIN_KEYS and MODEL_KEYS come from
        `train` and `model`; one plain schedule, random sampling, no cRT, no resume."""
        tp, mp = params["train"], params["model"]
        train = {k: tp[k] for k in TRAIN_KEYS if k in tp}
        train.update(epochs=self.epochs, batch_size=self.batch_size, optim={**dict(train.get("optim") or {}), **self.optim},
                     state_dir=None, drw_epoch=None, ema_decay=0.0, crt={"epochs": 0})  # fmt: skip
        model = {k: mp[k] for k in MODEL_KEYS if k in mp}
        model.update(head="linear", head_args={"dropout": self.dropout})
        return {"seed": params.get("seed", 0), "task": params["task"], "loss": self.loss,
                "losses": {self.loss: self.loss_settings}, "sampler": "random", "samplers": {},
                "train": train, "model": model}  # fmt: skip


def pretrain(params: Mapping[str, Any]) -> dict[str, Any]:
    """Train on the enabled sources and write `pretrain.checkpoint`; with no source enabled,
    write a checkpoint that says so (stage 1 with `train.init: pretrained` then starts from
    scratch and records why)."""
    from cxrlt.training.fit import TrainingData, train_on  # lightning: imported when training

    cfg = PretrainConfig.from_params(params)
    if not cfg.sources:
        reason = "no external source enabled (params pretrain.sources is empty)"
        model = ModelConfig.from_params(dict(params["model"])).to_dict()
        save_checkpoint(cfg.checkpoint, {}, {"skipped": reason, "model": model, "classes": [], "sources": []})
        if cfg.live_dir:  # the stage's declared outputs exist either way
            Path(cfg.live_dir, "plots", "metrics").mkdir(parents=True, exist_ok=True)
            write_text(Path(cfg.live_dir) / "metrics.json", '{"skipped": true}\n')
        return {"skipped": reason}
    run = cfg.training_params(params)
    sources = load_sources(params, cfg.sources)
    classes = annotated_classes(sources, list(training_classes(params["task"])))
    if not classes:
        raise DataError(f"pretrain.sources {cfg.sources}: no Task 1 class has a positive training label")
    train, val = images(sources, "train", classes), images(sources, "val", classes)
    data = TrainingData.of(train, val)
    preprocessing = Preprocessing.from_params(dict(params), sources[0].cache.size)
    trained = train_on(data, classes, run, cfg.live_dir, init=InitWeights("scratch"), preprocessing=preprocessing,
                       group_counts=(data.counts, len(train)))  # fmt: skip
    info = {**trained.info, "sources": cfg.sources,
            "images": {"train": len(train), "val": len(val)}}  # fmt: skip
    if trained.global_rank == 0:
        save_checkpoint(cfg.checkpoint, trained.module.model.state_dict(), info)
    return info
