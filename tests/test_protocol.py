"""The protocol's rules: what handlers may return and what clients may accept."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from inference.dicom.writing import series_from_volume
from inference.errors import OutputValidationError
from inference.protocol.rules import (
    SeriesInfo,
    check_against_study,
    content_type_for,
    is_hashes_part,
    prepare_output,
    validate_response,
)

SHAPE3D = {"timepoints": 1, "depth": 2, "height": 3, "width": 4}
PALETTE = {"type": "anchorpoint", "data": [{"threshold": 0.0, "color": [0, 0, 0, 0]},
                                           {"threshold": 1.0, "color": [255, 0, 0, 255]}]}


def mask_part(binary_type="probability_mask", **extra):
    return {"binary_type": binary_type, "binary_data_shape": dict(SHAPE3D), "SeriesInstanceUID": "1.2.3", **extra}


def fails(response_json, buffers, match):
    with pytest.raises(OutputValidationError, match=match):
        prepare_output(copy.deepcopy(response_json), buffers)


def test_valid_3d_mask_is_sent_in_c_order():
    mask = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _, buffers = prepare_output({"parts": [mask_part()]}, [mask])
    assert bytes(buffers[0]) == mask.tobytes(order="C")


def test_fortran_ordered_array_is_sent_in_c_order():
    mask = np.asfortranarray(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    _, buffers = prepare_output({"parts": [mask_part()]}, [mask])
    assert bytes(buffers[0]) == np.ascontiguousarray(mask).tobytes()


def test_bool_mask_is_converted_to_uint8():
    mask = np.zeros((2, 3, 4), bool)
    mask[0, 0, 0] = True
    _, buffers = prepare_output({"parts": [mask_part("boolean_mask")]}, [mask])
    assert bytes(buffers[0])[:2] == b"\x01\x00"


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16, np.int64])
def test_non_uint8_masks_are_refused_not_cast(dtype):
    fails({"parts": [mask_part()]}, [np.zeros((2, 3, 4), dtype)], "must be uint8")


def test_transposed_array_is_refused():
    fails({"parts": [mask_part()]}, [np.zeros((4, 3, 2), np.uint8)], r"shape \(4, 3, 2\)")


def test_byte_length_must_match_binary_data_shape():
    fails({"parts": [mask_part()]}, [b"\x00" * 23], "has 23 bytes")


def test_parts_and_buffers_must_pair_up():
    fails({"parts": [mask_part()]}, [], "1 entries but 0 buffers")
    fails({"parts": []}, [b"x"], "0 entries but 1 buffers")


def test_unknown_binary_type_is_refused():
    fails({"parts": [{"binary_type": "jpeg"}]}, [b"x"], "binary_type 'jpeg'")


def test_2d_mask_needs_its_image():
    part = {"binary_type": "probability_mask", "binary_data_shape": {"width": 4, "height": 3}}
    fails({"parts": [part]}, [np.zeros((3, 4), np.uint8)], "dicom_image.SOPInstanceUID")
    part["dicom_image"] = {"SOPInstanceUID": "1.2.3.4"}
    prepare_output({"parts": [part]}, [np.zeros((3, 4), np.uint8)])


def test_probability_threshold_range():
    fails({"parts": [mask_part(probability_threshold=1.5)]}, [bytes(24)], "probability_threshold")


def test_label_map_rules():
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 0, :2] = [1, 2]
    ok = mask_part("numeric_label_mask", label_map={"1": "A", "2": "B"})
    prepare_output({"parts": [ok]}, [labels])
    fails({"parts": [mask_part("numeric_label_mask", label_map={"1": "A"})]}, [labels], r"values \[2\] have no entry")
    fails({"parts": [mask_part("numeric_label_mask", label_map={"one": "A"})]}, [labels], "integer string")
    fails({"parts": [mask_part("numeric_label_mask", label_map={"1": "A", "2": "A"})]}, [labels], "unique")
    fails({"parts": [mask_part("numeric_label_mask")]}, [labels], "needs a non-empty label_map")


def test_boolean_mask_holds_only_zero_and_one():
    fails({"parts": [mask_part("boolean_mask")]}, [np.full((2, 3, 4), 7, np.uint8)], "only 0 and 1")


def test_heatmap_palette_rules():
    good = {"parts": [mask_part("heatmap", palette="p")], "palettes": {"p": PALETTE}}
    prepare_output(copy.deepcopy(good), [bytes(24)])
    fails({"parts": [mask_part("heatmap", palette="q")], "palettes": {"p": PALETTE}}, [bytes(24)], "not defined")
    bad = copy.deepcopy(good)
    bad["palettes"]["p"]["data"][0]["threshold"] = 0.1
    fails(bad, [bytes(24)], "start at 0.0 and end at 1.0")
    bad = copy.deepcopy(good)
    bad["palettes"]["p"]["data"][1]["color"] = [255, 0, 0, 256]
    fails(bad, [bytes(24)], r"\[R, G, B, A\]")


def test_bounding_boxes_rules():
    box = {"label": "x", "SOPInstanceUID": "1.2", "top_left": [1, 2], "bottom_right": [5, 6]}
    prepare_output({"parts": [], "bounding_boxes_2d": [box]}, [])
    fails({"parts": [], "bounding_boxes_2d": [{**box, "label": None}]}, [], "string label")
    fails({"parts": [], "bounding_boxes_2d": [{**box, "top_left": [1]}]}, [], r"top_left must be \[column, row\]")
    fails({"parts": [], "bounding_boxes_2d": [{**box, "bottom_right": [0, 0]}]}, [], "above or left")
    fails({"parts": [], "bounding_boxes_2d": [{k: v for k, v in box.items() if k != "SOPInstanceUID"}]}, [],
          "SOPInstanceUID")


def test_dicom_parts_accept_datasets_and_refuse_other_bytes():
    ds = series_from_volume(np.zeros((1, 4, 4), np.int16))[0]
    _, buffers = prepare_output({"parts": [{"binary_type": "dicom"}]}, [ds])
    assert bytes(buffers[0][128:132]) == b"DICM"
    fails({"parts": [{"binary_type": "dicom_secondary_capture"}]}, [b"not dicom"], "not a DICOM file")
    assert content_type_for("dicom_structured_report") == "application/dicom"
    assert content_type_for("heatmap") == "application/octet-stream"


def test_ml_json_must_be_objects():
    fails({"parts": [], "study_ml_json": ["x"]}, [], "study_ml_json must be an object")
    fails({"parts": [], "series_ml_json": {"1.2": 3}}, [], r"series_ml_json\['1.2'\]")


def test_validate_response_checks_received_bytes():
    validate_response({"parts": [mask_part()]}, [bytes(24)])
    with pytest.raises(OutputValidationError, match="parts\\[0\\]"):
        validate_response({"parts": [mask_part()]}, [bytes(25)])


def test_hashes_part_rule_of_existing_clients():
    body = b"a" * 64 + b":" + b"b" * 64
    assert is_hashes_part("text/plain", body)
    assert not is_hashes_part("text/plain; charset=utf-8", body)
    assert not is_hashes_part("text/plain", body + b"\n")


def test_check_against_study():
    series = {"1.2.3": SeriesInfo(rows=3, columns=4, sop_instance_uids=["a", "b"])}
    check_against_study({"parts": [mask_part()]}, series)
    with pytest.raises(OutputValidationError, match="not one of the input series"):
        check_against_study({"parts": [mask_part(SeriesInstanceUID="9.9")]}, series)
    wrong = mask_part()
    wrong["binary_data_shape"]["depth"] = 3
    with pytest.raises(OutputValidationError, match="its series has 2 images of 3x4"):
        check_against_study({"parts": [wrong]}, series)
    with pytest.raises(OutputValidationError, match="not one of the input images"):
        check_against_study({"parts": [], "bounding_boxes_2d": [{"SOPInstanceUID": "zz"}]}, series)


def test_check_against_study_with_several_timepoints():
    """A cine series of 3 timepoints x 2 slices sends 6 images; its mask is 3 x 2 x rows x columns."""
    series = {"1.2.3": SeriesInfo(rows=3, columns=4, sop_instance_uids=list("abcdef"))}
    cine = mask_part()
    cine["binary_data_shape"].update(timepoints=3, depth=2)
    check_against_study({"parts": [cine]}, series)
    cine["binary_data_shape"].update(timepoints=2, depth=2)
    with pytest.raises(OutputValidationError, match=r"is 2x2x3x4 \(timepoints x depth x height x width\)"):
        check_against_study({"parts": [cine]}, series)
    cine["binary_data_shape"].update(timepoints=1, depth=2)
    with pytest.raises(OutputValidationError, match=r"is 2x3x4 \(depth x height x width\), its series has 6 images"):
        check_against_study({"parts": [cine]}, series)
