"""Access control and safe defaults: bearer token on every route but the probes, no tracebacks in
responses, request size limits, graceful SIGTERM, and studyPath / job folders confined to the data root."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

import gateway
from gateway import Gateway
from inference.config import Settings
from inference.http.roles import PUBLIC
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.request import MAX_JSON_BYTES
from tests.conftest import PROJECT_ROOT, RunningServer, write_study

TOKEN = "s3cret-Token-for-tests-0123456789"
WRONG_TOKEN = "wrong-Token-never-to-be-logged-42"


def settings(**changes) -> Settings:
    # these tests send wrong tokens on purpose, hundreds from one address: no throttling (tests/test_web_hardening.py)
    return dataclasses.replace(Settings(), **{"auth_failure_limit": 1_000_000, **changes})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the bearer token, on the full app (every route it serves) --------------------------------------
@pytest.fixture(scope="module")
def full_app(tmp_path_factory):
    """``server.create_app`` (every handler, the job API if present) with a token."""
    import server

    root = tmp_path_factory.mktemp("full_app")
    (root / "data").mkdir()
    return server.create_app(settings=settings(api_token=TOKEN, data_root=root / "data",
                                                    output_root=root / "jobs"))


def concrete_urls(app) -> list[tuple[str, str, str]]:
    """(endpoint, method, url) for every route of ``app``, converters filled with a dummy value ("x", or 0)."""
    urls = []
    for rule in app.url_map.iter_rules():
        try:
            url = rule.build(dict.fromkeys(rule.arguments, "x"), append_unknown=False)[1]
        except ValueError:  # an int converter (the review images' number)
            url = rule.build(dict.fromkeys(rule.arguments, 0), append_unknown=False)[1]
        urls += [(rule.endpoint, method, url) for method in sorted(rule.methods)]
    return urls


def test_every_route_but_the_probes_needs_the_token(full_app) -> None:
    client = full_app.test_client()
    open_endpoints = ("healthcheck", "ping", "review.review_page")
    guarded = [(e, m, u) for e, m, u in concrete_urls(full_app) if e not in open_endpoints]
    assert {"inference", "models.list_models"} <= {e for e, _, _ in guarded}
    for endpoint, method, url in guarded:
        missing = client.open(url, method=method)
        assert missing.status_code == 401, (endpoint, method, url, missing.data)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = client.open(url, method=method, headers=bearer(WRONG_TOKEN))
        assert wrong.status_code == 403, (endpoint, method, url, wrong.data)
        if method != "HEAD":
            assert "error" in missing.get_json() and "error" in wrong.get_json()


def test_unknown_routes_do_not_reveal_themselves_without_the_token(full_app) -> None:
    client = full_app.test_client()
    assert client.get("/no/such/route").status_code == 401
    assert client.get("/no/such/route", headers=bearer(TOKEN)).status_code == 404
    assert client.get("/static/anything").status_code == 401, "Flask's static route is not a probe"


def test_probes_are_open(full_app) -> None:
    client = full_app.test_client()
    assert client.get("/ping").status_code == 200
    assert client.get("/healthcheck").status_code == 200
    page = client.get("/review/")  # the review page's shell: no data in it, it reads /reviews with a token
    assert page.status_code == 200 and page.mimetype == "text/html" and b"Bearer" in page.data


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN} "])
def test_the_right_token_passes(full_app, header: str) -> None:
    response = full_app.test_client().get("/models", headers={"Authorization": header})
    assert response.status_code == 200 and response.get_json()["models"]


@pytest.mark.parametrize("header", [
    f"Bearer {WRONG_TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Bearer x{TOKEN}", f"Basic {TOKEN}",
    f"Token {TOKEN}", TOKEN, "Bearer", "Bearer ",
])
def test_wrong_tokens_are_forbidden(full_app, header: str) -> None:
    response = full_app.test_client().get("/models", headers={"Authorization": header})
    assert response.status_code == 403
    assert TOKEN not in response.get_data(as_text=True)


def test_tokens_are_compared_in_constant_time(full_app, monkeypatch) -> None:
    calls = []
    real = gateway.hmac.compare_digest
    monkeypatch.setattr(gateway.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert full_app.test_client().get("/models", headers=bearer(WRONG_TOKEN)).status_code == 403
    assert full_app.test_client().get("/models", headers=bearer(TOKEN)).status_code == 200
    assert len(calls) == 2 and all(len(a) == len(b) for a, b in calls), "digests of equal length are compared"


def test_job_api_needs_the_token(full_app) -> None:
    routes = {rule.rule for rule in full_app.url_map.iter_rules()}
    assert {"/job/", "/query/<uid>"} <= routes, "the job API must be served"
    client = full_app.test_client()
    job = {"job_name": "3dblur", "in_dir": "study"}
    assert client.post("/job/", json=job).status_code == 401
    assert client.post("/job/", json=job, headers=bearer(WRONG_TOKEN)).status_code == 403
    assert client.get("/query/123").status_code == 401
    assert client.get("/query/123", headers=bearer(WRONG_TOKEN)).status_code == 403
    assert client.get("/query/123", headers=bearer(TOKEN)).status_code == 404


def test_without_a_token_setting_routes_are_open() -> None:
    app = Gateway(__name__, settings=settings(api_token=None))
    app.add_url_rule("/models", "list_models", lambda: {"models": []})
    assert app.test_client().get("/models").status_code == 200


# -- named users and roles (inference.users) -------------------------------------------------------
def add_user(output_root: Path, name: str, role: str) -> str:
    """Create user ``name`` in the job store under ``output_root``; its token."""
    from inference.users import SqliteUsers, new_user

    user, token = new_user(name, role)
    SqliteUsers(output_root / "jobs.sqlite3").add(user)
    return token


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    """The full app (shared token set) with a study in its data root and one user of each role, plus a
    second submitter: (app, {name: token}, roots)."""
    import server

    root = tmp_path_factory.mktemp("users_app")
    write_study(root / "data" / "study")
    output = root / "jobs"
    tokens = {name: add_user(output, name, role) for name, role in
              [("alice", "submitter"), ("bob", "submitter"), ("rita", "reviewer"), ("ada", "admin")]}
    app = server.create_app(settings=settings(api_token=TOKEN, data_root=root / "data", output_root=output))
    return app, tokens, root


def wait_for(client, uid: str, headers: dict) -> requests.Response:
    deadline = time.monotonic() + 60
    while True:
        response = client.get(f"/query/{uid}", headers=headers)
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_every_route_states_the_role_it_needs(users) -> None:
    app, _, _ = users
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()} - {"static"}
    assert {"audit.audit", "jobs.submit_job", "inference", "radiomics.radiomics_segmentation"} <= endpoints
    assert not endpoints - set(app.route_roles), "declare their roles: @needs(role) (inference.http.roles)"
    assert app.route_roles["audit.audit"] == app.route_roles["metrics.metrics"] == "admin"
    assert {endpoint for endpoint, role in app.route_roles.items() if role == PUBLIC} == {
        "healthcheck", "ping", "review.review_page"}


@pytest.mark.parametrize(("name", "route", "allowed"), [
    # (user, a representative route of each kind, whether that role may use it)
    ("alice", "/models", True), ("alice", "/api/v2/Model", True), ("alice", "/metrics", False),
    ("alice", "/audit", False),
    ("rita", "/models", True), ("rita", "/api/v2/Model", True), ("rita", "/audit", False), ("rita", "/metrics", False),
    ("ada", "/models", True), ("ada", "/audit", True), ("ada", "/metrics", True),
    ("shared", "/audit", True), ("shared", "/metrics", True), ("shared", "/models", True),
])
def test_each_role_is_allowed_or_refused_by_route(users, name: str, route: str, allowed: bool) -> None:
    app, tokens, _ = users
    response = app.test_client().get(route, headers=bearer(TOKEN if name == "shared" else tokens[name]))
    if allowed:
        assert response.status_code == 200, response.data
    else:
        assert response.status_code == 403
        assert response.get_json()["required_role"] == "admin"
        assert "needs role 'admin'" in response.get_json()["error"]


def test_submitters_send_studies_through_every_door(users) -> None:
    app, tokens, _ = users
    client = app.test_client()
    study = sorted((users[2] / "data" / "study").iterdir())
    encoder = build_multipart_request({"inference_command": "gaussian-blur-3d"}, study)
    sent = client.post("/", data=encoder.to_string(), content_type=encoder.content_type,
                       headers=bearer(tokens["alice"]))
    assert sent.status_code == 200, sent.data
    job = client.post("/job/", json={"job_name": "3dblur", "in_dir": "study"}, headers=bearer(tokens["alice"]))
    assert job.status_code == 201


def test_missing_token_is_401_naming_the_role(users) -> None:
    app, _, _ = users
    response = app.test_client().get("/audit")
    assert response.status_code == 401
    assert response.get_json()["required_role"] == "admin"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_submitter_reads_only_its_own_jobs(users) -> None:
    app, tokens, _ = users
    client = app.test_client()
    uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "study"},
                      headers=bearer(tokens["alice"])).get_json()["uid"]
    assert wait_for(client, uid, bearer(tokens["alice"])).status_code == 200
    for route in (f"/query/{uid}", f"/job/{uid}/files", f"/job/{uid}/files/response.json"):
        refused = client.get(route, headers=bearer(tokens["bob"]))
        assert refused.status_code == 403, route
        assert "another user" in refused.get_json()["error"]
        for reader in (tokens["alice"], tokens["rita"], tokens["ada"], TOKEN):
            assert client.get(route, headers=bearer(reader)).status_code == 200, route


def test_a_revoked_user_is_refused(users) -> None:
    app, _, root = users
    from inference.users import SqliteUsers

    token = add_user(root / "jobs", "carl", "reviewer")
    client = app.test_client()
    assert client.get("/models", headers=bearer(token)).status_code == 200
    assert SqliteUsers(root / "jobs" / "jobs.sqlite3").revoke("carl")
    assert client.get("/models", headers=bearer(token)).status_code == 403


@pytest.mark.parametrize("forged", ["{id}.wrong-secret", "{id}", "nosuchid.{secret}", "{id}.{secret}x"])
def test_forged_user_tokens_are_forbidden(users, forged: str) -> None:
    app, tokens, _ = users
    token_id, _, secret = tokens["ada"].partition(".")
    response = app.test_client().get("/models", headers=bearer(forged.format(id=token_id, secret=secret)))
    assert response.status_code == 403


def test_users_turn_the_token_check_on_without_a_shared_token(tmp_path: Path) -> None:
    import server

    app = server.create_app(settings=settings(api_token=None, output_root=tmp_path / "jobs"))
    client = app.test_client()
    assert client.get("/models").status_code == 200, "no token and no user: open, as before users"
    token = add_user(tmp_path / "jobs", "alice", "submitter")
    assert client.get("/models").status_code == 401
    assert client.get("/models", headers=bearer(token)).status_code == 200


def test_the_token_check_stays_on_once_a_user_existed_and_stops_asking_the_store(tmp_path: Path) -> None:
    from inference.users import Authenticator, SqliteUsers, new_user

    store = SqliteUsers(tmp_path / "jobs.sqlite3")
    asked = []
    real = store.any_users
    store.any_users = lambda: asked.append(1) or real()  # type: ignore[method-assign]
    users = Authenticator(store)
    assert not users.any_users() and not users.any_users()
    assert len(asked) == 2, "while no user exists, every request asks the store (a user may be added any time)"
    store.add(new_user("alice", "submitter")[0])
    assert users.any_users()
    assert store.revoke("alice")
    assert users.any_users() and users.any_users(), "revoking the last user must not open the server"
    assert len(asked) == 3, "once true, the answer is remembered"


def run_users_command(output_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFERENCE_OUTPUT_ROOT": str(output_root), "INFERENCE_JOB_BACKEND": "local"}
    return subprocess.run([sys.executable, "-m", "inference.users", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=PROJECT_ROOT)


def test_users_command_adds_lists_and_revokes(tmp_path: Path) -> None:
    import server

    output = tmp_path / "jobs"
    added = run_users_command(output, "add", "rita", "--role", "reviewer")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{16}\.[A-Za-z0-9_-]{40,}", token), "the token alone on stdout"
    assert "shown only now" in added.stderr
    listed = run_users_command(output, "list")
    assert listed.returncode == 0
    assert [json.loads(line) for line in listed.stdout.splitlines()] == [
        {"name": "rita", "role": "reviewer", "created": pytest.approx(time.time(), abs=60), "revoked": None}]
    stored = (output / "jobs.sqlite3").read_bytes()
    assert token.encode() not in stored and token.partition(".")[2].encode() not in stored, "only a hash is kept"
    assert run_users_command(output, "add", "rita", "--role", "admin").returncode == 1, "names are unique"
    bad_role = run_users_command(output, "add", "eve", "--role", "root")
    assert bad_role.returncode == 2 and "invalid choice" in bad_role.stderr
    assert run_users_command(output, "add", "bad name!", "--role", "admin").returncode == 1

    app = server.create_app(settings=settings(output_root=output))
    assert app.test_client().get("/models", headers=bearer(token)).status_code == 200
    assert run_users_command(output, "revoke", "rita").returncode == 0
    assert app.test_client().get("/models", headers=bearer(token)).status_code == 403
    assert json.loads(run_users_command(output, "list").stdout)["revoked"] is not None
    assert run_users_command(output, "revoke", "rita").returncode == 1, "already revoked"

    audit = (output / "audit.jsonl").read_text()
    events = [json.loads(line) for line in audit.splitlines()]
    assert [(e["event"], e["detail"]["subject"]) for e in events if e["event"].startswith("user-")] == \
        [("user-created", "rita"), ("user-revoked", "rita")]
    # the revoked token's request is a failed authentication
    assert [e["event"] for e in events if not e["event"].startswith("user-")] == ["authentication-failed"]
    assert token not in audit and token.partition(".")[2] not in audit


# -- safe defaults --------------------------------------------------------------------------------------
def failing_handler(json_input, instances, input_hash):
    raise ValueError("the model exploded")


def test_handler_exceptions_answer_json_without_a_traceback() -> None:
    app = Gateway(__name__, settings=settings())
    app.add_inference_route("/", failing_handler)
    app.add_url_rule("/crash", "crash", lambda: 1 / 0)
    client = app.test_client()
    encoder = build_multipart_request({}, [])
    for response in (client.post("/", data=encoder.to_string(), content_type=related_content_type(encoder)),
                     client.get("/crash")):
        assert response.status_code == 500 and response.is_json
        text = response.get_data(as_text=True)
        assert "Traceback" not in text and 'File "' not in text and "test_security" not in text
        assert response.get_json()["error"]


def test_the_served_app_has_no_debug_mode(full_app) -> None:
    assert full_app.debug is False and not full_app.testing
    config = runpy.run_path(str(PROJECT_ROOT / "gunicorn.conf.py"))
    assert not config.get("reload"), "the served configuration must not use gunicorn's reloader"
    assert config["timeout"] == Settings().timeout >= 600, "large studies take minutes on CPU"
    assert config["graceful_timeout"] == Settings().graceful_timeout >= 30
    assert Settings().max_request_bytes == 2 * 1024**3


def test_request_size_limit(tmp_path: Path) -> None:
    app = Gateway(__name__, settings=settings(max_request_bytes=10_000))
    app.add_inference_route("/", failing_handler)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20_000))
    encoder = build_multipart_request({}, [], attachments=[big])
    response = app.test_client().post("/", data=encoder.to_string(), content_type=related_content_type(encoder))
    assert response.status_code == 413 and "10000" in response.get_json()["error"]


# -- the served configuration: gunicorn with the project's config and a test-only app -------------------
TEST_APP = '''
"""Test-only app for tests/test_security.py: a slow handler and a failing one behind the Gateway."""
import time
from pathlib import Path

from gateway import Gateway
from inference.protocol.request import MAX_JSON_BYTES


def slow(json_input, instances, input_hash):
    Path(json_input["marker"]).touch()
    time.sleep(float(json_input["sleep"]))
    return {"slept": json_input["sleep"]}, []


def fail(json_input, instances, input_hash):
    raise RuntimeError("handler failed on purpose")


def create_app():
    app = Gateway(__name__)
    app.add_inference_route("/", slow)
    app.add_inference_route("/fail", fail)
    app.add_healthcheck_route(lambda: "READY")
    return app
'''


def start_test_app(tmp_path: Path, **env: str) -> RunningServer:
    (tmp_path / "security_app.py").write_text(TEST_APP)
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--pythonpath", str(tmp_path),
               "security_app:create_app()"]
    return RunningServer({"INFERENCE_API_TOKEN": TOKEN, **env}, tmp_path, args=command, ready_timeout=60)


def multipart(json_input: dict, attachments=()) -> tuple[bytes, dict[str, str]]:
    encoder = build_multipart_request(json_input, [], attachments=attachments)
    return encoder.to_string(), {"Content-Type": related_content_type(encoder)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    (root / "data").mkdir()
    server = start_test_app(root, INFERENCE_MAX_REQUEST_BYTES="65536", INFERENCE_DATA_ROOT=str(root / "data"))
    yield server
    server.stop()


def test_served_errors_have_no_traceback_but_the_log_does(served) -> None:
    body, headers = multipart({})
    response = requests.post(served.url + "/fail", data=body, headers={**headers, **bearer(TOKEN)}, timeout=30)
    assert response.status_code == 500 and len(response.json()["input_hash"]) == 64
    assert "on purpose" not in response.text, "the exception's text stays in the log"
    assert "Traceback" not in response.text and 'File "' not in response.text
    log = served.log()
    assert "Traceback" in log and "handler failed on purpose" in log, "the operator gets the detail in the log"
    assert response.json()["input_hash"] in log


def test_served_size_limit_with_and_without_content_length(served, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(100_000))
    body, headers = multipart({}, attachments=[big])
    headers |= bearer(TOKEN)
    sized = requests.post(served.url + "/fail", data=body, headers=headers, timeout=30)
    chunked = requests.post(served.url + "/fail", data=iter([body[:50_000], body[50_000:]]), headers=headers,
                            timeout=30)
    assert sized.status_code == 413 and chunked.status_code == 413, (sized.text, chunked.text)


def read_http_response(sock: socket.socket) -> str:
    """Status line, headers and body (by Content-Length) of one HTTP response read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length and (more := sock.recv(65536)):
        body += more
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_served_json_body_is_bounded_even_when_chunked(served) -> None:
    """A chunked studyPath request larger than 1 MiB is refused while its body is still open: a
    server reading it whole would wait for the rest, and this socket would time out."""
    head = (f"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b'{"studyPath": "study", "padding": "' + b"x" * (MAX_JSON_BYTES + 100_000)
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as sock:
        sock.sendall(head + b"%x\r\n" % len(chunk) + chunk + b"\r\n")  # no final chunk: the body stays open
        answer = read_http_response(sock)
    assert answer.startswith("HTTP/1.1 400"), answer
    assert "under 1 MiB" in answer


class EndlessBody:
    """A request body stream that never ends, counting what the server reads of it."""

    def __init__(self) -> None:
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise AssertionError("the server tried to read an endless JSON body to its end")
        size = min(size, 65536)
        self.bytes_read += size
        if self.bytes_read > 64 * MAX_JSON_BYTES:
            raise AssertionError("the server kept reading an endless JSON body")
        return b" " * size

    readline = read

    def tell(self) -> int:
        return 0

    def seek(self, *args) -> int:
        return 0


def test_job_json_body_is_bounded_even_when_chunked(full_app) -> None:
    assert "/job/" in {rule.rule for rule in full_app.url_map.iter_rules()}, "the job API must be served"
    body = EndlessBody()
    response = full_app.test_client().post(
        "/job/", input_stream=body, content_type="application/json", headers=bearer(TOKEN),
        environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})  # as gunicorn for chunked
    assert response.status_code in (400, 413), response.get_data(as_text=True)
    assert body.bytes_read <= MAX_JSON_BYTES + 65536, "the job API read past the JSON limit"


