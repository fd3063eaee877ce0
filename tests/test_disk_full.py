"""A full filesystem under a store is a 507 naming the store, a job failed with that reason, a count in /metrics
and a degraded /healthcheck; tested on real small filesystems (tmpfs, mounted as root; skipped otherwise)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

import handlers.gaussian_blur  # registers gaussian-blur-3d, a handler writing DICOM outputs
import handlers.mock  # noqa: F401  (registers get-probability-mask)
from gateway import Gateway
from inference.config import Settings
from inference.jobs.api import add_job_routes
from inference.pipeline.pipeline import Pipeline
from inference.protocol.client import build_multipart_request, related_content_type
from tests.conftest import RunningServer, write_study
from tests.test_jobs import poll


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at ``tmp_path/small`` for the test."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def upload(files: list[Path], command: str = "get-probability-mask") -> tuple[bytes, dict[str, str]]:
    encoder = build_multipart_request({"inference_command": command}, files)
    return encoder.to_string(), {"Content-Type": related_content_type(encoder)}


def store_full_count(text: str, store: str) -> float:
    """``inference_store_full_total{store=...}`` in a /metrics text (0 when absent)."""
    prefix = f'inference_store_full_total{{store="{store}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def test_an_upload_filling_the_spool_is_a_507_naming_it_and_the_server_goes_on(small_filesystem, tmp_path):
    """The spool's filesystem fills mid-upload (ENOSPC, no floor set): 507 {"store": "spool"}, counted; the
    next request, which fits, is served."""
    big = write_study(tmp_path / "big", shape=(36, 128, 128))  # 1.2 MB of pixels, over the 1 MiB filesystem
    tiny = write_study(tmp_path / "tiny", shape=(2, 16, 16), seed=3)
    server = RunningServer({"INFERENCE_SPOOL_DIR": str(small_filesystem), "INFERENCE_SPOOL_MEMORY_BYTES": "65536",
                            "INFERENCE_MIN_FREE_SPACE_MB": "0", "INFERENCE_ENABLE_MOCKS": "1",
                            "INFERENCE_OUTPUT_ROOT": str(tmp_path / "out")}, tmp_path)
    try:
        body, headers = upload(big)
        assert len(body) > 1024 * 1024
        response = requests.post(server.url + "/", data=body, headers=headers, timeout=60)
        assert response.status_code == 507, response.text
        assert response.json()["store"] == "spool" and "INFERENCE_SPOOL_DIR" in response.json()["error"]
        assert store_full_count(requests.get(server.url + "/metrics", timeout=10).text, "spool") == 1
        body, headers = upload(tiny)
        assert requests.post(server.url + "/", data=body, headers=headers, timeout=60).status_code == 200
        assert list(small_filesystem.iterdir()) == [], "the refused upload's spool file is gone"
    finally:
        server.stop()


def gateway_with_jobs(settings: Settings) -> Gateway:
    pipeline = Pipeline(settings)
    app = Gateway(__name__, pipeline=pipeline)
    app.add_inference_route("/", "get-probability-mask")
    add_job_routes(app, pipeline)
    app.add_healthcheck_route(lambda: "READY")
    return app


def test_below_the_floor_the_healthcheck_is_degraded_and_writes_are_refused_before_they_start(small_filesystem,
                                                                                              tmp_path):
    data = tmp_path / "data"
    files = write_study(data / "s", shape=(8, 64, 64))
    settings = dataclasses.replace(Settings(), data_root=data, output_root=tmp_path / "out",
                                   spool_dir=small_filesystem, spool_memory_bytes=4096, min_free_space_mb=2)
    client = gateway_with_jobs(settings).test_client()
    health = client.get("/healthcheck").get_data(as_text=True)
    assert health.startswith("DEGRADED: ") and "spool store (INFERENCE_SPOOL_DIR)" in health, health
    body, headers = upload(files)
    response = client.post("/", data=body, headers=headers)
    assert response.status_code == 507 and response.get_json()["store"] == "spool", response.get_json()
    assert "below the 2 MiB kept free" in response.get_json()["error"]

    output_full = dataclasses.replace(settings, spool_dir=tmp_path, output_root=small_filesystem / "jobs")
    client = gateway_with_jobs(output_full).test_client()
    assert "output store (INFERENCE_OUTPUT_ROOT)" in client.get("/healthcheck").get_data(as_text=True)
    response = client.post("/job/", json={"job_name": "3dblur", "in_dir": "s"})
    assert response.status_code == 507 and response.get_json()["store"] == "output", response.get_json()
    assert store_full_count(client.get("/metrics").get_data(as_text=True), "output") >= 1

    roomy = dataclasses.replace(settings, spool_dir=tmp_path, min_free_space_mb=0)
    assert gateway_with_jobs(roomy).test_client().get("/healthcheck").get_data(as_text=True) == "READY"


def test_a_job_whose_outputs_fill_the_output_store_fails_with_507_naming_it(small_filesystem, tmp_path):
    data = tmp_path / "data"
    write_study(data / "s", shape=(24, 160, 160))  # its blurred copy (1.2 MB) does not fit in 1 MiB
    settings = dataclasses.replace(Settings(), data_root=data, output_root=small_filesystem / "jobs",
                                   min_free_space_mb=0)
    client = gateway_with_jobs(settings).test_client()
    response = client.post("/job/", json={"job_name": "3dblur", "in_dir": "s"})
    assert response.status_code == 201, response.get_json()
    done = poll(client.get, response.get_json()["uid"])
    assert done.status_code == 507, done.get_json()
    assert "the output store (INFERENCE_OUTPUT_ROOT) is full" in done.get_json()["msg"] + json.dumps(done.get_json())
    assert not list((small_filesystem / "jobs").glob("*.partial*")), "the partial outputs are removed"
