"""The normal chest every image starts from: body, lungs, heart, mediastinum, vessels and bones.

Frontal and lateral views are drawn from the (possibly finding-adjusted) geometry into the
context's layers, before any finding draws its sign.
"""

from __future__ import annotations

import math

import numpy as np

from cxrlt.synth import fmath as fm
from cxrlt.synth.anatomy import (
    _RIB_AMP,
    _dia,
    _dia_side,
    _lat_spine_x,
    _lung_lat,
    _lung_med,
    _rib_ant,
    _rib_phase,
    _rib_profile,
    _spine_x,
)
from cxrlt.synth.canvas import (
    Points,
    _Ctx,
    _edge,
    _ellipse,
    _lines,
    _polygon,
    _polyline,
    _ramp,
    _smooth,
    _tex,
    _win,
)


def _base_frontal(c: _Ctx, rng: np.random.Generator) -> None:
    """Body, lungs, heart and mediastinum, vessels, spine, ribs, clavicles, shoulders."""
    g, X, Y = c.geo, c.bank.x, c.bank.y
    e = _edge(c, 0.006)
    adx = np.abs(X - g.cx)
    # body: neck, sloping rounded shoulders, chest wall, slightly narrower abdomen
    neck = 0.085
    reach = g.body_w + 0.11
    shoulder_top = (
        g.apex
        - 0.13
        + 0.3 * fm.power(np.maximum(adx - neck, 0), 1.3)
        + 0.3 * _smooth((adx - reach + 0.08) / 0.12)
    )
    shoulder_top = np.where(adx < neck, -1.0, shoulder_top)
    wall = g.body_w + 0.11 * (1 - _smooth((Y - g.apex) / 0.2)) - 0.03 * _smooth((Y - g.dia_r) / 0.3)
    body = _ramp(wall - adx, e * 4) * _ramp(Y - shoulder_top, e * 4)
    thick = np.sqrt(np.clip(1.0 - (adx / (wall + 0.05)) ** 2, 0, 1))
    dia = _dia(g, X)
    tissue = (
        g.soft
        * (0.4 + 0.6 * thick)
        * (0.94 + 0.12 * _tex(c, "cloud", slice(0, c.h), slice(0, c.w)))
    )
    c.dens += body * (tissue + 0.06 * _ramp(Y - dia - 0.01, 0.04))
    if g.arms > 0.5:  # arms hanging beside the chest
        a0 = g.body_w + 0.02 + 0.04 * (g.arms - 0.5)
        arm = _ramp(adx - a0, e * 3) * _ramp(a0 + 0.12 - adx, e * 4) * _ramp(Y - g.apex, 0.08)
        c.dens += 0.4 * g.soft * arm
    # lungs (both at once: symmetric borders, side-specific diaphragm)
    lung = _ramp(_lung_lat(g, Y) - adx, e) * _ramp(adx - _lung_med(g, Y), e * 1.5)
    lung = lung * _ramp(dia - Y, e)
    c.lung[:] = lung
    prof_x = 0.7 + 0.3 * fm.sin(np.pi * np.clip((adx - 0.5 * g.med_w) / g.W, 0, 1))
    prof_y = 0.55 + 0.45 * _smooth((Y - g.apex) / 0.18)
    c.air += g.air * lung * (prof_y * prof_x)
    if g.breast:
        for s in (-1, 1):
            _breast(c, g.cx + s * 0.7 * g.W, g.dia_r + 0.03, 0.55 * g.W, 0.15, g.breast)
    if g.gastric:
        _ellipse(
            c, c.dens, g.cx + 0.5 * g.W, g.dia_l + 0.05, 0.05, 0.03, -g.gastric, edge=0.4, dome=0.6
        )
    # mediastinum joined to the heart: displaces the lungs medially
    mw, (hx, hy, hrx, hry, tilt), (kx, ky, kr) = g.med_w, g.heart, g.knob
    top = g.apex - 0.12
    pts = np.array(
        [
            (g.cx - mw, top),
            (g.cx + mw, top),
            (g.cx + mw, ky),
            (g.cx + mw + 0.008, ky + 0.06),
            (hx + 0.5 * hrx, hy - 0.5 * hry),
            (hx - 0.8 * hrx, hy - 0.1 * hry),
            (g.cx - mw * 1.15, ky + 0.05),
        ]
    )
    _polygon(c, c.occ, pts, 1.0, blur=0.006)
    _ellipse(c, c.dens, g.cx, ky, 1.5 * mw, 0.25, 0.06, edge=0.5)
    kx += g.aorta_shift * 0.6
    _ellipse(c, c.occ, kx, ky, kr, kr * 1.15, 1.0, edge=0.15, dome=0.5)
    ay = np.linspace(ky, _dia_side(g, 1) - 0.02, 12)
    ramp_in = np.clip((ay - ky) / 0.1, 0, 1)
    ax = (
        kx
        - 0.3 * kr
        + g.aorta_shift * ramp_in
        + g.aorta_wave * fm.sin((ay - ky) / 0.22 * 2 * np.pi) * ramp_in
    )
    _polyline(c, [(c.occ, 1.0), (c.dens, 0.05)], np.stack([ax, ay], 1), 0.036, 0.5, blur=0.003)
    tx, carina = g.cx - 0.004, g.hila[0][1] - 0.08  # trachea and main bronchi: air columns
    airway = [([(tx, 0.0), (tx, g.apex), (tx - 0.005, carina)], 0.03)]
    airway += [
        ([(tx, carina), (0.5 * (tx + hlx), 0.5 * (carina + hly) - 0.01)], 0.018)
        for hlx, hly in g.hila
    ]
    _lines(c, c.dens, airway, -0.09, blur=0.005)
    _heart(c, hx, hy, hrx, hry, tilt)
    for i, (hlx, hly) in enumerate(g.hila):
        sc = g.hilum_scale[i]
        _ellipse(c, c.occ, hlx, hly, 0.02 * sc, 0.04 * sc, 0.45, edge=0.6, dome=1.0)
    _vessels(c, rng)
    _spine_frontal(c)
    _ribs_frontal(c)
    _clavicles(c)
    for s in (-1, 1):  # humeral heads and shafts
        hx_ = g.cx + s * (g.body_w + 0.1)
        _ellipse(c, c.bone, hx_, g.apex - 0.01, 0.065, 0.075, 0.16, edge=0.1, dome=0.6)
        _ellipse(c, c.bone, hx_ + s * 0.01, g.apex + 0.25, 0.04, 0.25, 0.1, edge=0.15, dome=0.7)