def test_served_log_never_holds_the_token(served) -> None:
    for token in (TOKEN, WRONG_TOKEN):
        requests.get(served.url + "/nothing", headers=bearer(token), timeout=10)
    requests.get(served.url + "/nothing", timeout=10)
    log = served.log()
    assert "'INFERENCE_API_TOKEN': '***'" in log or "INFERENCE_API_TOKEN" not in log
    assert TOKEN not in log and WRONG_TOKEN not in log
    assert "403" in log and "401" in log, "refused requests are logged, without the token"


def test_sigterm_lets_the_request_in_flight_finish(tmp_path: Path) -> None:
    server = start_test_app(tmp_path, INFERENCE_GRACEFUL_TIMEOUT="30")
    marker = tmp_path / "handler-started"
    body, headers = multipart({"sleep": 3, "marker": str(marker)})
    result: dict = {}

    def send() -> None:
        try:
            result["response"] = requests.post(server.url + "/", data=body, headers={**headers, **bearer(TOKEN)},
                                               timeout=60)
        except requests.RequestException as exc:
            result["error"] = exc

    sender = threading.Thread(target=send)
    try:
        sender.start()
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the slow handler never started:\n{server.log()}"
        os.kill(server.process.pid, signal.SIGTERM)  # the gunicorn master, as docker stop does
        sent_term = time.monotonic()
        sender.join(60)
        assert "error" not in result, f"{result.get('error')}\n{server.log()}"
        response = result["response"]
        assert response.status_code == 200, response.text
        assert time.monotonic() - sent_term > 1.5, "the request finished after SIGTERM, not before it"
        assert server.process.wait(30) == 0, server.log()
    finally:
        server.stop()
        sender.join(5)


