"""DICOM results: the SEG and the TID 1500 report round-trip, carry the codes given, and pass dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from inference.dicom.results import Algorithm, measurement_report, segmentation
from inference.dicom.series import load_volume
from inference.dicom.writing import dataset_bytes, secondary_capture, series_from_volume
from models.registry import Structure, registry_for
from tests.conftest import require, shared_data
from tests.dicom_readback import decode_segmentation, report_volumes

STRUCTURES = (Structure("Left thing", 3, (255, 0, 0), codes.SCT.Hippocampus, codes.SCT.Anterior),
              Structure("Right thing", 7, (0, 0, 255), codes.SCT.Hippocampus, codes.SCT.Posterior))
ALGORITHM = Algorithm("Test net", "1.2.3 (abcdef)")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (warnings are not errors)."""
    require(None if shutil.which("dciodvfy") else "needs dciodvfy (apt-get install dicom3tools; .ci/run installs it)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def source():
    """A series like Study1's crop: no PatientBirthDate / PatientSex, 6 x 20 x 16 voxels, labels 0/3/7."""
    rng = np.random.default_rng(1)
    series = series_from_volume(rng.integers(0, 900, (6, 20, 16)).astype(np.int16), spacing=(1.5, 0.9, 0.8),
                                description="Crop")
    labels = np.zeros((6, 20, 16), np.uint8)
    labels[1:4, 5:10, 4:9] = 3
    labels[2:5, 11:15, 6:12] = 7
    return load_volume(series), labels


def test_segmentation_round_trips_with_coded_segments_in_the_source_study(source, tmp_path):
    volume, labels = source
    seg = segmentation(volume.datasets, labels, STRUCTURES, ALGORITHM, description="Thing segmentation")
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    back = pydicom.dcmread(path)
    assert back.SegmentationType == "BINARY" and back.Modality == "SEG"
    assert int(back.NumberOfFrames) == 2 * labels.shape[0]  # every frame kept, empty or not
    # what OHIF needs to place it: the source series, and each frame's source image
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_uid
    sources = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
               for f in back.PerFrameFunctionalGroupsSequence]
    assert set(sources) == {ds.SOPInstanceUID for ds in volume.datasets}
    first = volume.datasets[0]
    assert back.StudyInstanceUID == first.StudyInstanceUID and back.PatientID == first.PatientID
    assert back.SeriesInstanceUID != first.SeriesInstanceUID
    segment = back.SegmentSequence[0]
    assert segment.SegmentLabel == "Left thing"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "5366008"
    assert segment.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == \
        "255549009"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("Test net", "1.2.3 (abcdef)")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    decoded = decode_segmentation(back, STRUCTURES, [ds.SOPInstanceUID for ds in volume.datasets])
    assert np.array_equal(decoded, labels)
    assert dciodvfy_errors(path) == []


