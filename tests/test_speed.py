"""The benchmark's GPU-step code runs (on the CPU here) for every eager variant, so the script
that a GPU machine runs once is not first exercised there. No timing is asserted."""

from __future__ import annotations

import math

import pytest

from cxrlt.speed import BASELINE, STEP_VARIANTS, gpu_step_rate


@pytest.mark.parametrize("variant", [v for v in STEP_VARIANTS if not v.compile], ids=lambda v: v.name[:24])
def test_every_eager_step_variant_runs_a_training_step(variant):
    rate = gpu_step_rate("mobilenetv3_small_050", 32, 2, variant, steps=1, warmup=1, device="cpu")
    assert math.isfinite(rate) and rate > 0


def test_the_variants_are_distinct_and_the_baseline_is_listed_first():
    assert STEP_VARIANTS[0] is BASELINE
    assert len({(v.dtype, v.channels_last, v.fused, v.compile) for v in STEP_VARIANTS}) == len(STEP_VARIANTS)
    assert STEP_VARIANTS[-1].compile and not any(v.compile for v in STEP_VARIANTS[:-1])