# -- folders named by clients stay inside the data root ----------------------------------------------------
@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """``data`` (the root) with ``study``; ``outside`` and ``data2`` (a sibling sharing its prefix) next to it."""
    root = tmp_path / "data"
    write_study(root / "study", shape=(3, 16, 16), seed=1)
    write_study(tmp_path / "outside" / "study", shape=(2, 16, 16), seed=2, description="Outside")
    write_study(tmp_path / "data2" / "study", shape=(2, 16, 16), seed=3, description="Sibling")
    return root


def recording_gateway(root: Path | None) -> tuple[Gateway, list[str]]:
    """A gateway whose handler records the SeriesDescription of every instance it is given."""
    seen: list[str] = []

    def record(json_input, instances, input_hash):
        seen.extend(str(pydicom.dcmread(part).SeriesDescription) for part in instances)
        return {}, []

    app = Gateway(__name__, settings=settings(data_root=root))
    app.add_inference_route("/", record)
    return app, seen


def post_study_path(app: Gateway, study_path):
    return app.test_client().post("/", json={"studyPath": study_path})


@pytest.mark.parametrize("study_path", [
    "../outside/study", "study/../../outside/study", "..", "study/../..", "{tmp}/outside/study", "/",
    "{tmp}/data2/study", "/etc", "study\0",
])
def test_study_path_outside_the_root_is_forbidden(data_root: Path, study_path: str) -> None:
    app, seen = recording_gateway(data_root)
    response = post_study_path(app, study_path.replace("{tmp}", str(data_root.parent)))
    assert response.status_code == 403, response.get_json()
    assert not seen


