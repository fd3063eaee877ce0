"""A reviewer's corrected segmentation: a DICOM SEG checked against the source series, compared with the
model's (Dice and volume change per structure), and reported in a new SR naming the reviewer.

A viewer (OHIF, 3D Slicer) exports a correction as a Segmentation of the same series: the same
study and frame of reference, referencing the series' instances, frames of the same size, one
segment per structure labelled with the structure's name (as the model's SEG labels them). Every
defect is a 422 that names it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset

from inference.dicom.files import dicom_files_in
from inference.dicom.results import Algorithm, Structure, measurement_report
from inference.dicom.series import slice_spacing, sort_by_position
from inference.errors import UnprocessableInput

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Series number of a correction's report (the model's is ``inference.dicom.results.SR_SERIES_NUMBER``).
CORRECTED_SR_SERIES_NUMBER = 9301


@dataclass
class Segmentation:
    """A SEG read onto its source series: structure label values per source slice, and each structure's segment."""

    dataset: Dataset
    labels: np.ndarray  # (slices, rows, columns), sorted like the source series, structure label values
    segment_numbers: list[int]  # the segment of each structure, in the structures' order


def source_series(study_folder: Path, series_uid: str) -> list[Dataset]:
    """The headers of series ``series_uid`` in a study folder, sorted along the slice normal."""
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in dicom_files_in(study_folder)]
    series = [ds for ds in headers if str(ds.get("SeriesInstanceUID", "")) == series_uid]
    if not series:
        raise UnprocessableInput(f"the source series {series_uid} is no longer in {study_folder.name}; "
                                 "it cannot be reviewed against its images")
    return sort_by_position(series)


def referenced_series_uid(seg: Dataset) -> str:
    """The series a SEG segments (its first Referenced Series)."""
    try:
        return str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        raise UnprocessableInput("the segmentation has no ReferencedSeriesSequence: it does not say which series "
                                 "it segments") from None


def _referenced_instances(seg: Dataset) -> set[str]:
    """Every SOP Instance UID the SEG says it derives from (series references and per-frame source images)."""
    uids = {str(item.ReferencedSOPInstanceUID) for series in seg.get("ReferencedSeriesSequence", [])
            for item in series.get("ReferencedInstanceSequence", [])}
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            uids |= {str(item.ReferencedSOPInstanceUID) for item in derivation.get("SourceImageSequence", [])}
    return uids