def _breast(c: _Ctx, x: float, y: float, rx: float, ry: float, amp: float) -> None:
    """Breast shadow: density fading upwards, with a crisp curved lower margin."""
    win = _win(c, x - rx, x + rx, y - ry, y + ry)
    if win is None:
        return
    rs, cs, X, Y = win
    q = np.sqrt(((X - x) / rx) ** 2 + ((Y - y) / ry) ** 2)
    c.dens[rs, cs] += amp * _smooth((1 - q) / 0.06) * _smooth((Y - y + ry) / (1.6 * ry))


def _heart(c: _Ctx, hx: float, hy: float, hrx: float, hry: float, tilt: float) -> None:
    """Heart: an ellipsoid (sharp border, dense centre) resting on the diaphragm."""
    g = c.geo
    r = max(hrx, hry) * 1.05
    win = _win(c, hx - r, hx + r, hy - r, hy + r)
    if win is None:
        return
    rs, cs, X, Y = win
    ca, sa = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    dx, dy = X - hx, Y - hy
    q = ((dx * ca + dy * sa) / hrx) ** 2 + ((dy * ca - dx * sa) / hry) ** 2
    val = fm.power(np.sqrt(np.clip(1.0 - q, 0, 1)), 0.5)
    c.occ[rs, cs] += val
    c.dens[rs, cs] += 0.06 * val * _smooth((_dia(g, X) + 0.01 - Y) / 0.04)


def _vessels(c: _Ctx, rng: np.random.Generator) -> None:
    """Shift a canonical vessel tree onto this chest's hila (a crop) and mask it by the lungs."""
    g, p = c.geo, c.bank.vpad
    arr = c.bank.vessels[int(rng.integers(len(c.bank.vessels)))]
    if rng.uniform() < 0.5:
        arr = arr[:, ::-1]
    hx, hy = g.hila[0] if c.lateral else (g.cx, 0.5 * (g.hila[0][1] + g.hila[1][1]))
    oy = int(np.clip(p + round((0.42 - hy) * c.h), 0, 2 * p))
    ox = int(np.clip(p + round((0.5 - hx) * c.w), 0, 2 * p))
    c.vessel += arr[oy : oy + c.h, ox : ox + c.w] * c.lung


def _spine_frontal(c: _Ctx) -> None:
    """Vertebral bodies with disc spaces, pedicles and spinous processes, down the midline."""
    g = c.geo
    win = _win(c, g.cx - 0.12, g.cx + 0.12, 0.0, 1.0)
    if win is None:
        return
    rs, cs, X, Y = win
    d = X - _spine_x(g, Y)
    ad = np.abs(d)
    hw = 0.032
    v = (Y - g.apex) / g.vert_h
    f = v - np.floor(v)
    disc = _smooth((np.abs(f - 0.5) * 2 - 0.72) / 0.28)  # 1 in the disc spaces
    body = _ramp(hw - ad, _edge(c, 0.004)) * (1 - 0.6 * disc)
    ped = fm.exp(-(((ad - 0.75 * hw) / 0.008) ** 2) - ((f - 0.35) / 0.16) ** 2)
    spin = fm.exp(-((d / 0.006) ** 2) - ((f - 0.8) / 0.18) ** 2)
    fade = 1 - 0.5 * _smooth((Y - g.dia_r) / 0.2)
    c.bone[rs, cs] += (0.045 * body + 0.035 * ped + 0.025 * spin) * fade
    # paraspinal soft tissue: hidden in the mediastinum unless the spine curves out of it
    c.occ[rs, cs] += 0.8 * _ramp(hw + 0.012 - ad, _edge(c, 0.008))


