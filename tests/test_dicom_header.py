"""The fast header reader gives what pydicom's own header read gives, for every encoding it takes on,
and hands the rest to pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, \
    ImplicitVRLittleEndian

from tests.conftest import shared_data
from inference.dicom.files import dicom_files_in
from inference.dicom.writing import series_from_volume
from inference.dicom.header import HEAD_BYTES, _walk, read_header
from inference.protocol.multipart_request import PartSpool


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
