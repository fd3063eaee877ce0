"""What a person reads of an inference response: its result values as rows with units, and the model it names.

The test tool's result page and the gateway's review page (``inference.review.page``) both show these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: Key suffixes of result values and the unit they stand for (``anterior_volume_mm3`` is in mm³).
UNIT_SUFFIXES = (("_mm3", "mm³"), ("_mm2", "mm²"), ("_mm", "mm"), ("_ml", "mL"), ("_cm3", "cm³"),
                 ("_seconds", "s"), ("_ms", "ms"), ("_percent", "%"), ("_voxels", "voxels"))
#: Result keys that name the model's version.
VERSION_KEYS = ("model_version", "model", "version")


@dataclass
class ResultRow:
    name: str
    value: str
    unit: str = ""


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:,.6g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return " × ".join(_format_value(v) for v in value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):  # e.g. the axes of a list above
        return " × ".join(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def result_rows(values: Any) -> list[ResultRow]:
    """One row per entry of a result object, the unit read from the key's suffix (``_mm3`` -> mm³)."""
    if not isinstance(values, dict):
        return [ResultRow("value", _format_value(values))]
    rows = []
    for key, value in values.items():
        name, unit = str(key), ""
        for suffix, symbol in UNIT_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name, unit = name[: -len(suffix)], symbol
                break
        rows.append(ResultRow(name.replace("_", " "), _format_value(value), unit))
    return rows


def model_version(response_json: dict) -> str:
    """The model the response names: its provenance (``"model": {"family", "version", "weights_sha256"}``),
    else a ``model``/``model_version`` entry of its results, else ''."""
    provenance = response_json.get("model")
    if isinstance(provenance, dict) and provenance.get("version"):
        text = f"{provenance.get('family', '')} {provenance['version']}".strip()
        weights = f" (weights {str(provenance['weights_sha256'])[:12]})" if provenance.get("weights_sha256") else ""
        return text + weights
    objects = [response_json.get("study_ml_json"), *(response_json.get("series_ml_json") or {}).values()]
    for values in objects:
        if isinstance(values, dict):
            for key in VERSION_KEYS:
                if isinstance(values.get(key), (str, int, float)):
                    return str(values[key])
    return ""
