"""DICOM -> PNG on real radiographs from pydicom-data (CR, MONOCHROME1) and pydicom's LUT samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from png_chunks import png_chunks

import cxrlt.data.dicom as dicom
from cxrlt.data.dicom import convert_dicoms, dataset_to_array, dicom_to_array, read_provenance
from cxrlt.errors import DataError

pytest.importorskip("pydicom.data")


def _sample(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available offline (install pydicom-data)")
    return Path(path)


def _minmax(a: np.ndarray, top: int = 65535) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min()) * top


def test_monochrome1_chest_is_inverted_so_lungs_are_dark() -> None:
    path = _sample("RG1_UNCI.dcm")  # CR chest PA, MONOCHROME1, 15 bit, 1955 x 1841
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = dicom_to_array(path)
    assert out.dtype == np.uint16 and out.shape == (1955, 1841)
    assert out.min() == 0 and out.max() == 65535
    lung = out[560:640, 440:520].mean()  # right upper lung field
    spine = out[1280:1360, 880:960].mean()  # spine behind the heart
    assert lung < 0.6 * spine
    # Read as MONOCHROME2, the same pixels come out as the exact negative.
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_array_equal(dataset_to_array(ds), 65535 - out)
    assert dataset_to_array(ds, bits=8).dtype == np.uint8


def test_window_center_width_is_applied() -> None:
    path = _sample("RG3_UNCI.dcm")  # CR, MONOCHROME1, 10 bit, window 550 / 1024
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter) - 0.5, float(ds.WindowWidth) - 1  # PS3.3 C.11.2.1.2
    windowed = np.clip((raw - center) / width + 0.5, 0, 1)
    expected = 65535 - _minmax(windowed)
    out = dicom_to_array(path).astype(np.float64)
    assert np.abs(out - expected).max() <= 1
    assert np.abs(out - (65535 - _minmax(raw))).max() > 1000  # the window matters here


def test_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_sample("vlut_04.dcm"))  # 8-bit input, VOI LUT 256 -> 16 bit
    assert "VOILUTSequence" in ds and "WindowCenter" not in ds
    lut = np.rint(65535 * (np.arange(256) / 255) ** 2).astype(int)  # non-linear on purpose
    ds.VOILUTSequence[0].LUTData = lut.tolist()
    path = tmp_path / "vlut_gamma.dcm"
    ds.save_as(path)
    out = dicom_to_array(path)
    np.testing.assert_array_equal(out, lut[pydicom.dcmread(path).pixel_array])


def test_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_sample("mlut_18.dcm"))  # Modality LUT Sequence, signed 12-bit input
    descriptor = list(ds.ModalityLUTSequence[0].LUTDescriptor)
    assert descriptor == [4096, -2048, 16]
    lut = np.rint(65535 * np.sqrt(np.arange(4096) / 4095)).astype(int)  # non-linear on purpose
    ds.ModalityLUTSequence[0].LUTData = lut.tolist()
    path = tmp_path / "mlut_sqrt.dcm"
    ds.save_as(path)
    raw = pydicom.dcmread(path).pixel_array.astype(int)
    expected = _minmax(lut[np.clip(raw + 2048, 0, 4095)])
    out = dicom_to_array(path).astype(np.float64)
    assert np.abs(out - expected).max() <= 1
    assert np.abs(out - _minmax(raw)).max() > 1000  # the LUT matters here


def test_convert_writes_16_bit_png_without_metadata_and_resumes(tmp_path: Path) -> None:
    paths = [_sample("RG3_UNCI.dcm"), _sample("vlut_04.dcm")]
    out_dir = tmp_path / "png"
    report = convert_dicoms(paths, out_dir, bits=16, workers=1, progress=False, compress_level=1)
    assert sorted(Path(p).name for p in report.converted) == ["RG3_UNCI.png", "vlut_04.png"]
    assert not report.failed and not report.skipped
    png = out_dir / "RG3_UNCI.png"
    with Image.open(png) as im:
        assert im.mode == "I;16" and im.size == (1760, 1760)
        assert not im.info and not im.text  # no text, no EXIF, nothing from the header
        pixels = np.array(im)
    np.testing.assert_array_equal(pixels, dicom_to_array(paths[0]))
    assert set(png_chunks(png)) == {b"IHDR", b"IDAT", b"IEND"}
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for value in (str(ds.PatientName), str(ds.PatientID)):
        assert value.encode() not in png.read_bytes()
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["RG3_UNCI.png", "provenance.json", "vlut_04.png"]  # no temps

    again = convert_dicoms(paths, out_dir, workers=1, progress=False)
    assert not again.converted and len(again.skipped) == 2
    redo = convert_dicoms(paths, out_dir, workers=1, overwrite=True, progress=False)
    assert len(redo.converted) == 2


def test_unreadable_dicoms_are_skipped_or_fail(tmp_path: Path) -> None:
    good = _sample("vlut_04.dcm")
    garbage = tmp_path / "garbage.dicom"
    garbage.write_bytes(b"not a dicom file" * 64)
    truncated = tmp_path / "truncated.dicom"
    truncated.write_bytes(good.read_bytes()[:4000])  # header intact, pixel data cut
    paths = [good, garbage, truncated]
    report = convert_dicoms(paths, tmp_path / "skip", workers=2, on_error="skip", progress=False)
    assert [Path(p).name for p in report.converted] == ["vlut_04.png"]
    assert set(report.failed) == {str(garbage), str(truncated)}
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["provenance.json", "vlut_04.png"]
    with pytest.raises(DataError, match="2 DICOM files could not be converted: .*garbage.dicom"):
        convert_dicoms(paths, tmp_path / "fail", workers=1, on_error="fail", progress=False)
    assert (tmp_path / "fail" / "vlut_04.png").exists()  # the good one is kept for a rerun


def test_rejects_colour_and_clashing_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="photometric interpretation 'RGB'"):
        dicom_to_array(_sample("SC_rgb.dcm"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    clash = [tmp_path / "a" / "x.dicom", tmp_path / "b" / "x.dcm"]
    with pytest.raises(DataError, match="would both be written to"):
        convert_dicoms(clash, tmp_path / "png", progress=False)


def _modes(out_dir: Path) -> dict[str, str]:
    modes = {}
    for png in sorted(out_dir.glob("*.png")):
        with Image.open(png) as im:
            modes[png.name] = im.mode
    return modes


def test_changed_settings_or_code_redo_the_persisted_pngs(tmp_path: Path, monkeypatch) -> None:
    """The output folder persists between runs: a PNG is reused only if its record matches."""
    paths = [_sample("RG3_UNCI.dcm"), _sample("vlut_04.dcm")]
    out = tmp_path / "png"
    convert_dicoms(paths, out, bits=16, workers=1, progress=False, compress_level=1)
    assert set(_modes(out).values()) == {"I;16"}
    record = read_provenance(out)["vlut_04.png"]
    assert record["source"] == str(paths[1]) and record["bits"] == 16
    assert record["source_bytes"] == paths[1].stat().st_size and record["code"] == dicom.CODE_VERSION

    eight = convert_dicoms(paths, out, bits=8, workers=1, progress=False, compress_level=1)
    assert len(eight.converted) == 2 and not eight.skipped
    assert set(_modes(out).values()) == {"L"}
    assert convert_dicoms(paths, out, bits=8, workers=1, progress=False).skipped  # up to date

    # A source rewritten with other pixels but the same size is converted again.
    copy = tmp_path / "src" / "vlut_04.dcm"
    copy.parent.mkdir()
    copy.write_bytes(paths[1].read_bytes())
    pair = [paths[0], copy]
    convert_dicoms(pair, out, bits=8, workers=1, progress=False, compress_level=1)
    before = np.asarray(Image.open(out / "vlut_04.png"))
    ds = pydicom.dcmread(copy)
    px = ds.pixel_array.copy()
    px[0, 0] = px.max() if px[0, 0] != px.max() else px.min()
    ds.PixelData = px.tobytes()
    ds.save_as(copy)
    assert copy.stat().st_size == paths[1].stat().st_size
    redo = convert_dicoms(pair, out, bits=8, workers=1, progress=False, compress_level=1)
    assert [Path(p).name for p in redo.converted] == ["vlut_04.png"]
    assert not np.array_equal(before, np.asarray(Image.open(out / "vlut_04.png")))
    convert_dicoms(paths, out, bits=8, workers=1, progress=False, compress_level=1)

    monkeypatch.setattr(dicom, "CODE_VERSION", "changed conversion code")
    again = convert_dicoms(paths, out, bits=8, workers=1, progress=False, compress_level=1)
    assert len(again.converted) == 2
    assert {r["code"] for r in read_provenance(out).values()} == {"changed conversion code"}

    # A PNG nobody recorded (an older pipeline's, or written just before a kill) is redone,
    # and a PNG whose source is no longer listed is removed with its record.
    (out / "provenance.json").unlink()
    fewer = convert_dicoms(paths[1:], out, bits=8, workers=1, progress=False, compress_level=1)
    assert [Path(p).name for p in fewer.converted] == ["vlut_04.png"]
    assert [Path(p).name for p in fewer.removed] == ["RG3_UNCI.png"]
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json", "vlut_04.png"]
    assert list(read_provenance(out)) == ["vlut_04.png"]


def test_a_run_killed_mid_way_leaves_no_record_a_stale_png_could_pass(tmp_path: Path, monkeypatch) -> None:
    """Killed while redoing 16-bit PNGs as 8-bit: going back to 16 bits must redo the 8-bit one."""
    paths = [_sample("RG3_UNCI.dcm"), _sample("vlut_04.dcm")]
    out = tmp_path / "png"
    convert_dicoms(paths, out, bits=16, workers=1, progress=False, compress_level=1)
    real_write_png = dicom.write_png
    written: list[str] = []

    def write_then_die(arr: np.ndarray, path: str, compress_level: int = 3) -> None:
        if written:
            raise KeyboardInterrupt  # the second image: the run is killed
        real_write_png(arr, path, compress_level=compress_level)
        written.append(Path(path).name)

    monkeypatch.setattr(dicom, "write_png", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_dicoms(paths, out, bits=8, workers=1, progress=False, compress_level=1)
    monkeypatch.undo()
    assert _modes(out)[written[0]] == "L"  # rewritten as 8-bit before the kill
    resumed = convert_dicoms(paths, out, bits=16, workers=1, progress=False, compress_level=1)
    # Every PNG queued by the killed run lost its record first, so none of them is trusted.
    assert written[0] in [Path(p).name for p in resumed.converted]
    assert set(_modes(out).values()) == {"I;16"}
