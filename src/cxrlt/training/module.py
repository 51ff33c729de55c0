"""LightningModule for the image-level (stage 1) classifier."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from cxrlt.errors import DataError
from cxrlt.losses import WeightedLoss, build_loss
from cxrlt.models import ModelConfig, build_model
from cxrlt.training.augment import AugmentConfig, augment_batch


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the model that `ema_update` moves towards the trained weights."""
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers (BatchNorm statistics)
    are copied, as they are already running averages."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.01


def fused_adamw(params: list[torch.nn.Parameter]) -> bool | None:
    """True (AdamW's fused CUDA kernel, one launch for all tensors) when every parameter is on
    a GPU; None (AdamW's default) otherwise, so CPU runs compute exactly as before."""
    return True if params and all(p.is_cuda for p in params) else None


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
        counts: np.ndarray | None = None,
        drw_epoch: int | None = None,
        ema_decay: float = 0.0,
        query_embeddings: torch.Tensor | None = None,
        compile_model: bool = False,
    ):
        super().__init__()
        self.classes = list(classes)
        self.model = build_model(model_cfg, len(self.classes), query_embeddings)
        self.criterion = build_loss(loss, loss_settings, prevalence, counts)
        if drw_epoch is not None and not (
            isinstance(self.criterion, WeightedLoss) and self.criterion.has_weights
        ):
            raise DataError(
                f"train.drw_epoch defers class weights, but loss {loss!r} (with these settings) "
                f"has none; use wbce, asl or ral with class_weights, cb, db or ldam, "
                f"or set train.drw_epoch: null"
            )
        self.drw_epoch = drw_epoch
        # EMA of the weights: validation (so checkpoint selection) and the saved model use it.
        self.ema = ema_copy(self.model) if ema_decay > 0 else None
        self.ema_decay = float(ema_decay)
        self.optim, self.augment = optim, augment
        self.aug_gen = torch.Generator().manual_seed(seed)
        # A function, not a module attribute, so state_dict keys stay those of self.model.
        # The augmentation stays outside: its random draws would make the graph recompile.
        self._net = torch.compile(self._logits) if compile_model else self._logits
        self._val_scores: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []
        self._val_masks: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The augmentation stream runs across epochs: a resumed run continues it, not restarts it.
        checkpoint["aug_gen"] = self.aug_gen.get_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.aug_gen.set_state(checkpoint["aug_gen"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.features(x))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = self.model.normalise(batch["image"])
        x = augment_batch(x, self.augment, self.aug_gen, std=self.model.cfg.std)
        logits = self._net(x)
        loss = self.criterion(logits, batch["target"], batch["mask"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def on_train_epoch_start(self) -> None:
        if self.drw_epoch is not None:  # deferred re-weighting: weights on from drw_epoch
            self.criterion.weighting = self.current_epoch >= self.drw_epoch

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            ema_update(self.ema, self.model, self.ema_decay)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = (self.ema if self.ema is not None else self.model)(batch["image"])
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
            fused=fused_adamw(decay + no_decay),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * self.optim.warmup_fraction)
        floor = self.optim.min_lr_fraction

        def lr_at(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(1, total - warmup)
            # a Python float (the same double): the resumable state then loads with weights_only
            return float(floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0))))

        # Stepped every optimizer step: stepped per epoch, a short run's schedule stays flat.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
