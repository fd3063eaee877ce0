"""The hippocampus handler: orientation proven on labelled data, real studies, report, CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image

from handlers.hippocampus.handler import COMMAND, FAMILY, load_version
from handlers.hippocampus.orientation import from_model_orientation, to_model_orientation
from inference import protocol
from inference.config import get_settings
from inference.dicom.writing import dataset_bytes, series_from_volume
from inference.errors import UnprocessableInput
from inference.pipeline.pipeline import Pipeline
from tests.conftest import PROJECT_ROOT, shared_data
from tests.nifti_series import series_from_nifti

WEIGHTS = PROJECT_ROOT / "models" / "hippocampus_unet.pt"


@pytest.fixture(scope="module")
def weights():
    if not WEIGHTS.exists():
        pytest.skip(f"model weights {WEIGHTS.name} are not in models/ yet (train with models.train_hippocampus)")
    return WEIGHTS


def as_parts(datasets):
    return [io.BytesIO(dataset_bytes(ds)) for ds in datasets]


def run(instances, settings=None, request=None):
    """The hippocampus command through the pipeline, as every front door runs it: (JSON, checked buffers)."""
    pipeline = Pipeline(settings or get_settings(), commands=[COMMAND])
    result = pipeline.run(request or {}, instances, "0" * 64, command=COMMAND)
    return result.response_json, result.buffers


def write_nifti(path, array, affine=None):
    import nibabel

    nibabel.save(nibabel.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def test_nifti_written_as_dicom_comes_back_in_the_training_orientation(tmp_path):
    """NIfTI (RAS) -> DICOM series (LPS, any order sent) -> the model's array: the same voxels."""
    from inference.dicom.series import load_volume

    ras = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)  # (x, y, z) as nibabel loads it
    series = series_from_nifti(write_nifti(tmp_path / "crop.nii.gz", ras))
    np.random.default_rng(0).shuffle(series)  # viewers may send any order; positions decide
    volume = load_volume(series, rescale=False)
    assert volume.voxels.shape == (7, 6, 5)  # axial slices, rows along y, columns along x
    # DICOM rows run posterior-wards and columns leftwards (LPS): both flipped against RAS
    assert volume.voxels[0, 0, 0] == ras[4, 5, 0]
    model_view, orientation = to_model_orientation(volume)
    assert np.array_equal(model_view, ras)
    assert np.array_equal(from_model_orientation(model_view, orientation), volume.voxels)


def test_sagittal_series_is_reoriented_too():
    """The same anatomy stored as sagittal slices reaches the model in the same RAS order."""
    from inference.dicom.series import load_volume

    ras = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    # sagittal: columns run posterior-wards (+y LPS), rows downwards (-z), so the slice normal is
    # row x column = -x LPS, i.e. slices go rightwards: slice k is x = k in RAS
    sagittal = np.ascontiguousarray(ras[:, ::-1, ::-1].transpose(0, 2, 1))  # (slice R, row I, column P)
    series = series_from_volume(sagittal, orientation=(0, 1, 0, 0, 0, -1), description="HippoCrop")
    volume = load_volume(series, rescale=False)
    model_view, orientation = to_model_orientation(volume)
    assert np.array_equal(model_view, ras)
    assert np.array_equal(from_model_orientation(model_view, orientation), sagittal)


def test_labelled_nifti_sent_as_dicom_is_segmented_in_the_training_orientation(weights, tmp_path):
    from inference.dicom.series import load_volume
    from models.data import dataset_pairs, split_cases

    data = shared_data("hippocampus")
    pairs = dataset_pairs(data)
    for case in split_cases(sorted(pairs), seed=0)["test"][:3]:
        image_path, label_path = pairs[case]
        series = series_from_nifti(image_path)
        other = series_from_volume(np.zeros((3, 64, 64), np.int16), description="T1 whole brain",
                                   study_uid=series[0].StudyInstanceUID)
        response, prepared = run(as_parts(other + series[::-1]))
        shape = response["parts"][0]["binary_data_shape"]
        predicted = np.frombuffer(prepared[0], np.uint8).reshape(shape["depth"], shape["height"], shape["width"])
        truth = load_volume(series_from_nifti(label_path), rescale=False).voxels
        assert predicted.shape == truth.shape
        dice = 2 * np.sum((predicted > 0) & (truth > 0)) / (np.sum(predicted > 0) + np.sum(truth > 0))
        assert dice >= 0.85, f"{case}: foreground Dice {dice:.3f} through DICOM; orientation is off"
        anterior = np.sum((predicted == 1) & (truth == 1)) * 2 / (np.sum(predicted == 1) + np.sum(truth == 1))
        assert anterior >= 0.75, f"{case}: anterior Dice {anterior:.3f}; labels swapped or flipped?"


def test_missing_crop_series_is_422_listing_series(weights):
    series = series_from_volume(np.zeros((2, 8, 8), np.int16), description="T2 axial")
    with pytest.raises(UnprocessableInput, match="series present: .*T2 axial"):
        run(as_parts(series))


