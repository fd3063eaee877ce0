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
from inference.imaging.render import font, overlay_labels, report_slices, to_rgb, upscale, window_values
from inference.pacs import priors
from models.quality import SERIES_AXES, short_reason
from models.registry import Provenance, Structure

ANTERIOR, POSTERIOR = 1, 2  # label values, as in the training data and the manifest's structures
#: Codes of our own (a private coding scheme, as DICOM allows where no standard code fits) for the change
#: since the prior and the quality flag in the SR.
PRIVATE_SCHEME = "99HIPPOAI"
PRIOR_VOLUME = Code("PRIORVOL", PRIVATE_SCHEME, "Volume in the prior study")
VOLUME_CHANGE = Code("VOLCHANGE", PRIVATE_SCHEME, "Volume change since the prior study")
VOLUME_CHANGE_PERCENT = Code("VOLCHANGEPCT", PRIVATE_SCHEME, "Volume change since the prior study, percent")
ANNUAL_RATE = Code("VOLRATE", PRIVATE_SCHEME, "Annualised volume change rate")
RESULT_QUALITY = Code(priors.RESULT_QUALITY[0], priors.RESULT_QUALITY[1], "Result quality")
WITHIN_VALIDATED = Code(priors.QUALITY_PASSED, PRIVATE_SCHEME, "Within validated input range and uncertainty threshold")
FLAG_REASON_PREFIX = priors.QUALITY_FLAG_PREFIX
#: What the SR says of its prior when that is not a plain, trusted earlier result (``prior_evaluations``).
PRIOR_COMPARISON = Code("PRIORCMP", PRIVATE_SCHEME, "Comparison with the prior study")
PRIOR_UNTRUSTED = Code("PRIORUNTRUSTED", PRIVATE_SCHEME, "No change given: the earlier results cannot be trusted")
PRIOR_SKIPPED = Code("PRIORSKIPPED", PRIVATE_SCHEME, "A more recent earlier result was not trusted, not used")
PRIOR_CORRECTED = Code("PRIORCORRECTED", PRIVATE_SCHEME, "Prior volumes as corrected by a reviewer")
PRIOR_FLAG_ACCEPTED = Code("PRIORFLAGACCEPTED", PRIVATE_SCHEME, "Prior was flagged, then accepted on review")
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
        "spacing_axes": list(SERIES_AXES),  # the order of spacing_mm, of the mask and of the quality reasons
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
    picks = report_slices(labels)
    scale = max(1, 300 // max(volume.voxels.shape[1:]))
    low, high = np.percentile(volume.voxels, [0.5, 99.5])  # one window for the whole crop
    colors = {s.label: s.color for s in structures}
    tiles = []
    for k in picks:
        gray = window_values(volume.voxels[k], (low + high) / 2, max(high - low, 1.0))
        rgb = overlay_labels(to_rgb(upscale(gray, scale)), upscale(labels[k], scale), colors)
        tiles.append((k, Image.fromarray(rgb)))
    prior = (change or {}).get("prior")
    pad, header = 16, 78
    tile_w, tile_h = tiles[0][1].size
    width = max(3 * tile_w + 4 * pad, 760)
    white, grey, small, value_font = (255, 255, 255), (200, 200, 200), font(13), font(15)
    notes = _wrapped(change_lines(change) + quality_lines(quality, measures, model_version), width - 2 * pad)
    height = header + tile_h + 32 + (20 if prior else 0) + 3 * 24 + sum(step for *_, step in notes) + 12
    image = Image.new("RGB", (width, height), (12, 12, 12))
    draw = ImageDraw.Draw(image)
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
    changes = (change or {}).get("structures", {}) if prior else {}
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
    y += 4
    for text, color, size, indent, step in notes:
        draw.text((pad + indent, y), text, fill=color, font=font(size))
        y += step
    return np.asarray(image)


#: Colours of the report's notes: plain, a warning (an untrusted prior, a flag's reasons), the flag's headline, passed.
_GREY, _AMBER, _ORANGE, _GREEN = (200, 200, 200), (255, 170, 90), (255, 120, 40), (120, 220, 120)


def change_lines(change: dict | None) -> list[tuple[str, tuple, int, int]]:
    """The report's lines on the change since the prior: what the prior was, why there is none, what was not used."""
    if change is None:
        return []
    lines: list[tuple[str, tuple, int, int]] = []
    prior, untrusted = change.get("prior"), change.get("untrusted", [])
    if prior:
        if prior.get("review") == "corrected":
            lines.append((f"Prior {prior['study_date']}: volumes as corrected by a reviewer.", _GREY, 13, 0))
        elif prior.get("flagged"):
            lines.append((f"Prior {prior['study_date']} was flagged by its quality check and then accepted on review.",
                          _AMBER, 13, 0))
    newer = [u for u in untrusted if prior and u["study_date"] > prior["study_date"]]
    if not prior and untrusted:
        lines.append((("No change since the prior is given: the earlier results of this patient by this model "
                       "version cannot be trusted."), _AMBER, 13, 0))
    elif newer:
        lines.append(("A more recent earlier result was not used as the prior: it cannot be trusted.", _AMBER, 13, 0))
    elif change.get("note"):
        lines.append((_sentence(change["note"]), _GREY, 13, 0))
    elif not prior:
        lines.append(("No earlier result of this patient by this model version to compare with.", _GREY, 13, 0))
    for item in (untrusted if not prior else newer)[:3]:
        lines.append((f"- {item['study_date']} ({item['source']}): {item['reason']}", _AMBER, 13, 12))
    for other in change.get("not_comparable", [])[:3]:
        lines.append((f"Not comparable: {other['study_date']} by {other['model']} (another model version)",
                      _GREY, 13, 0))
    return lines


def quality_lines(quality: dict | None, measures: dict, model_version: str) -> list[tuple[str, tuple, int, int]]:
    """The report's lines on the geometry, the model and the quality flag with its reasons."""
    spacing = " x ".join(f"{s:g}" for s in measures["spacing_mm"])
    lines = [(f"Voxel spacing (slice x row x column): {spacing} mm", _GREY, 13, 0),
             (f"Model: {model_version}", _GREY, 13, 0)]
    if quality is None:
        return lines
    if quality["reasons"]:
        lines.append(("QUALITY FLAG: check this result before use", _ORANGE, 15, 0))
        lines += [(f"- {reason}", _AMBER, 13, 12) for reason in quality["reasons"]]
    else:
        lines.append(("Quality: input within the validated range, model uncertainty below its threshold", _GREEN,
                      13, 0))
    return lines


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _wrapped(lines: Sequence[tuple[str, tuple, int, int]], width: int) -> list[tuple[str, tuple, int, int, int]]:
    """Each line broken at spaces to fit ``width`` pixels (continuations indented): (text, colour, size, indent,
    height it takes)."""
    out = []
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for text, color, size, indent in lines:
        current, offset = "", indent
        for word in text.split(" "):
            candidate = f"{current} {word}".strip()
            if current and measure.textlength(candidate, font=font(size)) > width - offset:
                out.append((current, color, size, offset, size + 7))
                current, offset = word, indent + 12
            else:
                current = candidate
        out.append((current, color, size, offset, size + 7))
    return out


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
                                    evaluations=quality_evaluations(quality) + prior_evaluations(change))
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


def prior_evaluations(change: dict | None) -> list[tuple[Code, Code]]:
    """What the SR says of the comparison when the prior is not a plain trusted result: no change given because
    only untrusted earlier results exist, a newer untrusted one passed over, a corrected or flagged-accepted prior."""
    if not change:
        return []
    prior, untrusted = change.get("prior"), change.get("untrusted", [])
    if prior is None:
        return [(PRIOR_COMPARISON, PRIOR_UNTRUSTED)] if untrusted else []
    out = []
    if any(u["study_date"] > prior["study_date"] for u in untrusted):
        out.append((PRIOR_COMPARISON, PRIOR_SKIPPED))
    if prior.get("review") == "corrected":
        out.append((PRIOR_COMPARISON, PRIOR_CORRECTED))
    elif prior.get("flagged"):
        out.append((PRIOR_COMPARISON, PRIOR_FLAG_ACCEPTED))
    return out
