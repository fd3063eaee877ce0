"""What a reviewer looks at: the source slices with the model's segmentation laid over, and the result's images.

Drawn with ``inference.imaging.render`` as the test tool's page draws them: the image windowed as a
viewer shows it, each structure filled and outlined in its manifest colour, upscaled for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from inference.dicom.results import Structure
from inference.imaging import render

#: Slices shown per segmentation: spread over the slices it covers (its quarter, middle, three quarters).
SLICES_SHOWN = 3


def overlay_slices(source: Sequence[Dataset], labels: np.ndarray, structures: Sequence[Structure],
                   count: int = SLICES_SHOWN) -> list[Image.Image]:
    """Up to ``count`` source slices spread over those with labels, with ``labels`` over them."""
    labelled = np.flatnonzero((labels > 0).reshape(len(labels), -1).any(axis=1))
    if labelled.size == 0:
        chosen = [len(labels) // 2]
    else:  # spread over the segmented extent, as the report image spreads its slices
        chosen = sorted({int(labelled[round(q * (labelled.size - 1))])
                         for q in np.linspace(0.25, 0.75, count)} if count > 1 else {int(labelled[labelled.size // 2])})
    colors = {s.label: s.color for s in structures}
    shown = [pydicom.dcmread(source[index].filename) for index in chosen]
    # one window for the slices shown, judged from their values as the test tool's page judges a series'
    sample = np.concatenate([np.asarray(render.apply_modality_lut(ds.pixel_array, ds), np.float64).ravel()
                             for ds in shown])
    window = render.choose_window(sample, shown[0])
    images = []
    for index, ds in zip(chosen, shown, strict=True):
        rgb = render.to_rgb(render.display_image(ds, window))
        drawn = render.overlay_labels(rgb, labels[index], colors)
        factor = render.display_factor(*drawn.shape[:2])
        images.append(Image.fromarray(render.upscale(drawn, factor)))
    return images


def result_images(files: Sequence[Path]) -> list[Image.Image]:
    """The image results among ``files`` (a Secondary Capture report, a derived series), as a viewer shows them."""
    images = []
    for path in files:
        ds = pydicom.dcmread(path)
        if "PixelData" in ds and ds.get("Modality") not in ("SEG", "SR"):
            images.append(Image.fromarray(render.to_rgb(render.window_image(ds))))
    return images
