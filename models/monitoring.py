"""Drift of a model version's inputs and outputs: the watched quantities, their histogram buckets (shared by
``/metrics`` and the training split's reference), and the population stability index between the two.

``python -m models.calibrate`` writes a version's reference (``drift_reference`` in the manifest): the
training split's histograms of the input properties and structure volumes, and the validation split's
histogram of the uncertainty score (on the training split the model is over-confident).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .registry import ModelRegistry

#: Watched quantity of a model version's results -> upper bucket bounds (Prometheus ``le``; +Inf implied), one
#: histogram each on ``/metrics`` (``inference_model_<quantity>``, ``inference.metrics``); ``models.calibrate`` bins
#: the training split in the same buckets, and ``compare`` sets the two side by side. Chosen to spread the training
#: split (MSD Task04: intensity means 50-1,500 but a few far above, hippocampus volumes 2,400-4,400 mm3) over
#: several buckets each.
BUCKETS: dict[str, tuple[float, ...]] = {
    "intensity_mean": (25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1250, 1500, 2000, 5000),
    "intensity_cv": (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 1.0),
    "voxel_size_mm": (0.5, 0.8, 0.9, 0.95, 0.99, 1.01, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0),
    "matrix_voxels": (20000, 30000, 40000, 50000, 60000, 70000, 80000, 100000, 150000),
    "obliquity_deg": (0.5, 1, 2, 5, 10, 20, 45),
    "total_volume_mm3": (1500, 2000, 2500, 2750, 3000, 3250, 3500, 3750, 4000, 4500, 5000, 6000),
    "uncertainty": (0.05, 0.1, 0.125, 0.15, 0.175, 0.2, 0.225, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0),
}
#: What ``summary`` and ``DriftCollector`` read of the served results: (family, version) -> {quantity: per-bucket
#: counts, ``results``, ``flagged``} (``inference.metrics.watched_counts``, passed in: the models know no server).
ServedCounts = Mapping[tuple[str, str], Mapping[str, Any]]
#: PSI above this is a drift worth a look (the usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large).
PSI_ALERT = 0.25
#: Results a version must have served before its PSI is exported or called drifting: a handful of studies
#: always looks "shifted" against 165 training volumes (2 results gave PSI 3-11 here).
PSI_MIN_COUNT = 30
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
                     "drifting": index is not None and index > PSI_ALERT and sum(obs) >= PSI_MIN_COUNT}
    return out


def summary(registry: ModelRegistry, family: str, served: ServedCounts) -> dict:
    """``GET /models/<family>/monitoring``: per version, results and flags served, and each watched
    quantity's histogram against the training split's with its PSI."""
    versions = {}
    for name, version in registry.family(family).versions.items():
        observed = served.get((family, name), {})
        reference = load_reference(version.drift_reference)
        results, flagged = int(observed.get("results", 0)), int(observed.get("flagged", 0))
        quantities = compare(reference, observed)
        versions[name] = {
            "results": results, "flagged": flagged,
            "share_flagged": round(flagged / results, 4) if results else None,
            "expected_share_flagged": reference.get("expected_flagged_share") if reference else None,
            "reference": reference["sources"] if reference else None,
            "drifting": sorted(q for q, v in quantities.items() if v["drifting"]),
            "quantities": quantities,
        }
        if reference is None:
            versions[name]["note"] = (f"{family} {name} has no drift reference (drift_reference in the manifest); "
                                      f"make one with python -m models.calibrate --version {name} --write")
    return {"family": family, "psi_alert": PSI_ALERT, "psi_min_count": PSI_MIN_COUNT,
            "since": "the server's start (counts are per process group)",
            "versions": versions}


class DriftCollector(Collector):
    """On ``/metrics``: each version's PSI per watched quantity (once it served ``PSI_MIN_COUNT`` results) and its
    expected share of flagged results."""

    def __init__(self, registry: ModelRegistry, served: Callable[[], ServedCounts]) -> None:
        self._registry = registry
        self._served = served

    def collect(self):
        psi_family = GaugeMetricFamily("inference_model_drift_psi", "Population stability index of a watched quantity "
                                       "against the training split's", labels=["family", "version", "quantity"])
        expected = GaugeMetricFamily("inference_model_expected_flag_share", "Share of results the calibration "
                                     "flagged on the test split", labels=["family", "version"])
        served = self._served()
        for family in self._registry.families:
            for name, version in self._registry.family(family).versions.items():
                reference = load_reference(version.drift_reference)
                if reference is None:
                    continue
                expected.add_metric([family, name], float(reference.get("expected_flagged_share") or 0.0))
                for quantity, row in compare(reference, served.get((family, name), {})).items():
                    if row["psi"] is not None and row["observed_count"] >= PSI_MIN_COUNT:
                        psi_family.add_metric([family, name, quantity], row["psi"])
        yield psi_family
        yield expected
