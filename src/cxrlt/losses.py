"""Multi-label losses for long-tailed data, behind a name -> builder registry.

Every loss takes logits (B, C), targets (B, C) of 1 / 0 and a mask (B, C) that is False
where the label is unknown, so external sources with unannotated classes train correctly:
an unknown entry contributes neither loss nor gradient, and the reduction is the mean over
the known entries. `params.yaml` selects one with the top-level `loss:` key; its settings
live under `losses.<name>`. Class statistics (prevalence, positive counts) come from the
training manifest actually used. Nothing hard-codes a device; the arithmetic runs in float32
whatever the autocast dtype of the logits.

Losses with class weights (`wbce`, `asl` with class_weights, `cb`, `db`, `ldam`) have a
`weighting` switch: deferred re-weighting (`train.drw_epoch`) trains with it off and turns it
on at the chosen epoch.
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


class WeightedLoss(nn.Module):
    """A loss whose class weights can be switched off (deferred re-weighting)."""

    weighting: bool = True

    @property
    def has_weights(self) -> bool:
        """Whether this instance holds any class weights to defer."""
        return True


class BCE(WeightedLoss):
    def __init__(self, pos_weight: torch.Tensor | None = None, class_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.register_buffer("class_weight", class_weight)

    @property
    def has_weights(self) -> bool:
        return self.pos_weight is not None or self.class_weight is not None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        on = self.weighting
        loss = F.binary_cross_entropy_with_logits(
            logits.float(), target.float(), pos_weight=self.pos_weight if on else None, reduction="none"
        )
        if on and self.class_weight is not None:
            loss = loss * self.class_weight
        return _masked_mean(loss, mask)


class FocalLoss(WeightedLoss):
    """Focal loss, sigmoid form: (1 - p_t)^gamma down-weights the easy examples; optional
    per-class weights (`cb` with gamma > 0)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, class_weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha
        self.register_buffer("class_weight", class_weight)

    @property
    def has_weights(self) -> bool:
        return self.class_weight is not None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits, t = logits.float(), target.float()
        ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** self.gamma
        if self.alpha is not None:
            loss = loss * (self.alpha * t + (1 - self.alpha) * (1 - t))
        if self.weighting and self.class_weight is not None:
            loss = loss * self.class_weight
        return _masked_mean(loss, mask)


class AsymmetricLoss(WeightedLoss):
    """Asymmetric loss (ASL), with CheXFusion's optional per-class weights.

    `hill_lambda` turns it into the robust asymmetric loss (RAL): the negative term is also
    multiplied by the Hill-type factor (lambda - p_m), which down-weights confident negatives
    that are likely missing labels."""

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 1.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        w_pos: torch.Tensor | None = None,
        w_neg: torch.Tensor | None = None,
        hill_lambda: float | None = None,
    ):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.hill_lambda = hill_lambda
        self.register_buffer("w_pos", w_pos)
        self.register_buffer("w_neg", w_neg)

    @property
    def has_weights(self) -> bool:
        return self.w_pos is not None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.float()
        p = torch.sigmoid(logits.float())
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p  # probability shifting
        loss_pos = t * torch.log(p.clamp(min=self.eps)) * (1 - p) ** self.gamma_pos
        loss_neg = (1 - t) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg**self.gamma_neg
        if self.hill_lambda is not None:
            loss_neg = loss_neg * (self.hill_lambda - p_neg)
        if self.w_pos is not None and self.weighting:
            loss_pos = loss_pos * self.w_pos
            loss_neg = loss_neg * self.w_neg
        return _masked_mean(-(loss_pos + loss_neg), mask)


