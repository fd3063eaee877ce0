"""The fast header reader gives what pydicom's own header read gives, for every encoding it takes on,
and hands the rest to pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from inference.dicom.files import dicom_files_in
from inference.dicom.header import HEAD_BYTES, _walk, read_header
from inference.dicom.writing import series_from_volume
from inference.protocol.multipart_request import PartSpool
from tests.conftest import shared_data


def encoded(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def an_image(**attributes) -> Dataset:
    voxels = np.arange(2 * 6 * 5, dtype=np.int16).reshape(2, 6, 5)
    ds = series_from_volume(voxels, spacing=(2.0, 0.8, 0.8))[1]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def with_nested_sequences(undefined: bool) -> Dataset:
    """An image whose header holds a sequence of items holding a sequence, of undefined lengths or not."""
    ds = an_image()
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "5366008", "SCT", "Hippocampus"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = undefined
    item["ConceptNameCodeSequence"].is_undefined_length = undefined
    for element in (item, inner):
        element.is_undefined_length_sequence_item = undefined
    return ds


def assert_same_as_pydicom(blob: bytes, *, fast: bool) -> None:
    header = read_header(blob)
    expected = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    assert isinstance(_walk(blob, len(blob)), tuple) is fast
    ds = header.dataset
    assert ds == expected and ds.file_meta == expected.file_meta
    assert ds.original_encoding == expected.original_encoding and ds.preamble == expected.preamble
    assert list(ds.keys()) == list(expected.keys())
    for mine, theirs in zip(ds.iterall(), expected.iterall(), strict=True):
        assert (mine.tag, mine.VR, mine.value, mine.is_undefined_length) == \
               (theirs.tag, theirs.VR, theirs.value, theirs.is_undefined_length)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_common_encodings_are_read_fast_and_equal_pydicoms_read(syntax):
    assert_same_as_pydicom(encoded(an_image(), syntax), fast=True)


@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_nested_sequences_of_any_length_are_kept_whole(syntax, undefined):
    blob = encoded(with_nested_sequences(undefined), syntax)
    assert_same_as_pydicom(blob, fast=True)
    code = read_header(blob).dataset.ReferencedImageSequence[0].ConceptNameCodeSequence[0]
    assert code.CodeMeaning == "Hippocampus"


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_other_encodings_are_left_to_pydicom(syntax):
    ds = an_image()
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
    blob = encoded(ds, syntax)
    assert_same_as_pydicom(blob, fast=False)
    header = read_header(blob)
    assert header.integer(0x00280010) == 6 and header.numbers(0x00280030) == [0.8, 0.8]


def test_files_without_the_preamble_are_left_to_pydicom():
    with pytest.raises(pydicom.errors.InvalidDicomError):
        read_header(b"not a DICOM file at all" * 10)


def test_typed_values_match_pydicoms():
    ds = an_image(NumberOfFrames=1, WindowCenter=[40, 400])
    header = read_header(encoded(ds))
    assert header.integer(0x00280010) == ds.Rows and header.integer(0x00280008) == 1
    assert header.numbers(0x00200032) == [float(v) for v in ds.ImagePositionPatient]
    assert header.numbers(0x00281050) == [40.0, 400.0]
    assert header.text(0x0020000E) == ds.SeriesInstanceUID
    assert header.transfer_syntax == ExplicitVRLittleEndian
    assert 0x00200012 not in header and header.integer(0x00200012) is None  # absent
    assert header.numbers(0x00181060) is None
    with pytest.raises(ValueError):
        read_header(encoded(an_image(NumberOfFrames="2.5"))).integer(0x00280008)


def test_pixel_data_is_located_without_reading_it():
    ds = an_image()
    blob = encoded(ds)
    pixel = read_header(blob).pixel
    assert blob[pixel.offset:pixel.offset + pixel.length] == ds.PixelData


def test_a_header_longer_than_the_first_read_on_disk_is_read_whole():
    ds = an_image()
    ds.add_new(0x00091010, "OB", b"\x01" * (2 * HEAD_BYTES))  # a large private element before the pixels
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    blob = encoded(ds)
    spool = PartSpool(memory_budget=0)  # the part lives on disk
    part = spool.begin_part([("Content-Type", "application/dicom")])
    spool.append(part, blob)
    try:
        header = read_header(part)
        assert header.pixel.offset > HEAD_BYTES and header.file_size == len(blob)
        assert header.dataset[0x00091010].value == b"\x01" * (2 * HEAD_BYTES)
        assert header.dataset == pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    finally:
        spool.close()


def test_real_scanner_files_are_read_fast_and_equal_pydicoms_read():
    files = dicom_files_in(shared_data("studies"))
    for path in files[::7]:
        assert_same_as_pydicom(path.read_bytes(), fast=True)


# -- the fast reader against dcmread on damaged files: it declines (pydicom reads) or agrees ------------------
def raw_fields(element) -> tuple:
    """What a raw element says of the file: tag, VR, length, value bytes, encoding."""
    return (element.tag, element.VR, element.length, element.value, element.is_implicit_VR, element.is_little_endian)


def assert_declines_or_agrees(blob: bytes) -> None:
    """The fast walk either declines (pydicom reads the file, its errors apply) or gives dcmread's raw elements."""
    walked = _walk(blob, len(blob))
    if not isinstance(walked, tuple):
        return
    header = read_header(blob)
    try:
        expected = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
    except Exception as exc:  # pydicom refuses what the walk took: a disagreement
        raise AssertionError(f"the fast reader read a file dcmread refuses: {type(exc).__name__}: {exc}") from None
    mine = header.dataset
    assert list(mine.keys()) == list(expected.keys())
    assert list(mine.file_meta.keys()) == list(expected.file_meta.keys())
    for tag in expected.keys():
        ours, theirs = mine.get_item(tag), expected.get_item(tag)
        if isinstance(theirs, RawDataElement) and isinstance(ours, RawDataElement):
            assert raw_fields(ours) == raw_fields(theirs), tag
        else:  # already decoded on one side (dcmread parses implicit VR sequences while reading): compare values
            assert decoded(mine, tag) == decoded(expected, tag), tag
    assert mine.original_encoding == expected.original_encoding and mine.preamble == expected.preamble


