"""LightningModule for the image-level (stage 1) classifier."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from cxrlt.losses import build_loss
from cxrlt.models import ModelConfig, build_model
from cxrlt.training.augment import AugmentConfig, augment_batch


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01


class ImageClassifierModule(L.LightningModule):
    def __init__(
        self,
        model_cfg: ModelConfig,
        classes: Sequence[str],
        loss: str,
        loss_settings: Mapping[str, Any] | None,
        prevalence: np.ndarray,
        optim: OptimConfig,
        augment: AugmentConfig,
        seed: int = 0,
    ):
        super().__init__()
        self.classes = list(classes)
        self.model = build_model(model_cfg, len(self.classes))
        self.criterion = build_loss(loss, loss_settings, prevalence)
        self.optim, self.augment = optim, augment
        self.aug_gen = torch.Generator().manual_seed(seed)
        self._val_scores: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._val_masks: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self.model.normalise(batch["image"])
        x = augment_batch(x, self.augment, self.aug_gen, std=self.model.cfg.std)
        logits = self.model.head(self.model.features(x))
        loss = self.criterion(logits, batch["target"], batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.model(batch["image"])
        loss = self.criterion(logits, batch["target"], batch["mask"])
        self.log("val/loss", loss, on_epoch=True, batch_size=len(logits), sync_dist=True)
        self._val_scores.append(torch.sigmoid(logits.float()))
        self._val_targets.append(batch["target"])
        self._val_masks.append(batch["mask"])
        self._val_index.append(batch["index"])

    def on_validation_epoch_end(self) -> None:
        from cxrlt.metrics import average_precision

        if not self._val_scores:
            return
        parts = (self._val_scores, self._val_targets, self._val_masks, self._val_index)
        scores, targets, masks, index = (torch.cat(v) for v in parts)
        # States are reset every epoch, and under DDP AP is computed on the gathered
        # predictions of all ranks, never averaged per rank.
        for v in parts:
            v.clear()
        if self.trainer.world_size > 1:
            scores, targets, masks, index = (
                self.all_gather(t).flatten(0, 1) for t in (scores, targets, masks, index)
            )
            # DistributedSampler pads ranks to equal length by repeating images: count each once.
            _, first = np.unique(index.cpu().numpy(), return_index=True)
            keep = torch.as_tensor(first, device=scores.device)
            scores, targets, masks = scores[keep], targets[keep], masks[keep]
        y = torch.where(masks, targets, torch.nan).cpu().numpy()
        ap = average_precision(y, scores.cpu().numpy())
        self.log("val/mAP", float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.optim.warmup_fraction)
        floor = self.optim.min_lr_fraction

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))

        # Stepped every optimizer step: stepped per epoch, a short run's schedule stays flat.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
