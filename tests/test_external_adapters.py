"""External-source adapters (NIH, CheXpert, VinDr) and label harmonisation.

The real metadata that torchxrayvision ships is laid out as the official downloads (images
absent, so check_files=False) and the official facts are pinned; tiny hand-made files check
the error messages.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrlt.data.chexpert import CHEXPERT_LABELS, apply_policies, read_chexpert, read_chexpert_raw
from cxrlt.data.harmonise import DROPPED_LABELS, LABEL_MAP, mapping_table, relabel
from cxrlt.data.manifest import META_COLUMNS, validate_manifest
from cxrlt.data.nih import read_nih
from cxrlt.data.vindr import dicom_paths, read_vindr
from cxrlt.errors import DataError
from cxrlt.labels import TASK1_CLASSES, TASK2_CLASSES, TASK3_CLASSES

CLASSES = TASK1_CLASSES


# --- real metadata shipped by torchxrayvision ----------------------------------------------


@pytest.fixture(scope="module")
def xrv_data() -> Path:
    # find_spec, not importorskip: importing torchxrayvision imports torch (seconds).
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision (real metadata copies) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _gunzip(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


@pytest.fixture(scope="module")
def nih_root(xrv_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nih")
    _gunzip(xrv_data / "Data_Entry_2017_v2020.csv.gz", root / "Data_Entry_2017_v2020.csv")
    # The official lists are not shipped; write patient-level ones of the same format.
    df = pd.read_csv(root / "Data_Entry_2017_v2020.csv", usecols=["Image Index", "Patient ID"])
    test = df["Patient ID"] % 4 == 0
    (root / "test_list.txt").write_text("\n".join(df.loc[test, "Image Index"]) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(df.loc[~test, "Image Index"]) + "\n")
    return root


@pytest.fixture(scope="module")
def nih(nih_root: Path) -> pd.DataFrame:
    return read_nih(nih_root, CLASSES, check_files=False)


def test_nih_official_counts(nih: pd.DataFrame) -> None:
    assert list(nih.columns) == [*META_COLUMNS, *CLASSES]
    assert len(nih) == 112_120
    assert nih["patient_id"].nunique() == 30_805
    assert nih["study_id"].nunique() == 112_120
    assert (nih["source"] == "nih").all()
    assert nih["view_position"].value_counts().to_dict() == {"PA": 67_310, "AP": 44_810}
    assert (nih["view"] == "frontal").all()
    # Official positives per finding (Data_Entry_2017_v2020.csv).
    positives = nih[["Normal", "Pleural Effusion", "Infiltration", "Pleural Thickening", "Hernia"]]
    assert positives.sum().astype(int).to_dict() == {
        "Normal": 60_361, "Pleural Effusion": 13_317, "Infiltration": 19_894,
        "Pleural Thickening": 3_385, "Hernia": 227,
    }  # fmt: skip


def test_nih_labels_match_finding_labels(nih: pd.DataFrame, nih_root: Path) -> None:
    raw = pd.read_csv(nih_root / "Data_Entry_2017_v2020.csv").set_index("Image Index")
    row = nih.set_index("image_id")
    assert raw.loc["00000001_001.png", "Finding Labels"] == "Cardiomegaly|Emphysema"
    observed = [t for targets in LABEL_MAP["nih"].values() for t in targets]
    one = row.loc["00000001_001.png", observed]
    assert one[one == 1].index.tolist() == ["Cardiomegaly", "Emphysema"]
    assert (one.drop(["Cardiomegaly", "Emphysema"]) == 0).all()
    # Every row: the parsed positives are exactly the names in Finding Labels (renamed).
    rename = {k: v[0] for k, v in LABEL_MAP["nih"].items()}
    rng = np.random.default_rng(0)
    for image in rng.choice(row.index.to_numpy(), size=200, replace=False):
        names = {rename[n] for n in raw.loc[image, "Finding Labels"].split("|")}
        values = row.loc[image, observed]
        assert set(values[values == 1].index) == names, image
    # Fully observed for the NIH findings; every other CXR-LT class unknown, never 0.
    assert not nih[observed].isna().any().any()
    others = [c for c in CLASSES if c not in observed]
    assert others and nih[others].isna().all().all()
    assert nih.loc[nih["Normal"] == 1, [c for c in observed if c != "Normal"]].sum().sum() == 0


def test_nih_split_and_study_ids(nih: pd.DataFrame, nih_root: Path) -> None:
    test_list = set((nih_root / "test_list.txt").read_text().split())
    assert set(nih.loc[nih["split"] == "test", "image_id"]) == test_list
    assert set(nih["split"]) == {"train", "test"}
    assert nih.groupby("patient_id")["split"].nunique().max() == 1
    first = nih.set_index("image_id").loc["00000003_001.png"]
    # v2020 renumbered follow-ups: image 00000003_001 is follow-up 0 of patient 3.
    assert (first["patient_id"], first["study_id"]) == ("00000003", "00000003_000")
    assert first["path"] == str(nih_root / "images" / "00000003_001.png")


def test_nih_relabels_to_any_label_space(nih_root: Path) -> None:
    task3 = read_nih(nih_root, TASK3_CLASSES, check_files=False, official_split=False)
    assert list(task3.columns[len(META_COLUMNS) :]) == list(TASK3_CLASSES)
    assert task3[list(TASK3_CLASSES)].isna().all().all()
    assert (task3["split"] == "train").all()


@pytest.fixture(scope="module")
def chexpert_root(xrv_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    _gunzip(xrv_data / "chexpert_train.csv.gz", root / "train.csv")
    return root


@pytest.fixture(scope="module")
def chexpert_raw(chexpert_root: Path) -> pd.DataFrame:
    return read_chexpert_raw(chexpert_root)


def test_chexpert_raw_keeps_uncertain_and_blank_distinct(chexpert_raw: pd.DataFrame) -> None:
    assert len(chexpert_raw) == 223_414

    def counts(label: str) -> dict[str, int]:
        col = chexpert_raw[label]
        return {
            "blank": int(col.isna().sum()),
            **{str(v): int((col == v).sum()) for v in (-1, 0, 1)},
        }

    # Official CheXpert train.csv facts: uncertain (-1) and blank are separate values.
    assert counts("Atelectasis") == {"blank": 154_971, "-1": 33_739, "0": 1_328, "1": 33_376}
    assert counts("Pleural Other") == {"blank": 216_922, "-1": 2_653, "0": 316, "1": 3_523}
    assert counts("No Finding") == {"blank": 201_033, "-1": 0, "0": 0, "1": 22_381}


def test_chexpert_policies_give_different_matrices(chexpert_raw: pd.DataFrame) -> None:
    raw = chexpert_raw[list(CHEXPERT_LABELS)].to_numpy()
    unc, blank = raw == -1, np.isnan(raw)
    y = {
        u: apply_policies(chexpert_raw, uncertain=u).to_numpy() for u in ("ignore", "ones", "zeros")
    }
    assert np.isnan(y["ignore"]).sum() == unc.sum() and np.isnan(y["ignore"][unc]).all()
    assert (y["ones"][unc] == 1).all() and (y["zeros"][unc] == 0).all()
    for u in y:  # blank -> 0 (default), explicit values untouched
        assert (y[u][blank] == 0).all()
        assert np.array_equal(y[u][~unc & ~blank], raw[~unc & ~blank])
    j = CHEXPERT_LABELS.index("Atelectasis")
    assert int(np.nansum(y["ones"][:, j])) == 33_376 + 33_739
    # blank="ignore": blank stays unknown unless the labeller's rules imply it.
    ig = apply_policies(chexpert_raw, uncertain="ignore", blank="ignore").to_numpy()
    assert not np.array_equal(np.isnan(ig), np.isnan(y["ignore"]))
    normal = raw[:, CHEXPERT_LABELS.index("No Finding")] == 1
    k = CHEXPERT_LABELS.index("Pleural Other")
    assert (ig[normal & blank[:, k], k] == 0).all()
    assert np.isnan(ig[~normal & blank[:, k], k]).all()
    nf = CHEXPERT_LABELS.index("No Finding")
    assert int((ig[:, nf] == 0).sum()) > 0 and int(np.isnan(ig[:, nf]).sum()) == 17_514


def test_chexpert_manifest(chexpert_root: Path) -> None:
    df = read_chexpert(chexpert_root, TASK2_CLASSES, uncertain="ones", check_files=False)
    assert len(df) == 223_414
    assert df["patient_id"].nunique() == 64_540
    assert df["study_id"].nunique() == 187_641
    assert df["view"].value_counts().to_dict() == {"frontal": 191_027, "lateral": 32_387}
    first = df.iloc[0]
    assert first["image_id"] == "patient00001_study1_view1_frontal"
    assert (first["study_id"], first["patient_id"], first["view_position"]) == (
        "patient00001_study1", "patient00001", "AP",
    )  # fmt: skip
    assert first["path"] == str(chexpert_root / "train/patient00001/study1/view1_frontal.jpg")
    assert first["Normal"] == 1 and first["Support Devices"] == 1 and first["Pneumothorax"] == 0
    # CheXpert does not annotate these CXR-LT classes: unknown.
    assert df[["Nodule", "Mass", "Emphysema", "Hernia"]].isna().all().all()
    assert int(df["Atelectasis"].sum()) == 33_376 + 33_739


@pytest.fixture(scope="module")
def vindr_root(xrv_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vindr")
    _gunzip(xrv_data / "vinbigdata-train.csv.gz", root / "train.csv")
    return root


@pytest.mark.parametrize(
    ("policy", "nodule", "fibrosis"), [("any", 826, 1_617), ("majority", 405, 1_017)]
)
def test_vindr_aggregates_to_one_row_per_image(
    vindr_root: Path, policy: str, nodule: int, fibrosis: int
) -> None:
    assert len(pd.read_csv(vindr_root / "train.csv")) == 67_914
    df = read_vindr(vindr_root, CLASSES, reader_policy=policy, check_files=False)
    assert len(df) == 15_000 and df["image_id"].is_unique
    assert (df["patient_id"] == df["image_id"]).all() and (df["study_id"] == df["image_id"]).all()
    assert int(df["Normal"].sum()) == 10_606  # all three readers said "No finding"
    assert int(df["Nodule"].sum()) == nodule and df["Nodule"].equals(df["Mass"])
    assert int(df["Fibrosis"].sum()) == fibrosis
    findings = ["Atelectasis", "Cardiomegaly", "Nodule", "Fibrosis", "Pleural Effusion"]
    assert df.loc[df["Normal"] == 1, findings].sum().sum() == 0
    assert df[["Fracture", "Edema", "Enlarged Cardiomediastinum"]].isna().all().all()
    assert df.iloc[0]["path"] == str(vindr_root / "train_png" / f"{df.iloc[0]['image_id']}.png")


def test_vindr_reader_policies_on_a_real_image(vindr_root: Path) -> None:
    # 000d68e4...: R9 drew two Pleural thickening boxes (one reader, not two), R9 alone
    # marked Pulmonary fibrosis, R9 and R10 marked Lung Opacity; R8 only Other lesion.
    image = "000d68e42b71d3eac10ccc077aba07c1"
    cols = ["Pleural Thickening", "Fibrosis", "Lung Opacity", "Normal", "Cardiomegaly"]
    got = {
        p: read_vindr(vindr_root, CLASSES, reader_policy=p, check_files=False)
        .set_index("image_id")
        .loc[image, cols]
        .tolist()
        for p in ("any", "majority")
    }
    assert got == {"any": [1, 1, 1, 0, 0], "majority": [0, 0, 1, 0, 0]}


# --- harmonisation ---------------------------------------------------------------------------


def test_mapping_table_documents_every_source_label() -> None:
    table = mapping_table()
    assert list(table.columns[:3]) == ["source", "source_label", "target"]
    mapped = table.dropna(subset=["target"])
    assert set(mapped["target"]) <= set(TASK1_CLASSES)
    assert set(table.loc[table["source_label"] == "Nodule/Mass", "target"]) == {"Nodule", "Mass"}
    assert table.groupby("source")["source_label"].nunique().to_dict() == {
        "nih": 15, "chexpert": 14, "vindr": 15,
    }  # fmt: skip
    dropped = table[table["target"].isna()]
    assert set(dropped["source_label"]) == set(DROPPED_LABELS["vindr"])
    assert {"Aortic enlargement", "Calcification", "ILD", "Other lesion"} == set(
        DROPPED_LABELS["vindr"]
    )


def test_relabel_unknown_is_nan_and_many_to_one_takes_max(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LABEL_MAP["vindr"], "ILD", ("Fibrosis",))  # a hypothetical many-to-one
    nan = np.nan
    src = pd.DataFrame({
        "Pulmonary fibrosis": [1, 0, nan, nan, 0],
        "ILD": [0, nan, nan, 1, 1],
        "Nodule/Mass": [1, 0, nan, 0, 1],
    })  # fmt: skip
    out = relabel(src, "vindr", ["Fibrosis", "Mass", "Nodule", "Hernia"])
    np.testing.assert_array_equal(out["Fibrosis"], [1, 0, nan, 1, 1])
    np.testing.assert_array_equal(out["Nodule"], src["Nodule/Mass"])
    np.testing.assert_array_equal(out["Mass"], src["Nodule/Mass"])
    assert out["Hernia"].isna().all()  # VinDr does not annotate Hernia: unknown, not 0


def test_relabel_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="unknown source label columns \\['Efusion'\\]"):
        relabel(pd.DataFrame({"Efusion": [1]}), "nih", ["Pleural Effusion"])
    with pytest.raises(DataError, match="unknown source 'mimic'"):
        relabel(pd.DataFrame(), "mimic", ["Edema"])
    with pytest.raises(DataError, match="more than once"):
        relabel(pd.DataFrame({"Edema": [1]}), "nih", ["Edema", "Edema"])


# --- hand-made files: layouts and error messages ---------------------------------------------

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
)


def _nih(root: Path, rows: list[str], name: str = "Data_Entry_2017_v2020.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(NIH_HEADER + "".join(r + "\n" for r in rows))
    return root


NIH_ROWS = ["00000001_000.png,Cardiomegaly,0,1,57,M,PA", "00000002_000.png,No Finding,0,2,81,M,AP"]


def test_nih_kaggle_layout_finds_images_and_prefers_v2020(tmp_path: Path) -> None:
    root = _nih(tmp_path, NIH_ROWS)
    (root / "Data_Entry_2017.csv").write_text(NIH_HEADER + "x.png,Hernia,0,9,1,M,PA\n")
    for i, name in enumerate(["00000001_000.png", "00000002_000.png"]):
        folder = root / f"images_00{i + 1}" / "images"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"png")
    (root / "test_list.txt").write_text("00000002_000.png\n")
    (root / "train_val_list.txt").write_text("00000001_000.png\n")
    df = read_nih(root, ["Normal", "Cardiomegaly", "Hernia"]).set_index("image_id")
    assert df.loc["00000002_000.png", "path"] == str(root / "images_002/images/00000002_000.png")
    assert df["split"].to_dict() == {"00000001_000.png": "train", "00000002_000.png": "test"}
    assert df["Normal"].tolist() == [0, 1] and df["Cardiomegaly"].tolist() == [1, 0]


def test_nih_errors_name_the_file_line_and_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no NIH label file"):
        read_nih(tmp_path, CLASSES)
    root = _nih(
        tmp_path / "a", [*NIH_ROWS, "00000003_000.png,Cardiomegaly|Pneumonitis,0,3,40,F,PA"]
    )
    with pytest.raises(
        DataError, match="line 4 \\(00000003_000.png\\) has unknown finding 'Pneumonitis'"
    ):
        read_nih(root, CLASSES, check_files=False, official_split=False)
    root = _nih(tmp_path / "b", [*NIH_ROWS, NIH_ROWS[0]])
    with pytest.raises(
        DataError,
        match="Image Index '00000001_000.png' appears more than once \\(lines \\[2, 4\\]\\)",
    ):
        read_nih(root, CLASSES, check_files=False, official_split=False)
    root = tmp_path / "c"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID\nx.png,Hernia,1\n"
    )
    with pytest.raises(
        DataError, match=r"Data_Entry_2017.csv: missing columns \['Follow-up #', 'View Position'\]"
    ):
        read_nih(root, CLASSES, check_files=False)
    root = _nih(tmp_path / "d", NIH_ROWS)
    with pytest.raises(DataError, match="train_val_list.txt: official split list not found"):
        read_nih(root, CLASSES, check_files=False)
    (root / "images").mkdir()
    (root / "images" / "00000001_000.png").write_bytes(b"png")
    with pytest.raises(
        DataError, match=r"1 of 2 images .* missing on disk, e.g. \['00000002_000.png'\]"
    ):
        read_nih(root, CLASSES, official_split=False)
    root = _nih(tmp_path / "f", [*NIH_ROWS, "00000004_000.png,No Finding|Hernia,0,4,40,F,PA"])
    with pytest.raises(DataError, match="line 4 .* lists 'No Finding' together with findings"):
        read_nih(root, CLASSES, check_files=False, official_split=False)
    root = _nih(tmp_path / "e", ["00000001_000.png,Hernia,0,one,57,M,PA"])
    with pytest.raises(DataError, match="line 2 .* Patient ID = 'one'"):
        read_nih(root, CLASSES, check_files=False, official_split=False)


CHEX_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS) + "\n"


def _chex_row(path: str, view: str = "Frontal,AP", labels: str = "1" + "," * 13) -> str:
    return f"{path},Female,60,{view},{labels}\n"


def test_chexpert_valid_split_paths_and_files(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0"
    root.mkdir()
    rows = [
        _chex_row("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"),
        _chex_row("CheXpert-v1.0/train/patient00001/study1/view2_lateral.jpg", "Lateral,"),
    ]
    (root / "train.csv").write_text(CHEX_HEADER + "".join(rows))
    (root / "valid.csv").write_text(
        CHEX_HEADER + _chex_row("CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg",
                                labels="0," * 13 + "1")
    )  # fmt: skip
    for r in [*rows[:1], "x/valid/patient64541/study1/view1_frontal.jpg"]:
        p = root / r.split(",")[0].split("/", 1)[1]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"jpg")
    with pytest.raises(DataError, match=r"1 of 3 images .* e.g. \['.*view2_lateral.jpg'\]"):
        read_chexpert(root, CLASSES)
    (root / "train/patient00001/study1/view2_lateral.jpg").write_bytes(b"jpg")
    df = read_chexpert(root, CLASSES).set_index("image_id")
    assert df["split"].tolist() == ["train", "train", "test"]
    assert df["view_position"].tolist() == ["AP", "LATERAL", "AP"]
    assert df.loc["patient64541_study1_view1_frontal", "Support Devices"] == 1
    assert df.loc["patient64541_study1_view1_frontal", "Normal"] == 0
    assert read_chexpert(root, CLASSES, valid_split="dev")["split"].tolist()[-1] == "dev"


def test_chexpert_errors_name_the_file_line_and_key(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train.csv"):
        read_chexpert(tmp_path, CLASSES)
    good = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    (tmp_path / "train.csv").write_text(CHEX_HEADER + _chex_row(good, labels="1,2" + "," * 12))
    with pytest.raises(
        DataError, match="train.csv: line 2 column 'Enlarged Cardiomediastinum' holds '2'"
    ):
        read_chexpert(tmp_path, CLASSES, check_files=False)
    (tmp_path / "train.csv").write_text(CHEX_HEADER + _chex_row(good) + _chex_row(good))
    with pytest.raises(DataError, match="Path .* appears more than once \\(lines \\[2, 3\\]\\)"):
        read_chexpert(tmp_path, CLASSES, check_files=False)
    (tmp_path / "train.csv").write_text(CHEX_HEADER + _chex_row("train/p1/s1.jpg"))
    with pytest.raises(DataError, match="line 2 has Path 'train/p1/s1.jpg'"):
        read_chexpert(tmp_path, CLASSES, check_files=False)
    (tmp_path / "train.csv").write_text(CHEX_HEADER.replace(",Fracture", "") + "x\n")
    with pytest.raises(DataError, match=r"train.csv: missing columns \['Fracture'\]"):
        read_chexpert(tmp_path, CLASSES, check_files=False)
    with pytest.raises(DataError, match="uncertain policy 'maybe'"):
        apply_policies(pd.DataFrame(columns=list(CHEXPERT_LABELS)), uncertain="maybe")


VINDR_HEADER = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"


def test_vindr_policies_on_hand_made_votes(tmp_path: Path) -> None:
    rows = [
        # img_a: R1 alone marks Cardiomegaly (two boxes); R1 and R2 mark Nodule/Mass.
        "a,Cardiomegaly,3,R1,1,1,2,2", "a,Cardiomegaly,3,R1,3,3,4,4", "a,Nodule/Mass,8,R1,1,1,2,2",
        "a,Nodule/Mass,8,R2,1,1,2,2", "a,No finding,14,R3,,,,",
        # img_b: two readers say No finding, one marks Aortic enlargement (a dropped class).
        "b,No finding,14,R1,,,,", "b,No finding,14,R2,,,,", "b,Aortic enlargement,0,R3,1,1,2,2",
    ]  # fmt: skip
    (tmp_path / "train.csv").write_text(VINDR_HEADER + "".join(r + "\n" for r in rows))
    cols = ["Cardiomegaly", "Nodule", "Mass", "Normal"]
    any_ = read_vindr(tmp_path, cols, "any", check_files=False)[cols].to_numpy().tolist()
    maj = read_vindr(tmp_path, cols, "majority", check_files=False)[cols].to_numpy().tolist()
    assert any_ == [[1, 1, 1, 0], [0, 0, 0, 0]]
    assert maj == [[0, 1, 1, 0], [0, 0, 0, 1]]


def test_vindr_files_and_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train.csv"):
        read_vindr(tmp_path, CLASSES)
    (tmp_path / "train.csv").write_text(
        VINDR_HEADER + "a,No finding,14,R1,,,,\nb,Lung cyst,2,R1,,,,\n"
    )
    with pytest.raises(DataError, match="line 3 \\(image b\\) has unknown class_name 'Lung cyst'"):
        read_vindr(tmp_path, CLASSES, check_files=False)
    (tmp_path / "train.csv").write_text("image_id,class_name\na,No finding\n")
    with pytest.raises(DataError, match=r"train.csv: missing columns \['rad_id'\]"):
        read_vindr(tmp_path, CLASSES, check_files=False)
    (tmp_path / "train.csv").write_text(
        VINDR_HEADER + "a,No finding,14,R1,,,,\na,ILD,5,R1,1,1,2,2\n"
    )
    with pytest.raises(DataError, match="reader R1 marked image a both 'No finding' and a finding"):
        read_vindr(tmp_path, CLASSES, check_files=False)
    (tmp_path / "train.csv").write_text(
        VINDR_HEADER + "a,No finding,14,R1,,,,\nb,No finding,14,R1,,,,\n"
    )
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.dicom").write_bytes(b"dcm")
    with pytest.raises(
        DataError, match=r"1 of 2 images listed in train.csv are missing on disk, e.g. \['b'\]"
    ):
        read_vindr(tmp_path, CLASSES)
    (tmp_path / "train" / "b.dcm").write_bytes(b"dcm")
    df = read_vindr(tmp_path, CLASSES, png_root=tmp_path / "png")
    assert df["path"].tolist() == [str(tmp_path / "png" / "a.png"), str(tmp_path / "png" / "b.png")]
    assert dicom_paths(tmp_path, df["image_id"]) == [
        tmp_path / "train/a.dicom",
        tmp_path / "train/b.dcm",
    ]
    validate_manifest(df, CLASSES, "vindr")


# --- VinDr Nodule/Mass policy -----------------------------------------------------------------


def test_vindr_nodule_mass_policy_on_hand_made_votes(tmp_path: Path) -> None:
    rows = [
        "a,Nodule/Mass,8,R1,1,1,2,2", "a,Nodule/Mass,8,R2,1,1,2,2", "a,No finding,14,R3,,,,",
        "b,No finding,14,R1,,,,", "b,No finding,14,R2,,,,", "b,Cardiomegaly,3,R3,1,1,2,2",
    ]  # fmt: skip
    (tmp_path / "train.csv").write_text(VINDR_HEADER + "".join(r + "\n" for r in rows))
    cols = ["Nodule", "Mass", "Normal", "Cardiomegaly"]
    both = read_vindr(tmp_path, cols, "any", check_files=False, nodule_mass="both")[cols]
    unknown = read_vindr(tmp_path, cols, "any", check_files=False, nodule_mass="unknown")[cols]
    assert both.to_numpy().tolist() == [[1, 1, 0, 0], [0, 0, 0, 1]]
    nan = np.nan
    # a Nodule/Mass box says one of the two is there, not which: both unknown; no box: both 0
    np.testing.assert_array_equal(unknown.to_numpy(), [[nan, nan, 0, 0], [0, 0, 0, 1]])
    default = read_vindr(tmp_path, cols, "any", check_files=False)[cols]
    pd.testing.assert_frame_equal(default, both)  # "both" is the default (today's behaviour)
    with pytest.raises(DataError, match=r"nodule_mass: 'mass'; valid: \['both', 'unknown'\]"):
        read_vindr(tmp_path, cols, check_files=False, nodule_mass="mass")


def test_vindr_nodule_mass_policy_from_params(tmp_path: Path) -> None:
    """The policy is a params option of the source (external.sources.vindr.nodule_mass)."""
    import yaml

    from cxrlt.data.external import read_source

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "params.yaml").read_text())["external"]["sources"]["vindr"]
    assert cfg["nodule_mass"] == "both"
    (tmp_path / "train.csv").write_text(
        VINDR_HEADER + "a,Nodule/Mass,8,R1,1,1,2,2\nb,No finding,14,R1,,,,\n"
    )
    cfg = {**cfg, "root": str(tmp_path), "check_files": False, "reader_policy": "any",
           "nodule_mass": "unknown"}  # fmt: skip
    df = read_source("vindr", cfg, CLASSES)
    assert df["Nodule"].isna().tolist() == df["Mass"].isna().tolist() == [True, False]


def test_vindr_nodule_mass_unknown_on_real_metadata(vindr_root: Path) -> None:
    both = read_vindr(vindr_root, CLASSES, reader_policy="any", check_files=False)
    unknown = read_vindr(vindr_root, CLASSES, reader_policy="any", check_files=False,
                         nodule_mass="unknown")  # fmt: skip
    positive = both["Nodule"] == 1
    assert int(positive.sum()) == 826
    assert unknown.loc[positive, ["Nodule", "Mass"]].isna().all().all()
    assert (unknown.loc[~positive, ["Nodule", "Mass"]] == 0).all().all()
    other = [c for c in CLASSES if c not in ("Nodule", "Mass")]
    pd.testing.assert_frame_equal(unknown[other], both[other])  # Normal etc. unchanged