def read_segmentation(data: bytes, source: Sequence[Dataset], structures: Sequence[Structure],
                      what: str = "the corrected segmentation") -> Segmentation:
    """A SEG (bytes) checked against ``source`` and read as structure labels; a 422 naming the first defect."""
    try:
        seg = pydicom.dcmread(io.BytesIO(data))
    except (pydicom.errors.InvalidDicomError, ValueError, EOFError, OSError) as exc:
        raise UnprocessableInput(f"{what} is not a DICOM file: {exc}") from None
    if str(seg.get("SOPClassUID", "")) != SEGMENTATION_STORAGE:
        raise UnprocessableInput(f"{what} is a {getattr(seg.get('SOPClassUID'), 'name', 'DICOM object')} "
                                 f"(Modality {seg.get('Modality', '?')}), not a Segmentation (SEG): export the "
                                 "segmentation as DICOM SEG")
    first = source[0]
    for keyword, name in (("StudyInstanceUID", "study"), ("FrameOfReferenceUID", "frame of reference")):
        if str(seg.get(keyword, "")) != str(first.get(keyword, "")):
            raise UnprocessableInput(f"{what} is not on the source series' {name}: its {keyword} is "
                                     f"{seg.get(keyword, 'missing')}, the source's {first.get(keyword)}")
    series_uid = str(first.SeriesInstanceUID)
    referenced = [str(item.SeriesInstanceUID) for item in seg.get("ReferencedSeriesSequence", [])]
    if series_uid not in referenced:
        raise UnprocessableInput(f"{what} references series {', '.join(referenced) or 'none'}, not the source "
                                 f"series {series_uid}")
    unknown = _referenced_instances(seg) - {str(ds.SOPInstanceUID) for ds in source}
    if unknown:
        raise UnprocessableInput(f"{what} references {len(unknown)} instances that are not in the source series "
                                 f"(e.g. {sorted(unknown)[0]})")
    size = (int(seg.get("Rows", 0)), int(seg.get("Columns", 0)))
    if size != (int(first.Rows), int(first.Columns)):
        raise UnprocessableInput(f"{what} has {size[0]} x {size[1]} frames; the source images are "
                                 f"{first.Rows} x {first.Columns}: the geometry differs")
    try:
        image = hd.seg.Segmentation.from_dataset(seg)
        numbers = _segment_numbers(image, structures, what)
        frames = image.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in source], segment_numbers=numbers,
            combine_segments=True, relabel=True, assert_missing_frames_are_empty=True)
    except UnprocessableInput:
        raise
    except (ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise UnprocessableInput(f"{what} cannot be read onto the source series: {exc}") from None
    labels = np.zeros(frames.shape, np.uint8)
    for index, structure in enumerate(structures, 1):  # relabelled: segment numbers[i] became i + 1
        labels[frames == index] = structure.label
    return Segmentation(seg, labels, numbers)


def _segment_numbers(image: hd.seg.Segmentation, structures: Sequence[Structure], what: str) -> list[int]:
    """The segment of each structure, matched by segment label (case-insensitive); a 422 naming what is missing."""
    by_label = {str(item.SegmentLabel).strip().lower(): int(item.SegmentNumber)
                for item in image.SegmentSequence}
    missing = [s.name for s in structures if s.name.lower() not in by_label]
    if missing:
        raise UnprocessableInput(f"{what} has no segment labelled {', '.join(missing)} (its segments: "
                                 f"{', '.join(str(item.SegmentLabel) for item in image.SegmentSequence)}); label "
                                 f"one segment per structure: {', '.join(s.name for s in structures)}")
    return [by_label[s.name.lower()] for s in structures]


def voxel_volume_mm3(source: Sequence[Dataset]) -> float:
    """The volume of one voxel of the source series: pixel spacing times slice spacing."""
    row, column = (float(v) for v in source[0].PixelSpacing)
    return row * column * slice_spacing(source)


def compare(model: np.ndarray, corrected: np.ndarray, structures: Sequence[Structure],
            voxel_mm3: float) -> dict[str, dict]:
    """Per structure: Dice between the model's and the corrected labels, both volumes, the change in mm3 and %."""
    out = {}
    for structure in structures:
        a, b = model == structure.label, corrected == structure.label
        total = int(a.sum()) + int(b.sum())
        before, after = round(int(a.sum()) * voxel_mm3, 1), round(int(b.sum()) * voxel_mm3, 1)
        out[structure.name] = {
            "dice": round(2 * int(np.logical_and(a, b).sum()) / total, 4) if total else 1.0,
            "model_mm3": before, "corrected_mm3": after, "change_mm3": round(after - before, 1),
            "change_percent": round(100 * (after - before) / before, 2) if before else None}
    return out


def corrected_report(source: Sequence[Dataset], correction: Segmentation, structures: Sequence[Structure],
                     algorithm: Algorithm, reviewer: str) -> Dataset:
    """The SR of a correction: each structure's corrected volume, referencing the correction's segments,
    the reviewer as the person observer."""
    voxel = voxel_volume_mm3(source)
    volumes = {s.name: round(int(np.count_nonzero(correction.labels == s.label)) * voxel, 1) for s in structures}
    return measurement_report(source, correction.dataset, volumes, structures, algorithm,
                              description="Reviewed volume measurements", series_number=CORRECTED_SR_SERIES_NUMBER,
                              observer=reviewer if "^" in reviewer else f"{reviewer}^",  # a one-part person name
                              segment_numbers=correction.segment_numbers)