def test_report_holds_each_volume_referencing_its_segment(source, tmp_path):
    volume, labels = source
    seg = segmentation(volume.datasets, labels, STRUCTURES, ALGORITHM)
    report = measurement_report(volume.datasets, seg, {"Left thing": 101.25, "Right thing": 88.0}, STRUCTURES,
                                ALGORITHM)
    path = tmp_path / "sr.dcm"
    report.save_as(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert report_volumes(back) == {"Left thing": 101.25, "Right thing": 88.0}
    assert str(seg.SOPInstanceUID) in str(back.CurrentRequestedProcedureEvidenceSequence)
    assert dciodvfy_errors(path) == []


def test_a_one_structure_report_references_its_segment_and_both_name_the_model(source, tmp_path):
    volume, labels = source
    one = STRUCTURES[:1]
    labels = np.where(labels == 3, 3, 0).astype(np.uint8)
    seg = segmentation(volume.datasets, labels, one, ALGORITHM)
    report = measurement_report(volume.datasets, seg, {"Left thing": 101.25}, one, ALGORITHM)  # AttributeError before
    path = tmp_path / "sr.dcm"
    report.save_as(path)
    back = pydicom.dcmread(path)
    assert report_volumes(back) == {"Left thing": 101.25}
    group = hd.sr.Comprehensive3DSR.from_dataset(back).content.get_volumetric_roi_measurement_groups()[0]
    referenced = group.referenced_segment
    assert referenced.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert referenced.referenced_segment_numbers == [1]
    assert {image.referenced_sop_instance_uid for image in referenced.source_images_for_segmentation} == \
           {ds.SOPInstanceUID for ds in volume.datasets}
    for written in (seg, back):
        assert "Hippocampus" not in written.Manufacturer
        assert (written.ManufacturerModelName, written.SoftwareVersions) == ("Test net", "1.2.3 (abcdef)")
    assert dciodvfy_errors(path) == []


def test_secondary_capture_passes_dciodvfy(source, tmp_path):
    volume, _ = source
    path = tmp_path / "sc.dcm"
    path.write_bytes(dataset_bytes(secondary_capture(np.zeros((30, 40, 3), np.uint8), volume.datasets[0],
                                                     description="Report")))
    assert dciodvfy_errors(path) == []


def test_labels_without_a_structure_or_the_wrong_shape_are_refused(source):
    volume, labels = source
    labels[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"label values \[5\] have no structure"):
        segmentation(volume.datasets, labels, STRUCTURES, ALGORITHM)
    with pytest.raises(ValueError, match="one slice per source image"):
        segmentation(volume.datasets[1:], labels, STRUCTURES, ALGORITHM)


def test_report_needs_every_structure_volume(source):
    volume, labels = source
    seg = segmentation(volume.datasets, labels, STRUCTURES, ALGORITHM)
    with pytest.raises(ValueError, match="no volume given for Right thing"):
        measurement_report(volume.datasets, seg, {"Left thing": 1.0}, STRUCTURES, ALGORITHM)


def test_hippocampus_dicom_outputs_on_study1_match_the_mask_and_pass_dciodvfy(tmp_path):
    from handlers.hippocampus.handler import COMMAND
    from inference.config import get_settings
    from inference.dicom.series import sort_by_position
    from inference.pipeline.pipeline import Pipeline

    files = sorted(shared_data("studies", "Study1").rglob("*.dcm"))
    result = Pipeline(get_settings(), commands=[COMMAND]).run_files(
        {"inference_command": COMMAND, "dicom_outputs": ["seg", "sr"]}, files)
    response, buffers = result.response_json, result.buffers
    assert [p["binary_type"] for p in response["parts"]] == ["numeric_label_mask", "dicom_secondary_capture",
                                                             "dicom", "dicom"]
    paths = {}
    for name, buffer in zip(("sc", "seg", "sr"), buffers[1:], strict=True):
        paths[name] = tmp_path / f"{name}.dcm"
        paths[name].write_bytes(bytes(buffer))
        assert dciodvfy_errors(paths[name]) == [], name
    crop = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    crop = sort_by_position([ds for ds in crop if ds.SeriesDescription == "HippoCrop"])
    seg = pydicom.dcmread(paths["seg"])
    assert seg.StudyInstanceUID == crop[0].StudyInstanceUID
    structures = registry_for(get_settings().model_manifest).family("hippocampus").resolve(None).structures
    labels = decode_segmentation(seg, structures, [ds.SOPInstanceUID for ds in crop])
    shape = response["parts"][0]["binary_data_shape"]
    mask = np.frombuffer(bytes(buffers[0]), np.uint8).reshape(shape["depth"], shape["height"], shape["width"])
    assert np.array_equal(labels, mask) and mask.any()
    measures = response["series_ml_json"][crop[0].SeriesInstanceUID]
    assert report_volumes(pydicom.dcmread(paths["sr"])) == {
        "Anterior": measures["anterior_volume_mm3"], "Posterior": measures["posterior_volume_mm3"]}
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    provenance = response["model"]
    assert algorithm.AlgorithmName == provenance["family"]
    assert algorithm.AlgorithmVersion.startswith(provenance["version"] + " ")


@pytest.mark.parametrize("value", ["seg", ["seg", "mesh"], [1]])
def test_hippocampus_refuses_unknown_dicom_outputs(value):
    from handlers.hippocampus.handler import COMMAND
    from inference.config import get_settings
    from inference.errors import BadRequest
    from inference.pipeline.pipeline import Pipeline

    pipeline = Pipeline(get_settings(), commands=[COMMAND])
    with pytest.raises(BadRequest, match=r"dicom_outputs.*a list of 'seg', 'sr'"):
        pipeline.check_request({"inference_command": COMMAND, "dicom_outputs": value})
