"""prepare: CXR-LT CSVs -> manifest; labels by name, patient-level split, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlt.data.manifest import label_matrix, validate_manifest
from cxrlt.data.mimic import read_cxrlt
from cxrlt.data.splits import iterative_stratification, patient_val_split
from cxrlt.errors import DataError
from cxrlt.labels import TASK1_CLASSES, TASK2_CLASSES, TASK3_CLASSES

CLASSES = list(TASK1_CLASSES)


def _copy(tiny_synth: Path, tmp_path: Path) -> tuple[Path, Path]:
    labels = tmp_path / "cxr-lt-2024"
    shutil.copytree(tiny_synth / "cxr-lt-2024", labels)
    return labels, tiny_synth / "mimic-cxr-jpg"


@pytest.fixture(scope="module")
def manifest(tiny_synth: Path) -> pd.DataFrame:
    df = read_cxrlt(tiny_synth / "cxr-lt-2024", tiny_synth / "mimic-cxr-jpg", "task1")
    df["split"] = patient_val_split(df, CLASSES, 0.2, seed=0)
    return df


def test_manifest_contract(manifest: pd.DataFrame):
    validate_manifest(manifest, CLASSES, "manifest")
    assert set(manifest["split"]) == {"train", "val", "dev", "test"}
    assert set(manifest["view"]) <= {"frontal", "lateral", "unknown"}
    assert all(Path(p).is_file() for p in manifest["path"])


def test_no_patient_in_two_splits(manifest: pd.DataFrame):
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1
    studies = manifest.groupby("study_id")["split"].nunique()
    assert studies.max() == 1


def test_val_split_is_stratified(manifest: pd.DataFrame):
    y = label_matrix(manifest[manifest["split"] == "val"], CLASSES)
    # Every class with >= 2 positive training patients reaches val.
    train_like = manifest[manifest["split"].isin(["train", "val"])]
    pos_patients = (train_like[CLASSES] == 1).groupby(train_like["patient_id"]).any().sum()
    need = pos_patients[pos_patients >= 5].index
    assert (np.nansum(y[:, [CLASSES.index(c) for c in need]], axis=0) > 0).all()


def test_labels_selected_by_name(tiny_synth: Path, tmp_path: Path):
    labels, images = _copy(tiny_synth, tmp_path)
    ref = read_cxrlt(labels, images, "task1")
    for name in ("train_labeled.csv", "development_labeled_task1.csv", "test_labeled_task1.csv"):
        df = pd.read_csv(labels / name)
        cols = list(df.columns)
        df[cols[::-1]].to_csv(labels / name, index=False)  # every column moved
    permuted = read_cxrlt(labels, images, "task1")
    pd.testing.assert_frame_equal(ref, permuted)


def test_task2_dev_file_with_swapped_columns(tiny_synth: Path):
    df = read_cxrlt(tiny_synth / "cxr-lt-2024", tiny_synth / "mimic-cxr-jpg", "task2")
    raw = pd.read_csv(tiny_synth / "cxr-lt-2024" / "development_labeled_task2.csv", dtype={"dicom_id": str})
    dev = df[df["split"] == "dev"].set_index("image_id").loc[raw["dicom_id"]]
    for c in ("Normal", "Nodule"):
        assert (dev[c].to_numpy() == raw[c].to_numpy()).all()
    assert set(TASK2_CLASSES) <= set(df.columns) and "Adenopathy" not in df.columns


def test_task3_columns_unknown_in_train(tiny_synth: Path):
    df = read_cxrlt(tiny_synth / "cxr-lt-2024", tiny_synth / "mimic-cxr-jpg", "task3")
    train = df[df["split"] == "train"]
    assert train[list(TASK3_CLASSES)].isna().all().all()
    assert df.loc[df["split"] == "test", list(TASK3_CLASSES)].notna().all().all()


def test_missing_column_names_file_and_column(tiny_synth: Path, tmp_path: Path):
    labels, images = _copy(tiny_synth, tmp_path)
    df = pd.read_csv(labels / "test_labeled_task1.csv")
    df.drop(columns=["Hernia"]).to_csv(labels / "test_labeled_task1.csv", index=False)
    with pytest.raises(DataError, match=r"test_labeled_task1\.csv: missing columns \['Hernia'\]"):
        read_cxrlt(labels, images, "task1")


def test_duplicate_id_names_the_line(tiny_synth: Path, tmp_path: Path):
    labels, images = _copy(tiny_synth, tmp_path)
    df = pd.read_csv(labels / "train_labeled.csv")
    pd.concat([df, df.iloc[[3]]]).to_csv(labels / "train_labeled.csv", index=False)
    with pytest.raises(DataError, match=rf"train_labeled\.csv: line {len(df) + 2} repeats dicom_id"):
        read_cxrlt(labels, images, "task1")


def test_bad_label_value_names_line_and_column(tiny_synth: Path, tmp_path: Path):
    labels, images = _copy(tiny_synth, tmp_path)
    df = pd.read_csv(labels / "development_labeled_task1.csv")
    df["Edema"] = df["Edema"].astype(object)
    df.loc[1, "Edema"] = "yes"
    df.to_csv(labels / "development_labeled_task1.csv", index=False)
    with pytest.raises(DataError, match=r"line 3 column 'Edema' holds 'yes'"):
        read_cxrlt(labels, images, "task1")


def test_missing_image_names_the_id(tiny_synth: Path, tmp_path: Path):
    labels, _ = _copy(tiny_synth, tmp_path)
    images = tmp_path / "mimic"
    shutil.copytree(tiny_synth / "mimic-cxr-jpg", images)
    first = pd.read_csv(labels / "train_labeled.csv").iloc[0]
    (images / first["fpath"]).unlink()
    with pytest.raises(DataError, match=f"dicom_id '{first['dicom_id']}' not found"):
        read_cxrlt(labels, images, "task1")
    read_cxrlt(labels, images, "task1", check_files=False)


def test_wrong_root(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_cxrlt(tmp_path / "nope", tmp_path, "task1")


def test_iterative_stratification_balances_rare_labels():
    rng = np.random.default_rng(0)
    y = rng.random((2000, 6)) < np.array([0.4, 0.2, 0.05, 0.01, 0.005, 0.003])
    fold = iterative_stratification(y, [0.8, 0.2], np.random.default_rng(1))
    assert abs((fold == 1).mean() - 0.2) < 0.01
    share = y[fold == 1].sum(axis=0) / y.sum(axis=0)
    assert np.all(np.abs(share - 0.2) < 0.12), share


def test_cxrlt2023_files_with_no_finding_and_unlabelled_test(tiny_synth: Path, tmp_path: Path):
    """The 2023 release: train/development/test.csv, "No Finding"; test labels may be absent."""
    from cxrlt.labels import TASK2023_CLASSES

    labels = tmp_path / "cxr-lt-2023"
    labels.mkdir()
    src = tiny_synth / "cxr-lt-2024"
    for split, name in (("train", "train_labeled_26.csv"), ("development", "development_labeled_task2.csv"),
                        ("test", "test_labeled_task2.csv")):
        df = pd.read_csv(src / name).rename(columns={"Normal": "No Finding"})
        if split == "test":
            df = df.drop(columns=list(TASK2023_CLASSES))
        df.to_csv(labels / f"{split}.csv", index=False)
    m = read_cxrlt(labels, tiny_synth / "mimic-cxr-jpg", "cxrlt2023")
    assert list(m.columns[-len(TASK2023_CLASSES):]) == list(TASK2023_CLASSES)
    assert m.loc[m["split"] == "test", list(TASK2023_CLASSES)].isna().all().all()
    assert m.loc[m["split"] == "train", "No Finding"].sum() > 0
    with pytest.raises(DataError, match="unknown splits"):
        read_cxrlt(labels, tiny_synth / "mimic-cxr-jpg", "cxrlt2023", files={"valid": "x.csv"})


def test_empty_or_unlabelled_files(tiny_synth: Path, tmp_path: Path):
    """An empty file is one error naming it; a label-less test file gives unknown labels."""
    labels, images = _copy(tiny_synth, tmp_path)
    test = pd.read_csv(labels / "test_labeled_task1.csv")
    test.drop(columns=CLASSES).to_csv(labels / "test_labeled_task1.csv", index=False)
    m = read_cxrlt(labels, images, "task1")
    assert (m["split"] == "test").sum() == len(test)
    assert m.loc[m["split"] == "test", CLASSES].isna().all().all()
    assert m.loc[m["split"] == "dev", CLASSES].notna().all().all()
    m["split"] = patient_val_split(m, CLASSES, 0.2, seed=0)
    validate_manifest(m, CLASSES, "manifest")
    (labels / "development_labeled_task1.csv").write_text("")
    with pytest.raises(DataError, match=r"development_labeled_task1\.csv: cannot parse CSV"):
        read_cxrlt(labels, images, "task1")
