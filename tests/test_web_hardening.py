"""What a security reviewer's probe found besides transport (issue 39, point 7), one test per finding: security
headers and a strict CSP on every answer, no framing, no caching of patient data, no token in web storage,
failed authentications audited and throttled, an equal-cost check for unknown ids, and private file modes."""

from __future__ import annotations

import dataclasses
import json
import stat
import time
from pathlib import Path

import pytest
import requests

import inference.users as users_module
from inference.config import Settings
from inference.http.headers import page_csp
from inference.review.page import REVIEW_PAGE
from tests.conftest import RunningServer, write_study
from tests.test_page import browser  # noqa: F401  (the fixture: Debian's chromium through Playwright)
from tests.test_review_page import served  # noqa: F401  (the full gateway on a free port, with users)
from tests.test_security import TOKEN, WRONG_TOKEN, add_user, bearer


def make_app(root: Path, **changes):
    import server

    (root / "data").mkdir(parents=True, exist_ok=True)
    write_study(root / "data" / "study", shape=(4, 16, 20))
    settings = dataclasses.replace(Settings(), api_token=TOKEN, data_root=root / "data", output_root=root / "jobs",
                                   enable_mocks=True, **changes)
    return server.create_app(settings=settings)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("hardening"))


# -- headers ----------------------------------------------------------------------------------------
def test_every_answer_carries_the_security_headers_and_no_store(app):
    client = app.test_client()
    answers = {"/healthcheck": client.get("/healthcheck"), "/ping": client.get("/ping"),
               "/review/": client.get("/review/"), "/models (401)": client.get("/models"),
               "/models": client.get("/models", headers=bearer(TOKEN)),
               "/no-such-route": client.get("/no-such-route", headers=bearer(TOKEN)),
               "POST /job/ (400)": client.post("/job/", json={}, headers=bearer(TOKEN))}
    for name, answer in answers.items():
        headers = answer.headers
        assert headers["X-Content-Type-Options"] == "nosniff", name
        assert headers["X-Frame-Options"] == "DENY", name
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], name
        assert headers["Referrer-Policy"] == "no-referrer", name
        assert headers["Cache-Control"] == "no-store", name
        assert "Strict-Transport-Security" not in headers, name  # plain HTTP (make serve): no HSTS


def test_patient_data_answers_are_not_cached(app):
    client = app.test_client()
    uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "study"}, headers=bearer(TOKEN)).get_json()["uid"]
    deadline = time.monotonic() + 60
    while (done := client.get(f"/query/{uid}", headers=bearer(TOKEN))).status_code == 202 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.status_code == 200 and done.headers["Cache-Control"] == "no-store"
    files = client.get(f"/job/{uid}/files", headers=bearer(TOKEN))
    first = files.get_json()["files"][0]["name"]
    image = client.get(f"/job/{uid}/files/{first}", headers=bearer(TOKEN))
    assert image.status_code == 200 and image.headers["Cache-Control"] == "no-store"


def test_the_review_page_policy_runs_only_its_own_script_and_style():
    policy = page_csp(REVIEW_PAGE)
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert policy.count("'sha256-") == REVIEW_PAGE.count("<script>") + REVIEW_PAGE.count("<style>") == 2
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy


def test_another_origin_cannot_frame_the_review_page(served, browser):  # noqa: F811
    _, url, _, _ = served
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_content(f'<iframe id="f" src="{url}/review/"></iframe>')  # about:blank: another origin
        page.wait_for_timeout(1500)
        frame = page.frame_locator("#f")
        assert frame.locator("#accept").count() == 0  # the page's "Accept and release" button never shows
        direct = context.new_page()
        direct.goto(f"{url}/review/")
        assert direct.locator("#accept").count() == 1  # served, just not inside another origin's frame
    finally:
        context.close()


def test_the_review_page_keeps_no_token_in_web_storage(served, browser):  # noqa: F811
    _, url, tokens, _ = served
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{url}/review/")
        page.fill("#token", tokens["rita"])
        page.click("#load")
        page.wait_for_selector("#summary:has-text('awaiting')")
        assert page.evaluate("sessionStorage.length + localStorage.length") == 0
        assert "Storage" not in REVIEW_PAGE
    finally:
        context.close()


