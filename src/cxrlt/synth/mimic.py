"""The built-in dataset: MIMIC-CXR-JPG + CXR-LT 2024 in their real on-disk layout.

Labels follow the real Task 1 training frequencies scaled down (with a floor so tail
classes keep a few positives in every split), studies hold 1-4 views, patients hold several
studies, and each image is drawn by `cxrlt.synth.render` from its study's findings. Writing the
real layout means the demo runs the same adapter code as real data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from cxrlt.errors import DataError
from cxrlt.io import atomic_path, write_csv
from cxrlt.labels import (
    TASK1_CLASSES,
    TASK1_TRAIN_COUNTS,
    TASK1_TRAIN_IMAGES,
    TASK2_CLASSES,
    TASK3_CLASSES,
)
from cxrlt.synth.anatomy import sample_anatomy
from cxrlt.synth.render import render

META = ["dicom_id", "subject_id", "study_id", "ViewPosition", "ViewCodeSequence_CodeMeaning", "fpath"]

# Task 3 classes are unseen in training; their prevalence is a guess of the same order as
# the real tail. They are drawn on every image but labelled only in the *_task3.csv files.
TASK3_PREVALENCE = {
    "Bulla": 0.012, "Cardiomyopathy": 0.015, "Hilum": 0.02, "Osteopenia": 0.015, "Scoliosis": 0.02,
}  # fmt: skip

# (cause, effect, probability): labels that travel together in real reports.
CO_OCCURRENCE: tuple[tuple[str, str, float], ...] = (
    ("Pneumonia", "Lung Opacity", 0.7),
    ("Consolidation", "Lung Opacity", 0.5),
    ("Infiltration", "Lung Opacity", 0.3),
    ("Edema", "Cardiomegaly", 0.5),
    ("Enlarged Cardiomediastinum", "Cardiomegaly", 0.4),
    ("Lobar Atelectasis", "Atelectasis", 0.7),
    ("Round(ed) Atelectasis", "Atelectasis", 0.4),
    ("Rib Fracture", "Fracture", 0.6),
    ("Clavicle Fracture", "Fracture", 0.6),
    ("Hydropneumothorax", "Pneumothorax", 0.5),
    ("Hydropneumothorax", "Pleural Effusion", 0.3),
    ("Infarction", "Pulmonary Embolism", 0.3),
    ("Tuberculosis", "Granuloma", 0.2),
    ("Mass", "Lung Lesion", 0.2),
)

FRONTAL_CODES = (("AP", "antero-posterior", 0.55), ("PA", "postero-anterior", 0.43),
                 ("AP AXIAL", "antero-posterior", 0.01), ("LAO", "left anterior oblique", 0.01))
LATERAL_CODES = (("LATERAL", "lateral", 0.7), ("LL", "left lateral", 0.3))
# Real training studies: 1 view 45 %, 2 views 46 %, 3 views 8.7 %, 4+ views 1 %.
VIEWS_PER_STUDY = {1: 0.45, 2: 0.46, 3: 0.08, 4: 0.01}


@dataclass(frozen=True)
class SynthConfig:
    n_patients: int = 700
    seed: int = 0
    height: int = 320
    width_range: tuple[int, int] = (280, 360)
    jpeg_quality: int = 92
    studies_per_patient: float = 3.4
    split_fractions: Mapping[str, float] = field(
        default_factory=lambda: {"train": 0.68, "dev": 0.11, "test": 0.21}
    )
    min_positives: Mapping[str, int] = field(
        default_factory=lambda: {"train": 10, "dev": 4, "test": 6}
    )
    prevalence_floor: float = 0.0
    missing_view_fraction: float = 0.04
    invisible_fraction: float = 0.05
    severity_sd: float = 0.35
    workers: int = 2

    @classmethod
    def from_params(cls, params: Mapping) -> SynthConfig:
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(params) - set(known) - {"out", "external"})
        if unknown:
            raise DataError(f"params synth: unknown keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        if "width_range" in known:
            known["width_range"] = tuple(known["width_range"])
        return cls(**known)


def _hex_id(rng: np.random.Generator) -> str:
    return "-".join(f"{v:08x}" for v in rng.integers(0, 2**32, size=5, dtype=np.uint64))


def _unique_ints(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    return np.sort(rng.choice(np.arange(low, high), size=n, replace=False))


def _sample_study_labels(rng: np.random.Generator, n: int, floor: float = 0.0) -> np.ndarray:
    """(n, 40 + 5) 0/1 labels: Task 1 classes then Task 3 classes.

    `floor` raises every finding's prevalence to at least that value: the real rarest classes
    (126 of 258,871 training images) would have no positive at all in a dataset of thousands.
    Below 1 %, a floor keeps them in the tail group while giving each tens of positives.
    """
    classes = list(TASK1_CLASSES) + list(TASK3_CLASSES)
    col = {c: i for i, c in enumerate(classes)}
    p_normal = TASK1_TRAIN_COUNTS["Normal"] / TASK1_TRAIN_IMAGES
    prev = np.array(
        [TASK1_TRAIN_COUNTS[c] / TASK1_TRAIN_IMAGES for c in TASK1_CLASSES]
        + [TASK3_PREVALENCE[c] for c in TASK3_CLASSES]
    )
    findings_only = np.array([c not in ("Normal",) for c in classes])
    prev = np.where(findings_only, np.maximum(prev, floor), prev)
    # Findings are drawn for the non-Normal studies only, so scale them up to keep marginals.
    prev_findings = np.clip(prev / (1.0 - p_normal), 0.0, 0.95)
    y = (rng.random((n, len(classes))) < prev_findings).astype(np.int8)
    for cause, effect, p in CO_OCCURRENCE:
        hit = (y[:, col[cause]] == 1) & (rng.random(n) < p)
        y[hit, col[effect]] = 1
    normal = rng.random(n) < p_normal
    keep = np.zeros(len(classes), dtype=bool)
    keep[col["Support Devices"]] = True
    y[normal] = y[normal] * keep
    # A study with no finding left reads "Normal" (Support Devices may stay).
    findings = y.copy()
    findings[:, col["Support Devices"]] = 0
    findings[:, col["Normal"]] = 0
    y[:, col["Normal"]] = (findings.sum(axis=1) == 0).astype(np.int8)
    return y


def _enforce_floor(
    rng: np.random.Generator, y_study: np.ndarray, n_views: np.ndarray, split: np.ndarray,
    floors: Mapping[str, int],
) -> None:
    """Make every class have at least floors[split] positive images in every split (in place)."""
    classes = list(TASK1_CLASSES) + list(TASK3_CLASSES)
    i_normal = classes.index("Normal")
    i_devices = classes.index("Support Devices")
    for name, floor in floors.items():
        in_split = np.flatnonzero(split == name)
        for c in range(len(classes)):
            if c == i_normal:
                continue
            while (n_views[in_split] * y_study[in_split, c]).sum() < floor:
                candidates = in_split[y_study[in_split, c] == 0]
                s = rng.choice(candidates)
                y_study[s, c] = 1
                if c != i_devices:
                    y_study[s, i_normal] = 0


def make_metadata(cfg: SynthConfig) -> pd.DataFrame:
    """One row per image with ids, view, split, image size, seeds and all 45 labels."""
    rng = np.random.default_rng(cfg.seed)
    n_pat = cfg.n_patients
    subjects = _unique_ints(rng, n_pat, 10_000_000, 20_000_000)
    rng.shuffle(subjects)
    names = list(cfg.split_fractions)
    probs = np.array([cfg.split_fractions[k] for k in names], dtype=float)
    patient_split = np.array(names)[rng.choice(len(names), size=n_pat, p=probs / probs.sum())]
    n_studies = 1 + rng.poisson(cfg.studies_per_patient - 1.0, size=n_pat)
    total_studies = int(n_studies.sum())
    study_ids = _unique_ints(rng, total_studies, 50_000_000, 60_000_000)
    rng.shuffle(study_ids)
    study_patient = np.repeat(np.arange(n_pat), n_studies)
    study_split = patient_split[study_patient]
    k = np.array(list(VIEWS_PER_STUDY))
    pk = np.array(list(VIEWS_PER_STUDY.values()))
    n_views = rng.choice(k, size=total_studies, p=pk / pk.sum())
    y_study = _sample_study_labels(rng, total_studies, cfg.prevalence_floor)
    _enforce_floor(rng, y_study, n_views, study_split, cfg.min_positives)

    rows = []
    image_seeds = rng.integers(0, 2**63 - 1, size=int(n_views.sum()))
    patient_seeds = rng.integers(0, 2**63 - 1, size=n_pat)
    j = 0
    for s in range(total_studies):
        p = study_patient[s]
        views = _study_views(rng, int(n_views[s]))
        for view in views:
            if view == "frontal":
                code, meaning = _pick(rng, FRONTAL_CODES)
            else:
                code, meaning = _pick(rng, LATERAL_CODES)
            if rng.random() < cfg.missing_view_fraction:
                code, meaning = None, None
            subject = int(subjects[p])
            study = int(study_ids[s])
            dicom = _hex_id(rng)
            rows.append({
                "dicom_id": dicom, "subject_id": subject, "study_id": study,
                "ViewPosition": code, "ViewCodeSequence_CodeMeaning": meaning,
                "fpath": f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg",
                "split": study_split[s], "drawn_view": view,
                # Widths on a 16 px grid: the renderer caches coordinate grids per size.
                "width": int(rng.integers(cfg.width_range[0], cfg.width_range[1] + 1)) // 16 * 16,
                "image_seed": int(image_seeds[j]), "patient_seed": int(patient_seeds[p]),
                "study_index": s,
            })  # fmt: skip
            j += 1
    meta = pd.DataFrame(rows)
    labels = pd.DataFrame(
        y_study[meta["study_index"].to_numpy()], columns=list(TASK1_CLASSES) + list(TASK3_CLASSES)
    )
    return pd.concat([meta.drop(columns="study_index"), labels], axis=1)


def _study_views(rng: np.random.Generator, n: int) -> list[str]:
    if n == 1:
        return ["frontal"] if rng.random() < 0.9 else ["lateral"]
    n_lat = max(1, n // 2) if rng.random() < 0.9 else 0
    return ["frontal"] * (n - n_lat) + ["lateral"] * n_lat


def _pick(rng: np.random.Generator, table: tuple) -> tuple[str, str]:
    p = np.array([t[2] for t in table])
    code, meaning, _ = table[rng.choice(len(table), p=p / p.sum())]
    return code, meaning


SEVERITY_RANGE = (0.5, 2.0)


def study_severity(meta: pd.DataFrame, cfg: SynthConfig) -> np.ndarray:
    """(images, 45) strength of each finding per image, shared by the views of a study:
    log-normal around the typical case (sd `cfg.severity_sd` in log units), clipped to
    SEVERITY_RANGE, so every finding has florid and faint cases."""
    n_classes = len(TASK1_CLASSES) + len(TASK3_CLASSES)
    studies, inverse = np.unique(meta["study_id"].to_numpy(), return_inverse=True)
    rng = np.random.default_rng([cfg.seed, 2])
    per_study = np.exp(rng.normal(0.0, cfg.severity_sd, size=(len(studies), n_classes)))
    return np.clip(per_study, *SEVERITY_RANGE)[inverse]


def _render_one(args: tuple) -> None:
    path, findings, severity, view, patient_seed, image_seed, height, width, quality = args
    anatomy = sample_anatomy(np.random.default_rng(patient_seed))
    img = render(findings, view, anatomy, np.random.default_rng(image_seed), height, width, severity)
    with atomic_path(path, suffix=".jpg") as tmp:
        Image.fromarray(img).save(tmp, format="JPEG", quality=quality)


def render_images(meta: pd.DataFrame, images_root: Path, cfg: SynthConfig) -> None:
    """Draw every image (parallel, deterministic per image whatever the worker count)."""
    all_classes = list(TASK1_CLASSES) + list(TASK3_CLASSES)
    y = meta[all_classes].to_numpy()
    rng = np.random.default_rng([cfg.seed, 1])
    # Report-derived labels are noisy: a few positives are not visible on a given image.
    visible = rng.random(y.shape) >= cfg.invisible_fraction
    severity = study_severity(meta, cfg)
    jobs = []
    for i, row in enumerate(meta.itertuples(index=False)):
        findings = [c for c, on in zip(all_classes, y[i] & visible[i], strict=True) if on]
        sev = {c: round(float(severity[i, all_classes.index(c)]), 4) for c in findings}
        jobs.append((images_root / row.fpath, findings, sev, row.drawn_view, row.patient_seed,
                     row.image_seed, cfg.height, row.width, cfg.jpeg_quality))
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            list(tqdm(pool.map(_render_one, jobs, chunksize=32), total=len(jobs), desc="synth images"))
    else:
        for job in tqdm(jobs, desc="synth images"):
            _render_one(job)


def write_dataset(out: str | os.PathLike, cfg: SynthConfig) -> pd.DataFrame:
    """Write `<out>/mimic-cxr-jpg/files/...` images and `<out>/cxr-lt-2024/*.csv` label files."""
    out = Path(out)
    meta = make_metadata(cfg)
    render_images(meta, out / "mimic-cxr-jpg", cfg)
    labels_dir = out / "cxr-lt-2024"
    t1 = list(TASK1_CLASSES)
    t2 = list(TASK2_CLASSES)
    t3 = list(TASK3_CLASSES)
    train = meta[meta["split"] == "train"]
    dev = meta[meta["split"] == "dev"]
    test = meta[meta["split"] == "test"]
    write_csv(labels_dir / "train_labeled.csv", train[META + t1])
    write_csv(labels_dir / "train_labeled_26.csv", train[META + t2])
    for name, part in (("development", dev), ("test", test)):
        write_csv(labels_dir / f"{name}_labeled_task1.csv", part[META + t1])
        # The official task-2 development file swaps Normal and Nodule; keep that trap.
        t2_cols = list(t2)
        if name == "development":
            i, j = t2_cols.index("Nodule"), t2_cols.index("Normal")
            t2_cols[i], t2_cols[j] = t2_cols[j], t2_cols[i]
        write_csv(labels_dir / f"{name}_labeled_task2.csv", part[META + t2_cols])
        write_csv(labels_dir / f"{name}_labeled_task3.csv", part[META + t3])
    return meta
