"""The inference protocol's rules, in one place: used by the gateway, the test tool and the tests.

A handler answers ``(response_json, buffers)``. ``response_json["parts"]`` describes one buffer
each, in order, by ``binary_type``:

=========================  ===========================  =====================================
binary_type                buffer                       extra keys of the part
=========================  ===========================  =====================================
probability_mask           uint8, 0..255                probability_threshold (0..1, optional)
boolean_mask               uint8, 0 or 1 (bool allowed)
heatmap                    uint8, 0..255                palette (a key of ``palettes``)
numeric_label_mask         uint8 label values           label_map {"1": "name", ...}
dicom, dicom_secondary_capture, dicom_structured_report, dicom_gsps
                           a DICOM file (bytes or a pydicom Dataset)
=========================  ===========================  =====================================

Masks carry ``binary_data_shape``: ``{"width", "height"}`` with ``dicom_image.SOPInstanceUID``
for a 2D mask on one image, ``{"timepoints"?, "depth", "width", "height"}`` for a 3D mask on a
series (bytes in C order of a (timepoints, depth, height, width) array: column fastest, then
row, then slice). The JSON may also hold ``bounding_boxes_2d``, ``linear_measurements_2d``,
``study_ml_json``, ``series_ml_json``, ``palettes`` and ``dicomConformance``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeGuard

import numpy as np

from inference.dicom.writing import dataset_bytes
from inference.errors import OutputValidationError, PayloadTooLarge

MASK_TYPES = ("probability_mask", "boolean_mask", "heatmap", "numeric_label_mask")
DICOM_TYPES = ("dicom", "dicom_secondary_capture", "dicom_structured_report", "dicom_gsps")
BINARY_TYPES = MASK_TYPES + DICOM_TYPES
JSON_CONTENT_TYPE = "application/json"
HASHES_CONTENT_TYPE = "text/plain"
HASHES_LENGTH = 129  # 64 hex digits, ':', 64 hex digits
DEFAULT_DRAW_THRESHOLD = 128  # probability masks without probability_threshold are drawn above this
#: The body of a response part, ready to send (a handler's bytearray goes out as it is, without a copy).
BytesLike = bytes | bytearray | memoryview


def content_type_for(binary_type: str) -> str:
    """The Content-Type of a response part of this binary type."""
    return "application/dicom" if binary_type in DICOM_TYPES else "application/octet-stream"


def format_hashes(input_hash: str, output_hash: str) -> str:
    """The body of the last response part: ``"<input sha256>:<output sha256>"``."""
    return f"{input_hash}:{output_hash}"


def is_hashes_part(content_type: str, body: bytes) -> bool:
    """Whether a last response part is the hashes part, by the rule existing clients apply."""
    return content_type == HASHES_CONTENT_TYPE and len(body) == HASHES_LENGTH and body[64:65] == b":"


def _fail(message: str) -> NoReturn:
    raise OutputValidationError(message)


def _where(index: int, part: Mapping[str, Any]) -> str:
    return f"parts[{index}] ({part.get('binary_type', '?')})"


def mask_length(shape: Mapping[str, Any], where: str = "binary_data_shape") -> int:
    """Bytes a mask of this ``binary_data_shape`` must have (T x D x H x W, or H x W in 2D)."""
    if not isinstance(shape, Mapping):
        _fail(f"{where} must be an object with width and height")
    keys = ["width", "height"] + [k for k in ("depth", "timepoints") if k in shape]
    for key in keys:
        value = shape.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(f"{where}.{key} must be a positive integer, got {value!r}")
    return math.prod(int(shape[k]) for k in keys)


def mask_array_shape(shape: Mapping[str, Any]) -> tuple[int, ...]:
    """The numpy shape a mask of this ``binary_data_shape`` has: (T, D, H, W), (D, H, W) or (H, W)."""
    dims = [shape["height"], shape["width"]]
    if "depth" in shape:
        dims.insert(0, shape["depth"])
    if "timepoints" in shape:
        dims.insert(0, shape["timepoints"])
    return tuple(int(d) for d in dims)


def normalize_buffer(part: Mapping[str, Any], buffer: Any, index: int) -> BytesLike:
    """Turn what a handler returned for ``part`` into bytes, refusing what would be misread.

    Masks: numpy arrays must be uint8 (bool is converted) with exactly the shape of
    ``binary_data_shape`` in (timepoints, depth, height, width) order, or raw bytes. DICOM
    parts: bytes of a DICOM file or a pydicom Dataset (written out here).
    """
    where = _where(index, part)
    binary_type = part.get("binary_type")
    if binary_type in DICOM_TYPES:
        return _dicom_bytes(buffer, where)
    if isinstance(buffer, np.ndarray):
        if buffer.dtype == np.bool_:
            buffer = buffer.view(np.uint8)
        if buffer.dtype != np.uint8:
            _fail(f"{where}: mask dtype is {buffer.dtype}, must be uint8 (scale and cast it yourself; "
                  "float or wider integer masks are not converted silently)")
        expected = mask_array_shape(part["binary_data_shape"])
        accepted = {expected, (math.prod(expected),)}
        if len(expected) == 4 and expected[0] == 1:
            accepted.add(expected[1:])  # one timepoint: (depth, height, width) is fine
        if buffer.shape not in accepted:
            _fail(f"{where}: mask array has shape {buffer.shape}, binary_data_shape says {expected} "
                  "((timepoints,) depth, height, width); transpose it to C order of that shape")
        return np.ascontiguousarray(buffer).data.cast("B")
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        return buffer
    _fail(f"{where}: buffer is a {type(buffer).__name__}; return a uint8 numpy array or bytes")
    raise AssertionError  # unreachable


def _dicom_bytes(buffer: Any, where: str) -> BytesLike:
    from pydicom.dataset import Dataset

    if isinstance(buffer, Dataset):
        return dataset_bytes(buffer)  # what cannot be written is dropped, with a warning (inference.dicom.writing)
    if isinstance(buffer, (bytes, bytearray, memoryview)):
        return buffer
    _fail(f"{where}: buffer is a {type(buffer).__name__}; return DICOM file bytes or a pydicom Dataset")
    raise AssertionError


def prepare_output(response_json: Any, buffers: Sequence[Any]) -> tuple[dict, list[BytesLike]]:
    """Check a handler's output and return it ready to send; ``OutputValidationError`` says what is wrong."""
    if not isinstance(response_json, dict):
        _fail(f"response_json must be a dict, got {type(response_json).__name__}")
    if not isinstance(buffers, (list, tuple)):
        _fail(f"buffers must be a list, got {type(buffers).__name__}")
    parts = response_json.setdefault("parts", [])
    _check_parts_list(parts, len(buffers))
    for index, part in enumerate(parts):
        _check_part_json(index, part, response_json)
    prepared = [normalize_buffer(part, buffer, i) for i, (part, buffer) in enumerate(zip(parts, buffers, strict=True))]
    validate_response(response_json, prepared)
    return response_json, prepared


