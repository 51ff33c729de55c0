"""Heart, mediastinum and great vessels: cardiomegaly, cardiomyopathy, a widened mediastinum,
aortic tortuosity and calcification, pulmonary hypertension, adenopathy, hilar enlargement and
hiatal hernia (a retrocardiac mass)."""

from __future__ import annotations

import math

import numpy as np

from cxrlt.synth import fmath as fm
from cxrlt.synth.anatomy import _Geo
from cxrlt.synth.canvas import _Ctx, _dots, _edge, _ellipse, _polyline, _ramp, _ring, _smooth, _win


def cardiomegaly_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Heart wider than half the chest, enlarging to the patient's left and down."""
    hx, hy, hrx, hry, tilt = g.heart
    k = rng.uniform(1.25, 1.5)
    shift = hrx * (k - 1) * (0.3 if g.view == "lateral" else 0.5)
    g.heart = (hx + shift, hy + 0.005, hrx * k, hry * rng.uniform(1.05, 1.15), tilt)


def cardiomyopathy_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Globular enlarged heart ('water bottle'): both borders bulge, rounder, less tilted."""
    hx, hy, hrx, hry, tilt = g.heart
    k = rng.uniform(1.25, 1.45)
    ry = max(hry * rng.uniform(1.3, 1.45), hrx * k * 0.85)
    g.heart = (hx + hrx * (k - 1) * 0.1, hy - (ry - hry) * 0.3, hrx * k, ry, tilt * 0.3)


def enlarged_cm_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Widened upper mediastinum (and a slightly bigger heart)."""
    extra = g.med_w * (rng.uniform(1.5, 2.0) - 1)
    g.med_w += extra
    kx, ky, kr = g.knob
    g.knob = (kx + extra * 0.8, ky, kr * rng.uniform(1.1, 1.3))
    hx, hy, hrx, hry, tilt = g.heart
    g.heart = (hx, hy, hrx * rng.uniform(1.0, 1.1), hry, tilt)


def enlarged_cm(c: _Ctx) -> None:
    """Lateral: soft tissue filling the retrosternal clear space."""
    if c.lateral:
        g = c.geo
        _ellipse(c, c.occ, g.ant + 0.1, g.apex + 0.2, 0.08, 0.13, 0.8 * c.gain, edge=0.5, dome=0.5)


def tortuous_aorta_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Unfolded arch and a wavy descending aorta projecting over the left lung."""
    g.aorta_wave = rng.uniform(0.012, 0.025) * rng.choice([-1, 1])
    g.aorta_shift = rng.uniform(0.02, 0.04)
    kx, ky, kr = g.knob
    g.knob = (kx + 0.01, ky - rng.uniform(0.0, 0.02), kr * rng.uniform(1.05, 1.25))
    if g.view == "lateral":
        g.aorta_wave = rng.uniform(0.3, 0.5)


def aortic_calcification(c: _Ctx) -> None:
    """Bright thin curvilinear rim along the aortic knob (the arch on lateral)."""
    g = c.geo
    kx, ky, kr = g.knob
    kx += g.aorta_shift * 0.6
    amp = c.u(0.2, 0.35) * c.gain
    a0, a1 = c.u(-2.6, -2.0), c.u(-0.5, 0.4)
    r = kr * 1.05
    if c.lateral:
        kx, ky, r = kx + 0.03, ky + 0.06, 0.075
        a0, a1 = c.u(-2.7, -2.3), c.u(-1.0, -0.5)
    th = np.linspace(a0, a1, 10)
    pts = np.stack([kx + r * fm.cos(th), ky + r * fm.sin(th)], 1)
    _polyline(c, c.dens, pts, c.u(0.005, 0.009), amp, blur=0.0015)


def pulm_htn_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Larger central pulmonary arteries."""
    g.hilum_scale = (
        g.hilum_scale[0] * rng.uniform(1.15, 1.35),
        g.hilum_scale[1] * rng.uniform(1.15, 1.35),
    )