def _ribs_frontal(c: _Ctx) -> None:
    """All posterior and anterior ribs at once: a periodic profile along curved rib lines."""
    g = c.geo
    win = _win(
        c, g.cx - 1.15 * g.W, g.cx + 1.15 * g.W, g.rib_y0 - 0.03, g.rib_y0 + g.rib_s * (g.rib_n + 5)
    )
    if win is None:
        return
    rs, cs, X, Y = win
    U = np.abs(X - g.cx) / g.W
    soft = _edge(c, 0.004) / g.rib_s
    p = _rib_phase(g, X, Y)
    keep = np.clip(p + 0.5, 0, 1) * np.clip(g.rib_n - p, 0, 1)
    fade = _ramp(U - 0.1, 0.06) * _ramp(1.12 - U, 0.06)
    bone = _RIB_AMP * _rib_profile(p - np.floor(p), soft) * keep * fade
    # anterior ribs: fainter, thinner, running down-medially, invisible medially (cartilage)
    pa = (Y - g.rib_y0 - 0.02 - _rib_ant(g, U)) / (g.rib_s * 1.1)
    keepa = np.clip(pa, 0, 1) * np.clip(g.rib_n - 3 - pa, 0, 1)
    fadea = _ramp(U - 0.5, 0.25) * _ramp(1.08 - U, 0.05)
    bone += 0.035 * _rib_profile(pa - np.floor(pa), soft, 0.3) * keepa * fadea
    c.bone[rs, cs] += bone


def _clavicles(c: _Ctx) -> None:
    """S-shaped clavicles from the sternal notch to the shoulders; one may be broken."""
    g = c.geo
    parts: list[tuple[Points, float]] = []
    for s in (-1, 1):
        t = np.linspace(0, 1, 14)
        x = g.cx + s * (0.03 + t * (g.W + 0.03))
        y = g.clav_y + 0.025 - 0.055 * t + 0.012 * fm.sin(2 * np.pi * t)
        pts = np.stack([x, y], 1)
        if s != g.clav_side:
            parts.append((pts, 0.026))
            continue
        i = int(g.clav_t * 13)  # medial and displaced lateral fragments
        lateral = pts[i + 1 :] + np.array([s * g.clav_gap, g.clav_step])
        parts += [(pts[: i + 1], 0.026), (lateral, 0.026)]
    _lines(c, c.bone, parts, 0.1, blur=0.003)


