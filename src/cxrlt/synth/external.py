"""Small NIH-, CheXpert- and VinDr-style sources in their official on-disk layouts.

The built-in dataset stands in for the external pretraining sources too, so the demo runs
the real adapters (`nih`, `chexpert`, `vindr`, `dicom`) end to end. Each writer produces
exactly the files and columns of the official download, nothing more:

- NIH ChestX-ray14 (`<root>`): `Data_Entry_2017_v2020.csv` with all eleven real columns,
  patient-disjoint `train_val_list.txt` / `test_list.txt`, 8-bit PNGs split over
  `images_001/images/` and `images_002/images/` as in the Kaggle release.
- CheXpert (`<root>` = the `CheXpert-v1.0-small` folder): `train.csv` (labels 1 / 0 / -1 /
  blank) and `valid.csv` (radiologist consensus, 0 / 1 only, own patients), grayscale JPEGs
  at the `Path` each row names, frontal and lateral views, several studies per patient.
- VinDr-CXR, Kaggle VinBigData release (`<root>`): `train.csv` with one row per reader and
  box (three readers per image, drawn from 17 with the real workload; "No finding" rows
  with empty boxes; readers miss findings and add false ones, so they disagree) and
  `train/<image_id>.dicom`, real DICOM files: DX, 16-bit allocated, 12 / 14 / 16 bits stored,
  MONOCHROME1 (stored inverted) on some, Rescale Slope / Intercept on some, Window Center /
  Width on some, and a fake PatientName / PatientID so tests can check that conversion drops
  them.

Labels are sampled in each source's own label space with rough real prevalences (the
constants below were measured on the real metadata that torchxrayvision ships), with a
floor of `min_positives` per label so that every label is exercised. The images are drawn
by `cxrlt.synth.render` from the CXR-LT finding that `harmonise.LABEL_MAP` maps each source label
to (a label with several targets draws one of them; labels harmonise drops draw the visual
proxy in `RENDER_PROXY`). Everything is a function of the seed: per-image seeds are drawn
up front, so the files are byte-identical whatever the worker count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlt.data.harmonise import LABEL_MAP, source_label_names
from cxrlt.errors import DataError
from cxrlt.io import atomic_path, write_csv, write_text
from cxrlt.synth.anatomy import sample_anatomy
from cxrlt.synth.render import render

SOURCES: tuple[str, ...] = ("nih", "chexpert", "vindr")

# --- rough real label statistics -------------------------------------------------------------

# NIH: fraction of the 112,120 images carrying each label (Data_Entry_2017_v2020.csv).
NIH_PREVALENCE: dict[str, float] = {
    "No Finding": 0.538, "Infiltration": 0.177, "Effusion": 0.119, "Atelectasis": 0.103,
    "Nodule": 0.057, "Mass": 0.052, "Pneumothorax": 0.047, "Consolidation": 0.042,
    "Pleural_Thickening": 0.030, "Cardiomegaly": 0.025, "Emphysema": 0.022, "Edema": 0.021,
    "Fibrosis": 0.015, "Pneumonia": 0.013, "Hernia": 0.002,
}  # fmt: skip
NIH_NO_FINDING = "No Finding"

# CheXpert: fraction of the 223,414 train.csv rows holding (1, -1, 0, blank) per label.
CHEXPERT_VALUES: dict[str, tuple[float, float, float, float]] = {
    "No Finding": (0.100, 0.0, 0.0, 0.900),
    "Enlarged Cardiomediastinum": (0.048, 0.056, 0.097, 0.799),
    "Cardiomegaly": (0.121, 0.036, 0.050, 0.793),
    "Lung Opacity": (0.473, 0.025, 0.030, 0.473),
    "Lung Lesion": (0.041, 0.007, 0.006, 0.947),
    "Edema": (0.234, 0.058, 0.093, 0.615),
    "Consolidation": (0.066, 0.124, 0.126, 0.684),
    "Pneumonia": (0.027, 0.084, 0.013, 0.876),
    "Atelectasis": (0.149, 0.151, 0.006, 0.694),
    "Pneumothorax": (0.087, 0.014, 0.252, 0.647),
    "Pleural Effusion": (0.386, 0.052, 0.158, 0.404),
    "Pleural Other": (0.016, 0.012, 0.001, 0.971),
    "Fracture": (0.040, 0.003, 0.011, 0.945),
    "Support Devices": (0.519, 0.005, 0.027, 0.448),
}
CHEXPERT_NO_FINDING = "No Finding"
CHEXPERT_NOT_A_FINDING = ("No Finding", "Support Devices")
CHEXPERT_PREFIX = "CheXpert-v1.0-small"
CHEXPERT_FIRST_VALID_PATIENT = 64541  # valid.csv patients follow the 64,540 training patients

# VinDr: fraction of the 15,000 images a majority of readers marked with each class.
VINDR_PREVALENCE: dict[str, float] = {
    "No finding": 0.707, "Aortic enlargement": 0.156, "Cardiomegaly": 0.121,
    "Pulmonary fibrosis": 0.068, "Pleural thickening": 0.059, "Pleural effusion": 0.042,
    "Lung Opacity": 0.037, "Nodule/Mass": 0.027, "Other lesion": 0.024, "Infiltration": 0.016,
    "Calcification": 0.012, "ILD": 0.010, "Consolidation": 0.008, "Atelectasis": 0.004,
    "Pneumothorax": 0.004,
}  # fmt: skip
VINDR_CLASS_ID: dict[str, int] = {
    "Aortic enlargement": 0, "Atelectasis": 1, "Calcification": 2, "Cardiomegaly": 3,
    "Consolidation": 4, "ILD": 5, "Infiltration": 6, "Lung Opacity": 7, "Nodule/Mass": 8,
    "Other lesion": 9, "Pleural effusion": 10, "Pleural thickening": 11, "Pneumothorax": 12,
    "Pulmonary fibrosis": 13, "No finding": 14,
}  # fmt: skip
VINDR_NO_FINDING = "No finding"
# Annotation rows per reader in the real release (R8-R10 read most images).
VINDR_READER_ROWS: dict[str, int] = {
    "R1": 1995, "R2": 3121, "R3": 2285, "R4": 1513, "R5": 2783, "R6": 2041, "R7": 1733,
    "R8": 12198, "R9": 15708, "R10": 13292, "R11": 1670, "R12": 1729, "R13": 1824,
    "R14": 1624, "R15": 1823, "R16": 1763, "R17": 812,
}  # fmt: skip
VINDR_COLUMNS = ("image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max")
READER_SENSITIVITY = 0.8  # chance a reader marks a finding the image has
READER_FALSE_POSITIVE = {"abnormal": 0.15, "normal": 0.03}  # chance of one spurious mark
# Where a finding's box lies, as (x0, y0, x1, y1) fractions of the image; default: lung fields.
VINDR_BOX_REGION: dict[str, tuple[float, float, float, float]] = {
    "Aortic enlargement": (0.45, 0.18, 0.62, 0.40),
    "Cardiomegaly": (0.32, 0.42, 0.80, 0.78),
    "Pleural effusion": (0.08, 0.58, 0.92, 0.88),
    "Pneumothorax": (0.10, 0.10, 0.90, 0.45),
    "Pleural thickening": (0.08, 0.10, 0.92, 0.50),
    "Calcification": (0.40, 0.18, 0.65, 0.45),
}
LUNG_FIELDS = (0.12, 0.14, 0.88, 0.80)
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage

# Source labels harmonise drops (no faithful CXR-LT class) still show on the image: these are
# the renderer's nearest findings. Drawing only; they never become CXR-LT labels.
RENDER_PROXY: dict[str, str] = {
    "Aortic enlargement": "Tortuous Aorta",
    "Calcification": "Calcification of the Aorta",
    "ILD": "Fibrosis",
    "Other lesion": "Lung Lesion",
}
WIDTH_STEPS = 3  # distinct image widths per source (see `_widths`)
UNCERTAIN_DRAWN = 0.5  # an uncertain (-1) CheXpert finding is visible on half the studies


@dataclass(frozen=True)
class ExternalSynthConfig:
    """Sizes and image settings of the three external sources (params `synth.external`).

    `nih`, `chexpert`: patients (about 2.4 and 2.1 images each); `vindr`: images (VinDr has
    no patient links, one image is one patient). 0 skips a source.
    """

    nih: int = 60
    chexpert: int = 70
    vindr: int = 90
    seed: int = 0
    height: int = 224
    width_range: tuple[int, int] = (192, 256)
    min_positives: int = 2
    workers: int = 2

    @classmethod
    def from_params(cls, params: Mapping) -> ExternalSynthConfig:
        fields = cls.__dataclass_fields__
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise DataError(
                f"params synth.external: unknown keys {unknown}; valid: {sorted(fields)}"
            )
        known = dict(params)
        if "width_range" in known:
            known["width_range"] = tuple(int(v) for v in known["width_range"])
        cfg = cls(**known)
        cfg.check()
        return cfg

    def check(self) -> None:
        lo, hi = self.width_range
        if self.height < 32 or lo < 32 or hi < lo:
            raise DataError(
                f"params synth.external: height {self.height} and width_range {self.width_range} "
                "must be at least 32 px, width_range as [low, high]"
            )
        for name in SOURCES:
            if getattr(self, name) < 0:
                raise DataError(f"params synth.external.{name}: must be >= 0")


# --- rendering jobs (picklable, run in worker processes) --------------------------------------


@dataclass(frozen=True)
class DicomStyle:
    """How one synthetic DICOM stores its pixels and what its header says."""

    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    rescale: tuple[float, float] | None = None  # (slope, intercept)
    window: bool = False  # write a Window Center / Width covering the body
    patient_name: str = "SYNTH^PATIENT"
    patient_id: str = "SYNTH0000"
    patient_sex: str = "M"
    patient_age: str = "050Y"


@dataclass(frozen=True)
class _Job:
    kind: str  # "png" | "jpeg" | "dicom"
    path: str
    findings: tuple[str, ...]
    view: str
    patient_seed: int
    image_seed: int
    height: int
    width: int
    dicom: DicomStyle | None = None
    uid_key: str = ""


def _render_job(job: _Job) -> None:
    anatomy = sample_anatomy(np.random.default_rng(job.patient_seed))
    rng = np.random.default_rng(job.image_seed)
    img = render(job.findings, job.view, anatomy, rng, job.height, job.width)
    if job.kind == "png":
        with atomic_path(job.path, suffix=".png") as tmp:
            Image.fromarray(img).save(tmp, format="PNG", compress_level=3)
    elif job.kind == "jpeg":
        with atomic_path(job.path, suffix=".jpg") as tmp:
            Image.fromarray(img).save(tmp, format="JPEG", quality=90)
    else:
        assert job.dicom is not None
        write_dicom(img, job.path, job.dicom, job.uid_key, rng)


def write_dicom(
    img: np.ndarray, path: str | os.PathLike, style: DicomStyle, uid_key: str,
    rng: np.random.Generator,
) -> None:  # fmt: skip
    """Store an 8-bit display image as a DX DICOM under `style` (atomically).

    The stored values are the image scaled to `bits_stored` with a dither in the low bits,
    inverted for MONOCHROME1; Rescale Slope / Intercept only relabel them (the modality values
    stay a linear function of the image), and the window spans the 0.5-99.5 % range of the
    modality values, so a correct display pipeline gives back the image up to clipping.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    bits = int(style.bits_stored)
    if not 8 <= bits <= 16:
        raise ValueError(f"bits_stored must be in [8, 16], got {bits}")
    shift = bits - 8
    stored = (img.astype(np.uint32) << shift) + rng.integers(0, 1 << shift, size=img.shape)
    if style.photometric == "MONOCHROME1":
        stored = (1 << bits) - 1 - stored
    stored = stored.astype(np.uint16)

    def uid(part: str) -> str:
        return generate_uid(entropy_srcs=["cxrlt-synth-vindr", uid_key, part])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = style.patient_name
    ds.PatientID = style.patient_id
    ds.PatientSex = style.patient_sex
    ds.PatientAge = style.patient_age
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ["0.139", "0.139"]
    modality = stored.astype(np.float64)
    if style.rescale is not None:
        slope, intercept = style.rescale
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
        modality = modality * slope + intercept
    if style.window:
        lo, hi = np.percentile(modality, [0.5, 99.5])
        ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{max(hi - lo, 2.0):.1f}"
    ds.PixelData = stored.tobytes()
    with atomic_path(path, suffix=".dicom") as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)


