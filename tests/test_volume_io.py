"""DICOM <-> HDF5 tools: a bit-identical round trip with the same geometry, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest

from inference.dicom.volume_io import main
from inference.dicom.writing import series_from_volume, write_series
from tests.conftest import write_study

RESCALE = (0.5, -1024.0)


def sorted_series(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture
def series(tmp_path: Path) -> Path:
    """An oblique int16 series with a rescale, its files written in reverse slice order."""
    values = np.random.default_rng(5).integers(-2000, 30000, (7, 12, 18)).astype(np.int16)
    datasets = series_from_volume(values, spacing=(2.5, 0.9, 1.1), rescale=RESCALE, origin=(10.0, -20.0, 30.0),
                                  orientation=(1, 0, 0, 0, 0.8, -0.6))
    write_series(reversed(datasets), tmp_path / "dicom")
    return tmp_path / "dicom"


def test_round_trip_is_bit_identical_with_the_same_geometry(series, tmp_path):
    h5_path, json_path, out = tmp_path / "volume.h5", tmp_path / "volume.json", tmp_path / "back"
    assert main(["dicom-to-hdf5", "-i", str(series), "-o", str(h5_path), "-j", str(json_path)]) == 0
    originals = sorted_series(series)  # the files are in reverse order of position

    info = json.loads(json_path.read_text())
    assert info["shape"] == [7, 12, 18] and info["dtype"] == "int16"
    assert info["spacing"] == pytest.approx([2.5, 0.9, 1.1])
    assert info["orientation"] == [1, 0, 0, 0, 0.8, -0.6]
    assert info["origin"] == pytest.approx([10.0, -20.0, 30.0])
    assert [i["SOPInstanceUID"] for i in info["instances"]] == [str(ds.SOPInstanceUID) for ds in originals]
    assert info["instances"][0]["RescaleSlope"] == RESCALE[0]
    with h5py.File(h5_path) as h5:
        volume = h5["volume"][()]
    assert volume.dtype == np.int16
    np.testing.assert_array_equal(volume, np.stack([ds.pixel_array for ds in originals]))

    assert main(["hdf5-to-dicom", "-i", str(h5_path), "-t", str(series), "-o", str(out),
                 "--description", "Round trip"]) == 0
    written = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]  # written in position order
    assert len(written) == len(originals)
    for new, old in zip(written, originals, strict=True):
        assert new.PixelData == old.PixelData
        assert list(new.ImagePositionPatient) == list(old.ImagePositionPatient)
        assert list(new.ImageOrientationPatient) == list(old.ImageOrientationPatient)
        assert list(new.PixelSpacing) == list(old.PixelSpacing)
        assert (new.RescaleSlope, new.RescaleIntercept) == (old.RescaleSlope, old.RescaleIntercept)
        assert new.SOPInstanceUID != old.SOPInstanceUID and new.SeriesDescription == "Round trip"
        assert new.StudyInstanceUID == old.StudyInstanceUID
    assert len({ds.SeriesInstanceUID for ds in written}) == 1


def test_float_volume_is_rounded_and_clipped_to_the_stored_type(series, tmp_path):
    h5_path = tmp_path / "float.h5"
    with h5py.File(h5_path, "w") as h5:
        h5["volume"] = np.full((7, 12, 18), 1.6, np.float32) * np.array([1, 1e6, -1e6, 1, 1, 1, 1])[:, None, None]
    assert main(["hdf5-to-dicom", "-i", str(h5_path), "-t", str(series), "-o", str(tmp_path / "out")]) == 0
    planes = [ds.pixel_array for ds in sorted_series(tmp_path / "out")]
    assert planes[0].max() == 2 and planes[1].min() == 32767 and planes[2].max() == -32768


def test_errors_exit_2_with_a_message(series, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("no images")
    write_study(tmp_path / "two" / "a", shape=(2, 8, 8), description="First")
    write_study(tmp_path / "two" / "b", shape=(2, 8, 8), description="Second")
    cases = {"empty": "holds no DICOM files", "text": "holds no DICOM files", "missing": "is not a folder",
             "two": "holds 2 series, the tools need exactly one: "}
    for folder, message in cases.items():
        code = main(["dicom-to-hdf5", "-i", str(tmp_path / folder), "-o", str(tmp_path / "x.h5"),
                     "-j", str(tmp_path / "x.json")])
        assert code == 2, folder
        error = capsys.readouterr().err
        assert message in error and (folder != "two" or "Second" in error)

    h5_path = tmp_path / "small.h5"
    with h5py.File(h5_path, "w") as h5:
        h5["volume"] = np.zeros((3, 12, 18), np.int16)
    assert main(["hdf5-to-dicom", "-i", str(h5_path), "-t", str(series), "-o", str(tmp_path / "o")]) == 2
    assert "(3, 12, 18)" in capsys.readouterr().err
    assert main(["hdf5-to-dicom", "-i", str(tmp_path / "text" / "readme.txt"), "-t", str(series),
                 "-o", str(tmp_path / "o")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err
