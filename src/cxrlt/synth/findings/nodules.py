"""Focal lung lesions: nodule, mass, lung lesion, granuloma and tuberculosis."""

from __future__ import annotations

from cxrlt.synth.canvas import _blob, _Ctx, _dots, _ellipse, _lines, _lung_xy, _ring
from cxrlt.synth.findings.lung import _patch


def nodule(c: _Ctx) -> None:
    """Round, fairly well-defined opacity smaller than 3 cm (radius below ~0.035)."""
    for _ in range(1 if c.u(0, 1) < 0.8 else 2):
        x, y = _lung_xy(c, c.side(), c.u(0.15, 0.85), c.u(0.2, 0.85))
        _blob(
            c,
            c.occ,
            x,
            y,
            c.u(0.014, 0.03),
            c.u(0.5, 0.8) * c.gain,
            lobes=0.06,
            blur=c.u(0.1, 0.3),
            dome=0.5,
        )


def mass(c: _Ctx) -> None:
    """Round or lobulated opacity larger than 3 cm."""
    x, y = _lung_xy(c, c.side(), c.u(0.2, 0.8), c.u(0.25, 0.75))
    _blob(
        c,
        c.occ,
        x,
        y,
        c.u(0.05, 0.085),
        c.u(0.6, 0.9) * c.gain,
        lobes=c.u(0.05, 0.18),
        blur=c.u(0.08, 0.25),
        dome=0.5,
    )


def lung_lesion(c: _Ctx) -> None:
    """Irregular, spiculated opacity of intermediate size."""
    x, y = _lung_xy(c, c.side(), c.u(0.15, 0.75), c.u(0.25, 0.8))
    _blob(
        c,
        c.occ,
        x,
        y,
        c.u(0.02, 0.04),
        c.u(0.45, 0.75) * c.gain,
        lobes=0.35,
        blur=0.12,
        dome=0.3,
        spikes=int(c.rng.integers(3, 7)),
    )


def granuloma(c: _Ctx) -> None:
    """One to three small, very dense (calcified), sharply marginated nodules."""
    for _ in range(int(c.rng.integers(1, 4))):
        x, y = _lung_xy(c, c.side(), c.u(0.1, 0.85), c.u(0.1, 0.9))
        r = c.u(0.006, 0.011)
        _ellipse(c, c.dens, x, y, r * c.h / c.w, r, c.u(0.25, 0.4) * c.gain, edge=0.25, dome=0.5)


def tuberculosis(c: _Ctx) -> None:
    """Upper-zone clustered nodules with fibrotic streaks, sometimes a cavity."""
    g = c.geo
    amp = c.u(0.4, 0.65) * c.gain
    sides = [c.side(0.6)] if c.u(0, 1) < 0.65 else [-1, 1]
    for side in sides:
        x0, y0 = _lung_xy(c, side, c.u(0.08, 0.2), c.u(0.3, 0.7))
        _patch(c, x0, y0 + 0.02, c.u(0.04, 0.06), amp * 0.5, sharp=0.0, texture="reticular")
        nodules = [
            (x0 + c.u(-0.05, 0.05), y0 + c.u(-0.03, 0.06), c.u(0.006, 0.012))
            for _ in range(int(c.rng.integers(5, 11)))
        ]
        _dots(c, c.occ, nodules, amp, blur=0.003)
        hx, hy = g.hila[0 if side < 0 or c.lateral else 1]
        streaks = [([(x0 + c.u(-0.03, 0.03), y0), (hx, hy - 0.03)], 0.004) for _ in range(2)]
        _lines(c, c.occ, streaks, amp * 0.6, blur=0.002)
        if c.u(0, 1) < 0.4:
            r = c.u(0.014, 0.024)
            cx_, cy_ = x0 + c.u(-0.02, 0.02), y0 + c.u(0.0, 0.03)
            _ring(c, c.occ, cx_, cy_, r, 0.006, amp * 1.5, blur=0.002)
