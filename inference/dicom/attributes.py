"""The DICOM boundary: every attribute a handler or result writer reads from an input instance, checked once.

``ATTRIBUTES`` is the one table of what downstream code reads (``handlers/``, ``inference.dicom.series``,
``inference.dicom.results`` and highdicom through it): keyword, tag, accepted VRs, VM, kind, required.
``check_attributes(header, describe)`` decodes each present attribute through the paths downstream
code uses (pydicom's decode of the dataset element; the fast header's ``text``/``numbers`` where
downstream reads it that way) and accepts it only when it has an accepted VR, the table's VM and a
usable value: DS/IS that parse, finite numbers, text that decodes with the file's SpecificCharacterSet,
UIDs of digits and dots (present where required), PhotometricInterpretation a defined term. An empty
optional value counts as absent. So a value that passes cannot raise downstream; anything else is an
``UnprocessableInput`` (422) naming the part, the attribute and the defect. Validation keeps the
result on the header (``header.attributes``).

Window Center/Width and the LUT sequences are not here: only ``inference.imaging.render`` reads them,
for the test tool's pages, never on the request path.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.charset import python_encoding
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.multival import MultiValue

from inference.dicom.header import InstanceHeader
from inference.errors import UnprocessableInput

UID, INTEGER, DECIMAL, TEXT, CODE, CHARSET = "uid", "integer", "decimal", "text", "code string", "character set"
#: What to do about any defect the table finds.
ADVICE = "send the instance as stored by the modality or PACS, or correct the attribute"
MAX_UID_LENGTH = 64
_UID_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)*")
SPECIFIC_CHARACTER_SET = 0x00080005


@dataclass(frozen=True)
class Attribute:
    """One row of the table: an attribute downstream code reads, and what makes its value usable."""

    keyword: str
    tag: int
    vrs: frozenset[str]
    vm: int | None  # None: 1-n
    kind: str
    required: bool = False
    fast: str | None = None  # the InstanceHeader reader downstream also uses: "text" or "numbers"
    terms: frozenset[str] | None = None  # the defined terms of a code string, when any other value cannot work
    quick: Any = None  # the raw-bytes reader of its kind (``_QUICK``), set once the readers are defined
    only_vr: str = ""  # the VR of an implicit-VR element: the dictionary's, the one the row accepts


def _row(keyword: str, tag: int, vrs: str, vm: int | None, kind: str, required: bool = False,
         fast: str | None = None, terms: str | None = None) -> Attribute:
    return Attribute(keyword, tag, frozenset(vrs.split("/")), vm, kind, required, fast,
                     None if terms is None else frozenset(terms.split(",")))


#: PS3.3 C.7.6.3.1.2: what pydicom's pixel decoding knows.
PHOTOMETRIC_TERMS = ("MONOCHROME1,MONOCHROME2,PALETTE COLOR,RGB,YBR_FULL,YBR_FULL_422,YBR_PARTIAL_422,"
                     "YBR_PARTIAL_420,YBR_ICT,YBR_RCT,HSV,ARGB,CMYK,XYB")


#: Every attribute read from an input instance downstream of validation (who reads it in the comment).
ATTRIBUTES: tuple[Attribute, ...] = (
    _row("SpecificCharacterSet", 0x00080005, "CS", None, CHARSET),  # pydicom, to decode every text value
    _row("SOPClassUID", 0x00080016, "UI", 1, UID, required=True),  # highdicom references (SEG, SR)
    _row("SOPInstanceUID", 0x00080018, "UI", 1, UID, required=True),  # mocks' answers, blur, references
    _row("StudyInstanceUID", 0x0020000D, "UI", 1, UID, required=True),  # results join the source study
    _row("SeriesInstanceUID", 0x0020000E, "UI", 1, UID, required=True, fast="text"),  # grouping, answers
    _row("FrameOfReferenceUID", 0x00200052, "UI", 1, UID),  # highdicom SEG
    _row("Modality", 0x00080060, "CS", 1, CODE),  # SR procedure, highdicom
    _row("PatientName", 0x00100010, "PN", 1, TEXT),  # copied into results (series._new_result_object, highdicom)
    _row("PatientID", 0x00100020, "LO", 1, TEXT),
    _row("PatientBirthDate", 0x00100030, "DA", 1, TEXT),
    _row("PatientSex", 0x00100040, "CS", 1, CODE),
    _row("PatientAge", 0x00101010, "AS", 1, TEXT),
    _row("StudyDate", 0x00080020, "DA", 1, TEXT),
    _row("StudyTime", 0x00080030, "TM", 1, TEXT),
    _row("StudyID", 0x00200010, "SH", 1, TEXT),
    _row("AccessionNumber", 0x00080050, "SH", 1, TEXT),
    _row("ReferringPhysicianName", 0x00080090, "PN", 1, TEXT),
    _row("StudyDescription", 0x00081030, "LO", 1, TEXT),
    _row("SeriesDescription", 0x0008103E, "LO", 1, TEXT),  # crop series choice, mocks, messages
    _row("SeriesNumber", 0x00200011, "IS", 1, INTEGER),  # derived series number (blur)
    _row("InstanceNumber", 0x00200013, "IS", 1, INTEGER, fast="numbers"),  # slice order without geometry
    _row("ImagePositionPatient", 0x00200032, "DS", 3, DECIMAL, fast="numbers"),  # slice order and spacing
    _row("ImageOrientationPatient", 0x00200037, "DS", 6, DECIMAL, fast="numbers"),  # slice normal, RAS affine
    _row("PixelSpacing", 0x00280030, "DS", 2, DECIMAL),  # volume spacing
    _row("SliceThickness", 0x00180050, "DS", 1, DECIMAL),  # spacing without positions
    _row("SpacingBetweenSlices", 0x00180088, "DS", 1, DECIMAL),
    _row("RescaleIntercept", 0x00281052, "DS", 1, DECIMAL),  # real-world values (load_volume, store_pixels)
    _row("RescaleSlope", 0x00281053, "DS", 1, DECIMAL),
    _row("Rows", 0x00280010, "US", 1, INTEGER, required=True),  # pixel decoding, masks' shapes
    _row("Columns", 0x00280011, "US", 1, INTEGER, required=True),
    _row("SamplesPerPixel", 0x00280002, "US", 1, INTEGER, required=True),
    _row("PhotometricInterpretation", 0x00280004, "CS", 1, CODE, required=True, fast="text",
         terms=PHOTOMETRIC_TERMS),
    _row("PlanarConfiguration", 0x00280006, "US", 1, INTEGER),
    _row("BitsAllocated", 0x00280100, "US", 1, INTEGER, required=True),
    _row("BitsStored", 0x00280101, "US", 1, INTEGER, required=True),  # pydicom decodes no pixels without it
    _row("PixelRepresentation", 0x00280103, "US", 1, INTEGER, required=True),
    _row("NumberOfFrames", 0x00280008, "IS", 1, INTEGER),
)


@dataclass(frozen=True)
class CheckedAttributes:
    """The table's values of one instance, decoded and checked; None when absent (or empty, for optional ones)."""

    SpecificCharacterSet: tuple[str, ...] | None
    SOPClassUID: str
    SOPInstanceUID: str
    StudyInstanceUID: str
    SeriesInstanceUID: str
    FrameOfReferenceUID: str | None
    Modality: str | None
    PatientName: str | None
    PatientID: str | None
    PatientBirthDate: str | None
    PatientSex: str | None
    PatientAge: str | None
    StudyDate: str | None
    StudyTime: str | None
    StudyID: str | None
    AccessionNumber: str | None
    ReferringPhysicianName: str | None
    StudyDescription: str | None
    SeriesDescription: str | None
    SeriesNumber: int | None
    InstanceNumber: int | None
    ImagePositionPatient: tuple[float, float, float] | None
    ImageOrientationPatient: tuple[float, float, float, float, float, float] | None
    PixelSpacing: tuple[float, float] | None
    SliceThickness: float | None
    SpacingBetweenSlices: float | None
    RescaleIntercept: float | None
    RescaleSlope: float | None
    Rows: int
    Columns: int
    SamplesPerPixel: int
    PhotometricInterpretation: str
    PlanarConfiguration: int | None
    BitsAllocated: int
    BitsStored: int
    PixelRepresentation: int
    NumberOfFrames: int | None