def validate_response(response_json: Any, buffers: Sequence[BytesLike]) -> None:
    """Check a response (JSON plus byte buffers) against the protocol; raises ``OutputValidationError``.

    This is what the test tool runs on what it receives, and what the gateway runs before sending.
    """
    if not isinstance(response_json, dict):
        _fail(f"response JSON must be an object, got {type(response_json).__name__}")
    parts = response_json.get("parts", [])
    _check_parts_list(parts, len(buffers))
    for index, (part, buffer) in enumerate(zip(parts, buffers, strict=True)):
        _check_part_json(index, part, response_json)
        _check_part_buffer(index, part, buffer)
    _check_bounding_boxes(response_json.get("bounding_boxes_2d"))
    _check_linear_measurements(response_json.get("linear_measurements_2d"))
    for key in ("study_ml_json", "series_ml_json", "dicomConformance"):
        if key in response_json and not isinstance(response_json[key], dict):
            _fail(f"{key} must be an object, got {type(response_json[key]).__name__}")
    series_ml = response_json.get("series_ml_json") or {}
    for uid, value in series_ml.items():
        if not isinstance(value, dict):
            _fail(f"series_ml_json[{uid!r}] must be an object keyed by SeriesInstanceUID")


def _check_parts_list(parts: Any, n_buffers: int) -> None:
    if not isinstance(parts, list):
        _fail(f"response_json['parts'] must be a list, got {type(parts).__name__}")
    if len(parts) != n_buffers:
        _fail(f"response_json['parts'] has {len(parts)} entries but {n_buffers} buffers were returned; "
              "every part needs exactly one buffer, in the same order")


