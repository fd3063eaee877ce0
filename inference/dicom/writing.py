"""New DICOM objects: derived series, Secondary Capture and Basic Text SR results, generated series, files.

Every object written is stamped with the gateway as Manufacturer (and the model's provenance when
given), so a result found in a PACS leads back to what made it.

One rule for every result writer (derived series, SC, SEG, SR, correction SR): what a writer *reads* from an
input instance is checked at the boundary (``inference.dicom.attributes``: a 422 naming the element); what it
merely *copies* is copied only when it can be written. ``dataset_bytes`` writes a result, and when pydicom
cannot write it, drops each element that cannot be decoded or encoded (a damaged value, a wrong VR, a file
meta element inside the data set, a broken sequence item) with a warning in the log naming it, and writes the rest.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from inference.dicom.series import Volume

log = logging.getLogger("inference.dicom.writing")

SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"
MR_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"


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
    out: list[Dataset] = []
    for ds, values in zip(volume.datasets, voxels, strict=True):
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
    """``ds`` as the bytes of a DICOM file (preamble, file meta, explicit VR little endian).

    When pydicom cannot write it, the elements it cannot write are dropped (``writable_copy``, each named in
    a warning), the file meta made again from the SOP Class and Instance UIDs, and the rest written.
    """
    buffer = io.BytesIO()
    try:
        if damaged := undecodable(ds):  # pydicom would copy them as read, for any reader to trip on
            raise ValueError(f"{', '.join(damaged)} cannot be decoded")
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as error:
        clean, dropped = writable_copy(ds)
        if not dropped and _meta_is_whole(ds):
            raise  # nothing damaged to drop: the writer's own fault
        what = f"instance {ds.get('SOPInstanceUID', '(no SOPInstanceUID)')}"
        log.warning("%s cannot be written as it is (%s: %s); written without %s", what, type(error).__name__,
                    error, ", ".join(dropped) if dropped else "its damaged file meta")
        clean.file_meta = _file_meta(clean)
        clean.preamble = b"\0" * 128
        buffer = io.BytesIO()
        clean.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


#: VRs whose value pydicom parses when it decodes one (sequences, binary numbers): a damaged one raises there.
#: Text of any VR decodes (undecodable bytes become replacement characters) and is written back as read.
PARSED_VRS = frozenset({"SQ", "US", "SS", "UL", "SL", "FL", "FD", "AT", "UV", "SV"})


def undecodable(ds: Dataset, where: str = "") -> list[str]:
    """The elements of ``ds`` still as read (raw) whose value cannot be decoded, sequence items included.

    Only raw elements of ``PARSED_VRS`` are decoded to find out (the others are written back as they were
    read), so checking a source instance costs little.
    """
    bad = []
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if not isinstance(element, RawDataElement) or element.VR not in PARSED_VRS:
            if isinstance(element, DataElement) and element.VR == "SQ":
                bad += _undecodable_items(element, f"{where}{tag} {_keyword(tag)}".rstrip())
            continue
        name = f"{where}{tag} {_keyword(tag)}".rstrip()
        try:
            decoded = ds[tag]
        except Exception:
            bad.append(name)
            continue
        if decoded.VR == "SQ":
            bad += _undecodable_items(decoded, name)
    return bad


def _undecodable_items(element: DataElement, name: str) -> list[str]:
    bad = []
    for index, item in enumerate(element.value or ()):
        if isinstance(item, Dataset):
            bad += undecodable(item, f"{name}[{index}] > ")
        else:
            bad.append(f"{name}[{index}]")
    return bad


def _meta_is_whole(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    try:
        return meta is not None and all(meta.get(k) for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                                                               "TransferSyntaxUID"))
    except Exception:
        return False


def _file_meta(clean: Dataset) -> FileMetaDataset:
    """File meta for ``clean``: its SOP Class and Instance UIDs, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(clean.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(clean.SOPInstanceUID))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def writable_copy(ds: Dataset, where: str = "") -> tuple[Dataset, list[str]]:
    """A deep copy of ``ds``'s data set holding only the elements pydicom can write as explicit VR little endian,
    and the names of those dropped (``(gggg,eeee) Keyword``, sequence items as ``...[i] > (gggg,eeee)``).

    Dropped: an element that cannot be decoded (an unknown VR, a value its VR cannot hold) or encoded (text
    its character set cannot hold, a value of the wrong type), a file meta element (group 0002) inside the
    data set, a sequence item that is not a data set; a sequence keeps its writable items' writable elements.
    """
    out, dropped = Dataset(), []
    try:
        encodings = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")
    except Exception:
        encodings = convert_encodings("ISO_IR 6")
    for tag in list(ds.keys()):
        name = f"{where}{tag} {_keyword(tag)}".rstrip()
        if tag.group == 0x0002:
            dropped.append(name)
            continue
        try:
            element = ds[tag]  # decodes a raw element
            if element.VR == "SQ":
                items = []
                for index, item in enumerate(element.value or ()):
                    if not isinstance(item, Dataset):
                        dropped.append(f"{name}[{index}]")
                        continue
                    clean, lost = writable_copy(item, f"{name}[{index}] > ")
                    items.append(clean)
                    dropped += lost
                out.add(DataElement(tag, "SQ", DicomSequence(items)))
                continue
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, element, encodings)
        except Exception:
            dropped.append(name)
            continue
        out.add(copy.deepcopy(element))
    return out, dropped


def _keyword(tag: Any) -> str:
    return pydicom.datadict.keyword_for_tag(tag) or ("private" if tag.is_private else "")


def _new_file_dataset(sop_class_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
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
            setattr(ds, keyword, reference[keyword].value)
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