class _Defect(Exception):
    """An attribute's defect, worded for the message (the part and keyword are added by ``check_attributes``)."""


def check_attributes(header: InstanceHeader, describe: Any) -> CheckedAttributes:
    """Every table attribute of ``header`` decoded and checked; a 422 naming the part, attribute and defect otherwise.

    ``describe`` names the part in messages (its ``str()``, worked out only when one is needed).
    The character set comes first in the table: pydicom decodes every text value with it.
    """
    values: dict[str, Any] = {}
    raw_element = header.raw_element
    for attribute in ATTRIBUTES:
        try:
            raw = raw_element(attribute.tag)
            value = _DECLINED if raw is None else attribute.quick(raw, attribute)
            if value is _DECLINED:
                value = _checked_decoded(header, attribute)
        except _Defect as defect:
            raise UnprocessableInput(f"{describe}: {attribute.keyword} ({attribute.tag >> 16:04X},"
                                     f"{attribute.tag & 0xFFFF:04X}) {defect}; {ADVICE}") from None
        values[attribute.keyword] = value
    return CheckedAttributes(**values)


def _checked_decoded(header: InstanceHeader, attribute: Attribute) -> Any:
    """The attribute's value through pydicom's decode, None when absent or empty and optional; else ``_Defect``."""
    if attribute.tag not in header:
        if attribute.required:
            raise _Defect("is missing; it is required")
        return None
    raw = header.raw_element(attribute.tag)
    if raw is not None and raw.VR not in attribute.vrs and raw.VR not in (None, "UN"):
        raise _Defect(_wrong_vr(raw.VR, attribute))  # said before decoding: the wrong VR is what fails it
    element = _decoded(header, attribute)
    if element.VR not in attribute.vrs:
        raise _Defect(_wrong_vr(element.VR, attribute))
    items = _items(element.value)
    if not items:
        if attribute.required:
            raise _Defect("is empty; it is required")
        return None
    if attribute.vm is not None and len(items) != attribute.vm:
        raise _Defect(f"has {len(items)} value(s), expected {attribute.vm}")
    checked = tuple(_CHECKS[attribute.kind](item) for item in items)
    if attribute.terms is not None and not attribute.terms.issuperset(checked):
        raise _Defect(f"value {_shown(checked[0])} is not one of {', '.join(sorted(attribute.terms))}")
    if attribute.fast is not None:
        _same_as_fast(header, attribute, checked)
    return checked if attribute.vm != 1 else checked[0]


