"""cRT, classifier re-training (decoupled representation and classifier): after stage-1
training, the backbone is frozen, the head re-initialised and trained again on class-balanced
draws, so the representation learned from the natural distribution is kept and only the
decision layer is re-balanced (params `train.crt`, off with `epochs: 0`).

The frozen backbone is run once over the training and validation images (eval mode, no
augmentation) and the head trains on these features: every cRT epoch then costs a pass of
the head only. The features are what the head consumes: the pooled vector for the linear
head (exact, as it pools first), the whole map for other heads (memory grows with the map).
The epoch with the best val mAP is kept (the head before cRT is not a candidate: this is the
cRT experiment, and the record says whether it beat the head it replaced). Every DDP rank
runs the same deterministic re-training on the full sets, so the ranks end identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlt.errors import DataError
from cxrlt.metrics import average_precision
from cxrlt.models.classifier import Classifier
from cxrlt.models.heads import LinearHead
from cxrlt.params import check_keys
from cxrlt.training.data import CachedImages
from cxrlt.training.samplers import build_sampler, check_sampler


@dataclass(frozen=True)
class CRTConfig:
    epochs: int = 0
    sampler: str = "class_aware"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, samplers: Mapping[str, Any] | None) -> CRTConfig:
        """Checked before any data loads: unknown keys, epochs < 0, an unknown sampler."""
        params = dict(params or {})
        check_keys(params, cls.__dataclass_fields__, "train.crt")
        cfg = cls(**params)
        if isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int) or cfg.epochs < 0:
            raise DataError(f"params train.crt.epochs must be an integer >= 0 (0: off), got {cfg.epochs!r}")
        if not (cfg.lr > 0 and cfg.weight_decay >= 0 and int(cfg.batch_size) > 0):
            raise DataError(f"params train.crt: need lr > 0, weight_decay >= 0, batch_size > 0; got {params}")
        check_sampler(cfg.sampler, (samplers or {}).get(cfg.sampler))
        return cfg


@torch.no_grad()
def head_inputs(model: Classifier, data: CachedImages, batch_size: int = 256) -> torch.Tensor:
    """What the head consumes for every image of `data`, from the frozen backbone (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pool = isinstance(model.head, LinearHead)
    parts = []
    for start in range(0, len(data), batch_size):
        x = data.cache.read_tensor(data.rows[start : start + batch_size], device)
        f = model.features(model.normalise(x)).float()
        parts.append((f.mean(dim=(2, 3), keepdim=True) if pool else f).contiguous().cpu())
    model.train(was_training)
    return torch.cat(parts)


def _reset(head: nn.Module) -> None:
    for m in head.modules():
        if m is not head and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _val_map(head: nn.Module, feats: torch.Tensor, data: CachedImages, device: torch.device) -> float:
    head.eval()
    with torch.no_grad():
        scores = torch.cat([torch.sigmoid(head(feats[i : i + 512].to(device)).float()).cpu()
                            for i in range(0, len(feats), 512)]).numpy()  # fmt: skip
    y = np.where(data.mask, data.targets, np.nan)
    ap = average_precision(y, scores)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def retrain_classifier(
    model: Classifier,
    criterion: nn.Module,
    train: CachedImages,
    val: CachedImages,
    classes: list[str],
    cfg: CRTConfig,
    sampler_settings: Mapping[str, Any] | None,
    seed: int,
    val_map_before: float | None,
) -> dict[str, Any]:
    """Re-train `model.head` in place on frozen features; returns the record for the checkpoint."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    train_feats, val_feats = head_inputs(model, train), head_inputs(model, val)
    sampler = build_sampler(cfg.sampler, sampler_settings, train.targets, train.mask, classes, seed)
    targets, mask = torch.from_numpy(train.targets), torch.from_numpy(train.mask)
    head = model.head
    _reset(head)
    params = [p for p in head.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)  # fmt: skip
    steps = cfg.epochs * max(1, sampler.epoch_length // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history = []
    for epoch in range(cfg.epochs):
        # the whole epoch's order, not a rank's share: every rank re-trains the same way
        order = sampler.order(np.random.default_rng([seed, epoch]))
        head.train()
        for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = torch.from_numpy(order[start : start + cfg.batch_size])
            logits = head(train_feats[idx].to(device))
            loss = criterion(logits, targets[idx].to(device), mask[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        score = _val_map(head, val_feats, val, device)
        history.append(score)
        if best is None or score > best[0]:
            best = (score, epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
    if best is not None:
        head.load_state_dict(best[2])
    return {
        **asdict(cfg),
        "val_mAP_before": val_map_before,
        "val_mAP": None if best is None else best[0],
        "best_epoch": None if best is None else best[1],
        "history": history,
        "epoch_length": sampler.epoch_length,
    }
