"""exp, sin, cos and power whose float32 results are the same on every machine.

NumPy computes float32 transcendental functions with SIMD code chosen at run time from the
CPU's instruction sets (baseline, AVX2, AVX-512), and those paths differ in the last bit. In
the renderer a last-bit difference turns into a one-grey-level difference in a few pixels,
then a different JPEG, and the built-in dataset's hash in ``dvc.lock`` would change from one
machine to the next. Evaluated in float64 and rounded to float32, every path gives the same
float32 (the float64 paths differ by far less than a float32 step). Float64 inputs are passed
through unchanged. ``tests/test_synth_render.py`` renders with NumPy's SIMD paths switched
off and compares the bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _wide(fn: Callable[..., np.ndarray], x: np.ndarray | float, *args: float) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == np.float32:
        return fn(a.astype(np.float64), *args).astype(np.float32)
    return fn(a, *args)


def exp(x: np.ndarray | float) -> np.ndarray:
    return _wide(np.exp, x)


def sin(x: np.ndarray | float) -> np.ndarray:
    return _wide(np.sin, x)


def cos(x: np.ndarray | float) -> np.ndarray:
    return _wide(np.cos, x)


def power(x: np.ndarray | float, p: float) -> np.ndarray:
    return _wide(np.power, x, p)
