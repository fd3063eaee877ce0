"""Whether a result can be trusted: the input checked against what its model version was validated on, and
the model's own uncertainty against a threshold calibrated on the validation split (``models.calibrate``).

Both come from the version's manifest blocks ``validated_input`` and ``uncertainty``; a version without
them gets a flagged result whose reason says so. Everything here works in the model's orientation (RAS,
as nibabel loads the training NIfTI files), so the training data and a DICOM study are measured alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The input properties checked and watched for drift, with their units (the manifest's keys).
PROPERTIES = {"voxel_size_mm": "mm", "matrix": "voxels", "intensity_mean": "", "intensity_cv": "",
              "obliquity_deg": "degrees"}
#: Probability band of a voxel that a single network is unsure of (the one-pass proxy, below).
UNSURE_BAND = (0.1, 0.9)
#: How the uncertainty is measured: several members' labels, or one network's unsure voxels.
DISAGREEMENT, SOFT_BOUNDARY = "member disagreement", "unsure voxels (one network)"
#: Names of the per-axis values' axes: the model's (RAS, as nibabel loads the training NIfTI files) and a DICOM
#: series' own (the order of the label mask and of ``spacing_mm``), which a study's result is reported in.
RAS_AXES = ("left-right", "posterior-anterior", "inferior-superior")
SERIES_AXES = ("slice", "row", "column")
#: A range's ends are compared with this relative slack, so a value printed in the manifest with 4
#: significant digits still matches the training case it came from.
SLACK = 1e-3


def input_properties(voxels: np.ndarray, spacing: Sequence[float], affine: np.ndarray | None = None,
                     modality: str | None = None) -> dict[str, Any]:
    """The checked properties of a crop in the model's orientation: ``voxels`` (RAS axes), ``spacing``
    in the same order, ``affine`` (voxel indices to RAS mm; None: not oblique) and the modality."""
    values = np.asarray(voxels, np.float64)
    mean = float(values.mean())
    return {
        "modality": modality,
        "axes": list(RAS_AXES),
        "voxel_size_mm": [round(float(s), 4) for s in spacing],
        "matrix": [int(n) for n in values.shape],
        "intensity_mean": round(mean, 3),
        "intensity_cv": round(float(values.std() / mean), 4) if mean > 0 else 0.0,
        "obliquity_deg": round(obliquity_degrees(affine), 3) if affine is not None else 0.0,
    }


def in_series_order(properties: Mapping[str, Any], validated: Mapping[str, Any] | None,
                    ras_axis: Sequence[int]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Properties measured in RAS, and the validated ranges (RAS), with their per-axis values in the series' own
    axis order (slice, row, column), which the rest of the result uses; ``ras_axis[i]`` is the RAS axis of
    the series' axis i. The checks are the same; only the order they are told in changes."""
    def reorder(value: Any) -> Any:
        return [value[int(a)] for a in ras_axis] if isinstance(value, list) and len(value) == 3 else value

    props = dict(properties)
    for name in ("voxel_size_mm", "matrix"):
        props[name] = reorder(props[name])
    props["axes"] = list(SERIES_AXES)
    if not validated:
        return props, validated
    rules = dict(validated)
    for name in ("voxel_size_mm", "matrix"):
        if isinstance(rules.get(name), Mapping):
            rules[name] = {k: reorder(v) for k, v in rules[name].items()}
    return props, rules


def obliquity_degrees(affine: np.ndarray) -> float:
    """The largest angle between a voxel axis and its nearest patient axis (0 for an axis-aligned volume)."""
    directions = np.asarray(affine, float)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0)
    cosines = np.clip(np.abs(directions).max(axis=0), 0.0, 1.0)
    return float(np.degrees(np.arccos(cosines)).max())


def _outside(value: float, low: float | None, high: float | None) -> bool:
    below = low is not None and value < low - SLACK * abs(low)
    return below or (high is not None and value > high + SLACK * abs(high))


def check_input(properties: Mapping[str, Any], validated: Mapping[str, Any] | None) -> list[dict]:
    """One entry per declared check: its name, the value, the validated range and whether it passed (per-axis
    values also name their ``axes``, in the order of the properties)."""
    if not validated:
        return []
    checks = []
    if "modality" in validated:
        allowed = list(validated["modality"])
        value = properties.get("modality")
        checks.append({"check": "modality", "value": value, "validated": allowed,
                       "passed": value is None or value in allowed})
    for name in PROPERTIES:
        if name not in validated:
            continue
        rule, value = validated[name], properties[name]
        low, high = rule.get("min"), rule.get("max")
        if "bands" in rule:  # one of several ranges (the training data's intensity scales)
            bands = [{"min": b.get("min"), "max": b.get("max")} for b in rule["bands"]]
            passed = any(not _outside(value, b["min"], b["max"]) for b in bands)
            checks.append({"check": name, "value": value, "validated": {"bands": bands}, "passed": passed})
            continue
        if isinstance(value, list):  # per axis: a list of bounds, or one bound for every axis
            lows = low if isinstance(low, list) else [low] * len(value)
            highs = high if isinstance(high, list) else [high] * len(value)
            passed = not any(_outside(v, lo, hi) for v, lo, hi in zip(value, lows, highs, strict=True))
        else:
            passed = not _outside(value, low, high)
        check = {"check": name, "value": value, "validated": {"min": low, "max": high}, "passed": passed}
        if isinstance(value, list) and properties.get("axes"):
            check["axes"] = list(properties["axes"])
        checks.append(check)
    return checks


