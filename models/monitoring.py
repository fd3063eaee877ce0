"""Drift of a model version's inputs and outputs: the watched quantities, their histogram buckets (shared by
``/metrics`` and the training split's reference), and the population stability index between the two.

``python -m models.calibrate`` writes a version's reference (``drift_reference`` in the manifest): the
training split's histograms of the input properties and structure volumes, and the validation split's
histogram of the uncertainty score (on the training split the model is over-confident).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from inference.metrics import WATCHED_BUCKETS

#: Watched quantity -> upper bucket bounds (Prometheus ``le``; +Inf implied): the same as ``/metrics`` serves.
BUCKETS = WATCHED_BUCKETS
#: PSI above this is a drift worth a look (the usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large).
PSI_ALERT = 0.25
#: Share added to every bucket's proportion before the logarithm, so an empty bucket gives a finite PSI.
PSI_EPSILON = 1e-4


def watched_values(properties: Mapping[str, Any], total_volume_mm3: float | None,
                   uncertainty: float | None) -> dict[str, float]:
    """One result's watched quantities, by ``BUCKETS`` name (None ones left out)."""
    values = {
        "intensity_mean": float(properties["intensity_mean"]),
        "intensity_cv": float(properties["intensity_cv"]),
        "voxel_size_mm": max(float(s) for s in properties["voxel_size_mm"]),
        "matrix_voxels": float(math.prod(properties["matrix"])),
        "obliquity_deg": float(properties["obliquity_deg"]),
    }
    if total_volume_mm3 is not None:
        values["total_volume_mm3"] = float(total_volume_mm3)
    if uncertainty is not None:
        values["uncertainty"] = float(uncertainty)
    return values


def bucket_counts(name: str, values: Sequence[float]) -> list[int]:
    """Counts per bucket of ``name`` (not cumulative; the last is above the highest bound)."""
    bounds = BUCKETS[name]
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[next((i for i, b in enumerate(bounds) if value <= b), len(bounds))] += 1
    return counts


def psi(reference: Sequence[float], observed: Sequence[float]) -> float | None:
    """Population stability index of ``observed`` bucket counts against ``reference`` ones; None if either is empty."""
    ref_total, obs_total = sum(reference), sum(observed)
    if not ref_total or not obs_total:
        return None
    total = 0.0
    for r, o in zip(reference, observed, strict=True):
        expected, actual = r / ref_total + PSI_EPSILON, o / obs_total + PSI_EPSILON
        total += (actual - expected) * math.log(actual / expected)
    return total


def load_reference(path: Path | None) -> dict | None:
    """A version's drift reference (``python -m models.calibrate``), or None when it has none."""
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def compare(reference: Mapping[str, Any] | None, observed: Mapping[str, Sequence[float]]) -> dict[str, dict]:
    """Per watched quantity: the reference's and the observed counts, and their PSI."""
    out = {}
    for name, bounds in BUCKETS.items():
        ref = list(reference["histograms"][name]) if reference and name in reference.get("histograms", {}) else None
        obs = list(observed.get(name, [0] * (len(bounds) + 1)))
        index = psi(ref, obs) if ref is not None else None
        out[name] = {"buckets_le": [*bounds, "+Inf"], "reference": ref, "observed": obs, "observed_count": sum(obs),
                     "psi": None if index is None else round(index, 4),
                     "drifting": index is not None and index > PSI_ALERT}
    return out
