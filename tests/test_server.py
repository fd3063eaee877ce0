"""End to end: the real server (gunicorn, shipped config) over HTTP, every mock mode, bad clients."""

from __future__ import annotations

import dataclasses
import io
import runpy
import socket
import sys
import threading
import time

import numpy as np
import pydicom
import pytest
import requests

import server
from handlers import REGISTRY, load_handlers
from inference import protocol
from inference.config import Settings
from inference.dicom.series import sort_by_position
from inference.protocol.client import (
    InferenceRequestError,
    build_multipart_request,
    related_content_type,
    send_inference_request,
)
from tests.conftest import PROJECT_ROOT, RunningServer

MOCK_COMMANDS = ["get-probability-mask", "get-boolean-mask", "get-heatmap", "get-label-mask",
                 "get-probability-mask-2d", "get-bounding-box-2d", "get-linear-measurements",
                 "get-classification", "get-secondary-capture", "get-structured-report"]


def series_info(files):
    datasets = sort_by_position([pydicom.dcmread(f, stop_before_pixels=True) for f in files])
    first = datasets[0]
    return {str(first.SeriesInstanceUID): protocol.SeriesInfo(int(first.Rows), int(first.Columns),
                                                              [str(d.SOPInstanceUID) for d in datasets])}


@pytest.mark.parametrize("command", MOCK_COMMANDS)
def test_every_mock_command_answers_a_valid_response(server, study, command):
    result = send_inference_request(server.url + "/", {"studyUID": "1", "inference_command": command}, study)
    protocol.validate_response(result.response_json, result.buffers)
    protocol.check_against_study(result.response_json, series_info(study))
    assert result.hashes is not None and len(result.hashes) == 129
    kinds = [p["binary_type"] for p in result.response_json["parts"]]
    if command == "get-probability-mask-2d":
        assert kinds == ["probability_mask"] * len(study)
    elif command in ("get-bounding-box-2d", "get-linear-measurements"):
        key = "bounding_boxes_2d" if "box" in command else "linear_measurements_2d"
        assert len(result.response_json[key]) == len(study)
    elif command == "get-classification":
        assert result.response_json["study_ml_json"]["label"]
    elif command == "get-secondary-capture":
        assert kinds == ["dicom_secondary_capture"]
    elif command == "get-structured-report":
        report = pydicom.dcmread(io.BytesIO(result.buffers[0]))
        assert kinds == ["dicom_structured_report"] and report.Modality == "SR"
        assert "no finding" in report.ContentSequence[0].TextValue
    else:
        assert len(kinds) == 1


def test_3d_mask_grows_from_the_centre(server, make_study):
    files = make_study("blob", shape=(9, 20, 30))
    result = send_inference_request(server.url + "/", {"inference_command": "get-probability-mask"}, files)
    mask = np.frombuffer(result.buffers[0], np.uint8).reshape(9, 20, 30)
    assert mask[4, 10, 15] > 200 and mask[0].max() < mask[4].max() and mask[4, 0, 0] == 0


def test_default_command_without_inference_command(server, study):
    result = send_inference_request(server.url + "/", {"studyUID": "1"}, study)
    assert result.response_json["parts"][0]["binary_type"] == "probability_mask"


def test_models_lists_every_command(server):
    listed = {m["inference_command"] for m in requests.get(server.url + "/models", timeout=10).json()["models"]}
    assert set(MOCK_COMMANDS) <= listed


def test_unknown_command_is_400_listing_known(server, study):
    with pytest.raises(InferenceRequestError) as error:
        send_inference_request(server.url + "/", {"inference_command": "get-nothing"}, study)
    assert error.value.status == 400 and "get-probability-mask" in error.value.message


def raw_request(url: str, head: bytes, body: bytes, read: bool = True) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while read and (chunk := sock.recv(65536)):
            chunks.append(chunk)
    return b"".join(chunks)


def test_truncated_upload_is_400_and_server_keeps_serving(server, study):
    encoder = build_multipart_request({}, study)
    body = encoder.to_string()
    head = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {related_content_type(encoder)}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    answer = raw_request(server.url, head, body[: len(body) // 2])
    assert answer.startswith(b"HTTP/1.1 400") and b"truncated" in answer
    result = send_inference_request(server.url + "/", {}, study)
    assert result.response_json["parts"]


def test_chunked_upload_over_the_limit_is_413(tmp_path, study):
    limited = RunningServer({"INFERENCE_MAX_REQUEST_BYTES": "5000"}, tmp_path)
    try:
        encoder = build_multipart_request({}, study)
        body = encoder.to_string()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096])
                           for i in range(0, len(body), 4096)) + b"0\r\n\r\n"
        head = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {related_content_type(encoder)}\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
        answer = raw_request(limited.url, head, chunked)
        assert answer.startswith(b"HTTP/1.1 413") and b"limit of 5000 bytes" in answer
        with pytest.raises(InferenceRequestError) as error:
            send_inference_request(limited.url + "/", {}, study)
        assert error.value.status == 413
        assert requests.get(limited.url + "/ping", timeout=10).status_code == 200
    finally:
        limited.stop()


def test_mock_server_script_flags(tmp_path, study):
    """``python mock_server.py -b`` serves bounding boxes on / whatever the command says."""
    port_server = RunningServer({}, tmp_path, args=[sys.executable, "mock_server.py", "-b", "--host", "127.0.0.1",
                                                     "--port", "{port}"])
    try:
        result = send_inference_request(port_server.url + "/", {"inference_command": "get-classification"}, study)
        assert len(result.response_json["bounding_boxes_2d"]) == len(study)
    finally:
        port_server.stop()


# -- warm-up and the healthcheck ----------------------------------------------------------------
@pytest.fixture
def gated_warm_up(monkeypatch, tmp_path):
    """The 3D mock's spec with a warm-up that blocks until the returned event is set."""
    gate = threading.Event()
    load_handlers()
    spec = REGISTRY.get("get-probability-mask")
    monkeypatch.setitem(REGISTRY._specs, spec.command, dataclasses.replace(
        spec, warm_up=lambda settings: None if gate.wait(30) else "gate never opened"))
    settings = dataclasses.replace(Settings(), output_root=tmp_path / "jobs")
    return gate, lambda **options: server.create_app("get-probability-mask", settings, **options)


def test_background_warm_up_answers_loading_until_it_is_done(gated_warm_up):
    gate, create_app = gated_warm_up
    client = create_app().test_client()
    assert client.get("/healthcheck").text == "LOADING"
    gate.set()
    deadline = time.monotonic() + 10
    while client.get("/healthcheck").text != "READY" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.get("/healthcheck").text == "READY"


def test_warm_up_first_returns_a_ready_app(gated_warm_up):
    """What gunicorn's workers use: no worker answers (healthcheck or request) while it loads."""
    gate, create_app = gated_warm_up
    created = []
    builder = threading.Thread(target=lambda: created.append(create_app(warm_up_first=True)))
    builder.start()
    builder.join(0.3)
    assert builder.is_alive() and not created, "create_app returned before the warm-up finished"
    gate.set()
    builder.join(10)
    assert created[0].test_client().get("/healthcheck").text == "READY"


def test_gunicorn_workers_warm_up_before_they_accept():
    config = runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))
    assert config["wsgi_app"] == "server:create_app(warm_up_first=True)"
