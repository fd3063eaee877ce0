"""Check every DICOM instance of a request once, before any handler reads it: a clear 422, never a 500.

``validate_instances(parts, max_series_voxels=...)`` reads each part's header (pixels not read,
not decoded; ``inference.dicom.header``) and checks what pixel decoding needs: Rows, Columns,
BitsAllocated, BitsStored, SamplesPerPixel, PhotometricInterpretation, NumberOfFrames with
possible values, and that the Pixel Data element holds exactly the bytes they imply and that the
file really contains them (a truncated file). It also bounds the voxels of each series, before a
handler allocates them. Any defect is an ``UnprocessableInput`` (422) naming the part and the defect.

It returns one ``DicomInstance`` per DICOM part (``inference.dicom.instance``), which the pipeline
hands to the handler: headers are parsed once, here or while the request streamed in
(``read_header_early``, whose results the caller passes back as ``early_headers``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydicom.uid import DeflatedExplicitVRLittleEndian

from inference.dicom.attributes import check_attributes
from inference.dicom.header import SERIES_INSTANCE_UID, InstanceHeader, read_header
from inference.dicom.instance import DicomInstance, describe_source
from inference.errors import UnprocessableInput

log = logging.getLogger("inference.dicom_validation")

ALLOWED_BITS_ALLOCATED = (1, 8, 16, 32, 64)
ALLOWED_SAMPLES_PER_PIXEL = (1, 3)
SOP_INSTANCE_UID = 0x00080018
#: The integer attributes pixel decoding needs, keyword -> tag.
IMAGE_INTEGERS = {"Rows": 0x00280010, "Columns": 0x00280011, "BitsAllocated": 0x00280100, "SamplesPerPixel": 0x00280002,
                  "BitsStored": 0x00280101, "NumberOfFrames": 0x00280008, "PixelRepresentation": 0x00280103}
PHOTOMETRIC_INTERPRETATION = 0x00280004


def validate_instances(parts: Sequence[Any], *, max_series_voxels: int,
                       early_headers: Mapping[int, InstanceHeader] | None = None) -> list[DicomInstance]:
    """The request's DICOM parts as checked instances, in the order sent; a 422 naming the part otherwise.

    Parts are request parts (``inference.protocol.multipart_request.Part``) or binary files.
    Leading parts that are not DICOM and not labelled ``application/dicom`` are attachments and
    skipped. A request with no DICOM part passes (the handler decides). ``early_headers`` are
    headers already read, by part index (``read_header_early``).
    """
    instances: list[DicomInstance] = []
    voxels_by_series: dict[str, int] = {}
    early = early_headers or {}
    for position, part in enumerate(parts):
        header = _read_header(part, position, attachment_allowed=not instances,
                              early=early.get(getattr(part, "index", -1)))
        if header is None:
            continue
        where = _Describe(part, position)
        if header.prechecked is not None:  # checked while the request streamed in (read_header_early)
            attributes, voxels = header.prechecked
        else:
            attributes = check_attributes(header, where)  # every attribute downstream code reads
            voxels = check_image_header(header, where)
        series = header.text(SERIES_INSTANCE_UID) or ""
        voxels_by_series[series] = voxels_by_series.get(series, 0) + voxels
        if voxels_by_series[series] > max_series_voxels:
            raise UnprocessableInput(
                f"series {series or '(no SeriesInstanceUID)'} holds more than {max_series_voxels} voxels "
                f"(the limit, INFERENCE_MAX_SERIES_VOXELS) by {describe_source(part, position)}; send a smaller "
                "series or crop it")
        instances.append(DicomInstance(part, header, position, attributes))
    return instances


class _Describe:
    """A part's description, worked out only when a message needs it (most parts pass)."""

    def __init__(self, part: Any, position: int) -> None:
        self.part, self.position = part, position

    def __str__(self) -> str:
        return describe_source(self.part, self.position)


def read_header_early(part: Any) -> InstanceHeader | None:
    """A finished request part's DICOM header, read while the rest of the request streams in.

    ``validate_instances`` then reuses it (``early_headers``); a part that does not read gives
    None and is read again there, which reports the defect. Part 0, the request JSON, is skipped.
    An instance's attributes and image header are checked here too (``InstanceHeader.prechecked``).
    """
    if getattr(part, "index", 0) == 0:
        return None
    try:
        header = read_header(part)
    except Exception:  # not DICOM, or damaged: validate_instances says so, with the part's name
        return None
    if SOP_INSTANCE_UID in header:
        # checked now, hidden behind the rest of the upload; a defect is found again, and worded, in
        # validate_instances (which knows the part's position and whether it may be an attachment)
        where = _Describe(part, getattr(part, "index", 1) - 1)
        try:
            header.prechecked = (check_attributes(header, where), check_image_header(header, where))
        except Exception:  # validate_instances checks it again and reports the defect
            pass
    return header


