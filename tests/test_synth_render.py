"""Tests of the synthetic chest-radiograph renderer (cxrlt.synth.render).

Coordinates below are fractions of the image: x from the image's left (the patient's right on
a frontal view), y from the top. Regions are generous because every image is slightly
rotated, shifted and scaled.
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrlt.labels import (
    TASK1_CLASSES,
    TASK1_TRAIN_COUNTS,
    TASK1_TRAIN_IMAGES,
    TASK3_CLASSES,
    frequency_groups,
)
from cxrlt.synth.anatomy import Anatomy, sample_anatomy
from cxrlt.synth.findings import (
    CONSPICUITY,
    FINDINGS,
    GRADE_SIGNAL,
    GRADES,
    LATERAL_VISIBLE,
    SIGNS,
)
from cxrlt.synth.render import render, sign_signal

SIZE = 128
SEEDS = (0, 1)


def _anatomy(seed: int) -> Anatomy:
    return sample_anatomy(np.random.default_rng(1000 + seed))


def _img(
    findings,
    view: str = "frontal",
    seed: int = 0,
    size: tuple[int, int] = (SIZE, SIZE),
) -> np.ndarray:
    return render(findings, view, _anatomy(seed), np.random.default_rng(seed), *size)


def _diff(finding: str, view: str = "frontal", seed: int = 0) -> np.ndarray:
    """Signed difference (with - without the finding), same patient and seed."""
    return _img([finding], view, seed).astype(np.int32) - _img([], view, seed).astype(np.int32)


def _share_inside(diff: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> float:
    """Fraction of the absolute difference that lies inside the union of boxes."""
    h, w = diff.shape
    y = ((np.arange(h) + 0.5) / h)[:, None]
    x = ((np.arange(w) + 0.5) / w)[None, :]
    inside = np.zeros(diff.shape, bool)
    for x0, x1, y0, y1 in boxes:
        inside |= (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    weight = np.abs(diff).astype(float)
    return float(weight[inside].sum() / weight.sum())


def test_findings_are_task1_then_task3_classes():
    assert FINDINGS == TASK1_CLASSES + TASK3_CLASSES
    assert len(set(FINDINGS)) == 45
    assert LATERAL_VISIBLE.issubset(FINDINGS)
    assert "Kyphosis" in LATERAL_VISIBLE and "Normal" not in LATERAL_VISIBLE


def test_signs_table_lists_every_finding_once_with_functions_in_the_findings_package():
    assert tuple(SIGNS) == FINDINGS
    for name, steps in SIGNS.items():
        fns = [fn for fn in steps if fn is not None]
        assert fns or name == "Normal", name
        for fn in fns:
            assert fn.__module__.startswith("cxrlt.synth.findings."), (name, fn.__module__)


@pytest.mark.parametrize("view", ["frontal", "lateral"])
def test_shape_dtype_and_range(view):
    img = render(["Pleural Effusion"], view, _anatomy(0), np.random.default_rng(0), 96, 80)
    assert img.shape == (96, 80) and img.dtype == np.uint8
    assert img.min() < 40 and img.max() > 180  # dark background/lungs, bright body/bones
    assert 40 < img.mean() < 200


def test_same_inputs_give_identical_bytes_whatever_the_finding_order():
    fs = ["Support Devices", "Pleural Effusion", "Cardiomegaly", "Nodule"]
    a = _img(fs, seed=3)
    assert a.tobytes() == _img(fs, seed=3).tobytes()
    assert a.tobytes() == _img(list(reversed(fs)), seed=3).tobytes()
    assert a.tobytes() == _img(set(fs), seed=3).tobytes()
    lat = _img(fs, "lateral", seed=3)
    assert lat.tobytes() == _img(tuple(fs), "lateral", seed=3).tobytes()


def test_different_seeds_and_patients_differ():
    an = _anatomy(0)
    a = render([], "frontal", an, np.random.default_rng(1), SIZE, SIZE)
    b = render([], "frontal", an, np.random.default_rng(2), SIZE, SIZE)
    c = render([], "frontal", _anatomy(5), np.random.default_rng(1), SIZE, SIZE)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_caller_rng_is_advanced_by_exactly_one_draw():
    used, ref = np.random.default_rng(7), np.random.default_rng(7)
    render(["Edema", "Mass"], "frontal", _anatomy(0), used, 64, 64)
    ref.integers(0, 2**63 - 1)
    assert used.random() == ref.random()


def test_normal_draws_nothing():
    assert np.array_equal(_img(["Normal"]), _img([]))
    assert np.array_equal(_img(["Normal", "Support Devices"]), _img(["Support Devices"]))


def test_unknown_finding_view_or_size_is_rejected():
    with pytest.raises(ValueError, match="Pneumonitis"):
        _img(["Edema", "Pneumonitis"])
    with pytest.raises(ValueError, match="oblique"):
        render([], "oblique", _anatomy(0), np.random.default_rng(0), 64, 64)
    with pytest.raises(ValueError):
        render([], "frontal", _anatomy(0), np.random.default_rng(0), 8, 64)
    with pytest.raises(TypeError):
        _img("Edema")  # a bare string is not a collection of names


LUNGS = [(0.04, 0.96, 0.03, 0.88)]
LEFT_HALF_UPPER_RIGHT = [(0.2, 0.52, 0.02, 0.45)]
CHEST_WALLS = [(0.0, 0.4, 0.0, 1.0), (0.6, 1.0, 0.0, 1.0)]
HILA = [(0.2, 0.8, 0.15, 0.65)]
HEART = [(0.3, 0.9, 0.3, 0.88)]
# Where each frontal signature must lie (>= 90 % of the absolute difference).
FRONTAL_REGION: dict[str, list[tuple[float, float, float, float]]] = {
    "Adenopathy": HILA, "Hilum": HILA, "Pulmonary Hypertension": HILA,
    "Atelectasis": [(0.04, 0.96, 0.35, 0.9)], "Pleural Effusion": [(0.04, 0.96, 0.3, 0.95)],
    "Fibrosis": [(0.04, 0.96, 0.3, 0.9)],
    "Azygos Lobe": LEFT_HALF_UPPER_RIGHT,
    "Tuberculosis": [(0.04, 0.96, 0.0, 0.5)], "Bulla": [(0.04, 0.96, 0.0, 0.6)],
    "Calcification of the Aorta": [(0.45, 0.75, 0.1, 0.45)],
    "Tortuous Aorta": [(0.4, 0.8, 0.1, 0.85)],
    "Cardiomegaly": HEART, "Cardiomyopathy": HEART,
    "Enlarged Cardiomediastinum": [(0.3, 0.8, 0.0, 0.85)],
    "Pneumomediastinum": [(0.3, 0.8, 0.0, 0.8)],
    "Hernia": [(0.4, 0.72, 0.45, 0.88)],
    "Fissure": [(0.04, 0.5, 0.25, 0.65)],
    "Clavicle Fracture": [(0.0, 1.0, 0.0, 0.35)],
    "Rib Fracture": CHEST_WALLS, "Subcutaneous Emphysema": [(0.0, 0.32, 0.0, 1.0),
                                                            (0.68, 1.0, 0.0, 1.0)],
    "Pleural Thickening": CHEST_WALLS, "Pleural Other": CHEST_WALLS,
    "Pneumothorax": [(0.0, 0.47, 0.0, 0.8), (0.53, 1.0, 0.0, 0.8)],
    "Pneumoperitoneum": [(0.1, 0.9, 0.55, 1.0)],  # under the diaphragm
    "Scoliosis": [(0.3, 0.7, 0.0, 1.0)],
    "Support Devices": [(0.0, 1.0, 0.0, 1.0)], "Fracture": [(0.0, 1.0, 0.0, 1.0)],
    "Osteopenia": [(0.0, 1.0, 0.0, 1.0)], "Emphysema": [(0.0, 1.0, 0.0, 1.0)],
}  # fmt: skip
BRIGHTER = {
    "Lung Opacity",
    "Pneumonia",
    "Consolidation",
    "Pleural Effusion",
    "Mass",
    "Nodule",
    "Edema",
    "Granuloma",
    "Cardiomegaly",
    "Atelectasis",
    "Calcification of the Aorta",
}
DARKER = {
    "Pneumothorax",
    "Pneumoperitoneum",
    "Subcutaneous Emphysema",
    "Bulla",
    "Emphysema",
    "Osteopenia",
    "Hernia",
    "Pneumomediastinum",
    "Clavicle Fracture",
}


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f not in ("Normal", "Kyphosis")])
def test_each_finding_changes_the_frontal_view_where_expected(finding):
    for seed in SEEDS:
        d = _diff(finding, seed=seed)
        assert np.abs(d).sum() > 0, f"{finding} drew nothing (seed {seed})"
        share = _share_inside(d, FRONTAL_REGION.get(finding, LUNGS))
        assert share >= 0.9, f"{finding}: only {share:.0%} of the change in its region"
        if finding in BRIGHTER:
            assert d.sum() > 0, f"{finding} should add density"
        if finding in DARKER:
            assert d.sum() < 0, f"{finding} should look lucent / fainter"


def test_pneumoperitoneum_darkens_the_abdomen_under_the_diaphragm():
    """Free air sits under the diaphragm: it darkens pixels that were bright (upper abdomen,
    liver), not the dark lung above."""
    for seed in SEEDS:
        base = _img([], seed=seed).astype(float)
        d = _diff("Pneumoperitoneum", seed=seed)
        lung_level = np.percentile(base[SIZE // 4 : SIZE // 2], 20)  # typical lung grey
        assert np.average(base, weights=np.abs(d)) > lung_level + 40
        assert _share_inside(d, [(0.1, 0.9, 0.5, 1.0)]) >= 0.95


def test_all_findings_together_are_deterministic_and_each_is_drawn():
    everything = [f for f in FINDINGS if f != "Normal"]
    for view in ("frontal", "lateral"):
        a = _img(everything, view, seed=2)
        assert a.tobytes() == _img(everything[::-1], view, seed=2).tobytes()
    trio = ["Pleural Effusion", "Pneumonia", "Support Devices"]
    full = _img(trio, seed=2)
    for left_out in trio:
        assert not np.array_equal(full, _img([f for f in trio if f != left_out], seed=2))


_RENDER_DIGEST = """
import hashlib, numpy as np
from cxrlt.synth.anatomy import sample_anatomy
from cxrlt.synth.findings import FINDINGS
from cxrlt.synth.render import render
h = hashlib.sha256()
for k in range(60):
    rng = np.random.default_rng(k)
    found = [FINDINGS[i] for i in rng.choice(len(FINDINGS), 4, replace=False)]
    view = "lateral" if k % 3 == 0 else "frontal"
    h.update(render(found, view, sample_anatomy(np.random.default_rng(100 + k)), rng, 256, 240))