def _run_jobs(jobs: Sequence[_Job], workers: int) -> None:
    # Group by size so that a worker's chunk reuses the renderer's per-size texture bank.
    jobs = sorted(jobs, key=lambda j: (j.height, j.width))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            list(pool.map(_render_job, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))))
    else:
        for job in jobs:
            _render_job(job)


# --- label sampling ------------------------------------------------------------------------


def _findings(source: str, labels: Iterable[str], rng: np.random.Generator) -> tuple[str, ...]:
    """CXR-LT findings the renderer draws for a set of source labels (Normal draws nothing)."""
    drawn = set()
    for label in labels:
        if label in LABEL_MAP[source]:
            targets = [t for t in LABEL_MAP[source][label] if t != "Normal"]
        else:
            targets = [RENDER_PROXY[label]] if label in RENDER_PROXY else []
        if len(targets) > 1:  # e.g. VinDr "Nodule/Mass": the image shows one of them
            targets = [targets[int(rng.integers(len(targets)))]]
        drawn.update(targets)
    return tuple(sorted(drawn))


def _sample_binary(
    rng: np.random.Generator, n: int, prevalence: Mapping[str, float], normal: str, floor: int
) -> pd.DataFrame:
    """(n, labels) 0/1: `normal` with its prevalence, else findings at their conditional rate.

    An abnormal row holds at least one finding. Then every label gets `floor` positives:
    `floor` normal rows are kept normal, other rows picked at random gain the missing
    findings (and so stop being normal), so tiny sets still hold each label.
    """
    labels = list(prevalence)
    findings = [c for c in labels if c != normal]
    p_normal = prevalence[normal]
    p = np.array([prevalence[c] for c in findings])
    p_cond = np.clip(p / max(1.0 - p_normal, 1e-6), 0.0, 0.95)
    is_normal = _at_least(rng, rng.random(n) < p_normal, floor)
    y = (rng.random((n, len(findings))) < p_cond) & ~is_normal[:, None]
    for i in np.flatnonzero(~is_normal & ~y.any(axis=1)):
        y[i, rng.choice(len(findings), p=p / p.sum())] = True
    keep = _protect(rng, is_normal, floor)
    _floor(rng, y, np.ones(len(findings), dtype=bool), floor, allowed=~keep)
    out = pd.DataFrame(y.astype(np.int8), columns=findings)
    out.insert(labels.index(normal), normal, (~y.any(axis=1)).astype(np.int8))
    return out[labels]


