"""Procedural chest radiographs on which every finding draws its own visual signature.

The built-in synthetic dataset stands in for MIMIC-CXR-JPG in a CPU demo, so the images must
behave like radiographs for the methods: a small CNN should learn head classes well and tail
classes less well, confusable findings must look alike, some findings show on one view only,
and the five Task 3 classes must resemble their neighbours (see ``shared/SYNTH.md``).

How an image is made (a projection radiograph is a sum of attenuations along each ray):

1. A per-image geometry (:class:`_Geo`) comes from the patient's :class:`Anatomy` plus small
   per-image changes (inspiration, position).
2. Findings that change anatomy (a bigger heart, a flat diaphragm, a curved spine) adjust the
   geometry first (registry ``_ADJUST``).
3. The base anatomy is drawn into layers: ``dens`` (soft tissue, organs, metal, extra air as
   negative values), ``air`` (air in the lungs), ``occ`` (how much of that air is displaced
   by heart, vessels, fluid or opacities, 0..1), ``vessel`` (lung markings, hidden where the
   air is displaced) and ``bone`` (scaled down by osteopenia, cut by fractures).
4. Every finding then draws its signature (registry ``_DRAW``, one small function each).
5. Composition: ``dens - air * (1 - occ) + markings + bone``, then rotation / shift / scale,
   detector noise, blur and a random exposure curve.

Determinism and locality: the caller's ``rng`` gives one seed; the base image and every
finding get their own generator derived from it, so the same seed with and without a finding
differs only where that finding draws. Coordinates are normalised: ``x`` in [0, 1] from the
image's left (the patient's right on a frontal view) and ``y`` in [0, 1] from the top. On the
lateral view the patient faces left: anterior is the image's left.

Difficulty: contrast and size ranges live in each finding's function (head classes bold and
large, tail classes faint and small). :data:`CONSPICUITY` scales a finding's strength without
code changes: 1.0 as designed, 0 draws nothing, 0.5 half the contrast (geometry changes such
as heart size are interpolated). Each view of a study is rendered independently, so a finding
may take a different instance (side, place) on the frontal and the lateral image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cxrlt.labels import TASK1_CLASSES, TASK3_CLASSES

__all__ = ["CONSPICUITY", "FINDINGS", "LATERAL_VISIBLE", "Anatomy", "render", "sample_anatomy"]

FINDINGS: tuple[str, ...] = TASK1_CLASSES + TASK3_CLASSES
VIEWS: tuple[str, ...] = ("frontal", "lateral")

# Findings that leave a trace on the lateral view (every finding but Kyphosis shows on the
# frontal view; Kyphosis shows on the lateral view only).
LATERAL_VISIBLE: frozenset[str] = frozenset({
    "Adenopathy", "Atelectasis", "Calcification of the Aorta", "Cardiomegaly", "Consolidation",
    "Edema", "Emphysema", "Enlarged Cardiomediastinum", "Fibrosis", "Fissure", "Fracture",
    "Granuloma", "Hernia", "Hydropneumothorax", "Infarction", "Infiltration", "Kyphosis",
    "Lobar Atelectasis", "Lung Lesion", "Lung Opacity", "Mass", "Nodule", "Pleural Effusion",
    "Pleural Other", "Pleural Thickening", "Pneumomediastinum", "Pneumonia", "Pneumoperitoneum",
    "Pulmonary Hypertension", "Round(ed) Atelectasis", "Subcutaneous Emphysema",
    "Support Devices", "Tortuous Aorta", "Tuberculosis", "Bulla", "Cardiomyopathy", "Hilum",
    "Osteopenia",
})  # fmt: skip

# Strength multiplier per finding (1.0 = as designed, 0 = invisible); lower it to make a class
# harder. Read at render time, so it can be changed between calls.
CONSPICUITY: dict[str, float] = {name: 1.0 for name in FINDINGS}

_SS = 4  # supersampling factor of rasterised primitives (anti-aliasing)
_D_MAX = 1.6  # attenuation range covered by the display look-up table
_LUT_SIZE = 2048


# --------------------------------------------------------------------------------------
# Patient anatomy and per-image geometry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body habitus, fixed across a patient's images (fractions of image size)."""

    chest_width: float  # midline to lateral lung edge (frontal)
    lung_top: float  # height of the lung apices
    lung_height: float  # apex to the right hemidiaphragm dome
    heart_ratio: float  # cardiothoracic ratio (normal < 0.5)
    heart_tilt: float  # tilt of the heart's long axis, degrees
    mediastinum_width: float  # half-width of the upper mediastinum
    soft_tissue: float  # chest-wall thickness outside the ribs
    body_density: float  # soft-tissue attenuation: large habitus is brighter, less contrast
    bone_density: float  # bone attenuation multiplier
    rib_spacing: float  # vertical distance between posterior ribs
    rotation: float  # habitual rotation on the detector, degrees
    female: bool  # breast shadows over the lung bases
    ap_depth: float  # lateral: anterior to posterior chest depth
    thoracic_curve: float  # lateral: normal thoracic kyphotic curvature


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's habitus; values stay within a normal adult range."""
    u = rng.uniform
    return Anatomy(
        chest_width=float(u(0.32, 0.38)),
        lung_top=float(u(0.12, 0.16)),
        lung_height=float(u(0.48, 0.56)),
        heart_ratio=float(u(0.42, 0.5)),
        heart_tilt=float(u(20.0, 35.0)),
        mediastinum_width=float(u(0.045, 0.058)),
        soft_tissue=float(u(0.03, 0.07)),
        body_density=float(u(0.5, 0.6)),
        bone_density=float(u(0.85, 1.15)),
        rib_spacing=float(u(0.05, 0.058)),
        rotation=float(rng.normal(0.0, 1.5)),
        female=bool(u() < 0.5),
        ap_depth=float(u(0.6, 0.7)),
        thoracic_curve=float(u(0.015, 0.03)),
    )


Heart = tuple[float, float, float, float, float]  # centre x, centre y, rx, ry, tilt (deg)


