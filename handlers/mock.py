"""Mock handlers, one per output kind of the protocol, for integrators and tests.

Registered with ``mock=True``: a production server serves them only with ``INFERENCE_ENABLE_MOCKS=1``.
They read only DICOM headers and draw shapes from the geometry (a blob growing from the
centre, a box around the middle), so a viewer shows something recognisable in the right place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from inference.dicom.header import COLUMNS, ROWS
from inference.dicom.instance import DicomInstance
from inference.dicom.series import group_by_series, require_instances, series_uid, slice_normal, sort_by_position
from inference.dicom.writing import secondary_capture, structured_report
from inference.imaging.render import font
from inference.pipeline.context import HandlerContext
from inference.pipeline.handler_registry import register

HEATMAP_PALETTE = {
    "type": "anchorpoint",
    "data": [
        {"threshold": 0.0, "color": [0, 0, 255, 0]},
        {"threshold": 0.5, "color": [0, 255, 0, 128]},
        {"threshold": 1.0, "color": [255, 0, 0, 255]},
    ],
}


def _sorted_series(instances: Sequence[DicomInstance]) -> list[list[DicomInstance]]:
    """Each series' instances, sorted along its normal (geometry from their checked headers)."""
    return [sort_by_position(items) for items in group_by_series(require_instances(instances)).values()]


def _volumes(instances: Sequence[DicomInstance]) -> list[list[Dataset]]:
    """Each series' headers (no pixels), sorted along its normal."""
    return [[instance.dataset for instance in items] for items in _sorted_series(instances)]


def _series(instances: Sequence[DicomInstance]) -> dict[str, list[Dataset]]:
    """Each series' headers (no pixels), in the order sent, by SeriesInstanceUID."""
    return {uid: [instance.dataset for instance in items]
            for uid, items in group_by_series(require_instances(instances)).items()}


def _images(instances: Sequence) -> list:
    return [ds for items in _volumes(instances) for ds in items]


def _blob(depth: int, rows: int, columns: int) -> np.ndarray:
    """uint8 probabilities of an ellipsoid centred in the volume, 255 at its centre, 0 at its rim."""
    row_axis = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) / (rows / 4)
    column_axis = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2) / (columns / 4)
    # 255 x (1 - in-plane distance^2), as int16 so each slice is one subtraction and one clip
    plane = np.rint(255 * (1 - (row_axis[:, None] ** 2 + column_axis[None, :] ** 2))).clip(-32768, 255)
    plane = plane.astype(np.int16)
    out = np.empty((depth, rows, columns), np.uint8)
    work = np.empty((rows, columns), np.int16)
    for k in range(depth):
        z = (k - (depth - 1) / 2) / max(depth / 2, 1)
        np.subtract(plane, int(round(255 * z * z)), out=work)
        np.clip(work, 0, 255, out=work)
        out[k] = work
    return out


def _shape3d(items: list[DicomInstance]) -> dict:
    header = items[0].header  # validation checked Rows and Columns: one integer each
    return {"timepoints": 1, "depth": len(items), "height": header.integer(ROWS), "width": header.integer(COLUMNS)}


def _mask3d_parts(instances: Sequence, binary_type: str, **extra) -> tuple[list[dict], list[np.ndarray]]:
    """One part per series with orientation; no pydicom dataset is built (a small study's requests
    spent a tenth of their time building 24 of them for the first one's Rows, Columns and UID)."""
    parts, buffers = [], []
    for items in _sorted_series(instances):
        if slice_normal(items[0]) is None:
            continue
        shape = _shape3d(items)
        parts.append({"label": f"Mock {binary_type}", "binary_type": binary_type, "binary_data_shape": shape,
                      "SeriesInstanceUID": series_uid(items[0]), **extra})
        buffers.append(_blob(shape["depth"], shape["height"], shape["width"]))
    return parts, buffers


