"""Test helper: a NIfTI crop of the training data written as the DICOM series a viewer would send."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from inference.dicom.writing import series_from_volume


def series_from_nifti(image_path: str | Path, description: str = "HippoCrop", **kwargs) -> list:
    """A NIfTI crop (as in the training data) written as the DICOM series a viewer would send.

    The voxels are reoriented from the NIfTI's axes to LPS (DICOM's patient axes) and stored as
    axial slices (rows run posterior-wards, columns leftwards), so the tests can run labelled
    training cases through the whole DICOM path.
    """
    image = nibabel.load(str(image_path))
    to_lps = ornt_transform(io_orientation(image.affine), axcodes2ornt("LPS"))
    voxels = apply_orientation(np.rint(np.asarray(image.dataobj)).astype(np.int16), to_lps)
    zooms = np.asarray(image.header.get_zooms()[:3], float)[to_lps[:, 0].astype(int).argsort()]
    x, y, z = (float(v) for v in zooms)
    return series_from_volume(np.ascontiguousarray(voxels.transpose(2, 1, 0)), spacing=(z, y, x),
                              description=description, orientation=(1, 0, 0, 0, 1, 0), **kwargs)
