"""Review before release through the job API (in process): a held result is served to nobody until a reviewer
accepts it; a rejection keeps it held for good; decisions are final and idempotent, need the reviewer role,
are audited with the reviewer's name and kept as feedback per model version. The DICOM node with Orthanc
and corrections: ``test_review_pacs.py``; the page in Chromium: ``test_review_page.py``."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest

from inference.audit import verify
from inference.config import Settings
from inference.errors import Conflict, NotFound
from inference.jobs.reviews import (
    ACCEPTED,
    AWAITING,
    REJECTED,
    RedisReviews,
    Review,
    SqliteReviews,
    is_flagged,
    must_hold,
    review_records,
)
from inference.storage.backend import backend_for
from tests.conftest import require, write_study
from tests.test_security import add_user, bearer

SC = "get-secondary-capture"


def test_what_is_held():
    assert must_hold("required", {}) and not must_hold(None, {"quality": {"flagged": True}})
    assert must_hold("flagged", {"quality": {"flagged": True, "reasons": ["low contrast"]}})
    assert not must_hold("flagged", {}), "no quality key: not flagged"
    assert not must_hold("flagged", {"quality": {"flagged": False}})
    assert not is_flagged({"quality": "flagged"})


def decisions_hold(store) -> None:
    store.hold(Review(uid="j1", command="c", mode="required", model={"family": "f", "version": "1"}))
    assert store.hold(Review(uid="j1", command="other", mode="flagged")).command == "c", "held once"
    review, new = store.decide("j1", ACCEPTED, "rita")
    assert (review.status, review.decided_by, new) == (ACCEPTED, "rita", True)
    review, new = store.decide("j1", ACCEPTED, "bob")
    assert (review.decided_by, new) == ("rita", False), "the same decision again changes nothing"
    with pytest.raises(Conflict, match="already accepted by rita"):
        store.decide("j1", REJECTED, "bob", reason="no")
    with pytest.raises(NotFound):
        store.decide("nope", ACCEPTED, "rita")
    assert [r.uid for r in store.all()] == ["j1"]


def test_decisions_are_final_in_sqlite(tmp_path):
    decisions_hold(SqliteReviews(tmp_path / "jobs.sqlite3"))


def test_decisions_are_final_in_redis_beside_the_jobs(redis_url):
    from inference.jobs.redis_store import RedisJobStore
    from inference.jobs.store import Job

    jobs = RedisJobStore(redis_url)
    reviews = review_records(backend_for(dataclasses.replace(Settings(), job_backend="celery", broker_url=redis_url)))
    assert isinstance(reviews, RedisReviews), "the celery backend's reviews are in its Redis"
    decisions_hold(reviews)
    job = jobs.add(Job(job_name=SC, command=SC, in_dir="study", review="flagged"))
    assert jobs.get(job.uid).review == "flagged"
    assert jobs.count_by_status() == {"queued": 1}, "review records are not taken for jobs"


@pytest.fixture
def redis_url(tmp_path):
    require(None if shutil.which("redis-server") else "needs redis-server (Debian package redis-server)")
    from bench.job_backend import RedisServer

    server = RedisServer(tmp_path)
    yield server.url
    server.stop()


@pytest.fixture
def app_and_tokens(tmp_path):
    import server

    root = tmp_path
    (root / "data").mkdir()
    write_study(root / "data" / "study")
    tokens = {name: add_user(root / "jobs", name, role)
              for name, role in (("sam", "submitter"), ("rita", "reviewer"), ("ada", "admin"))}
    settings = dataclasses.replace(Settings(), enable_mocks=True, data_root=root / "data", output_root=root / "jobs",
                                   review_overdue_seconds=3600)
    app = server.create_app(settings=settings)
    return app, tokens, root


def submit(client, token: str, review: str | None = "required") -> str:
    body = {"job_name": SC, "in_dir": "study", **({"review": review} if review else {})}
    response = client.post("/job/", json=body, headers=bearer(token))
    assert response.status_code == 201, response.get_json()
    uid = response.get_json()["uid"]
    deadline = time.monotonic() + 60
    while client.get(f"/query/{uid}", headers=bearer(token)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
    return uid


def test_a_held_job_is_released_only_when_accepted(app_and_tokens):
    app, tokens, root = app_and_tokens
    client = app.test_client()
    sam, rita, ada = (bearer(tokens[n]) for n in ("sam", "rita", "ada"))
    uid = submit(client, tokens["sam"])
    answer = client.get(f"/query/{uid}", headers=sam).get_json()
    assert answer["review"] == AWAITING
    refused = client.get(f"/job/{uid}/files", headers=sam)
    assert refused.status_code == 409 and "awaiting review" in refused.get_json()["error"]

    # a submitter sees no queue and decides nothing; nor reads the audit trail
    for method, path in (("get", "/reviews"), ("get", f"/reviews/{uid}"), ("post", f"/reviews/{uid}/accept"),
                         ("get", "/audit")):
        response = getattr(client, method)(path, headers=sam)
        assert response.status_code == 403, (path, response.get_json())

    queue = client.get("/reviews", headers=rita).get_json()
    assert [r["uid"] for r in queue["reviews"]] == [uid] and queue["awaiting"] == 1 and queue["overdue"] == 0
    shown = client.get(f"/reviews/{uid}", headers=rita).get_json()
    assert shown["review"]["status"] == AWAITING and shown["images"], shown
    png = client.get(shown["images"][0], headers=rita)
    assert png.status_code == 200 and png.data.startswith(b"\x89PNG")

    accepted = client.post(f"/reviews/{uid}/accept", headers=rita).get_json()
    assert accepted["review"]["status"] == ACCEPTED and accepted["new"] is True
    assert client.post(f"/reviews/{uid}/accept", headers=ada).get_json()["new"] is False, "idempotent"
    conflict = client.post(f"/reviews/{uid}/reject", json={"reason": "late"}, headers=ada)
    assert conflict.status_code == 409
    files = client.get(f"/job/{uid}/files", headers=sam)
    assert files.status_code == 200 and files.get_json()["files"]
    assert client.get("/reviews", headers=rita).get_json()["reviews"] == []

    records = client.get("/audit?user=rita", headers=ada).get_json()["records"]
    events = [r["event"] for r in records]
    assert "result-viewed" in events and events.count("result-accepted") == 1
    held = [r for r in client.get("/audit", headers=ada).get_json()["records"] if r["event"] == "result-held"]
    assert [(r["user"], r["detail"]["job"]) for r in held] == [("sam", uid)]
    refused_records = [r for r in client.get("/audit?user=sam", headers=ada).get_json()["records"]
                       if r["outcome"] == "refused"]
    assert {r["detail"]["path"] for r in refused_records} >= {"/reviews", f"/reviews/{uid}/accept", "/audit"}
    assert verify(root / "jobs" / "audit.jsonl")[1] is None


def test_a_rejected_job_is_never_released_and_overdue_ones_are_reported(app_and_tokens):
    app, tokens, root = app_and_tokens
    client = app.test_client()
    sam, rita = bearer(tokens["sam"]), bearer(tokens["rita"])
    uid = submit(client, tokens["sam"])
    assert client.post(f"/reviews/{uid}/reject", json={}, headers=rita).status_code == 400, "a reason is needed"
    rejected = client.post(f"/reviews/{uid}/reject", json={"reason": "wrong series"}, headers=rita).get_json()
    assert (rejected["review"]["status"], rejected["review"]["reason"]) == (REJECTED, "wrong series")
    assert client.post(f"/reviews/{uid}/accept", headers=rita).status_code == 409
    assert client.get(f"/job/{uid}/files", headers=sam).status_code == 409
    assert client.post(f"/reviews/{uid}/correct", data=b"x", content_type="application/dicom",
                       headers=rita).status_code == 409

    late = submit(client, tokens["sam"])
    # a result held longer than INFERENCE_REVIEW_OVERDUE_SECONDS (3600 here): reported, never released
    store = SqliteReviews(root / "jobs" / "jobs.sqlite3")
    with store._connect(write=True) as db:
        record = json.loads(db.execute("SELECT record FROM reviews WHERE uid = ?", (late,)).fetchone()[0])
        record["held"] -= 7200
        db.execute("UPDATE reviews SET record = ?, held = ? WHERE uid = ?", (json.dumps(record), record["held"], late))
    queue = client.get("/reviews", headers=rita).get_json()
    assert queue["overdue"] == 1 and [r["overdue"] for r in queue["reviews"]] == [True]
    metrics = client.get("/metrics", headers=bearer(tokens["ada"])).get_data(as_text=True)
    assert "inference_reviews_awaiting 1.0" in metrics and "inference_reviews_overdue 1.0" in metrics
    assert client.get(f"/job/{late}/files", headers=sam).status_code == 409, "overdue is never released silently"


def test_a_request_asking_for_review_is_held_as_a_job(app_and_tokens):
    from inference.protocol.client import build_multipart_request

    app, tokens, root = app_and_tokens
    client = app.test_client()
    sam, rita = bearer(tokens["sam"]), bearer(tokens["rita"])
    held = client.post("/", json={"studyPath": "study", "inference_command": SC, "review": "required"}, headers=sam)
    assert held.status_code == 202, held.get_json()
    uid = held.get_json()["uid"]
    assert held.headers["Location"] == f"/query/{uid}"
    assert client.get(f"/query/{uid}", headers=sam).get_json()["review"] == AWAITING
    assert client.get(f"/job/{uid}/files", headers=sam).status_code == 409
    shown = client.get(f"/reviews/{uid}", headers=rita).get_json()
    assert shown["review"]["submitter"] == "sam" and shown["images"]
    assert client.post(f"/reviews/{uid}/accept", headers=rita).status_code == 200
    assert client.get(f"/job/{uid}/files", headers=sam).status_code == 200

    # an upload too (its instances kept beside the result for a correction's checks)
    files = sorted((root / "data" / "study").iterdir())
    encoder = build_multipart_request({"inference_command": SC, "review": "required"}, files)
    uploaded = client.post("/", data=encoder.to_string(), content_type=encoder.content_type, headers=sam)
    assert uploaded.status_code == 202
    kept = root / "jobs" / uploaded.get_json()["uid"] / "input"
    assert len(list(kept.iterdir())) == len(files)

    # "flagged": a result without a quality flag is answered as usual
    plain = client.post("/", json={"studyPath": "study", "inference_command": SC, "review": "flagged"}, headers=sam)
    assert plain.status_code == 200 and plain.mimetype == "multipart/related"
    bad = client.post("/", json={"studyPath": "study", "inference_command": SC, "review": "later"}, headers=sam)
    assert bad.status_code == 400 and "review must be one of required, flagged" in bad.get_json()["error"]
    assert client.post("/job/", json={"job_name": SC, "in_dir": "study", "review": "yes"},
                       headers=sam).status_code == 400