@register("get-probability-mask", mock=True)
def probability_mask_3d(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """3D probability mask per series: a blob growing from the centre."""
    parts, buffers = _mask3d_parts(instances, "probability_mask", probability_threshold=0.5)
    return {"protocol_version": "1.0", "parts": parts}, buffers


@register("get-boolean-mask", mock=True)
def boolean_mask_3d(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """3D boolean mask per series: the blob's core."""
    parts, buffers = _mask3d_parts(instances, "boolean_mask")
    return {"protocol_version": "1.0", "parts": parts}, [buffer > 127 for buffer in buffers]


@register("get-heatmap", mock=True)
def heatmap_3d(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """3D heatmap per series with a blue-green-red palette."""
    parts, buffers = _mask3d_parts(instances, "heatmap", palette="mock_heat")
    return {"protocol_version": "1.0", "parts": parts, "palettes": {"mock_heat": HEATMAP_PALETTE}}, buffers


@register("get-label-mask", mock=True)
def label_mask_3d(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """3D numeric label mask per series: a core (2) inside a shell (1)."""
    parts, buffers = _mask3d_parts(instances, "numeric_label_mask", label_map={"1": "Shell", "2": "Core"})
    labels = [np.where(b > 170, 2, np.where(b > 40, 1, 0)).astype(np.uint8) for b in buffers]
    return {"protocol_version": "1.0", "parts": parts}, labels


@register("get-probability-mask-2d", mock=True)
def probability_mask_2d(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """2D probability mask per image: a disc in the middle of each image."""
    parts, buffers = [], []
    for ds in _images(instances):
        rows, columns = int(ds.Rows), int(ds.Columns)
        parts.append({"label": "Mock 2D mask", "binary_type": "probability_mask",
                      "binary_data_shape": {"width": columns, "height": rows},
                      "dicom_image": {"SOPInstanceUID": str(ds.SOPInstanceUID), "frame_number": 1,
                                      "SeriesInstanceUID": str(ds.SeriesInstanceUID)}})
        buffers.append(_blob(1, rows, columns)[0])
    return {"protocol_version": "1.0", "parts": parts}, buffers


def _middle_box(ds, fraction: float) -> tuple[list[int], list[int]]:
    rows, columns = int(ds.Rows), int(ds.Columns)
    half_w, half_h = int(columns * fraction / 2), int(rows * fraction / 2)
    return [columns // 2 - half_w, rows // 2 - half_h], [columns // 2 + half_w, rows // 2 + half_h]


@register("get-bounding-box-2d", mock=True)
def bounding_boxes_2d(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """One bounding box per image, around its middle third."""
    boxes = []
    for ds in _images(instances):
        top_left, bottom_right = _middle_box(ds, 1 / 3)
        boxes.append({"label": "Mock finding", "SOPInstanceUID": str(ds.SOPInstanceUID),
                      "top_left": top_left, "bottom_right": bottom_right})
    return {"protocol_version": "1.0", "parts": [], "bounding_boxes_2d": boxes}, []


@register("get-linear-measurements", mock=True)
def linear_measurements(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """One horizontal measurement across the middle of each image, in pixel coordinates."""
    items = []
    for ds in _images(instances):
        top_left, bottom_right = _middle_box(ds, 1 / 2)
        row = int(ds.Rows) // 2
        items.append({"label": "Mock length", "SOPInstanceUID": str(ds.SOPInstanceUID), "coordinates_type": "pixel",
                      "start": [top_left[0], row], "end": [bottom_right[0], row]})
    return {"protocol_version": "1.0", "parts": [], "linear_measurements_2d": items}, []


@register("get-classification", mock=True)
def classification(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """Study and per-series classification labels, derived from the input hash (stable per input)."""
    series = _series(instances)
    score = int(context.input_hash[:8], 16) / 0xFFFFFFFF
    study = {"label": "Mock finding" if score > 0.5 else "No finding", "confidence": round(max(score, 1 - score), 3)}
    per_series = {}
    for uid, items in series.items():
        s = int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        per_series[uid] = {"label": "Abnormal" if s > 0.5 else "Normal", "confidence": round(max(s, 1 - s), 3),
                           "SeriesDescription": str(items[0].get("SeriesDescription", ""))}
    return {"protocol_version": "1.0", "parts": [], "study_ml_json": study, "series_ml_json": per_series}, []


@register("get-secondary-capture", mock=True)
def secondary_capture_report(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """A Secondary Capture image listing the series received."""
    series = _series(instances)
    image = Image.new("RGB", (512, 96 + 24 * len(series)), (16, 16, 16))
    draw = ImageDraw.Draw(image)
    draw.text((16, 16), "Mock report - not for clinical use", fill=(255, 200, 0), font=font(16))
    draw.text((16, 40), f"input {context.input_hash[:16]}...", fill=(200, 200, 200), font=font(13))
    for i, items in enumerate(series.values()):
        text = f"{items[0].get('SeriesDescription', '?')}: {len(items)} images"
        draw.text((16, 72 + 24 * i), text, fill=(255, 255, 255), font=font(14))
    first = next(iter(series.values()))[0]
    ds = secondary_capture(np.asarray(image), first, description="Mock report")
    return {"protocol_version": "1.0",
            "parts": [{"label": "Mock report", "binary_type": "dicom_secondary_capture"}]}, [ds]


@register("get-structured-report", mock=True)
def structured_report_mock(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """A Basic Text SR with one finding per series received."""
    series = _series(instances)
    findings = {str(items[0].get("SeriesDescription", uid)): f"{len(items)} images, no finding (mock)"
                for uid, items in series.items()}
    first = next(iter(series.values()))[0]
    report = structured_report(first, findings, description="Mock structured report")
    return {"protocol_version": "1.0",
            "parts": [{"label": "Mock report", "binary_type": "dicom_structured_report"}]}, [report]