def _check_part_json(index: int, part: Any, response_json: Mapping[str, Any]) -> None:
    if not isinstance(part, dict):
        _fail(f"parts[{index}] must be an object, got {type(part).__name__}")
    where = _where(index, part)
    binary_type = part.get("binary_type")
    if binary_type not in BINARY_TYPES:
        _fail(f"parts[{index}]: binary_type {binary_type!r} is not one of {', '.join(BINARY_TYPES)}")
    if binary_type in DICOM_TYPES:
        return
    shape: Any = part.get("binary_data_shape")  # mask_length checks it is a mapping of sizes
    mask_length(shape, f"{where}: binary_data_shape")
    if "depth" not in shape:
        image = part.get("dicom_image")
        if not isinstance(image, dict) or not isinstance(image.get("SOPInstanceUID"), str):
            _fail(f"{where}: a 2D mask (no depth in binary_data_shape) needs dicom_image.SOPInstanceUID")
    if "SeriesInstanceUID" in part and not isinstance(part["SeriesInstanceUID"], str):
        _fail(f"{where}: SeriesInstanceUID must be a string")
    if binary_type == "probability_mask" and "probability_threshold" in part:
        threshold = part["probability_threshold"]
        if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
            _fail(f"{where}: probability_threshold must be a number in [0, 1], got {threshold!r}")
    if binary_type == "heatmap":
        _check_palette(where, part.get("palette"), response_json.get("palettes"))
    if binary_type == "numeric_label_mask":
        _check_label_map(where, part.get("label_map"))


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_palette(where: str, name: Any, palettes: Any) -> None:
    if not isinstance(name, str):
        _fail(f"{where}: a heatmap needs 'palette', the name of an entry of response_json['palettes']")
    if not isinstance(palettes, dict) or name not in palettes:
        _fail(f"{where}: palette {name!r} is not defined in response_json['palettes']")
    palette = palettes[name]
    if not isinstance(palette, dict) or palette.get("type") not in ("anchorpoint", "anchorpoints"):
        _fail(f"palettes[{name!r}] must be an object with type 'anchorpoint' and data")
    points = palette.get("data")
    if not isinstance(points, list) or len(points) < 2:
        _fail(f"palettes[{name!r}].data must list at least two anchor points")
    thresholds = []
    for i, point in enumerate(points):
        threshold, color = (point.get("threshold"), point.get("color")) if isinstance(point, dict) else (None, None)
        if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
            _fail(f"palettes[{name!r}].data[{i}].threshold must be a number in [0, 1], got {threshold!r}")
        if (not isinstance(color, list) or len(color) != 4
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)):
            _fail(f"palettes[{name!r}].data[{i}].color must be [R, G, B, A] integers in 0..255, got {color!r}")
        thresholds.append(threshold)
    if thresholds[0] != 0.0 or thresholds[-1] != 1.0:
        _fail(f"palettes[{name!r}]: thresholds must start at 0.0 and end at 1.0, "
              f"got {thresholds[0]} .. {thresholds[-1]}")
    if any(b < a for a, b in itertools.pairwise(thresholds)):
        _fail(f"palettes[{name!r}]: thresholds must be ascending, got {thresholds}")