@pytest.mark.parametrize("study_name", ["Study1", "Study2"])
def test_real_study_gives_plausible_volumes_and_a_valid_report(weights, study_name):
    folder = shared_data("studies", study_name)
    files = sorted(p for p in folder.rglob("*.dcm"))
    handles = [open(p, "rb") for p in files]
    try:
        response, prepared = run(handles)
    finally:
        for handle in handles:
            handle.close()
    mask_part, report_part = response["parts"]
    assert mask_part["binary_type"] == "numeric_label_mask"
    assert mask_part["label_map"] == {"1": "Anterior", "2": "Posterior"}
    crop_files = [p for p in files if "HCrop" in p.parent.name]
    crop = pydicom.dcmread(crop_files[0], stop_before_pixels=True)
    assert mask_part["SeriesInstanceUID"] == crop.SeriesInstanceUID
    shape = mask_part["binary_data_shape"]
    assert (shape["depth"], shape["height"], shape["width"]) == (len(crop_files), crop.Rows, crop.Columns)
    measures = response["series_ml_json"][crop.SeriesInstanceUID]
    assert 2000 <= measures["total_volume_mm3"] <= 5000, measures
    assert measures["anterior_volume_mm3"] > 0 and measures["posterior_volume_mm3"] > 0
    assert measures["total_volume_mm3"] == pytest.approx(
        (measures["anterior_voxels"] + measures["posterior_voxels"]) * measures["voxel_volume_mm3"], rel=1e-3)
    report = pydicom.dcmread(io.BytesIO(bytes(prepared[1])))
    assert report_part["binary_type"] == "dicom_secondary_capture"
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert report.StudyInstanceUID == crop.StudyInstanceUID and report.PatientID == crop.PatientID
    assert report.SeriesInstanceUID != crop.SeriesInstanceUID
    assert report.PhotometricInterpretation == "RGB" and report.pixel_array.shape[2] == 3


def test_volumes_use_spacing_not_voxel_counts(weights):
    """The same crop at 2 mm slice spacing measures twice the volume."""
    data = shared_data("hippocampus")
    from models.data import dataset_pairs

    image_path, _ = dataset_pairs(data)["hippocampus_001"]
    base = series_from_nifti(image_path)
    response, _ = run(as_parts(base))
    one = next(iter(response["series_ml_json"].values()))
    for ds in base:
        ds.ImagePositionPatient = [float(v) * (2 if i == 2 else 1) for i, v in enumerate(ds.ImagePositionPatient)]
    response, _ = run(as_parts(base))
    two = next(iter(response["series_ml_json"].values()))
    assert two["voxel_volume_mm3"] == pytest.approx(2 * one["voxel_volume_mm3"])
    assert two["total_volume_mm3"] == pytest.approx(2 * two["anterior_voxels"] + 2 * two["posterior_voxels"], rel=1e-3)


def test_command_line_on_studies_writes_reports_and_summary(weights, tmp_path):
    good = shared_data("studies", "Study1")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "handlers.hippocampus", str(good), str(empty),
                             "--out", str(tmp_path / "out")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr  # one study failed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[str(good)]["status"] == "ok" and summary[str(empty)]["status"] == "failed"
    written = sorted(p.name for p in (tmp_path / "out").glob("00-*/*"))
    assert written == ["report.dcm", "report.png", "volumes.json"]
    study_out = next((tmp_path / "out").glob("00-*"))
    report = pydicom.dcmread(study_out / "report.dcm")
    assert np.array_equal(np.asarray(Image.open(study_out / "report.png")), report.pixel_array)
    volumes = json.loads((study_out / "volumes.json").read_text())
    assert volumes["total_volume_mm3"] == summary[str(good)]["total_volume_mm3"]
    assert isinstance(volumes["quality"]["flagged"], bool) and "change_since_prior" in volumes  # as over HTTP
    assert "Study1" in result.stdout and "FAILED" in result.stdout


def test_served_over_http(weights, server, tmp_path):
    from inference.protocol.client import send_inference_request

    folder = shared_data("studies", "Study1")
    files = sorted(folder.rglob("*.dcm"))
    result = send_inference_request(server.url + "/hippocampus", {"studyUID": "1"}, files)
    protocol.validate_response(result.response_json, result.buffers)
    assert [p["binary_type"] for p in result.response_json["parts"]] == ["numeric_label_mask",
                                                                           "dicom_secondary_capture"]
    same = send_inference_request(server.url + "/", {"inference_command": "get-hippocampus-volume"}, files)
    assert same.buffers[0] == result.buffers[0]


