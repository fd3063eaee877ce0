"""The Radiomics Segmentation API against a live server (gunicorn, local job backend), with a Velocity-like
client built from its own schema (``tests/velocity_client.py``): the call sequence on Study1's HippoCrop
series, compared with the Arterys door; every negative case of the fact sheet; inputs refused through
the progress poll with their ErrorCode; malformed, truncated and mutated bodies; gzip bombs; the token
and the network allow-list; the result's grace period.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
from requests_toolbelt.adapters.source import SourceAddressAdapter

from gateway import Gateway
from handlers import load_handlers
from inference.config import Settings
from inference.jobs.api import add_job_routes
from inference.jobs.store import JobStore
from inference.pipeline.pipeline import Pipeline
from inference.protocol.client import send_inference_request
from inference.radiomics.catalogue import Catalogue
from inference.radiomics.records import FEEDBACK, TELEMETRY, SqliteRadiomicsRecords
from inference.radiomics.routes import RadiomicsDoor, family_commands, radiomics_blueprint
from models.registry import registry_for
from tests.conftest import RunningServer
from tests.test_radiomics_wire import example_model_family, example_telemetry
from tests.velocity_client import PROTOBUF, VelocityClient, mask_of, message, messages, model_input

TOKEN = "radiomics-test-token"
MODEL = "hippocampus-1.0-fast"
#: A small volume for the cases that never reach the model.
SMALL = np.arange(4 * 6 * 5, dtype="<i2").reshape(4, 6, 5)
#: The server's series limit in these tests: Width x Height x Depth above it is refused before decompressing.
MAX_VOXELS = 1 << 22
MAX_BODY = 8 << 20
#: The hippocampus family's input channel (models/manifest.yaml).
CHANNEL = "T1"


def small_input(**kwargs):
    """A ModelInput of ``SMALL`` on the model's channel (``kwargs`` as ``model_input``'s)."""
    return model_input(SMALL, **{"channel_id": CHANNEL, **kwargs})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The production app under gunicorn: token required, except for the Radiomics routes from 127.0.0.1."""
    root = tmp_path_factory.mktemp("radiomics")
    server = RunningServer({"INFERENCE_OUTPUT_ROOT": str(root / "jobs"), "INFERENCE_API_TOKEN": TOKEN,
                            "INFERENCE_RADIOMICS_NETWORKS": "127.0.0.1/32",
                            "INFERENCE_MAX_SERIES_VOXELS": str(MAX_VOXELS),
                            "INFERENCE_MAX_REQUEST_BYTES": str(MAX_BODY)}, root)
    server.output = root / "jobs"
    yield server
    server.stop()


def bad_request(response: requests.Response, status: int) -> str:
    """The BadRequestResponse of an answer with ``status``; its ExceptionDetails."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    if response.headers["Content-Type"].startswith(PROTOBUF):
        answer = messages()["BadRequestResponse"].FromString(response.content)
        assert answer.ErrorMessage == "Invalid request.", answer
        return answer.ExceptionDetails
    return response.json()["ExceptionDetails"]


def arterys_labels(url: str, folder: Path, version: str) -> tuple[np.ndarray, dict, dict]:
    """The Arterys door's label mask of the crop series (and its label map and measures)."""
    result = send_inference_request(url + "/hippocampus", {"model_version": version}, sorted(folder.iterdir()),
                                    token=TOKEN, timeout=300)
    part = result.response_json["parts"][0]
    shape = part["binary_data_shape"]
    labels = np.frombuffer(result.buffers[0], np.uint8).reshape(shape["depth"], shape["height"], shape["width"])
    measures = next(iter(result.response_json["series_ml_json"].values()))
    return labels, part["label_map"], measures