def _check_label_map(where: str, label_map: Any) -> None:
    if not isinstance(label_map, dict) or not label_map:
        _fail(f"{where}: a numeric_label_mask needs a non-empty label_map {{\"1\": \"name\", ...}}")
    for key, value in label_map.items():
        if not (isinstance(key, str) and key.isdigit() and 0 <= int(key) <= 255):
            _fail(f"{where}: label_map key {key!r} must be an integer string 0..255")
        if not isinstance(value, str) or not value:
            _fail(f"{where}: label_map[{key!r}] must be a non-empty name")
    names = list(label_map.values())
    if len(set(names)) != len(names):
        _fail(f"{where}: label_map names must be unique, got {names}")


def _check_part_buffer(index: int, part: Mapping[str, Any], buffer: BytesLike) -> None:
    where = _where(index, part)
    view = memoryview(buffer).cast("B")
    if part["binary_type"] in DICOM_TYPES:
        if view.nbytes < 132 or bytes(view[128:132]) != b"DICM":
            _fail(f"{where}: buffer is not a DICOM file (no 'DICM' marker at byte 128)")
        return
    expected = mask_length(part["binary_data_shape"])
    if view.nbytes != expected:
        _fail(f"{where}: mask has {view.nbytes} bytes, binary_data_shape {dict(part['binary_data_shape'])} "
              f"needs {expected}")
    if part["binary_type"] not in ("boolean_mask", "numeric_label_mask"):
        return  # every byte value is a valid probability or heat
    values = np.frombuffer(view, dtype=np.uint8)
    top = int(values.max()) if values.size else 0  # no allocation, unlike a histogram of the whole mask
    if part["binary_type"] == "boolean_mask" and top > 1:
        _fail(f"{where}: a boolean_mask holds only 0 and 1, found values up to {top}")
    if part["binary_type"] == "numeric_label_mask":
        labelled = {int(k) for k in part["label_map"]}
        if set(range(1, top + 1)) <= labelled:
            return  # the usual case: every value up to the largest has a label
        missing = sorted(int(v) for v in _values_present(values) if v != 0 and v not in labelled)
        if missing:
            _fail(f"{where}: mask values {missing} have no entry in label_map {part['label_map']}")


