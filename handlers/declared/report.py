"""What a declared family's answer says of its labels, for any structures: the volumes and the report image."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from inference.dicom.series import Volume
from inference.imaging.render import font, overlay_labels, report_slices, to_rgb, upscale, window_values
from models.registry import Structure


def structure_key(name: str) -> str:
    """A structure's name as a JSON key: lower case, words joined by '_' ("Left kidney" -> "left_kidney")."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "structure"


def measure_structures(labels: np.ndarray, volume: Volume, structures: Sequence[Structure]) -> dict:
    """Per structure its voxels and volume (``<key>_voxels``, ``<key>_volume_mm3``), the total, the voxel size."""
    voxel_mm3 = volume.voxel_volume_mm3
    counts = np.bincount(labels.ravel(), minlength=max(s.label for s in structures) + 1)
    out: dict = {}
    for s in structures:
        key = structure_key(s.name)
        out[f"{key}_volume_mm3"] = round(int(counts[s.label]) * voxel_mm3, 1)
        out[f"{key}_voxels"] = int(counts[s.label])
    total = sum(int(counts[s.label]) for s in structures)
    out.update(total_volume_mm3=round(total * voxel_mm3, 1), voxel_volume_mm3=round(voxel_mm3, 4),
               spacing_mm=[round(v, 4) for v in volume.spacing])
    return out


def render_volume_report(volume: Volume, labels: np.ndarray, structures: Sequence[Structure], measures: dict,
                         model: str, title: str) -> np.ndarray:
    """The report image (RGB uint8): three slices with the overlay, each structure's volume, the model, a warning."""
    picks = report_slices(labels)
    scale = max(1, 240 // max(volume.voxels.shape[1:]))
    low, high = np.percentile(volume.voxels, [0.5, 99.5])
    colors = {s.label: s.color for s in structures}
    tiles = [Image.fromarray(overlay_labels(to_rgb(upscale(window_values(volume.voxels[k], (low + high) / 2,
                                                                        max(high - low, 1.0)), scale)),
                                            upscale(labels[k], scale), colors)) for k in picks]
    pad, header = 16, 78
    tile_w, tile_h = tiles[0].size
    width = max(3 * tile_w + 4 * pad, 720)
    height = header + tile_h + 40 + 24 * (len(structures) + 1) + 60
    image = Image.new("RGB", (width, height), (12, 12, 12))
    draw = ImageDraw.Draw(image)
    white, grey, small, value_font = (255, 255, 255), (200, 200, 200), font(13), font(15)
    draw.text((pad, 10), title, fill=white, font=font(18))
    draw.text((pad, 34), "Research use only. NOT FOR CLINICAL USE.", fill=(255, 180, 0), font=font(14))
    draw.text((pad, 54), f"Series: {volume.datasets[0].get('SeriesDescription', '')}  ({volume.voxels.shape[0]} "
                         f"slices, {volume.voxels.shape[1]}x{volume.voxels.shape[2]})", fill=grey, font=small)
    for i, (k, tile) in enumerate(zip(picks, tiles, strict=True)):
        x = pad + i * (tile_w + pad)
        image.paste(tile, (x, header))
        draw.text((x, header + tile_h + 4), f"slice {k + 1} of {labels.shape[0]}", fill=grey, font=small)
    y = header + tile_h + 32
    rows = [(s.name, measures[f"{structure_key(s.name)}_volume_mm3"], s.color) for s in structures]
    for name, value, color in [*rows, ("Total", measures["total_volume_mm3"], white)]:
        draw.rectangle((pad, y + 3, pad + 12, y + 15), fill=tuple(color))
        draw.text((pad + 20, y), name, fill=white, font=value_font)
        amount = f"{value:,.1f} mm3"
        draw.text((pad + 260 - draw.textlength(amount, font=value_font), y), amount, fill=white, font=value_font)
        y += 24
    spacing = " x ".join(f"{s:g}" for s in measures["spacing_mm"])
    draw.text((pad, y + 6), f"Voxel spacing (slice x row x column): {spacing} mm", fill=grey, font=small)
    draw.text((pad, y + 28), f"Model: {model}", fill=grey, font=small)
    return np.asarray(image)
