"""Procedural chest radiographs on which every finding draws its own visual signature.

The built-in synthetic dataset stands in for MIMIC-CXR-JPG in a CPU demo, so the images must
behave like radiographs for the methods: a small CNN should learn head classes well and tail
classes less well, confusable findings must look alike, some findings show on one view only,
and each of the five Task 3 classes (never labelled in training) must resemble its semantic
neighbour as on real radiographs: Cardiomyopathy like Cardiomegaly, Bulla like Emphysema,
Hilum like Adenopathy, Scoliosis like Kyphosis, Osteopenia like Fracture.

How an image is made (a projection radiograph is a sum of attenuations along each ray):

1. A per-image geometry (`anatomy._Geo`) comes from the patient's `anatomy.Anatomy` plus
   small per-image changes (inspiration, position).
2. Findings that change anatomy (a bigger heart, a flat diaphragm, a curved spine) adjust the
   geometry first (`findings.ADJUST`).
3. The base anatomy (`base`) is drawn into layers: ``dens`` (soft tissue, organs, metal, extra
   air as negative values), ``air`` (air in the lungs), ``occ`` (how much of that air is
   displaced by heart, vessels, fluid or opacities, 0..1), ``vessel`` (lung markings, hidden
   where the air is displaced) and ``bone`` (scaled down by osteopenia, cut by fractures).
4. Every finding then draws its signature (`findings.DRAW`, one small function each; the
   table `findings.SIGNS` says where each finding's functions live).
5. Composition (this module): ``dens - air * (1 - occ) + markings + bone``, then rotation /
   shift / scale, detector noise, blur and a random exposure curve.

Determinism and locality: the caller's ``rng`` gives one seed; the base image and every
finding get their own generator derived from it, so the same seed with and without a finding
differs only where that finding draws. Coordinates are normalised: ``x`` in [0, 1] from the
image's left (the patient's right on a frontal view) and ``y`` in [0, 1] from the top. On the
lateral view the patient faces left: anterior is the image's left.

Difficulty follows radiology, not frequency: each finding has a conspicuity grade
(`findings.GRADES`: obvious, clear, moderate, subtle) and a gain (`findings.CONSPICUITY`)
calibrated so its signal at the training resolution matches the grade. The gain scales a
finding's strength without code changes: 1.0 as drawn, 0 draws nothing, 0.5 half the
contrast (geometry changes such as heart size are interpolated). Each view of a study is rendered independently,
so a finding may take a different instance (side, place) on the frontal and the lateral image.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping

import numpy as np
from PIL import Image

from cxrlt.synth.anatomy import Anatomy, _frontal_geo, _Geo, _lateral_geo, sample_anatomy
from cxrlt.synth.base import _base_frontal, _base_lateral
from cxrlt.synth.canvas import _bank, _blur3, _Ctx
from cxrlt.synth.findings import ADJUST, CONSPICUITY, DRAW, FINDINGS

VIEWS: tuple[str, ...] = ("frontal", "lateral")


_D_MAX = 1.6  # attenuation range covered by the display look-up table
_LUT_SIZE = 2048


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
        ADJUST[name](g, rng)
        return
    before = dataclasses.replace(g)
    ADJUST[name](g, rng)
    for f in dataclasses.fields(g):
        setattr(g, f.name, _blend(getattr(before, f.name), getattr(g, f.name), gain))


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
    severity: Mapping[str, float] | None = None,
) -> np.ndarray:
    """Render one radiograph (uint8, height x width) showing the given findings.

    `severity` scales a finding's strength on top of its conspicuity (1 = the grade's typical
    case): the same finding is florid in one patient and faint in another, and the views of
    one study share it. The caller's rng is advanced by exactly one draw; the image depends
    only on that value and the arguments (not on the order of `findings`), so equal inputs
    give equal bytes.
    """
    names = _check(findings, view, height, width)
    sev = dict(severity or {})
    bad = {k: v for k, v in sev.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise ValueError(f"severity must be finite and >= 0, got {bad}")

    def gain(n: str) -> float:
        return float(CONSPICUITY.get(n, 1.0)) * float(sev.get(n, 1.0))

    seed = int(rng.integers(0, 2**63 - 1))
    base = np.random.default_rng([seed, 0])
    post = np.random.default_rng([seed, 1])
    own = {n: np.random.default_rng([seed, 2 + FINDINGS.index(n)]) for n in names}
    geo = _frontal_geo(anatomy, base) if view == "frontal" else _lateral_geo(anatomy, base)
    for n in names:
        if n in ADJUST:
            _adjust(n, geo, own[n], gain(n))
    h, w = int(height), int(width)

    def layer() -> np.ndarray:
        return np.zeros((h, w), np.float32)

    c = _Ctx(geo, _bank(h, w), h, w, layer(), layer(), layer(), layer(), layer(), layer(), base)
    (_base_frontal if view == "frontal" else _base_lateral)(c, base)
    for n in names:
        if n in DRAW:
            c.rng, c.gain = own[n], gain(n)
            DRAW[n](c)
    return _finish(c, anatomy, post)


def sign_signal(finding: str, n: int = 8, size: int = 128, render_size: int = 256) -> float:
    """How visible a finding is at a training resolution: the L2 norm (grey levels) of the
    image with minus the image without it, both downsampled to `size` px, median over `n`
    anatomies (one view in four lateral; Kyphosis on laterals, where it shows)."""
    values = []
    for k in range(n):
        view = "lateral" if (k % 4 == 3 or finding == "Kyphosis") else "frontal"
        anatomy = sample_anatomy(np.random.default_rng(1000 + k))
        pair = [
            render(f, view, anatomy, np.random.default_rng(k), render_size, render_size)
            for f in ([], [finding])
        ]
        small = [
            np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR),
                       dtype=np.float32)
            for a in pair
        ]  # fmt: skip
        values.append(float(np.sqrt(((small[1] - small[0]) ** 2).sum())))
    return float(np.median(values))