print(h.hexdigest())
"""


def test_same_bytes_whatever_numpys_simd_path():
    """NumPy picks float32 SIMD code by CPU at run time; the images must not depend on it,
    or the built-in dataset's hash in dvc.lock changes from one machine to the next."""
    import os
    import subprocess
    import sys

    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    extra = [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]
    if not extra:
        pytest.skip("this CPU has no SIMD path beyond NumPy's baseline")

    def digest(disabled: str) -> str:
        env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": disabled}
        out = subprocess.run([sys.executable, "-c", _RENDER_DIGEST], env=env, check=True,
                             capture_output=True, text=True)
        return out.stdout.strip()

    assert digest("") == digest(" ".join(extra))


def test_kyphosis_shows_on_the_lateral_view_only():
    for seed in SEEDS:
        assert np.array_equal(_img(["Kyphosis"], seed=seed), _img([], seed=seed))
        d = _diff("Kyphosis", "lateral", seed)
        assert np.abs(d).sum() > 0
        assert _share_inside(d, [(0.5, 1.0, 0.0, 1.0)]) >= 0.9  # spine is posterior (right)


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f != "Normal"])
def test_lateral_visibility_matches_LATERAL_VISIBLE(finding):
    changed = np.abs(_diff(finding, "lateral", seed=0)).sum() > 0
    assert changed == (finding in LATERAL_VISIBLE)


