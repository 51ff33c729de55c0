"""The drawing context and the rasterising primitives every drawing function uses.

`_Ctx` is one image being drawn: its geometry, the attenuation layers and the generator of
the finding being drawn. `_bank` caches coordinate grids and fixed-seed textures (clouds,
reticular nets, detector noise, vessel trees) per image size. The primitives add soft
ellipses, polylines, polygons, rings, dots and lobulated blobs to a layer, anti-aliased by
supersampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cxrlt.synth import fmath as fm
from cxrlt.synth.anatomy import (
    _dia,
    _dia_side,
    _Geo,
    _lung_lat,
    _lung_med,
    _rib_phase,
    _rib_profile,
)

_SS = 4  # supersampling factor of rasterised primitives (anti-aliasing)


# --- Cached grids and texture banks (built once per image size) ---------------------------


@dataclass(frozen=True)
class _Bank:
    """Coordinate vectors and fixed-seed texture banks for one image size."""

    x: np.ndarray  # (1, w) pixel-centre x
    y: np.ndarray  # (h, 1) pixel-centre y
    cloud: tuple[np.ndarray, ...]  # low-pass noise in [0, 1], (1.5 h, 1.5 w)
    reticular: tuple[np.ndarray, ...]  # net of fine lines in [0, 1]
    noise: tuple[np.ndarray, ...]  # white Gaussian noise, (1.25 h, 1.25 w)
    vessels: tuple[np.ndarray, ...]  # vessel trees in a canonical chest, padded by vpad
    vpad: int


def _vessel_tree(h: int, w: int, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Branching, tapering pulmonary vessels radiating from both hila (canonical frame).

    Canonical chest: midline 0.5, hila at y 0.42, lung half-width 0.35; the array is padded
    by `pad` pixels on every side so that it can be shifted onto any chest by cropping.
    """
    s = 2  # supersample
    img = Image.new("L", ((w + 2 * pad) * s, (h + 2 * pad) * s), 0)
    draw = ImageDraw.Draw(img)
    segs: list[tuple[float, float, float, float, float]] = []

    def grow(x: float, y: float, ang: float, length: float, width: float, depth: int) -> None:
        bend = rng.normal(0, 0.15)
        xm, ym = x + 0.5 * length * math.cos(ang), y + 0.5 * length * math.sin(ang)
        ang2 = ang + bend
        x2, y2 = xm + 0.5 * length * math.cos(ang2), ym + 0.5 * length * math.sin(ang2)
        segs.append((x, y, xm, ym, width))
        segs.append((xm, ym, x2, y2, width * 0.9))
        if depth == 0:
            return
        for sign in (-1, 1):
            grow(
                x2,
                y2,
                ang2 + sign * rng.uniform(0.2, 0.5),
                length * rng.uniform(0.65, 0.85),
                width * rng.uniform(0.6, 0.75),
                depth - 1,
            )

    for side, (hx, hy) in ((-1, (0.4, 0.43)), (1, (0.6, 0.41))):
        for a in np.linspace(-1.25, 1.45, 7) + rng.uniform(-0.15, 0.15, 7):
            ang = math.atan2(math.sin(a), side * math.cos(a))  # a: 0 = lateral, >0 = down
            grow(hx, hy, ang, rng.uniform(0.04, 0.06), rng.uniform(0.011, 0.015), 5)
    wmax = max(seg[4] for seg in segs)
    for x1, y1, x2, y2, wd in sorted(segs, key=lambda seg: seg[4]):
        draw.line(
            [((x1 * w + pad) * s, (y1 * h + pad) * s), ((x2 * w + pad) * s, (y2 * h + pad) * s)],
            fill=int(70 + 185 * wd / wmax),
            width=max(1, round(wd * w * s)),
        )
    arr = np.asarray(img.reduce(s), dtype=np.float32) / 255.0
    return ndimage.gaussian_filter(arr, 0.6 * w / 320).astype(np.float32)


