"""Between DICOM's patient axes and the model's: the crop as nibabel loaded the training NIfTI files (RAS)."""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from inference.dicom.series import Volume


def ras_affine(volume: Volume) -> np.ndarray:
    """4x4 affine from (column, row, slice) indices of ``volume`` to RAS millimetres.

    DICOM patient coordinates are LPS; NIfTI, which the model was trained on, is RAS: the two
    differ by the sign of x and y. Without orientation tags the series is taken as axial.
    """
    first = volume.datasets[0]
    orientation = np.asarray(first.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0], float)  # absent or empty
    row_direction, column_direction = orientation[:3], orientation[3:]
    slice_spacing, row_spacing, column_spacing = volume.spacing
    affine = np.eye(4)
    affine[:3, 0] = row_direction * column_spacing  # along a row: the column index grows
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = np.cross(row_direction, column_direction) * slice_spacing
    affine[:3, 3] = np.asarray(first.get("ImagePositionPatient") or [0, 0, 0], float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def to_model_orientation(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The crop as the model saw its training data (RAS axes, as nibabel loads the NIfTI files).

    Returns the array and the orientation that ``from_model_orientation`` needs to undo it.
    """
    orientation = io_orientation(ras_affine(volume))
    voxels = volume.voxels.transpose(2, 1, 0)  # (slices, rows, columns) -> (columns, rows, slices)
    return np.ascontiguousarray(apply_orientation(voxels, orientation)), orientation


def from_model_orientation(labels: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Labels in the model's RAS order back to (slices, rows, columns), the 3D mask's order on the wire."""
    undo = ornt_transform(axcodes2ornt("RAS"), orientation)
    return np.ascontiguousarray(apply_orientation(labels, undo).transpose(2, 1, 0))