# -- the quick path: clean raw values read straight from their bytes ------------------------------
# Each reader takes a raw element of the fast header and returns the checked value, or _DECLINED for
# anything it is not certain pydicom decodes to that same value (tests/test_dicom_attributes.py
# checks the two paths agree); declined values go through pydicom (``_checked_decoded``). The fast
# header's ``text``/``numbers`` read the same bytes the same way (ASCII, float()), so they agree too.
_DECLINED = object()
#: DICOM DS and IS values (PS3.5 6.2), which pydicom's DSfloat and IS parse as Python's float and int do.
_DS = re.compile(rb" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *")
_IS = re.compile(rb" *[+-]?[0-9]+ *")
_DS_VALUES = re.compile(rb"%s(?:\\%s)*" % (_DS.pattern, _DS.pattern))
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")  # printable ASCII, the value delimiter included
_UID_BYTES = re.compile(rb"[0-9]+(?:\.[0-9]+)*")


def _raw_items(raw: RawDataElement, attribute: Attribute) -> list[bytes] | None:
    """The values of a raw text-like element of the table's VR and VM ([] when empty); None when it is not that."""
    value = raw.value
    if type(value) is not bytes or (raw.VR or attribute.only_vr) not in attribute.vrs:
        return None
    text = value.rstrip(b"\x00 ")
    if not text:
        return []
    items = text.split(b"\\")
    return items if attribute.vm is None or len(items) == attribute.vm else None


def _not_quick(items: list | None, attribute: Attribute) -> Any:
    """What a quick reader answers for no values: None for an empty optional value, else ``_DECLINED``."""
    return None if items == [] and not attribute.required else _DECLINED


def _quick_decimal(raw: RawDataElement, attribute: Attribute) -> Any:
    items = _raw_items(raw, attribute)
    if not items:
        return _not_quick(items, attribute)
    if attribute.vm == 1:
        number = float(items[0]) if _DS.fullmatch(items[0]) else math.nan
        return number if math.isfinite(number) else _DECLINED
    if not _DS_VALUES.fullmatch(raw.value.rstrip(b"\x00 ")):
        return _DECLINED
    numbers = tuple(float(item) for item in items)
    return numbers if all(math.isfinite(number) for number in numbers) else _DECLINED


def _quick_integer(raw: RawDataElement, attribute: Attribute) -> Any:
    value = raw.value
    if attribute.vrs == _US:  # one unsigned short
        if (raw.VR is None or raw.VR == "US") and type(value) is bytes and len(value) == 2:
            return value[0] | value[1] << 8
        return _DECLINED
    items = _raw_items(raw, attribute)
    if not items:
        return _not_quick(items, attribute)
    if not _IS.fullmatch(items[0]):
        return _DECLINED
    return int(items[0])


def _quick_uid(raw: RawDataElement, attribute: Attribute) -> Any:
    """One UID of digits and dots; anything else (empty ones too) is worded by pydicom's path."""
    value = raw.value
    if type(value) is not bytes or (raw.VR or "UI") != "UI":
        return _DECLINED
    text = value.rstrip(b"\x00 ")
    if len(text) > MAX_UID_LENGTH or not _UID_BYTES.fullmatch(text):
        return _DECLINED
    return text.decode("ascii")


