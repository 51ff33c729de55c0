"""Losses: masking of unknown labels, known special cases, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrlt.errors import DataError
from cxrlt.losses import LOSSES, build_loss

PREV = np.array([0.3, 0.05, 0.001], dtype=np.float32)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unknown_labels_do_not_contribute(name: str):
    torch.manual_seed(0)
    loss = build_loss(name, {}, PREV)
    logits = torch.randn(6, 3, requires_grad=True)
    target = (torch.rand(6, 3) > 0.5).float()
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[2, 1] = mask[4, 0] = False
    value = loss(logits, target, mask)
    flipped = target.clone()
    flipped[2, 1] = 1 - flipped[2, 1]
    flipped[4, 0] = 1 - flipped[4, 0]
    assert torch.allclose(value, loss(logits, flipped, mask))
    value.backward()
    assert logits.grad[2, 1] == 0 and logits.grad[4, 0] == 0
    assert torch.isfinite(value)


def test_bce_equals_torch_on_known_labels():
    logits, target = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    mask = torch.ones(5, 3, dtype=torch.bool)
    got = build_loss("bce", {}, PREV)(logits, target, mask)
    assert torch.allclose(got, F.binary_cross_entropy_with_logits(logits, target))


def test_asl_without_focusing_is_bce():
    logits, target = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    mask = torch.ones(5, 3, dtype=torch.bool)
    asl = build_loss("asl", {"gamma_neg": 0, "gamma_pos": 0, "clip": 0, "class_weights": False}, PREV)
    assert torch.allclose(asl(logits, target, mask), F.binary_cross_entropy_with_logits(logits, target), atol=1e-6)


def test_asl_down_weights_easy_negatives():
    asl = build_loss("asl", {"class_weights": False}, PREV)
    bce = build_loss("bce", {}, PREV)
    logits = torch.full((1, 3), -3.0)  # confident negatives
    target = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert asl(logits, target, mask) < 1e-3 * bce(logits, target, mask)


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(DataError, match="unknown loss 'nope'; valid losses: asl, bce"):
        build_loss("nope", {}, PREV)
    with pytest.raises(DataError, match="losses.asl"):
        build_loss("asl", {"gamma": 3}, PREV)