def decoded(ds: Dataset, tag: int) -> tuple:
    """An element as pydicom decodes it (VR, value, nested items included), or the exception decoding raises."""
    try:
        element = ds[tag]
        return element.VR, repr(element.value)
    except Exception as exc:
        return "raises", type(exc).__name__


def vr_swapped(blob: bytes, position: int, vr: bytes) -> bytes:
    """``blob`` with the explicit VR of the first element at or after ``position`` (past the meta) replaced."""
    at = blob.find(b"\x08\x00", max(position, 132))  # group 0008 elements come first in these files
    while at != -1 and not (blob[at + 4:at + 6].isalpha() and blob[at + 4:at + 6].isupper()):
        at = blob.find(b"\x08\x00", at + 1)
    return blob if at == -1 else blob[:at + 4] + vr + blob[at + 6:]


DIFFERENTIAL_FILES = [encoded(an_image(), ExplicitVRLittleEndian), encoded(an_image(), ImplicitVRLittleEndian),
                      encoded(with_nested_sequences(True)), encoded(with_nested_sequences(False))]
SWAP_VRS = [b"FD", b"UL", b"OB", b"UN", b"SQ", b"UT", b"US", b"DS", b"XX", b"\x00\x00"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@seed(20261202)
@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(DIFFERENTIAL_FILES))), st.data())
def test_damaged_files_are_declined_or_read_as_dcmread_reads_them(which, data):
    """Truncated, byte-flipped and VR-swapped files: for every element the fast reader returns, dcmread agrees."""
    blob = DIFFERENTIAL_FILES[which]
    for _ in range(data.draw(st.integers(1, 3))):
        how = data.draw(st.sampled_from(["truncate", "flip", "swap"]))
        position = data.draw(st.integers(0, len(blob) - 1))
        if how == "truncate":
            blob = blob[:position]
        elif how == "flip":
            blob = blob[:position] + bytes([data.draw(st.integers(0, 255))]) + blob[position + 1:]
        else:
            blob = vr_swapped(blob, position, data.draw(st.sampled_from(SWAP_VRS)))
        if not blob:
            return
    assert_declines_or_agrees(blob)


def test_real_files_damaged_are_declined_or_read_as_dcmread_reads_them():
    files = dicom_files_in(shared_data("studies", "Study1"))[:10]
    for path in files:
        blob = path.read_bytes()
        for cut in range(140, min(len(blob), 4000), 97):
            assert_declines_or_agrees(blob[:cut])
            assert_declines_or_agrees(vr_swapped(blob, cut, b"FD"))
            assert_declines_or_agrees(blob[:cut] + bytes([blob[cut] ^ 0xFF]) + blob[cut + 1:])


def test_another_pydicom_is_refused_at_import_with_what_to_do(monkeypatch):
    from inference.dicom import header

    monkeypatch.setattr(pydicom, "__version__", "3.1.0")
    with pytest.raises(ImportError, match=r"pydicom 3.1.0 is installed, 3.0.x expected.*requirements.txt"):
        header.check_pydicom_internals()
    monkeypatch.undo()
    header.check_pydicom_internals()