def _values_present(values: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
    """The distinct byte values of ``values``, histogrammed in chunks to bound the memory used."""
    seen = np.zeros(256, bool)
    for start in range(0, values.size, chunk):
        seen |= np.bincount(values[start : start + chunk], minlength=256) > 0
    return np.flatnonzero(seen)


def _check_pair(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)


def _check_bounding_boxes(boxes: Any) -> None:
    if boxes is None:
        return
    if not isinstance(boxes, list):
        _fail("bounding_boxes_2d must be a list")
    for i, box in enumerate(boxes):
        if not isinstance(box, dict):
            _fail(f"bounding_boxes_2d[{i}] must be an object")
        if not isinstance(box.get("label"), str):
            _fail(f"bounding_boxes_2d[{i}] needs a string label")
        if not isinstance(box.get("SOPInstanceUID"), str):
            _fail(f"bounding_boxes_2d[{i}] needs the SOPInstanceUID of the image it is drawn on")
        for key in ("top_left", "bottom_right"):
            if not _check_pair(box.get(key)):
                _fail(f"bounding_boxes_2d[{i}].{key} must be [column, row], got {box.get(key)!r}")
        if box["bottom_right"][0] < box["top_left"][0] or box["bottom_right"][1] < box["top_left"][1]:
            _fail(f"bounding_boxes_2d[{i}]: bottom_right {box['bottom_right']} is above or left of "
                  f"top_left {box['top_left']}")


def _check_linear_measurements(measurements: Any) -> None:
    if measurements is None:
        return
    if not isinstance(measurements, list):
        _fail("linear_measurements_2d must be a list")
    for i, item in enumerate(measurements):
        if not isinstance(item, dict) or not isinstance(item.get("SOPInstanceUID"), str):
            _fail(f"linear_measurements_2d[{i}] needs the SOPInstanceUID of the image it is drawn on")
        for key in ("start", "end"):
            if not _check_pair(item.get(key)):
                _fail(f"linear_measurements_2d[{i}].{key} must be [column, row], got {item.get(key)!r}")


# -- checks against the study that was sent (the test tool and the tests) ------------------
@dataclass
class SeriesInfo:
    """What the response is checked against for one input series."""

    rows: int
    columns: int
    sop_instance_uids: list[str] = field(default_factory=list)  # in the order sent
    #: (rows, columns) of images whose size differs from the series' (e.g. a series of photos)
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def size_of(self, sop_instance_uid: str) -> tuple[int, int]:
        """(rows, columns) of one image of the series."""
        return self.image_sizes.get(sop_instance_uid, (self.rows, self.columns))

    @property
    def depth(self) -> int:
        return len(self.sop_instance_uids)


def check_against_study(response_json: Mapping[str, Any], series: Mapping[str, SeriesInfo]) -> None:
    """Check that masks and annotations refer to images that were sent, with their sizes."""
    images = {uid: info for info in series.values() for uid in info.sop_instance_uids}
    for index, part in enumerate(response_json.get("parts", [])):
        where = _where(index, part)
        if part.get("binary_type") in DICOM_TYPES:
            continue
        shape = part["binary_data_shape"]
        uid = part.get("SeriesInstanceUID")
        if uid is not None and uid not in series:
            _fail(f"{where}: SeriesInstanceUID {uid} is not one of the input series")
        if "depth" in shape:
            info = series[uid] if uid is not None else (next(iter(series.values())) if len(series) == 1 else None)
            if info is None:
                _fail(f"{where}: a 3D mask needs SeriesInstanceUID when several series were sent")
            if len({info.size_of(sop) for sop in info.sop_instance_uids}) > 1:
                _fail(f"{where}: a 3D mask cannot cover a series whose images differ in size")
            # a series with several timepoints sends timepoints x depth images (e.g. a cardiac cine)
            timepoints = shape.get("timepoints", 1)
            if (timepoints * shape["depth"], shape["height"], shape["width"]) != (info.depth, info.rows, info.columns):
                size = f"{shape['depth']}x{shape['height']}x{shape['width']}"
                size = f"{size} (depth x height x width)" if timepoints == 1 else \
                    f"{timepoints}x{size} (timepoints x depth x height x width)"
                _fail(f"{where}: 3D mask is {size}, its series has {info.depth} images of {info.rows}x{info.columns}")
        else:
            sop = part["dicom_image"]["SOPInstanceUID"]
            if sop not in images:
                _fail(f"{where}: dicom_image.SOPInstanceUID {sop} is not one of the input images")
            rows, columns = images[sop].size_of(sop)
            if (shape["height"], shape["width"]) != (rows, columns):
                _fail(f"{where}: 2D mask is {shape['height']}x{shape['width']}, its image is {rows}x{columns}")
    for key, corners in (("bounding_boxes_2d", ("top_left", "bottom_right")),
                         ("linear_measurements_2d", ("start", "end"))):
        for i, item in enumerate(response_json.get(key) or []):
            sop = item["SOPInstanceUID"]
            if sop not in images:
                _fail(f"{key}[{i}]: SOPInstanceUID {sop} is not one of the input images")
            rows, columns = images[sop].size_of(sop)
            for corner in corners:
                column, row = item[corner]
                if not (0 <= column <= columns and 0 <= row <= rows):
                    _fail(f"{key}[{i}].{corner} {item[corner]} is outside its {rows}x{columns} image; "
                          "points are [column, row] in pixels")


def check_response_size(buffers: Sequence[BytesLike], json_bytes: int, limit: int) -> None:
    """413 when a prepared response (JSON plus buffers) exceeds ``limit`` bytes, before any of it is sent."""
    total = json_bytes + sum(memoryview(buffer).nbytes for buffer in buffers)
    if total > limit:
        raise PayloadTooLarge(f"the response would be {total} bytes, over the limit of {limit} bytes "
                              "(INFERENCE_MAX_RESPONSE_BYTES); send a smaller study or fewer series")
