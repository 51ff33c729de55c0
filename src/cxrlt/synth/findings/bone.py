"""Bones: rib, clavicle and vertebral fractures, osteopenia, scoliosis and kyphosis."""

from __future__ import annotations

import math

import numpy as np

from cxrlt.synth import fmath as fm
from cxrlt.synth.anatomy import _RIB_AMP, _RIB_FRAC, _Geo, _rib_point, _spine_x
from cxrlt.synth.canvas import _Ctx, _edge, _ellipse, _polyline, _ramp, _rib_band, _win


def _break_rib(
    c: _Ctx, side: int, k: int, u: float, step: float, gap: float, amp: float = 1.0
) -> None:
    """Cut posterior rib k at lateral fraction u: a lucent cleft, lateral fragment displaced.

    `amp` scales the redrawn rib (1 = unchanged density; more = sclerotic, healing).
    """
    g = c.geo
    xb, yb = _rib_point(g, side, k, u)
    win = _win(c, xb - 0.06, xb + 0.06, yb - g.rib_s * 0.6, yb + g.rib_s * 0.8)
    if win is None:
        return
    rs, cs, X, Y = win
    old = _rib_band(c, X, Y, k)
    lateral = _ramp(side * (X - xb), _edge(c, 0.002))
    new = _rib_band(c, X, Y, k, shift=step) * lateral + old * (1 - lateral)
    cleft = fm.exp(-(((X - xb + (Y - yb) * c.u(-0.5, 0.5)) / max(gap, 1.2 / c.w)) ** 2))
    cleft *= min(gap / 0.002, 1.0)  # no gap, no cleft
    c.bone[rs, cs] += _RIB_AMP * (amp * new * (1 - cleft) - old)


def rib_fracture(c: _Ctx) -> None:
    """Acute fractures of 1-3 adjacent ribs laterally: a lucent cleft and a step-off each."""
    if c.lateral:
        return
    g = c.geo
    side, k0, u = c.side(), int(c.rng.integers(3, 8)), c.u(0.55, 0.9)
    for k in range(k0, k0 + int(c.rng.integers(1, 4))):
        _break_rib(
            c,
            side,
            k,
            u + c.u(-0.04, 0.04),
            step=c.u(0.35, 0.7) * g.rib_s * _RIB_FRAC * c.gain,
            gap=c.u(0.005, 0.01) * c.gain,
        )


def fracture(c: _Ctx) -> None:
    """Healing rib fracture (callus), proximal humerus fracture, or vertebral compression."""
    g = c.geo
    if c.lateral:  # a wedge-compressed vertebra: see fracture_geo
        return
    kind = int(c.rng.choice(3, p=[0.5, 0.25, 0.25]))
    if kind == 0:  # callus: fusiform bright thickening of a rib, with a slight step
        side, k, u = c.side(), int(c.rng.integers(3, 8)), c.u(0.5, 0.9)
        x, y = _rib_point(g, side, k, u)
        x2, y2 = _rib_point(g, side, k, u + 0.05)
        ang = math.degrees(math.atan2(y2 - y, x2 - x))
        _ellipse(
            c,
            c.bone,
            x,
            y,
            c.u(0.018, 0.03),
            g.rib_s * 0.32,
            c.u(0.08, 0.13) * c.gain,
            angle=ang,
            edge=0.5,
            dome=0.7,
        )
        _break_rib(
            c, side, k, u, step=g.rib_s * 0.08 * c.gain, gap=0.002 * c.gain, amp=1 + 0.3 * c.gain
        )
    elif kind == 1:  # proximal humerus: lucent oblique line and a little sclerosis
        side = c.side()
        hx = float(np.clip(g.cx + side * (g.body_w + 0.09), 0.06, 0.94))  # keep it in view
        hy = g.apex + 0.08
        pts = [(hx - 0.05, hy + c.u(-0.01, 0.01)), (hx + 0.05, hy + c.u(0.0, 0.03))]
        _polyline(c, c.bone, pts, c.u(0.005, 0.009), -0.15 * c.gain, blur=0.002)
        _ellipse(c, c.bone, hx, hy + 0.03, 0.05, 0.02, 0.05 * c.gain, edge=0.5)
    else:  # vertebral compression on the frontal view: short, dense vertebral body
        k = int(c.rng.integers(4, 9))
        yv = g.apex + (k + 0.5) * g.vert_h
        xv = float(_spine_x(g, yv))
        _ellipse(c, c.bone, xv, yv, 0.034, g.vert_h * 0.25, c.u(0.08, 0.12) * c.gain, edge=0.3)
        _ellipse(
            c, c.bone, xv + 0.036, yv, 0.008, g.vert_h * 0.3, c.u(0.05, 0.08) * c.gain, edge=0.5
        )


def fracture_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Lateral view: one wedge-compressed mid/lower thoracic vertebra."""
    if g.view == "lateral":
        g.compress = int(rng.integers(3, 8))
        g.compress_depth = 0.35


def clavicle_fracture_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Mid-shaft clavicle break, usually displaced: a gap and a step-off (frontal only)."""
    if g.view == "frontal":
        g.clav_side = -1 if rng.uniform() < 0.5 else 1
        g.clav_t = rng.uniform(0.35, 0.7)
        g.clav_gap = rng.uniform(0.03, 0.05)
        g.clav_step = rng.uniform(0.04, 0.065) * rng.choice([-1, 1])


def osteopenia_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Faint, low-contrast bones."""
    g.bone_scale *= rng.uniform(0.4, 0.6)


def scoliosis_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Lateral curvature of the spine on the frontal view (C- or S-shaped)."""
    if g.view == "frontal":
        g.spine_amp = rng.uniform(0.04, 0.07) * rng.choice([-1, 1])
        g.spine_waves = 0.5 if rng.uniform() < 0.5 else 1.0
        g.spine_phase = rng.uniform(-0.3, 0.3)


def kyphosis_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Lateral only: exaggerated posterior convexity of the thoracic spine, wedged bodies."""
    if g.view == "lateral":
        g.kyph += rng.uniform(0.045, 0.075)
        g.wedge = rng.uniform(0.15, 0.3)
