"""Series and volumes for handlers: check, group and sort instances, stack a series into a volume.

Volumes are numpy arrays of shape (depth, rows, columns): slices sorted by position along the
slice normal, ascending, which is the order viewers send them in and expect 3D masks in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
from pydicom.dataset import Dataset

from inference.dicom.header import SERIES_INSTANCE_UID, as_floats
from inference.dicom.instance import DicomInstance
from inference.errors import UnprocessableInput

log = logging.getLogger("inference.dicom")
#: Tags of the numeric attributes read from an instance's fast header.
_TAGS = {"InstanceNumber": 0x00200013, "ImagePositionPatient": 0x00200032, "ImageOrientationPatient": 0x00200037}
#: What the series helpers take: checked instances (geometry from their fast headers) or pydicom datasets.
Item = TypeVar("Item", bound=DicomInstance | Dataset)


def require_instances(instances: Sequence[DicomInstance]) -> Sequence[DicomInstance]:
    """``instances``, or a 422 when the request holds none (only attachments, or nothing after the JSON)."""
    if not instances:
        raise UnprocessableInput("the request holds no DICOM files; send the study's instances after the JSON part")
    return instances


def series_uid(item: DicomInstance | Dataset) -> str:
    """The SeriesInstanceUID of an instance or dataset ("" when absent); a checked instance's as validation read it."""
    if isinstance(item, DicomInstance):
        if item.attributes is not None:
            return item.attributes.SeriesInstanceUID
        return item.header.text(SERIES_INSTANCE_UID) or ""
    return str(item.get("SeriesInstanceUID", ""))


def _numbers(item: DicomInstance | Dataset, keyword: str) -> list[float] | None:
    """A DS/IS attribute's values as floats, None when absent or empty: a checked instance's as validation
    decoded them (``DicomInstance.attributes``), else from its fast header, else pydicom's."""
    if isinstance(item, DicomInstance):
        if item.attributes is not None:
            value = getattr(item.attributes, keyword)
            if value is None:
                return None
            return [float(value)] if isinstance(value, int) else [float(v) for v in value]
        return item.header.numbers(_TAGS[keyword])
    return as_floats(item.get(keyword))


def _dataset(item: DicomInstance | Dataset) -> Dataset:
    return item.dataset if isinstance(item, DicomInstance) else item


def _instance_number(ds: DicomInstance | Dataset) -> int:
    numbers = _numbers(ds, "InstanceNumber")
    return int(numbers[0]) if numbers else 0


def group_by_series(items: Iterable[Item]) -> dict[str, list[Item]]:
    """Instances (or datasets) keyed by SeriesInstanceUID, in order of first appearance."""
    series: dict[str, list[Item]] = {}
    for item in items:
        series.setdefault(series_uid(item), []).append(item)
    return series


def describe_series(series: dict[str, list[Item]]) -> str:
    """One line per series for error messages: UID, description and instance count."""
    return "; ".join(
        f"{uid} ({_dataset(items[0]).get('SeriesDescription', 'no description')!s}, {len(items)} instances)"
        for uid, items in series.items()
    )


