"""The 3D Gaussian blur: the array function against scipy, and the handler through the gateway."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from gateway import Gateway
from handlers import load_handlers
from handlers.gaussian_blur import DEFAULT_SIGMA_MM
from inference.config import Settings
from inference.dicom.writing import series_from_volume, write_series
from inference.imaging.blur import gaussian_blur_3d, gaussian_kernel
from inference.pipeline.pipeline import Pipeline
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.multipart_response import decode_multipart_response

SPACING = (3.0, 0.8, 1.2)  # slice, row, column (mm): anisotropic on every axis
RESCALE = (2.0, -100.0)  # slope, intercept


def scipy_blur(voxels: np.ndarray, sigma_voxels) -> np.ndarray:
    return ndimage.gaussian_filter(voxels.astype(np.float64), sigma_voxels, mode="nearest", truncate=4.0)


def test_kernel_is_normalised_and_as_wide_as_scipy():
    taps = gaussian_kernel(2.0)
    assert len(taps) == 2 * int(4.0 * 2.0 + 0.5) + 1
    assert taps.sum() == pytest.approx(1.0)
    assert np.argmax(taps) == len(taps) // 2 and np.allclose(taps, taps[::-1])


@pytest.mark.parametrize("shape, sigmas", [
    ((20, 33, 41), (0.8, 1.7, 2.6)),   # anisotropic, kernels wider than some axes' halves
    ((3, 64, 48), (2.5, 0.5, 1.0)),    # slice kernel (radius 10) far wider than the 3 slices
    ((1, 16, 16), (1.0, 0.0, 3.0)),    # one slice, one axis left alone
    ((2, 5, 300), (40.0, 9.0, 0.3)),   # kernels folded onto the edges; a sigma so small its radius is 1
])
def test_matches_scipy_nearest(shape, sigmas):
    voxels = (np.random.default_rng(1).random(shape, dtype=np.float32) * 1000 - 200).astype(np.float32)
    ours = gaussian_blur_3d(voxels, sigmas, threads=2)
    reference = scipy_blur(voxels, sigmas)
    assert ours.dtype == np.float32 and ours.shape == voxels.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


def test_threads_agree_and_the_input_is_left_alone():
    voxels = np.random.default_rng(2).random((9, 150, 130), dtype=np.float32)
    before = voxels.copy()
    sigmas = (1.0, 1.5, 2.0)
    threaded = gaussian_blur_3d(voxels, sigmas, threads=2)
    np.testing.assert_array_equal(voxels, before)
    np.testing.assert_allclose(gaussian_blur_3d(voxels, sigmas, threads=1), threaded, rtol=1e-6, atol=1e-6)
    integers = (voxels * 1000).astype(np.int16)
    np.testing.assert_allclose(gaussian_blur_3d(integers, sigmas), scipy_blur(integers, sigmas), rtol=1e-4, atol=0.1)


def test_rejects_bad_sigma_and_shape():
    with pytest.raises(ValueError, match="sigma_voxels"):
        gaussian_blur_3d(np.zeros((2, 2, 2), np.float32), (1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="sigma_voxels"):
        gaussian_blur_3d(np.zeros((2, 2, 2), np.float32), (1.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="3D"):
        gaussian_blur_3d(np.zeros((2, 2), np.float32), (1.0, 1.0, 1.0))


# -- the handler through the gateway ---------------------------------------------------------
@pytest.fixture
def client():
    load_handlers()
    app = Gateway(__name__, pipeline=Pipeline(Settings(), commands=["gaussian-blur-3d"]))
    app.add_inference_route("/gaussian-blur", "gaussian-blur-3d")
    return app.test_client()


@pytest.fixture
def stored(tmp_path: Path) -> tuple[np.ndarray, list[Path]]:
    """Stored int16 values (sorted by position) of a series written in reverse slice order."""
    values = np.random.default_rng(3).integers(0, 2000, (10, 24, 30)).astype(np.int16)
    datasets = series_from_volume(values, spacing=SPACING, rescale=RESCALE)
    return values, write_series(reversed(datasets), tmp_path / "series")


def post(client, files, json_input=None):
    encoder = build_multipart_request(json_input or {}, files)
    return client.post("/gaussian-blur", data=encoder.to_string(), content_type=related_content_type(encoder))


def test_handler_answers_a_blurred_derived_series(client, stored):
    values, files = stored
    sigma_mm = 2.5
    response = post(client, files, {"inference_command": "gaussian-blur-3d", "sigma_mm": sigma_mm})
    assert response.status_code == 200, response.data
    parts = decode_multipart_response(response.headers["Content-Type"], response.data)
    response_json = json.loads(parts[0][1])
    outputs = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(body)) for _, body in parts[1:-1]]
    inputs = [pydicom.dcmread(path) for path in files]
    assert len(outputs) == len(inputs) == len(response_json["parts"])
    assert {p["binary_type"] for p in response_json["parts"]} == {"dicom"}

    assert len({ds.SeriesInstanceUID for ds in outputs}) == 1
    assert outputs[0].SeriesInstanceUID != inputs[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in outputs} & {ds.SOPInstanceUID for ds in inputs}
    for ds in outputs:
        assert list(ds.ImageType)[0] == "DERIVED"
        assert ds.SeriesDescription == f"Gaussian blur 3D sigma {sigma_mm:g} mm"
        assert ds.StudyInstanceUID == inputs[0].StudyInstanceUID
    by_position = sorted(outputs, key=lambda ds: float(ds.ImagePositionPatient[2]))
    inputs_by_position = sorted(inputs, key=lambda ds: float(ds.ImagePositionPatient[2]))
    for out, original in zip(by_position, inputs_by_position, strict=True):
        assert list(out.ImagePositionPatient) == list(original.ImagePositionPatient)
        assert list(out.ImageOrientationPatient) == list(original.ImageOrientationPatient)
        assert list(out.PixelSpacing) == list(original.PixelSpacing)

    blurred = np.stack([ds.pixel_array for ds in by_position])
    assert blurred.dtype == np.int16
    real = values * RESCALE[0] + RESCALE[1]
    expected = (scipy_blur(real, [sigma_mm / s for s in SPACING]) - RESCALE[1]) / RESCALE[0]
    assert np.abs(blurred - expected).max() <= 0.5 + 1e-3  # rounded to the stored type
    assert blurred.std() < values.std() / 2  # it really is blurred


def test_default_sigma_is_documented_value(client, stored):
    response = post(client, stored[1])
    assert response.status_code == 200, response.data
    first = pydicom.dcmread(pydicom.filebase.DicomBytesIO(
        decode_multipart_response(response.headers["Content-Type"], response.data)[1][1]))
    assert first.SeriesDescription == f"Gaussian blur 3D sigma {DEFAULT_SIGMA_MM:g} mm"


@pytest.mark.parametrize("sigma", [0, -1.5, "2", None, True, 1e9, [2.0]])
def test_bad_sigma_is_a_400(client, stored, sigma):
    response = post(client, stored[1], {"sigma_mm": sigma})
    assert response.status_code == 400
    assert "parameter 'sigma_mm' must be a number > 0 and <= 1000, got" in response.get_json()["error"]


def test_non_dicom_part_is_a_422(client, stored, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    response = post(client, stored[1][:2] + [text])
    assert response.status_code == 422
    assert "notes.txt" in response.get_json()["error"]


def test_two_series_are_a_422_listing_them(client, stored, make_study):
    other = make_study("other", description="Second series")
    response = post(client, stored[1] + other)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert "one series" in error and "Second series" in error and "2:" in error