def run_velocity_sequence(url: str, crop: tuple, version: str = "1.0-fast") -> dict:
    """Section 8 of the sheet, steps 1-9, on Study1's crop; checks each answer, returns what was made."""
    folder, voxels, transform = crop
    model_id = f"hippocampus-{version}"
    client = VelocityClient(url)
    assert client.get("/api/ping", "ApiInformation").Version
    status = client.get("/api/v2/VendorStatus", "VendorStatus")
    assert status.SegmentationServiceStatus == 1 and status.SegmentationServiceUrl == url + "/api/v2/"
    assert status.LanguageCode == "en-US"  # an RFC 5646 tag, not the reference's "English"
    assert client.get("/api/v2/Credits", "Credits").TotalCredits > 0
    models = client.get("/api/v2/Model/", "ModelsCollection")
    family, entry = next((f, v) for f in models.Models for v in f.ModelVersions if v.ID == model_id)
    channels = [channel.ChannelID for channel in family.FamilyDescription.InputChannels]
    assert len(channels) == 1
    body = model_input(voxels, transform, channels[0]).SerializeToString()
    task, progress, times = client.segment(model_id, body)
    assert (progress.Progress, progress.Errors) == (100, ""), progress
    started = time.monotonic()
    output = client.result(model_id, task.SegmentationID)
    download_ms = int((time.monotonic() - started) * 1000)
    assert output.ModelID == model_id and output.ProcesserVersion == f"{entry.MajorVersion}.{entry.MinorVersion}"
    assert [c.Structure.StructureID for c in output.Channels] == [s.StructureID for s in entry.Structures]
    for channel in output.Channels:
        assert channel.Volume.DataType == 1 and channel.Structure.Type == 1
        assert mask_of(channel).shape == voxels.shape and set(np.unique(mask_of(channel))) <= {0, 1}
    telemetry = message("SegmentationTelemetry", UploadTimeInMilliseconds=times["upload"],
                        SegmentationWaitInMilliseconds=times["wait"], SegmentationDownloadInMilliseconds=download_ms,
                        ModelID=model_id, SegmentationID=task.SegmentationID)
    assert client.post("/api/v2/Telemetry/segmentation", telemetry).status_code == 200
    comments = [message("StructureComment", StructureID=s.StructureID, Comments=f"{s.Name} fine",
                        Score=message("DoubleValue", Value=0.8)) for s in entry.Structures]
    comments.append(message("StructureComment", StructureID=entry.Structures[0].StructureID, Comments="not rated"))
    feedback = message("SegmentationFeedback", SegmentationID=task.SegmentationID, SegmentationAccepted=True,
                       GeneralComments="good", GeneralScore=message("DoubleValue", Value=0.9),
                       StructureComments=comments)
    assert client.post("/api/v2/Feedback/segmentation", feedback).status_code == 200
    request_json = json.dumps({"inference_command": "get-hippocampus-volume", "model_version": version})
    return {"client": client, "task": task, "output": output, "model_id": model_id, "body": body,
            "input_hash": hashlib.sha256(request_json.encode() + body).hexdigest()}


def check_against_arterys(url: str, crop: tuple, output, version: str) -> None:
    """Each structure's mask equals the Arterys door's labels for it, voxel for voxel."""
    labels, label_map, measures = arterys_labels(url, crop[0], version)
    label_of = {name: int(value) for value, name in label_map.items()}
    for channel in output.Channels:
        mask = mask_of(channel)
        assert np.array_equal(mask, labels == label_of[channel.Structure.Name]), channel.Structure.Name
        assert int(mask.sum()) == measures[f"{channel.Structure.Name.lower()}_voxels"]
    assert sum(int(mask_of(c).sum()) for c in output.Channels) > 1000  # the model found the hippocampus