@dataclass
class _Geo:
    """Landmarks of one image, in normalised image coordinates; findings may adjust them."""

    view: str
    # frontal
    cx: float = 0.5
    W: float = 0.35  # lung half-width
    apex: float = 0.14
    dia_r: float = 0.66  # dome top, patient's right (image left)
    dia_l: float = 0.69  # dome top, patient's left (image right)
    curv: float = 0.25  # dome curvature
    cp_depth: float = 0.03  # extra depth of the costophrenic angles
    body_w: float = 0.4
    med_w: float = 0.05
    heart: Heart = (0.53, 0.57, 0.15, 0.11, 30.0)
    knob: tuple[float, float, float] = (0.56, 0.29, 0.026)
    aorta_wave: float = 0.0
    aorta_shift: float = 0.0
    hila: tuple[tuple[float, float], tuple[float, float]] = ((0.41, 0.42), (0.59, 0.41))
    hilum_scale: tuple[float, float] = (1.0, 1.0)
    spine_amp: float = 0.0  # lateral curvature of the spine on the frontal view (scoliosis)
    spine_phase: float = 0.0
    spine_waves: float = 0.5  # 0.5 = C-shaped curve, 1.0 = S-shaped
    rib_y0: float = 0.11
    rib_s: float = 0.05
    rib_n: int = 10
    clav_y: float = 0.16
    clav_side: int = 0  # broken clavicle: -1 / +1, 0 none
    clav_t: float = 0.5  # where along it (0 sternal end, 1 shoulder)
    clav_gap: float = 0.0
    clav_step: float = 0.0
    bone_scale: float = 1.0
    air: float = 0.3
    markings: float = 0.1
    soft: float = 0.55
    breast: float = 0.0
    gastric: float = 0.0
    arms: float = 0.0
    vert_h: float = 0.045
    # lateral
    ant: float = 0.17
    post: float = 0.84
    lung_box: tuple[float, float, float, float] = (0.5, 0.66, 0.31, 0.52)  # cx, cy, rx, ry
    dia_top: float = 0.66
    spine_x: float = 0.74
    kyph: float = 0.02
    wedge: float = 0.0  # anterior wedging of mid-thoracic vertebrae (kyphosis)
    compress: int = -1  # index of a compressed vertebra (fracture), -1 none
    compress_depth: float = 0.0  # its loss of anterior height


def _frontal_geo(an: Anatomy, rng: np.random.Generator) -> _Geo:
    """Frontal landmarks from the habitus plus this image's inspiration and positioning."""
    u = rng.uniform
    g = _Geo(view="frontal")
    g.cx = 0.5 + float(u(-0.012, 0.012))
    g.W = an.chest_width * float(u(0.97, 1.03))
    g.apex = an.lung_top + float(u(-0.01, 0.01))
    height = an.lung_height * float(u(0.94, 1.05))
    g.dia_r = g.apex + height
    g.dia_l = g.dia_r + float(u(0.01, 0.03))
    g.curv = float(u(0.2, 0.3))
    g.cp_depth = float(u(0.02, 0.04))
    g.body_w = g.W + an.soft_tissue + 0.02
    g.med_w = an.mediastinum_width
    width = an.heart_ratio * 2 * g.W
    hry = float(u(0.11, 0.125)) * height / 0.52
    g.heart = (g.cx + 0.2 * width, g.dia_r - 0.3 * hry, 0.5 * width, hry, an.heart_tilt)
    g.knob = (g.cx + g.med_w + 0.004, g.apex + 0.15 * height / 0.52, float(u(0.02, 0.028)))
    hy = g.apex + 0.52 * height
    dx = 0.1 * g.W / 0.35
    g.hila = ((g.cx - dx, hy + 0.01), (g.cx + dx, hy - 0.01))
    g.rib_s = an.rib_spacing * height / 0.52
    g.rib_y0 = g.apex - 0.035
    g.clav_y = g.apex + float(u(0.0, 0.035))
    g.bone_scale = an.bone_density
    g.air = float(u(0.36, 0.42))
    g.markings = float(u(0.1, 0.14))
    g.soft = an.body_density
    g.breast = float(u(0.025, 0.05)) if an.female else 0.0
    g.gastric = float(u(0.08, 0.22)) if u() < 0.7 else 0.0
    g.arms = float(u(0.0, 1.0))
    g.vert_h = height / 10.5
    return g


def _lateral_geo(an: Anatomy, rng: np.random.Generator) -> _Geo:
    """Lateral landmarks: patient faces left, spine posterior (image right)."""
    u = rng.uniform
    g = _Geo(view="lateral")
    g.ant = 0.5 - an.ap_depth / 2 + float(u(-0.02, 0.01))
    g.post = g.ant + an.ap_depth
    g.apex = an.lung_top - 0.02 + float(u(-0.01, 0.01))
    height = an.lung_height * float(u(0.95, 1.05))
    g.dia_top = g.apex + height
    g.curv = float(u(0.08, 0.12))
    lx = 0.5 * (g.ant + g.post) - 0.005
    g.lung_box = (lx, g.dia_top, 0.5 * (g.post - g.ant) - 0.03, height)
    hr = an.heart_ratio / 0.43
    g.heart = (g.ant + 0.2 * hr, g.dia_top - 0.03, 0.19 * hr, 0.15 * hr, -35.0)
    g.spine_x = g.post - 0.125
    g.kyph = an.thoracic_curve
    g.hila = ((g.ant + 0.5 * an.ap_depth, g.apex + 0.3), (g.ant + 0.5 * an.ap_depth, g.apex + 0.3))
    g.bone_scale = an.bone_density
    g.air = float(u(0.36, 0.42))
    g.markings = float(u(0.08, 0.12))
    g.soft = an.body_density
    g.vert_h = height / 9.0
    g.knob = (g.ant + 0.42 * an.ap_depth, g.apex + 0.14, 0.03)
    return g


