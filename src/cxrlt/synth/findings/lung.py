"""Lung parenchyma: airspace and interstitial opacities, edema, atelectasis, fibrosis,
emphysema and bullae, fissures and the azygos lobe, infarction and pulmonary embolism."""

from __future__ import annotations

import math

import numpy as np

from cxrlt.synth import fmath as fm
from cxrlt.synth.anatomy import _dia, _dia_side, _Geo, _lung_lat
from cxrlt.synth.canvas import (
    _blob,
    _blur3,
    _Ctx,
    _disc,
    _dots,
    _ellipse,
    _lines,
    _lung_xy,
    _polygon,
    _polyline,
    _ring,
    _scale_region,
    _smooth,
    _tex,
    _win,
)


def _patch(
    c: _Ctx,
    x: float,
    y: float,
    r: float,
    amp: float,
    *,
    sharp: float,
    texture: str = "cloud",
    tex_mix: float = 0.6,
    lobes: float = 0.25,
) -> None:
    """Ill-defined airspace opacity: lobulated outline, cloudy texture."""
    _blob(
        c,
        c.occ,
        x,
        y,
        r,
        amp,
        lobes=lobes,
        blur=0.12 + 0.5 * (1 - sharp),
        dome=0.3,
        texture=texture,
        tex_mix=tex_mix,
    )


def lung_opacity(c: _Ctx) -> None:
    """Soft ill-defined patches of increased density anywhere in the lungs."""
    for _ in range(int(c.rng.integers(1, 4))):
        x, y = _lung_xy(c, c.side(), c.u(0.2, 0.9), c.u(0.2, 0.85))
        _patch(c, x, y, c.u(0.04, 0.085), c.u(0.4, 0.7) * c.gain, sharp=c.u(0.0, 0.4))


def infiltration(c: _Ctx) -> None:
    """Fainter streaky-reticular ill-defined patches (confusable with Lung Opacity)."""
    for _ in range(int(c.rng.integers(1, 3))):
        x, y = _lung_xy(c, c.side(), c.u(0.25, 0.85), c.u(0.2, 0.8))
        _patch(
            c,
            x,
            y,
            c.u(0.05, 0.09),
            c.u(0.35, 0.6) * c.gain,
            sharp=0.0,
            texture="reticular",
            tex_mix=0.8,
        )


def pneumonia(c: _Ctx) -> None:
    """Dense, patchy (acinar) airspace opacity, usually in a lower or mid zone."""
    side = c.side()
    for _ in range(1 if c.u(0, 1) < 0.7 else 2):
        x, y = _lung_xy(c, side, c.u(0.45, 0.9), c.u(0.3, 0.8))
        r = c.u(0.045, 0.09)
        _patch(c, x, y, r, c.u(0.55, 0.85) * c.gain, sharp=c.u(0.2, 0.6), tex_mix=0.7)
        angles = c.rng.uniform(0, 2 * np.pi, 6)  # acinar nodularity around the edge
        acini = [(x + r * math.cos(a), y + r * math.sin(a), c.u(0.008, 0.016)) for a in angles]
        _dots(c, c.occ, acini, 0.5 * c.gain, blur=0.005)