# -- failed authentications ------------------------------------------------------------------------
def test_a_failed_authentication_is_audited_and_logged_with_the_client_address(tmp_path, capsys):
    app = make_app(tmp_path)
    client = app.test_client()
    capsys.readouterr()
    answer = client.get("/models", headers=bearer("abcd1234.wrong-secret"),
                        environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert answer.status_code == 403
    records = [r for r in app.audit.records() if r["event"] == "authentication-failed"]
    assert len(records) == 1
    record = records[0]
    assert record["client"] == "192.0.2.7" and record["outcome"] == "refused"
    assert record["detail"]["path"] == "/models" and record["detail"]["token_id"] == "abcd1234"
    assert "wrong-secret" not in json.dumps(record)
    logged = capsys.readouterr().err
    assert "authentication failed from 192.0.2.7 on GET /models" in logged and "wrong-secret" not in logged


def test_wrong_tokens_are_throttled_per_address_with_retry_after(tmp_path):
    app = make_app(tmp_path, auth_failure_limit=3, auth_failure_window_seconds=60)
    client = app.test_client()
    guesser, other = {"REMOTE_ADDR": "192.0.2.10"}, {"REMOTE_ADDR": "192.0.2.11"}
    for _ in range(3):
        assert client.get("/models", headers=bearer(WRONG_TOKEN), environ_base=guesser).status_code == 403
    throttled = client.get("/models", headers=bearer(WRONG_TOKEN), environ_base=guesser)
    assert throttled.status_code == 429 and 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert "too many failed authentications" in throttled.get_json()["error"]
    # the address waits even with the right token; other addresses and the probes do not
    assert client.get("/models", headers=bearer(TOKEN), environ_base=guesser).status_code == 429
    assert client.get("/models", headers=bearer(TOKEN), environ_base=other).status_code == 200
    assert client.get("/healthcheck", environ_base=guesser).status_code == 200


def test_wrong_secrets_for_one_user_id_are_throttled_from_any_address(tmp_path):
    app = make_app(tmp_path, auth_failure_limit=3)
    token = add_user(tmp_path / "jobs", "alice", "submitter")
    token_id = token.partition(".")[0]
    client = app.test_client()
    for n in range(3):
        answer = client.get("/models", headers=bearer(f"{token_id}.guess{n}"),
                            environ_base={"REMOTE_ADDR": f"198.51.100.{n}"})
        assert answer.status_code == 403
    throttled = client.get("/models", headers=bearer(f"{token_id}.guess9"),
                           environ_base={"REMOTE_ADDR": "198.51.100.99"})
    assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1


def test_an_unknown_user_id_costs_the_same_scrypt_as_a_known_one(tmp_path, monkeypatch):
    add_user(tmp_path / "jobs", "alice", "submitter")
    store = users_module.SqliteUsers(tmp_path / "jobs" / "jobs.sqlite3")
    authenticator = users_module.Authenticator(store)
    known_id = store.get("alice").token_id
    calls: list[str] = []
    real = users_module.hash_secret
    monkeypatch.setattr(users_module, "hash_secret", lambda secret, salt: calls.append(secret) or real(secret, salt))
    assert authenticator.user_for(f"{known_id}.wrong") is None
    assert authenticator.user_for("0123456789abcdef.wrong") is None
    assert calls == ["wrong", "wrong"]  # one scrypt each: the time does not tell which id exists


# -- file modes ------------------------------------------------------------------------------------
def test_stores_history_audit_and_job_folders_are_private(tmp_path):
    (tmp_path / "data").mkdir()
    write_study(tmp_path / "data" / "study", shape=(4, 16, 20))
    running = RunningServer({"INFERENCE_DATA_ROOT": str(tmp_path / "data"), "INFERENCE_ENABLE_MOCKS": "1",
                             "INFERENCE_OUTPUT_ROOT": str(tmp_path / "out" / "jobs")}, tmp_path)
    try:
        uid = requests.post(f"{running.url}/job/", json={"job_name": "3dblur", "in_dir": "study"},
                            timeout=30).json()["uid"]
        deadline = time.monotonic() + 60
        while requests.get(f"{running.url}/query/{uid}", timeout=30).status_code == 202 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        running.stop()
    created = list((tmp_path / "out").rglob("*"))
    assert any(p.name == "audit.jsonl" for p in created) and any(p.name == "jobs.sqlite3" for p in created)
    assert any(p.is_dir() and uid in p.name for p in created)
    public = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in [tmp_path / "out", *created]
              if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert not public, public


# -- what answers tell ------------------------------------------------------------------------------
def test_ping_tells_the_version_only_to_an_authenticated_client(tmp_path):
    from inference.radiomics.routes import server_version

    version = server_version().encode()
    assert version != b"inference-gateway", "the package is installed (pip install -e .): it has a version"
    app = make_app(tmp_path, radiomics_networks=("127.0.0.1/32",))  # the Radiomics door lets this network in
    client = app.test_client()
    anonymous = client.get("/api/ping")
    assert anonymous.status_code == 200 and b"inference-gateway" in anonymous.data and version not in anonymous.data
    elsewhere = {"REMOTE_ADDR": "192.0.2.20"}  # outside the network: it authenticates with the token
    assert version in client.get("/api/ping", headers=bearer(TOKEN), environ_base=elsewhere).data
    assert version not in client.get("/ping").data


def test_answers_name_no_server_path(tmp_path):
    app = make_app(tmp_path)
    client = app.test_client()
    missing = client.post("/job/", json={"job_name": "3dblur", "in_dir": "no-such-folder"}, headers=bearer(TOKEN))
    assert missing.status_code == 422 and str(tmp_path) not in missing.get_data(as_text=True)
    uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "study"}, headers=bearer(TOKEN)).get_json()["uid"]
    deadline = time.monotonic() + 60
    while (done := client.get(f"/query/{uid}", headers=bearer(TOKEN))).status_code == 202 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.status_code == 200 and str(tmp_path) not in done.get_data(as_text=True)
    assert done.get_json()["output_dir"] == uid and done.get_json()["files"] == f"/job/{uid}/files"
