"""The built-in dataset: real layout, real columns, long tail, co-occurrence, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxrlt.labels import TASK1_CLASSES, TASK2_CLASSES, TASK3_CLASSES
from cxrlt.synth.mimic import META, SynthConfig, make_metadata


def test_files_in_the_real_layout(tiny_synth: Path):
    labels = tiny_synth / "cxr-lt-2024"
    names = sorted(p.name for p in labels.iterdir())
    assert names == sorted([
        "train_labeled.csv", "train_labeled_26.csv",
        *(f"{s}_labeled_task{t}.csv" for s in ("development", "test") for t in (1, 2, 3)),
    ])  # fmt: skip
    train = pd.read_csv(labels / "train_labeled.csv")
    assert list(train.columns) == META + list(TASK1_CLASSES)
    for fpath in train["fpath"].head(20):
        parts = Path(fpath).parts
        assert parts[0] == "files" and parts[1].startswith("p1") and len(parts[1]) == 3
        assert parts[2].startswith("p") and parts[3].startswith("s") and parts[4].endswith(".jpg")
        with Image.open(tiny_synth / "mimic-cxr-jpg" / fpath) as im:
            assert im.format == "JPEG" and im.mode == "L"
    row = train.iloc[0]
    assert Path(row["fpath"]).parts[2] == f"p{row['subject_id']}"
    assert Path(row["fpath"]).stem == row["dicom_id"]


def test_task_files_columns(tiny_synth: Path):
    labels = tiny_synth / "cxr-lt-2024"
    t3 = pd.read_csv(labels / "test_labeled_task3.csv")
    assert list(t3.columns) == META + list(TASK3_CLASSES)
    train = pd.read_csv(labels / "train_labeled.csv")
    assert not set(TASK3_CLASSES) & set(train.columns)
    dev2 = pd.read_csv(labels / "development_labeled_task2.csv")
    cols = list(dev2.columns[len(META):])
    assert set(cols) == set(TASK2_CLASSES)
    # The official task-2 development file orders Normal before Nodule: keep the trap.
    assert cols.index("Normal") < cols.index("Nodule")


def test_label_statistics_follow_the_real_long_tail():
    meta = make_metadata(SynthConfig(n_patients=700, seed=1))
    y = meta[list(TASK1_CLASSES)].to_numpy()
    counts = y.sum(axis=0)
    c = dict(zip(TASK1_CLASSES, counts, strict=True))
    assert c["Support Devices"] > c["Pneumothorax"] > c["Emphysema"] > c["Lobar Atelectasis"]
    for split, floor in SynthConfig().min_positives.items():
        ys = meta.loc[meta["split"] == split, list(TASK1_CLASSES) + list(TASK3_CLASSES)].to_numpy()
        assert (ys.sum(axis=0) >= floor).all(), split
    # Normal excludes every finding but Support Devices.
    normal = meta["Normal"] == 1
    others = [k for k in TASK1_CLASSES if k not in ("Normal", "Support Devices")]
    assert normal.any() and (meta.loc[normal, others].to_numpy().sum(axis=1) == 0).all()
    # Plausible co-occurrence: Pneumonia usually comes with Lung Opacity.
    pn = meta["Pneumonia"] == 1
    assert meta.loc[pn, "Lung Opacity"].mean() > 0.6 > meta.loc[~pn, "Lung Opacity"].mean()


def test_studies_and_patients():
    meta = make_metadata(SynthConfig(n_patients=300, seed=2))
    views = meta.groupby("study_id").size()
    assert views.min() >= 1 and views.max() <= 4 and (views == 2).any() and (views == 1).any()
    assert (meta.groupby("subject_id")["study_id"].nunique() > 1).mean() > 0.5
    assert meta.groupby("subject_id")["split"].nunique().max() == 1
    labels_per_study = meta.groupby("study_id")[list(TASK1_CLASSES)].nunique()
    assert (labels_per_study.to_numpy() == 1).all()  # labels are study-level
    codes = set(meta["ViewPosition"].dropna())
    assert {"AP", "PA", "LATERAL"} <= codes and meta["ViewPosition"].isna().any()


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path: Path):
    from cxrlt.synth.mimic import write_dataset

    cfg = SynthConfig(n_patients=8, seed=5, height=64, width_range=(56, 72), workers=1,
                      min_positives={"train": 1})
    write_dataset(tmp_path / "a", cfg)
    write_dataset(tmp_path / "b", SynthConfig(**{**cfg.__dict__, "workers": 2}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    write_dataset(tmp_path / "c", SynthConfig(**{**cfg.__dict__, "seed": 6}))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_findings_are_drawn(tiny_synth: Path):
    """Images of studies with a head finding differ on average from Normal ones."""
    train = pd.read_csv(tiny_synth / "cxr-lt-2024" / "train_labeled.csv")
    train = train[train["ViewPosition"].isin(["AP", "PA"])]

    def mean_image(rows: pd.DataFrame) -> np.ndarray:
        imgs = []
        for f in rows["fpath"]:
            with Image.open(tiny_synth / "mimic-cxr-jpg" / f) as im:
                imgs.append(np.asarray(im.resize((64, 64)), dtype=float))
        return np.mean(imgs, axis=0)

    normal = mean_image(train[train["Normal"] == 1])
    effusion = mean_image(train[train["Pleural Effusion"] == 1])
    # Effusion fills the lung bases: the lower half gets brighter than in Normal studies.
    assert effusion[40:56].mean() > normal[40:56].mean()


def test_prevalence_floor_lifts_the_rarest_findings_but_keeps_them_in_the_tail():
    from cxrlt.synth.mimic import _sample_study_labels

    classes = list(TASK1_CLASSES)
    plain = _sample_study_labels(np.random.default_rng(0), 100_000)[:, : len(classes)].mean(0)
    floored = _sample_study_labels(np.random.default_rng(0), 100_000, 0.005)[:, : len(classes)]
    floored = floored.mean(0)
    rare = classes.index("Lobar Atelectasis")  # 126 of 258,871 real training images
    assert plain[rare] < 0.002
    findings = [i for i, c in enumerate(classes) if c != "Normal"]
    assert floored[findings].min() > 0.004  # sampling SD at n = 100,000 is ~0.0002
    assert floored[rare] < 0.01  # still a tail class (< 1 %)
    head = classes.index("Cardiomegaly")
    assert abs(floored[head] - plain[head]) < 0.01  # frequent classes untouched


def test_severity_is_shared_by_the_views_of_a_study_and_varies_between_studies():
    from cxrlt.synth.mimic import SEVERITY_RANGE, study_severity

    cfg = SynthConfig(n_patients=60, seed=3)
    meta = make_metadata(cfg)
    sev = study_severity(meta, cfg)
    assert sev.shape == (len(meta), len(TASK1_CLASSES) + len(TASK3_CLASSES))
    assert SEVERITY_RANGE[0] <= sev.min() and sev.max() <= SEVERITY_RANGE[1]
    per_study = pd.DataFrame(sev).groupby(meta["study_id"].to_numpy()).nunique()
    assert (per_study == 1).all().all()  # every view of a study: one value per finding
    assert np.unique(sev[:, 0]).size > 10  # different studies: different strengths
    assert np.array_equal(sev, study_severity(meta, cfg))  # deterministic
    flat = study_severity(meta, SynthConfig(n_patients=60, seed=3, severity_sd=0.0))
    assert np.all(flat == 1.0)
