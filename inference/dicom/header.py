"""Read the header of a DICOM instance fast, for the request path; pydicom decodes the values.

Every instance of a request has its header read before a handler runs (``inference.dicom.validation``).
``pydicom.dcmread(..., stop_before_pixels=True)`` spends about 0.4-0.5 ms on a small file here,
which made header parsing most of a small study's request time (bench/README.md, "Gateway
speed"). ``read_header`` walks the element headers of the common encoding (a Part 10 file whose
data set is explicit or implicit VR little endian, which includes every compressed pixel syntax)
in about a tenth of that, and keeps each element raw, as pydicom's own reader does: the
``dataset`` it gives is a pydicom ``FileDataset`` of ``RawDataElement``s, decoded by pydicom
when accessed. Anything else (big endian, deflated, no preamble, a header that does not walk
cleanly) is read by ``pydicom.dcmread``, so pydicom decides what is readable and its errors apply.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from typing import Any, BinaryIO

import pydicom
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

PIXEL_DATA = 0x7FE00010
SERIES_INSTANCE_UID = 0x0020000E
STUDY_INSTANCE_UID = 0x0020000D
ROWS = 0x00280010
COLUMNS = 0x00280011
SPECIFIC_CHARACTER_SET = 0x00080005
#: Where ``stop_before_pixels`` stops, as pydicom does: Pixel Data, Float and Double Float Pixel Data.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, PIXEL_DATA})
UNDEFINED_LENGTH = 0xFFFFFFFF
#: Explicit-VR value representations whose length field is 4 bytes (after 2 reserved bytes).
LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
                             b"UV"})
SHORT_LENGTH_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
                              b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
#: Explicit VR bytes -> (VR name, whether its length field is 4 bytes).
_VRS = {vr: (vr.decode(), vr in LONG_LENGTH_VRS) for vr in LONG_LENGTH_VRS | SHORT_LENGTH_VRS}
#: Groups the element loop looks at twice: command (0), file meta (2), pixels (7FE0), delimiters (FFFE).
_SPECIAL_GROUPS = frozenset({0x0000, 0x0002, 0x7FE0, 0xFFFE})
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Bytes read first from a part on disk; a header longer than this is read whole.
HEAD_BYTES = 64 * 1024

#: RawDataElement from one tuple of its nine fields, in C (namedtuple's ``_make`` is a Python call).
_raw = partial(tuple.__new__, RawDataElement)
#: The pydicom this module was proven against (tests/test_dicom_header.py); requirements.txt pins its minor version.
PYDICOM_SERIES = "3.0."
RAW_DATA_ELEMENT_FIELDS = ("tag", "VR", "length", "value", "value_tell", "is_implicit_VR", "is_little_endian",
                           "is_raw", "is_buffered")


def check_pydicom_internals() -> None:
    """Fail at import, saying what to do, when pydicom is not the one whose internals this reader relies on.

    The walk builds pydicom's ``RawDataElement`` tuples field by field and a ``FileDataset`` of them;
    another pydicom could take those fields otherwise and decode values wrongly, not fail.
    """
    problems = []
    if not pydicom.__version__.startswith(PYDICOM_SERIES):
        problems.append(f"pydicom {pydicom.__version__} is installed, {PYDICOM_SERIES}x expected")
    if RawDataElement._fields != RAW_DATA_ELEMENT_FIELDS:
        problems.append(f"RawDataElement's fields are {RawDataElement._fields}")
    probe = _raw((BaseTag(0x00280010), "US", 2, b"\x10\x00", 0, False, True, True, False))
    ds = FileDataset(io.BytesIO(), {probe.tag: probe}, b"\0" * 128, FileMetaDataset(), False, True)
    ds.set_original_encoding(False, True, default_encoding)
    if ds.Rows != 16 or ds.original_encoding != (False, True):
        problems.append("a FileDataset of raw elements no longer decodes as it did")
    if problems:
        raise ImportError("inference.dicom.header relies on pydicom 3.0's internals: " + "; ".join(problems) +
                          ". Install the pydicom of requirements.txt, or re-prove the reader against this one "
                          "(tests/test_dicom_header.py) and update PYDICOM_SERIES")


_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_U32 = struct.Struct("<L")
_U16 = struct.Struct("<H")
check_pydicom_internals()


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data value lies in the file: its offset and length (None: undefined)."""

    offset: int
    length: int | None


