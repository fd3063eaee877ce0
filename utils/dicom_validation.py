"""Check every DICOM instance of a request once, before any handler reads it: a clear 422, never a 500.

``validate_instances(parts, max_series_voxels=...)`` reads each part's header (pixels not read,
not decoded) and checks what pixel decoding needs: Rows, Columns, BitsAllocated, BitsStored,
SamplesPerPixel, PhotometricInterpretation, NumberOfFrames with possible values, and that the
Pixel Data element holds exactly the bytes they imply and that the file really contains them
(a truncated file). It also bounds the voxels of each series, before a handler allocates them.
Any defect is an ``UnprocessableInput`` (422) naming the part and the defect.

The header datasets it reads are kept on the parts (``part.header_dataset``), so a handler's
``utils.dicom.load_instances(..., stop_before_pixels=True)`` does not parse them a second time.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

from utils.errors import UnprocessableInput

log = logging.getLogger("inference.dicom_validation")

PIXEL_DATA_TAG = 0x7FE00010
#: Explicit-VR value representations whose length field is 4 bytes (after 2 reserved bytes).
LONG_LENGTH_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED_LENGTH = 0xFFFFFFFF
ALLOWED_BITS_ALLOCATED = (1, 8, 16, 32, 64)
ALLOWED_SAMPLES_PER_PIXEL = (1, 3)


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data value lies in the file: its offset and length (None: undefined)."""

    offset: int
    length: int | None


def validate_instances(parts: Sequence[Any], *, max_series_voxels: int) -> list[Dataset]:
    """The header datasets of the request's DICOM parts, each checked; 422 naming the part otherwise.

    Parts are request parts (``utils.multipart.Part``) or binary files. Leading parts that are not
    DICOM and not labelled ``application/dicom`` are attachments and skipped, as
    ``utils.dicom.load_instances`` does. A request with no DICOM part passes (the handler decides).
    """
    datasets: list[Dataset] = []
    voxels_by_series: dict[str, int] = {}
    for position, part in enumerate(parts):
        describe = part.describe() if hasattr(part, "describe") else f"part {position + 1}"
        read = _read_header(part, describe, attachment_allowed=not datasets)
        if read is None:
            continue
        ds, pixel, file_size = read
        voxels = check_image_header(ds, pixel, file_size, describe)
        series = str(ds.get("SeriesInstanceUID", ""))
        voxels_by_series[series] = voxels_by_series.get(series, 0) + voxels
        if voxels_by_series[series] > max_series_voxels:
            raise UnprocessableInput(
                f"series {series or '(no SeriesInstanceUID)'} holds more than {max_series_voxels} voxels "
                f"(the limit, INFERENCE_MAX_SERIES_VOXELS) by {describe}; send a smaller series or crop it")
        ds.source_part = part
        try:
            part.header_dataset = ds
        except AttributeError:  # a file object that takes no attributes: it is parsed again later
            pass
        datasets.append(ds)
    return datasets


def _read_header(part: Any, describe: str, *, attachment_allowed: bool) -> tuple[Dataset, PixelElement | None, int] | None:
    """The header dataset, the Pixel Data element's place and the file size; None for an attachment."""
    handle = _open(part)
    try:
        try:
            ds = pydicom.dcmread(handle, stop_before_pixels=True)
            if "SOPInstanceUID" not in ds:
                raise InvalidDicomError("no SOPInstanceUID")
        except Exception as exc:  # pydicom raises many kinds on garbage
            labelled_dicom = getattr(part, "content_type", "application/dicom") == "application/dicom"
            if attachment_allowed and not labelled_dicom:
                return None
            log.info("%s is not readable DICOM: %s: %s", describe, type(exc).__name__, exc)
            raise UnprocessableInput(f"{describe} is not a readable DICOM file (damaged or truncated header, "
                                     "or not DICOM); send the instance as stored by the modality or PACS") from None
        syntax = UID(ds.file_meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2")
        pixel = None if syntax == DeflatedExplicitVRLittleEndian else _pixel_element(handle, ds, syntax)
        handle.seek(0, 2)
        return ds, pixel, handle.tell()
    finally:
        if handle is not part:
            handle.close()


def _open(part: Any) -> BinaryIO:
    if hasattr(part, "open"):
        return part.open()
    part.seek(0)
    return part


def _pixel_element(handle: BinaryIO, ds: Dataset, syntax: UID) -> PixelElement | None:
    """The Pixel Data element that follows the header (where ``stop_before_pixels`` left the file).

    None when the dataset has no Pixel Data. Only the element's tag and length are read.
    """
    start = handle.tell()
    head = handle.read(12)
    implicit, little = ds.original_encoding  # as pydicom actually read it, whatever the meta says
    if implicit is None:
        implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
        little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    order = "<" if little else ">"
    if len(head) < 8:
        return None
    group, element = struct.unpack(order + "HH", head[:4])
    if (group << 16 | element) != PIXEL_DATA_TAG:
        return None  # no Pixel Data (or Float Pixel Data, which the handlers do not read)
    if implicit:
        (length,) = struct.unpack(order + "L", head[4:8])
        offset = start + 8
    elif head[4:6] in LONG_LENGTH_VRS:
        if len(head) < 12:
            return PixelElement(start + 12, 0)
        (length,) = struct.unpack(order + "L", head[8:12])
        offset = start + 12
    else:
        (length,) = struct.unpack(order + "H", head[6:8])
        offset = start + 8
    return PixelElement(offset, None if length == UNDEFINED_LENGTH else length)


def _integer(ds: Dataset, keyword: str, describe: str, *, default: int | None = None) -> int:
    """An integer attribute, or a 422 saying it is missing or unreadable."""
    if keyword not in ds:
        if default is not None:
            return default
        raise UnprocessableInput(f"{describe}: {keyword} is missing; pixel decoding needs it")
    try:
        value = ds[keyword].value
        if isinstance(value, (list, tuple)) or value is None or value == "":
            raise ValueError
        number = float(value)
        if not number.is_integer():
            raise ValueError
        return int(number)
    except Exception:  # a malformed element raises whatever its VR's converter raises
        raise UnprocessableInput(f"{describe}: {keyword} is not a single integer") from None


def check_image_header(ds: Dataset, pixel: PixelElement | None, file_size: int, describe: str) -> int:
    """Check one instance's image attributes against its Pixel Data; its voxel count, or a 422."""
    rows = _integer(ds, "Rows", describe)
    columns = _integer(ds, "Columns", describe)
    bits_allocated = _integer(ds, "BitsAllocated", describe)
    samples = _integer(ds, "SamplesPerPixel", describe)
    bits_stored = _integer(ds, "BitsStored", describe, default=bits_allocated)
    frames = _integer(ds, "NumberOfFrames", describe, default=1)
    representation = _integer(ds, "PixelRepresentation", describe, default=0)
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
    if not str(ds.get("PhotometricInterpretation", "") or "").strip():
        raise UnprocessableInput(f"{describe}: PhotometricInterpretation is missing; pixel decoding needs it")
    if pixel is None:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds or ds.file_meta.get("TransferSyntaxUID") == \
                DeflatedExplicitVRLittleEndian:
            return rows * columns * frames
        raise UnprocessableInput(f"{describe}: the instance has no Pixel Data; send image instances only")
    syntax = UID(ds.file_meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2")
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
