"""The DICOM boundary (inference/dicom/attributes.py): a corrupt attribute value is a 422 naming the part and
the attribute, never a 500; valid values pass unchanged. A fuzz (hypothesis, fixed seed) corrupts one table
attribute of a valid series per example and runs it through the pipeline for the mocks and the blur; the 18
cases of the issue are regression tests; the quick raw path agrees with pydicom's decode on real files."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement

from handlers import load_handlers
from inference.config import Settings
from inference.dicom.attributes import _DECLINED, _QUICK, ATTRIBUTES, _checked_decoded, check_attributes
from inference.dicom.files import dicom_files_in
from inference.dicom.header import read_header
from inference.dicom.validation import IMAGE_INTEGERS
from inference.dicom.writing import series_from_volume
from inference.errors import GatewayError, UnprocessableInput
from inference.pipeline.pipeline import Pipeline
from tests.conftest import shared_data

LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
KEYWORDS = [attribute.keyword for attribute in ATTRIBUTES]
COMMANDS = ["get-probability-mask", "get-probability-mask-2d", "get-bounding-box-2d", "get-label-mask",
            "get-classification", "get-secondary-capture", "get-structured-report", "gaussian-blur-3d"]


def series_bytes() -> list[bytes]:
    """A valid 3-slice series (with a character set and the patient/study attributes results copy)."""
    voxels = np.arange(3 * 12 * 10, dtype=np.int16).reshape(3, 12, 10)
    out = []
    for ds in series_from_volume(voxels, spacing=(2.0, 1.0, 1.0)):
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "19700101", "O", "20260101", "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", "Doe^John"
        ds.SpacingBetweenSlices = 2.0
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


SERIES = series_bytes()


def with_raw(blob: bytes, keyword: str, value: bytes | None = None, vr: str | None = None) -> bytes:
    """``blob`` with ``keyword``'s element holding ``value`` (its own when None) under ``vr`` (the dictionary's
    when None); removed when both are None. The bytes are patched, so pydicom's writer judges nothing."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if value is None and vr is None:
        ds = pydicom.dcmread(io.BytesIO(blob))
        del ds[keyword]
        return saved(ds)
    raw = read_header(blob).raw_element(tag)
    if raw is None:  # absent: added first as bytes, then patched like the others
        ds = pydicom.dcmread(io.BytesIO(blob))
        ds[tag] = DataElement(tag, "OB", b"")
        blob = saved(ds)
        raw = read_header(blob).raw_element(tag)
    value = raw.value if value is None else value
    value = value + b" " * (len(value) % 2)
    vr = vr or pydicom.datadict.dictionary_VR(keyword)
    start = raw.value_tell - (12 if raw.VR in LONG_VRS else 8)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    head += b"\0\0" + struct.pack("<L", len(value)) if vr in LONG_VRS else struct.pack("<H", len(value))
    return blob[:start] + head + value + blob[raw.value_tell + raw.length:]


