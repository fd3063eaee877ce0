"""DICOM helpers for handlers: load request parts, group and sort series, build volumes, write results.

Volumes are numpy arrays of shape (depth, rows, columns): slices sorted by position along the
slice normal, ascending, which is the order viewers send them in and expect 3D masks in.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.dicom.header import SERIES_INSTANCE_UID, as_floats
from inference.dicom.instance import DicomInstance
from inference.errors import UnprocessableInput
from inference.paths import is_inside, resolve_inside, shown

SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
MR_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"

log = logging.getLogger("inference.dicom")
#: What the series helpers take: checked instances (geometry from their fast headers) or pydicom datasets.
Item = TypeVar("Item", DicomInstance, Dataset)


def dicom_files_in(folder: Path, *, inside: Path | None = None) -> list[Path]:
    """Files below ``folder`` (recursively) that carry the DICOM preamble, sorted by path.

    With ``inside``, files that resolve outside that folder (symlinks out) are skipped unopened.
    """
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        if inside is not None and not is_inside(inside, path):
            continue
        with open(path, "rb") as handle:
            head = handle.read(132)
        if head[128:132] == b"DICM":
            found.append(path)
    return found


def study_folder_files(root: Path | None, requested: str, *, field: str) -> list[Path]:
    """The DICOM files of folder ``requested`` of the data ``root``, as named by request ``field``.

    403 outside the root (``..``, absolute paths, symlinks); 422 for not a folder, an empty
    folder or one without DICOM files.
    """
    folder = resolve_inside(root, requested)
    try:
        if not folder.is_dir():
            raise UnprocessableInput(f"{field} {shown(requested)} is not a folder of the data root; "
                                     "give a folder of DICOM files")
        if not any(folder.iterdir()):
            raise UnprocessableInput(f"{field} {shown(requested)} is an empty folder; put the study's DICOM files in it")
        files = dicom_files_in(folder, inside=root)
    except OSError as exc:  # unreadable, or a name the file system refuses: its message holds server paths
        raise UnprocessableInput(f"{field} {shown(requested)} cannot be read on the server "
                                 f"({exc.strerror or 'I/O error'})") from None
    if not files:
        raise UnprocessableInput(f"{field} {shown(requested)} holds no DICOM files (none has the DICM preamble)")
    return files


def require_instances(instances: Sequence[DicomInstance]) -> Sequence[DicomInstance]:
    """``instances``, or a 422 when the request holds none (only attachments, or nothing after the JSON)."""
    if not instances:
        raise UnprocessableInput("the request holds no DICOM files; send the study's instances after the JSON part")
    return instances


def series_uid(item: DicomInstance | Dataset) -> str:
    """The SeriesInstanceUID of an instance or dataset ("" when absent)."""
    if isinstance(item, DicomInstance):
        return item.header.text(SERIES_INSTANCE_UID) or ""
    return str(item.get("SeriesInstanceUID", ""))


def _numbers(item: DicomInstance | Dataset, keyword: str) -> list[float] | None:
    """A DS/IS attribute's values as floats, None when absent or empty (an instance's from its fast header)."""
    if isinstance(item, DicomInstance):
        return item.header.numbers(tag_for_keyword(keyword))
    return as_floats(item.get(keyword))


def _dataset(item: DicomInstance | Dataset) -> Dataset:
    return item.dataset if isinstance(item, DicomInstance) else item


def _instance_number(ds: Dataset) -> int:
    numbers = _numbers(ds, "InstanceNumber")
    return int(numbers[0]) if numbers else 0


def group_by_series(items: Iterable[Item]) -> dict[str, list[Item]]:
    """Instances (or datasets) keyed by SeriesInstanceUID, in order of first appearance."""
    series: dict[str, list[Item]] = {}
    for item in items:
        series.setdefault(series_uid(item), []).append(item)
    return series


def describe_series(series: dict[str, list[Item]]) -> str:
    """One line per series for error messages: UID, description and instance count."""
    return "; ".join(
        f"{uid} ({_dataset(items[0]).get('SeriesDescription', 'no description')!s}, {len(items)} instances)"
        for uid, items in series.items()
    )


def slice_normal(ds: DicomInstance | Dataset) -> np.ndarray | None:
    """Unit normal of the image plane (row x column direction), or None without orientation."""
    iop = _numbers(ds, "ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def sort_by_position(datasets: Sequence[Item]) -> list[Item]:
    """Slices sorted by position along the slice normal, ascending (InstanceNumber without geometry).

    Multi-timepoint series (several slices at one position) keep InstanceNumber order within
    a position.
    """
    normal = slice_normal(datasets[0])
    positions = [_numbers(ds, "ImagePositionPatient") for ds in datasets]
    if normal is None or any(position is None for position in positions):
        return sorted(datasets, key=_instance_number)
    keys = {id(ds): (round(float(np.dot(normal, position)), 4), _instance_number(ds))
            for ds, position in zip(datasets, positions)}
    return sorted(datasets, key=lambda ds: keys[id(ds)])


def slice_spacing(datasets: Sequence[DicomInstance | Dataset]) -> float:
    """Distance between slices along the normal: median step of positions, else the header's."""
    normal = slice_normal(datasets[0])
    positions = [_numbers(ds, "ImagePositionPatient") for ds in datasets]
    if normal is not None and len(datasets) > 1 and all(position is not None for position in positions):
        distances = sorted(float(np.dot(normal, position)) for position in positions)
        steps = np.diff(distances)
        steps = steps[steps > 1e-6]
        if steps.size:
            return float(np.median(steps))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if ds_value := _dataset(datasets[0]).get(keyword):
            return float(ds_value)
    return 1.0