def test_a_velocity_client_segments_study1_like_the_arterys_door(live, study1_crop):
    made = run_velocity_sequence(live.url, study1_crop)
    check_against_arterys(live.url, study1_crop, made["output"], "1.0-fast")
    again = made["client"].result(made["model_id"], made["task"].SegmentationID)  # a retried download works
    assert again.SerializeToString() == made["output"].SerializeToString()
    elsewhere = made["client"].session.get(f"{live.url}/api/v2/Model/hippocampus-1.0/segmentation/"
                                           f"{made['task'].SegmentationID}", timeout=10)
    assert MODEL in bad_request(elsewhere, 400)  # both path ids address a job (the reference's check, kept)
    records = SqliteRadiomicsRecords(live.output / "radiomics.sqlite3")
    feedback = next(e for e in records.entries(FEEDBACK) if e["segmentation_id"] == made["task"].SegmentationID)
    assert (feedback["family"], feedback["model_version"], feedback["input_hash"]) == (
        "hippocampus", "1.0-fast", made["input_hash"])
    rated = feedback["message"]["StructureComments"]
    assert rated[0]["Score"] == {"Value": 0.8} and "Score" not in rated[-1]  # absent means not rated
    telemetry = next(e for e in records.entries(TELEMETRY) if e["segmentation_id"] == made["task"].SegmentationID)
    assert telemetry["input_hash"] == made["input_hash"] and telemetry["model_id"] == MODEL
    metrics = requests.get(live.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    assert 'inference_radiomics_messages_total{kind="feedback",outcome="accepted"}' in metrics
    assert 'inference_radiomics_messages_total{kind="telemetry",outcome="None"}' in metrics


def test_answers_follow_accept(live):
    url = live.url + "/api/v2/Model/"
    binary = requests.get(url, headers={"Accept": PROTOBUF}, timeout=10)
    assert binary.headers["Content-Type"] == PROTOBUF
    collection = messages()["ModelsCollection"].FromString(binary.content)
    for accept in (None, "application/json", "*/*", "text/html, application/json;q=0.9"):
        answer = requests.get(url, headers={"Accept": accept} if accept else {}, timeout=10)
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json", accept
        family = answer.json()["Models"][0]
        assert {"CanonicalName", "FamilyDescription", "ModelVersions"} <= set(family)  # keys are field names
        assert family["ModelVersions"][0]["Structures"][0]["Type"] == "Organ"  # enums by name
        assert len(answer.json()["Models"]) == len(collection.Models)
    listed = requests.get(url, headers={"Accept": "application/json;q=0.5, application/x-protobuf"}, timeout=10)
    assert listed.headers["Content-Type"] == PROTOBUF and listed.content == binary.content
    assert requests.get(live.url + "/api/v2/Model/hippocampus-1.0/segmentation/" + "0" * 8, timeout=10).json()[
        "ErrorMessage"] == "Invalid request."  # an error in JSON mode is a BadRequestResponse too


def test_the_model_list_is_the_registry(live):
    collection = VelocityClient(live.url).get("/api/v2/Model/", "ModelsCollection")
    family = registry_for(Path(__file__).resolve().parents[1] / "models" / "manifest.yaml").family("hippocampus")
    [listed] = [f for f in collection.Models if f.ModelVersions[0].ID.startswith("hippocampus-")]
    assert sorted(v.ID for v in listed.ModelVersions) == sorted(f"hippocampus-{v}" for v in family.versions)
    for entry in listed.ModelVersions:
        version = family.versions[entry.ID.removeprefix("hippocampus-")]
        assert [(s.Name, (s.Color.R, s.Color.G, s.Color.B)) for s in entry.Structures] == [
            (s.name, s.color) for s in version.structures]


@pytest.mark.parametrize("path", ["/api/v2/Model", "/API/V2/model/", "/api/v2/Credits/", "/Api/V2/vendorstatus",
                                  "/api/ping/", "/ping"])
def test_paths_match_in_any_case_with_or_without_a_slash(live, path):
    response = requests.get(live.url + path, headers={"Accept": PROTOBUF}, allow_redirects=False, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == PROTOBUF


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v2/Feedback/segmentation"), ("GET", f"/api/v2/Model/{MODEL}/segmentation"),
    ("POST", "/api/v2/Model/"), ("POST", "/api/v2/Credits"), ("PUT", "/api/v2/Telemetry/segmentation"),
    ("DELETE", f"/api/v2/Model/{MODEL}/segmentation/00000000-0000-4000-8000-000000000000"),
    ("HEAD", "/api/v2/VendorStatus"), ("OPTIONS", "/api/v2/Model/")])