def _at_least(rng: np.random.Generator, flags: np.ndarray, k: int) -> np.ndarray:
    """`flags` with random False entries turned True until min(k, n) are True."""
    flags = flags.copy()
    need = min(k, len(flags)) - int(flags.sum())
    if need > 0:
        flags[rng.choice(np.flatnonzero(~flags), size=need, replace=False)] = True
    return flags


def _protect(rng: np.random.Generator, flags: np.ndarray, k: int) -> np.ndarray:
    """A mask of min(k, count) random True entries of `flags` (rows the floor must not touch)."""
    keep = np.zeros(len(flags), dtype=bool)
    rows = np.flatnonzero(flags)
    keep[rng.choice(rows, size=min(k, len(rows)), replace=False)] = True
    return keep


def _floor(
    rng: np.random.Generator, y: np.ndarray, columns: np.ndarray, floor: int,
    allowed: np.ndarray | None = None,
) -> None:  # fmt: skip
    """Set random zeros (in `allowed` rows) to 1 until each selected column has `floor` ones."""
    n = y.shape[0]
    allowed = np.ones(n, dtype=bool) if allowed is None else allowed
    for j in np.flatnonzero(columns):
        candidates = np.flatnonzero(~y[:, j] & allowed)
        need = min(floor - int(y[:, j].sum()), len(candidates))
        if need > 0:
            y[rng.choice(candidates, size=need, replace=False), j] = True


