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
    slice_spacing, row_spacing, column_spacing = volume.spacing
    if volume.geometry is not None:  # a posted volume: its own axes (the slice axis need not be the normal)
        geometry = volume.geometry
        along_row, along_column = np.asarray(geometry.column_direction), np.asarray(geometry.row_direction)
        along_slices, origin = np.asarray(geometry.slice_direction), np.asarray(geometry.origin)
    else:
        first = volume.datasets[0]
        orientation = np.asarray(first.get("ImageOrientationPatient") or [1, 0, 0, 0, 1, 0], float)  # absent/empty
        along_row, along_column = orientation[:3], orientation[3:]
        along_slices = np.cross(along_row, along_column)
        origin = np.asarray(first.get("ImagePositionPatient") or [0, 0, 0], float)
    affine = np.eye(4)
    affine[:3, 0] = along_row * column_spacing  # along a row: the column index grows
    affine[:3, 1] = along_column * row_spacing
    affine[:3, 2] = along_slices * slice_spacing
    affine[:3, 3] = origin
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