def saved(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    load_handlers()
    return Pipeline(Settings(), commands=COMMANDS)


def outcome(pipeline: Pipeline, command: str, blobs: list[bytes]) -> GatewayError | None:
    """None when the pipeline answers, the GatewayError it raises; any other exception fails the test."""
    try:
        pipeline.run({"inference_command": command}, [io.BytesIO(blob) for blob in blobs], "0" * 64)
    except GatewayError as error:
        return error
    return None


UNREADABLE_WITHOUT = ("SpecificCharacterSet",)


def assert_answered_or_named(error: GatewayError | None, keyword: str) -> None:
    if error is None:
        return
    assert error.status == 422, (error.status, error.message)
    if keyword in UNREADABLE_WITHOUT and "not a readable DICOM file" in error.message:
        return  # pydicom decodes it while reading the file: the file does not read
    if keyword == "SeriesInstanceUID" and "works on one series" in error.message:
        return  # another valid UID: the slice is another series, which the blur names
    if keyword in IMAGE_INTEGERS and "Pixel Data is" in error.message:
        return  # a valid value that does not fit the pixels: validation's image check says so with the sizes
    assert keyword in error.message, error.message


def test_the_valid_series_passes_every_command_and_keeps_its_values(pipeline):
    for command in COMMANDS:
        assert outcome(pipeline, command, SERIES) is None, command
    checked = check_attributes(read_header(SERIES[1]), "part 2")
    assert checked.ImagePositionPatient == (0.0, 0.0, 2.0) and checked.InstanceNumber == 2
    assert checked.SpecificCharacterSet == ("ISO_IR 100",) and checked.RescaleSlope == 1.0


# -- the issue's 18 cases ----------------------------------------------------------------------------------
ISSUE_CASES = [
    ("RescaleSlope", b"1\\2", None, "2 value(s), expected 1"),
    ("RescaleSlope", b"1,5", None, "not a decimal number"),
    ("RescaleIntercept", b"0.+", None, "not a decimal number"),
    ("RescaleSlope", b"", None, None),  # empty: as absent (type 1C/3), the default slope applies
    ("RescaleSlope", b"\xff\xfe\x80\x81", None, "not a decimal number"),
    ("RescaleSlope", b"nan", None, "not a finite number"),
    ("RescaleIntercept", b"inf", None, "not a finite number"),
    ("PixelSpacing", b"1,5\\1", None, "not a decimal number"),
    ("SliceThickness", b"", None, None),
    ("SeriesNumber", b"1.5", None, "not an integer"),
    ("InstanceNumber", b"nan", None, "not an integer"),
    ("InstanceNumber", b"", None, None),
    ("SpecificCharacterSet", None, "FD", "not a readable DICOM file"),  # dcmread refuses it: the header too
    ("SeriesNumber", b"\x01\x00\x00\x00", "UL", "VR UL"),
    ("SeriesInstanceUID", None, "FD", "VR FD"),
    ("SeriesInstanceUID", b"", None, "empty"),
    ("ImagePositionPatient", b"1", None, "1 value(s), expected 3"),
    ("ImageOrientationPatient", b"1\\0\\0", None, "3 value(s), expected 6"),
]


@pytest.mark.parametrize("keyword, value, vr, words", ISSUE_CASES)
@pytest.mark.parametrize("command", ["get-probability-mask", "gaussian-blur-3d", "get-secondary-capture"])
def test_issue_cases_are_a_422_naming_the_attribute_or_are_harmless(pipeline, command, keyword, value, vr, words):
    blobs = list(SERIES)
    blobs[1] = with_raw(blobs[1], keyword, value, vr)
    error = outcome(pipeline, command, blobs)
    if words is None:
        assert_answered_or_named(error, keyword)
        return
    assert isinstance(error, UnprocessableInput), error
    named = keyword in error.message or words == "not a readable DICOM file"
    assert "part 2" in error.message and named and words in error.message, error.message


def test_a_missing_required_uid_is_named():
    blob = with_raw(SERIES[0], "StudyInstanceUID")
    with pytest.raises(UnprocessableInput, match=r"part 1: StudyInstanceUID \(0020,000D\) is missing"):
        check_attributes(read_header(blob), "part 1")


def test_text_that_does_not_decode_with_the_character_set_is_named():
    blob = with_raw(SERIES[0], "SpecificCharacterSet", b"ISO_IR 192")
    blob = with_raw(blob, "PatientName", b"\xff\xfe")
    with pytest.raises(UnprocessableInput, match="PatientName .* does not decode"):
        check_attributes(read_header(blob), "part 1")


# -- the fuzz ----------------------------------------------------------------------------------------------
GARBAGE = [b"", b" ", b"abc", b"1,5", b"0.+", b"nan", b"-inf", b"1e999", b"1\\2", b"1\\2\\3\\4\\5\\6\\7",
           b"\xff\xfe\x80", b"\x00\x01\x02\x03", b"1.2.3", b"-1", b"0", b"99999999999999"]
VRS = ["FD", "UL", "OB", "SS", "US", "CS", "DS", "IS", "LO", "UN", "UI", "PN", "FL", "SQ"]


@st.composite
def corruptions(draw):
    """(slice index, keyword, value or None, VR or None): one attribute of one slice damaged."""
    keyword = draw(st.sampled_from(KEYWORDS))
    how = draw(st.sampled_from(["value", "vr", "both", "remove"]))
    value = draw(st.sampled_from(GARBAGE) | st.binary(max_size=12)) if how in ("value", "both") else None
    vr = draw(st.sampled_from(VRS)) if how in ("vr", "both") else None
    return draw(st.integers(0, len(SERIES) - 1)), keyword, value, vr


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fuzzed_attribute_values_are_answered_or_a_422_naming_them(pipeline):
    @seed(20261202)
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(corruptions(), st.sampled_from(COMMANDS))
    def one(corruption, command):
        index, keyword, value, vr = corruption
        blobs = list(SERIES)
        try:
            blobs[index] = with_raw(blobs[index], keyword, value, vr)
        except (KeyError, ValueError):  # SQ of a value pydicom's writer cannot frame: nothing to send
            return
        assert_answered_or_named(outcome(pipeline, command, blobs), keyword)

    one()


# -- the quick path agrees with pydicom ---------------------------------------------------------------------
def assert_quick_agrees(blob: bytes) -> int:
    """Each table value the quick raw path reads equals pydicom's decode of it; the number it read."""
    header = read_header(blob)
    read = 0
    for attribute in ATTRIBUTES:
        raw = header.raw_element(attribute.tag)
        if raw is None:
            continue
        quick = _QUICK[attribute.kind](raw, attribute)
        if quick is _DECLINED:
            continue
        assert quick == _checked_decoded(header, attribute), attribute.keyword
        read += 1
    return read


@pytest.mark.filterwarnings("ignore::UserWarning")
@seed(20261202)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KEYWORDS), st.sampled_from(GARBAGE) | st.binary(max_size=12) | st.text(max_size=12).map(
    lambda text: text.encode("utf-8")))
def test_quick_path_declines_or_agrees_with_pydicom_on_damaged_values(keyword, value):
    blob = with_raw(SERIES[0], keyword, value)
    try:
        assert_quick_agrees(blob)
    except Exception as exc:  # pydicom's own decode failing is the slow path's defect, not a disagreement
        assert not isinstance(exc, AssertionError), exc


def test_quick_path_agrees_with_pydicom_on_real_files():
    files = dicom_files_in(shared_data("studies", "Study1"))
    assert sum(assert_quick_agrees(path.read_bytes()) for path in files) > 20 * len(files)
    for path in files:
        check_attributes(read_header(path.read_bytes()), path.name)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keyword", KEYWORDS)
def test_an_attribute_empty_in_every_slice_is_answered_or_named(pipeline, keyword):
    """Empty optional values are as absent for every reader (``ds.get(...)`` gives None, not the default)."""
    blobs = [with_raw(blob, keyword, b"") for blob in SERIES]
    for command in COMMANDS:
        assert_answered_or_named(outcome(pipeline, command, blobs), keyword)