def _widths(rng: np.random.Generator, n: int, width_range: tuple[int, int]) -> np.ndarray:
    """Image widths from WIDTH_STEPS values across `width_range`.

    Few distinct sizes on purpose: the renderer builds its texture bank once per size (about
    as long as drawing three images), so free widths would quadruple the writing time.
    """
    choices = np.unique(np.rint(np.linspace(width_range[0], width_range[1], WIDTH_STEPS)))
    return choices.astype(int)[rng.integers(len(choices), size=n)]


def _image_sizes(rng: np.random.Generator, n: int, height: int, width_range: tuple[int, int]):
    return np.full(n, int(height)), _widths(rng, n, width_range)


def _seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)


def _source_rng(seed: int, source: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), SOURCES.index(source), 0x5EED])


@dataclass
class _Plan:
    """What a writer will put on disk: images (jobs) and text files (written after them)."""

    root: Path
    jobs: list[_Job] = field(default_factory=list)
    tables: dict[str, pd.DataFrame | str] = field(default_factory=dict)
    main: str = ""

    def write_tables(self) -> pd.DataFrame:
        for name, content in self.tables.items():
            if isinstance(content, str):
                write_text(self.root / name, content)
            else:
                write_csv(self.root / name, content)
        main = self.tables[self.main]
        assert isinstance(main, pd.DataFrame)
        return main


# --- NIH ChestX-ray14 -------------------------------------------------------------------------