@dataclass
class Volume:
    """A series as a volume: voxels (depth, rows, columns), spacing in mm in the same order."""

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    datasets: list[Dataset]  # sorted like the voxels' first axis

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def load_volume(items: Sequence[DicomInstance | Dataset], *, rescale: bool = True) -> Volume:
    """Sort a series and stack its pixels; with ``rescale``, apply RescaleSlope/Intercept (float32).

    Instances are sorted by their headers, then read whole; datasets must hold their pixels.
    """
    ordered_items = sort_by_position(items)
    ordered = [item.read_full() if isinstance(item, DicomInstance) else item for item in ordered_items]
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in ordered}
    if len(shapes) != 1:
        raise UnprocessableInput(f"series {ordered[0].SeriesInstanceUID} mixes image sizes {sorted(shapes)}")
    try:
        slices = [ds.pixel_array for ds in ordered]
    except Exception as exc:
        log.info("pixel data of series %s cannot be decoded: %s: %s", ordered[0].SeriesInstanceUID,
                 type(exc).__name__, exc)
        raise UnprocessableInput(f"pixel data of series {ordered[0].SeriesInstanceUID} cannot be decoded "
                                 "(unsupported compression or damaged pixel data)") from exc
    voxels = np.stack(slices)
    if rescale:
        slope = float(ordered[0].get("RescaleSlope", 1) or 1)
        intercept = float(ordered[0].get("RescaleIntercept", 0) or 0)
        voxels = voxels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    row_spacing, column_spacing = (float(v) for v in ordered[0].get("PixelSpacing") or (1.0, 1.0))  # absent or empty
    return Volume(voxels, (slice_spacing(ordered_items), row_spacing, column_spacing), ordered)