def _base_lateral(c: _Ctx, rng: np.random.Generator) -> None:
    """Lateral template: one lung field, heart anterior, spine posterior, sternum in front."""
    g, X, Y = c.geo, c.bank.x, c.bank.y
    e = _edge(c, 0.006)
    mid, half = 0.5 * (g.ant + g.post), 0.5 * (g.post - g.ant)
    top = 0.05 * _smooth((g.apex + 0.1 - Y) / 0.2)  # shoulders widen the top
    back = 0.6 * (_lat_spine_x(g, Y) - _lat_spine_x(g, g.apex + 0.3))  # back follows spine
    dx = X - mid
    body = _ramp(half + 0.035 + top - np.abs(dx), e * 4) * _ramp(g.post + 0.04 + back - X, e * 4)
    thick = np.sqrt(np.clip(1 - (dx / (half + 0.12)) ** 2, 0, 1))
    dia = _dia(g, X)
    tissue = (
        g.soft
        * (0.55 + 0.45 * thick)
        * (0.94 + 0.12 * _tex(c, "cloud", slice(0, c.h), slice(0, c.w)))
    )
    c.dens += body * (tissue + 0.06 * _ramp(Y - dia - 0.01, 0.04))
    # arms and shoulders over the upper chest
    _ellipse(c, c.dens, mid - 0.05, g.apex - 0.02, 0.3, 0.14, 0.14, edge=0.8, dome=0.6)
    # lung field: a superellipse cut by the diaphragm (deep posterior sulcus)
    lx, ly, lrx, lry = g.lung_box
    q = np.abs((X - lx) / lrx) ** 2.5 + np.abs(np.minimum(Y - ly, 0) / lry) ** 2.5
    lung = _ramp(1.0 - q, e * 2.5 / min(lrx, lry)) * _ramp(dia - Y, e)
    c.lung[:] = lung
    prof = 0.5 + 0.5 * np.sqrt(np.clip(1 - q, 0, 1))
    prof = prof * (0.6 + 0.4 * _smooth((Y - g.apex) / 0.25))
    c.air += 0.85 * g.air * lung * prof
    xs = np.linspace(lx - lrx * 0.3, lx + lrx * 0.95, 12)  # the other hemidiaphragm
    _polyline(c, c.occ, np.stack([xs, _dia(g, xs) + 0.02], 1), 0.012, 0.3, blur=0.005)
    # trachea, aortic arch, hilum, heart, vessels
    hlx, hly = g.hila[0]
    _polyline(
        c,
        c.dens,
        [(hlx - 0.07, 0.0), (hlx - 0.03, g.apex + 0.05), (hlx + 0.0, hly - 0.06)],
        0.032,
        -0.08,
        blur=0.006,
    )
    kx, ky, _ = g.knob
    arch = [
        (kx - 0.06, ky + 0.16),
        (kx - 0.04, ky + 0.03),
        (kx + 0.03, ky - 0.01),
        (kx + 0.11, ky + 0.05),
        (_lat_spine_x(g, ky + 0.3) - 0.06, ky + 0.3),
        (_lat_spine_x(g, ky + 0.55) - 0.05, ky + 0.55),
    ]
    _polyline(c, c.occ, arch, 0.055, 0.25 + g.aorta_wave, blur=0.012)
    _ellipse(
        c,
        c.occ,
        hlx,
        hly,
        0.05 * g.hilum_scale[0],
        0.055 * g.hilum_scale[0],
        0.35,
        edge=0.8,
        dome=1.0,
    )
    hx, hy, hrx, hry, _ = g.heart  # great vessels above the heart
    _polygon(
        c,
        c.occ,
        np.array(
            [
                (hx - 0.4 * hrx, hy - 0.6 * hry),
                (kx - 0.07, ky + 0.1),
                (kx - 0.02, ky + 0.1),
                (hx + 0.5 * hrx, hy - 0.6 * hry),
            ]
        ),
        0.6,
        blur=0.012,
    )
    _heart(c, *g.heart)
    _vessels(c, rng)
    # sternum, spine, posterior ribs
    st = [(g.ant + 0.03, g.apex + 0.06), (g.ant + 0.015, g.apex + 0.25), (g.ant + 0.02, 0.62)]
    _polyline(c, c.bone, st, 0.016, 0.11, blur=0.003)
    _spine_lateral(c)
    win = _win(c, g.spine_x - 0.3, g.post + 0.03, g.apex - 0.05, g.dia_top + 0.1)
    if win is not None:
        rs, cs, Xw, Yw = win
        p = (Yw - 0.45 * (Xw - g.spine_x)) / (g.vert_h * 1.05)
        t = p - np.floor(p)
        band = np.clip(1 - np.abs(t - 0.5) / 0.18, 0, 1)
        fade = _ramp(Xw - (g.spine_x - 0.25), 0.1) * _ramp(g.post + 0.01 - Xw, 0.02)
        c.bone[rs, cs] += 0.04 * band * fade


def _spine_lateral(c: _Ctx) -> None:
    """Vertebral bodies along a kyphotic curve, end plates perpendicular to the axis."""
    g = c.geo
    win = _win(c, g.spine_x - 0.1, g.spine_x + g.kyph + 0.15, 0.0, 1.0)
    if win is None:
        return
    rs, cs, X, Y = win
    sx = _lat_spine_x(g, Y)
    slope = (_lat_spine_x(g, Y + 0.01) - sx) / 0.01
    d = X - sx  # across the column, posterior positive
    v = (Y + d * slope - g.apex) / g.vert_h
    f = v - np.floor(v)
    k = np.floor(v)
    hw = 0.036
    mid = np.clip(1 - np.abs(Y - 0.45) / 0.3, 0, 1)  # wedging strongest mid-thorax
    h = 0.8 - g.wedge * mid * np.clip(0.5 - d / (2 * hw), 0, 1)  # height, less anteriorly
    if g.compress >= 0:
        h = np.where(k == g.compress, h - g.compress_depth * np.clip(0.5 - d / (2 * hw), 0, 1), h)
    body = _ramp(hw - np.abs(d), _edge(c, 0.004)) * _ramp(h / 2 - np.abs(f - h / 2), 0.08)
    post = fm.exp(-(((d - 0.065) / 0.016) ** 2) - ((f - 0.45) / 0.3) ** 2)
    fade = 1 - 0.35 * _smooth((Y - g.apex - 0.1) / 0.5)  # lower spine looks darker
    c.bone[rs, cs] += (0.1 * body + 0.04 * post) * fade