def _plan_nih(
    root: Path, n_patients: int, seed: int, height: int, width_range: tuple[int, int],
    min_positives: int,
) -> _Plan:  # fmt: skip
    rng = _source_rng(seed, "nih")
    plan = _Plan(root, main="Data_Entry_2017_v2020.csv")
    patients = np.sort(rng.choice(np.arange(1, 30_806), size=n_patients, replace=False))
    n_images = 1 + rng.poisson(1.5, size=n_patients)
    test = rng.random(n_patients) < 0.23
    if n_patients >= 2 and (test.all() or not test.any()):
        test[rng.integers(n_patients)] = not test[0]
    age0 = rng.integers(18, 86, size=n_patients)
    male = rng.random(n_patients) < 0.565
    patient_seeds = _seeds(rng, n_patients)
    owner = np.repeat(np.arange(n_patients), n_images)
    follow_up = np.concatenate([np.arange(k) for k in n_images]) if n_patients else np.array([])
    n = len(owner)
    labels = _sample_binary(rng, n, NIH_PREVALENCE, NIH_NO_FINDING, min_positives)
    heights, widths = _image_sizes(rng, n, height, width_range)
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    scale = rng.uniform(9.0, 12.0, size=n)
    spacing = rng.choice([0.139, 0.143, 0.168, 0.171], size=n)
    image_seeds = _seeds(rng, n)
    names = [f"{patients[p]:08d}_{k:03d}.png" for p, k in zip(owner, follow_up, strict=True)]
    finding_cols = [c for c in NIH_PREVALENCE if c != NIH_NO_FINDING]
    y = labels.to_numpy().astype(bool)
    text = [
        "|".join(c for c, on in zip(labels.columns, row, strict=True) if on and c in finding_cols)
        or NIH_NO_FINDING
        for row in y
    ]
    table = pd.DataFrame({
        "Image Index": names,
        "Finding Labels": text,
        "Follow-up #": follow_up.astype(int),
        "Patient ID": patients[owner],
        "Patient Age": age0[owner] + follow_up.astype(int) // 3,
        "Patient Gender": np.where(male[owner], "M", "F"),
        "View Position": view,
        # The header's brackets hold commas, so the real file has eleven columns under them.
        "OriginalImage[Width": np.rint(widths * scale).astype(int),
        "Height]": np.rint(heights * scale).astype(int),
        "OriginalImagePixelSpacing[x": spacing,
        "y]": spacing,
    })  # fmt: skip
    half = (n + 1) // 2  # Kaggle: sorted images split over images_001 ... images_012
    for i in range(n):
        folder = "images_001" if i < half else "images_002"
        plan.jobs.append(_Job(
            "png", str(root / folder / "images" / names[i]),
            _findings("nih", labels.columns[y[i]], rng), "frontal",
            int(patient_seeds[owner[i]]), int(image_seeds[i]), int(heights[i]), int(widths[i]),
        ))  # fmt: skip
    is_test = test[owner]
    plan.tables[plan.main] = table
    plan.tables["train_val_list.txt"] = "".join(f"{x}\n" for x in sorted(np.array(names)[~is_test]))
    plan.tables["test_list.txt"] = "".join(f"{x}\n" for x in sorted(np.array(names)[is_test]))
    return plan


# --- CheXpert ---------------------------------------------------------------------------------


def _sample_chexpert_study(rng: np.random.Generator, n: int, floor: int) -> np.ndarray:
    """(n, 14) float labels 1 / 0 / -1 / NaN per study, consistent with the labeller's rules.

    "No Finding" is 1 (real rate) or blank. A No-Finding study holds no positive or uncertain
    pathology (Support Devices aside); every other study holds at least one. Each label gets
    `floor` positives (a pathology only on studies that are not No Finding).
    """
    labels = list(CHEXPERT_VALUES)
    nf = labels.index(CHEXPERT_NO_FINDING)
    path_cols = [j for j, c in enumerate(labels) if c not in CHEXPERT_NOT_A_FINDING]
    probs = np.array([CHEXPERT_VALUES[c] for c in labels], dtype=float)  # (14, 4): 1, -1, 0, blank
    values = np.array([1.0, -1.0, 0.0, np.nan])
    normal = _at_least(rng, rng.random(n) < probs[nf, 0], floor)
    if normal.all() and n > 1:
        normal[rng.integers(n)] = False
    y = np.full((n, len(labels)), np.nan)
    for j in range(len(labels)):
        if j == nf:
            continue
        p = probs[j].copy()
        if j in path_cols:
            # Abnormal studies carry the findings: scale 1 / -1 up, the rest keeps the ratio.
            present = min((p[0] + p[1]) / (1.0 - probs[nf, 0]), 0.95)
            p[:2] = p[:2] / (p[0] + p[1]) * present
            p[2:] = p[2:] / (p[2] + p[3]) * (1.0 - present)
        y[:, j] = values[rng.choice(4, size=n, p=p / p.sum())]
    # No-Finding studies: pathologies become 0 or blank in their real ratio.
    for j in path_cols:
        q = probs[j, 2] / (probs[j, 2] + probs[j, 3])
        rows = normal & np.isin(y[:, j], [1.0, -1.0])
        y[rows, j] = np.where(rng.random(int(rows.sum())) < q, 0.0, np.nan)
    p_pos = probs[path_cols, 0] / probs[path_cols, 0].sum()
    for i in np.flatnonzero(~normal & ~np.isin(y[:, path_cols], [1.0, -1.0]).any(axis=1)):
        y[i, path_cols[rng.choice(len(path_cols), p=p_pos)]] = 1.0
    pos = y == 1.0
    before = pos.copy()
    pathology = np.zeros(len(labels), dtype=bool)
    pathology[path_cols] = True
    _floor(rng, pos, pathology, floor, allowed=~normal)
    devices = np.zeros(len(labels), dtype=bool)
    devices[labels.index("Support Devices")] = True
    _floor(rng, pos, devices, floor)
    y[pos & ~before] = 1.0
    y[:, nf] = np.where(normal, 1.0, np.nan)
    return y