def test_a_wrong_method_is_403_as_in_the_reference(live, method, path):
    response = requests.request(method, live.url + path, headers={"Accept": PROTOBUF,
                                                                  "Content-Type": PROTOBUF}, timeout=10)
    assert response.status_code == 403
    if method != "HEAD":
        assert "not allowed" in bad_request(response, 403)


def test_the_sheets_negative_cases(live):
    client = VelocityClient(live.url)
    telemetry_bytes, family_bytes = example_telemetry().SerializeToString(), example_model_family().SerializeToString()
    assert "SegmentationFeedback" in bad_request(client.post("/api/v2/Feedback/segmentation", telemetry_bytes), 400)
    assert "SegmentationTelemetry" in bad_request(client.post("/api/v2/Telemetry/segmentation", family_bytes), 400)
    for content_type in ("application/json", "application/octet-stream", ""):
        response = client.session.post(live.url + "/api/v2/Telemetry/segmentation", data=telemetry_bytes,
                                       headers={"Content-Type": content_type}, timeout=10)
        assert PROTOBUF in bad_request(response, 415)
    base = f"/api/v2/Model/{MODEL}/segmentation"
    for job in ("not-a-uuid", "00000000-0000-4000-8000-000000000000"):
        assert job in bad_request(client.session.get(live.url + f"{base}/{job}", timeout=10), 400)
        assert job in bad_request(client.session.get(live.url + f"{base}/{job}/result", timeout=10), 400)


def test_an_unknown_model_is_400_and_makes_no_job(live):
    jobs = JobStore(live.output / "jobs.sqlite3")
    before = sum(jobs.count_by_status().values())
    response = VelocityClient(live.url).post("/api/v2/Model/Centered%20Orange%20Square/segmentation",
                                             small_input())
    assert "Centered Orange Square" in bad_request(response, 400) and MODEL in bad_request(response, 400)
    assert sum(jobs.count_by_status().values()) == before


def test_an_input_without_channels_is_400(live):
    for body in (b"", message("ModelInput", ClientInformation=message("ClientInformation",
                                                                       SoftwareVersion="x")).SerializeToString()):
        assert "no Channels" in bad_request(VelocityClient(live.url).post(f"/api/v2/Model/{MODEL}/segmentation",
                                                                          body), 400)


