"""Inputs made deliberately worse than the training data, with their labels carried along: what the quality
flag is measured on (``models.flag_quality``) and what the voxel-size tolerance is set from (``models.calibrate``).

Each degradation takes a training-style case (image and label in the model's RAS orientation, 1 mm voxels) and
returns the image the model would be given, the label on the same grid and the voxel size it would be told.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class Degraded:
    """A case as the model would receive it: voxels, the label on the same grid, the voxel size (mm, RAS order)."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def resample(image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float]) -> Degraded:
    """The 1 mm case resampled to ``spacing`` (mm per RAS axis): the image linearly, the label by the largest
    linearly interpolated one-hot channel (smoother than nearest-neighbour, so the reference loses little)."""
    factors = [1.0 / s for s in spacing]
    resampled = ndimage.zoom(image.astype(np.float32), factors, order=1)
    channels = [ndimage.zoom((label == k).astype(np.float32), factors, order=1) for k in range(int(label.max()) + 1)]
    return Degraded(resampled, np.argmax(np.stack(channels), axis=0).astype(np.uint8), tuple(spacing))


def rescaled(image: np.ndarray, label: np.ndarray, factor: float = 50.0) -> Degraded:
    """Pixel values multiplied by ``factor`` (a RescaleSlope of 50 applied, or not undone)."""
    return Degraded(image * factor, label, (1.0, 1.0, 1.0))


def noisy(image: np.ndarray, label: np.ndarray, seed: int = 0, sigma: float = 0.5) -> Degraded:
    """Gaussian noise of ``sigma`` times the image's standard deviation (a very noisy acquisition)."""
    noise = np.random.default_rng(seed).normal(0.0, sigma * float(image.std()), image.shape)
    return Degraded(image + noise, label, (1.0, 1.0, 1.0))


def cropped_wrong(image: np.ndarray, label: np.ndarray, share: float = 0.4) -> Degraded:
    """The crop placed too far forward: its posterior ``share`` (along axis 1) missing, the rest of the volume
    shifted in from the front edge (edge values repeated) so the matrix is unchanged."""
    cut = int(round(share * image.shape[1]))
    shifted = np.pad(image[:, cut:], ((0, 0), (0, cut), (0, 0)), mode="edge")
    truth = np.pad(label[:, cut:], ((0, 0), (0, cut), (0, 0)))
    return Degraded(shifted, truth, (1.0, 1.0, 1.0))


def other_sequence(image: np.ndarray, label: np.ndarray) -> Degraded:
    """Another contrast: intensities inverted within the volume's range (grey and white matter swap, fluid
    turns bright, roughly how a T2-weighted crop looks next to the T1 the model knows)."""
    low, high = np.percentile(image, [0.5, 99.5])
    return Degraded(high + low - np.clip(image, low, high), label, (1.0, 1.0, 1.0))


#: The degradations ``models.flag_quality`` measures, by name.
DEGRADATIONS: dict[str, Callable[[np.ndarray, np.ndarray], Degraded]] = {
    "resampled to 1.5 mm": lambda image, label: resample(image, label, (1.5, 1.5, 1.5)),
    "rescaled x50": rescaled,
    "noisy": noisy,
    "cropped wrong": cropped_wrong,
    "another sequence (inverted contrast)": other_sequence,
}
