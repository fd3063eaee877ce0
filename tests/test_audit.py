"""The audit trail: hash-chained records of every access to patient data, tamper detection, GET /audit,
syslog forwarding, and the user store on Redis (the celery backend's)."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inference.audit import GENESIS, AuditLog, SyslogTarget, verify
from inference.config import Settings
from inference.protocol.client import build_multipart_request
from tests.conftest import PROJECT_ROOT, require, write_study
from tests.test_security import TOKEN, add_user, bearer, wait_for


def chain(path: Path, count: int = 4) -> AuditLog:
    log = AuditLog(path)
    for number in range(count):
        log.append("result-viewed", user=f"user{number}", client="127.0.0.1", study_uid=f"1.2.{number}",
                   job=str(number))
    return log


def run_verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inference.audit", "verify", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=PROJECT_ROOT)


def test_records_are_chained_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    chain(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["prev"] == GENESIS
    assert all(r["prev"] != GENESIS for r in records[1:])
    assert set(records[0]) >= {"time", "user", "event", "outcome", "study_uid", "series_uids", "input_hash", "client"}
    assert verify(path) == (4, None)
    result = run_verify(path)
    assert result.returncode == 0 and "4 records, chain intact" in result.stdout


@pytest.mark.parametrize(("tamper", "bad_line"), [
    (lambda lines: lines.__setitem__(1, lines[1].replace('"user1"', '"mallory"')), 2),  # an edited field
    (lambda lines: lines.pop(1), 2),  # a deleted line
    (lambda lines: lines.insert(2, lines[0]), 3),  # a copied line
    (lambda lines: lines.__setitem__(0, lines[0] + " "), 1),  # even a space
    (lambda lines: lines.__setitem__(3, "{not json"), 4),
])
def test_tampering_is_detected_naming_the_first_bad_line(tmp_path: Path, tamper, bad_line: int) -> None:
    path = tmp_path / "audit.jsonl"
    chain(path)
    lines = path.read_text().splitlines()
    tamper(lines)
    path.write_text("\n".join(lines) + "\n")
    assert verify(path)[0] == bad_line
    result = run_verify(path)
    assert result.returncode == 1
    assert f"line {bad_line}:" in result.stderr


def test_an_edit_with_a_recomputed_hash_breaks_the_next_line(tmp_path: Path) -> None:
    from inference.audit import canonical, digest

    path = tmp_path / "audit.jsonl"
    chain(path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    record["user"] = "mallory"
    del record["hash"]
    record["hash"] = digest(canonical(record))
    lines[1] = canonical(record)
    path.write_text("\n".join(lines) + "\n")
    assert verify(path) == (3, "its 'prev' is not the hash of the line before (a line was deleted or inserted)")


def test_verify_of_a_missing_file_fails(tmp_path: Path) -> None:
    assert run_verify(tmp_path / "none.jsonl").returncode == 1


def append_many(path: str, worker: int) -> None:
    log = AuditLog(path)
    for number in range(25):
        log.append("result-viewed", user=f"worker{worker}", job=str(number))


def test_several_processes_append_without_breaking_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=append_many, args=(str(path), n)) for n in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert all(p.exitcode == 0 for p in processes)
    assert verify(path) == (100, None)


def test_records_are_forwarded_as_rfc5424_syslog_over_udp(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(10)
        target = SyslogTarget.parse(f"127.0.0.1:{receiver.getsockname()[1]}")
        record = AuditLog(tmp_path / "audit.jsonl", target).append(
            "study-received", user="ae:ORTHANC", study_uid="1.2.3", input_hash="ab" * 32, door="dicom")
        frame = receiver.recv(65535).decode()
    # RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP STRUCTURED-DATA SP MSG
    match = re.fullmatch(r"<(\d+)>1 (\S+) (\S+) (\S+) (\d+) (\S+) - (.*)", frame, re.DOTALL)
    assert match, frame
    assert int(match[1]) == 10 * 8 + 5, "facility authpriv, severity notice"
    assert match[2] == record["time"] and match[2].endswith("Z")
    assert match[6] == "study-received"
    assert json.loads(match[7]) == record


def test_a_syslog_receiver_that_is_down_loses_nothing_from_the_file(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = AuditLog(tmp_path / "audit.jsonl", SyslogTarget("127.0.0.1", port))
    log.append("result-viewed")
    log.append("result-viewed")
    assert verify(log.path) == (2, None)


@pytest.mark.parametrize("text", ["localhost", "host:", ":514", "host:port"])
def test_a_bad_syslog_address_is_refused_clearly(text: str) -> None:
    with pytest.raises(ValueError, match="INFERENCE_AUDIT_SYSLOG must be host:port"):
        SyslogTarget.parse(text)


# -- the audit trail of the running app ------------------------------------------------------------------
@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """The full app with a shared token and named users; a job submitted by alice, downloaded, an inference
    request by bob, a refused /audit by bob: (app, tokens, audit path, job uid, study UID)."""
    import server

    root = tmp_path_factory.mktemp("audited")
    files = write_study(root / "data" / "study", study_uid="1.2.826.0.1.3680043.8.498.1")
    output = root / "jobs"
    tokens = {name: add_user(output, name, role) for name, role in
              [("alice", "submitter"), ("bob", "submitter"), ("ada", "admin")]}
    app = server.create_app(settings=dataclasses.replace(Settings(), api_token=TOKEN, data_root=root / "data",
                                                         output_root=output))
    client = app.test_client()
    uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "study"},
                      headers=bearer(tokens["alice"])).get_json()["uid"]
    assert wait_for(client, uid, bearer(tokens["alice"])).status_code == 200
    assert client.get(f"/job/{uid}/files/response.json", headers=bearer(tokens["alice"])).status_code == 200
    encoder = build_multipart_request({"inference_command": "gaussian-blur-3d"}, files)
    assert client.post("/", data=encoder.to_string(), content_type=encoder.content_type,
                       headers=bearer(tokens["bob"])).status_code == 200
    assert client.get("/audit", headers=bearer(tokens["bob"])).status_code == 403
    return app, tokens, output / "audit.jsonl", uid, "1.2.826.0.1.3680043.8.498.1"


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_job_submission_its_result_and_its_download_are_audited(audited) -> None:
    _, _, path, uid, _ = audited
    mine = [e for e in events(path) if e.get("detail", {}).get("job") == uid]
    assert [(e["event"], e["user"], e["outcome"]) for e in mine] == [
        ("study-received", "alice", "success"), ("result-produced", "alice", "success"),
        ("result-viewed", "alice", "success"), ("result-downloaded", "alice", "success")]
    assert mine[0]["detail"]["door"] == "job" and mine[0]["client"] == "127.0.0.1"
    assert re.fullmatch(r"[0-9a-f]{64}", mine[1]["input_hash"])
    assert mine[3]["detail"]["file"] == "response.json"
    assert {e["study_uid"] for e in mine} == {audited[4]}, "every record of the job names its study"


def test_an_inference_request_is_audited_with_its_uids_and_hash(audited) -> None:
    _, _, path, _, study = audited
    received, produced = [e for e in events(path) if e["user"] == "bob" and e["event"] != "request-refused"]
    assert (received["event"], produced["event"]) == ("study-received", "result-produced")
    assert received["study_uid"] == produced["study_uid"] == study
    assert len(received["series_uids"]) == 1 and received["input_hash"] == produced["input_hash"]
    assert received["detail"]["door"] == "http"


def test_a_refused_request_of_a_known_user_is_audited(audited) -> None:
    _, _, path, _, _ = audited
    refused = [e for e in events(path) if e["event"] == "request-refused"]
    assert [(e["user"], e["outcome"], e["detail"]["path"], e["detail"]["required_role"]) for e in refused] == [
        ("bob", "refused", "/audit", "admin")]


def test_the_audit_trail_verifies_and_never_holds_a_token(audited) -> None:
    _, tokens, path, _, _ = audited
    assert verify(path)[1] is None
    text = path.read_text()
    assert TOKEN not in text
    for token in tokens.values():
        assert token not in text and token.partition(".")[2] not in text


def test_get_audit_filters_by_study_user_and_time(audited) -> None:
    app, tokens, path, _, study = audited
    client = app.test_client()

    def get(query: str = "") -> list[dict]:
        response = client.get(f"/audit{query}", headers=bearer(tokens["ada"]))
        assert response.status_code == 200, response.data
        body = response.get_json()
        assert body["count"] == len(body["records"])
        return body["records"]

    everything = get()
    assert everything == events(path)[:len(everything)]
    assert {e["user"] for e in get("?user=alice")} == {"alice"} and len(get("?user=alice")) == 4
    assert {e["study_uid"] for e in get(f"?study={study}")} == {study}
    assert len(get(f"?study={study}")) == 6, "the job's four records and the inference request's two"
    assert get("?from=2999-01-01T00:00:00Z") == []
    assert len(get("?to=2999-01-01T00:00:00Z")) == len(everything)
    middle = everything[2]["time"]
    assert get(f"?from={middle}&to={middle}") == [everything[2]]
    assert client.get("/audit", headers=bearer(TOKEN)).status_code == 200, "the shared token is an admin"
    bad = client.get("/audit?from=yesterday", headers=bearer(tokens["ada"]))
    assert bad.status_code == 400 and "from must be an ISO 8601 time" in bad.get_json()["error"]


# -- the user store on Redis (the celery backend) ------------------------------------------------------
def test_users_on_redis_add_find_revoke(tmp_path: Path) -> None:
    require(None if shutil.which("redis-server") else "needs redis-server (Debian package redis-server)")
    from bench.job_backend import RedisServer
    from inference.users import Authenticator, RedisUsers, new_user

    server = RedisServer(tmp_path)
    try:
        store = RedisUsers(server.url)
        assert not store.any_users()
        user, token = new_user("rita", "reviewer")
        store.add(user)
        with pytest.raises(ValueError, match="already exists"):
            store.add(new_user("rita", "admin")[0])
        assert store.get("rita") == user and [u.name for u in store.all()] == ["rita"]
        found = Authenticator(store).user_for(token)
        assert found is not None and found.role == "reviewer"
        assert Authenticator(store).user_for(token + "x") is None
        assert store.revoke("rita") and not store.revoke("rita")
        assert Authenticator(store).user_for(token) is None
        assert store.any_users(), "a revoked user keeps the token check on"
    finally:
        server.stop()


def test_time_filters_take_the_records_clock() -> None:
    from inference.audit import epoch

    assert epoch("2026-01-31T12:00:00Z", "from") == epoch("2026-01-31T12:00:00", "from")
    assert abs(epoch(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "to") - time.time()) < 2