def consolidation(c: _Ctx) -> None:
    """Dense homogeneous lobar opacity, a sharp fissural border, air bronchograms."""
    g = c.geo
    amp = c.u(0.6, 0.85) * c.gain
    if c.lateral:
        lx, ly, lrx, lry = g.lung_box
        lower = c.u(0, 1) < 0.6
        x, y = (lx + 0.3 * lrx, ly - 0.25 * lry) if lower else (lx - 0.2 * lrx, ly - 0.7 * lry)
        _patch(c, x, y, 0.1, amp, sharp=0.6, tex_mix=0.3)
        return
    side, lobe = c.side(0.6), int(c.rng.integers(3))  # upper, middle/lingula, lower
    fis = g.hila[0][1] - 0.01 if side < 0 else g.hila[1][1] + 0.02  # minor-fissure level
    dia = _dia_side(g, side)
    med, lat = g.cx + side * 0.02, g.cx + side * g.W * 1.05
    if lobe == 0:  # upper lobe: sharp lower border along the fissure (right side)
        pts = [(med, g.apex - 0.02), (lat, g.apex - 0.02), (lat, fis), (med, fis)]
        blur = 0.004 if side < 0 else 0.012
        y0, y1 = g.apex, fis
    elif lobe == 1:  # middle lobe / lingula: against the heart border, oblique lower margin
        mid = g.cx + side * 0.55 * g.W
        pts = [(med, fis), (lat, fis), (lat, fis + 0.06), (mid, dia + 0.02), (med, dia + 0.02)]
        blur, y0, y1 = 0.008, fis, dia
    else:  # lower lobe: ill-defined upper margin, fills the base
        top = fis + c.u(0.04, 0.1)
        pts = [(med, top), (lat, top + 0.08), (lat, dia + 0.1), (med, dia + 0.1)]
        blur, y0, y1 = 0.015, top, dia
    _polygon(c, c.occ, np.array(pts), amp, blur=blur, texture="cloud", tex_mix=0.25)
    hx, hy = g.hila[0 if side < 0 else 1]  # air bronchograms: dark branches inside
    zf = (0.5 * (y0 + y1) - g.apex) / (_dia_side(g, side) - g.apex)
    for _ in range(3):
        tx, ty = _lung_xy(c, side, float(np.clip(zf + c.u(-0.1, 0.1), 0.05, 0.95)), c.u(0.55, 0.9))
        sx, sy = 0.5 * (hx + tx), 0.5 * (hy + ty)
        _polyline(c, c.dens, [(sx, sy), (tx, ty)], 0.006, -0.06 * c.gain, blur=0.002)


def edema(c: _Ctx) -> None:
    """Bilateral perihilar 'bat wing' haze, indistinct vessels, Kerley B lines at the bases."""
    g = c.geo
    amp = c.u(0.35, 0.6) * c.gain
    if c.lateral:
        hx, hy = g.hila[0]
        _ellipse(
            c,
            c.occ,
            hx,
            hy + 0.03,
            0.2,
            0.18,
            amp,
            edge=0.8,
            dome=0.5,
            texture="cloud",
            tex_mix=0.5,
        )
        return
    for side, (hx, hy) in zip((-1, 1), g.hila, strict=True):
        rx = g.W * c.u(0.45, 0.7)
        _ellipse(
            c,
            c.occ,
            hx + side * rx * 0.4,
            hy + 0.02,
            rx,
            c.u(0.13, 0.2),
            amp,
            edge=0.8,
            dome=0.5,
            texture="cloud",
            tex_mix=0.5,
        )
        kerley = []  # Kerley B: short horizontal lines at the lateral base
        for _ in range(int(c.rng.integers(3, 7))):
            x, y = _lung_xy(c, side, c.u(0.72, 0.95), 1.0)
            kerley.append(([(x, y), (x - side * c.u(0.015, 0.03), y)], 0.003))
        _lines(c, c.occ, kerley, 0.6 * c.gain)
    win = _win(c, g.cx - 1.1 * g.W, g.cx + 1.1 * g.W, g.apex, max(g.dia_r, g.dia_l) + 0.1)
    if win is not None:  # indistinct vessel margins
        rs, cs, _, _ = win
        c.vessel[rs, cs] = _blur3(c.vessel[rs, cs], 0.3 * min(c.gain, 1.0))