def _energy(finding: str, seeds=range(3)) -> float:
    return float(np.mean([np.abs(_diff(finding, seed=s)).mean() for s in seeds]))


GRADE_ORDER = ("obvious", "clear", "moderate", "subtle")


@pytest.fixture(scope="module")
def signals() -> dict[str, float]:
    """Each finding's signal at the demo's 128-px training resolution (4 anatomies)."""
    return {f: sign_signal(f, n=4) for f in FINDINGS if f != "Normal"}


def test_every_finding_has_a_conspicuity_grade_and_meets_its_target(signals):
    assert set(GRADES) == set(FINDINGS) and GRADES["Normal"] == "none"
    for finding, value in signals.items():
        grade = GRADES[finding]
        assert grade in GRADE_ORDER, finding
        assert value >= 0.6 * GRADE_SIGNAL[grade], (finding, grade, value)


def test_conspicuity_follows_radiology_not_frequency(signals):
    """Grades order the signal; rare but obvious findings (free air, a hydropneumothorax's
    fluid level, subcutaneous air, kyphosis) outshine the typical medium-frequency class, and
    the subtle ones (pulmonary embolism, infarction, acute rib fractures) stay faint."""
    medians = [np.median([v for f, v in signals.items() if GRADES[f] == g]) for g in GRADE_ORDER]
    assert medians == sorted(medians, reverse=True), medians
    groups = frequency_groups(TASK1_TRAIN_COUNTS, TASK1_TRAIN_IMAGES)
    medium = np.median([signals[f] for f, g in groups.items() if g == "medium"])
    rare_obvious = ["Pneumoperitoneum", "Hydropneumothorax", "Subcutaneous Emphysema", "Kyphosis"]
    for finding in rare_obvious:
        assert groups[finding] == "tail" and GRADES[finding] == "obvious"
        assert signals[finding] > medium, (finding, signals[finding], medium)
    for finding in ("Pulmonary Embolism", "Infarction", "Rib Fracture"):
        assert signals[finding] < medium, (finding, signals[finding], medium)


