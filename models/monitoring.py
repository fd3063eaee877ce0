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

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from inference import metrics
from inference.metrics import WATCHED_BUCKETS

from .registry import ModelRegistry

#: Watched quantity -> upper bucket bounds (Prometheus ``le``; +Inf implied): the same as ``/metrics`` serves.
BUCKETS = WATCHED_BUCKETS
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


def summary(registry: ModelRegistry, family: str, multiproc_dir: Path | None) -> dict:
    """``GET /models/<family>/monitoring``: per version, results and flags served, and each watched
    quantity's histogram against the training split's with its PSI."""
    served = metrics.watched_counts(multiproc_dir)
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

    def __init__(self, registry: ModelRegistry, multiproc_dir: Path | None) -> None:
        self._registry = registry
        self._dir = multiproc_dir

    def collect(self):
        psi_family = GaugeMetricFamily("inference_model_drift_psi", "Population stability index of a watched quantity "
                                       f"against the training split's (once a version served {PSI_MIN_COUNT} results)",
                                       labels=["family", "version", "quantity"])
        expected = GaugeMetricFamily("inference_model_expected_flag_share", "Share of results the calibration "
                                     "flagged on the test split", labels=["family", "version"])
        served = metrics.watched_counts(self._dir)
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
