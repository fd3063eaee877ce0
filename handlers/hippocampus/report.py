"""What the hippocampus handler says about a segmentation: the volumes, the report image, the SEG and SR."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.dicom.results import Algorithm, ExtraMeasurement, measurement_report, segmentation
from inference.dicom.series import Volume
from inference.errors import UnprocessableInput
from inference.imaging.render import font, overlay_labels, to_rgb, upscale, window_values
from models.quality import short_reason
from models.registry import Provenance, Structure

ANTERIOR, POSTERIOR = 1, 2  # label values, as in the training data and the manifest's structures
#: Codes of our own (a private coding scheme, as DICOM allows where no standard code fits) for the change
#: since the prior and the quality flag in the SR.
PRIVATE_SCHEME = "99HIPPOAI"
PRIOR_VOLUME = Code("PRIORVOL", PRIVATE_SCHEME, "Volume in the prior study")
VOLUME_CHANGE = Code("VOLCHANGE", PRIVATE_SCHEME, "Volume change since the prior study")
VOLUME_CHANGE_PERCENT = Code("VOLCHANGEPCT", PRIVATE_SCHEME, "Volume change since the prior study, percent")
ANNUAL_RATE = Code("VOLRATE", PRIVATE_SCHEME, "Annualised volume change rate")
RESULT_QUALITY = Code("RESULTQUALITY", PRIVATE_SCHEME, "Result quality")
WITHIN_VALIDATED = Code("QUALITYOK", PRIVATE_SCHEME, "Within validated input range and uncertainty threshold")
FLAG_REASON_PREFIX = "QUALITYFLAG"
PERCENT = Code("%", "UCUM", "percent")
PERCENT_PER_YEAR = Code("%/a", "UCUM", "percent per year")


def measure_volumes(labels: np.ndarray, volume: Volume) -> dict:
    """Voxel counts and volumes in mm3 (voxel count x slice spacing x pixel spacing)."""
    voxel_mm3 = volume.voxel_volume_mm3
    counts = np.bincount(labels.ravel(), minlength=3)
    anterior, posterior = int(counts[ANTERIOR]), int(counts[POSTERIOR])
    return {
        "anterior_volume_mm3": round(anterior * voxel_mm3, 1),
        "posterior_volume_mm3": round(posterior * voxel_mm3, 1),
        "total_volume_mm3": round((anterior + posterior) * voxel_mm3, 1),
        "anterior_voxels": anterior,
        "posterior_voxels": posterior,
        "voxel_volume_mm3": round(voxel_mm3, 4),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
    }


def structure_volumes(measures: dict, structures: Sequence[Structure]) -> dict[str, float]:
    """Volumes (mm3) by structure name as ``measure_volumes`` rounded them, plus ``Total``."""
    keyed = {ANTERIOR: measures["anterior_volume_mm3"], POSTERIOR: measures["posterior_volume_mm3"]}
    return {**{s.name: keyed[s.label] for s in structures}, "Total": measures["total_volume_mm3"]}


def _signed(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:+,.1f}{unit}"


def render_report(volume: Volume, labels: np.ndarray, measures: dict, model_version: str,
                  structures: Sequence[Structure], quality: dict | None = None,
                  change: dict | None = None) -> np.ndarray:
    """The report image (RGB uint8): three slices with the overlay, the volumes with their change since the
    prior, the quality flag with its reasons, the model, a warning."""
    counts = labels.reshape(labels.shape[0], -1).astype(bool).sum(axis=1)
    present = np.flatnonzero(counts)
    if present.size:
        picks = [int(present[int(round(q * (present.size - 1)))]) for q in (0.25, 0.5, 0.75)]
    else:
        picks = [labels.shape[0] // 4, labels.shape[0] // 2, 3 * labels.shape[0] // 4]
    scale = max(1, 300 // max(volume.voxels.shape[1:]))
    low, high = np.percentile(volume.voxels, [0.5, 99.5])  # one window for the whole crop
    colors = {s.label: s.color for s in structures}
    tiles = []
    for k in picks:
        gray = window_values(volume.voxels[k], (low + high) / 2, max(high - low, 1.0))
        rgb = overlay_labels(to_rgb(upscale(gray, scale)), upscale(labels[k], scale), colors)
        tiles.append((k, Image.fromarray(rgb)))
    reasons = list(quality["reasons"]) if quality else []
    prior = (change or {}).get("prior")
    others = (change or {}).get("not_comparable", [])
    pad, header = 16, 78
    tile_w, tile_h = tiles[0][1].size
    width = max(3 * tile_w + 4 * pad, 760)
    height = header + tile_h + 24 + 170 + 22 * (len(reasons) + 1) + (24 if prior else 0) + 18 * len(others[:3])
    image = Image.new("RGB", (width, height), (12, 12, 12))
    draw = ImageDraw.Draw(image)
    white, grey, small, value_font = (255, 255, 255), (200, 200, 200), font(13), font(15)
    draw.text((pad, 10), "Hippocampal volume report", fill=white, font=font(18))
    draw.text((pad, 34), "Research use only. NOT FOR CLINICAL USE.", fill=(255, 180, 0), font=font(14))
    draw.text((pad, 54), f"Series: {volume.datasets[0].get('SeriesDescription', '')}  "
                         f"({volume.voxels.shape[0]} slices, {volume.voxels.shape[1]}x{volume.voxels.shape[2]})",
              fill=grey, font=small)
    for i, (k, tile) in enumerate(tiles):
        x = pad + i * (tile_w + pad)
        image.paste(tile, (x, header))
        draw.text((x, header + tile_h + 4), f"slice {k + 1} of {labels.shape[0]}", fill=grey, font=small)
    y = header + tile_h + 32
    if prior:
        draw.text((pad + 220, y - 4), f"Prior {prior['study_date']}", fill=grey, font=small)
        draw.text((pad + 340, y - 4), "Change", fill=grey, font=small)
        draw.text((pad + 560, y - 4), "Rate", fill=grey, font=small)
        y += 20
    rows = [("Anterior", measures["anterior_volume_mm3"], colors[ANTERIOR]),
            ("Posterior", measures["posterior_volume_mm3"], colors[POSTERIOR]),
            ("Total", measures["total_volume_mm3"], white)]
    changes = (change or {}).get("structures", {})
    for name, value, color in rows:
        draw.rectangle((pad, y + 3, pad + 12, y + 15), fill=tuple(color))
        draw.text((pad + 20, y), name, fill=white, font=value_font)
        amount = f"{value:,.1f} mm3"  # right-aligned so the digits line up (the bundled font has no "³")
        draw.text((pad + 200 - draw.textlength(amount, font=value_font), y), amount, fill=white, font=value_font)
        if name in changes:
            c = changes[name]
            percent = "" if c["change_percent"] is None else f" ({c['change_percent']:+.1f}%)"
            draw.text((pad + 220, y), f"{c['prior_volume_mm3']:,.1f} mm3", fill=grey, font=value_font)
            draw.text((pad + 340, y), f"{_signed(c['change_mm3'], ' mm3')}{percent}", fill=white, font=value_font)
            draw.text((pad + 560, y), f"{_signed(c['annualised_percent_per_year'], ' %/year')}", fill=white,
                      font=value_font)
        y += 24
    if change is not None and not prior:
        draw.text((pad, y), "No earlier result of this patient by this model version to compare with.",
                  fill=grey, font=small)
        y += 18
    for other in others[:3]:
        draw.text((pad, y), f"Not comparable: {other['study_date']} by {other['model']} (another model version)",
                  fill=grey, font=small)
        y += 18
    spacing = " x ".join(f"{s:g}" for s in measures["spacing_mm"])
    draw.text((pad, y + 6), f"Voxel spacing (slice x row x column): {spacing} mm", fill=grey, font=small)
    draw.text((pad, y + 28), f"Model: {model_version}", fill=grey, font=small)
    if quality is not None:
        y += 52
        if reasons:
            draw.text((pad, y), "QUALITY FLAG: check this result before use", fill=(255, 120, 40), font=value_font)
            for reason in reasons:
                y += 22
                draw.text((pad + 12, y), f"- {reason}", fill=(255, 170, 90), font=small)
        else:
            draw.text((pad, y), "Quality: input within the validated range, model uncertainty below its threshold",
                      fill=(120, 220, 120), font=small)
    return np.asarray(image)


def dicom_results(volume: Volume, labels: np.ndarray, structures: Sequence[Structure], provenance: Provenance,
                  wanted: Sequence[str], quality: dict | None = None,
                  change: dict | None = None) -> list[tuple[dict, object]]:
    """The SEG and/or SR asked for, as (response part, dataset) pairs, in the study of ``volume``.

    Segments and measurements are the model version's structures (the manifest's codes and colours);
    the algorithm is identified by family, version and the weights' SHA-256. The SR also carries each
    structure's change since the prior and the quality flag as qualitative evaluations.
    """
    algorithm = Algorithm(provenance.family, f"{provenance.version} (weights sha256 {provenance.weights_sha256[:12]})")
    try:
        seg = segmentation(volume.datasets, labels, structures, algorithm, description="Hippocampus segmentation")
    except ValueError as exc:  # highdicom's checks of the source images (e.g. no FrameOfReferenceUID)
        raise UnprocessableInput(f"no DICOM Segmentation can be made on series {volume.series_uid}: {exc}; "
                                 f"request without dicom_outputs for the mask alone") from exc
    out = []
    if "seg" in wanted:
        out.append(({"label": "Hippocampus segmentation", "binary_type": "dicom"}, seg))
    if "sr" in wanted:
        # as measure_volumes rounds them, so the report says what series_ml_json says
        volumes = {s.name: round(int(np.count_nonzero(labels == s.label)) * volume.voxel_volume_mm3, 1)
                   for s in structures}
        report = measurement_report(volume.datasets, seg, volumes, structures, algorithm,
                                    description="Hippocampal volume measurements",
                                    extra_measurements=change_measurements(change, structures),
                                    evaluations=quality_evaluations(quality))
        out.append(({"label": "Hippocampal volume measurements", "binary_type": "dicom"}, report))
    return out


def change_measurements(change: dict | None, structures: Sequence[Structure]) -> dict[str, list[ExtraMeasurement]]:
    """Per structure, the change since the prior as SR measurements (prior volume, change, %, %/year)."""
    if not change or not change.get("prior"):
        return {}
    out = {}
    for s in structures:
        c = change["structures"].get(s.name)
        if c is None:
            continue
        items = [ExtraMeasurement(PRIOR_VOLUME, c["prior_volume_mm3"], codes.UCUM.CubicMillimeter),
                 ExtraMeasurement(VOLUME_CHANGE, c["change_mm3"], codes.UCUM.CubicMillimeter)]
        if c["change_percent"] is not None:
            items.append(ExtraMeasurement(VOLUME_CHANGE_PERCENT, c["change_percent"], PERCENT))
        if c["annualised_percent_per_year"] is not None:
            items.append(ExtraMeasurement(ANNUAL_RATE, c["annualised_percent_per_year"], PERCENT_PER_YEAR))
        out[s.name] = items
    return out


def quality_evaluations(quality: dict | None) -> list[tuple[Code, Code]]:
    """The quality flag as the report's qualitative evaluations: one per reason, or one saying it passed."""
    if quality is None:
        return []
    if not quality["flagged"]:
        return [(RESULT_QUALITY, WITHIN_VALIDATED)]
    return [(RESULT_QUALITY, Code(FLAG_REASON_PREFIX + str(i), PRIVATE_SCHEME, short_reason(reason)))
            for i, reason in enumerate(quality["reasons"], 1)]
