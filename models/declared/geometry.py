"""Between a series' voxel grid and the grid a declared network expects: axis order, flips and spacing.

The series is given as voxels indexed (i, j, k) with a 4x4 affine from those indices to RAS
millimetres (as NIfTI, and MONAI after loading, have it). ``Grid`` reorients it to the declared
axis codes (a permutation and flips only, as MONAI's Orientationd: an oblique series keeps its
tilt) and resamples it to the declared spacing, centres of the first and last voxels' extents
aligned; ``Grid.to_source`` takes labels back to the series' grid by nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

#: The nibabel orientation transform that changes nothing.
IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], float)


def zooms_of(affine: np.ndarray) -> np.ndarray:
    """The voxel spacing (mm) along each index axis of ``affine``."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))


@dataclass(frozen=True)
class Grid:
    """How a series of ``source_shape`` maps to the network's grid: ``orientation`` (nibabel's) then resampling."""

    source_shape: tuple[int, int, int]
    orientation: np.ndarray  # nibabel orientation transform from the series' axes to the declared axis codes
    undo: np.ndarray  # and back
    oriented_shape: tuple[int, int, int]
    oriented_spacing: tuple[float, float, float]
    shape: tuple[int, int, int]  # on the network's grid
    spacing: tuple[float, float, float]

    @classmethod
    def plan(cls, shape: tuple[int, ...], affine: np.ndarray, axcodes: str | None,
             spacing_mm: tuple[float, float, float] | None) -> Grid:
        """The grid for a series of ``shape`` whose indices map to RAS by ``affine``."""
        zooms = zooms_of(affine)
        if axcodes is None:
            orientation = undo = IDENTITY
        else:
            orientation = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(axcodes)))
            undo = ornt_transform(axcodes2ornt(tuple(axcodes)), io_orientation(affine))
        axes = orientation[:, 0].astype(int)
        oriented_shape = [0, 0, 0]
        oriented_spacing = [0.0, 0.0, 0.0]
        for source_axis, target_axis in enumerate(axes):
            oriented_shape[target_axis] = int(shape[source_axis])
            oriented_spacing[target_axis] = float(zooms[source_axis])
        if spacing_mm is None:
            target_shape, target_spacing = tuple(oriented_shape), tuple(oriented_spacing)
        else:
            target_shape = tuple(max(1, int(round(n * s / t)))
                                 for n, s, t in zip(oriented_shape, oriented_spacing, spacing_mm, strict=True))
            target_spacing = tuple(float(t) for t in spacing_mm)
        return cls(tuple(int(n) for n in shape), orientation, undo, tuple(oriented_shape), tuple(oriented_spacing),
                   target_shape, target_spacing)

    @property
    def resampled(self) -> bool:
        return self.shape != self.oriented_shape

    def to_network(self, voxels: np.ndarray, order: int = 1) -> np.ndarray:
        """``voxels`` (the series' grid) on the network's grid, float32, resampled linearly (``order`` 1)."""
        oriented = apply_orientation(np.asarray(voxels, np.float32), self.orientation)
        if not self.resampled:
            return np.ascontiguousarray(oriented)
        scale = np.array(self.oriented_shape, float) / np.array(self.shape, float)
        # output voxel centre i sits at input coordinate (i + 0.5) * scale - 0.5: the grids' extents coincide
        return ndimage.affine_transform(oriented, scale, offset=0.5 * scale - 0.5, output_shape=self.shape,
                                        order=order, mode="nearest", prefilter=False)

    def to_source(self, labels: np.ndarray) -> np.ndarray:
        """Labels on the network's grid back on the series' grid (nearest neighbour, then the axes undone)."""
        if self.resampled:
            index = []
            for n_source, n_network in zip(self.oriented_shape, self.shape, strict=True):
                at = np.floor((np.arange(n_source) + 0.5) * (n_network / n_source)).astype(int)
                index.append(np.clip(at, 0, n_network - 1))
            labels = labels[np.ix_(*index)]
        return np.ascontiguousarray(apply_orientation(labels, self.undo))