def _told(value: Any) -> str:
    if isinstance(value, list):
        return " x ".join(_told(v) for v in value)
    return f"{value:g}" if isinstance(value, float | int) else f"{value}"


def describe_check(check: Mapping[str, Any]) -> str:
    """A failed check as a reason a reader understands: which property, its value, the validated range."""
    name, value, rule = check["check"], check["value"], check["validated"]
    if name == "modality":
        return f"input: modality {value} is not one the model was validated on ({', '.join(rule)})"
    unit = PROPERTIES.get(name, "")
    if "bands" in rule:
        spans = ", ".join(f"{b['min']:,g} to {b['max']:,g}" for b in rule["bands"])
        return f"input: {name} {value:,g} {unit} outside the validated ranges ({spans})".replace("  ", " ")
    low, high = rule.get("min"), rule.get("max")
    if low is None:
        span = f"at most {_told(high)}"
    elif high is None:
        span = f"at least {_told(low)}"
    else:
        span = f"{_told(low)} to {_told(high)}"
    axes = f" ({' x '.join(check['axes'])})" if check.get("axes") else ""
    text = f"input: {name}{axes} {_told(value)} {unit} outside the validated range {span} {unit}"
    return text.replace("  ", " ").rstrip()


def structure_uncertainty(members: Sequence[np.ndarray], structures: Mapping[str, int],
                          voxel_mm3: float) -> tuple[str, dict[str, dict]]:
    """Per structure: the share (0 to 1) of the voxels that may be the structure on which the model is unsure,
    and the spread of its volume (mm3).

    Several members (an ensemble): the voxels some members label the structure and others do not, over the
    voxels any member or their mean labels it (the union); the volume spread is the members' range. One
    network: the voxels whose probability of the structure lies in ``UNSURE_BAND``, over the voxels it labels
    the structure or gives it a probability above the band's low end (a proxy with no extra pass; volume
    spread: the soft volume, sum of probabilities, minus the hard one). Each unsure voxel is in its denominator,
    so the share never exceeds 1; a structure no voxel may be has 0.
    """
    mean = sum(members[1:], members[0].copy()) / len(members)
    labels = np.argmax(mean, axis=0)
    each = [np.argmax(p, axis=0) for p in members] if len(members) > 1 else []
    out = {}
    for name, label in structures.items():
        labelled = labels == label
        if each:
            votes = sum((member == label).astype(np.int16) for member in each)
            unsure = int(np.count_nonzero((votes > 0) & (votes < len(members))))
            possible = int(np.count_nonzero(labelled | (votes > 0)))
            volumes = [float(np.count_nonzero(member == label)) * voxel_mm3 for member in each]
            spread = max(volumes) - min(volumes)
        else:
            p = members[0][label]
            unsure = int(np.count_nonzero((p > UNSURE_BAND[0]) & (p < UNSURE_BAND[1])))
            possible = int(np.count_nonzero(labelled | (p > UNSURE_BAND[0])))
            spread = abs(float(p.sum()) - float(np.count_nonzero(labelled))) * voxel_mm3
        out[name] = {"unsure_fraction": round(unsure / possible, 4) if possible else 0.0,
                     "volume_spread_mm3": round(spread, 1)}
    return (DISAGREEMENT if len(members) > 1 else SOFT_BOUNDARY), out


def uncertainty_score(per_structure: Mapping[str, Mapping[str, float]]) -> float:
    """The one number the threshold applies to: the largest unsure fraction over the structures."""
    return max((float(v["unsure_fraction"]) for v in per_structure.values()), default=0.0)


def assess(properties: Mapping[str, Any], method: str, per_structure: Mapping[str, Mapping[str, float]],
           validated: Mapping[str, Any] | None, calibration: Mapping[str, Any] | None,
           version_name: str) -> dict[str, Any]:
    """The ``quality`` block of a result: ``flagged``, the ``reasons`` and what they rest on."""
    reasons = []
    checks = check_input(properties, validated)
    if not validated:
        reasons.append(f"{version_name} has no declared validated input range (validated_input in the manifest); "
                       "its input cannot be checked")
    reasons += [describe_check(c) for c in checks if not c["passed"]]
    score = uncertainty_score(per_structure)
    threshold = None if not calibration else float(calibration["threshold"])
    if threshold is None:
        reasons.append(f"{version_name} has no uncertainty calibration (uncertainty in the manifest; "
                       f"python -m models.calibrate --version ...)")
    elif score > threshold:
        worst = max(per_structure, key=lambda n: per_structure[n]["unsure_fraction"])
        reasons.append(f"uncertainty: unsure on {score:.1%} of the voxels that may be {worst}, above the "
                       f"calibrated {threshold:.1%}; method: {method}")
    figures = {k: calibration[k] for k in ("validation", "test") if calibration and k in calibration}
    return {
        "flagged": bool(reasons),
        "reasons": reasons,
        "input": {"properties": dict(properties), "checks": checks},
        "uncertainty": {"method": method, "score": round(score, 4), "threshold": threshold,
                        "structures": {k: dict(v) for k, v in per_structure.items()}},
        "calibration": figures,
    }


def short_reason(reason: str) -> str:
    """A reason cut to what a 64-character code meaning or a report line holds."""
    return reason if len(reason) <= 64 else reason[:61] + "..."
