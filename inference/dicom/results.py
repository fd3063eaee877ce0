"""Results as standard DICOM objects, written with highdicom: a Segmentation and a TID 1500 report.

The writers take what they describe as data (a ``Structure``: name, label value, colour, coded
anatomy, as ``models.registry.Structure`` reads them from the manifest; an ``Algorithm``: name,
version), so the model registry supplies both.
Each object is a new single-instance series in the source study: highdicom copies the patient
and study modules from the source images, and the segments sit on the source series' geometry.

- ``segmentation``: a BINARY Segmentation (one non-overlapping segment per structure, every
  frame kept, so viewers never shift overlays); Orthanc 1.10 and dciodvfy refuse LABELMAP.
- ``measurement_report``: a Comprehensive 3D SR (TID 1500 "Imaging Measurement Report") with
  each structure's volume in mm3, each measurement group referencing its segment.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import highdicom as hd
import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from inference.dicom.header import PIXEL_DATA

#: The device that writes the objects; the model is named as its model name and software version (``Algorithm``).
MANUFACTURER = "Medical-imaging inference gateway"
SEG_SERIES_NUMBER = 9200
SR_SERIES_NUMBER = 9300

#: Type 2 attributes highdicom reads from the source images; absent ones are given empty values.
_TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")


class Structure(Protocol):
    """One segmented structure: its label value in the mask, display colour and coded meaning.

    ``anatomy`` is the SNOMED CT code of the structure (e.g. Hippocampus, SCT 5366008, CID 7140),
    ``modifier`` an optional anatomic modifier (CID 2, e.g. Anterior SCT 255549009), ``category``
    the segmentation property category (CID 7150, e.g. Anatomical Structure SCT 91723000).
    """

    name: str
    label: int
    color: tuple[int, int, int]
    anatomy: Code
    modifier: Code | None
    category: Code


@dataclass(frozen=True)
class Algorithm:
    """The algorithm that produced the result, as the objects identify it."""

    name: str
    version: str
    family: Code = codes.DCM.ArtificialIntelligence

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(name=self.name[:64], family=self.family, version=self.version[:64])


def _source_headers(source: Sequence[Dataset]) -> list[Dataset]:
    """Header copies of the source images (no pixels, no private elements), the type 2 patient/study attributes
    highdicom needs present.

    Elements still raw (as read, undecoded: immutable tuples) are shared and decoded in the copy only
    when highdicom reads them; decoded ones are deep-copied, so the source is never changed. Decoding
    and deep-copying every element of each header was most of the time a SEG or SR took.
    """
    out = []
    for ds in source:
        header = Dataset()
        for tag, element in ds.items():
            if tag != PIXEL_DATA and not tag.is_private:  # nobody reads private ones; setting one decodes it
                header[tag] = element if isinstance(element, RawDataElement) else copy.deepcopy(element)
        if hasattr(ds, "file_meta"):
            header.file_meta = copy.deepcopy(ds.file_meta)
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in header:
                setattr(header, keyword, "")
        out.append(header)
    return out


def _check_labels(labels: np.ndarray, source: Sequence[Dataset], structures: Sequence[Structure]) -> None:
    if labels.ndim != 3 or labels.shape[0] != len(source):
        raise ValueError(f"labels {labels.shape} must be (slices, rows, columns) with one slice per source "
                         f"image ({len(source)})")
    rows, columns = int(source[0].Rows), int(source[0].Columns)
    if labels.shape[1:] != (rows, columns):
        raise ValueError(f"labels {labels.shape} do not match the source images' {rows} x {columns} pixels")
    known = {s.label for s in structures} | {0}
    unknown = sorted(set(np.unique(labels).tolist()) - known)
    if unknown:
        raise ValueError(f"label values {unknown} have no structure; structures: "
                         f"{', '.join(f'{s.label}={s.name}' for s in structures)}")


def segment_description(number: int, structure: Structure, algorithm: Algorithm) -> hd.seg.SegmentDescription:
    """The Segment Description of ``structure``: coded category, type (+ modifier), algorithm, colour."""
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=structure.name[:64],
        segmented_property_category=structure.category,
        segmented_property_type=structure.anatomy,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm.identification(),
        tracking_uid=generate_uid(),
        tracking_id=structure.name[:64],
        display_color=hd.color.CIELabColor.from_rgb(*structure.color),
    )
    if structure.modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(structure.modifier)]
    return description


def segmentation(source: Sequence[Dataset], labels: np.ndarray, structures: Sequence[Structure],
                 algorithm: Algorithm, *, description: str = "AI segmentation",
                 series_number: int = SEG_SERIES_NUMBER) -> Dataset:
    """A BINARY DICOM Segmentation of ``labels`` (slices, rows, columns; sorted like ``source``).

    One segment per structure, numbered in the order given; every frame kept (``omit_empty_frames``
    off). ``source`` are the images of the segmented series (headers suffice).
    """
    _check_labels(labels, source, structures)
    segments = np.zeros(labels.shape, np.uint8)
    for number, structure in enumerate(structures, 1):
        segments[labels == structure.label] = number
    headers = _source_headers(source)
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(n, s, algorithm) for n, s in enumerate(structures, 1)],
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        device_serial_number="1",
        series_description=description[:64],
        omit_empty_frames=False,
    )
    return seg


@dataclass(frozen=True)
class ExtraMeasurement:
    """A further numeric measurement of a structure's group (e.g. its change since a prior study)."""

    name: Code
    value: float
    unit: Code


