"""The Gateway app in-process (Flask test client): routing, errors, hashing, logging, studyPath."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

import numpy as np
import pydicom
import pytest

from gateway import Gateway
from inference import protocol
from inference.config import Settings
from inference.errors import GatewayError
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.multipart_response import decode_multipart_response


def make_gateway(handler=None, **settings) -> Gateway:
    app = Gateway(__name__, settings=dataclasses.replace(Settings(), **settings))
    app.add_inference_route("/", handler or echo_series_mask)
    app.add_healthcheck_route(lambda: "READY")
    return app


def echo_series_mask(json_input, instances, input_hash):
    """An Arterys-style handler, given the request's parts: a 3D mask, one byte per voxel, value = slice index."""
    datasets = [pydicom.dcmread(part.open(), stop_before_pixels=True) for part in instances
                if part.content_type == "application/dicom"]
    depth, rows, columns = len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)
    mask = np.repeat(np.arange(depth, dtype=np.uint8), rows * columns).reshape(depth, rows, columns)
    part = {"binary_type": "probability_mask", "SeriesInstanceUID": str(datasets[0].SeriesInstanceUID),
            "binary_data_shape": {"timepoints": 1, "depth": depth, "height": rows, "width": columns}}
    return {"parts": [part], "echo": json_input, "input_hash_seen": input_hash}, [mask]


def post(client, files, json_input=None, route="/", attachments=()):
    encoder = build_multipart_request(json_input or {"studyUID": "1.2.3"}, files, attachments)
    return client.post(route, data=encoder.to_string(), content_type=related_content_type(encoder))


def decoded(response):
    parts = decode_multipart_response(response.headers["Content-Type"], response.data)
    return json.loads(parts[0][1]), [body for _, body in parts[1:-1]], parts[-1]


def test_round_trip_hash_and_mask(study):
    client = make_gateway().test_client()
    response = post(client, study)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(response.data))
    response_json, buffers, (hash_type, hashes) = decoded(response)
    contents = [json.dumps({"studyUID": "1.2.3"}).encode()] + [p.read_bytes() for p in study]
    input_hash = hashlib.sha256(b"".join(contents)).hexdigest()
    assert response_json["input_hash_seen"] == input_hash
    assert hash_type == "text/plain" and hashes.decode().split(":")[0] == input_hash
    output_hash = hashlib.sha256(decode_multipart_response(response.headers["Content-Type"], response.data)[0][1]
                                 + buffers[0]).hexdigest()
    assert hashes.decode().split(":")[1] == output_hash
    assert buffers[0][: 32 * 40] == bytes(32 * 40) and buffers[0][-1] == len(study) - 1


def test_ping_and_healthcheck():
    client = make_gateway().test_client()
    assert client.get("/ping").status_code == 200
    assert client.post("/ping").status_code == 200
    assert client.get("/healthcheck").data == b"READY"


def test_same_route_twice_is_an_error():
    app = make_gateway()
    with pytest.raises(ValueError, match="already served"):
        app.add_inference_route("/", echo_series_mask)


def test_flask_register_error_handler_still_works(study):
    class Custom(Exception):
        pass

    def raising(json_input, instances, input_hash):
        raise Custom()

    app = Gateway(__name__, settings=Settings())
    app.add_inference_route("/", raising)
    app.register_error_handler(Custom, lambda e: ("custom answer", 418))
    assert post(app.test_client(), study[:1]).status_code == 418


def test_get_on_inference_route_is_405():
    response = make_gateway().test_client().get("/")
    assert response.status_code == 405 and "POST" in response.json["error"]


def test_wrong_content_type_is_415():
    response = make_gateway().test_client().post("/", data=b"abc", content_type="application/octet-stream")
    assert response.status_code == 415 and "multipart/related" in response.json["error"]


def test_missing_boundary_is_400():
    response = make_gateway().test_client().post("/", data=b"abc", content_type="multipart/related")
    assert response.status_code == 400 and "boundary" in response.json["error"]


def test_part0_not_json_is_400(study):
    client = make_gateway().test_client()
    body = b'--b\r\nContent-Type: text/json\r\n\r\n{not json\r\n--b--\r\n'
    response = client.post("/", data=body, content_type="multipart/related; boundary=b")
    assert response.status_code == 400 and "part 0" in response.json["error"]
    assert len(response.json["input_hash"]) == 64
    body = b'--b\r\nContent-Type: text/json\r\n\r\n[1, 2]\r\n--b--\r\n'
    response = client.post("/", data=body, content_type="multipart/related; boundary=b")
    assert response.status_code == 400 and "JSON object" in response.json["error"]


