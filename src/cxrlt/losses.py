"""Multi-label losses for long-tailed data, behind a name -> builder registry.

Every loss takes logits (B, C), targets (B, C) of 1 / 0 and a mask (B, C) that is False
where the label is unknown, so external sources with unannotated classes train correctly.
`params.yaml` selects one with the top-level `loss:` key; its settings live under
`losses.<name>`. Nothing hard-codes a device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrlt.errors import DataError
from cxrlt.registry import Registry

LOSSES = Registry("loss", "losses")


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Normalise by known labels, so a batch with many unknowns is not down-weighted.
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def _prevalence_weights(prevalence: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(prevalence, dtype=np.float32))
    # CheXFusion's class weights: rare classes weigh more on positives, less on negatives.
    return torch.exp(1.0 - p), torch.exp(p)


class BCE(nn.Module):
    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), pos_weight=self.pos_weight, reduction="none"
        )
        return _masked_mean(loss, mask)


class FocalLoss(nn.Module):
    """Focal loss, sigmoid form: (1 - p_t)^gamma down-weights the easy examples."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.to(logits.dtype)
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha is not None:
            loss = loss * (self.alpha * t + (1 - self.alpha) * (1 - t))
        return _masked_mean(loss, mask)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL), with CheXFusion's optional per-class weights."""

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        w_pos: torch.Tensor | None = None,
        w_neg: torch.Tensor | None = None,
    ):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.register_buffer("w_pos", w_pos)
        self.register_buffer("w_neg", w_neg)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.to(logits.dtype)
        p = torch.sigmoid(logits.float())
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # probability shifting
        loss_pos = t * torch.log(p.clamp(min=self.eps)) * (1 - p) ** self.gamma_pos
        loss_neg = (1 - t) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg**self.gamma_neg
        if self.w_pos is not None:
            loss_pos = loss_pos * self.w_pos
            loss_neg = loss_neg * self.w_neg
        return _masked_mean(-(loss_pos + loss_neg), mask)


@LOSSES.register("bce")
def _bce(prevalence: np.ndarray | None = None) -> nn.Module:
    return BCE()


@LOSSES.register("wbce")
def _wbce(prevalence: np.ndarray | None = None, max_weight: float = 50.0) -> nn.Module:
    """BCE with pos_weight = negatives / positives (clipped), from training prevalence."""
    if prevalence is None:
        raise ValueError("loss 'wbce' needs the training prevalence")
    p = np.clip(np.asarray(prevalence, dtype=np.float32), 1e-6, 1.0)
    return BCE(pos_weight=torch.as_tensor(np.minimum((1 - p) / p, max_weight)))


@LOSSES.register("focal")
def _focal(prevalence: np.ndarray | None = None, gamma: float = 2.0, alpha: float | None = None) -> nn.Module:
    return FocalLoss(gamma=gamma, alpha=alpha)


@LOSSES.register("asl")
def _asl(
    prevalence: np.ndarray | None = None,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    class_weights: bool = True,
) -> nn.Module:
    w_pos, w_neg = _prevalence_weights(prevalence) if class_weights and prevalence is not None else (None, None)
    return AsymmetricLoss(gamma_neg, gamma_pos, clip, w_pos=w_pos, w_neg=w_neg)


def build_loss(name: str, settings: Mapping | None, prevalence: np.ndarray | None) -> nn.Module:
    """Build the loss `name` with its `losses.<name>` settings; unknown names list valid ones."""
    builder = LOSSES.get_builder(name)
    kwargs = dict(settings or {})
    try:
        return builder(prevalence=prevalence, **kwargs)
    except TypeError as e:
        raise DataError(f"params losses.{name}: {e}") from None