class InstanceHeader:
    """One instance's header: its elements up to the pixels (raw until read), where Pixel Data lies, the file size."""

    def __init__(self, dataset_factory: Any, elements: dict, meta: dict, *, raw_little_endian: bool,
                 pixel: PixelElement | None, file_size: int) -> None:
        self._factory = dataset_factory
        self._elements = elements
        self._meta = meta
        self._raw_readable = raw_little_endian  # raw values may be decoded here (else: by pydicom)
        self.pixel = pixel
        self.file_size = file_size
        #: (checked attributes, voxel count) when ``inference.dicom.validation`` checked this header
        #: while the request streamed in; it then does not check it again
        self.prechecked: tuple[Any, int] | None = None

    @cached_property
    def dataset(self) -> FileDataset:
        """The header as pydicom reads it with ``stop_before_pixels=True`` (values decoded on access)."""
        return self._factory()

    def __contains__(self, tag: int) -> bool:
        return tag in self._elements

    def raw_element(self, tag: int) -> RawDataElement | None:
        """The element as the fast walk stored it (undecoded); None when absent or read by pydicom."""
        return self._elements.get(tag)

    @property
    def transfer_syntax(self) -> UID:
        """The file meta's Transfer Syntax UID (implicit VR little endian when absent)."""
        return _uid(self.text(0x00020010, meta=True) or ImplicitVRLittleEndian)

    def text(self, tag: int, *, meta: bool = False) -> str | None:
        """A string element's value, padding removed; None when absent."""
        elements = self._meta if meta else self._elements
        if tag not in elements:
            return None
        raw = self._raw_bytes(elements[tag])
        if raw is not None:
            return raw.decode("ascii", "replace").rstrip("\x00 ")
        value = (self.dataset.file_meta if meta else self.dataset)[tag].value
        return None if value is None else str(value)

    def integer(self, tag: int) -> int | None:
        """A single integer's value (US, SS, UL, SL or IS); None when absent or empty.

        Raises ``ValueError`` for anything that is not one integer (several values, text, a fraction).
        """
        if tag not in self._elements:
            return None
        raw = self._raw_bytes(self._elements[tag])
        if raw is not None:
            vr = self._elements[tag].VR or dictionary_vr(tag)
            if vr == "US" and len(raw) == 2:
                return _U16.unpack(raw)[0]
            if vr == "IS" and b"\\" not in raw:
                text = raw.decode("ascii").strip("\x00 ")
                return _whole_number(text) if text else None
        value = self.dataset[tag].value  # any other VR or shape: pydicom decodes it
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple, MultiValue, bytes, bytearray)):
            raise ValueError("not a single value")
        return _whole_number(value)

    def numbers(self, tag: int) -> list[float] | None:
        """A DS or IS element's values as floats; None when absent or empty."""
        if tag not in self._elements:
            return None
        element = self._elements[tag]
        raw = self._raw_bytes(element)
        if raw is not None and (element.VR or dictionary_vr(tag)) in ("DS", "IS"):
            text = raw.decode("ascii", "replace").strip("\x00 ")
            if not text:
                return None
            try:
                return [float(v) for v in text.split("\\")]
            except ValueError:
                pass  # not plain decimal text: pydicom decides
        return as_floats(self.dataset[tag].value)

    def _raw_bytes(self, element: Any) -> bytes | None:
        if self._raw_readable and isinstance(element, RawDataElement) and isinstance(element.value, bytes):
            return element.value
        return None


