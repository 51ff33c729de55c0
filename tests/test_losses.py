"""Losses: masking of unknown labels, known special cases, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxrlt.errors import DataError
from cxrlt.losses import LOSSES, build_loss

PREV = np.array([0.3, 0.05, 0.001], dtype=np.float32)
COUNTS = PREV * 1000


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unknown_labels_do_not_contribute(name: str):
    torch.manual_seed(0)
    loss = build_loss(name, {}, PREV, COUNTS)
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


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 3, generator=g)
    target = (torch.rand(8, 3, generator=g) > 0.6).float()
    return logits, target, torch.ones(8, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("la", {"tau": 0.0}),
        ("cb", {"beta": 0.0}),
        ("db", {"kappa": 0.0, "neg_scale": 1.0}),  # with re-weighting switched off below
        ("ldam", {"max_margin": 0.0, "beta": 0.0}),
    ],
)
def test_new_losses_reduce_to_bce_in_their_neutral_setting(name, settings):
    logits, target, mask = _batch()
    loss = build_loss(name, settings, PREV, COUNTS)
    loss.weighting = name != "db"
    assert torch.allclose(loss(logits, target, mask), F.binary_cross_entropy_with_logits(logits, target), atol=1e-6)


def test_logit_adjustment_shifts_each_class_by_its_prior():
    logits, target, mask = _batch()
    got = build_loss("la", {"tau": 1.0}, PREV, COUNTS)(logits, target, mask)
    prior = torch.log(torch.as_tensor(PREV / (1 - PREV)))
    assert torch.allclose(got, F.binary_cross_entropy_with_logits(logits + prior, target), atol=1e-6)


def test_class_balanced_weights_favour_rare_classes():
    from cxrlt.losses import effective_number_weights

    w = effective_number_weights(COUNTS, 0.999)
    assert w[2] > w[1] > w[0] and w.mean() == pytest.approx(1.0)
    logits, target, mask = _batch()
    got = build_loss("cb", {"beta": 0.999}, PREV, COUNTS)(logits, target, mask)
    ref = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * torch.as_tensor(w)).mean()
    assert torch.allclose(got, ref, atol=1e-6)


def test_ral_is_asl_with_a_hill_factor_on_negatives():
    logits, target, mask = _batch()
    s = {"gamma_neg": 2.0, "gamma_pos": 0.0, "clip": 0.05}
    ral = build_loss("ral", {**s, "hill_lambda": 1.5}, PREV, COUNTS)(logits, target, mask)
    p = torch.sigmoid(logits)
    pm = (p - 0.05).clamp(min=0)
    pos = target * torch.log(p)
    neg = (1 - target) * torch.log(1 - pm) * pm**2 * (1.5 - pm)
    assert torch.allclose(ral, -(pos + neg).mean(), atol=1e-6)


def test_ldam_margin_is_largest_for_the_rarest_class():
    loss = build_loss("ldam", {"max_margin": 0.5, "beta": 0.0}, PREV, COUNTS)
    assert loss.margin.argmax() == 2 and float(loss.margin.max()) == pytest.approx(0.5)
    logits, target, mask = torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)
    assert loss(logits, target, mask) > F.binary_cross_entropy_with_logits(logits, target)


def test_db_weights_follow_how_often_an_image_is_sampled_for_a_class():
    """An image holding only a tail class keeps a high weight; the same class on an image that
    also holds a head class gets less (the image is sampled often through the head class)."""
    loss = build_loss("db", {}, PREV, COUNTS)
    logits = torch.zeros(2, 3, requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    loss(logits, target, torch.ones(2, 3, dtype=torch.bool)).backward()
    # same logit, same label: the gradient on the tail entry is proportional to its weight
    assert logits.grad[0, 2] < logits.grad[1, 2] < 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_take_bf16_logits_and_return_float32(name):
    logits, target, mask = _batch()
    logits = logits.to(torch.bfloat16).requires_grad_(True)
    value = build_loss(name, {}, PREV, COUNTS)(logits, target, mask)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(logits.grad.float()).all()


def test_deferred_weighting_switch_turns_weighted_losses_into_their_plain_form():
    logits, target, mask = _batch()
    wbce = build_loss("wbce", {}, PREV, COUNTS)
    weighted = wbce(logits, target, mask)
    wbce.weighting = False
    plain = wbce(logits, target, mask)
    assert torch.allclose(plain, F.binary_cross_entropy_with_logits(logits, target)) and weighted > plain


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("focal", {"gamma": -1.0}, r"losses.focal.gamma must be >= 0"),
        ("cb", {"beta": 1.0}, r"losses.cb.beta must be in \[0.0, 1.0\)"),
        ("asl", {"gamma_neg": "a"}, r"losses.asl.gamma_neg must be a number"),
        ("ral", {"hill_lambda": 0.5}, r"losses.ral.hill_lambda must be >= 1.0"),
    ],
)
def test_bad_loss_settings_are_one_line_errors(name, settings, message):
    with pytest.raises(DataError, match=message):
        build_loss(name, settings, PREV, COUNTS)


def test_class_balanced_focal_is_focal_times_the_class_weights():
    from cxrlt.losses import effective_number_weights

    logits, target, mask = _batch()
    w = torch.as_tensor(effective_number_weights(COUNTS, 0.99))
    cb = build_loss("cb", {"beta": 0.99, "gamma": 2.0}, PREV, COUNTS)
    focal = build_loss("focal", {"gamma": 2.0}, PREV, COUNTS)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    assert torch.allclose(cb(logits, target, mask), (ce * (1 - p_t) ** 2 * w).mean(), atol=1e-6)
    cb.weighting = False  # deferred re-weighting: plain focal until the switch
    assert torch.allclose(cb(logits, target, mask), focal(logits, target, mask))