def atelectasis(c: _Ctx) -> None:
    """Plate-like (discoid) linear opacity at a lung base, sometimes with basal haze."""
    for _ in range(1 if c.u(0, 1) < 0.5 else 2):
        x, y = _lung_xy(c, c.side(), c.u(0.7, 0.9), c.u(0.3, 0.7))
        length = c.u(0.08, 0.18)
        ang = math.radians(c.u(-15, 15))
        dx, dy = 0.5 * length * math.cos(ang), 0.5 * length * math.sin(ang)
        pts = [(x - dx, y - dy), (x, y + c.u(-0.008, 0.008)), (x + dx, y + dy)]
        _polyline(c, c.occ, pts, c.u(0.01, 0.02), c.u(0.7, 1.0) * c.gain, blur=0.004)
        if c.u(0, 1) < 0.7:  # subsegmental collapse: basal haze below the plate
            _ellipse(
                c, c.occ, x, y + 0.035, length * 0.7, 0.045, c.u(0.25, 0.45) * c.gain, edge=0.8
            )


def atelectasis_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Volume loss: sometimes a slightly raised hemidiaphragm."""
    if g.view == "frontal" and rng.uniform() < 0.5:
        if rng.uniform() < 0.5:
            g.dia_r -= rng.uniform(0.005, 0.02)
        else:
            g.dia_l -= rng.uniform(0.005, 0.02)


def lobar_atelectasis(c: _Ctx) -> None:
    """Dense triangular collapse against a fissure: RUL apex, RML heart border, LLL 'sail'."""
    g = c.geo
    amp = c.u(0.45, 0.7) * c.gain
    if c.lateral:
        hx, hy = g.hila[0]
        pts = np.array(
            [(hx, hy), (g.ant + 0.05, g.dia_top - 0.02), (g.ant + 0.08, g.dia_top - 0.08)]
        )
        _polygon(c, c.occ, pts, amp, blur=0.004)
        return
    kind = int(c.rng.integers(3))
    if kind == 0:  # right upper lobe: wedge at the apex with a concave lower border
        hx, hy = g.hila[0]
        lat = g.cx - g.W * c.u(0.5, 0.75)
        pts = np.array(
            [
                (hx + 0.02, hy - 0.03),
                (g.cx - g.med_w, g.apex + 0.02),
                (lat, g.apex + 0.03),
                (0.5 * (lat + hx), hy - 0.07),
            ]
        )
    elif kind == 1:  # right middle lobe: triangle against the right heart border
        hx, hy = g.hila[0]
        hb = g.heart[0] - g.heart[2] * 0.9
        pts = np.array(
            [(hx - 0.01, hy + 0.02), (hb - 0.1, g.dia_r - 0.03), (hb + 0.01, g.dia_r - 0.02)]
        )
    else:  # left lower lobe: retrocardiac triangle with a sharp oblique edge ('sail')
        hx, hy = g.hila[1]
        pts = np.array(
            [
                (hx, hy + 0.02),
                (g.cx + c.u(0.08, 0.13), g.dia_l + 0.02),
                (g.cx + 0.02, g.dia_l + 0.02),
            ]
        )
    _polygon(c, c.occ, pts, amp, blur=0.003)
    if kind == 2:  # the heart already displaces most air: show the sail edge through it
        _polygon(c, c.dens, pts, 0.05 * c.gain, blur=0.003)


def rounded_atelectasis(c: _Ctx) -> None:
    """Small round pleural-based opacity with a curving 'comet tail' of vessels to the hilum."""
    g = c.geo
    side = c.side()
    x, y = _lung_xy(c, side, c.u(0.62, 0.85), 0.9)
    r = c.u(0.026, 0.04)
    amp = c.u(0.4, 0.6) * c.gain
    _blob(c, c.occ, x, y, r, amp, lobes=0.05, blur=0.25, dome=0.5)
    hx, hy = g.hila[0 if side < 0 or c.lateral else 1]
    for k in (-1, 1):
        pts = [
            (x - side * r * 0.5, y),
            (0.5 * (x + hx) + 0.015 * k, 0.5 * (y + hy) + 0.03),
            (x + (hx - x) * 0.65, y + (hy - y) * 0.65),
        ]
        _polyline(c, c.occ, pts, 0.004, amp * 0.7, blur=0.002)


def fibrosis(c: _Ctx) -> None:
    """Reticular (net-like) lines in the lower, peripheral lung zones, bilateral."""
    g = c.geo
    amp = c.u(0.4, 0.6) * c.gain
    if c.lateral:
        lx, ly, lrx, lry = g.lung_box
        _ellipse(
            c,
            c.occ,
            lx + 0.3 * lrx,
            ly - 0.2 * lry,
            0.16,
            0.12,
            amp,
            edge=0.6,
            texture="reticular",
            tex_mix=1.0,
        )
        return
    win = _win(c, g.cx - 1.1 * g.W, g.cx + 1.1 * g.W, g.apex + 0.15, max(g.dia_r, g.dia_l) + 0.1)
    if win is None:
        return
    rs, cs, X, Y = win
    U = np.abs(X - g.cx) / g.W
    zone = _smooth((Y - (g.apex + 0.45 * (g.dia_r - g.apex))) / 0.2) * _smooth((U - 0.45) / 0.4)
    c.occ[rs, cs] += amp * zone * _tex(c, "reticular", rs, cs)
    c.vessel[rs, cs] *= 1 - 0.4 * min(c.gain, 1.0) * zone


def fibrosis_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Lower-lobe volume loss: slightly raised diaphragm."""
    if g.view == "frontal":
        d = rng.uniform(0.0, 0.025)
        g.dia_r -= d
        g.dia_l -= d