def slice_normal(ds: DicomInstance | Dataset) -> np.ndarray | None:
    """Unit normal of the image plane (row x column direction), or None without orientation."""
    iop = _numbers(ds, "ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def sort_by_position(datasets: Sequence[Item]) -> list[Item]:
    """Slices sorted by position along the slice normal, ascending (InstanceNumber without geometry).

    Multi-timepoint series (several slices at one position) keep InstanceNumber order within
    a position.
    """
    normal = slice_normal(datasets[0])
    positions = [_numbers(ds, "ImagePositionPatient") for ds in datasets]
    if normal is None or any(position is None for position in positions):
        return sorted(datasets, key=_instance_number)
    keys = {id(ds): (round(float(np.dot(normal, cast(list[float], position))), 4), _instance_number(ds))
            for ds, position in zip(datasets, positions, strict=True)}
    return sorted(datasets, key=lambda ds: keys[id(ds)])


def slice_spacing(datasets: Sequence[DicomInstance | Dataset]) -> float:
    """Distance between slices along the normal: median step of positions, else the header's."""
    normal = slice_normal(datasets[0])
    positions = [_numbers(ds, "ImagePositionPatient") for ds in datasets]
    if normal is not None and len(datasets) > 1 and all(position is not None for position in positions):
        distances = sorted(float(np.dot(normal, cast(list[float], position))) for position in positions)
        steps = np.diff(distances)
        steps = steps[steps > 1e-6]
        if steps.size:
            return float(np.median(steps))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        if ds_value := _dataset(datasets[0]).get(keyword):
            return float(ds_value)
    return 1.0


def _text(item: DicomInstance | Dataset, keyword: str) -> str:
    """An attribute's value as text; empty when absent or undecodable (such a value is checked elsewhere, or not
    needed)."""
    try:
        return str(_dataset(item).get(keyword, "") or "").strip()
    except Exception:  # pydicom's conversion of a damaged value: as if absent
        return ""


#: A step between two slice positions above this many times the series' median step is a missing slice.
GAP_FACTOR = 1.5


def check_complete(datasets: Sequence[DicomInstance | Dataset]) -> None:
    """A 422 when a series is not what its own headers say, so no measurement is made on part of it: fewer
    instances than the ImagesInAcquisition they all give, or a gap in the slice positions (a step above
    ``GAP_FACTOR`` times the median step)."""
    uid = series_uid(datasets[0]) or "(no SeriesInstanceUID)"
    announced = {_text(ds, "ImagesInAcquisition") for ds in datasets}
    acquisitions = {_text(ds, "AcquisitionNumber") for ds in datasets}
    if len(announced) == 1 and len(acquisitions) == 1 and (count := announced.pop()).isdigit() \
            and len(datasets) < int(count):
        raise UnprocessableInput(f"series {uid} holds {len(datasets)} instances, but its headers announce "
                                 f"{int(count)} (ImagesInAcquisition): part of it is missing; send the whole series")
    normal = slice_normal(datasets[0])
    positions = [_numbers(ds, "ImagePositionPatient") for ds in datasets]
    if normal is None or len(datasets) < 3 or any(position is None for position in positions):
        return
    along = np.unique(np.round([float(np.dot(normal, cast(list[float], p))) for p in positions], 3))
    steps = np.diff(along)
    if steps.size < 2:
        return
    usual = float(np.median(steps))
    gap = int(np.argmax(steps))
    if steps[gap] > GAP_FACTOR * usual + 1e-3:
        raise UnprocessableInput(f"series {uid} has a gap of {steps[gap]:.2f} mm between the slices at "
                                 f"{along[gap]:.2f} and {along[gap + 1]:.2f} mm along its normal, where its slices "
                                 f"are {usual:.2f} mm apart: slices are missing; send the whole series")


@dataclass(frozen=True)
class Geometry:
    """Where a volume that came without DICOM headers lies, in DICOM patient coordinates (LPS, mm).

    Unit directions along which the column, row and slice indices grow, and the centre of voxel
    (0, 0, 0): what ImageOrientationPatient and the first ImagePositionPatient say for a series.
    """

    column_direction: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    slice_direction: tuple[float, float, float]
    origin: tuple[float, float, float]


@dataclass
class Volume:
    """A series as a volume: voxels (depth, rows, columns), spacing in mm in the same order.

    A volume read from DICOM has its sorted ``datasets``; a volume posted as voxels (the Radiomics
    door) has none, and its ``geometry`` and ``uid`` instead.
    """

    voxels: np.ndarray
    spacing: tuple[float, float, float]
    datasets: list[Dataset]  # sorted like the voxels' first axis
    geometry: Geometry | None = None
    uid: str | None = None

    @property
    def series_uid(self) -> str:
        if self.uid is not None:
            return self.uid
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def load_volume(items: Sequence[DicomInstance | Dataset], *, rescale: bool = True) -> Volume:
    """Sort a series and stack its pixels; with ``rescale``, apply RescaleSlope/Intercept (float32).

    Instances are checked (``check_complete``) and sorted by their headers, then read whole; datasets must
    hold their pixels.
    """
    check_complete(items)
    ordered_items = sort_by_position(items)
    ordered = [item.read_full() if isinstance(item, DicomInstance) else item for item in ordered_items]
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in ordered}
    if len(shapes) != 1:
        raise UnprocessableInput(f"series {ordered[0].SeriesInstanceUID} mixes image sizes {sorted(shapes)}")
    try:
        slices = [ds.pixel_array for ds in ordered]
    except Exception as exc:
        log.info("pixel data of series %s cannot be decoded: %s: %s", ordered[0].SeriesInstanceUID,
                 type(exc).__name__, exc)
        raise UnprocessableInput(f"pixel data of series {ordered[0].SeriesInstanceUID} cannot be decoded "
                                 "(unsupported compression or damaged pixel data)") from exc
    voxels = np.stack(slices)
    if rescale:
        slope = float(ordered[0].get("RescaleSlope", 1) or 1)
        intercept = float(ordered[0].get("RescaleIntercept", 0) or 0)
        voxels = voxels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    row_spacing, column_spacing = (float(v) for v in ordered[0].get("PixelSpacing") or (1.0, 1.0))  # absent or empty
    return Volume(voxels, (slice_spacing(ordered_items), row_spacing, column_spacing), ordered)
