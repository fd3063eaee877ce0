"""A correction SEG checked against its source series (each defect a 422 naming it), compared with the model's
segmentation (Dice, volume change) and reported in an SR naming the reviewer; on generated series, no model."""

from __future__ import annotations

import copy
import io

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from inference.config import Settings
from inference.dicom.results import Algorithm, segmentation
from inference.dicom.series import sort_by_position
from inference.errors import UnprocessableInput
from inference.review import correction
from models.registry import registry_for
from tests.conftest import write_study
from tests.dicom_readback import report_volumes

STRUCTURES = registry_for(Settings().model_manifest).family("hippocampus").resolve("1.0-fast").structures
ALGORITHM = Algorithm("3D Slicer", "5.6")


@pytest.fixture
def source(tmp_path):
    return sort_by_position([pydicom.dcmread(p) for p in write_study(tmp_path / "study")])


def labels_for(source, shift: int = 0) -> np.ndarray:
    labels = np.zeros((len(source), source[0].Rows, source[0].Columns), np.uint8)
    labels[2:6, 8:16, 10 + shift:20 + shift] = STRUCTURES[0].label
    labels[2:6, 16:22, 10:20] = STRUCTURES[1].label
    return labels


def as_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_correction_is_read_onto_its_source_and_compared(source):
    model, corrected = labels_for(source), labels_for(source, shift=5)
    seg = segmentation(source, corrected, STRUCTURES, ALGORITHM)
    read = correction.read_segmentation(as_bytes(seg), source, STRUCTURES)
    assert np.array_equal(read.labels, corrected) and read.segment_numbers == [1, 2]
    voxel = correction.voxel_volume_mm3(source)
    assert voxel == pytest.approx(2.0 * 0.7 * 0.7)
    compared = correction.compare(model, read.labels, STRUCTURES, voxel)
    anterior, posterior = compared[STRUCTURES[0].name], compared[STRUCTURES[1].name]
    assert anterior["dice"] == pytest.approx(2 * (4 * 8 * 5) / (2 * 4 * 8 * 10), abs=1e-4)  # half overlaps
    assert anterior["change_mm3"] == 0 and anterior["change_percent"] == 0
    assert posterior == {"dice": 1.0, "model_mm3": round(240 * voxel, 1), "corrected_mm3": round(240 * voxel, 1),
                         "change_mm3": 0, "change_percent": 0}
    report = correction.corrected_report(source, read, STRUCTURES, ALGORITHM, "rita")
    assert report_volumes(report) == {s.name: round(int((corrected == s.label).sum()) * voxel, 1)
                                      for s in STRUCTURES}


def test_segments_are_matched_by_label_whatever_their_numbers(source):
    seg = segmentation(source, labels_for(source), list(reversed(STRUCTURES)), ALGORITHM)  # Posterior is 1
    read = correction.read_segmentation(as_bytes(seg), source, STRUCTURES)
    assert read.segment_numbers == [2, 1] and np.array_equal(read.labels, labels_for(source))


def defect(source, change) -> str:
    seg = segmentation(source, labels_for(source), STRUCTURES, ALGORITHM)
    edited = copy.deepcopy(seg)
    returned = change(edited)  # edits the copy in place, or returns something else to upload
    changed = edited if returned is None else returned
    with pytest.raises(UnprocessableInput) as raised:
        correction.read_segmentation(as_bytes(changed) if not isinstance(changed, bytes) else changed, source,
                                     STRUCTURES)
    return raised.value.message


def test_each_defect_is_named(source):
    def other_series(seg):
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID = generate_uid()

    def foreign_instance(seg):
        seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = generate_uid()

    def renamed(seg):
        seg.SegmentSequence[1].SegmentLabel = "Tail"

    def other_study(seg):
        seg.StudyInstanceUID = generate_uid()

    assert "references series" in defect(source, other_series)
    assert "not in the source series" in defect(source, foreign_instance)
    assert "no segment labelled Posterior" in defect(source, renamed)
    assert "study" in defect(source, other_study)
    assert "frame of reference" in defect(source, lambda seg: setattr(seg, "FrameOfReferenceUID", generate_uid()))
    assert "not a DICOM file" in defect(source, lambda seg: b"not dicom at all")
    smaller = sort_by_position([copy.deepcopy(ds) for ds in source])
    for ds in smaller:
        ds.Rows = int(ds.Rows) + 1
    seg = segmentation(source, labels_for(source), STRUCTURES, ALGORITHM)
    with pytest.raises(UnprocessableInput, match="geometry differs"):
        correction.read_segmentation(as_bytes(seg), smaller, STRUCTURES)
