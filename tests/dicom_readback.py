"""Test helper: DICOM results read back (a SEG as its label mask, an SR as its volumes), to check what was written."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.dicom.results import Structure


def decode_segmentation(seg: Dataset, structures: Sequence[Structure], source_uids: Sequence[str]) -> np.ndarray:
    """A Segmentation read back as the label mask it was written from (slices sorted like ``source_uids``)."""
    image = hd.seg.Segmentation.from_dataset(seg, copy=False)
    frames = image.get_pixels_by_source_instance(source_sop_instance_uids=list(source_uids),
                                                 combine_segments=True, skip_overlap_checks=False)
    labels = np.zeros(frames.shape, np.uint8)
    for number, structure in enumerate(structures, 1):
        labels[frames == number] = structure.label
    return labels


def report_volumes(sr: Dataset) -> dict[str, float]:
    """The volumes (mm3) of a report from ``measurement_report``, by tracking identifier (structure name)."""
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=False)
    out = {}
    for group in report.content.get_volumetric_roi_measurement_groups():
        for measurement in group.get_measurements(name=codes.SCT.Volume):
            out[str(group.tracking_identifier)] = float(measurement.value)
    return out
