"""Pleura and air outside the lungs: effusion, pleural thickening and other pleural disease,
pneumothorax and hydropneumothorax, pneumomediastinum, pneumoperitoneum and subcutaneous
emphysema."""

from __future__ import annotations

import math

import numpy as np

from cxrlt.synth import fmath as fm
from cxrlt.synth.anatomy import _dia, _dia_side, _Geo, _lung_lat
from cxrlt.synth.canvas import (
    _Ctx,
    _edge,
    _ellipse,
    _lines,
    _lung_xy,
    _polygon,
    _polyline,
    _ramp,
    _smooth,
    _Win,
    _win,
)


def pleural_effusion(c: _Ctx) -> None:
    """Basal fluid with a meniscus rising laterally, blunting the costophrenic angle."""
    g = c.geo
    amp = c.u(0.85, 1.0) * c.gain
    if c.lateral:  # meniscus rising up the posterior chest wall
        lx, ly, lrx, lry = g.lung_box
        level = g.dia_top + c.u(-0.08, 0.03)
        win = _win(c, lx - lrx, lx + lrx + 0.05, level - 0.15, 1.0)
        if win is None:
            return
        rs, cs, X, Y = win
        rise = 0.1 * _smooth((X - lx + 0.3 * lrx) / (1.3 * lrx)) ** 2
        m = _smooth((Y - (level - rise)) / _edge(c, 0.03)) * _ramp(X - lx + 0.2 * lrx, 0.15)
        c.occ[rs, cs] += amp * m
        c.dens[rs, cs] += 0.04 * c.gain * m * c.lung[rs, cs]
        return
    for side in [c.side()] if c.u(0, 1) < 0.55 else [-1, 1]:
        dome = _dia_side(g, side)
        level = dome + c.u(-0.17, 0.02)  # fluid level mid-lung; low = only blunting
        meniscus = c.u(0.03, 0.07)
        xa, xb = sorted((g.cx, g.cx + side * 1.1 * g.W))
        win = _win(c, xa, xb, level - meniscus - 0.05, dome + g.curv * 0.3 + g.cp_depth + 0.05)
        if win is None:
            continue
        rs, cs, X, Y = win
        U = np.clip(np.abs(X - g.cx) / g.W, 0, 1.1)
        top = level - meniscus * U**2
        m = _smooth((Y - top) / _edge(c, c.u(0.015, 0.04)))
        c.occ[rs, cs] += amp * m
        c.dens[rs, cs] += 0.04 * c.gain * m * c.lung[rs, cs]


def _wall_band(
    c: _Ctx,
    side: int,
    z0: float,
    z1: float,
    thick: float,
    amp: float,
    blur: float,
    bulge: float = 0.0,
) -> None:
    """A band along the inner chest wall between heights z0..z1 (fractions of lung height)."""
    outer, inner = [], []
    for z, tp in zip(np.linspace(z0, z1, 12), fm.sin(np.linspace(0, np.pi, 12)), strict=True):
        x, y = _lung_xy(c, side, z, 1.0)
        outer.append((x + side * 0.004, y))
        inner.append((x - side * (thick * (0.3 + 0.7 * tp) + bulge * tp), y))
    _polygon(c, c.occ, np.array(outer + inner[::-1]), amp, blur=blur)


def pleural_thickening(c: _Ctx) -> None:
    """Long smooth band along the lateral chest wall, or an apical cap."""
    g = c.geo
    amp = c.u(0.6, 0.9) * c.gain
    if c.lateral:
        lx, ly, lrx, lry = g.lung_box
        pts = [
            (lx + lrx * 0.8, ly - lry * 0.75),
            (lx + lrx * 0.97, ly - lry * 0.45),
            (lx + lrx * 0.95, ly - lry * 0.15),
        ]
        _polyline(c, c.occ, pts, c.u(0.01, 0.016), amp, blur=0.004)
        return
    side = c.side()
    if c.u(0, 1) < 0.3:  # apical cap
        x, y = _lung_xy(c, side, 0.0, 0.5)
        _ellipse(c, c.occ, x, y + 0.01, 0.06, 0.02, amp, edge=0.5)
        return
    z0 = c.u(0.2, 0.5)
    _wall_band(c, side, z0, z0 + c.u(0.25, 0.45), c.u(0.009, 0.016), amp, 0.003)


