"""DICOM validation before handlers: each defect is a 422 naming the part and the defect; whatever
passes decodes. Property tests (hypothesis, fixed seed) mutate and truncate valid files."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from inference.dicom.validation import read_header_early, validate_instances
from inference.dicom.writing import series_from_volume
from inference.errors import UnprocessableInput
from inference.protocol.multipart_request import PartSpool

LIMIT = 10**9


def dicom_bytes(ds: pydicom.Dataset, syntax=None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def instances(depth: int = 3, rows: int = 16, columns: int = 20) -> list[pydicom.Dataset]:
    voxels = np.arange(depth * rows * columns, dtype=np.int16).reshape(depth, rows, columns)
    datasets = series_from_volume(voxels, spacing=(2.0, 0.8, 0.8))
    for ds in datasets:
        ds["PixelData"].VR = "OW"  # so a file can be written without BitsAllocated
    return datasets


def as_parts(*blobs: bytes, content_type: str = "application/dicom"):
    spool = PartSpool(1 << 24)
    parts = []
    for index, blob in enumerate(blobs):
        part = spool.begin_part([("Content-Type", content_type),
                                 ("Content-Disposition", f'form-data; name="file"; filename="{index:03d}.dcm"')])
        spool.append(part, blob)
        parts.append(part)
    return parts


def refused(*blobs: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(UnprocessableInput) as caught:
        validate_instances(as_parts(*blobs), max_series_voxels=limit)
    return caught.value.message


def test_a_valid_series_passes_and_is_parsed_once():
    parts = as_parts(*(dicom_bytes(ds) for ds in instances()))
    checked = validate_instances(parts, max_series_voxels=LIMIT)
    assert [instance.source for instance in checked] == parts
    assert checked[1].name == parts[1].describe()
    # headers read while the request streamed in are used, not read again
    early = {parts[0].index: checked[0].header}
    again = validate_instances(parts, max_series_voxels=LIMIT, early_headers=early)
    assert again[0].header is checked[0].header and again[1].header is not checked[1].header
    assert again[0].dataset is checked[0].header.dataset


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_other_transfer_syntaxes_pass(syntax):
    ds = instances(depth=1)[0]
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = ds.pixel_array.astype(">i2").tobytes()
    assert validate_instances(as_parts(dicom_bytes(ds, syntax)), max_series_voxels=LIMIT)


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel",
                                     "PhotometricInterpretation"])
def test_missing_attributes_are_named(keyword):
    ds = instances(depth=1)[0]
    delattr(ds, keyword)
    message = refused(dicom_bytes(ds))
    assert "part 0 (file '000.dcm')" in message and keyword in message and "missing" in message


@pytest.mark.parametrize("keyword, value, words", [
    ("Rows", 0, "impossible"), ("BitsAllocated", 12, "BitsAllocated 12"),
    ("SamplesPerPixel", 2, "SamplesPerPixel 2"), ("BitsStored", 17, "BitsStored 17"),
    ("PixelRepresentation", 7, "PixelRepresentation 7"),
])
def test_impossible_values_are_named(keyword, value, words):
    ds = instances(depth=1)[0]
    setattr(ds, keyword, value)
    assert words in refused(dicom_bytes(ds))


@pytest.mark.parametrize("delta, word", [(-2, "shorter"), (+40, "longer")])
def test_pixel_data_length_must_match_the_header(delta, word):
    ds = instances(depth=1)[0]
    ds.PixelData = ds.PixelData[:delta] if delta < 0 else ds.PixelData + b"\0" * delta
    message = refused(dicom_bytes(ds))
    assert word in message and "Pixel Data" in message and "640 bytes" in message


def test_header_claiming_a_larger_image_is_refused_before_allocating():
    ds = instances(depth=1)[0]
    ds.Rows, ds.Columns = 60000, 60000  # the pixel data stays 640 bytes
    assert "shorter" in refused(dicom_bytes(ds))


def test_truncated_files_are_refused():
    blob = dicom_bytes(instances(depth=1)[0])
    assert "truncated" in refused(blob[:-100])
    assert "not a readable DICOM file" in refused(blob[:300])


def test_no_pixel_data_is_refused():
    ds = instances(depth=1)[0]
    del ds.PixelData
    assert "no Pixel Data" in refused(dicom_bytes(ds))


def test_voxels_per_series_are_limited():
    blobs = [dicom_bytes(ds) for ds in instances(depth=3, rows=16, columns=20)]
    assert validate_instances(as_parts(*blobs), max_series_voxels=3 * 320)
    message = refused(*blobs, limit=2 * 320)
    assert "INFERENCE_MAX_SERIES_VOXELS" in message and "part 2" in message


def test_leading_attachments_are_skipped_and_later_garbage_is_not():
    blob = dicom_bytes(instances(depth=1)[0])
    spool = PartSpool(1 << 20)
    licence = spool.begin_part([("Content-Type", "text/plain")])
    spool.append(licence, b"licence text")
    parts = [licence, *as_parts(blob)]
    assert len(validate_instances(parts, max_series_voxels=LIMIT)) == 1
    assert "not a readable DICOM file" in refused(blob, b"garbage")


VALID = dicom_bytes(instances(depth=1, rows=8, columns=6)[0])


@pytest.mark.filterwarnings("ignore::UserWarning")
@seed(20261129)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))
def test_mutated_files_either_decode_or_get_a_422(changes, keep):
    """Flip bytes and truncate: validation raises only UnprocessableInput, and what passes decodes."""
    blob = bytearray(VALID)
    for position, value in changes:
        blob[position] = value
    blob = bytes(blob[:keep])
    try:
        datasets = [h.dataset for h in validate_instances(as_parts(blob), max_series_voxels=LIMIT)]
    except UnprocessableInput as exc:
        assert "part 0" in exc.message and "Traceback" not in exc.message
        return
    for ds in datasets:
        full = pydicom.dcmread(io.BytesIO(blob))
        assert full.pixel_array.size == int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1) \
            * int(ds.SamplesPerPixel)


def test_headers_read_while_streaming_are_reused_and_damaged_parts_are_still_named():
    blob = dicom_bytes(instances(depth=1)[0])
    spool = PartSpool(1 << 20)
    request_json = spool.begin_part([("Content-Type", "application/json")])
    spool.append(request_json, b"{}")
    parts = [request_json]
    for name, content in (("good.dcm", blob), ("cut.dcm", blob[:200])):
        part = spool.begin_part([("Content-Type", "application/dicom"),
                                 ("Content-Disposition", f'form-data; name="file"; filename="{name}"')])
        spool.append(part, content)
        parts.append(part)
    # what the gateway's parser keeps as each part ends (nothing for the request JSON)
    early = {part.index: header for part in parts if (header := read_header_early(part)) is not None}
    assert 0 not in early and 1 in early
    with pytest.raises(UnprocessableInput) as caught:
        validate_instances(parts[1:], max_series_voxels=LIMIT, early_headers=early)
    assert "part 2 (file 'cut.dcm')" in caught.value.message
    assert validate_instances(parts[1:2], max_series_voxels=LIMIT, early_headers=early)[0].header is early[1]


def test_instances_checked_while_streaming_are_not_checked_again_and_defects_keep_their_words(monkeypatch):
    import inference.dicom.validation as validation

    good = dicom_bytes(instances(depth=1)[0])
    bad_ds = instances(depth=1)[0]
    bad_ds.Rows = 0
    bad = dicom_bytes(bad_ds)
    spool = PartSpool(1 << 20)
    request_json = spool.begin_part([("Content-Type", "application/json")])
    spool.append(request_json, b"{}")
    parts = [request_json]
    for name, content in (("good.dcm", good), ("bad.dcm", bad)):
        part = spool.begin_part([("Content-Type", "application/dicom"),
                                 ("Content-Disposition", f'form-data; name="file"; filename="{name}"')])
        spool.append(part, content)
        parts.append(part)
    early = {part.index: header for part in parts if (header := read_header_early(part)) is not None}
    assert early[1].prechecked is not None and early[1].prechecked[1] == 16 * 20
    assert early[2].prechecked is None, "a defective instance is left for validate_instances to word"
    expected = refused(good, bad)

    calls = []
    real = validation.check_attributes
    monkeypatch.setattr(validation, "check_attributes", lambda *a: calls.append(1) or real(*a))
    checked = validate_instances(parts[1:2], max_series_voxels=LIMIT, early_headers=early)
    assert calls == [] and checked[0].attributes is early[1].prechecked[0]
    with pytest.raises(UnprocessableInput) as caught:
        validate_instances(parts[1:], max_series_voxels=LIMIT, early_headers=early)
    assert caught.value.message == expected.replace("part 1 (file '001.dcm')", "part 2 (file 'bad.dcm')")
    assert "Rows" in caught.value.message