def _plan_chexpert(
    root: Path, n_patients: int, seed: int, height: int, width_range: tuple[int, int],
    min_positives: int,
) -> _Plan:  # fmt: skip
    rng = _source_rng(seed, "chexpert")
    plan = _Plan(root, main="train.csv")
    labels = list(CHEXPERT_VALUES)
    n_valid = int(round(0.1 * n_patients)) if n_patients >= 5 else 0
    n_train = n_patients - n_valid
    sex = np.where(rng.random(n_patients) < 0.594, "Male", "Female")
    age0 = rng.integers(18, 90, size=n_patients)
    patient_seeds = _seeds(rng, n_patients)
    pid = [f"patient{k + 1:05d}" for k in range(n_train)]
    pid += [f"patient{CHEXPERT_FIRST_VALID_PATIENT + k:05d}" for k in range(n_valid)]
    n_studies = np.where(np.arange(n_patients) < n_train, 1 + rng.poisson(0.8, size=n_patients), 1)
    study_owner = np.repeat(np.arange(n_patients), n_studies)
    study_no = np.concatenate([np.arange(1, k + 1) for k in n_studies])
    n_st = len(study_owner)
    y_train = _sample_chexpert_study(rng, n_st, min_positives)
    # valid.csv: radiologist consensus, only 0 / 1 (uncertain resolved, blank is negative).
    resolved = np.where(y_train == -1.0, (rng.random(y_train.shape) < 0.5).astype(float), y_train)
    resolved = np.nan_to_num(resolved, nan=0.0)
    is_valid = study_owner >= n_train
    y_study = np.where(is_valid[:, None], resolved, y_train)
    uncertain_seen = rng.random(y_study.shape) < UNCERTAIN_DRAWN
    n_views = np.where(is_valid, 1 + (rng.random(n_st) < 0.15),
                       rng.choice([1, 2, 3], size=n_st, p=[0.75, 0.22, 0.03]))  # fmt: skip
    rows, jobs = [], []
    for s in range(n_st):
        p = int(study_owner[s])
        views = {1: ["frontal"], 2: ["frontal", "lateral"], 3: ["frontal", "frontal", "lateral"]}
        drawn = [c for j, c in enumerate(labels)
                 if y_study[s, j] == 1.0 or (y_study[s, j] == -1.0 and uncertain_seen[s, j])]  # fmt: skip
        findings = _findings("chexpert", drawn, rng)
        part = "valid" if is_valid[s] else "train"
        for v, view in enumerate(views[int(n_views[s])], start=1):
            rel = f"{part}/{pid[p]}/study{study_no[s]}/view{v}_{view}.jpg"
            frontal = view == "frontal"
            rows.append({
                "Path": f"{CHEXPERT_PREFIX}/{rel}", "Sex": sex[p],
                "Age": int(age0[p] + study_no[s] - 1), "Frontal/Lateral": view.capitalize(),
                "AP/PA": ("AP" if rng.random() < 0.846 else "PA") if frontal else None,
                **dict(zip(labels, y_study[s], strict=True)), "_part": part,
            })  # fmt: skip
            w = int(_widths(rng, 1, width_range)[0])
            jobs.append(_Job("jpeg", str(root / rel), findings, view, int(patient_seeds[p]),
                             int(_seeds(rng, 1)[0]), int(height), w))  # fmt: skip
    table = pd.DataFrame(rows)
    plan.jobs = jobs
    for part, name in (("train", "train.csv"), ("valid", "valid.csv")):
        sub = table[table["_part"] == part].drop(columns="_part")
        if part == "train" or len(sub):
            plan.tables[name] = sub.reset_index(drop=True)
    return plan


# --- VinDr-CXR --------------------------------------------------------------------------------