class DistributionBalancedLoss(WeightedLoss):
    """Distribution-balanced loss: re-balanced weighting + negative-tolerant regularisation.

    Re-balanced weight of entry (k, i): r = (1/n_i) / sum of 1/n_j over image k's positive
    classes (how much class i deserves image k compared with the image's sampling rate),
    smoothed to alpha + sigmoid(beta (r - mu)). Negative tolerance: logits shifted by the
    class prior, z + kappa logit(p_i), and negatives scored by softplus(lambda z) / lambda, so
    the many easy negatives of a tail class stop pushing its logit down."""

    def __init__(
        self, counts: torch.Tensor, prevalence: torch.Tensor, alpha: float = 0.1, beta: float = 10.0,
        mu: float = 0.2, neg_scale: float = 5.0, kappa: float = 0.05,
    ):  # fmt: skip
        super().__init__()
        self.alpha, self.beta, self.mu, self.neg_scale = alpha, beta, mu, neg_scale
        self.register_buffer("inv_freq", 1.0 / counts.clamp_min(1.0))
        p = prevalence.clamp(1e-6, 1 - 1e-6)
        self.register_buffer("bias", kappa * torch.log(p / (1 - p)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.float() * mask.float()  # unknown labels are not positives for the weights
        z = logits.float() + self.bias
        loss = t * F.softplus(-z) + (1 - t) * F.softplus(self.neg_scale * z) / self.neg_scale
        if self.weighting:
            rate = (t * self.inv_freq).sum(1, keepdim=True)
            r = torch.where(rate > 0, self.inv_freq / rate.clamp_min(1e-12), torch.ones_like(z))
            loss = loss * (self.alpha + torch.sigmoid(self.beta * (r - self.mu)))
        return _masked_mean(loss, mask)


class LDAMLoss(WeightedLoss):
    """Label-distribution-aware margins, multi-label form: a positive's logit must beat the
    decision boundary by a margin proportional to n_i^(-1/4) (largest `max_margin`, for the
    rarest class); optional class-balanced weights, usually deferred (train.drw_epoch)."""

    def __init__(self, counts: torch.Tensor, max_margin: float = 0.5, scale: float = 1.0,
                 class_weight: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        m = 1.0 / counts.clamp_min(1.0) ** 0.25
        self.register_buffer("margin", m * (max_margin / m.max()))
        self.register_buffer("class_weight", class_weight)
        self.scale = scale

    @property
    def has_weights(self) -> bool:
        return self.class_weight is not None

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = target.float()
        z = self.scale * (logits.float() - t * self.margin)
        loss = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        if self.weighting and self.class_weight is not None:
            loss = loss * self.class_weight
        return _masked_mean(loss, mask)


class LogitAdjustedBCE(nn.Module):
    """BCE on logits shifted by tau * logit(prior): the model learns the balanced posterior,
    so its raw logits (used at prediction) are not dominated by the class prior."""

    def __init__(self, prevalence: torch.Tensor, tau: float = 1.0):
        super().__init__()
        p = prevalence.clamp(1e-6, 1 - 1e-6)
        self.register_buffer("shift", tau * torch.log(p / (1 - p)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits.float() + self.shift, target.float(), reduction="none")
        return _masked_mean(loss, mask)


def effective_number_weights(counts: np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to mean 1."""
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = (1.0 - beta) / (1.0 - np.power(beta, n)) if beta > 0 else np.ones_like(n)
    return (w / w.mean()).astype(np.float32)


def _need(prevalence: np.ndarray | None, name: str) -> np.ndarray:
    if prevalence is None:
        raise ValueError(f"loss {name!r} needs the training class statistics")
    return np.asarray(prevalence, dtype=np.float32)


def _check(name: str, **checks: tuple[float, float, bool]) -> None:
    """Each setting: (value, low, high_open): low <= value (< high when high_open)."""
    for key, (value, low, high) in checks.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
            raise DataError(f"params losses.{name}.{key} must be a number, got {value!r}")
        if value < low or (high is not None and value >= high):
            bound = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise DataError(f"params losses.{name}.{key} must be {bound}, got {value}")


@LOSSES.register("bce")
def _bce(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None) -> nn.Module:
    return BCE()


@LOSSES.register("wbce")
def _wbce(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None,
          max_weight: float = 50.0) -> nn.Module:  # fmt: skip
    """BCE with pos_weight = negatives / positives (clipped), from training prevalence."""
    _check("wbce", max_weight=(max_weight, 1.0, None))
    p = np.clip(_need(prevalence, "wbce"), 1e-6, 1.0)
    return BCE(pos_weight=torch.as_tensor(np.minimum((1 - p) / p, max_weight)))


@LOSSES.register("focal")
def _focal(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None,
           gamma: float = 2.0, alpha: float | None = None) -> nn.Module:  # fmt: skip
    _check("focal", gamma=(gamma, 0.0, None))
    return FocalLoss(gamma=gamma, alpha=alpha)


@LOSSES.register("asl")
def _asl(
    prevalence: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    class_weights: bool = True,
) -> nn.Module:
    _check("asl", gamma_neg=(gamma_neg, 0.0, None), gamma_pos=(gamma_pos, 0.0, None), clip=(clip, 0.0, 1.0))
    w_pos, w_neg = _prevalence_weights(prevalence) if class_weights and prevalence is not None else (None, None)
    return AsymmetricLoss(gamma_neg, gamma_pos, clip, w_pos=w_pos, w_neg=w_neg)


@LOSSES.register("ral")
def _ral(
    prevalence: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    hill_lambda: float = 1.5,
    class_weights: bool = False,
) -> nn.Module:
    """Robust asymmetric loss: ASL with a Hill-type factor on the negative term."""
    _check("ral", gamma_neg=(gamma_neg, 0.0, None), gamma_pos=(gamma_pos, 0.0, None),
           clip=(clip, 0.0, 1.0), hill_lambda=(hill_lambda, 1.0, None))  # fmt: skip
    w_pos, w_neg = _prevalence_weights(prevalence) if class_weights and prevalence is not None else (None, None)
    return AsymmetricLoss(gamma_neg, gamma_pos, clip, w_pos=w_pos, w_neg=w_neg, hill_lambda=hill_lambda)


@LOSSES.register("cb")
def _cb(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None,
        beta: float = 0.999, gamma: float = 0.0) -> nn.Module:  # fmt: skip
    """Class-balanced by the effective number of samples; BCE, or focal with gamma > 0."""
    _check("cb", beta=(beta, 0.0, 1.0), gamma=(gamma, 0.0, None))
    w = torch.as_tensor(effective_number_weights(_need(counts, "cb"), beta))
    return FocalLoss(gamma=gamma, class_weight=w) if gamma > 0 else BCE(class_weight=w)


@LOSSES.register("db")
def _db(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None, alpha: float = 0.1,
        beta: float = 10.0, mu: float = 0.2, neg_scale: float = 5.0, kappa: float = 0.05) -> nn.Module:  # fmt: skip
    _check("db", alpha=(alpha, 0.0, None), beta=(beta, 0.0, None), mu=(mu, 0.0, None),
           neg_scale=(neg_scale, 1e-6, None), kappa=(kappa, 0.0, None))  # fmt: skip
    c = torch.as_tensor(_need(counts, "db"))
    p = torch.as_tensor(_need(prevalence, "db"))
    return DistributionBalancedLoss(c, p, alpha, beta, mu, neg_scale, kappa)


@LOSSES.register("ldam")
def _ldam(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None,
          max_margin: float = 0.5, scale: float = 1.0, beta: float = 0.999) -> nn.Module:  # fmt: skip
    """LDAM margins; class-balanced weights (effective number, beta; 0 = none) that deferred
    re-weighting switches on."""
    _check("ldam", max_margin=(max_margin, 0.0, None), scale=(scale, 1e-6, None), beta=(beta, 0.0, 1.0))
    n = _need(counts, "ldam")
    w = torch.as_tensor(effective_number_weights(n, beta)) if beta > 0 else None
    return LDAMLoss(torch.as_tensor(n), max_margin, scale, w)


@LOSSES.register("la")
def _la(prevalence: np.ndarray | None = None, counts: np.ndarray | None = None, tau: float = 1.0) -> nn.Module:
    _check("la", tau=(tau, 0.0, None))
    return LogitAdjustedBCE(torch.as_tensor(_need(prevalence, "la")), tau)


def build_loss(
    name: str, settings: Mapping | None, prevalence: np.ndarray | None,
    counts: np.ndarray | None = None,
) -> nn.Module:  # fmt: skip
    """Build the loss `name` with its `losses.<name>` settings; unknown names list valid ones.
    `counts`: known positives per class in the training split (the class-count losses)."""
    builder = LOSSES.get_builder(name)
    kwargs = dict(settings or {})
    try:
        return builder(prevalence=prevalence, counts=counts, **kwargs)
    except TypeError as e:
        raise DataError(f"params losses.{name}: {e}") from None