def pleural_other(c: _Ctx) -> None:
    """Short focal pleural plaque: lenticular, sometimes with a calcified (bright) edge."""
    g = c.geo
    amp = c.u(0.5, 0.8) * c.gain
    if c.lateral:
        lx, ly, lrx, lry = g.lung_box
        _ellipse(c, c.occ, lx - lrx * 0.88, ly - lry * c.u(0.3, 0.6), 0.016, 0.045, amp, edge=0.3)
        return
    side = c.side()
    z0 = c.u(0.3, 0.75)
    _wall_band(c, side, z0, z0 + c.u(0.1, 0.18), 0.005, amp, 0.002, bulge=c.u(0.012, 0.022))
    if c.u(0, 1) < 0.5:
        x, y = _lung_xy(c, side, z0 + 0.05, 0.98)
        _polyline(
            c,
            c.dens,
            [(x, y - 0.025), (x - side * 0.006, y), (x, y + 0.025)],
            0.004,
            0.15 * c.gain,
            blur=0.001,
        )


def _draw_ptx(c: _Ctx, side: int, depth: float, z_end: float, amp: float) -> _Win | None:
    """Pneumothorax: lucent pleural space without markings, bounded by the visceral line."""
    g = c.geo
    y_end = g.apex + z_end * (_dia_side(g, side) - g.apex)
    xa, xb = sorted((g.cx, g.cx + side * 1.05 * g.W))
    win = _win(c, xa, xb, g.apex - 0.01, y_end + 0.05)
    if win is None:
        return None
    rs, cs, X, Y = win
    adx = np.abs(X - g.cx)
    d = depth * _smooth((y_end - Y) / (0.35 * (y_end - g.apex)))  # gap closes downwards
    collapsed = _Geo(view="frontal", apex=g.apex + depth, dia_r=g.dia_r, W=g.W, med_w=g.med_w)
    edge_x = np.minimum(_lung_lat(g, Y) - d, _lung_lat(collapsed, Y) - 0.4 * d)
    space = _ramp(adx - edge_x, _edge(c, 0.003)) * c.lung[rs, cs]
    line = fm.exp(-(((adx - edge_x) / _edge(c, 0.0025)) ** 2)) * (g.apex + 0.5 * depth < Y)
    line = line * _ramp(y_end + 0.02 - Y, 0.03) * _ramp(edge_x - 0.05, 0.02)
    c.vessel[rs, cs] *= 1 - min(c.gain, 1.0) * space
    c.dens[rs, cs] += amp * (-0.07 * space + 0.1 * line)
    return rs, cs, X, Y


def pneumothorax(c: _Ctx) -> None:
    """Visceral pleural line at the apex and lateral wall, lucent space beyond it."""
    if not c.lateral:
        _draw_ptx(c, c.side(), c.u(0.03, 0.1), c.u(0.5, 0.95), c.u(0.8, 1.2) * c.gain)


def hydropneumothorax(c: _Ctx) -> None:
    """Pneumothorax plus a flat, sharp horizontal air-fluid level with fluid below."""
    g = c.geo
    amp = c.u(0.45, 0.7) * c.gain
    if c.lateral:
        lx, ly, lrx, _ = g.lung_box
        level = g.dia_top - c.u(0.03, 0.08)
        win = _win(c, lx - lrx, lx + lrx, level - 0.01, 1.0)
        if win is not None:
            rs, cs, X, Y = win
            c.occ[rs, cs] += amp * _ramp(Y - level, _edge(c, 0.002))
        return
    side = c.side()
    level = g.apex + c.u(0.75, 0.9) * (_dia_side(g, side) - g.apex)
    win = _draw_ptx(c, side, c.u(0.03, 0.06), 1.0, 0.7 * c.gain)
    if win is None:
        return
    rs, cs, X, Y = win
    m = _ramp(Y - level, _edge(c, 0.002)) * _ramp(np.abs(X - g.cx) / g.W - 0.5, 0.1)
    c.occ[rs, cs] += amp * m
    c.vessel[rs, cs] *= 1 - min(c.gain, 1.0) * m


