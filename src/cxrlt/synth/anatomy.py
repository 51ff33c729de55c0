"""Patient habitus, per-image geometry and the anatomical curves derived from it.

`Anatomy` is fixed per patient; `_Geo` holds one image's landmarks (normalised coordinates)
that findings may adjust before anything is drawn. The curve helpers (lung borders,
diaphragm, ribs, spine) are shared by the base anatomy and the findings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cxrlt.synth import fmath as fm

# --- Patient habitus and per-image geometry -----------------------------------------------


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


# --- Curves shared by the base anatomy and the findings -----------------------------------


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


def _rib_point(g: _Geo, side: int, k: int, u: float) -> tuple[float, float]:
    """Centre of posterior rib k at lateral fraction u on a side."""
    p = k + _RIB_FRAC / 2
    q = (1 - math.sqrt(1 - 4 * _RIB_WIDEN * p)) / (2 * _RIB_WIDEN)
    y = g.rib_y0 + float(_rib_curve(g, np.float32(u))) + g.rib_s * q
    return g.cx + side * u * g.W, y


def _spine_x(g: _Geo, y: np.ndarray | float) -> np.ndarray:
    """Frontal spine centre-line (curved by scoliosis)."""
    t = (np.asarray(y) - g.apex + 0.1) / (g.dia_r - g.apex + 0.25)
    return g.cx + g.spine_amp * fm.sin(np.pi * (2 * g.spine_waves * t) + g.spine_phase)


def _lat_spine_x(g: _Geo, y: np.ndarray | float) -> np.ndarray:
    """Lateral spine centre-line: thoracic kyphosis bows it posteriorly (image right)."""
    t = np.clip((np.asarray(y) - 0.0) / 0.95, 0, 1)
    return g.spine_x + g.kyph * fm.sin(np.pi * t) - 0.04 * t
