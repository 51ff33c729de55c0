"""Training samplers: what an epoch draws, per rank, and the errors for bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlt.errors import DataError
from cxrlt.training import samplers
from cxrlt.training.samplers import (
    ClassAwareSampler,
    RandomSampler,
    RepeatFactorSampler,
    build_sampler,
    check_sampler,
    repeat_factors,
)

CLASSES = ["common", "medium", "rare"]


def _labels(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.5, 0.04, 0.006]).astype(np.float32)
    y[:3, 2] = 1  # at least three rare positives
    mask = np.ones_like(y, dtype=bool)
    return y, mask


def _epoch(sampler, epoch: int = 0) -> np.ndarray:
    sampler.set_epoch(epoch)
    return np.array(list(sampler))


def test_random_sampler_is_a_fresh_permutation_each_epoch_and_fixed_per_seed():
    s = RandomSampler(50, seed=3)
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    assert sorted(e0) == list(range(50)) and sorted(e1) == list(range(50))
    assert not np.array_equal(e0, e1)
    assert np.array_equal(e0, _epoch(RandomSampler(50, seed=3), 0))
    assert not np.array_equal(e0, _epoch(RandomSampler(50, seed=4), 0))


def test_class_aware_draws_classes_uniformly_and_only_known_positives():
    y, mask = _labels()
    rare = np.flatnonzero(y[:, 2] == 1)
    y[rare[0], :2] = 0
    mask[rare[0], 2] = False  # an unknown label is never a positive, whatever its value
    s = ClassAwareSampler(y, mask, CLASSES, seed=0)
    draws = np.concatenate([_epoch(s, e) for e in range(20)])
    assert len(draws) == 20 * len(y)
    assert rare[0] not in set(draws)  # its only positive is unknown: never drawn
    # every draw is a positive of some class, and rare positives come about 1/3 of the time
    known_pos = (y > 0.5) & mask
    assert known_pos[draws].any(axis=1).all()
    share_rare = known_pos[draws, 2].mean()
    assert share_rare == pytest.approx(1 / 3, abs=0.02)
    assert known_pos[:, 2].mean() < 0.01  # ... against < 1 % of the images


def test_class_without_positives_is_a_clear_error():
    y, mask = _labels()
    mask[:, 1] = False  # no known positive of "medium"
    with pytest.raises(DataError, match=r"class_aware: no known positive .*'medium'"):
        ClassAwareSampler(y, mask, CLASSES)


def test_repeat_factors_follow_the_lvis_rule():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]] + [[1, 0, 0]] * 96, np.float32)
    mask = np.ones_like(y, dtype=bool)
    r = repeat_factors(y, mask, threshold=0.25)
    # frequencies: 0.98, 0.01, 0.01 -> class factors 1, 5, 5; image = max over its classes
    np.testing.assert_allclose(r[:4], [1.0, 5.0, 5.0, 1.0])
    mask[2, 2] = False  # unknown: no repeat, and the class frequency drops to 0
    assert repeat_factors(y, mask, 0.25)[2] == 1.0


def test_repeat_factor_epoch_has_a_fixed_length_and_repeats_rare_images():
    y, mask = _labels()
    s = RepeatFactorSampler(y, mask, CLASSES, seed=0, threshold=0.05)
    f = repeat_factors(y, mask, 0.05)
    counts = np.zeros(len(y))
    for e in range(200):
        ep = _epoch(s, e)
        assert len(ep) == len(s) == s.epoch_length == round(f.sum())
        counts += np.bincount(ep, minlength=len(y))
    # stochastic rounding: each image's average count is its repeat factor
    np.testing.assert_allclose(counts / 200, f, atol=0.15)
    assert f[y[:, 2] == 1].min() > 2.0 and f[(y[:, 1:] == 0).all(1)].max() == 1.0


@pytest.mark.parametrize("name", ["random", "class_aware", "repeat_factor"])
def test_ranks_take_disjoint_shares_of_one_epoch(monkeypatch, name):
    y, mask = _labels(n=101)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(samplers, "_dist", lambda rank=rank: (rank, 3))
        s = build_sampler(name, {}, y, mask, CLASSES, seed=5)
        shares.append(_epoch(s, 2))
        assert len(shares[-1]) == len(s)
    monkeypatch.setattr(samplers, "_dist", lambda: (0, 1))
    whole = _epoch(build_sampler(name, {}, y, mask, CLASSES, seed=5), 2)
    padded = np.concatenate([whole, whole[: 3 * len(shares[0]) - len(whole)]])
    # rank r holds positions r, r + 3, ... of the same global order: together, the epoch
    interleaved = np.stack(shares, 1).reshape(-1)
    assert np.array_equal(interleaved, padded)


def test_bad_sampler_settings_are_one_line_errors():
    with pytest.raises(DataError, match="unknown sampler 'balanced'; valid samplers: class_aware, random, repeat_factor"):
        check_sampler("balanced", {})
    with pytest.raises(DataError, match=r"threshold must be a number in \(0, 1\]"):
        check_sampler("repeat_factor", {"threshold": 0})
    with pytest.raises(DataError, match="unknown settings"):
        check_sampler("random", {"threshold": 0.1})