def test_truncated_body_is_400_and_next_request_works(study):
    client = make_gateway().test_client()
    encoder = build_multipart_request({}, study)
    body = encoder.to_string()
    response = client.post("/", data=body[: len(body) // 2], content_type=related_content_type(encoder))
    assert response.status_code == 400 and "truncated" in response.json["error"]
    assert post(client, study).status_code == 200


def test_too_large_is_413(study):
    client = make_gateway(max_request_bytes=1000).test_client()
    response = post(client, study)
    assert response.status_code == 413 and "limit of 1000 bytes" in response.json["error"]


def test_non_dicom_part_is_422_naming_it(study, tmp_path):
    bogus = tmp_path / "notes.dcm"
    bogus.write_bytes(b"this is not dicom")
    response = post(make_gateway().test_client(), study[:2] + [bogus])
    assert response.status_code == 422
    assert "part 3" in response.json["error"] and "notes.dcm" in response.json["error"]


def test_attachments_before_dicom_are_passed_on_and_skipped(study, tmp_path):
    licence = tmp_path / "licence.txt"
    licence.write_text("licensed to the hospital")
    seen = {}

    def handler(json_input, instances, input_hash):
        seen["first"] = instances[0].read_bytes()
        return echo_series_mask(json_input, instances, input_hash)

    response = post(make_gateway(handler).test_client(), study, attachments=[licence])
    assert response.status_code == 200
    assert seen["first"] == b"licensed to the hospital"
    assert decoded(response)[0]["parts"][0]["binary_data_shape"]["depth"] == len(study)


def test_handler_exception_is_500_with_hash_and_traceback_in_log(study, caplog):
    def broken(json_input, instances, input_hash):
        raise ZeroDivisionError("model exploded in /srv/secret/models/net.py")

    client = make_gateway(broken).test_client()
    with caplog.at_level(logging.INFO, logger="inference"):
        response = post(client, study)
    assert response.status_code == 500
    assert len(response.json["input_hash"]) == 64 and "server log" in response.json["error"]
    # the body says nothing of the exception: its text may carry paths and library internals
    assert "exploded" not in response.text and "/srv" not in response.text and "Traceback" not in response.text
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("Traceback" in r.getMessage() and response.json["input_hash"] in r.getMessage() for r in failure)


def test_handler_gateway_error_keeps_its_status(study):
    def refusing(json_input, instances, input_hash):
        raise GatewayError("no brain in this study", status=422)

    response = post(make_gateway(refusing).test_client(), study)
    assert response.status_code == 422 and response.json["error"] == "no brain in this study"


def test_invalid_output_is_500_with_precise_message(study):
    def float_mask(json_input, instances, input_hash):
        response, buffers = echo_series_mask(json_input, instances, input_hash)
        return response, [buffers[0].astype(np.float32)]

    response = post(make_gateway(float_mask).test_client(), study)
    assert response.status_code == 500
    assert "parts[0] (probability_mask): mask dtype is float32" in response.json["error"]


def test_every_log_line_of_a_request_carries_its_hash(study, caplog):
    client = make_gateway().test_client()
    with caplog.at_level(logging.INFO, logger="inference"):
        response = post(client, study)
        input_hash = decoded(response)[0]["input_hash_seen"]
        response.close()  # the request's summary line is written once the response is sent
    gateway_lines = [r.getMessage() for r in caplog.records if r.name in ("inference.gateway", "inference.pipeline")]
    assert len(gateway_lines) >= 3 and any(r.name == "inference.pipeline" for r in caplog.records)
    assert all(f"input_hash={input_hash}" in line for line in gateway_lines)
    summary = [line for line in gateway_lines if line.count("POST /") and " 200 " in line]
    assert summary and "in=" in summary[0] and "out=" in summary[0]


def test_handler_log_lines_carry_the_request_hash_too(study, caplog):
    from inference.logs import TaggedLogger

    handler_log = TaggedLogger(logging.getLogger("inference.my_model"))

    def logging_handler(json_input, instances, input_hash):
        handler_log.info("model ran")
        return echo_series_mask(json_input, instances, input_hash)

    client = make_gateway(logging_handler).test_client()
    with caplog.at_level(logging.INFO, logger="inference"):
        input_hash = decoded(post(client, study))[0]["input_hash_seen"]
        client.get("/ping")  # the next request in this thread starts untagged
        handler_log.info("outside a request")
    lines = [r.getMessage() for r in caplog.records if r.name == "inference.my_model"]
    assert lines == [f"[input_hash={input_hash}] model ran", "outside a request"]


def test_study_path_is_refused_without_a_data_root():
    response = make_gateway().test_client().post("/", json={"studyPath": "x"})
    assert response.status_code == 403 and "INFERENCE_DATA_ROOT" in response.json["error"]


def test_study_path_inside_the_root(tmp_path, make_study):
    files = make_study("root/case1")
    client = make_gateway(data_root=tmp_path / "root").test_client()
    response = client.post("/", json={"studyPath": "case1", "studyUID": "1"})
    assert response.status_code == 200
    assert decoded(response)[0]["parts"][0]["binary_data_shape"]["depth"] == len(files)


@pytest.mark.parametrize("path", ["../outside", "/etc", "case1/../../outside"])
def test_study_path_outside_the_root_is_403(tmp_path, make_study, path):
    make_study("root/case1")
    make_study("outside")
    response = make_gateway(data_root=tmp_path / "root").test_client().post("/", json={"studyPath": path})
    assert response.status_code == 403


def test_study_path_symlink_out_of_the_root_is_403(tmp_path, make_study):
    make_study("outside")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    response = make_gateway(data_root=tmp_path / "root").test_client().post("/", json={"studyPath": "link"})
    assert response.status_code == 403


def test_study_path_without_dicom_is_422(tmp_path):
    (tmp_path / "root" / "empty").mkdir(parents=True)
    response = make_gateway(data_root=tmp_path / "root").test_client().post("/", json={"studyPath": "empty"})
    assert response.status_code == 422 and "empty folder" in response.json["error"]


def test_json_request_without_study_path_is_400(tmp_path):
    response = make_gateway(data_root=tmp_path).test_client().post("/", json={"studyUID": "1"})
    assert response.status_code == 400 and "studyPath" in response.json["error"]


def test_protocol_module_is_what_the_gateway_enforces():
    """The gateway does not keep rules of its own: its output checker is inference.protocol.rules's."""
    import gateway

    assert gateway.protocol is protocol


# -- hostile input: corrupt DICOM, limits, JSON, paths (issue 19) --------------------------------
def test_corrupt_dicom_is_422_naming_the_part_before_the_handler_runs(study, tmp_path):
    ran = []

    def handler(json_input, instances, input_hash):
        ran.append(True)
        return echo_series_mask(json_input, instances, input_hash)

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(study[2].read_bytes()[:-200])
    response = post(make_gateway(handler).test_client(), [*study[:2], truncated])
    assert response.status_code == 422 and ran == []
    assert "part 3 (file 'truncated.dcm')" in response.json["error"] and "truncated" in response.json["error"]
    assert len(response.json["input_hash"]) == 64


def test_series_over_the_voxel_limit_is_422_before_the_handler_runs(study):
    response = post(make_gateway(max_series_voxels=3 * 32 * 40).test_client(), study)  # 8 slices sent
    assert response.status_code == 422 and "INFERENCE_MAX_SERIES_VOXELS" in response.json["error"]


def test_response_over_the_byte_limit_is_413(study):
    response = post(make_gateway(max_response_bytes=4096).test_client(), study)  # the mask is 10,240 bytes
    assert response.status_code == 413 and "INFERENCE_MAX_RESPONSE_BYTES" in response.json["error"]


@pytest.mark.parametrize("json_input, words", [
    ({"a": json.loads("[" * 40 + "]" * 40)}, "nested too deeply"),
    ({"sigma_mm": 10**300}, "parameter sigma_mm is an integer of 301 digits"),
])
def test_hostile_request_json_is_400_naming_the_parameter(study, json_input, words):
    response = post(make_gateway().test_client(), study, json_input)
    assert response.status_code == 400 and words in response.json["error"]


def test_json_nested_a_thousand_levels_is_400(study):
    client = make_gateway().test_client()
    response = client.post("/", data=b"[" * 1000 + b"]" * 1000, content_type="application/json")
    assert response.status_code == 400 and "nested too deeply" in response.json["error"]


def test_over_long_study_path_is_400_without_the_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    client = make_gateway(data_root=root).test_client()
    for path in ["a" * 5000, ("b" * 200 + "/") * 8]:
        response = client.post("/", json={"studyPath": path})
        assert response.status_code == 400 and "too long" in response.json["error"]
        assert str(root) not in response.text and str(tmp_path) not in response.text