@pytest.mark.parametrize("study_path", ["study", "./study", "study/../study", "{root}/study"])
def test_study_path_inside_the_root_is_served(data_root: Path, study_path: str) -> None:
    app, seen = recording_gateway(data_root)
    response = post_study_path(app, study_path.replace("{root}", str(data_root)))
    assert response.status_code == 200, response.get_json()
    assert seen == ["Generated"] * 3


def test_symlinked_folder_leading_out_of_the_root_is_forbidden(data_root: Path) -> None:
    (data_root / "linked").symlink_to(data_root.parent / "outside" / "study", target_is_directory=True)
    (data_root / "study" / "nested").symlink_to(data_root.parent / "outside", target_is_directory=True)
    app, seen = recording_gateway(data_root)
    assert post_study_path(app, "linked").status_code == 403
    assert post_study_path(app, "study/nested/study").status_code == 403
    assert not seen


def test_symlinked_files_leading_out_of_the_root_are_not_read(data_root: Path) -> None:
    outside_files = sorted((data_root.parent / "outside" / "study").iterdir())
    (data_root / "study" / "zz-outside.dcm").symlink_to(outside_files[0])
    (data_root / "study" / "linked-dir").symlink_to(outside_files[0].parent, target_is_directory=True)
    only_links = data_root / "only-links"
    only_links.mkdir()
    (only_links / "a.dcm").symlink_to(outside_files[1])
    app, seen = recording_gateway(data_root)
    assert post_study_path(app, "study").status_code == 200
    assert seen == ["Generated"] * 3, "a file linked from outside the root reached the handler"
    assert post_study_path(app, "only-links").status_code == 422
    assert seen == ["Generated"] * 3