def _box(rng: np.random.Generator, label: str) -> np.ndarray:
    """A plausible (x0, y0, x1, y1) box as fractions of the image for one finding."""
    if label in VINDR_BOX_REGION:
        x0, y0, x1, y1 = VINDR_BOX_REGION[label]
        box = np.array([x0, y0, x1, y1]) + rng.uniform(-0.03, 0.03, size=4)
        if label in ("Pleural effusion", "Pneumothorax", "Pleural thickening"):
            mid = (x0 + x1) / 2  # one side of the chest
            box[[0, 2]] = (box[0], mid - 0.05) if rng.random() < 0.5 else (mid + 0.05, box[2])
        return box
    x0, y0, x1, y1 = LUNG_FIELDS
    size = rng.uniform(0.06, 0.3, size=2)
    cx = rng.uniform(x0 + size[0] / 2, x1 - size[0] / 2)
    cy = rng.uniform(y0 + size[1] / 2, y1 - size[1] / 2)
    return np.array([cx - size[0] / 2, cy - size[1] / 2, cx + size[0] / 2, cy + size[1] / 2])


def _dicom_styles(rng: np.random.Generator, n: int) -> list[DicomStyle]:
    """Header variants, cycled over a shuffled order so that even a tiny set holds each one."""
    order = rng.permutation(n)
    styles = []
    for i in range(n):
        j = int(order[i])
        slope, intercept = [(1.0, 0.0), (0.5, -1024.0), (2.0, 100.0)][j % 3]
        sex = "M" if rng.random() < 0.5 else "F"
        styles.append(DicomStyle(
            photometric="MONOCHROME1" if j % 3 == 0 else "MONOCHROME2",
            bits_stored=(12, 12, 14, 16)[j % 4],
            rescale=(slope, intercept) if j % 2 == 1 else None,
            window=j % 5 in (0, 1, 2),
            patient_name=f"SYNTH^VINDR{i + 1:04d}",
            patient_id=f"SYNVD{i + 1:06d}",
            patient_sex=sex,
            patient_age=f"{int(rng.integers(18, 90)):03d}Y",
        ))  # fmt: skip
    return styles


def _plan_vindr(
    root: Path, n_images: int, seed: int, height: int, width_range: tuple[int, int],
    min_positives: int,
) -> _Plan:  # fmt: skip
    rng = _source_rng(seed, "vindr")
    plan = _Plan(root, main="train.csv")
    classes = source_label_names("vindr")
    assert set(classes) == set(VINDR_PREVALENCE) == set(VINDR_CLASS_ID)
    ids = [rng.bytes(16).hex() for _ in range(n_images)]
    truth = _sample_binary(rng, n_images, VINDR_PREVALENCE, VINDR_NO_FINDING, min_positives)
    findings = [c for c in truth.columns if c != VINDR_NO_FINDING]
    p_false = np.array([VINDR_PREVALENCE[c] for c in findings])
    p_false /= p_false.sum()
    reader_names = list(VINDR_READER_ROWS)
    w = np.array(list(VINDR_READER_ROWS.values()), dtype=float)
    heights, widths = _image_sizes(rng, n_images, height, width_range)
    styles = _dicom_styles(rng, n_images)
    seeds = _seeds(rng, 2 * n_images)
    # Each finding's floor holds after aggregation too: on `min_positives` of its images a
    # majority of the readers marks it whatever their sensitivity.
    y = truth[findings].to_numpy().astype(bool)
    agreed = np.zeros_like(y)
    for j in range(len(findings)):
        agreed[:, j] = _protect(rng, y[:, j], min_positives)
    # And one image gets a lone reader's extra (mapped) finding, so that the reader policies
    # ("any", "majority") differ on every set, however small.
    abnormal = np.flatnonzero(y.any(axis=1))
    lone = int(rng.choice(abnormal)) if len(abnormal) else -1
    mapped = [c for c in findings if c in LABEL_MAP["vindr"]]
    rows = []
    for i, image_id in enumerate(ids):
        true = [c for c in findings if truth.at[i, c]]
        boxes = {c: _box(rng, c) for c in findings}
        readers = rng.choice(len(reader_names), size=3, replace=False, p=w / w.sum())
        sees = rng.random((3, len(findings))) < READER_SENSITIVITY
        for j in np.flatnonzero(agreed[i]):
            sees[:2, j] = True  # two of three readers: a majority
        extra = [c for c in mapped if c not in true] if i == lone else []
        for k, r in enumerate(readers):
            marked = [c for j, c in enumerate(findings) if y[i, j] and sees[k, j]]
            if k == 2 and extra:
                marked.append(extra[int(rng.integers(len(extra)))])
            elif rng.random() < READER_FALSE_POSITIVE["abnormal" if true else "normal"]:
                marked.append(findings[int(rng.choice(len(findings), p=p_false))])
            marked = sorted(set(marked), key=findings.index)
            base = {"image_id": image_id, "rad_id": reader_names[r]}
            if not marked:
                rows.append({**base, "class_name": VINDR_NO_FINDING,
                             "class_id": VINDR_CLASS_ID[VINDR_NO_FINDING]})  # fmt: skip
            for c in marked:
                for _ in range(1 + int(rng.random() < 0.2)):
                    box = np.clip(boxes[c] + rng.uniform(-0.02, 0.02, size=4), 0.0, 1.0)
                    scale = np.array([widths[i], heights[i], widths[i], heights[i]])
                    x0, y0, x1, y1 = np.round(box * scale)
                    rows.append({**base, "class_name": c, "class_id": VINDR_CLASS_ID[c],
                                 "x_min": x0, "y_min": y0, "x_max": max(x1, x0 + 1),
                                 "y_max": max(y1, y0 + 1)})  # fmt: skip
        plan.jobs.append(_Job(
            "dicom", str(root / "train" / f"{image_id}.dicom"), _findings("vindr", true, rng),
            "frontal", int(seeds[2 * i]), int(seeds[2 * i + 1]), int(heights[i]), int(widths[i]),
            dicom=styles[i], uid_key=image_id,
        ))  # fmt: skip
    table = pd.DataFrame(rows, columns=list(VINDR_COLUMNS))
    table = table.iloc[rng.permutation(len(table))].reset_index(drop=True)  # real rows are unsorted
    plan.tables[plan.main] = table
    return plan