def test_healthcheck_is_not_ready_when_the_model_cannot_load(tmp_path):
    """READY only after the model is loaded: with corrupt weights the healthcheck says FAILED."""
    import time

    import requests

    from tests.conftest import RunningServer, corrupt_manifest

    running = RunningServer({"INFERENCE_MODEL_MANIFEST": str(corrupt_manifest(tmp_path / "models"))}, tmp_path,
                            wait=False)
    try:
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline and not body.startswith("FAILED"):
            try:
                body = requests.get(running.url + "/healthcheck", timeout=2).text
            except requests.RequestException:
                pass
            time.sleep(0.2)
        assert body.startswith("FAILED: get-hippocampus-volume"), body
        assert requests.get(running.url + "/ping", timeout=5).status_code == 200
    finally:
        running.stop()


def test_a_version_runs_the_inference_settings_its_manifest_declares(weights):
    """1.0-fast's ``canvas: tight`` reaches the segmenter; an unknown canvas makes that version unavailable."""
    import dataclasses

    from models.registry import ModelRegistry, ModelUnavailable

    registry = ModelRegistry.load()
    fast = registry.family(FAMILY).resolve("1.0-fast")
    segmenter = registry.model(fast, load_version)
    assert (segmenter.canvas, segmenter.flips, segmenter.member_indices) == ("tight", False, (0,))
    assert fast.inference["canvas"] == "tight" and "--canvas tight" in fast.evaluation["command"]
    bad = dataclasses.replace(fast, version="bad-canvas", inference={**fast.inference, "canvas": "small"})
    with pytest.raises(ModelUnavailable, match="canvas: unknown 'small'; choose one of fixed, tight"):
        registry.model(bad, load_version)


DISTILLED = "1.1"


def test_the_distilled_version_is_verified_and_runs_one_network_on_the_tight_canvas(weights):
    """1.1 (issue 28): its own weights file, hash checked, one network trained on the training split only."""
    from models.registry import ModelRegistry, file_sha256

    registry = ModelRegistry.load()
    version = registry.family(FAMILY).resolve(DISTILLED)
    assert version.weights.name != WEIGHTS.name and version.sha256 == file_sha256(version.weights)
    segmenter = registry.model(version, load_version)
    assert (len(segmenter.members), segmenter.flips, segmenter.canvas) == (1, False, "tight")
    assert segmenter.sha256 == version.sha256 and segmenter.version.startswith("hippocampus-unet-1.1 (")
    network = segmenter.members[0][1]
    assert network["trained_on"] == ["train"] and "distilled_from" in network
    assert "training split only" in version.training_data["cases"]
    assert "--version 1.1" in version.evaluation["command"]
    labels = segmenter.segment(np.random.default_rng(0).normal(300, 80, (35, 51, 32)))
    assert labels.shape == (35, 51, 32) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}


def test_the_two_view_distilled_version_averages_a_sagittal_and_an_axial_network(weights):
    """1.2 (issue 28): its own weights file, two networks (axes 0 and 2) distilled on the training split only."""
    from models.registry import ModelRegistry, file_sha256

    registry = ModelRegistry.load()
    version = registry.family(FAMILY).resolve("1.2")
    assert version.sha256 == file_sha256(version.weights) and version.weights.name == "hippocampus_unet_1_2.pt"
    segmenter = registry.model(version, load_version)
    assert (segmenter.flips, segmenter.canvas) == (False, "tight")
    assert [(cfg["axis"], cfg["base"]) for _, cfg in segmenter.members] == [(0, 12), (2, 12)]
    assert all(cfg["trained_on"] == ["train"] and "distilled_from" in cfg for _, cfg in segmenter.members)
    assert version.uncertainty["method"] == "member disagreement" and registry.family(FAMILY).default_version == "1.0"
    volume = np.random.default_rng(0).normal(300, 80, (35, 51, 32))
    each = segmenter.member_probabilities(volume)
    np.testing.assert_allclose(segmenter.probabilities(volume), (each[0] + each[1]) / 2, atol=1e-6)


def test_the_distilled_version_segments_labelled_test_volumes_sent_as_dicom(weights):
    """Through DICOM and the handler with ``model_version`` 1.1: the truth's hippocampus, anterior in front."""
    from inference.dicom.series import load_volume
    from models.data import dataset_pairs, split_cases

    pairs = dataset_pairs(shared_data("hippocampus"))
    for case in split_cases(sorted(pairs), seed=0)["test"][:2]:
        image_path, label_path = pairs[case]
        response, prepared = run(as_parts(series_from_nifti(image_path)), request={"model_version": DISTILLED})
        assert response["model"]["version"] == DISTILLED
        shape = response["parts"][0]["binary_data_shape"]
        predicted = np.frombuffer(prepared[0], np.uint8).reshape(shape["depth"], shape["height"], shape["width"])
        truth = load_volume(series_from_nifti(label_path), rescale=False).voxels
        for label in (1, 2):
            both = np.sum((predicted == label) & (truth == label))
            dice = 2 * both / (np.sum(predicted == label) + np.sum(truth == label))
            assert dice >= 0.75, f"{case}: label {label} Dice {dice:.3f} with 1.1; labels swapped or flipped?"