def test_mass_is_larger_than_nodule():
    def area(finding: str) -> float:
        return float(np.mean([(np.abs(_diff(finding, seed=s)) > 6).sum() for s in range(4)]))

    assert area("Mass") > 2 * area("Nodule") > 0


@pytest.mark.parametrize("finding", [f for f in FINDINGS if f != "Normal"])
def test_zero_conspicuity_switches_a_finding_off(monkeypatch, finding):
    monkeypatch.setitem(CONSPICUITY, finding, 0.0)
    view = "lateral" if finding == "Kyphosis" else "frontal"
    assert np.array_equal(_img([finding], view), _img([], view))


@pytest.mark.parametrize("finding", ["Lung Opacity", "Cardiomegaly", "Rib Fracture"])
def test_conspicuity_scales_a_finding(monkeypatch, finding):
    full = _energy(finding, seeds=[0])
    monkeypatch.setitem(CONSPICUITY, finding, 0.5)
    assert 0 < _energy(finding, seeds=[0]) < full


def test_severity_scales_one_finding_and_leaves_the_others():
    """Severity 1 is the typical case (same bytes as no severity); a florid case differs more
    from the finding-free image than a faint one; 0 switches the finding off."""
    an, view = _anatomy(0), "frontal"

    def img(sev):
        return render(["Mass", "Pneumothorax"], view, an, np.random.default_rng(0), SIZE, SIZE, sev)

    ref = img(None).astype(np.int32)
    assert np.array_equal(img({"Mass": 1.0}), ref)
    without = render(["Pneumothorax"], view, an, np.random.default_rng(0), SIZE, SIZE).astype(np.int32)
    faint, florid = (np.abs(img({"Mass": s}).astype(np.int32) - without).sum() for s in (0.5, 2.0))
    assert 0 < faint < np.abs(ref - without).sum() < florid
    assert np.array_equal(img({"Mass": 0.0}), without)


@pytest.mark.parametrize("bad", [{"Mass": -1.0}, {"Mass": float("nan")}, {"Mass": float("inf")}])
def test_invalid_severity_is_refused(bad):
    with pytest.raises(ValueError, match="severity"):
        render(["Mass"], "frontal", _anatomy(0), np.random.default_rng(0), 64, 64, bad)
