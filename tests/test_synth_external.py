"""The built-in NIH / CheXpert / VinDr sources: official layouts, read back by the real adapters.

One tiny set of the three sources is written per module; the adapters read it with
check_files=True, the VinDr DICOMs are converted, the three manifests are cached.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from png_chunks import png_chunks

from cxrlt.data.cache import ImageCache, build_cache
from cxrlt.data.chexpert import CHEXPERT_LABELS, read_chexpert
from cxrlt.data.dicom import convert_dicoms
from cxrlt.data.harmonise import DROPPED_LABELS, LABEL_MAP, source_label_names
from cxrlt.data.manifest import META_COLUMNS, label_matrix, validate_manifest
from cxrlt.data.nih import read_nih
from cxrlt.data.splits import patient_val_split
from cxrlt.data.vindr import dicom_paths, read_vindr
from cxrlt.errors import DataError
from cxrlt.labels import TASK1_CLASSES
from cxrlt.synth.anatomy import sample_anatomy
from cxrlt.synth.external import (
    CHEXPERT_VALUES,
    NIH_PREVALENCE,
    RENDER_PROXY,
    VINDR_CLASS_ID,
    VINDR_PREVALENCE,
    ExternalSynthConfig,
    _plan_vindr,
    write_external,
    write_nih,
    write_vindr,
)
from cxrlt.synth.findings import FINDINGS
from cxrlt.synth.render import render

CLASSES = list(TASK1_CLASSES)
TINY = {"nih": 8, "chexpert": 10, "vindr": 16, "seed": 5, "height": 64, "width_range": [56, 72],
        "min_positives": 2, "workers": 1}  # fmt: skip
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


@pytest.fixture(scope="module")
def ext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("external")
    tables = write_external(out, TINY)
    assert set(tables) == {"nih", "chexpert", "vindr"}
    return out


@pytest.fixture(scope="module")
def vindr_png(ext: Path) -> Path:
    png = ext / "vindr_png"
    ids = pd.read_csv(ext / "vindr" / "train.csv")["image_id"].unique()
    report = convert_dicoms(dicom_paths(ext / "vindr", ids), png, workers=1, progress=False)
    assert len(report.converted) == len(ids) and not report.failed
    return png


@pytest.fixture(scope="module")
def manifests(ext: Path, vindr_png: Path) -> dict[str, pd.DataFrame]:
    return {
        "nih": read_nih(ext / "nih", CLASSES, check_files=True),
        "chexpert": read_chexpert(ext / "chexpert", CLASSES, check_files=True),
        "vindr": read_vindr(
            ext / "vindr", CLASSES, "majority", check_files=True, png_root=vindr_png
        ),
    }


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


# --- tables and constants --------------------------------------------------------------------


def test_label_tables_cover_each_source_and_draw_known_findings() -> None:
    assert set(NIH_PREVALENCE) == set(source_label_names("nih"))
    assert set(CHEXPERT_VALUES) == set(CHEXPERT_LABELS)
    assert set(VINDR_PREVALENCE) == set(VINDR_CLASS_ID) == set(source_label_names("vindr"))
    assert set(RENDER_PROXY) == set(DROPPED_LABELS["vindr"])
    drawable = set(FINDINGS)
    for source, table in LABEL_MAP.items():
        for targets in table.values():
            assert {t for t in targets if t != "Normal"} <= drawable, source
    assert set(RENDER_PROXY.values()) <= drawable
    for p1, pu, p0, pb in CHEXPERT_VALUES.values():
        assert abs(p1 + pu + p0 + pb - 1.0) < 0.01


def test_config_rejects_unknown_keys_and_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown keys"):
        ExternalSynthConfig.from_params({"nhi": 3})
    with pytest.raises(DataError, match="at least 32"):
        ExternalSynthConfig.from_params({"height": 8})
    with pytest.raises(DataError, match="at least 1"):
        write_nih(tmp_path, n_patients=0)
    # 0 skips a source.
    assert list(write_external(tmp_path, {**TINY, "nih": 0, "chexpert": 0, "vindr": 3})) == [
        "vindr"
    ]


# --- official layouts ------------------------------------------------------------------------


def test_nih_layout(ext: Path) -> None:
    root = ext / "nih"
    assert sorted(p.name for p in root.iterdir()) == [
        "Data_Entry_2017_v2020.csv", "images_001", "images_002", "test_list.txt", "train_val_list.txt",
    ]  # fmt: skip
    assert (root / "Data_Entry_2017_v2020.csv").read_text().splitlines()[0] == NIH_HEADER
    df = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    assert len(df.columns) == 11 and df["Image Index"].is_unique
    assert set(df["View Position"]) <= {"PA", "AP"} and set(df["Patient Gender"]) <= {"M", "F"}
    stems = df["Image Index"].str.slice(0, 8).astype(int)
    assert (stems == df["Patient ID"]).all()
    pngs = sorted(root.glob("images_00*/images/*.png"))
    assert sorted(p.name for p in pngs) == sorted(df["Image Index"])
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.mode == "L" and im.height == TINY["height"]
    train = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(df["Image Index"]) and train and test
    pid = dict(zip(df["Image Index"], df["Patient ID"], strict=True))
    assert not {pid[i] for i in train} & {pid[i] for i in test}


def test_chexpert_layout_and_label_values(ext: Path) -> None:
    root = ext / "chexpert"
    train = pd.read_csv(root / "train.csv")
    valid = pd.read_csv(root / "valid.csv")
    assert list(train.columns) == [
        "Path",
        "Sex",
        "Age",
        "Frontal/Lateral",
        "AP/PA",
        *CHEXPERT_LABELS,
    ]
    assert list(valid.columns) == list(train.columns)
    for df, part in ((train, "train"), (valid, "valid")):
        assert (
            df["Path"]
            .str.match(
                rf"CheXpert-v1\.0-small/{part}/patient\d{{5}}/study\d+/view\d_(frontal|lateral)\.jpg$"
            )
            .all()
        )
        for rel in df["Path"]:
            assert (root / rel.split("/", 1)[1]).is_file()
    assert set(train["Frontal/Lateral"]) == {"Frontal", "Lateral"}
    lateral = train["Frontal/Lateral"] == "Lateral"
    assert (
        train.loc[lateral, "AP/PA"].isna().all()
        and train.loc[~lateral, "AP/PA"].isin(["AP", "PA"]).all()
    )
    y = train[list(CHEXPERT_LABELS)].to_numpy()
    assert set(np.unique(y[~np.isnan(y)])) == {-1.0, 0.0, 1.0} and np.isnan(y).any()
    assert set(train["No Finding"].dropna()) == {1.0}
    # No Finding and a positive or uncertain pathology never coexist (Support Devices aside).
    pathology = [c for c in CHEXPERT_LABELS if c not in ("No Finding", "Support Devices")]
    normal = train["No Finding"] == 1
    assert not train.loc[normal, pathology].isin([1.0, -1.0]).any().any()
    assert train.loc[~normal, pathology].isin([1.0, -1.0]).any(axis=1).all()
    v = valid[list(CHEXPERT_LABELS)].to_numpy()
    assert set(np.unique(v)) <= {0.0, 1.0}
    patients = lambda df: set(df["Path"].str.split("/").str[2])  # noqa: E731
    assert not patients(train) & patients(valid)


def test_vindr_layout_readers_and_dicoms(ext: Path) -> None:
    root = ext / "vindr"
    ann = pd.read_csv(root / "train.csv")
    assert list(ann.columns) == ["image_id", "class_name", "class_id", "rad_id",
                                 "x_min", "y_min", "x_max", "y_max"]  # fmt: skip
    assert ann["image_id"].nunique() == TINY["vindr"]
    assert (ann.groupby("image_id")["rad_id"].nunique() == 3).all()
    assert (ann["class_name"].map(VINDR_CLASS_ID) == ann["class_id"]).all()
    nf = ann["class_name"] == "No finding"
    boxes = ann[["x_min", "y_min", "x_max", "y_max"]]
    assert boxes[nf].isna().all().all() and boxes[~nf].notna().all().all()
    assert (
        (ann.loc[~nf, "x_max"] > ann.loc[~nf, "x_min"])
        & (ann.loc[~nf, "y_max"] > ann.loc[~nf, "y_min"])
    ).all()
    # Readers disagree: some (image, class) was marked by one or two of the three readers.
    votes = ann[~nf].groupby(["image_id", "class_name"])["rad_id"].nunique()
    assert votes.isin([1, 2]).any() and (votes == 3).any()
    files = sorted((root / "train").iterdir())
    assert sorted(p.stem for p in files) == sorted(ann["image_id"].unique())
    assert {p.suffix for p in files} == {".dicom"}
    seen = {"mono1": 0, "rescale": 0, "window": 0}
    bits = set()
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.Modality == "DX" and ds.BitsAllocated == 16 and ds.file_meta.TransferSyntaxUID
        assert str(ds.PatientName).startswith("SYNTH^VINDR") and ds.PatientID.startswith("SYNVD")
        assert ds.pixel_array.max() < 2**ds.BitsStored
        width = ds.Columns
        rows = ann[(ann["image_id"] == path.stem) & ~nf]
        assert (rows["x_max"] <= width).all() and (rows["y_max"] <= ds.Rows).all()
        bits.add(int(ds.BitsStored))
        seen["mono1"] += ds.PhotometricInterpretation == "MONOCHROME1"
        seen["rescale"] += "RescaleSlope" in ds
        seen["window"] += "WindowCenter" in ds
    assert 12 in bits and all(seen.values()) and all(v < len(files) for v in seen.values())


# --- adapters, splits, conversion, cache ------------------------------------------------------


def test_adapters_read_the_synthetic_sources(ext: Path, manifests: dict[str, pd.DataFrame]) -> None:
    nih, chexpert, vindr = manifests["nih"], manifests["chexpert"], manifests["vindr"]
    entries = pd.read_csv(ext / "nih" / "Data_Entry_2017_v2020.csv")
    assert len(nih) == len(entries) and nih["patient_id"].nunique() == TINY["nih"]
    train = pd.read_csv(ext / "chexpert" / "train.csv")
    valid = pd.read_csv(ext / "chexpert" / "valid.csv")
    assert (
        len(chexpert) == len(train) + len(valid)
        and chexpert["patient_id"].nunique() == TINY["chexpert"]
    )
    assert set(chexpert["view"]) == {"frontal", "lateral"}
    assert len(vindr) == TINY["vindr"] == vindr["patient_id"].nunique()
    for name, df in manifests.items():
        assert list(df.columns) == [*META_COLUMNS, *CLASSES]
        y = label_matrix(df, CLASSES)
        annotated = {t for targets in LABEL_MAP[name].values() for t in targets}
        for j, c in enumerate(CLASSES):
            if c not in annotated:
                assert np.isnan(y[:, j]).all(), (name, c)  # not annotated: unknown, not negative
        # Every annotated class has positives (the writers' floor).
        for c in annotated:
            assert np.nansum(y[:, CLASSES.index(c)]) >= 1, (name, c)
    # NIH and VinDr are fully observed where annotated; CheXpert's uncertain rows are unknown.
    nih_cols = [c for c in CLASSES if c in {t for v in LABEL_MAP["nih"].values() for t in v}]
    assert not nih[nih_cols].isna().any().any()
    assert (nih["Normal"] == (entries["Finding Labels"] == "No Finding").to_numpy()).all()
    uncertain = (train["Atelectasis"] == -1).to_numpy()
    rows = chexpert.iloc[: len(train)]
    assert uncertain.any() and rows.loc[uncertain, "Atelectasis"].isna().all()
    ones = read_chexpert(ext / "chexpert", CLASSES, uncertain="ones", check_files=False)
    assert (ones.iloc[: len(train)].loc[uncertain, "Atelectasis"] == 1).all()
    test_patients = set(chexpert.loc[chexpert["split"] == "test", "patient_id"])
    assert test_patients == set(valid["Path"].str.split("/").str[2])  # valid.csv -> "test"


def test_reader_aggregation_on_the_synthetic_readers(
    ext: Path, manifests: dict[str, pd.DataFrame]
) -> None:
    ann = pd.read_csv(ext / "vindr" / "train.csv")
    any_ = read_vindr(ext / "vindr", CLASSES, "any", check_files=True).set_index("image_id")
    maj = manifests["vindr"].set_index("image_id")
    for vindr_label, target in (
        ("Cardiomegaly", "Cardiomegaly"),
        ("Pleural effusion", "Pleural Effusion"),
    ):
        votes = ann[ann["class_name"] == vindr_label].groupby("image_id")["rad_id"].nunique()
        votes = votes.reindex(maj.index, fill_value=0)
        assert (maj[target] == (votes >= 2)).all() and (any_[target] == (votes >= 1)).all()
    nodule_mass = ann[ann["class_name"] == "Nodule/Mass"].groupby("image_id")["rad_id"].nunique()
    pos = nodule_mass[nodule_mass >= 2].index
    assert len(pos) and (maj.loc[pos, ["Nodule", "Mass"]] == 1).all().all()
    findings = [c for c in CLASSES if c != "Normal" and not maj[c].isna().all()]
    assert (maj[findings] <= any_[findings]).all().all()
    assert (maj[findings] != any_[findings]).any().any()  # the policies differ on this set


def test_patient_level_val_split_on_nan_labels(manifests: dict[str, pd.DataFrame]) -> None:
    for name, df in manifests.items():
        split = patient_val_split(df, CLASSES, 0.25, seed=0)
        assert (split[df["split"] != "train"] == df.loc[df["split"] != "train", "split"]).all()
        assert (split == "val").any() and (split == "train").any(), name
        out = df.assign(split=split)
        validate_manifest(out, CLASSES, name)  # raises on a patient in two splits
        assert (out.groupby("patient_id")["split"].nunique() == 1).all()
        again = patient_val_split(df, CLASSES, 0.25, seed=0)
        assert (again == split).all()


def test_converted_vindr_pngs_match_the_drawing_and_carry_no_patient_data(
    ext: Path, vindr_png: Path
) -> None:
    cfg = ExternalSynthConfig.from_params(TINY)
    plan = _plan_vindr(
        ext / "vindr", cfg.vindr, cfg.seed, cfg.height, cfg.width_range, cfg.min_positives
    )
    for job in plan.jobs:
        png = vindr_png / f"{Path(job.path).stem}.png"
        assert set(png_chunks(png)) == {b"IHDR", b"IDAT", b"IEND"}
        raw = png.read_bytes()
        assert (
            job.dicom.patient_name.encode() not in raw and job.dicom.patient_id.encode() not in raw
        )
        with Image.open(png) as im:
            assert im.mode.startswith("I;16") and im.size == (job.width, job.height)
            out = np.asarray(im, dtype=np.float64)
        anatomy = sample_anatomy(np.random.default_rng(job.patient_seed))
        drawn = render(job.findings, job.view, anatomy,
                       np.random.default_rng(job.image_seed), job.height, job.width)  # fmt: skip
        # MONOCHROME1 inverted back, rescale and window applied: the drawing comes back.
        assert np.corrcoef(out.ravel(), drawn.ravel())[0, 1] > 0.99, job.dicom
        clipped = np.mean((out == 0) | (out == 65535))
        if job.dicom.window:  # the window spans 0.5-99.5 %: about 1 % of pixels saturate
            assert clipped > 0.005, job.dicom
        else:
            assert clipped < 0.005, job.dicom


def test_caches_of_the_three_manifests(tmp_path: Path, manifests: dict[str, pd.DataFrame]) -> None:
    for name, df in manifests.items():
        report = build_cache(df, tmp_path / name, 32, workers=1, progress=False,
                             partial_dir=tmp_path / "partial")  # fmt: skip
        assert report.n_images == len(df) and not report.failed
        cache = ImageCache(tmp_path / name)
        images = cache.read(cache.rows(df["image_id"]))
        assert images.shape == (len(df), 32, 32)
        assert (images.reshape(len(df), -1).std(axis=1) > 5).all(), name  # real pictures


def test_deterministic_for_a_seed_whatever_the_worker_count(tmp_path: Path, ext: Path) -> None:
    kw = {k: TINY[k] for k in ("seed", "height", "width_range", "min_positives")}
    write_nih(tmp_path / "nih", TINY["nih"], workers=2, **kw)
    write_vindr(tmp_path / "vindr", TINY["vindr"], workers=2, **kw)
    assert _tree(tmp_path / "nih") == _tree(ext / "nih")
    assert _tree(tmp_path / "vindr") == _tree(ext / "vindr")
    other = write_nih(tmp_path / "other", TINY["nih"], workers=1, **{**kw, "seed": 6})
    assert not other.equals(pd.read_csv(ext / "nih" / "Data_Entry_2017_v2020.csv"))
