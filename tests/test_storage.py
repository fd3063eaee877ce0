"""The storage layer's contract, one suite per store run on both backends (SQLite files, a real redis-server):
what a store promises does not depend on where it keeps its records. Also: records of a later release (a field
this one does not know) still load, and a store at another schema version is refused with one line naming
``inference-migrate``."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3

import pytest

from inference.config import Settings
from inference.errors import Conflict, NotFound
from inference.jobs.redis_store import KEY_PREFIX, RedisJobStore
from inference.jobs.reviews import ACCEPTED, CORRECTED, REJECTED, RedisReviews, Review, review_records
from inference.jobs.store import COMPLETED, FAILED, QUEUED, RUNNING, Job, JobStore
from inference.radiomics.records import FEEDBACK, TELEMETRY, RedisRadiomicsRecords, Segmentation, radiomics_records
from inference.storage.backend import REDIS, Backend, checked_backend
from inference.storage.migrations import JOBS, RADIOMICS, SCHEMA_KEY, StoreVersionError, migrate_sqlite, open_sqlite
from inference.users import Authenticator, RedisUsers, new_user, user_store
from tests.conftest import require


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> Backend:
    """A checked backend of each kind on a fresh folder / a fresh redis-server."""
    settings = dataclasses.replace(Settings(), output_root=tmp_path / "jobs")
    if request.param == "redis":
        require(None if shutil.which("redis-server") else "needs redis-server (Debian package redis-server)")
        from bench.job_backend import RedisServer

        server = RedisServer(tmp_path)
        request.addfinalizer(server.stop)
        settings = dataclasses.replace(settings, job_backend="celery", broker_url=server.url)
    return checked_backend(settings)


def job_records(backend: Backend) -> JobStore | RedisJobStore:
    return RedisJobStore(backend.url) if backend.kind == REDIS else JobStore(backend.folder / "jobs.sqlite3")


# -- jobs ------------------------------------------------------------------------------------------------
def test_jobs_keep_every_field_and_change_state_only_from_the_states_allowed(backend):
    store = job_records(backend)
    job = store.add(Job("3dblur", "gaussian-blur-3d", "s", params={"sigma_mm": 2.0, "list": [1, 2]}, owner="o",
                        user="alice", study_uid="1.2.3", review="flagged", spool=True))
    assert store.get(job.uid) == job and store.get("nope") is None
    assert store.mark_running(job.uid, worker="w1") and not store.mark_running(job.uid, worker="w2"), \
        "queued -> running once, on either backend"
    running = store.get(job.uid)
    assert (running.status, running.worker, running.attempts) == (RUNNING, "w1", 1)
    assert store.mark_completed(job.uid, "/out") and not store.mark_failed(job.uid, "late", 500)
    assert (store.get(job.uid).status, store.get(job.uid).output_dir) == (COMPLETED, "/out")
    other = store.add(Job("3dblur", "gaussian-blur-3d", "t"))
    assert store.mark_failed(other.uid, "bad input", 422) and store.get(other.uid).error_status == 422
    store.add(Job("3dblur", "gaussian-blur-3d", "u"))
    assert store.count_by_status() == {COMPLETED: 1, FAILED: 1, QUEUED: 1}
    store.remove(other.uid)
    assert store.get(other.uid) is None


def test_a_job_written_by_a_later_release_with_a_field_unknown_here_still_loads(backend):
    store = job_records(backend)
    job = store.add(Job("3dblur", "gaussian-blur-3d", "s"))
    if backend.kind == REDIS:
        backend.redis.hset(KEY_PREFIX + job.uid, "incomplete_reason", json.dumps("a series never arrived"))
    else:
        with sqlite3.connect(store.path) as db:
            db.execute("ALTER TABLE jobs ADD COLUMN incomplete_reason TEXT")
        db.close()
    assert store.get(job.uid) == job


# -- reviews ---------------------------------------------------------------------------------------------
def test_reviews_are_held_once_and_decided_once(backend):
    reviews = review_records(backend)
    correction = {"files": ["correction/corrected_seg.dcm"], "structures": {"Anterior": {"dice": 0.9}}}
    held = reviews.hold(Review(uid="j1", command="c", mode="required", study_uid="1.2", input_hash="ab" * 32,
                               flagged=True, model={"family": "f", "version": "1", "sha256": "cd" * 32},
                               submitter="alice", node=True))
    assert reviews.hold(Review(uid="j1", command="other", mode="flagged")) == held, "held once"
    reviews.hold(Review(uid="j2", command="c", mode="required", held=held.held + 1))
    assert reviews.get("j1") == held and reviews.get("nope") is None
    decided, new = reviews.decide("j1", CORRECTED, "rita", correction=correction)
    assert new and reviews.get("j1") == decided and decided.correction == correction
    assert reviews.decide("j1", CORRECTED, "bob") == (decided, False), "the same decision again changes nothing"
    with pytest.raises(Conflict, match="already corrected by rita"):
        reviews.decide("j1", REJECTED, "bob", reason="no")
    with pytest.raises(NotFound):
        reviews.decide("nope", ACCEPTED, "rita")
    assert [r.uid for r in reviews.all()] == ["j1", "j2"], "oldest first"


def test_a_review_written_by_a_later_release_with_a_field_unknown_here_still_loads(backend):
    reviews = review_records(backend)
    review = reviews.hold(Review(uid="j1", command="c", mode="required"))
    record = json.dumps({**review.to_json(), "report_id": "r-1"})
    if isinstance(reviews, RedisReviews):
        backend.redis.set(RedisReviews.PREFIX + "j1", record)
    else:
        with sqlite3.connect(backend.folder / "jobs.sqlite3") as db:
            db.execute("UPDATE reviews SET record = ? WHERE uid = 'j1'", (record,))
        db.close()
    assert reviews.get("j1") == review and reviews.all() == [review]
    assert reviews.decide("j1", ACCEPTED, "rita")[1]


# -- users -----------------------------------------------------------------------------------------------
def test_users_are_added_found_by_token_and_revoked(backend):
    users = user_store(backend)
    assert not users.any_users()
    rita, token = new_user("rita", "reviewer")
    users.add(rita)
    with pytest.raises(ValueError, match="already exists"):
        users.add(new_user("rita", "admin")[0])
    assert users.get("rita") == rita and users.by_token_id(rita.token_id) == rita and users.get("nope") is None
    assert Authenticator(users).user_for(token) == rita and Authenticator(users).user_for(token + "x") is None
    users.add(new_user("ada", "admin")[0])
    assert [u.name for u in users.all()] == ["ada", "rita"] and users.any_users()
    assert users.revoke("rita") and not users.revoke("rita")
    assert users.get("rita").revoked is not None and Authenticator(users).user_for(token) is None


def test_a_user_written_by_a_later_release_with_a_field_unknown_here_still_loads(backend):
    users = user_store(backend)
    rita, _ = new_user("rita", "reviewer")
    users.add(rita)
    if isinstance(users, RedisUsers):
        backend.redis.hset(RedisUsers.PREFIX + "rita", "email", "rita@example.org")
    else:
        with sqlite3.connect(backend.folder / "jobs.sqlite3") as db:
            db.execute("ALTER TABLE users ADD COLUMN email TEXT")
        db.close()
    assert users.get("rita") == rita and users.all() == [rita]


# -- Radiomics records -----------------------------------------------------------------------------------
def test_radiomics_records_keep_segmentations_and_entries_in_order(backend):
    records = radiomics_records(backend)
    first = Segmentation("u1", "m", "hippocampus", "1.0", "ab" * 32, received=100.0)
    second = Segmentation("u2", "m", "hippocampus", "1.0", "cd" * 32, received=200.0, error_code=3, error="no")
    records.add_segmentation(first)
    records.add_segmentation(second)
    assert records.segmentation("u2") == second and records.segmentation("nope") is None
    assert records.segmentations_before(200.0) == ["u1"]
    records.remove_segmentation("u1")
    assert records.segmentation("u1") is None and records.segmentations_before(300.0) == ["u2"]
    for number in range(3):
        records.add_entry(FEEDBACK, {"n": number, "message": {"SegmentationAccepted": True}})
    records.add_entry(TELEMETRY, {"n": 9})
    assert [e["n"] for e in records.entries(FEEDBACK)] == [0, 1, 2] and records.entries(TELEMETRY) == [{"n": 9}]


def test_a_segmentation_written_by_a_later_release_with_a_field_unknown_here_still_loads(backend):
    records = radiomics_records(backend)
    record = Segmentation("u1", "m", "hippocampus", "1.0", "ab" * 32, received=100.0)
    records.add_segmentation(record)
    changed = json.dumps({**record.to_json(), "series_uid": "1.2.3"})
    if isinstance(records, RedisRadiomicsRecords):
        backend.redis.set(f"{RedisRadiomicsRecords.PREFIX}segmentation:u1", changed)
    else:
        with sqlite3.connect(backend.folder / "radiomics.sqlite3") as db:
            db.execute("UPDATE segmentations SET record = ? WHERE uid = 'u1'", (changed,))
        db.close()
    assert records.segmentation("u1") == record


# -- schema versions -------------------------------------------------------------------------------------
def test_a_new_store_is_created_at_the_latest_version_and_a_newer_one_is_refused(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == JOBS.version
        db.execute(f"PRAGMA user_version = {JOBS.version + 1}")
    db.close()
    with pytest.raises(StoreVersionError, match="newer than this release's"):
        JobStore(path)
    with pytest.raises(StoreVersionError, match="newer than this release's"):
        migrate_sqlite(path, JOBS)


def test_a_migration_is_all_or_nothing(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # a file of the releases before versions, holding a job
        db.execute("CREATE TABLE jobs (uid TEXT PRIMARY KEY, job_name TEXT NOT NULL, command TEXT NOT NULL, "
                   "in_dir TEXT NOT NULL, params TEXT NOT NULL, status TEXT NOT NULL, owner TEXT, error TEXT, "
                   "error_status INTEGER, output_dir TEXT, created REAL NOT NULL, updated REAL NOT NULL)")
    db.close()

    def half_done(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE reviews (uid TEXT PRIMARY KEY)")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        migrate_sqlite(path, dataclasses.replace(JOBS, steps=[half_done]))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'reviews'").fetchone() is None
    db.close()


def test_redis_keys_sit_under_the_versioned_prefix_with_the_schema_version(backend):
    if backend.kind != REDIS:
        pytest.skip("the Redis layout")
    store = job_records(backend)
    job = store.add(Job("3dblur", "gaussian-blur-3d", "s"))
    user_store(backend).add(new_user("rita", "reviewer")[0])
    keys = {key.decode() for key in backend.redis.scan_iter(match="inference:*")}
    assert f"inference:v1:job:{job.uid}" in keys and "inference:v1:user:rita" in keys
    assert keys - {SCHEMA_KEY} == {k for k in keys if k.startswith("inference:v1:")}
    assert backend.redis.get(SCHEMA_KEY) == b"1"
    backend.redis.set(SCHEMA_KEY, 2)
    with pytest.raises(StoreVersionError, match="version 2, newer"):
        backend.check()


def test_opening_does_not_create_tables_in_a_file_of_an_older_release(tmp_path):
    path = tmp_path / "radiomics.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE segmentations (uid TEXT PRIMARY KEY, received REAL NOT NULL, record TEXT NOT NULL)")
    db.close()
    with pytest.raises(StoreVersionError, match="run `inference-migrate`"):
        open_sqlite(path, RADIOMICS)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'entries'").fetchone() is None
    db.close()


# -- the result history ----------------------------------------------------------------------------------
def test_the_history_keeps_a_patients_results_one_per_study_and_version(backend):
    from handlers.hippocampus.history import ResultHistory, history_rows
    from inference.pacs.priors import Patient, PriorResult

    history = ResultHistory(history_rows(backend))
    alice, other = Patient("P-1", "HOSP", "19500101"), Patient("P-2")
    history.record(alice, PriorResult("1.1", "20230101", "hippocampus", "1.0", {"Anterior": 1800.0}))
    history.record(alice, PriorResult("1.1", "20230101", "hippocampus", "1.0", {"Anterior": 1790.0}))  # again
    history.record(alice, PriorResult("1.2", "20240101", "hippocampus", "1.1", {"Anterior": 1750.5}))
    history.record(other, PriorResult("2.1", "20220101", "hippocampus", "1.0", {"Anterior": 2000.0}))
    found = sorted(history.earlier(alice, "9.9"), key=lambda result: result.study_uid)
    assert [(r.study_uid, r.version, r.volumes_mm3) for r in found] == [
        ("1.1", "1.0", {"Anterior": 1790.0}), ("1.2", "1.1", {"Anterior": 1750.5})], "one row per study and version"
    assert [r.study_uid for r in history.earlier(alice, "1.2")] == ["1.1"], "not the study itself"
    assert history.earlier(Patient("P-1", "HOSP", "19600101"), "9.9") == [], "another birth date: another patient"
    rows = history_rows(backend)
    assert rows.update("1.1", "hippocampus", "1.0", {"study_date": "20230102"})
    assert not rows.update("nope", "hippocampus", "1.0", {"study_date": "x"})
    with pytest.raises(ValueError, match="no column"):
        rows.update("1.1", "hippocampus", "1.0", {"nonsense": 1})


def test_a_history_row_of_a_later_release_with_a_column_unknown_here_still_loads(backend):
    from handlers.hippocampus.history import ResultHistory, history_rows
    from inference.pacs.priors import Patient, PriorResult
    from inference.storage.history import RedisHistoryRows

    history = ResultHistory(history_rows(backend))
    patient = Patient("P-1")
    history.record(patient, PriorResult("1.1", "20230101", "hippocampus", "1.0", {"Anterior": 1800.0}))
    if backend.kind == REDIS:
        key = RedisHistoryRows.ROW + json.dumps(["1.1", "hippocampus", "1.0"])
        backend.redis.set(key, json.dumps({**json.loads(backend.redis.get(key)), "scanner": "x"}))
    else:
        with sqlite3.connect(backend.history_path) as db:
            db.execute("ALTER TABLE results ADD COLUMN scanner TEXT")
        db.close()
    assert [r.volumes_mm3 for r in history.earlier(patient, "9")] == [{"Anterior": 1800.0}]


def test_the_celery_backend_refuses_a_history_file_not_yet_in_redis(backend, tmp_path):
    if backend.kind != REDIS:
        pytest.skip("the celery backend's history is in Redis")
    from inference.storage.history import SqliteHistoryRows

    SqliteHistoryRows(backend.history_path).put({"patient_id": "P", "issuer": "", "birth_date": "", "study_uid": "1",
                                                 "study_date": "20200101", "family": "f", "version": "1",
                                                 "volumes": "{}", "recorded": "now"})
    with pytest.raises(StoreVersionError, match="not in Redis yet.*run `inference-migrate`"):
        backend.check()
    assert backend.migrate()[-1].startswith(f"result history {backend.history_path}: 1 results copied to Redis")
    backend.check()
    assert not backend.history_path.exists()