def store_pixels(ds: Dataset, values: np.ndarray) -> None:
    """Write real-world ``values`` into ``ds`` as its stored type, undoing its rescale; rounds and clips."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    dtype = np.dtype(f"{'i' if int(ds.get('PixelRepresentation', 0)) else 'u'}{int(ds.BitsAllocated) // 8}")
    limits = np.iinfo(dtype)
    stored = np.rint((np.asarray(values, np.float64) - intercept) / slope)
    ds.PixelData = np.clip(stored, limits.min, limits.max).astype(dtype).tobytes()


def derived_series(volume: Volume, voxels: np.ndarray, description: str) -> list[Dataset]:
    """A new series holding ``voxels`` (same shape as ``volume.voxels``), geometry copied per slice.

    New SeriesInstanceUID and SOPInstanceUIDs, ImageType DERIVED\\SECONDARY, patient and study kept.
    """
    if voxels.shape != volume.voxels.shape:
        raise ValueError(f"derived voxels {voxels.shape} do not match the series {volume.voxels.shape}")
    series_uid = generate_uid()
    out = []
    for ds, values in zip(volume.datasets, voxels):
        new = pydicom.dcmread(io.BytesIO(dataset_bytes(ds)))  # a deep, independent copy
        new.SeriesInstanceUID = series_uid
        new.SOPInstanceUID = generate_uid()
        new.file_meta.MediaStorageSOPInstanceUID = new.SOPInstanceUID
        new.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        new.ImageType = ["DERIVED", "SECONDARY"]
        new.SeriesDescription = description[:64]
        new.DerivationDescription = description[:1024]
        new.SeriesNumber = int(ds.get("SeriesNumber", 0) or 0) + 1000
        new.Manufacturer = MANUFACTURER
        store_pixels(new, values)
        out.append(new)
    return out


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` as the bytes of a DICOM file (preamble, file meta, explicit VR little endian)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _new_file_dataset(sop_class_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


#: Type 2 (must be present, may be empty) attributes of the patient and study modules.
TYPE2_PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                                "StudyID", "AccessionNumber", "ReferringPhysicianName")
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "StudyDescription",
)


#: Manufacturer of every object the gateway writes; the model's family and version go in the model name.
MANUFACTURER = "inference-gateway"


def stamp_provenance(ds: Dataset, algorithm: Any = None) -> None:
    """Name what made ``ds`` in its standard places, so a result found in a PACS leads to the exact weights.

    ``algorithm`` (a ``models.registry.Provenance``: family, version, weights_sha256) sets
    ManufacturerModelName ("family version"), SoftwareVersions (version, the weights SHA-256's first 16
    digits: LO values hold 64 characters) and DerivationDescription (the whole SHA-256); without it
    only the Manufacturer is set.
    """
    ds.Manufacturer = MANUFACTURER
    if algorithm is None:
        return
    ds.ManufacturerModelName = f"{algorithm.family} {algorithm.version}"[:64]
    ds.SoftwareVersions = [str(algorithm.version)[:64], f"weights sha256 {algorithm.weights_sha256[:16]}"]
    ds.DerivationDescription = (f"Produced by model {algorithm.family} {algorithm.version}, weights SHA-256 "
                                f"{algorithm.weights_sha256}")


def _new_result_object(sop_class_uid: str, reference: Dataset, modality: str, description: str,
                       series_number: int, algorithm: Any = None) -> Dataset:
    """A new single-instance series in the study of ``reference``: patient and study copied, UIDs new."""
    ds = _new_file_dataset(sop_class_uid)
    stamp_provenance(ds, algorithm)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in reference:
            setattr(ds, keyword, reference.data_element(keyword).value)
        elif keyword in TYPE2_PATIENT_STUDY_KEYWORDS:
            setattr(ds, keyword, "")
    now = datetime.now()
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber, ds.InstanceNumber = series_number, 1
    ds.SeriesDescription = description[:64]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return ds


def secondary_capture(rgb: np.ndarray, reference: Dataset, *, description: str, series_number: int = 9000,
                      algorithm: Any = None) -> Dataset:
    """A Secondary Capture Image Storage object of an RGB image (rows, columns, 3 uint8).

    Patient and study come from ``reference``; series and instance UIDs are new; ``algorithm``
    (model provenance) is stamped as ``stamp_provenance`` says.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"secondary capture needs (rows, columns, 3) uint8 pixels, got {rgb.shape} {rgb.dtype}")
    ds = _new_result_object(SECONDARY_CAPTURE_SOP_CLASS, reference, "OT", description, series_number, algorithm)
    ds.ConversionType = "WSD"
    ds.Laterality = ""  # type 2C in the general series module; empty: not a paired body part
    ds.PatientOrientation = ""  # type 2C in the general image module; empty: no orientation known
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rgb.shape[0]), int(rgb.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def structured_report(reference: Dataset, findings: dict[str, str], *, description: str,
                      series_number: int = 9100) -> Dataset:
    """A Basic Text SR: one TEXT finding per ``findings`` entry (name -> text), under a report title.

    Patient and study come from ``reference``; series and instance UIDs are new.
    """
    ds = _new_result_object(BASIC_TEXT_SR_SOP_CLASS, reference, "SR", description, series_number)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.Manufacturer = ""  # type 2 attributes of the equipment, series and document modules
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    items = []
    for name, text in findings.items():
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
        item.TextValue = f"{name}: {text}"[:1024]
        items.append(item)
    ds.ContentSequence = items
    return ds


def series_from_volume(
    voxels: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    description: str = "Generated series",
    study_uid: str | None = None,
    patient_id: str = "ANON",
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    rescale: tuple[float, float] = (1.0, 0.0),
) -> list[Dataset]:
    """An MR series holding ``voxels`` (depth, rows, columns) of int16/uint16 stored values.

    Slice k sits at ``origin + k * spacing[0] * normal``. Used by the tests and tools to turn
    arrays (e.g. a NIfTI volume) into a study a viewer would send.
    """
    if voxels.ndim != 3 or voxels.dtype not in (np.int16, np.uint16):
        raise ValueError(f"voxels must be a 3D int16 or uint16 array, got {voxels.ndim}D {voxels.dtype}")
    study_uid = study_uid or generate_uid()
    series_uid, frame_of_reference = generate_uid(), generate_uid()
    row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    out = []
    for k, plane in enumerate(voxels):
        ds = _new_file_dataset(MR_IMAGE_SOP_CLASS)
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = "MR"
        ds.SeriesDescription = description
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, float) + k * spacing[0] * normal]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.SliceThickness = float(spacing[0])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if voxels.dtype == np.int16 else 0
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        out.append(ds)
    return out


def write_series(datasets: Iterable[Dataset], folder: str | os.PathLike) -> list[Path]:
    """Write datasets as ``NNNNNN.dcm`` files into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