def _quick_text(raw: RawDataElement, attribute: Attribute) -> Any:
    """Printable ASCII text, which every character set decodes alike; known character sets and defined terms."""
    items = _raw_items(raw, attribute)
    if not items:
        return _not_quick(items, attribute)
    if not _PRINTABLE.fullmatch(raw.value.rstrip(b"\x00")) or attribute.fast and raw.value[:1] == b" ":
        return _DECLINED  # a leading space: the fast header's text keeps it, pydicom's does not
    keep_leading = attribute.kind == TEXT  # pydicom strips leading spaces of code strings only
    if attribute.vm == 1 and attribute.terms is None and attribute.kind != CHARSET:
        text = items[0].decode("ascii")
        return text.rstrip(" ") if keep_leading else text.strip(" ")
    strings = tuple(item.decode("ascii").rstrip(" ") if keep_leading else item.decode("ascii").strip(" ")
                    for item in items)
    if attribute.kind == CHARSET and not all(term in python_encoding for term in strings) or \
            attribute.terms is not None and not attribute.terms.issuperset(strings):
        return _DECLINED  # unknown character sets or terms: pydicom's path words the defect
    return strings[0] if attribute.vm == 1 else strings


_US = frozenset({"US"})
_QUICK: dict[str, Callable[[RawDataElement, Attribute], Any]] = {
    DECIMAL: _quick_decimal, INTEGER: _quick_integer, UID: _quick_uid, TEXT: _quick_text, CODE: _quick_text,
    CHARSET: _quick_text}
for _attribute in ATTRIBUTES:  # frozen rows: their readers are attached once, here
    object.__setattr__(_attribute, "quick", _QUICK[_attribute.kind])
    object.__setattr__(_attribute, "only_vr", next(iter(_attribute.vrs)))


def _wrong_vr(vr: str, attribute: Attribute) -> str:
    return f"has VR {vr}, expected {' or '.join(sorted(attribute.vrs))}"


def _decoded(header: InstanceHeader, attribute: Attribute) -> Any:
    """The attribute's element as pydicom decodes it; the character set from its raw bytes (the dataset needs it)."""
    try:
        if attribute.tag == SPECIFIC_CHARACTER_SET:
            raw = header.raw_element(attribute.tag)
            if isinstance(raw, RawDataElement):
                return convert_raw_data_element(raw)
        return header.dataset[attribute.tag]
    except Exception as exc:  # pydicom raises what its VR converter raises on a damaged value
        raise _Defect(f"cannot be decoded ({type(exc).__name__})") from None


def _items(value: Any) -> list:
    """A decoded value as its list of values (empty for an empty value)."""
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _uid(value: Any) -> str:
    text = _text(value).strip("\x00 ")
    if not text:
        raise _Defect("is empty")
    if len(text) > MAX_UID_LENGTH or not _UID_TEXT.fullmatch(text):
        raise _Defect(f"value {_shown(text)} is not a UID (digits and dots, at most {MAX_UID_LENGTH} characters)")
    return text


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not float(value).is_integer():
        raise _Defect(f"value {_shown(value)} is not an integer")
    return int(value)


def _decimal(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):  # pydicom keeps unparseable DS as text
        raise _Defect(f"value {_shown(value)} is not a decimal number")
    number = float(value)
    if not math.isfinite(number):
        raise _Defect(f"value {_shown(value)} is not a finite number")
    return number


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        raise _Defect("holds bytes, not text")
    text = str(value)
    if "\ufffd" in text:  # pydicom's replacement character: the bytes do not decode with the character set
        raise _Defect("does not decode with the file's SpecificCharacterSet")
    return text


def _charset(value: Any) -> str:
    term = _text(value).strip()
    if term not in python_encoding:
        raise _Defect(f"term {_shown(term)} is not a character set pydicom knows")
    return term


_CHECKS: dict[str, Callable[[Any], Any]] = {UID: _uid, INTEGER: _integer, DECIMAL: _decimal, TEXT: _text,
                                            CODE: _text, CHARSET: _charset}


def _same_as_fast(header: InstanceHeader, attribute: Attribute, checked: tuple) -> None:
    """The fast header's reading (what ``series`` uses) must give the checked value too."""
    try:
        fast = getattr(header, attribute.fast)(attribute.tag)
    except Exception as exc:
        raise _Defect(f"cannot be read ({type(exc).__name__})") from None
    expected = list(checked) if attribute.fast == "numbers" else checked[0]
    if attribute.fast == "numbers":
        fast = None if fast is None else [float(v) for v in fast]
        expected = [float(v) for v in expected]
    if fast != expected:
        raise _Defect(f"reads as {_shown(fast)} here but {_shown(expected)} in pydicom")


def _shown(value: Any) -> str:
    """A value for a message, shortened."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