def emphysema_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Hyperinflation: low flat diaphragm, hyperlucent lungs with few markings, narrow heart."""
    g.air *= rng.uniform(1.08, 1.2)
    g.markings *= rng.uniform(0.45, 0.65)
    hx, hy, hrx, hry, tilt = g.heart
    if g.view == "lateral":
        d = rng.uniform(0.03, 0.06)
        g.dia_top += d
        g.curv *= rng.uniform(0.2, 0.45)
        g.ant -= rng.uniform(0.02, 0.04)  # barrel chest, wide retrosternal space
        lx, ly, lrx, lry = g.lung_box
        g.lung_box = (lx - 0.015, ly + d, lrx + 0.015, lry + d)
        g.heart = (hx + 0.03, hy + d, hrx * 0.9, hry, tilt)
        return
    d = rng.uniform(0.03, 0.06)
    g.dia_r += d
    g.dia_l += d * rng.uniform(0.8, 1.0)
    g.curv *= rng.uniform(0.2, 0.45)
    g.cp_depth *= 0.5
    g.heart = (hx - hrx * 0.1, hy + d * 0.8, hrx * rng.uniform(0.8, 0.9), hry * 1.05, tilt + 10)


def bulla(c: _Ctx) -> None:
    """Large thin-walled lucent circle without vessel markings, usually in an upper zone."""
    r = c.u(0.045, 0.085)
    x, y = _lung_xy(c, c.side(), c.u(0.18, 0.45), c.u(0.45, 0.8))
    _scale_region(
        c, c.vessel, (x - r, x + r, y - r, y + r), _disc(x, y, r), 1 - 0.95 * min(c.gain, 1.0)
    )
    _ellipse(c, c.dens, x, y, r, r, -c.u(0.04, 0.07) * c.gain, edge=0.1)
    _ring(c, c.dens, x, y, r, c.u(0.003, 0.005), c.u(0.05, 0.08) * c.gain, blur=0.001)


def fissure(c: _Ctx) -> None:
    """Thickened fissure: thin horizontal line in the right mid-zone (oblique on lateral)."""
    g = c.geo
    amp, width = c.u(0.6, 0.9) * c.gain, c.u(0.003, 0.006)
    if c.lateral:
        lx, ly, lrx, lry = g.lung_box
        x2 = lx - 0.5 * lrx
        major = [
            (lx + 0.55 * lrx, ly - 0.85 * lry),
            (lx, ly - 0.45 * lry),
            (x2, float(_dia(g, x2)) - 0.005),
        ]
        _polyline(c, c.occ, major, width, amp, blur=0.001)
        return
    hx, hy = g.hila[0]
    y = hy + c.u(-0.04, 0.03)
    t = np.linspace(-1, 1, 8)
    xs = np.linspace(float(g.cx - _lung_lat(g, y)), hx - 0.01, 8)
    ys = y + c.u(-0.012, 0.012) * t**2 + c.u(-0.01, 0.01) * t
    _polyline(c, c.occ, np.stack([xs, ys], 1), width, amp, blur=0.001)


def azygos_lobe(c: _Ctx) -> None:
    """Curved azygos fissure from the right apex down to a tear-drop 'azygos knot'."""
    if c.lateral:
        return
    g = c.geo
    amp = c.u(0.45, 0.75) * c.gain
    x_top, y_top = g.cx - c.u(0.35, 0.55) * g.W, g.apex + 0.005
    x_bot, y_bot = g.cx - g.med_w - 0.008, g.apex + c.u(0.13, 0.17)
    t = np.linspace(0, 1, 10)
    xs = x_top + (x_bot - x_top) * t - c.u(0.01, 0.025) * fm.sin(np.pi * t)
    ys = y_top + (y_bot - y_top) * t
    # drawn wide enough to survive downsampling: the fissure is four pleural layers thick
    _polyline(c, c.occ, np.stack([xs, ys], 1), c.u(0.011, 0.015), amp, blur=0.002)
    _ellipse(c, c.occ, x_bot, y_bot, 0.018, 0.026, amp * 1.3, edge=0.4, dome=0.8)


def _wedge(c: _Ctx, side: int, amp: float, size: float, sharp: float) -> tuple[float, float]:
    """Pleural-based, wedge-shaped (truncated cone) peripheral opacity (Hampton hump)."""
    g = c.geo
    x, y = _lung_xy(c, side, c.u(0.55, 0.88), 0.97)
    hx, hy = g.hila[0 if side < 0 or c.lateral else 1]
    dx, dy = hx - x, hy - y
    n = math.hypot(dx, dy)
    dx, dy = dx / n, dy / n
    px_, py_ = -dy, dx
    tip, length = size * 0.35, size * 1.4
    pts = np.array(
        [
            (x + px_ * size, y + py_ * size),
            (x - px_ * size, y - py_ * size),
            (x + dx * length - px_ * tip, y + dy * length - py_ * tip),
            (x + dx * length + px_ * tip, y + dy * length + py_ * tip),
        ]
    )
    _polygon(c, c.occ, pts, amp, blur=size * (0.5 - 0.35 * sharp))
    return x, y


def infarction(c: _Ctx) -> None:
    """Pleural-based wedge opacity pointing to the hilum (Hampton hump)."""
    _wedge(c, c.side(), c.u(0.3, 0.5) * c.gain, c.u(0.025, 0.04), sharp=c.u(0.3, 0.8))


def pulmonary_embolism(c: _Ctx) -> None:
    """Subtle: regional oligaemia (fewer markings), a faint wedge, a fuller hilum."""
    if c.lateral:
        return
    g = c.geo
    side = c.side()
    x, y = _wedge(c, side, c.u(0.25, 0.4) * c.gain, c.u(0.025, 0.04), sharp=c.u(0.0, 0.4))
    r = c.u(0.08, 0.12)
    _scale_region(
        c, c.vessel, (x - r, x + r, y - r, y + r), _disc(x, y, r, 0.5), max(0.0, 1 - 0.7 * c.gain)
    )
    hx, hy = g.hila[0 if side < 0 else 1]
    _ellipse(c, c.occ, hx, hy, 0.02, 0.03, 0.25 * c.gain, edge=0.5, dome=1)