def gzip_bomb(size: int) -> bytes:
    """A gzip stream of ``size`` zero bytes (about a thousandth of that on the wire)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    return b"".join([*(packer.compress(chunk) for _ in range(size >> 20)), packer.flush()])


REFUSED = {
    "wrong channel id": (lambda: small_input(channel_id="CT"), 2, "ChannelIDs"),
    "zlib, not gzip": (lambda: small_input(data=zlib.compress(SMALL.tobytes())), 3, "not a gzip"),
    "not compressed": (lambda: small_input(data=SMALL.tobytes()), 3, "not a gzip"),
    "truncated gzip": (lambda: small_input(data=gzip.compress(SMALL.tobytes())[:-12]), 3, "truncated"),
    "damaged gzip": (lambda: small_input(data=gzip.compress(SMALL.tobytes())[:12] + b"\xff" * 40), 3,
                     "damaged"),
    "one slice more stated": (lambda: small_input(size=(5, 6, 5)), 4, "holds 240 bytes"),
    "one slice fewer stated": (lambda: small_input(size=(3, 6, 5)), 4, "more than"),
    "gzip bomb": (lambda: small_input(data=gzip_bomb(256 << 20)), 4, "more than"),
    "stated size beyond the limit": (lambda: small_input(size=(4096, 4096, 4096)), 2, "exceed"),
    "zero size": (lambda: small_input(size=(0, 6, 5)), 2, "positive"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_input_that_cannot_run_fails_through_progress_with_its_error_code(live, case):
    build, code, words = REFUSED[case]
    client = VelocityClient(live.url)
    task, progress, _ = client.segment(MODEL, build(), timeout=30)
    assert progress.ErrorCode == code and words in progress.Errors and progress.Progress < 100, progress
    result = client.session.get(f"{live.url}/api/v2/Model/{MODEL}/segmentation/{task.SegmentationID}/result",
                                timeout=10)
    assert "failed" in bad_request(result, 400)


def test_a_non_default_data_type_is_refused(live):
    body = small_input()
    body.Channels[0].CalibratedVolume.Volume.DataType = 1  # Byte
    _, progress, _ = VelocityClient(live.url).segment(MODEL, body, timeout=30)
    assert progress.ErrorCode == 2 and "LittleEndianSignedInt16" in progress.Errors


def test_malformed_truncated_and_mutated_bodies_are_4xx_never_5xx(live):
    """Random bytes, every truncation of a valid input, invalid UTF-8, and seeded byte mutations."""
    client = VelocityClient(live.url)
    valid = small_input().SerializeToString()
    feedback = message("SegmentationFeedback", SegmentationID="x", GeneralComments="fine",
                       GeneralScore=message("DoubleValue", Value=0.5)).SerializeToString()
    rng = random.Random(25)
    bodies = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(20)]
    bodies += [valid[:cut] for cut in range(1, len(valid), max(1, len(valid) // 25))]
    bodies.append(b"\x12\x03\x0a\x01\xff")  # Channels[0].ChannelID = the invalid UTF-8 byte FF
    for _ in range(40):
        mutated = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        bodies.append(bytes(mutated))
    statuses = {}
    for index, body in enumerate(bodies):
        for path in (f"/api/v2/Model/{MODEL}/segmentation", "/api/v2/Feedback/segmentation"):
            status = client.post(path, body).status_code
            assert status < 500, (path, index, body[:40])
            statuses[status] = statuses.get(status, 0) + 1
    for index in range(len(feedback)):
        mutated = bytearray(feedback)
        mutated[index] ^= 0xFF
        assert client.post("/api/v2/Feedback/segmentation", bytes(mutated)).status_code < 500
    assert statuses.get(400, 0) > len(bodies) // 2  # most do not parse, and say so
    assert "ModelInput" in bad_request(client.post(f"/api/v2/Model/{MODEL}/segmentation", b"\x12\x03\x0a\x01\xff"),
                                       400)


def test_a_body_over_the_limit_is_413_before_it_is_read(live):
    client = VelocityClient(live.url)
    assert "limit" in bad_request(client.post(f"/api/v2/Model/{MODEL}/segmentation", bytes(MAX_BODY + 1)), 413)
    assert "limit" in bad_request(client.post("/api/v2/Feedback/segmentation", bytes((1 << 20) + 1)), 413)


def test_out_of_range_scores_are_400(live):
    feedback = message("SegmentationFeedback", SegmentationID="x", GeneralScore=message("DoubleValue", Value=1.5))
    assert "between 0 and 1" in bad_request(VelocityClient(live.url).post("/api/v2/Feedback/segmentation",
                                                                          feedback), 400)


def test_the_token_and_the_network_allow_list(live):
    """127.0.0.1 is allowed without a token on the Radiomics routes only; 127.0.0.2 needs the token."""
    assert requests.get(live.url + "/api/v2/Model/", timeout=10).status_code == 200
    assert requests.get(live.url + "/models", timeout=10).status_code == 401
    other = requests.Session()
    other.mount("http://", SourceAddressAdapter("127.0.0.2"))
    assert other.get(live.url + "/api/v2/Model/", timeout=10).status_code == 401
    assert other.get(live.url + "/api/v2/Model/", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code \
        == 403
    assert other.get(live.url + "/api/v2/Model/", headers={"Authorization": f"Bearer {TOKEN}"},
                     timeout=10).status_code == 200
    assert other.get(live.url + "/ping", timeout=10).status_code == 200  # liveness stays open


def test_results_are_kept_for_the_grace_period_then_deleted(tmp_path):
    """A finished result can be fetched again until the grace period ends; then it and its job are gone."""
    load_handlers()
    settings = dataclasses.replace(Settings(), output_root=tmp_path / "jobs", radiomics_result_seconds=600)
    pipeline = Pipeline(settings, commands=["get-hippocampus-volume"])
    app = Gateway(__name__, pipeline=pipeline)
    store, runner = add_job_routes(app, pipeline)
    catalogue = Catalogue(registry_for(settings.model_manifest), family_commands(pipeline))
    door = RadiomicsDoor(pipeline, catalogue, store, runner, SqliteRadiomicsRecords(tmp_path / "records.sqlite3"))
    app.register_blueprint(radiomics_blueprint(door))
    client = app.test_client()
    headers = {"Accept": PROTOBUF, "Content-Type": PROTOBUF}
    voxels = np.random.default_rng(0).integers(0, 400, (16, 24, 20)).astype("<i2")
    body = model_input(voxels, channel_id=CHANNEL).SerializeToString()
    answer = client.post(f"/api/v2/Model/{MODEL}/segmentation", data=body, headers=headers)
    uid = messages()["SegmentationTask"].FromString(answer.data).SegmentationID
    deadline = time.monotonic() + 120
    while store.get(uid).status != "completed":
        assert time.monotonic() < deadline and store.get(uid).status != "failed", store.get(uid)
        time.sleep(0.1)
    path = f"/api/v2/Model/{MODEL}/segmentation/{uid}/result"
    assert client.get(path, headers=headers).status_code == 200 == client.get(path, headers=headers).status_code
    assert door.sweep(now=time.time() + 61) == []  # within the grace period: kept
    assert door.sweep(now=time.time() + 601) == [uid]
    assert client.get(path, headers=headers).status_code == 400 and store.get(uid) is None
    assert not (tmp_path / "jobs" / uid).exists() and not (tmp_path / "jobs" / f"{uid}.input").exists()


def test_named_users_post_segmentations_read_only_their_own_and_are_audited(live):
    """From a network not on the allow list, a submitter posts with its own token; another submitter cannot
    follow that segmentation, a reviewer can; the post is in the audit trail with the user and its hash."""
    from tests.test_security import add_user

    tokens = {name: add_user(live.output, name, role) for name, role in
              [("vela", "submitter"), ("otto", "submitter"), ("rhea", "reviewer")]}

    def client(name: str) -> VelocityClient:
        session = requests.Session()
        session.mount("http://", SourceAddressAdapter("127.0.0.2"))
        return VelocityClient(live.url, headers={"Authorization": f"Bearer {tokens[name]}"}, session=session)

    task, progress, _ = client("vela").segment(MODEL, small_input(channel_id="CT"), timeout=30)
    assert progress.ErrorCode == 2, progress
    path = f"/api/v2/Model/{MODEL}/segmentation/{task.SegmentationID}"
    assert "another user" in bad_request(client("otto").session.get(live.url + path, timeout=10), 403)
    assert client("rhea").session.get(live.url + path, timeout=10).status_code == 200
    trail = [json.loads(line) for line in (live.output / "audit.jsonl").read_text().splitlines()]
    mine = [e for e in trail if e.get("detail", {}).get("job") == task.SegmentationID]
    assert [(e["event"], e["user"], e["outcome"]) for e in mine] == [
        ("study-received", "vela", "success"), ("result-viewed", "otto", "refused")]
    assert mine[0]["detail"]["door"] == "radiomics" and mine[0]["client"] == "127.0.0.2"
    assert len(mine[0]["input_hash"]) == 64