def test_a_symlinked_data_root_still_serves_its_own_folders(data_root: Path) -> None:
    alias = data_root.parent / "data-alias"
    alias.symlink_to(data_root, target_is_directory=True)
    app, seen = recording_gateway(alias)
    assert post_study_path(app, "study").status_code == 200
    assert post_study_path(app, "../outside/study").status_code == 403


def test_study_path_needs_a_configured_root(data_root: Path) -> None:
    app, seen = recording_gateway(None)
    response = post_study_path(app, str(data_root / "study"))
    assert response.status_code == 403 and "INFERENCE_DATA_ROOT" in response.get_json()["error"]
    assert not seen


def test_job_folders_stay_inside_the_root(data_root: Path) -> None:
    from inference.errors import Forbidden
    from inference.jobs.executor import study_files

    (data_root / "linked").symlink_to(data_root.parent / "outside" / "study", target_is_directory=True)
    (data_root / "study" / "zz-outside.dcm").symlink_to(next((data_root.parent / "outside" / "study").iterdir()))
    for in_dir in ("../outside/study", str(data_root.parent / "outside" / "study"), "linked", "/"):
        with pytest.raises(Forbidden):
            study_files(data_root, in_dir)
    files = study_files(data_root, "study")
    assert len(files) == 3 and all(p.resolve().is_relative_to(data_root.resolve()) for p in files)