@lru_cache(maxsize=8)
def _bank(h: int, w: int) -> _Bank:
    """Build grids and texture banks for one size (fixed internal seed: deterministic)."""
    rng = np.random.default_rng(20240917)
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w)[None, :]
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    th, tw = h + h // 2, w + w // 2
    scale = min(h, w) / 320.0
    clouds, nets = [], []
    for _ in range(3):
        n = ndimage.gaussian_filter(rng.standard_normal((th, tw)).astype(np.float32), 7 * scale)
        n /= n.std()
        m = ndimage.gaussian_filter(rng.standard_normal((th, tw)).astype(np.float32), 2.0 * scale)
        n += 0.6 * m / m.std()
        n = (n - n.min()) / (n.max() - n.min())
        clouds.append(n.astype(np.float32))
        b = ndimage.gaussian_filter(
            rng.standard_normal((th, tw)).astype(np.float32), max(2.6 * scale, 0.9)
        )
        b /= b.std()
        nets.append(fm.exp(-((b / 0.35) ** 2)))  # zero-crossing net (b is float32)
    noise = tuple(
        rng.standard_normal((h + h // 4, w + w // 4)).astype(np.float32) for _ in range(3)
    )
    vpad = max(h, w) // 8
    vessels = tuple(_vessel_tree(h, w, vpad, rng) for _ in range(6))
    for arr in (x, y, *clouds, *nets, *noise, *vessels):
        arr.flags.writeable = False
    return _Bank(x, y, tuple(clouds), tuple(nets), noise, vessels, vpad)


# --- Drawing context and primitives -------------------------------------------------------


@dataclass
class _Ctx:
    """One image being drawn: geometry, layers, and the generator of the current finding."""

    geo: _Geo
    bank: _Bank
    h: int
    w: int
    dens: np.ndarray  # soft tissue, organs, metal; extra air (negative)
    air: np.ndarray  # air in the lungs
    occ: np.ndarray  # fraction of lung air displaced (heart, fluid, opacities), clipped 0..1
    vessel: np.ndarray  # lung markings; scaled by geo.markings, hidden where occ is 1
    bone: np.ndarray  # bones; scaled by geo.bone_scale
    lung: np.ndarray  # soft lung-field mask
    rng: np.random.Generator
    gain: float = 1.0

    @property
    def lateral(self) -> bool:
        return self.geo.view == "lateral"

    def u(self, lo: float, hi: float) -> float:
        """A uniform draw from the current finding's generator."""
        return float(self.rng.uniform(lo, hi))

    def side(self, p_right: float = 0.5) -> int:
        """-1 = patient's right (image left), +1 = patient's left (image right)."""
        return -1 if self.rng.uniform() < p_right else 1


_Win = tuple[slice, slice, np.ndarray, np.ndarray]


def _win(c: _Ctx, x0: float, x1: float, y0: float, y1: float) -> _Win | None:
    """Pixel window covering a normalised box, with its coordinate vectors (None if empty)."""
    c0, c1 = max(int(math.floor(x0 * c.w)), 0), min(int(math.ceil(x1 * c.w)), c.w)
    r0, r1 = max(int(math.floor(y0 * c.h)), 0), min(int(math.ceil(y1 * c.h)), c.h)
    if c1 <= c0 or r1 <= r0:
        return None
    rs, cs = slice(r0, r1), slice(c0, c1)
    return rs, cs, c.bank.x[:, cs], c.bank.y[rs]


def _ramp(v: np.ndarray, edge: float) -> np.ndarray:
    """Soft step from 0 to 1 as v crosses 0 over a width `edge`."""
    out = v * (1.0 / edge) + 0.5
    return np.clip(out, 0.0, 1.0, out=out) if isinstance(out, np.ndarray) else np.clip(out, 0, 1)


def _smooth(t: np.ndarray | float) -> np.ndarray:
    """Smoothstep of t clipped to [0, 1]."""
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _edge(c: _Ctx, e: float) -> float:
    """An edge width in normalised units, never below about one pixel."""
    return max(e, 1.0 / max(c.w, c.h))


def _tex(c: _Ctx, kind: str, rs: slice, cs: slice) -> np.ndarray:
    """A random crop of a texture bank ("cloud" or "reticular") matching the window."""
    bank = c.bank.cloud if kind == "cloud" else c.bank.reticular
    arr = bank[int(c.rng.integers(len(bank)))]
    oy = int(c.rng.integers(0, arr.shape[0] - c.h + 1))
    ox = int(c.rng.integers(0, arr.shape[1] - c.w + 1))
    return arr[oy + rs.start : oy + rs.stop, ox + cs.start : ox + cs.stop]


def _ellipse(
    c: _Ctx,
    layer: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    amp: float,
    *,
    angle: float = 0.0,
    edge: float = 0.15,
    dome: float = 0.0,
    texture: str | None = None,
    tex_mix: float = 0.5,
) -> None:
    """Soft ellipse added to a layer: dome=1 is an ellipsoid's projection (dense centre,
    sharp rim), dome=0 a flat disc; `edge` is the soft margin as a fraction of the radius."""
    r = max(rx, ry) * (1 + edge)
    win = _win(c, cx - r, cx + r, cy - r, cy + r)
    if win is None:
        return
    rs, cs, X, Y = win
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    dx, dy = X - cx, Y - cy
    q = ((dx * ca + dy * sa) / rx) ** 2 + ((dy * ca - dx * sa) / ry) ** 2
    val = _smooth((1.0 - np.sqrt(q)) / max(edge, 1e-3))
    if dome:
        val = val * (1 - dome + dome * np.sqrt(np.clip(1.0 - q, 0.0, 1.0)))
    if texture is not None:
        val = val * (1 - tex_mix + tex_mix * 2 * _tex(c, texture, rs, cs))
    layer[rs, cs] += amp * val


Paint = Callable[[ImageDraw.ImageDraw, Callable[[float, float], tuple[float, float]]], None]


def _raster(
    c: _Ctx, box: tuple[float, float, float, float], blur: float, paint: Paint
) -> tuple[slice, slice, np.ndarray] | None:
    """Rasterise PIL drawing commands in a window with supersampling; returns a [0, 1] mask.

    `blur` is a Gaussian sigma in normalised units; the window is padded to hold it. A wide
    blur is applied at reduced resolution and scaled back up (same look, a fraction of the
    cost).
    """
    pad = 3 * blur + 2.0 / c.w
    win = _win(c, box[0] - pad, box[1] + pad, box[2] - pad, box[3] + pad)
    if win is None:
        return None
    rs, cs, _, _ = win
    n, m = cs.stop - cs.start, rs.stop - rs.start
    sigma = blur * c.w
    down = sigma / 1.5 if sigma > 2.5 else 1.0
    nn, mm = max(2, math.ceil(n / down)), max(2, math.ceil(m / down))
    ss = 2 if sigma >= 0.7 else _SS  # a blurred shape needs less anti-aliasing
    fx, fy = nn / n * ss, mm / m * ss
    img = Image.new("L", (nn * ss, mm * ss), 0)

    def px(x: float, y: float) -> tuple[float, float]:
        return ((x * c.w - cs.start) * fx, (y * c.h - rs.start) * fy)

    paint(ImageDraw.Draw(img), px)
    mask = np.asarray(img.reduce(ss), dtype=np.float32) * (1.0 / 255.0)
    if sigma > 0.4:
        mask = ndimage.gaussian_filter(mask, sigma * nn / n, mode="constant", truncate=3.0)
    if down > 1.0:
        mask = np.asarray(
            Image.fromarray(mask, mode="F").resize((n, m), Image.Resampling.BILINEAR),
            dtype=np.float32,
        )
    return rs, cs, mask


def _bounds(pts: np.ndarray, margin: float) -> tuple[float, float, float, float]:
    return (
        float(pts[:, 0].min() - margin),
        float(pts[:, 0].max() + margin),
        float(pts[:, 1].min() - margin),
        float(pts[:, 1].max() + margin),
    )


Layer = np.ndarray | Sequence[tuple[np.ndarray, float]]  # one layer, or (layer, weight) pairs
Points = np.ndarray | Sequence[tuple[float, float]]


def _stamp(layer: Layer, amp: float, rs: slice, cs: slice, mask: np.ndarray) -> None:
    """Add amp * mask to one layer or, weighted, to several (one rasterisation, many uses)."""
    if isinstance(layer, np.ndarray):
        layer[rs, cs] += amp * mask
    else:
        for arr, weight in layer:
            arr[rs, cs] += (amp * weight) * mask


def _lines(
    c: _Ctx, layer: Layer, lines: Sequence[tuple[Points, float]], amp: float, *, blur: float = 0.0
) -> None:
    """Several polylines [(points, width), ...] rasterised together and added to a layer."""
    arrs = [(np.asarray(p, dtype=np.float64), wd) for p, wd in lines]

    def paint(d: ImageDraw.ImageDraw, px: Callable) -> None:
        for pts, width in arrs:
            wpx = max(1, round(px(width, 0)[0] - px(0, 0)[0]))
            d.line([px(x, y) for x, y in pts], fill=255, width=wpx)

    allpts = np.concatenate([p for p, _ in arrs])
    out = _raster(c, _bounds(allpts, max(wd for _, wd in arrs)), blur, paint)
    if out is not None:
        _stamp(layer, amp, *out)


def _polyline(
    c: _Ctx, layer: Layer, pts: Points, width: float, amp: float, *, blur: float = 0.0
) -> None:
    """A line of a given width (normalised) through points, added to a layer."""
    _lines(c, layer, [(pts, width)], amp, blur=blur)


def _polygon(
    c: _Ctx,
    layer: Layer,
    pts: np.ndarray,
    amp: float,
    *,
    blur: float = 0.0,
    texture: str | None = None,
    tex_mix: float = 0.5,
) -> None:
    """A filled polygon (soft-edged by `blur`), optionally textured."""
    pts = np.asarray(pts, dtype=np.float64)

    def paint(d: ImageDraw.ImageDraw, px: Callable) -> None:
        d.polygon([px(x, y) for x, y in pts], fill=255)

    out = _raster(c, _bounds(pts, 0.0), blur, paint)
    if out is None:
        return
    rs, cs, mask = out
    if texture is not None:
        mask = mask * (1 - tex_mix + tex_mix * 2 * _tex(c, texture, rs, cs))
    _stamp(layer, amp, rs, cs, mask)


def _ring(
    c: _Ctx,
    layer: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    width: float,
    amp: float,
    *,
    blur: float = 0.0,
) -> None:
    """A thin circle (wall of a cavity or bulla, a wire loop, an electrode)."""
    ry = r * c.w / c.h

    def paint(d: ImageDraw.ImageDraw, px: Callable) -> None:
        wpx = max(1, round(px(width, 0)[0] - px(0, 0)[0]))
        x0, y0 = px(cx - r, cy - ry)
        x1, y1 = px(cx + r, cy + ry)
        d.ellipse([x0, y0, x1, y1], outline=255, width=wpx)

    out = _raster(c, (cx - r, cx + r, cy - ry, cy + ry), blur, paint)
    if out is not None:
        rs, cs, mask = out
        layer[rs, cs] += amp * mask


def _dots(
    c: _Ctx,
    layer: Layer,
    dots: Sequence[tuple[float, float, float]],
    amp: float,
    *,
    blur: float = 0.0,
) -> None:
    """Many small round opacities [(x, y, r), ...] rasterised together (nodules, nodes)."""
    arr = np.asarray(dots, dtype=np.float64)

    def paint(d: ImageDraw.ImageDraw, px: Callable) -> None:
        for x, y, r in arr:
            ry = r * c.w / c.h
            d.ellipse([*px(x - r, y - ry), *px(x + r, y + ry)], fill=255)

    rmax = float(arr[:, 2].max())
    out = _raster(c, _bounds(arr[:, :2], rmax * max(1.0, c.w / c.h)), blur, paint)
    if out is not None:
        _stamp(layer, amp, *out)


def _blob_pts(
    c: _Ctx,
    cx: float,
    cy: float,
    r: float,
    lobes: float,
    *,
    aspect: float = 1.0,
    spikes: int = 0,
    n: int = 40,
) -> np.ndarray:
    """Outline of an irregular, lobulated (optionally spiculated) round shape."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in (2, 3, 5):
        rad += lobes / math.sqrt(k) * fm.cos(k * th + c.u(0, 2 * np.pi))
    if spikes:
        idx = c.rng.choice(n, size=spikes, replace=False)
        rad[idx] += c.rng.uniform(0.5, 1.1, size=spikes)
    rad = np.maximum(rad, 0.3) * r
    return np.stack([cx + rad * fm.cos(th) * aspect * c.h / c.w, cy + rad * fm.sin(th)], axis=1)


def _blob(
    c: _Ctx,
    layer: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    amp: float,
    *,
    lobes: float = 0.1,
    blur: float = 0.2,
    dome: float = 0.5,
    spikes: int = 0,
    aspect: float = 1.0,
    texture: str | None = None,
    tex_mix: float = 0.5,
) -> None:
    """A round opacity with a lobulated outline; `blur` (relative to r) sets margin sharpness,
    `dome` the share of a dense centre."""
    pts = _blob_pts(c, cx, cy, r, lobes, aspect=aspect, spikes=spikes)
    if dome > 0:
        _ellipse(
            c, layer, cx, cy, r * aspect * c.h / c.w * 0.9, r * 0.9, amp * dome, edge=0.6, dome=1.0
        )
    _polygon(c, layer, pts, amp * (1 - dome), blur=blur * r, texture=texture, tex_mix=tex_mix)


def _scale_region(
    c: _Ctx,
    layer: np.ndarray,
    box: tuple[float, float, float, float],
    mask_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    factor: float,
) -> None:
    """Multiply a layer by `factor` where mask_fn(X, Y) is 1 (e.g. remove lung markings)."""
    win = _win(c, *box)
    if win is None:
        return
    rs, cs, X, Y = win
    layer[rs, cs] *= 1.0 - (1.0 - factor) * mask_fn(X, Y)


def _disc(x: float, y: float, r: float, soft: float = 0.1) -> Callable:
    """Mask function of a soft disc, for _scale_region."""

    def fn(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return _smooth((1 - np.sqrt(((X - x) / r) ** 2 + ((Y - y) / r) ** 2)) / soft)

    return fn


# --- Anatomy on the drawing context, and a cheap blur -------------------------------------


def _lung_xy(c: _Ctx, side: int, zf: float, uf: float) -> tuple[float, float]:
    """A point in a lung: zf from apex (0) to base (1), uf medial (0) to lateral (1).

    On the lateral view `side` is ignored and uf runs from anterior (0) to posterior (1).
    """
    g = c.geo
    if c.lateral:
        lx, ly, rx, ry = g.lung_box
        x = lx + (uf * 2 - 1) * rx * 0.85
        top = ly - ry * (1 - abs((x - lx) / rx) ** 2.5) ** (1 / 2.5)
        return x, top + zf * (float(_dia(g, x)) - top)
    y = g.apex + zf * (_dia_side(g, side) - g.apex)
    lat, med = float(_lung_lat(g, y)), float(_lung_med(g, y))
    return g.cx + side * (med + uf * (lat - med)), y


def _rib_band(c: _Ctx, X: np.ndarray, Y: np.ndarray, k: float, shift: float = 0.0) -> np.ndarray:
    """Profile of posterior rib number k (both sides) in a window; `shift` moves it down."""
    t = _rib_phase(c.geo, X, Y, shift) - k
    return _rib_profile(np.clip(t, -0.5, 1.0), _edge(c, 0.004) / c.geo.rib_s)


def _blur3(a: np.ndarray, k: float) -> np.ndarray:
    """Separable 3-tap blur [k, 1-2k, k] (sigma = sqrt(2k) px): a cheap detector PSF."""
    k = float(min(max(k, 0.0), 1 / 3))
    if k == 0:
        return a
    out = a * (1 - 2 * k)
    out[:, 1:] += k * a[:, :-1]
    out[:, :-1] += k * a[:, 1:]
    out[:, 0] += k * a[:, 0]
    out[:, -1] += k * a[:, -1]
    res = out * (1 - 2 * k)
    res[1:] += k * out[:-1]
    res[:-1] += k * out[1:]
    res[0] += k * out[0]
    res[-1] += k * out[-1]
    return res
