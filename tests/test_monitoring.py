"""models.monitoring: buckets, PSI, and the drift watch served by gunicorn (/models/<family>/monitoring, /metrics)."""

from __future__ import annotations

import math

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from inference.config import get_settings
from models.monitoring import BUCKETS, PSI_MIN_COUNT, bucket_counts, compare, psi, watched_values
from models.registry import registry_for
from tests.conftest import PROJECT_ROOT, shared_data


def test_bucket_counts_follow_prometheus_le():
    bounds = BUCKETS["obliquity_deg"]  # (0.5, 1, 2, 5, 10, 20, 45)
    assert bucket_counts("obliquity_deg", [0.0, 0.5, 0.6, 45, 90]) == [2, 1, 0, 0, 0, 0, 1, 1]
    assert len(bucket_counts("obliquity_deg", [])) == len(bounds) + 1


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    reference = [10, 20, 40, 20, 10, 0]
    assert psi(reference, [1, 2, 4, 2, 1, 0]) == pytest.approx(0.0, abs=1e-9)
    small, large = psi(reference, [12, 22, 38, 18, 10, 0]), psi(reference, [0, 0, 5, 20, 50, 25])
    assert 0 < small < 0.1 < 0.25 < large
    assert psi(reference, [0] * 6) is None and math.isfinite(large)


def test_few_results_are_never_called_drifting():
    reference = {"histograms": {"intensity_mean": bucket_counts("intensity_mean", [300] * 100)}}
    few = {"intensity_mean": bucket_counts("intensity_mean", [3000] * (PSI_MIN_COUNT - 1))}
    many = {"intensity_mean": bucket_counts("intensity_mean", [3000] * PSI_MIN_COUNT)}
    shifted = compare(reference, few)["intensity_mean"]
    assert shifted["psi"] > 1 and not shifted["drifting"]
    assert compare(reference, many)["intensity_mean"]["drifting"]
    assert compare(None, many)["intensity_mean"]["psi"] is None  # a version without a reference


def test_watched_values_of_a_result():
    values = watched_values({"intensity_mean": 58.6, "intensity_cv": 0.4, "voxel_size_mm": [1.0, 1.02, 1.0],
                             "matrix": [35, 51, 32], "obliquity_deg": 0.0}, 3576.0, 0.17)
    assert values == {"intensity_mean": 58.6, "intensity_cv": 0.4, "voxel_size_mm": 1.02, "matrix_voxels": 57120.0,
                      "obliquity_deg": 0.0, "total_volume_mm3": 3576.0, "uncertainty": 0.17}
    assert set(values) == set(BUCKETS)


def test_served_results_show_in_monitoring_and_metrics(server):
    if not (PROJECT_ROOT / "models" / "hippocampus_unet.pt").exists():
        pytest.skip("model weights are not in models/")
    from inference.protocol.client import send_inference_request

    files = sorted(next(shared_data("studies", "Study1").glob("*HCrop*")).iterdir())
    before = requests.get(f"{server.url}/models/hippocampus/monitoring", timeout=30).json()["versions"]["1.0-fast"]
    result = send_inference_request(server.url + "/hippocampus", {"model_version": "1.0-fast"}, files)
    assert result.response_json["quality"]["flagged"] is False
    summary = requests.get(f"{server.url}/models/hippocampus/monitoring", timeout=30).json()
    after = summary["versions"]["1.0-fast"]
    assert after["results"] == before["results"] + 1 and after["flagged"] == before["flagged"]
    expected = registry_for(get_settings().model_manifest).family("hippocampus").resolve("1.0-fast") \
        .uncertainty["test"]["share_flagged"]  # the calibrated share (0.4 before issue 37's recalibration)
    assert after["expected_share_flagged"] == pytest.approx(expected)
    mean = after["quantities"]["intensity_mean"]  # Study1's crop: mean 58.6, in the (50, 100] bucket
    index = mean["buckets_le"].index(100)
    assert mean["observed"][index] == before["quantities"]["intensity_mean"]["observed"][index] + 1
    assert sum(mean["reference"]) == 165  # the training split
    assert "uncertainty" in summary["versions"]["1.0"]["reference"]
    assert requests.get(f"{server.url}/models/nope/monitoring", timeout=30).status_code == 404

    text = requests.get(f"{server.url}/metrics", timeout=30).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    labels = (("family", "hippocampus"), ("flagged", "false"), ("version", "1.0-fast"))
    assert samples[("inference_model_results_total", labels)] >= 1
    assert samples[("inference_model_expected_flag_share", (("family", "hippocampus"), ("version", "1.0-fast")))] \
        == pytest.approx(expected)