# --------------------------------------------------------------------------------------
# Cached grids and texture banks (built once per image size)
# --------------------------------------------------------------------------------------


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
        nets.append(np.exp(-((b / 0.35) ** 2)).astype(np.float32))  # zero-crossing net
    noise = tuple(
        rng.standard_normal((h + h // 4, w + w // 4)).astype(np.float32) for _ in range(3)
    )
    vpad = max(h, w) // 8
    vessels = tuple(_vessel_tree(h, w, vpad, rng) for _ in range(6))
    for arr in (x, y, *clouds, *nets, *noise, *vessels):
        arr.flags.writeable = False
    return _Bank(x, y, tuple(clouds), tuple(nets), noise, vessels, vpad)


# --------------------------------------------------------------------------------------
# Drawing context and primitives
# --------------------------------------------------------------------------------------


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
        rad += lobes / math.sqrt(k) * np.cos(k * th + c.u(0, 2 * np.pi))
    if spikes:
        idx = c.rng.choice(n, size=spikes, replace=False)
        rad[idx] += c.rng.uniform(0.5, 1.1, size=spikes)
    rad = np.maximum(rad, 0.3) * r
    return np.stack([cx + rad * np.cos(th) * aspect * c.h / c.w, cy + rad * np.sin(th)], axis=1)


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


# --------------------------------------------------------------------------------------
# Geometry helpers shared by the base drawing and the findings
# --------------------------------------------------------------------------------------


def _arc(s: np.ndarray | float) -> np.ndarray:
    """Quarter-ellipse profile: 0 at s=0 (rounded), 1 at s>=1 (vertical)."""
    s = np.clip(s, 0.0, 1.0)
    return np.sqrt(1.0 - (1.0 - s) ** 2)


def _lung_lat(g: _Geo, y: np.ndarray | float) -> np.ndarray:
    """Frontal: distance from the midline of the lateral lung border at height y."""
    t = (np.asarray(y) - g.apex) / (g.dia_r - g.apex)
    cap = 0.42 * g.W
    wall = cap + (g.W - cap) * _arc(t / 0.75) - 0.04 * g.W * np.clip((t - 0.85) / 0.3, 0, 1)
    return np.where(t < 0, -1.0, wall)


def _lung_med(g: _Geo, y: np.ndarray | float) -> np.ndarray:
    """Frontal: distance from the midline of the medial lung border at height y."""
    t = (np.asarray(y) - g.apex) / (g.dia_r - g.apex)
    cap = 0.42 * g.W
    m0 = 0.7 * g.med_w
    return np.where(t < 0, 1.0, cap - (cap - m0) * _arc(t / 0.3))


def _dia(g: _Geo, x: np.ndarray | float) -> np.ndarray:
    """Height of the diaphragm (the lung base) at x."""
    x = np.asarray(x, dtype=np.float32)
    if g.view == "lateral":
        lx, _, rx, _ = g.lung_box
        s = np.maximum(x - (lx - 0.3 * rx), 0.0) / rx
        post = np.clip((x - lx) / rx, 0.0, 1.0)
        return g.dia_top + g.curv * s * s + 0.05 * post**3
    dx = x - g.cx
    adx = np.abs(dx) / g.W
    top = np.where(dx < 0, g.dia_r, g.dia_l)
    s = adx - 0.5
    return top + g.curv * s * s + g.cp_depth * np.clip((adx - 0.8) / 0.2, 0, 1) ** 2


def _dia_side(g: _Geo, side: int) -> float:
    return g.dia_r if side < 0 else g.dia_l


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


def _rib_curve(g: _Geo, U: np.ndarray) -> np.ndarray:
    """Posterior rib centre-line drop (normalised y) versus lateral distance U (1 = wall)."""
    return g.W * (0.6 * U * U - 0.25 * U)


def _rib_ant(g: _Geo, U: np.ndarray) -> np.ndarray:
    """Anterior rib drop: they run down and medially from the lateral wall."""
    v = 1.0 - U
    return g.W * (0.5 * v - 0.15 * v * v)


_RIB_FRAC = 0.42  # posterior rib thickness as a fraction of the rib spacing
_RIB_AMP = 0.065  # posterior rib attenuation
_RIB_WIDEN = 0.012  # lower ribs are spaced further apart


def _rib_phase(g: _Geo, X: np.ndarray, Y: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Posterior-rib coordinate: integer part = rib number, fraction = across rib and space."""
    q = (Y - g.rib_y0 - shift - _rib_curve(g, np.abs(X - g.cx) / g.W)) / g.rib_s
    return q - _RIB_WIDEN * q * np.abs(q)


def _rib_profile(t: np.ndarray, soft: float, frac: float = _RIB_FRAC) -> np.ndarray:
    """A rib's cross-section for t in [0, 1): a band of width frac with brighter cortices."""
    inner = frac / 2 - np.abs(t - frac / 2)
    band = np.clip(inner / soft + 0.5, 0, 1)
    return band * (0.6 + 0.4 * np.clip(1 - inner / 0.12, 0, 1))


def _rib_band(c: _Ctx, X: np.ndarray, Y: np.ndarray, k: float, shift: float = 0.0) -> np.ndarray:
    """Profile of posterior rib number k (both sides) in a window; `shift` moves it down."""
    t = _rib_phase(c.geo, X, Y, shift) - k
    return _rib_profile(np.clip(t, -0.5, 1.0), _edge(c, 0.004) / c.geo.rib_s)


def _rib_point(g: _Geo, side: int, k: int, u: float) -> tuple[float, float]:
    """Centre of posterior rib k at lateral fraction u on a side."""
    p = k + _RIB_FRAC / 2
    q = (1 - math.sqrt(1 - 4 * _RIB_WIDEN * p)) / (2 * _RIB_WIDEN)
    y = g.rib_y0 + float(_rib_curve(g, np.float32(u))) + g.rib_s * q
    return g.cx + side * u * g.W, y


def _spine_x(g: _Geo, y: np.ndarray | float) -> np.ndarray:
    """Frontal spine centre-line (curved by scoliosis)."""
    t = (np.asarray(y) - g.apex + 0.1) / (g.dia_r - g.apex + 0.25)
    return g.cx + g.spine_amp * np.sin(np.pi * (2 * g.spine_waves * t) + g.spine_phase)


def _lat_spine_x(g: _Geo, y: np.ndarray | float) -> np.ndarray:
    """Lateral spine centre-line: thoracic kyphosis bows it posteriorly (image right)."""
    t = np.clip((np.asarray(y) - 0.0) / 0.95, 0, 1)
    return g.spine_x + g.kyph * np.sin(np.pi * t) - 0.04 * t


# --------------------------------------------------------------------------------------
# Base anatomy
# --------------------------------------------------------------------------------------


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
        + 0.3 * np.maximum(adx - neck, 0) ** 1.3
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
    prof_x = 0.7 + 0.3 * np.sin(np.pi * np.clip((adx - 0.5 * g.med_w) / g.W, 0, 1))
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
        + g.aorta_wave * np.sin((ay - ky) / 0.22 * 2 * np.pi) * ramp_in
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
    val = np.sqrt(np.clip(1.0 - q, 0, 1)) ** 0.5
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
    ped = np.exp(-(((ad - 0.75 * hw) / 0.008) ** 2) - ((f - 0.35) / 0.16) ** 2)
    spin = np.exp(-((d / 0.006) ** 2) - ((f - 0.8) / 0.18) ** 2)
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
        y = g.clav_y + 0.025 - 0.055 * t + 0.012 * np.sin(2 * np.pi * t)
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
    post = np.exp(-(((d - 0.065) / 0.016) ** 2) - ((f - 0.45) / 0.3) ** 2)
    fade = 1 - 0.35 * _smooth((Y - g.apex - 0.1) / 0.5)  # lower spine looks darker
    c.bone[rs, cs] += (0.1 * body + 0.04 * post) * fade


# --------------------------------------------------------------------------------------
# Finding registries
# --------------------------------------------------------------------------------------

_ADJUST: dict[str, Callable[[_Geo, np.random.Generator], None]] = {}
_DRAW: dict[str, Callable[[_Ctx], None]] = {}


def _adjusts(name: str) -> Callable:
    """Register a geometry change (runs before the base anatomy is drawn)."""

    def deco(fn: Callable[[_Geo, np.random.Generator], None]) -> Callable:
        if name not in FINDINGS:
            raise KeyError(name)
        _ADJUST[name] = fn
        return fn

    return deco


def _blend(old: object, new: object, gain: float) -> object:
    """old + gain * (new - old) for floats (and tuples of them); ints switch when gain > 0."""
    if isinstance(old, float) and isinstance(new, float):
        return old + gain * (new - old)
    if isinstance(old, tuple) and isinstance(new, tuple):
        return tuple(_blend(a, b, gain) for a, b in zip(old, new, strict=True))
    return new if gain > 0 else old


def _adjust(name: str, g: _Geo, rng: np.random.Generator, gain: float) -> None:
    """Apply a finding's geometry change, scaled by its conspicuity (1 = as designed)."""
    if gain == 1.0:
        _ADJUST[name](g, rng)
        return
    before = dataclasses.replace(g)
    _ADJUST[name](g, rng)
    for f in dataclasses.fields(g):
        setattr(g, f.name, _blend(getattr(before, f.name), getattr(g, f.name), gain))


def _draws(name: str) -> Callable:
    """Register a drawing function (runs after the base anatomy)."""

    def deco(fn: Callable[[_Ctx], None]) -> Callable:
        if name not in FINDINGS:
            raise KeyError(name)
        _DRAW[name] = fn
        return fn

    return deco


# ---- heart, mediastinum, great vessels --------------------------------------------------


@_adjusts("Cardiomegaly")
def _cardiomegaly(g: _Geo, rng: np.random.Generator) -> None:
    """Heart wider than half the chest, enlarging to the patient's left and down."""
    hx, hy, hrx, hry, tilt = g.heart
    k = rng.uniform(1.25, 1.5)
    shift = hrx * (k - 1) * (0.3 if g.view == "lateral" else 0.5)
    g.heart = (hx + shift, hy + 0.005, hrx * k, hry * rng.uniform(1.05, 1.15), tilt)


@_adjusts("Cardiomyopathy")
def _cardiomyopathy(g: _Geo, rng: np.random.Generator) -> None:
    """Globular enlarged heart ('water bottle'): both borders bulge, rounder, less tilted."""
    hx, hy, hrx, hry, tilt = g.heart
    k = rng.uniform(1.25, 1.45)
    ry = max(hry * rng.uniform(1.3, 1.45), hrx * k * 0.85)
    g.heart = (hx + hrx * (k - 1) * 0.1, hy - (ry - hry) * 0.3, hrx * k, ry, tilt * 0.3)


@_adjusts("Enlarged Cardiomediastinum")
def _enlarged_cm(g: _Geo, rng: np.random.Generator) -> None:
    """Widened upper mediastinum (and a slightly bigger heart)."""
    extra = g.med_w * (rng.uniform(1.5, 2.0) - 1)
    g.med_w += extra
    kx, ky, kr = g.knob
    g.knob = (kx + extra * 0.8, ky, kr * rng.uniform(1.1, 1.3))
    hx, hy, hrx, hry, tilt = g.heart
    g.heart = (hx, hy, hrx * rng.uniform(1.0, 1.1), hry, tilt)


@_draws("Enlarged Cardiomediastinum")
def _enlarged_cm_draw(c: _Ctx) -> None:
    """Lateral: soft tissue filling the retrosternal clear space."""
    if c.lateral:
        g = c.geo
        _ellipse(c, c.occ, g.ant + 0.1, g.apex + 0.2, 0.08, 0.13, 0.8 * c.gain, edge=0.5, dome=0.5)


@_adjusts("Tortuous Aorta")
def _tortuous_aorta(g: _Geo, rng: np.random.Generator) -> None:
    """Unfolded arch and a wavy descending aorta projecting over the left lung."""
    g.aorta_wave = rng.uniform(0.012, 0.025) * rng.choice([-1, 1])
    g.aorta_shift = rng.uniform(0.02, 0.04)
    kx, ky, kr = g.knob
    g.knob = (kx + 0.01, ky - rng.uniform(0.0, 0.02), kr * rng.uniform(1.05, 1.25))
    if g.view == "lateral":
        g.aorta_wave = rng.uniform(0.3, 0.5)


@_draws("Calcification of the Aorta")
def _aortic_calcification(c: _Ctx) -> None:
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
    pts = np.stack([kx + r * np.cos(th), ky + r * np.sin(th)], 1)
    _polyline(c, c.dens, pts, c.u(0.005, 0.009), amp, blur=0.0015)


@_adjusts("Pulmonary Hypertension")
def _pulm_htn_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Larger central pulmonary arteries."""
    g.hilum_scale = (
        g.hilum_scale[0] * rng.uniform(1.15, 1.35),
        g.hilum_scale[1] * rng.uniform(1.15, 1.35),
    )


@_draws("Pulmonary Hypertension")
def _pulm_htn(c: _Ctx) -> None:
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


@_draws("Adenopathy")
def _adenopathy(c: _Ctx) -> None:
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


@_draws("Hilum")
def _hilum(c: _Ctx) -> None:
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


# ---- lungs: airspace and interstitial ----------------------------------------------------


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


@_draws("Lung Opacity")
def _lung_opacity(c: _Ctx) -> None:
    """Soft ill-defined patches of increased density anywhere in the lungs."""
    for _ in range(int(c.rng.integers(1, 4))):
        x, y = _lung_xy(c, c.side(), c.u(0.2, 0.9), c.u(0.2, 0.85))
        _patch(c, x, y, c.u(0.04, 0.085), c.u(0.4, 0.7) * c.gain, sharp=c.u(0.0, 0.4))


@_draws("Infiltration")
def _infiltration(c: _Ctx) -> None:
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


@_draws("Pneumonia")
def _pneumonia(c: _Ctx) -> None:
    """Dense, patchy (acinar) airspace opacity, usually in a lower or mid zone."""
    side = c.side()
    for _ in range(1 if c.u(0, 1) < 0.7 else 2):
        x, y = _lung_xy(c, side, c.u(0.45, 0.9), c.u(0.3, 0.8))
        r = c.u(0.045, 0.09)
        _patch(c, x, y, r, c.u(0.55, 0.85) * c.gain, sharp=c.u(0.2, 0.6), tex_mix=0.7)
        angles = c.rng.uniform(0, 2 * np.pi, 6)  # acinar nodularity around the edge
        acini = [(x + r * math.cos(a), y + r * math.sin(a), c.u(0.008, 0.016)) for a in angles]
        _dots(c, c.occ, acini, 0.5 * c.gain, blur=0.005)


@_draws("Consolidation")
def _consolidation(c: _Ctx) -> None:
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


@_draws("Edema")
def _edema(c: _Ctx) -> None:
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


@_draws("Atelectasis")
def _atelectasis(c: _Ctx) -> None:
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


@_adjusts("Atelectasis")
def _atelectasis_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Volume loss: sometimes a slightly raised hemidiaphragm."""
    if g.view == "frontal" and rng.uniform() < 0.5:
        if rng.uniform() < 0.5:
            g.dia_r -= rng.uniform(0.005, 0.02)
        else:
            g.dia_l -= rng.uniform(0.005, 0.02)


@_draws("Lobar Atelectasis")
def _lobar_atelectasis(c: _Ctx) -> None:
    """Dense triangular collapse against a fissure: RUL apex, RML heart border, LLL 'sail'."""
    g = c.geo
    amp = c.u(0.3, 0.5) * c.gain
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


@_draws("Round(ed) Atelectasis")
def _rounded_atelectasis(c: _Ctx) -> None:
    """Small round pleural-based opacity with a curving 'comet tail' of vessels to the hilum."""
    g = c.geo
    side = c.side()
    x, y = _lung_xy(c, side, c.u(0.62, 0.85), 0.9)
    r = c.u(0.018, 0.028)
    amp = c.u(0.35, 0.55) * c.gain
    _blob(c, c.occ, x, y, r, amp, lobes=0.05, blur=0.25, dome=0.5)
    hx, hy = g.hila[0 if side < 0 or c.lateral else 1]
    for k in (-1, 1):
        pts = [
            (x - side * r * 0.5, y),
            (0.5 * (x + hx) + 0.015 * k, 0.5 * (y + hy) + 0.03),
            (x + (hx - x) * 0.65, y + (hy - y) * 0.65),
        ]
        _polyline(c, c.occ, pts, 0.004, amp * 0.7, blur=0.002)


@_draws("Nodule")
def _nodule(c: _Ctx) -> None:
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


@_draws("Mass")
def _mass(c: _Ctx) -> None:
    """Round or lobulated opacity larger than 3 cm."""
    x, y = _lung_xy(c, c.side(), c.u(0.2, 0.8), c.u(0.25, 0.75))
    _blob(
        c,
        c.occ,
        x,
        y,
        c.u(0.04, 0.07),
        c.u(0.6, 0.9) * c.gain,
        lobes=c.u(0.05, 0.18),
        blur=c.u(0.08, 0.25),
        dome=0.5,
    )


@_draws("Lung Lesion")
def _lung_lesion(c: _Ctx) -> None:
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


@_draws("Granuloma")
def _granuloma(c: _Ctx) -> None:
    """One to three small, very dense (calcified), sharply marginated nodules."""
    for _ in range(int(c.rng.integers(1, 4))):
        x, y = _lung_xy(c, c.side(), c.u(0.1, 0.85), c.u(0.1, 0.9))
        r = c.u(0.006, 0.011)
        _ellipse(c, c.dens, x, y, r * c.h / c.w, r, c.u(0.25, 0.4) * c.gain, edge=0.25, dome=0.5)


@_draws("Tuberculosis")
def _tuberculosis(c: _Ctx) -> None:
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


@_draws("Fibrosis")
def _fibrosis(c: _Ctx) -> None:
    """Reticular (net-like) lines in the lower, peripheral lung zones, bilateral."""
    g = c.geo
    amp = c.u(0.3, 0.5) * c.gain
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


@_adjusts("Fibrosis")
def _fibrosis_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Lower-lobe volume loss: slightly raised diaphragm."""
    if g.view == "frontal":
        d = rng.uniform(0.0, 0.025)
        g.dia_r -= d
        g.dia_l -= d


@_adjusts("Emphysema")
def _emphysema_geo(g: _Geo, rng: np.random.Generator) -> None:
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


@_draws("Bulla")
def _bulla(c: _Ctx) -> None:
    """Large thin-walled lucent circle without vessel markings, usually in an upper zone."""
    r = c.u(0.045, 0.085)
    x, y = _lung_xy(c, c.side(), c.u(0.18, 0.45), c.u(0.45, 0.8))
    _scale_region(
        c, c.vessel, (x - r, x + r, y - r, y + r), _disc(x, y, r), 1 - 0.95 * min(c.gain, 1.0)
    )
    _ellipse(c, c.dens, x, y, r, r, -c.u(0.04, 0.07) * c.gain, edge=0.1)
    _ring(c, c.dens, x, y, r, c.u(0.003, 0.005), c.u(0.05, 0.08) * c.gain, blur=0.001)


# ---- pleura --------------------------------------------------------------------------------


@_draws("Pleural Effusion")
def _pleural_effusion(c: _Ctx) -> None:
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
    for z, tp in zip(np.linspace(z0, z1, 12), np.sin(np.linspace(0, np.pi, 12)), strict=True):
        x, y = _lung_xy(c, side, z, 1.0)
        outer.append((x + side * 0.004, y))
        inner.append((x - side * (thick * (0.3 + 0.7 * tp) + bulge * tp), y))
    _polygon(c, c.occ, np.array(outer + inner[::-1]), amp, blur=blur)


@_draws("Pleural Thickening")
def _pleural_thickening(c: _Ctx) -> None:
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


@_draws("Pleural Other")
def _pleural_other(c: _Ctx) -> None:
    """Short focal pleural plaque: lenticular, sometimes with a calcified (bright) edge."""
    g = c.geo
    amp = c.u(0.5, 0.8) * c.gain
    if c.lateral:
        lx, ly, lrx, lry = g.lung_box
        _ellipse(c, c.occ, lx - lrx * 0.88, ly - lry * c.u(0.3, 0.6), 0.016, 0.045, amp, edge=0.3)
        return
    side = c.side()
    z0 = c.u(0.3, 0.75)
    _wall_band(c, side, z0, z0 + c.u(0.08, 0.14), 0.004, amp, 0.002, bulge=c.u(0.008, 0.014))
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
    line = np.exp(-(((adx - edge_x) / _edge(c, 0.0025)) ** 2)) * (g.apex + 0.5 * depth < Y)
    line = line * _ramp(y_end + 0.02 - Y, 0.03) * _ramp(edge_x - 0.05, 0.02)
    c.vessel[rs, cs] *= 1 - min(c.gain, 1.0) * space
    c.dens[rs, cs] += amp * (-0.07 * space + 0.1 * line)
    return rs, cs, X, Y


@_draws("Pneumothorax")
def _pneumothorax(c: _Ctx) -> None:
    """Visceral pleural line at the apex and lateral wall, lucent space beyond it."""
    if not c.lateral:
        _draw_ptx(c, c.side(), c.u(0.025, 0.075), c.u(0.45, 0.9), c.u(0.8, 1.2) * c.gain)


@_draws("Hydropneumothorax")
def _hydropneumothorax(c: _Ctx) -> None:
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
    win = _draw_ptx(c, side, c.u(0.02, 0.04), 1.0, 0.7 * c.gain)
    if win is None:
        return
    rs, cs, X, Y = win
    m = _ramp(Y - level, _edge(c, 0.002)) * _ramp(np.abs(X - g.cx) / g.W - 0.5, 0.1)
    c.occ[rs, cs] += amp * m
    c.vessel[rs, cs] *= 1 - min(c.gain, 1.0) * m


@_draws("Pneumomediastinum")
def _pneumomediastinum(c: _Ctx) -> None:
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
    pts = np.stack([hx + (hrx + off) * np.cos(th) * 0.95, hy + (hry + off) * np.sin(th)], 1)
    _polyline(c, c.dens, pts, 0.007, -amp, blur=0.002)
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


@_draws("Pneumoperitoneum")
def _pneumoperitoneum(c: _Ctx) -> None:
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
        thick = c.u(0.007, 0.016) * np.sin(np.linspace(0, np.pi, 14)) + 0.002
        top = _dia(g, xs) + 0.008
        pts = np.concatenate([np.stack([xs, top], 1), np.stack([xs, top + thick], 1)[::-1]])
        _polygon(c, c.dens, pts, -amp, blur=0.002)


# ---- bones and soft tissue -----------------------------------------------------------------


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
    cleft = np.exp(-(((X - xb + (Y - yb) * c.u(-0.5, 0.5)) / max(gap, 1.2 / c.w)) ** 2))
    cleft *= min(gap / 0.002, 1.0)  # no gap, no cleft
    c.bone[rs, cs] += _RIB_AMP * (amp * new * (1 - cleft) - old)


@_draws("Rib Fracture")
def _rib_fracture(c: _Ctx) -> None:
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


@_draws("Fracture")
def _fracture(c: _Ctx) -> None:
    """Healing rib fracture (callus), proximal humerus fracture, or vertebral compression."""
    g = c.geo
    if c.lateral:  # a wedge-compressed vertebra: see _fracture_geo
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


@_adjusts("Fracture")
def _fracture_geo(g: _Geo, rng: np.random.Generator) -> None:
    """Lateral view: one wedge-compressed mid/lower thoracic vertebra."""
    if g.view == "lateral":
        g.compress = int(rng.integers(3, 8))
        g.compress_depth = 0.35


@_adjusts("Clavicle Fracture")
def _clavicle_fracture(g: _Geo, rng: np.random.Generator) -> None:
    """Mid-shaft clavicle break with a small gap and step-off (frontal only)."""
    if g.view == "frontal":
        g.clav_side = -1 if rng.uniform() < 0.5 else 1
        g.clav_t = rng.uniform(0.35, 0.7)
        g.clav_gap = rng.uniform(0.006, 0.012)
        g.clav_step = rng.uniform(0.006, 0.014) * rng.choice([-1, 1])


@_adjusts("Osteopenia")
def _osteopenia(g: _Geo, rng: np.random.Generator) -> None:
    """Faint, low-contrast bones."""
    g.bone_scale *= rng.uniform(0.4, 0.6)


@_adjusts("Scoliosis")
def _scoliosis(g: _Geo, rng: np.random.Generator) -> None:
    """Lateral curvature of the spine on the frontal view (C- or S-shaped)."""
    if g.view == "frontal":
        g.spine_amp = rng.uniform(0.04, 0.07) * rng.choice([-1, 1])
        g.spine_waves = 0.5 if rng.uniform() < 0.5 else 1.0
        g.spine_phase = rng.uniform(-0.3, 0.3)


@_adjusts("Kyphosis")
def _kyphosis(g: _Geo, rng: np.random.Generator) -> None:
    """Lateral only: exaggerated posterior convexity of the thoracic spine, wedged bodies."""
    if g.view == "lateral":
        g.kyph += rng.uniform(0.03, 0.055)
        g.wedge = rng.uniform(0.15, 0.3)


@_draws("Subcutaneous Emphysema")
def _subcutaneous_emphysema(c: _Ctx) -> None:
    """Lucent streaks and bubbles in the chest-wall soft tissue (and neck)."""
    g = c.geo
    amp = c.u(0.12, 0.22) * c.gain
    n = int(c.rng.integers(6, 14))
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
            length, ang = c.u(0.02, 0.06), c.u(-0.5, 0.5) + math.pi / 2
            pts = [
                (x, y),
                (x + 0.5 * length * math.cos(ang), y + length * math.sin(ang)),
                (x + c.u(-0.01, 0.01), y + 1.6 * length),
            ]
            streaks.append((pts, c.u(0.003, 0.006)))
        _lines(c, c.dens, streaks, -amp, blur=0.0015)


# ---- devices, hernia, fissures, vascular ---------------------------------------------------


def _box(x: float, y: float, wd: float, ht: float) -> np.ndarray:
    return np.array([(x - wd, y - ht), (x + wd, y - ht), (x + wd, y + ht), (x - wd, y + ht)])


@_draws("Support Devices")
def _support_devices(c: _Ctx) -> None:
    """Metal and radiopaque tubes: ET tube, NG tube, central line, pacemaker, wires, leads."""
    g = c.geo
    d, amp = c.dens, c.gain
    for kind in c.rng.choice(6, size=int(c.rng.integers(1, 4)), replace=False):
        if c.lateral:
            hx, hy = g.hila[0]
            if kind in (0, 1):  # ET tube in the trachea / NG tube in the oesophagus
                off = 0.0 if kind == 0 else 0.05
                _polyline(
                    c,
                    d,
                    [(hx - 0.07 + off, 0.0), (hx - 0.01 + off, hy - 0.08 + 4 * off)],
                    0.006,
                    0.35 * amp,
                )
            elif kind == 2:  # pacemaker generator, anterior upper chest
                _polygon(
                    c, d, _box(g.ant + 0.03, g.apex + 0.08, 0.018, 0.035), 0.8 * amp, blur=0.002
                )
            elif kind == 3:  # sternotomy wires
                for i in range(5):
                    _ring(c, d, g.ant + 0.022, g.apex + 0.12 + 0.065 * i, 0.008, 0.004, 0.6 * amp)
            else:  # central line / lead into the heart
                _polyline(
                    c,
                    d,
                    [
                        (g.ant + 0.08, 0.05),
                        (g.heart[0] + 0.05, g.apex + 0.25),
                        (g.heart[0], g.heart[1]),
                    ],
                    0.005,
                    0.35 * amp,
                )
            continue
        if kind == 0:  # endotracheal tube: two walls and a radiopaque stripe above the carina
            tip = g.hila[0][1] - 0.08 - c.u(0.03, 0.08)
            for dxw in (-0.008, 0.008):
                _polyline(c, d, [(g.cx + dxw, 0.0), (g.cx + dxw, tip)], 0.003, 0.18 * amp)
            _polyline(c, d, [(g.cx + 0.004, 0.0), (g.cx + 0.004, tip)], 0.003, 0.35 * amp)
        elif kind == 1:  # nasogastric tube into the stomach under the left hemidiaphragm
            pts = [
                (g.cx + 0.01, 0.0),
                (g.cx + 0.012, g.hila[0][1]),
                (g.cx + 0.03, g.dia_l),
                (g.cx + 0.15, g.dia_l + 0.06),
                (g.cx + 0.2, g.dia_l + 0.03),
            ]
            _polyline(c, d, pts, 0.005, 0.35 * amp)
        elif kind == 2:  # central venous line from a subclavian vein to the SVC
            s = c.side()
            pts = [
                (g.cx + s * 0.3, g.clav_y + 0.02),
                (g.cx + s * 0.12, g.clav_y + 0.04),
                (g.cx - 0.04, g.clav_y + 0.08),
                (g.cx - 0.035, g.hila[0][1] - c.u(0.0, 0.06)),
            ]
            _polyline(c, d, pts, 0.005, 0.3 * amp)
        elif kind == 3:  # pacemaker: bright box below the left clavicle, leads to the heart
            px_, py_ = g.cx + c.u(0.18, 0.28), g.clav_y + c.u(0.04, 0.08)
            _polygon(c, d, _box(px_, py_, 0.045, 0.032), 0.8 * amp, blur=0.003)
            hx, hy, _, hry, _ = g.heart
            for tx, ty in ((hx - 0.03, hy - hry * 0.4), (hx + 0.03, hy + hry * 0.3)):
                pts = [
                    (px_ - 0.045, py_),
                    (g.cx + 0.01, g.clav_y + 0.1),
                    (g.cx - 0.03, hy - hry),
                    (tx, ty),
                ]
                _polyline(c, d, pts, 0.004, 0.45 * amp)
        elif kind == 4:  # sternotomy wires along the midline
            for i in range(int(c.rng.integers(4, 7))):
                _ring(
                    c,
                    d,
                    g.cx + c.u(-0.004, 0.004),
                    g.apex + 0.12 + 0.055 * i,
                    0.008,
                    0.004,
                    0.6 * amp,
                )
        else:  # ECG electrodes with wires
            for _ in range(int(c.rng.integers(2, 5))):
                x, y = c.u(0.1, 0.9), c.u(0.08, 0.7)
                _ring(c, d, x, y, 0.012, 0.004, 0.3 * amp)
                _polyline(c, d, [(x, y), (x + c.u(-0.2, 0.2), y - 0.2)], 0.003, 0.2 * amp)


@_draws("Hernia")
def _hernia(c: _Ctx) -> None:
    """Hiatal hernia: retrocardiac gas bubble with a flat air-fluid level."""
    g = c.geo
    if c.lateral:
        hx, _, hrx, _, _ = g.heart
        x, y = hx + hrx * 0.95, g.dia_top - c.u(0.03, 0.06)
    else:
        x, y = g.cx + c.u(0.0, 0.05), g.dia_l - c.u(0.04, 0.08)
    r = c.u(0.03, 0.055)
    amp = c.u(0.12, 0.2) * c.gain
    level = y + c.u(-0.2, 0.4) * r
    win = _win(c, x - r, x + r, y - r, y + r)
    if win is None:
        return
    rs, cs, X, Y = win
    inside = _smooth((1 - np.sqrt(((X - x) / r) ** 2 + ((Y - y) / (0.85 * r)) ** 2)) / 0.1)
    c.dens[rs, cs] += -amp * inside * _ramp(level - Y, _edge(c, 0.002)) + 0.03 * amp * inside
    _ring(c, c.dens, x, y, r, 0.004, amp * 0.25, blur=0.002)


@_draws("Fissure")
def _fissure(c: _Ctx) -> None:
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


@_draws("Azygos Lobe")
def _azygos_lobe(c: _Ctx) -> None:
    """Thin curved azygos fissure from the right apex down to a tear-drop 'azygos knot'."""
    if c.lateral:
        return
    g = c.geo
    amp = c.u(0.45, 0.75) * c.gain
    x_top, y_top = g.cx - c.u(0.35, 0.55) * g.W, g.apex + 0.005
    x_bot, y_bot = g.cx - g.med_w - 0.008, g.apex + c.u(0.13, 0.17)
    t = np.linspace(0, 1, 10)
    xs = x_top + (x_bot - x_top) * t - c.u(0.01, 0.025) * np.sin(np.pi * t)
    ys = y_top + (y_bot - y_top) * t
    _polyline(c, c.occ, np.stack([xs, ys], 1), c.u(0.003, 0.005), amp, blur=0.001)
    _ellipse(c, c.occ, x_bot, y_bot, 0.009, 0.014, amp * 1.3, edge=0.4, dome=0.8)


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


@_draws("Infarction")
def _infarction(c: _Ctx) -> None:
    """Pleural-based wedge opacity pointing to the hilum (Hampton hump)."""
    _wedge(c, c.side(), c.u(0.3, 0.5) * c.gain, c.u(0.025, 0.04), sharp=c.u(0.3, 0.8))


@_draws("Pulmonary Embolism")
def _pulmonary_embolism(c: _Ctx) -> None:
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


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _check(findings: Collection[str], view: str, height: int, width: int) -> list[str]:
    """Validate the arguments; return the findings in canonical (FINDINGS) order."""
    if isinstance(findings, str):
        raise TypeError("findings must be a collection of names, not a single string")
    present = {str(f) for f in findings}
    unknown = sorted(present - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; known: {', '.join(FINDINGS)}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    if height < 16 or width < 16:
        raise ValueError(f"image size must be at least 16x16, got {height}x{width}")
    return [f for f in FINDINGS if f in present]  # order-independent, hash-independent


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


def _finish(c: _Ctx, anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Compose layers; apply position jitter, detector noise, blur and an exposure curve."""
    g, h, w = c.geo, c.h, c.w
    # dens + (markings - air) * (1 - occ) + bone, computed in place (the layers are done)
    free = np.clip(c.occ, 0.0, 1.0, out=c.occ)
    np.subtract(1.0, free, out=free)
    dens = c.vessel
    dens *= g.markings
    dens -= c.air
    dens *= free
    dens += c.dens
    c.bone *= g.bone_scale
    dens += c.bone
    dens += (rng.uniform(-0.06, 0.06) * (c.bank.y - 0.5)).astype(np.float32)  # heel effect
    ang = math.radians(anatomy.rotation + rng.normal(0.0, 1.5))
    sc = rng.uniform(0.93, 1.07)
    tx, ty = rng.uniform(-0.035, 0.035) * w, rng.uniform(-0.035, 0.035) * h
    ca, sa = math.cos(ang) / sc, math.sin(ang) / sc
    cx0, cy0 = w / 2, h / 2  # inverse map (output -> input) about the image centre
    coeffs = (
        ca,
        sa,
        cx0 - ca * (cx0 + tx) - sa * (cy0 + ty),
        -sa,
        ca,
        cy0 + sa * (cx0 + tx) - ca * (cy0 + ty),
    )
    pad = max(h, w) // 8  # edge-padded so that rotation never exposes empty corners
    padded = np.pad(dens, pad, mode="edge")
    coeffs = (*coeffs[:2], coeffs[2] + pad, *coeffs[3:5], coeffs[5] + pad)
    img = Image.fromarray(padded, mode="F").transform(
        (w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
    )
    dens = np.asarray(img, dtype=np.float32)
    bank = c.bank.noise[int(rng.integers(len(c.bank.noise)))]
    oy = int(rng.integers(0, bank.shape[0] - h + 1))
    ox = int(rng.integers(0, bank.shape[1] - w + 1))
    sigma = rng.uniform(0.006, 0.016) * (1 if rng.uniform() < 0.5 else -1)
    noise = dens + 0.5  # quantum noise, stronger where the signal is
    noise *= bank[oy : oy + h, ox : ox + w]
    noise *= sigma
    dens = dens + noise
    dens = _blur3(dens, rng.uniform(0.08, 0.3) * min(h, w) / 320)
    # exposure: window, film-like shoulder (compresses dense regions) and gamma
    lo, hi = rng.uniform(-0.02, 0.05), rng.uniform(0.85, 1.0)
    k, gamma = rng.uniform(0.8, 2.0), rng.uniform(1.25, 1.7)
    d = np.clip((np.linspace(0, _D_MAX, _LUT_SIZE) - lo) / (hi - lo), 0, None)
    curve = np.clip((1 - np.exp(-k * d)) / (1 - math.exp(-k)), 0, 1) ** gamma
    lut = (255.0 * curve + 0.5).astype(np.uint8)
    dens *= (_LUT_SIZE - 1) / _D_MAX
    np.clip(dens, 0, _LUT_SIZE - 1, out=dens)
    return np.take(lut, dens.astype(np.uint16))


def render(
    findings: Collection[str],
    view: str,
    anatomy: Anatomy,
    rng: np.random.Generator,
    height: int,
    width: int,
) -> np.ndarray:
    """Render one radiograph (uint8, height x width) showing the given findings.

    The caller's rng is advanced by exactly one draw; the image depends only on that value
    and the arguments (not on the order of `findings`), so equal inputs give equal bytes.
    """
    names = _check(findings, view, height, width)
    seed = int(rng.integers(0, 2**63 - 1))
    base = np.random.default_rng([seed, 0])
    post = np.random.default_rng([seed, 1])
    own = {n: np.random.default_rng([seed, 2 + FINDINGS.index(n)]) for n in names}
    geo = _frontal_geo(anatomy, base) if view == "frontal" else _lateral_geo(anatomy, base)
    for n in names:
        if n in _ADJUST:
            _adjust(n, geo, own[n], float(CONSPICUITY.get(n, 1.0)))
    h, w = int(height), int(width)

    def layer() -> np.ndarray:
        return np.zeros((h, w), np.float32)

    c = _Ctx(geo, _bank(h, w), h, w, layer(), layer(), layer(), layer(), layer(), layer(), base)
    (_base_frontal if view == "frontal" else _base_lateral)(c, base)
    for n in names:
        if n in _DRAW:
            c.rng, c.gain = own[n], float(CONSPICUITY.get(n, 1.0))
            _DRAW[n](c)
    return _finish(c, anatomy, post)
