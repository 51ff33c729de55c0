"""Training samplers: which images an epoch shows, and how often (top-level `sampler`).

- `random`: every training image once per epoch, shuffled.
- `class_aware`: each draw picks a class uniformly, then an image that is a known positive of
  it; a tail class is seen as often as a head class (multi-label class-aware sampling).
- `repeat_factor`: the LVIS rule. A class seen in a fraction f_c of the training images
  gets r_c = max(1, sqrt(t / f_c)); an image is repeated max_c r_c times over its positive
  classes (stochastic rounding, drawn afresh each epoch), so images of classes rarer than
  `t` come back more often and the others once.

Epoch length: `random` and `class_aware` draw as many images as the training split holds;
`repeat_factor` draws round(sum of the images' repeat factors), the same number every epoch
(so the learning-rate schedule knows its length), and logs it.

Under DDP every rank builds the same epoch order from (seed, epoch) and takes a disjoint
share: positions rank, rank + world, ... after padding the order to a multiple of the world
size, as torch's DistributedSampler does. Unknown labels (mask false) never count as
positives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from cxrlt.errors import DataError
from cxrlt.registry import Registry

SAMPLERS = Registry("sampler")


def _dist() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Base: subclasses build one epoch's global order from a generator; this class shards it
    over DDP ranks and keeps the epoch counter (Lightning calls `set_epoch`)."""

    def __init__(self, n_images: int, seed: int = 0):
        if n_images <= 0:
            raise DataError("sampler: the training split has no images")
        self.n_images, self.seed, self.epoch = int(n_images), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def epoch_length(self) -> int:
        """Images drawn per epoch over all ranks."""
        return self.n_images

    def order(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def _shard_size(self, world: int) -> int:
        return math.ceil(self.epoch_length / world)

    def __len__(self) -> int:
        return self._shard_size(_dist()[1])

    def __iter__(self) -> Iterator[int]:
        rank, world = _dist()
        order = self.order(np.random.default_rng([self.seed, self.epoch]))
        total = self._shard_size(world) * world
        if total > len(order):  # pad with the first images, as DistributedSampler does
            order = np.concatenate([order, order[: total - len(order)]])
        return iter(order[rank:total:world].tolist())


@SAMPLERS.register("random")
class RandomSampler(EpochSampler):
    def order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.n_images)


def _positives(targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (targets > 0.5) & mask


def _check_classes(pos: np.ndarray, classes: Sequence[str], name: str) -> None:
    empty = [c for c, n in zip(classes, pos.sum(0), strict=True) if n == 0]
    if empty:
        raise DataError(
            f"sampler {name}: no known positive in the training split for {empty}; "
            f"it cannot draw these classes (use sampler: random, or a task without them)"
        )


@SAMPLERS.register("class_aware")
class ClassAwareSampler(EpochSampler):
    """A class uniformly, then one of its positive images uniformly."""

    def __init__(self, targets: np.ndarray, mask: np.ndarray, classes: Sequence[str], seed: int = 0):
        super().__init__(len(targets), seed)
        pos = _positives(targets, mask)
        _check_classes(pos, classes, "class_aware")
        self.members = [np.flatnonzero(pos[:, c]) for c in range(pos.shape[1])]

    def order(self, rng: np.random.Generator) -> np.ndarray:
        cls = rng.integers(len(self.members), size=self.n_images)
        counts = np.bincount(cls, minlength=len(self.members))
        out = np.empty(self.n_images, dtype=np.int64)
        for c in np.flatnonzero(counts):
            out[cls == c] = rng.choice(self.members[c], size=counts[c])
        return out


def repeat_factors(targets: np.ndarray, mask: np.ndarray, threshold: float) -> np.ndarray:
    """Per image: max over its known positive classes of max(1, sqrt(t / f_c)); 1 for an
    image without positives."""
    pos = _positives(targets, mask)
    freq = pos.sum(0) / max(len(pos), 1)
    with np.errstate(divide="ignore"):
        r_class = np.maximum(1.0, np.sqrt(threshold / freq))
    r_class[freq == 0] = 1.0
    return np.where(pos, r_class[None, :], 1.0).max(axis=1, initial=1.0)


@SAMPLERS.register("repeat_factor")
class RepeatFactorSampler(EpochSampler):
    def __init__(
        self, targets: np.ndarray, mask: np.ndarray, classes: Sequence[str], seed: int = 0,
        threshold: float = 0.05,
    ):  # fmt: skip
        super().__init__(len(targets), seed)
        if not 0 < threshold <= 1:
            raise DataError(f"samplers.repeat_factor.threshold must be in (0, 1], got {threshold}")
        self.factors = repeat_factors(targets, mask, threshold)
        self._length = int(round(self.factors.sum()))

    @property
    def epoch_length(self) -> int:
        return self._length

    def order(self, rng: np.random.Generator) -> np.ndarray:
        whole = np.floor(self.factors).astype(np.int64)
        frac = self.factors - whole
        extra = self._length - int(whole.sum())  # exact length: stochastic rounding by draw
        reps = whole.copy()
        if extra > 0:
            chosen = rng.choice(self.n_images, size=extra, replace=False, p=frac / frac.sum())
            reps[chosen] += 1
        return rng.permutation(np.repeat(np.arange(self.n_images), reps))


def check_sampler(name: str, settings: Mapping[str, Any] | None) -> None:
    """Fail on an unknown sampler or setting before any data loads."""
    SAMPLERS.get_builder(name)
    allowed = {"repeat_factor": {"threshold"}}.get(name, set())
    unknown = sorted(set(settings or {}) - allowed)
    if unknown:
        raise DataError(f"samplers.{name}: unknown settings {unknown}; valid: {sorted(allowed) or 'none'}")
    t = (settings or {}).get("threshold")
    if t is not None and not (isinstance(t, int | float) and 0 < t <= 1):
        raise DataError(f"samplers.{name}.threshold must be a number in (0, 1], got {t!r}")


def build_sampler(
    name: str, settings: Mapping[str, Any] | None, targets: np.ndarray, mask: np.ndarray,
    classes: Sequence[str], seed: int,
) -> EpochSampler:  # fmt: skip
    check_sampler(name, settings)
    builder = SAMPLERS.get_builder(name)
    if name == "random":
        return builder(len(targets), seed)
    return builder(targets, mask, classes, seed, **dict(settings or {}))