def pulm_htn(c: _Ctx) -> None:
    """Enlarged, quickly tapering hilar arteries and a bulging main pulmonary artery."""
    g = c.geo
    amp = c.u(0.4, 0.65) * c.gain
    if c.lateral:
        hx, hy = g.hila[0]
        _ellipse(c, c.occ, hx - 0.03, hy - 0.02, 0.05, 0.04, amp, edge=0.5, dome=1)
        return
    for side, (hx, hy) in zip((-1, 1), g.hila, strict=True):
        for a in (c.u(-0.7, -0.3), c.u(0.6, 1.1)):
            length = c.u(0.05, 0.075)
            ang = math.atan2(math.sin(a), side * math.cos(a))
            pts = [(hx, hy), (hx + length * math.cos(ang), hy + length * math.sin(ang))]
            _polyline(c, c.occ, pts, c.u(0.02, 0.028), amp, blur=0.006)
    _, ky, _ = g.knob
    _ellipse(
        c, c.occ, g.cx + g.med_w + 0.012, ky + 0.07, 0.028, 0.032, 1.0 * c.gain, edge=0.3, dome=0.5
    )


def adenopathy(c: _Ctx) -> None:
    """Lumpy hilar and right paratracheal contour: clusters of lobulated round nodes."""
    g = c.geo
    amp = c.u(0.5, 0.8) * c.gain
    if c.lateral:
        hx, hy = g.hila[0]
        sites = [(hx + c.u(-0.03, 0.03), hy + c.u(-0.04, 0.02))]
    else:
        which = int(c.rng.integers(4))  # right hilum, left, both, both + paratracheal
        sites = []
        if which in (0, 2, 3):
            sites.append(g.hila[0])
        if which in (1, 2, 3):
            sites.append(g.hila[1])
        if which == 3 or c.u(0, 1) < 0.3:
            sites.append((g.cx - g.med_w - 0.005, g.hila[0][1] - 0.13))
    for sx, sy in sites:
        side = -1 if sx < g.cx else 1
        nodes = [
            (sx + side * c.u(0.0, 0.03), sy + c.u(-0.04, 0.04), c.u(0.012, 0.022))
            for _ in range(int(c.rng.integers(2, 5)))
        ]
        _dots(c, c.occ, nodes, amp, blur=0.004)


def hilum(c: _Ctx) -> None:
    """Enlarged, dense, smooth hilar shadows (one or both sides)."""
    g = c.geo
    amp = c.u(0.5, 0.8) * c.gain
    if c.lateral:
        hx, hy = g.hila[0]
        _ellipse(c, c.occ, hx, hy, 0.06, 0.06, amp, edge=0.5, dome=1)
        return
    both, first = c.u(0, 1) < 0.65, c.side()
    for side, (hx, hy) in zip((-1, 1), g.hila, strict=True):
        if both or side == first:
            k = c.u(1.5, 2.0)
            _ellipse(
                c,
                c.occ,
                hx + side * 0.012 * k,
                hy,
                0.02 * k,
                0.04 * k,
                amp,
                edge=0.5,
                dome=1.0,
                angle=side * c.u(-10, 20),
            )


def hernia(c: _Ctx) -> None:
    """Hiatal hernia: retrocardiac gas bubble with a flat air-fluid level."""
    g = c.geo
    if c.lateral:
        hx, _, hrx, _, _ = g.heart
        x, y = hx + hrx * 0.95, g.dia_top - c.u(0.03, 0.06)
    else:
        x, y = g.cx + c.u(0.0, 0.05), g.dia_l - c.u(0.04, 0.08)
    r = c.u(0.04, 0.065)
    amp = c.u(0.14, 0.22) * c.gain
    level = y + c.u(-0.2, 0.4) * r
    win = _win(c, x - r, x + r, y - r, y + r)
    if win is None:
        return
    rs, cs, X, Y = win
    inside = _smooth((1 - np.sqrt(((X - x) / r) ** 2 + ((Y - y) / (0.85 * r)) ** 2)) / 0.1)
    c.dens[rs, cs] += -amp * inside * _ramp(level - Y, _edge(c, 0.002)) + 0.03 * amp * inside
    _ring(c, c.dens, x, y, r, 0.004, amp * 0.25, blur=0.002)
