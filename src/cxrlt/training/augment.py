"""Batch-level augmentation on the accelerator: one affine warp + intensity jitter per image.

Done on whole batches after transfer (no per-image Python work in loader processes), so the
training step, not augmentation, is the bottleneck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    rotate_deg: float = 7.0
    scale: float = 0.08
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.15
    hflip: float = 0.0


def augment_batch(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None, std: float = 1.0
) -> torch.Tensor:
    """x: normalised float (B, C, H, W); `std` is the normalisation's, so that `brightness`
    is a fraction of the 0-255 range."""
    if not cfg.enabled:
        return x
    b = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=generator).to(dev) * (hi - lo) + lo

    angle = u(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180)
    scale = u(1 - cfg.scale, 1 + cfg.scale)
    tx, ty = u(-cfg.translate, cfg.translate) * 2, u(-cfg.translate, cfg.translate) * 2
    flip = torch.where(u(0, 1) < cfg.hflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Fill with the image minimum so the border looks like the padded background.
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    x = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    gain = u(1 - cfg.contrast, 1 + cfg.contrast).view(b, 1, 1, 1).to(x.dtype)
    bias = u(-cfg.brightness, cfg.brightness).view(b, 1, 1, 1).to(x.dtype) / std
    return x * gain + bias
