"""The benchmark's building blocks (floor app, study cache, sampler, targets), fast and untimed."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time

import pydicom
import pytest
from werkzeug.test import Client

from bench import floor
from bench.run import PeakSampler, derived_figures, interleaved_rps, issue_table, requests_per_second, targets_met
from bench.study import SHAPES, cached_study, payload_bytes
from inference import protocol
from inference.protocol.multipart_response import decode_multipart_response


def test_floor_answers_the_requested_size_and_echoes_the_body_hash():
    body = bytes(range(256)) * 9000  # a bit over 2 MiB: several read chunks
    response = Client(floor.app).post("/", data=body, headers={floor.SIZE_HEADER: str(5_000_123)})
    assert response.status_code == 200
    assert len(response.data) == int(response.headers["Content-Length"]) == 5_000_123
    parts = decode_multipart_response(response.headers["Content-Type"], response.data)
    assert [ctype for ctype, _ in parts] == ["application/json", "application/octet-stream", "text/plain"]
    assert json.loads(parts[0][1])["floor"] is True
    assert protocol.is_hashes_part(*parts[-1])
    assert parts[-1][1].decode().split(":")[0] == hashlib.sha256(body).hexdigest()


def test_floor_streams_bytes_only_because_gunicorn_refuses_memoryviews():
    chunks = list(floor.canned_response(3 * floor.WRITE_CHUNK + 7, "0" * 64))
    assert all(type(chunk) is bytes for chunk in chunks)
    assert sum(map(len, chunks)) == 3 * floor.WRITE_CHUNK + 7


def test_floor_size_falls_back_to_the_environment_then_to_its_minimum(monkeypatch):
    monkeypatch.setenv(floor.SIZE_ENV, "4096")
    assert len(Client(floor.app).post("/", data=b"x").data) == 4096
    monkeypatch.delenv(floor.SIZE_ENV)
    assert len(Client(floor.app).post("/", data=b"x").data) == floor.MIN_RESPONSE_BYTES


def test_floor_healthcheck_is_ready():
    response = Client(floor.app).get("/healthcheck")
    assert (response.status_code, response.data) == (200, b"READY")


def test_read_and_hash_stops_at_content_length():
    digest, total = floor.read_and_hash(io.BytesIO(b"abcdef-trailing"), 6)
    assert (digest, total) == (hashlib.sha256(b"abcdef").hexdigest(), 6)


def test_study_generator_writes_the_shape_and_reuses_its_cache(tmp_path):
    files = cached_study("tiny", (3, 8, 10), cache_dir=tmp_path)
    assert len(files) == 3
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.pixel_array.shape for ds in datasets} == {(8, 10)}
    assert {str(ds.SeriesInstanceUID) for ds in datasets} == {str(datasets[0].SeriesInstanceUID)}
    assert payload_bytes(files) > 3 * 8 * 10 * 2

    first_uid = datasets[0].SOPInstanceUID
    again = cached_study("tiny", (3, 8, 10), cache_dir=tmp_path)
    assert again == files and pydicom.dcmread(again[0]).SOPInstanceUID == first_uid  # not regenerated

    regenerated = cached_study("tiny", (2, 8, 10), cache_dir=tmp_path)  # another shape: generated anew
    assert len(regenerated) == 2 and not files[2].exists()


def test_study_sizes_are_the_issues():
    assert SHAPES["large"] == (256, 512, 512) and SHAPES["small"] == (24, 256, 256)


def test_peak_sampler_keeps_each_servers_maximum():
    class FakeServer:
        name = "fake"

        def __init__(self):
            self.values = iter([10, 50, 20])

        def tree_rss(self):
            return next(self.values, 5)

    with PeakSampler([FakeServer()], interval=0.001) as sampler:
        time.sleep(0.05)
    assert sampler.peaks == {"fake": 50}


def test_interleaved_rates_alternate_the_calls_in_batches():
    order = []
    rates = interleaved_rps({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, total=6, clients=1,
                            rounds=3)
    assert order == ["a", "a", "b", "b"] * 3 and set(rates) == {"a", "b"} and min(rates.values()) > 0


def test_requests_per_second_counts_every_call():
    calls = []
    rate = requests_per_second(lambda: calls.append(1), total=12, clients=3)
    assert len(calls) == 12 and rate > 0


@pytest.mark.parametrize("results, expected", [
    ({"large_ratio": 1.1, "rss_to_payload": 1.6, "small_8_ratio": 0.91},
     {"large_ratio<=1.15": True, "rss_to_payload<=1.0": False, "small_8_ratio>=0.9": True}),
    ({"small_8_ratio": 0.5, "hippocampus_roundtrip_s": 0.6}, {"small_8_ratio>=0.9": False,
                                                             "hippocampus_roundtrip_s<=0.6": True}),
    ({}, {}),
])
def test_targets_met_judges_only_what_was_measured(results, expected):
    assert targets_met(results) == expected


def test_the_issue_table_judges_each_row_and_says_what_was_not_measured():
    results = {"hippocampus_model_s": 0.09, "hippocampus_fast_model_s": 0.06, "pacs_total_s": 10.5,
               "pacs_orthanc_stable_age_s": 3, "large_ratio": 1.2, "large_roundtrip_s": 1.8,
               "floor_large_roundtrip_s": 1.5, "small_skipped": "no floor"}
    results.update(derived_figures(results))
    assert results["hippocampus_model_ratio"] == 1.5 and results["pacs_over_stable_age_s"] == 7.5
    rows = issue_table(results).splitlines()[2:]
    assert len(rows) == 6
    assert rows[0].startswith("| Study1 round trip") and rows[0].endswith("| - |") and "not measured" in rows[0]
    assert "1.5 x" in rows[1] and rows[1].endswith("| met |")
    assert "10.5 s = StableAge 3 s + 7.5 s" in rows[2] and rows[2].endswith("| not met |")
    assert "not measured (no floor)" in rows[3]
    assert rows[5].endswith("| not met |") and "1.2 (1.8 s vs 1.5 s)" in rows[5]


def test_celery_jobs_summary_takes_its_times_from_the_job_records():
    from bench.job_backend import summary

    jobs = [{"submitted": 100.0, "started": 100.01, "finished": 102.0},
            {"submitted": 100.1, "started": 102.0, "finished": 104.0},
            {"submitted": 100.2, "started": 104.0, "finished": 106.0}]
    figures = summary(jobs)
    assert figures["wall_s"] == 6.0 and figures["jobs_per_s"] == 0.5
    assert figures["median_run_s"] == 2.0 and figures["run_s"] == [1.99, 2.0, 2.0]
    assert figures["median_submit_to_start_ms"] == 1900.0  # jobs queued behind others wait: not the dispatch latency


def test_only_takes_several_sections_and_names_unknown_ones():
    import argparse

    from bench.run import sections_list

    assert sections_list("large, small") == ["large", "small"]
    with pytest.raises(argparse.ArgumentTypeError, match="smal"):
        sections_list("large,smal")


def test_model_versions_counts_each_versions_flops_with_its_own_settings():
    """The ensemble with mirrored passes costs far more than one network on a tight canvas; no Study1: a skip note."""
    from bench import model_versions

    gflop = model_versions.version_gflop((35, 51, 32))  # Study1's crop as the model sees it
    assert {"1.0", "1.0-fast"} <= set(gflop)
    assert gflop["1.0"] == pytest.approx(126.8, abs=0.5) and gflop["1.0-fast"] == pytest.approx(4.5, abs=0.1)


def test_model_versions_skips_without_study1(monkeypatch, tmp_path):
    from bench import model_versions

    monkeypatch.setattr(model_versions, "STUDY1", tmp_path / "absent")
    assert "Study1" in model_versions.measure_versions(1)["hippocampus_versions_skipped"]


def test_capacity_model_queue_formulas():
    """bench.capacity's Erlang C against closed forms: M/M/1 waits with probability rho; M/M/2 at 1 Erlang, 1/3."""
    from bench.capacity import erlang_c, p95_wait, servers_needed

    assert erlang_c(1, 0.6) == pytest.approx(0.6)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    # M/M/1: P(wait > t) = rho * exp(-(mu - lambda) t); rho 0.5, mu 1: the 95th percentile is ln(10) / 0.5
    assert p95_wait(1, 0.5, 1.0) == pytest.approx(math.log(10) / 0.5)
    assert p95_wait(2, 2.0, 1.0) == math.inf  # 2 Erlangs on 2 servers: the queue grows without end
    assert p95_wait(4, 0.1, 1.0) == 0.0
    # 3,600 studies an hour of 5 s: 5 Erlangs; a p95 wait of a minute needs more than 5 workers, fewer than 10
    needed = servers_needed(3600, 5.0, 60)
    assert 5 < needed < 10 and p95_wait(needed, 1.0, 5.0) <= 60 < p95_wait(needed - 1, 1.0, 5.0)


def test_job_backend_client_serves_the_job_routes_and_returns_their_store(tmp_path):
    """bench.job_backend.job_client (bench.capacity uses it) gives the test client and the job store."""
    import dataclasses

    from bench.job_backend import job_client
    from inference.config import Settings

    client, store = job_client(dataclasses.replace(Settings(), output_root=tmp_path, data_root=tmp_path))
    assert client.get("/query/0123456789abcdef0123456789abcdef").status_code == 404
    assert store.get("0123456789abcdef0123456789abcdef") is None