def as_floats(value: Any) -> list[float] | None:
    """A decoded numeric value (one number or several) as a list of floats; None when empty."""
    if value is None or value == "":
        return None
    return [float(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else [float(value)]


@lru_cache(maxsize=64)
def _uid(text: str) -> UID:
    """A UID object, built once per value (pydicom validates each one it builds)."""
    return UID(text)


def _whole_number(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(number)


def read_header(source: Any) -> InstanceHeader:
    """The header of ``source``: a request part, bytes, or a binary file.

    A request part is an ``inference.protocol.multipart_request.Part``.
    Raises whatever ``pydicom.dcmread`` raises for a file it cannot read.
    """
    buffer, file_size, whole = _head(source, HEAD_BYTES)
    walked = _walk(buffer, file_size)
    if walked is _NEED_MORE and not whole:
        buffer, file_size, whole = _head(source, None)
        walked = _walk(buffer, file_size)
    if isinstance(walked, tuple):
        return _fast_header(*walked, file_size=file_size)
    return _pydicom_header(source)


def _head(source: Any, n: int | None) -> tuple[Any, int, bool]:
    """At least the first ``n`` bytes of ``source`` (all with None) as bytes, the file size, whether that is all."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = source if type(source) is bytes else bytes(source)
        return data, len(data), True
    if hasattr(source, "head"):  # a request part: no copy while it is in memory
        data = source.head(n)
        return data, source.size, len(data) >= source.size
    source.seek(0, io.SEEK_END)
    size = source.tell()
    source.seek(0)
    data = source.read(-1 if n is None else n)
    return data, size, len(data) >= size


_NEED_MORE = object()  # the buffer ended inside the header, and more of the file exists
_NOT_FAST = object()  # not the common encoding, or not clean: pydicom reads it


def _walk(buf: bytes, file_size: int) -> tuple | object:
    """(meta, data set elements, implicit, pixel element, preamble) of a clean common file, else a marker."""
    end = len(buf)
    if end < 132 or buf[128:132] != b"DICM":
        return _NOT_FAST if end >= min(file_size, 132) else _NEED_MORE
    meta: dict = {}
    pos = 132
    while True:  # file meta: group 2, explicit VR little endian
        if pos + 8 > end:
            return _NEED_MORE if end < file_size else _NOT_FAST
        group, element, vr, short = _EXPLICIT.unpack_from(buf, pos)
        if group != 2:
            break
        pos, raw = _explicit_element(buf, pos, group << 16 | element, vr, short, end)
        if raw is None:
            return _NOT_FAST
        if raw is _NEED_MORE:
            return _NEED_MORE if end < file_size else _NOT_FAST
        meta[raw.tag] = raw
    syntax_raw = meta.get(0x00020010)
    if syntax_raw is None:
        return _NOT_FAST
    syntax = _uid(syntax_raw.value.decode("ascii", "replace").rstrip("\x00 "))
    if syntax in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian) or not syntax.is_transfer_syntax:
        return _NOT_FAST  # including private syntaxes: pydicom knows their encodings
    implicit = syntax == ImplicitVRLittleEndian
    # pydicom checks that the data set is encoded as announced; a mismatch is left to it
    if pos + 6 <= end and (buf[pos + 4:pos + 6] in _VRS) == implicit:
        return _NOT_FAST
    elements: dict = {}
    pixel = None
    unpack, vrs, make, as_tag = _EXPLICIT.unpack_from, _VRS, _raw, BaseTag  # locals: this loop runs per element
    while pos + 8 <= end:
        group, element, vr, short = unpack(buf, pos)
        tag = group << 16 | element
        if group in _SPECIAL_GROUPS:
            if tag in PIXEL_TAGS:
                if tag == PIXEL_DATA:
                    pixel = _pixel_element(buf, pos, implicit)
                break
            if group != 0x7FE0:
                return _NOT_FAST  # command or meta elements in the data set, stray delimiters
        if not implicit:
            known = vrs.get(vr)
            if known is not None and not known[1]:  # most elements: a short explicit one, inline
                start = pos + 8
                pos = start + short
                if pos > end:
                    return _NEED_MORE if end < file_size else _NOT_FAST
                elements[tag] = make((as_tag(tag), known[0], short, buf[start:pos], start, False, True, True, False))
                continue
            pos, raw = _explicit_element(buf, pos, tag, vr, short, end)
            if raw is None:
                return _NOT_FAST
            if raw is _NEED_MORE:
                return _NEED_MORE if end < file_size else _NOT_FAST
            elements[tag] = raw
            continue
        (length,) = _U32.unpack_from(buf, pos + 4)
        start = pos + 8
        if length == UNDEFINED_LENGTH:
            if dictionary_vr(tag) != "SQ":
                return _NOT_FAST
            stop = _sequence_end(buf, start, implicit)
            if stop is None:
                return _NEED_MORE if end < file_size else _NOT_FAST
            elements[tag] = make((as_tag(tag), None, UNDEFINED_LENGTH, buf[start:stop - 8], start,
                                  True, True, True, False))
            pos = stop
            continue
        pos = start + length
        if pos > end:
            return _NEED_MORE if end < file_size else _NOT_FAST
        elements[tag] = make((as_tag(tag), None, length, buf[start:pos], start, True, True, True, False))
    else:
        if pos < file_size and end < file_size:
            return _NEED_MORE
    charset = elements.get(SPECIFIC_CHARACTER_SET)
    if charset is not None and not (charset.VR in (None, "CS") and charset.value.isascii()):
        return _NOT_FAST  # dcmread decodes the character set while reading: it judges one that is not text
    return meta, elements, implicit, pixel, buf[:128]


def dictionary_vr(tag: int) -> str | None:
    """The data dictionary's VR of ``tag``; None for private or unknown tags."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _explicit_element(buf: Any, pos: int, tag: int, vr: bytes, short: int, end: int) -> tuple[int, Any]:
    """(next position, raw element) of the explicit-VR element at ``pos``; None when not clean, _NEED_MORE."""
    known = _VRS.get(vr)
    if known is None:
        return pos, None
    name, long = known
    if not long:
        start, length = pos + 8, short
    else:
        if pos + 12 > end:
            return pos, _NEED_MORE
        (length,) = _U32.unpack_from(buf, pos + 8)
        start = pos + 12
        if length == UNDEFINED_LENGTH:
            if name != "SQ":
                return pos, None  # e.g. UN of undefined length: pydicom's heuristics apply
            stop = _sequence_end(buf, start, False)
            if stop is None:
                return pos, _NEED_MORE
            value = buf[start:stop - 8]
            return stop, _raw((BaseTag(tag), "SQ", UNDEFINED_LENGTH, value, start, False, True, True, False))
    if start + length > end:
        return pos, _NEED_MORE
    return start + length, _raw((BaseTag(tag), name, length, buf[start:start + length], start,
                                          False, True, True, False))


def _sequence_end(buf: Any, pos: int, implicit: bool) -> int | None:
    """The position after the Sequence Delimitation Item of an undefined-length sequence starting at ``pos``."""
    end = len(buf)
    while pos + 8 <= end:
        tag_group, tag_element, length = _IMPLICIT.unpack_from(buf, pos)
        tag = tag_group << 16 | tag_element
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            return None
        if length != UNDEFINED_LENGTH:
            pos += length
            continue
        pos = _item_end(buf, pos, implicit)
        if pos is None:
            return None
    return None


def _item_end(buf: Any, pos: int, implicit: bool) -> int | None:
    """The position after the Item Delimitation Item of an undefined-length item starting at ``pos``."""
    end = len(buf)
    while pos + 8 <= end:
        group, element, vr, short = _EXPLICIT.unpack_from(buf, pos)
        tag = group << 16 | element
        if tag == ITEM_END:
            return pos + 8
        if implicit:
            (length,) = _U32.unpack_from(buf, pos + 4)
            pos += 8
        elif vr in SHORT_LENGTH_VRS:
            length = short
            pos += 8
        elif vr in LONG_LENGTH_VRS:
            if pos + 12 > end:
                return None
            (length,) = _U32.unpack_from(buf, pos + 8)
            pos += 12
        else:
            return None
        if length == UNDEFINED_LENGTH:
            pos = _sequence_end(buf, pos, implicit)
            if pos is None:
                return None
        else:
            pos += length
    return None


def _pixel_element(buf: bytes, pos: int, implicit: bool, little: bool = True) -> PixelElement:
    """The Pixel Data element whose tag is at ``pos``: where its value starts and its length."""
    order = "<" if little else ">"
    if implicit:
        (length,) = struct.unpack_from(order + "L", buf, pos + 4)
        offset = pos + 8
    elif buf[pos + 4:pos + 6] in LONG_LENGTH_VRS:
        if pos + 12 > len(buf):
            return PixelElement(pos + 12, 0)
        (length,) = struct.unpack_from(order + "L", buf, pos + 8)
        offset = pos + 12
    else:
        (length,) = struct.unpack_from(order + "H", buf, pos + 6)
        offset = pos + 8
    return PixelElement(offset, None if length == UNDEFINED_LENGTH else length)


def _fast_header(meta: dict, elements: dict, implicit: bool, pixel: PixelElement | None, preamble: bytes, *,
                 file_size: int) -> InstanceHeader:
    def dataset() -> FileDataset:
        encoding: Any = default_encoding
        if SPECIFIC_CHARACTER_SET in elements:
            encoding = convert_encodings(convert_raw_data_element(elements[SPECIFIC_CHARACTER_SET]).value)
        ds = FileDataset(io.BytesIO(), dict(elements), preamble, FileMetaDataset(dict(meta)), implicit, True)
        ds.set_original_encoding(implicit, True, encoding)
        return ds

    return InstanceHeader(dataset, elements, meta, raw_little_endian=True, pixel=pixel, file_size=file_size)


def _pydicom_header(source: Any) -> InstanceHeader:
    """The header read by pydicom, for what the fast walk leaves to it (its errors propagate)."""
    handle = open_source(source)
    try:
        ds = pydicom.dcmread(handle, stop_before_pixels=True)
        syntax = UID(ds.file_meta.get("TransferSyntaxUID", "") or ImplicitVRLittleEndian)
        pixel = None if syntax == DeflatedExplicitVRLittleEndian else _pixel_after(handle, ds, syntax)
        handle.seek(0, io.SEEK_END)
        size = handle.tell()
    finally:
        if handle is not source:
            handle.close()
    return InstanceHeader(lambda: ds, dict.fromkeys(ds.keys()), dict.fromkeys(ds.file_meta.keys()),
                          raw_little_endian=False, pixel=pixel, file_size=size)


def open_source(source: Any) -> BinaryIO:
    """``source`` (a request part, bytes or a binary file) as a binary file, rewound for reading."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    if hasattr(source, "open"):
        return source.open()
    source.seek(0)
    return source


def _pixel_after(handle: BinaryIO, ds: Dataset, syntax: UID) -> PixelElement | None:
    """The Pixel Data element where ``stop_before_pixels`` left ``handle``; None without Pixel Data."""
    start = handle.tell()
    head = handle.read(12)
    implicit, little = ds.original_encoding  # as pydicom actually read it, whatever the meta says
    if implicit is None:
        implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
        little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    if len(head) < 8:
        return None
    group, element = struct.unpack(("<" if little else ">") + "HH", head[:4])
    if (group << 16 | element) != PIXEL_DATA:
        return None  # no Pixel Data (or Float Pixel Data, which the handlers do not read)
    pixel = _pixel_element(head, 0, implicit, little)
    return PixelElement(start + pixel.offset, pixel.length)
