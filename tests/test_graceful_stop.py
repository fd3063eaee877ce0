"""SIGTERM to a real gunicorn: every request in flight gets its 200, during its upload and during the model's run,
with the default hippocampus version (an ensemble whose networks run on a thread pool of their own)."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from inference.protocol.client import build_multipart_request, related_content_type
from tests.conftest import RunningServer, write_study


def slow_post(port: int, body: bytes, content_type: str, rate: float, result: dict) -> None:
    """POST ``body`` at ``rate`` bytes/s (Content-Length announced); ``result`` gets ``sent`` and ``status``."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        connection.putrequest("POST", "/")
        connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        started, step = time.monotonic(), 64 * 1024
        for offset in range(0, len(body), step):
            connection.send(body[offset:offset + step])
            if (wait := (offset + step) / rate - (time.monotonic() - started)) > 0:
                time.sleep(wait)
        result["sent"] = time.monotonic()
        response = connection.getresponse()
        result["status"], result["body"] = response.status, response.read()
    except Exception as exc:  # the assertion shows it
        result["error"] = exc


@pytest.fixture(scope="module")
def study_body(tmp_path_factory) -> tuple[bytes, str]:
    """A crop series the default version finds (HippoCrop) and a larger series beside it: about 4 MB."""
    root, study_uid = tmp_path_factory.mktemp("graceful"), generate_uid()
    files = write_study(root / "crop", shape=(40, 56, 40), spacing=(1.0, 1.0, 1.0), description="HippoCrop", seed=4,
                        study_uid=study_uid)
    files += write_study(root / "t1", shape=(24, 256, 256), spacing=(1.0, 1.0, 1.0), description="T1", seed=5,
                         study_uid=study_uid)
    encoder = build_multipart_request({"inference_command": "get-hippocampus-volume"}, files)
    return encoder.to_string(), related_content_type(encoder)


@pytest.mark.parametrize("moment", ["upload", "processing"])
def test_a_request_in_flight_at_sigterm_gets_its_200(study_body, tmp_path: Path, moment: str) -> None:
    body, content_type = study_body
    server = RunningServer({"INFERENCE_OUTPUT_ROOT": str(tmp_path / "out"), "INFERENCE_GRACEFUL_TIMEOUT": "60"},
                           tmp_path)
    result: dict = {}
    rate = len(body) / 4.0 if moment == "upload" else 1e12  # the upload: 4 s; else as fast as it goes
    sender = threading.Thread(target=slow_post, args=(server.port, body, content_type, rate, result))
    try:
        for _ in range(3):  # probes on connections of their own, as an orchestrator's
            server.wait_ready(10)
        sender.start()
        if moment == "upload":
            time.sleep(1.0)
        else:  # the handler runs once the whole body arrived and was read
            deadline = time.monotonic() + 60
            while "received" not in server.log() and time.monotonic() < deadline:
                time.sleep(0.02)
        os.kill(server.process.pid, signal.SIGTERM)  # the gunicorn master, as docker stop does
        sender.join(90)
        assert "error" not in result, f"{result.get('error')}\n{server.log()}"
        assert result["status"] == 200, f"{result['body'][:300]!r}\n{server.log()}"
        assert server.process.wait(60) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
    finally:
        server.stop()
        sender.join(5)