def _read_header(part: Any, position: int, *, attachment_allowed: bool,
                 early: InstanceHeader | None) -> InstanceHeader | None:
    """The part's header (``early`` when already read); None for a leading attachment; a 422 for anything not DICOM."""
    labelled_dicom = getattr(part, "content_type", "application/dicom") == "application/dicom"
    try:
        header = early or read_header(part)
    except Exception as exc:  # pydicom raises many kinds on garbage
        if attachment_allowed and not labelled_dicom:
            return None
        where = describe_source(part, position)
        log.info("%s is not readable DICOM: %s: %s", where, type(exc).__name__, exc)
        raise UnprocessableInput(f"{where} is not a readable DICOM file (damaged or truncated header, "
                                 "or not DICOM); send the instance as stored by the modality or PACS") from None
    if SOP_INSTANCE_UID in header:
        return header
    if attachment_allowed and not labelled_dicom:
        return None  # a file that happens to parse, before the DICOM parts: an attachment
    raise UnprocessableInput(f"{describe_source(part, position)} is not a readable DICOM file: its header has no "
                             "SOPInstanceUID (0008,0018) (a truncated header, or not an instance); send the instance "
                             "as stored by the modality or PACS")


def _integer(header: InstanceHeader, keyword: str, describe: Any, *, default: int | None = None) -> int:
    """An integer attribute, or a 422 saying it is missing or unreadable."""
    tag = IMAGE_INTEGERS[keyword]
    try:
        value = header.integer(tag)
    except Exception:  # a malformed element raises whatever its VR's converter raises
        raise UnprocessableInput(f"{describe}: {keyword} is not a single integer") from None
    if value is not None:
        return value
    if tag not in header:
        if default is not None:
            return default
        raise UnprocessableInput(f"{describe}: {keyword} is missing; pixel decoding needs it")
    raise UnprocessableInput(f"{describe}: {keyword} is not a single integer")


def check_image_header(header: InstanceHeader, describe: Any) -> int:
    """Check one instance's image attributes against its Pixel Data; its voxel count, or a 422."""
    rows = _integer(header, "Rows", describe)
    columns = _integer(header, "Columns", describe)
    bits_allocated = _integer(header, "BitsAllocated", describe)
    samples = _integer(header, "SamplesPerPixel", describe)
    bits_stored = _integer(header, "BitsStored", describe)
    frames = _integer(header, "NumberOfFrames", describe, default=1)
    representation = _integer(header, "PixelRepresentation", describe)
    if not 0 < rows <= 65535 or not 0 < columns <= 65535:
        raise UnprocessableInput(f"{describe}: image size {rows} x {columns} is impossible "
                                 "(Rows and Columns must be 1 to 65535)")
    if bits_allocated not in ALLOWED_BITS_ALLOCATED:
        raise UnprocessableInput(f"{describe}: BitsAllocated {bits_allocated} is impossible "
                                 f"(one of {', '.join(map(str, ALLOWED_BITS_ALLOCATED))})")
    if not 0 < bits_stored <= bits_allocated:
        raise UnprocessableInput(f"{describe}: BitsStored {bits_stored} must be 1 to BitsAllocated ({bits_allocated})")
    if samples not in ALLOWED_SAMPLES_PER_PIXEL:
        raise UnprocessableInput(f"{describe}: SamplesPerPixel {samples} is not supported (1 or 3)")
    if frames < 1:
        raise UnprocessableInput(f"{describe}: NumberOfFrames {frames} must be at least 1")
    if representation not in (0, 1):
        raise UnprocessableInput(f"{describe}: PixelRepresentation {representation} must be 0 or 1")
    if not (header.text(PHOTOMETRIC_INTERPRETATION) or "").strip():
        raise UnprocessableInput(f"{describe}: PhotometricInterpretation is missing; pixel decoding needs it")
    pixel, file_size, syntax = header.pixel, header.file_size, header.transfer_syntax
    if pixel is None:
        if syntax == DeflatedExplicitVRLittleEndian:  # the pixels are inside the deflated stream
            return rows * columns * frames
        raise UnprocessableInput(f"{describe}: the instance has no Pixel Data; send image instances only")
    compressed = syntax.is_transfer_syntax and syntax.is_compressed
    if pixel.length is None:
        if not compressed:
            raise UnprocessableInput(f"{describe}: Pixel Data has an undefined length but the transfer syntax "
                                     f"{syntax.name} is not compressed")
        return rows * columns * frames  # encapsulated fragments: their sizes are the codec's business
    if pixel.offset + pixel.length > file_size:
        raise UnprocessableInput(f"{describe}: the file is truncated: Pixel Data announces {pixel.length} bytes "
                                 f"but the file ends {file_size - pixel.offset} bytes after it starts")
    if not compressed:
        expected = math.ceil(rows * columns * frames * samples * bits_allocated / 8)
        if pixel.length not in (expected, expected + expected % 2):
            how = "shorter" if pixel.length < expected else "longer"
            raise UnprocessableInput(
                f"{describe}: Pixel Data is {pixel.length} bytes, {how} than the {expected} bytes that "
                f"{frames} frame(s) of {rows} x {columns} x {samples} sample(s) at {bits_allocated} bits need")
    return rows * columns * frames
