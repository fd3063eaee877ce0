"""3D Gaussian blur of one series, isotropic in millimetres: answers a derived DICOM series.

Request JSON: ``{"inference_command": "gaussian-blur-3d", "sigma_mm": 2.0}`` (``sigma_mm`` is
optional, default ``DEFAULT_SIGMA_MM``; the pipeline checks it). Sigma per axis is ``sigma_mm / spacing`` (slice spacing
from the slice positions, row and column spacing from PixelSpacing), so thick slices are blurred
less in voxels than fine pixels. One ``dicom`` part per input instance comes back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.dicom.instance import DicomInstance
from inference.dicom.series import Volume, describe_series, group_by_series, load_volume, require_instances
from inference.dicom.writing import derived_series
from inference.errors import UnprocessableInput
from inference.imaging.blur import gaussian_blur_3d
from inference.pipeline.context import HandlerContext
from inference.pipeline.handler_registry import Param, register

DEFAULT_SIGMA_MM = 2.0
MAX_SIGMA_MM = 1000.0  # beyond this every voxel is the mean of the edge-padded volume: a typo


def single_series_volume(instances: Sequence[DicomInstance], command: str) -> Volume:
    """The one image series of the request as a volume (real-world values); 422 for none or several."""
    series = group_by_series(require_instances(instances))
    if len(series) != 1:
        raise UnprocessableInput(f"{command} works on one series, the request holds {len(series)}: "
                                 f"{describe_series(series)}; send the instances of one series")
    volume = load_volume(next(iter(series.values())))
    positions = {tuple(round(float(v), 3) for v in ds.get("ImagePositionPatient") or ()) or ds.SOPInstanceUID
                 for ds in volume.datasets}
    if len(positions) != len(volume.datasets):
        raise UnprocessableInput(f"series {volume.series_uid} has several images at one slice position "
                                 "(several time points?); send one 3D volume")
    if not all(s > 0 for s in volume.spacing):
        raise UnprocessableInput(f"series {volume.series_uid} has a spacing of {volume.spacing} mm; "
                                 "PixelSpacing and the slice positions must give positive spacings")
    return volume


@register("gaussian-blur-3d", route="/gaussian-blur", params=[
    Param("sigma_mm", "number", default=DEFAULT_SIGMA_MM, minimum=0, exclusive_minimum=True, maximum=MAX_SIGMA_MM,
          description="standard deviation of the Gaussian, in millimetres, the same along every axis")])
def gaussian_blur(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """3D Gaussian blur of one series (sigma_mm, default 2 mm): a derived DICOM series."""
    sigma_mm = context.params["sigma_mm"]
    volume = single_series_volume(instances, "gaussian-blur-3d")
    sigma_voxels = tuple(sigma_mm / spacing for spacing in volume.spacing)
    blurred = gaussian_blur_3d(volume.voxels.astype(np.float32, copy=False), sigma_voxels)
    description = f"Gaussian blur 3D sigma {sigma_mm:g} mm"
    datasets = derived_series(volume, blurred, description)
    parts = [{"label": description, "binary_type": "dicom"} for _ in datasets]
    return {"protocol_version": "1.0", "parts": parts}, datasets