def _procedure(modality: str) -> Code:
    return {"MR": codes.LN.MRIUnspecifiedBodyRegion, "CT": codes.LN.CTUnspecifiedBodyRegion}.get(
        modality, codes.SCT.ImagingProcedure)


def measurement_report(source: Sequence[Dataset], seg: Dataset, volumes_mm3: Mapping[str, float],
                       structures: Sequence[Structure], algorithm: Algorithm, *,
                       description: str = "AI volume measurements",
                       series_number: int = SR_SERIES_NUMBER, observer: str | None = None,
                       segment_numbers: Sequence[int] | None = None,
                       extra_measurements: Mapping[str, Sequence[ExtraMeasurement]] | None = None,
                       evaluations: Sequence[tuple[Code, Code]] = ()) -> Dataset:
    """A Comprehensive 3D SR (TID 1500) with one volume (mm3) per structure, referencing its segment.

    ``volumes_mm3`` maps each structure's name to its volume; ``seg`` is the Segmentation from
    ``segmentation`` for the same ``structures``, which the measurement groups reference (segment
    ``segment_numbers[i]`` for structure ``i``; default 1, 2, ...). ``observer``: the person who made
    the segmentation (a reviewer's correction), named as the report's person observer besides the device.
    ``extra_measurements`` adds measurements to a structure's group (by name); ``evaluations`` are
    (name, value) qualitative evaluations put in every group (e.g. the result's quality flag).
    """
    missing = [s.name for s in structures if s.name not in volumes_mm3]
    if missing:
        raise ValueError(f"no volume given for {', '.join(missing)}")
    headers = _source_headers(source)
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=algorithm.name[:64], model_name=algorithm.version[:64]))
    person = None if observer is None else hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=observer[:64]))
    numbers = list(segment_numbers) if segment_numbers is not None else list(range(1, len(structures) + 1))
    groups = []
    for number, structure in zip(numbers, structures, strict=True):
        site = hd.sr.FindingSite(anatomic_location=structure.anatomy, topographical_modifier=structure.modifier)
        volume = hd.sr.Measurement(name=codes.SCT.Volume, value=float(volumes_mm3[structure.name]),
                                   unit=codes.UCUM.CubicMillimeter)
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=structure.name[:64]),
            referenced_segment=_referenced_segment(seg, number, headers),
            finding_type=structure.anatomy,
            finding_category=structure.category,
            finding_sites=[site],
            algorithm_id=hd.sr.AlgorithmIdentification(name=algorithm.name[:64], version=algorithm.version[:64]),
            measurements=[volume, *(hd.sr.Measurement(name=m.name, value=float(m.value), unit=m.unit)
                                    for m in (extra_measurements or {}).get(structure.name, ()))],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name, value) for name, value in evaluations] or None,
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person,
                                                     observer_device_context=device),
        procedure_reported=_procedure(str(headers[0].get("Modality", ""))),
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*headers, seg],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=description[:64],
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.ManufacturerModelName, sr.SoftwareVersions = algorithm.name[:64], algorithm.version[:64]  # the model, by name
    return sr


def _referenced_segment(seg: Dataset, number: int, source: Sequence[Dataset]) -> hd.sr.ReferencedSegment:
    """The SR's reference to segment ``number`` of ``seg`` and the source images it was made on.

    highdicom reads the segment of each frame from the per-frame functional groups; a SEG of one
    segment keeps it in the shared groups instead, so that reference is built from the source images.
    """
    if len(seg.SegmentSequence) > 1:
        return hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=number,
        source_images=[hd.sr.SourceImageForSegmentation(ds.SOPClassUID, ds.SOPInstanceUID) for ds in source])

