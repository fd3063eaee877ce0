"""GET /metrics against a live gunicorn with two workers: Prometheus text format, counts summed over
the workers, job gauges from the store, the token rule, and the hooks for the DICOM node."""

from __future__ import annotations

import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from inference import metrics
from tests.conftest import RunningServer, write_study

TOKEN = "metrics-test-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    write_study(root / "data" / "study", shape=(4, 16, 16))
    server = RunningServer({"INFERENCE_WORKERS": "2", "INFERENCE_THREADS": "2", "INFERENCE_API_TOKEN": TOKEN,
                            "INFERENCE_ENABLE_MOCKS": "1",
                            "INFERENCE_DATA_ROOT": str(root / "data"), "INFERENCE_OUTPUT_ROOT": str(root / "jobs"),
                            "PROMETHEUS_MULTIPROC_DIR": str(root / "prometheus")}, root)
    server.metrics_dir = root / "prometheus"
    yield server
    server.stop()


def scrape(server: RunningServer) -> dict[tuple[str, tuple], float]:
    response = requests.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}",
                                                              "Connection": "close"}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_counts_are_summed_over_the_workers(served):
    auth = {"Authorization": f"Bearer {TOKEN}", "Connection": "close"}  # a new connection: either worker
    for _ in range(12):
        assert requests.get(f"{served.url}/models", headers=auth, timeout=10).status_code == 200
    assert requests.get(f"{served.url}/query/nope", headers=auth, timeout=10).status_code == 404
    # both workers wrote samples (else this test could not tell a summed count from one worker's)
    deadline = time.monotonic() + 30
    while len({p.name.split("_")[-1] for p in served.metrics_dir.glob("counter_*.db")}) < 2:
        assert time.monotonic() < deadline, "only one worker ever answered"
        requests.get(f"{served.url}/models", headers=auth, timeout=10)
    for _ in range(4):  # whichever worker answers the scrape sees every worker's requests
        samples = scrape(served)
        models = samples[("inference_http_requests_total", (("command", "-"), ("route", "/models"),
                                                            ("status", "200")))]
        assert models >= 12
        assert samples[("inference_http_requests_total", (("command", "-"), ("route", "/query/<uid>"),
                                                          ("status", "404")))] == 1
        assert samples[("inference_http_request_seconds_count", (("route", "/models"),))] == models
        assert ("inference_http_response_bytes_bucket", (("le", "+Inf"), ("route", "/models"))) in samples


def test_requests_refused_by_gunicorns_parser_are_counted(served):
    import socket

    for _ in range(3):
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 501")
    samples = scrape(served)
    assert samples[("inference_http_requests_total", (("command", "-"), ("route", "unparsed"),
                                                      ("status", "501")))] == 3


def test_job_gauges_come_from_the_store(served):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = requests.post(f"{served.url}/job/", json={"job_name": "get-probability-mask", "in_dir": "study"},
                             headers=auth, timeout=10)
    assert response.status_code == 201, response.text
    deadline = time.monotonic() + 60
    while requests.get(f"{served.url}/query/{response.json()['uid']}", headers=auth, timeout=10).status_code == 202:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    samples = scrape(served)
    assert samples[("inference_jobs", (("state", "completed"),))] == 1
    assert samples[("inference_job_queue_depth", ())] == 0


def test_metrics_follow_the_token_rule(served):
    response = requests.get(f"{served.url}/metrics", timeout=10)
    assert response.status_code == 401 and "Bearer" in response.json()["error"]


def test_dicom_node_hooks_and_model_seconds_in_this_process():
    before = metrics.DICOM_RECEIVED._value.get()
    metrics.record_dicom_received(3)
    metrics.record_dicom_sent()
    metrics.set_dicom_outbox(7)
    metrics.observe_model("get-hippocampus-volume", "1.0", 0.25)
    text, content_type = metrics.render(None)
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert content_type.startswith("text/plain")
    assert [s.value for s in families["inference_dicom_node_received"].samples if s.name.endswith("_total")] \
        == [before + 3]
    assert families["inference_dicom_node_outbox"].samples[0].value == 7
    counts = [s for s in families["inference_model_seconds"].samples if s.name.endswith("_count")]
    assert any(s.labels == {"model": "get-hippocampus-volume", "version": "1.0"} and s.value >= 1 for s in counts)
