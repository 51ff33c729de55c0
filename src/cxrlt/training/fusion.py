"""Stage 2: train the study-level fusion model on the stage-1 backbone (params `fuse`).

Studies come from the manifest (`models.fusion.group_studies`: views in slot order, study
label = union of its images' labels). With the backbone frozen (the default) its feature
maps are computed once per image (eval mode, no augmentation) and every epoch trains the
tokenizer, embeddings, encoder and head on them; fine-tuned, every step runs the backbone
on the cached pixels. Training draws a random subset of a study's views when it has more
than `max_views` (`random_views`); validation and prediction use the fixed rule. The epoch
with the best val mAP (per image, every image holding its study's prediction, as the
challenge scores) is kept, like stage 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlt.checkpoint import save_checkpoint
from cxrlt.data.cache import ImageCache, keep_cached
from cxrlt.errors import DataError
from cxrlt.inference import (
    StudyTable,
    image_features,
    load_checkpoint,
    resolve_device,
    study_logits,
)
from cxrlt.losses import build_loss
from cxrlt.metrics import average_precision
from cxrlt.models.fusion import FusionConfig, FusionModel
from cxrlt.params import settings_section
from cxrlt.training.samplers import SAMPLERS, build_sampler


@dataclass(frozen=True)
class FuseTrainConfig:
    epochs: int = 10
    batch_size: int = 32  # studies per step
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    random_views: bool = True
    device: str = "auto"
    feature_batch_size: int = 128
    # Which studies an epoch shows: `stage1` uses the top-level `sampler` (and its
    # `samplers.<name>` settings) over studies and their union labels, or name one. The
    # default here is what runs made before the key existed did; params.yaml sets `stage1`.
    sampler: str = "random"

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FuseTrainConfig:
        keys = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        cfg = cls(**keys)
        valid = ("stage1", *sorted(SAMPLERS))
        if cfg.sampler not in valid:
            raise DataError(f"params fuse.sampler: unknown sampler {cfg.sampler!r}; valid: {', '.join(valid)}")
        if isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int) or cfg.epochs < 1:
            raise DataError(f"params fuse.epochs must be an integer >= 1, got {cfg.epochs!r}")
        if not (cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.batch_size > 0 and 0 <= cfg.warmup_fraction < 1):
            raise DataError(f"params fuse: need lr > 0, weight_decay >= 0, batch_size > 0, "
                            f"0 <= warmup_fraction < 1; got {asdict(cfg)}")  # fmt: skip
        return cfg


FUSE_KEYS = ("checkpoint", "live_dir", "model", *FuseTrainConfig.__dataclass_fields__)


def fuse_settings(params: Mapping[str, Any]) -> tuple[FusionConfig, FuseTrainConfig]:
    """`fuse.model` and the training knobs, checked before any data loads."""
    fp = settings_section(params, "fuse", FUSE_KEYS)
    return FusionConfig.from_params(dict(fp.get("model") or {})), FuseTrainConfig.from_params(fp)


def _val_map(scores: np.ndarray, y: np.ndarray) -> float:
    ap = average_precision(y, scores)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def fit_fusion(
    manifest: pd.DataFrame,
    classes: list[str],
    cache_dir: str | os.PathLike,
    stage1_checkpoint: str | os.PathLike,
    params: Mapping[str, Any],
    out_checkpoint: str | os.PathLike,
    live_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train on the training studies, select the epoch by val mAP, save a self-contained
    checkpoint (backbone included, so prediction needs no other file)."""
    fcfg, tcfg = fuse_settings(params)
    seed = int(params.get("seed", 0))
    classifier, info1 = load_checkpoint(stage1_checkpoint)
    if list(info1["classes"]) != list(classes):
        raise DataError(f"{stage1_checkpoint}: its classes are not the task's (re-run the train stage)")
    device = resolve_device(tcfg.device)
    cache = ImageCache(cache_dir)
    manifest = keep_cached(manifest, cache)
    val_rows = manifest[manifest["split"] == "val"].reset_index(drop=True)
    table = StudyTable(manifest[manifest["split"] == "train"], classes, fcfg.max_views)
    train = table.studies
    if not train or val_rows.empty:
        raise DataError(f"fuse: need training studies and val images, got {len(train)} and {len(val_rows)}")
    val = StudyTable(val_rows, classes, fcfg.max_views)
    labels = table.labels
    mask = ~np.isnan(labels)
    # The sampler first: a class it cannot draw (no positive training study) is an error
    # before the backbone's pass over every image, not after.
    name = str(params.get("sampler", "random")) if tcfg.sampler == "stage1" else tcfg.sampler
    sampler = build_sampler(name, (params.get("samplers") or {}).get(name), np.nan_to_num(labels, nan=0.0),
                            mask, classes, seed)  # fmt: skip
    torch.manual_seed(seed)
    model = FusionModel(classifier, fcfg, len(classes)).to(device)
    frozen = fcfg.freeze_backbone
    train_ids = sorted({i for s in train for i in s.all_image_ids})
    feats = None
    if frozen:  # one pass of the fixed backbone over every image stage 2 will see
        ids = train_ids + val.image_ids  # studies never span splits
        feats = image_features(model, cache, ids, tcfg.feature_batch_size, device)
        index = {i: k for k, i in enumerate(ids)}
    else:
        index = None
    counts = np.nansum(labels, axis=0)
    criterion = build_loss(params["loss"], (params.get("losses") or {}).get(params["loss"], {}),
                           counts / len(train), counts).to(device)  # fmt: skip
    targets = torch.from_numpy(np.nan_to_num(labels, nan=0.0).astype(np.float32))
    known = torch.from_numpy(mask)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr)  # fmt: skip
    steps_per_epoch = max(1, sampler.epoch_length // tcfg.batch_size)
    total = tcfg.epochs * steps_per_epoch
    warmup = int(total * tcfg.warmup_fraction)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    live = None
    if live_dir is not None:
        from dvclive import Live

        live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[float] = []
    for epoch in range(tcfg.epochs):
        rng = np.random.default_rng([seed, epoch])
        order = sampler.order(rng)  # `random`: rng.permutation(len(train))
        slots = table.slots(rng if tcfg.random_views else None)
        model.train()
        losses = []
        for start in range(0, steps_per_epoch * tcfg.batch_size, tcfg.batch_size):
            idx = order[start : start + tcfg.batch_size]
            logits = study_logits(model, cache, slots, idx, device, feats, index)
            loss = criterion(logits, targets[idx].to(device), known[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            scores = val.predict(model, cache, tcfg.feature_batch_size, device, feats, index)
        score = _val_map(scores, val.image_labels)
        history.append(score)
        if live is not None:
            live.log_metric("train/loss", float(np.mean(losses)))
            live.log_metric("val/mAP", score)
            live.next_step()
        if best is None or score > best[0]:
            best = (score, epoch, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
    if live is not None:
        live.end()
    assert best is not None
    info = {
        "classes": classes,
        "model": classifier.cfg.to_dict(),
        "fusion": fcfg.to_dict(),
        "train_counts": info1["train_counts"],
        "n_train_images": info1["n_train_images"],
        "n_train_studies": len(train),
        "val_mAP": best[0],
        "best_epoch": best[1],
        "history": history,
        "loss": params["loss"],
        "seed": seed,
        "stage1_val_mAP": info1.get("val_mAP"),
        "train": asdict(tcfg),
    }
    if name != "random":  # recorded only when on: the default checkpoint stays as it was
        info["sampler"] = name
    save_checkpoint(out_checkpoint, best[2], info)
    return info
