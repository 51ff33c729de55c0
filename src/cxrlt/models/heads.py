"""Classification heads behind a name -> builder registry (`model.head` in params.yaml)."""

from __future__ import annotations

import torch
from torch import nn

from cxrlt.registry import Registry

HEADS = Registry("head")


class LinearHead(nn.Module):
    """Global average pooling + dropout + one linear layer."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # features: (B, C, H, W) feature map from the backbone.
        return self.fc(self.drop(features.mean(dim=(2, 3))))


@HEADS.register("linear")
def _linear(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    return LinearHead(in_features, num_classes, dropout)


def build_head(name: str, in_features: int, num_classes: int, **kwargs: object) -> nn.Module:
    return HEADS.get_builder(name)(in_features, num_classes, **kwargs)