def pneumomediastinum(c: _Ctx) -> None:
    """Lucent stripe along the left heart border and mediastinum, with a thin pleural line."""
    g = c.geo
    amp = c.u(0.08, 0.14) * c.gain
    hx, hy, hrx, hry, _ = g.heart
    if c.lateral:
        pts = [
            (hx - 0.05, hy - hry - 0.03),
            (hx + 0.02, hy - hry - 0.05),
            (hx + 0.08, hy - hry - 0.01),
        ]
        _polyline(c, c.dens, pts, 0.008, -amp, blur=0.002)
        return
    th = np.linspace(-1.3, 0.3, 10)
    off = c.u(0.006, 0.012)
    pts = np.stack([hx + (hrx + off) * fm.cos(th) * 0.95, hy + (hry + off) * fm.sin(th)], 1)
    _polyline(c, c.dens, pts, 0.011, -amp, blur=0.002)
    _polyline(
        c,
        c.dens,
        [(g.cx + g.med_w + off, g.knob[1] - 0.08), (g.cx + g.med_w + off, hy - hry)],
        0.006,
        -amp,
        blur=0.002,
    )
    pts[:, 0] += 0.009
    _polyline(c, c.dens, pts, 0.003, amp * 0.6, blur=0.001)
    for s in (-1, 1):  # streaks into the neck
        x = g.cx + s * c.u(0.04, 0.07)
        _polyline(
            c,
            c.dens,
            [(x, g.apex - 0.08), (x + s * 0.01, g.apex + 0.02)],
            0.004,
            -amp * 0.8,
            blur=0.002,
        )


def pneumoperitoneum(c: _Ctx) -> None:
    """Thin lucent crescent of free air under the diaphragm (right side most often)."""
    g = c.geo
    amp = c.u(0.12, 0.22) * c.gain
    if c.lateral:
        lx, _, lrx, _ = g.lung_box
        xs = np.linspace(lx - 0.8 * lrx, lx - 0.1 * lrx, 10)
        _polyline(
            c, c.dens, np.stack([xs, _dia(g, xs) + 0.018], 1), c.u(0.008, 0.014), -amp, blur=0.003
        )
        return
    for side in [-1] if c.u(0, 1) < 0.65 else [-1, 1]:
        us = np.linspace(c.u(0.15, 0.3), c.u(0.75, 0.95), 14)
        xs = g.cx + side * us * g.W
        thick = c.u(0.016, 0.03) * fm.sin(np.linspace(0, np.pi, 14)) + 0.003
        top = _dia(g, xs) + 0.008
        pts = np.concatenate([np.stack([xs, top], 1), np.stack([xs, top + thick], 1)[::-1]])
        _polygon(c, c.dens, pts, -amp, blur=0.002)


def subcutaneous_emphysema(c: _Ctx) -> None:
    """Lucent streaks and bubbles in the chest-wall soft tissue (and neck)."""
    g = c.geo
    amp = c.u(0.12, 0.22) * c.gain
    n = int(c.rng.integers(12, 24))
    if c.lateral:
        streaks = []
        for _ in range(n):
            x, y = g.ant + c.u(-0.02, 0.03), c.u(g.apex, g.dia_top)
            streaks.append(
                ([(x, y), (x + c.u(-0.01, 0.01), y + c.u(0.02, 0.05))], c.u(0.003, 0.006))
            )
        _lines(c, c.dens, streaks, -amp, blur=0.002)
        return
    for side in [c.side()] if c.u(0, 1) < 0.6 else [-1, 1]:
        streaks = []
        for _ in range(n):
            y = c.u(g.apex - 0.05, g.dia_r)
            x = g.cx + side * (g.W + c.u(0.005, g.body_w - g.W))
            length, ang = c.u(0.03, 0.08), c.u(-0.5, 0.5) + math.pi / 2
            pts = [
                (x, y),
                (x + 0.5 * length * math.cos(ang), y + length * math.sin(ang)),
                (x + c.u(-0.01, 0.01), y + 1.6 * length),
            ]
            streaks.append((pts, c.u(0.003, 0.006)))
        _lines(c, c.dens, streaks, -amp, blur=0.0015)