# --- public writers ---------------------------------------------------------------------------

_PLANNERS: dict[str, Callable[..., _Plan]] = {
    "nih": _plan_nih, "chexpert": _plan_chexpert, "vindr": _plan_vindr,
}  # fmt: skip


def _check_count(name: str, n: int) -> None:
    if int(n) < 1:
        raise DataError(f"synthetic {name}: need at least 1, got {n}")


def _write(plans: Sequence[_Plan], workers: int) -> list[pd.DataFrame]:
    _run_jobs([job for plan in plans for job in plan.jobs], workers)
    return [plan.write_tables() for plan in plans]  # tables last: they name finished images


def write_nih(
    root: str | os.PathLike, n_patients: int = 60, seed: int = 0, height: int = 224,
    width_range: tuple[int, int] = (192, 256), min_positives: int = 2, workers: int = 1,
) -> pd.DataFrame:  # fmt: skip
    """Write an NIH ChestX-ray14 download at `root`; returns Data_Entry_2017_v2020.csv."""
    _check_count("NIH patients", n_patients)
    plan = _plan_nih(Path(root), n_patients, seed, height, tuple(width_range), min_positives)
    return _write([plan], workers)[0]


def write_chexpert(
    root: str | os.PathLike, n_patients: int = 70, seed: int = 0, height: int = 224,
    width_range: tuple[int, int] = (192, 256), min_positives: int = 2, workers: int = 1,
) -> pd.DataFrame:  # fmt: skip
    """Write a CheXpert-v1.0-small folder at `root`; returns train.csv (valid.csv beside it)."""
    _check_count("CheXpert patients", n_patients)
    plan = _plan_chexpert(Path(root), n_patients, seed, height, tuple(width_range), min_positives)
    return _write([plan], workers)[0]


def write_vindr(
    root: str | os.PathLike, n_images: int = 90, seed: int = 0, height: int = 224,
    width_range: tuple[int, int] = (192, 256), min_positives: int = 2, workers: int = 1,
) -> pd.DataFrame:  # fmt: skip
    """Write a VinBigData (VinDr-CXR) download at `root`; returns the annotations (train.csv)."""
    _check_count("VinDr images", n_images)
    plan = _plan_vindr(Path(root), n_images, seed, height, tuple(width_range), min_positives)
    return _write([plan], workers)[0]


def write_external(
    out: str | os.PathLike, params: Mapping | ExternalSynthConfig | None = None
) -> dict[str, pd.DataFrame]:
    """Write the three sources under `<out>/nih`, `<out>/chexpert`, `<out>/vindr`.

    `params`: the `synth.external` mapping (see `ExternalSynthConfig`) or a config. All images
    of the three sources are rendered in one process pool. Returns each source's main table
    (NIH Data_Entry, CheXpert train.csv, VinDr annotations) for the sources written.
    """
    if isinstance(params, ExternalSynthConfig):
        cfg = params
        cfg.check()
    else:
        cfg = ExternalSynthConfig.from_params(params or {})
    out = Path(out)
    plans = {
        name: _PLANNERS[name](out / name, getattr(cfg, name), cfg.seed, cfg.height,
                              cfg.width_range, cfg.min_positives)
        for name in SOURCES
        if getattr(cfg, name) > 0
    }  # fmt: skip
    tables = _write(list(plans.values()), cfg.workers)
    return dict(zip(plans, tables, strict=True))
