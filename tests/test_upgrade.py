"""Upgrades keep data: the stores written by the release before the storage layer (``tests/upgrade/release-125255a``,
made once by ``tests/upgrade/make_release_stores.py`` on that commit's code) are refused as they are, with one
line naming ``inference-migrate``, and after it every job, user (their tokens still valid), review decision,
feedback record and history entry comes through; per store, on both backends."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from handlers.hippocampus.history import history_rows, result_history
from inference.config import Settings
from inference.jobs.redis_store import RedisJobStore
from inference.jobs.reviews import review_records
from inference.jobs.store import JobStore, job_fields
from inference.pacs.priors import Patient
from inference.radiomics.records import FEEDBACK, TELEMETRY, radiomics_records
from inference.review.feedback import DECISION
from inference.storage.backend import REDIS, Backend, backend_for, checked_backend
from inference.users import Authenticator, user_store
from tests.conftest import PROJECT_ROOT, require

RELEASE = PROJECT_ROOT / "tests" / "upgrade" / "release-125255a"
EXPECTED = json.loads((RELEASE / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(params=["sqlite", "redis"])
def old_stores(request, tmp_path) -> tuple[Settings, dict]:
    """Settings whose stores are the old release's files (and its Redis dump, loaded by a redis-server)."""
    output = tmp_path / "jobs"
    output.mkdir()
    for name in ("jobs.sqlite3", "radiomics.sqlite3", "history.sqlite3"):
        shutil.copy(RELEASE / name, output / name)
    settings = dataclasses.replace(Settings(), output_root=output)
    if request.param == "redis":
        require(None if shutil.which("redis-server") else "needs redis-server (Debian package redis-server)")
        from bench.job_backend import RedisServer

        folder = tmp_path / "redis"
        folder.mkdir()
        shutil.copy(RELEASE / "redis.rdb", folder / "dump.rdb")  # loaded at start-up
        server = RedisServer(folder)
        request.addfinalizer(server.stop)
        settings = dataclasses.replace(settings, job_backend="celery", broker_url=server.url)
    return settings, EXPECTED[request.param]


def migrated(settings: Settings) -> Backend:
    """The backend of ``settings`` once ``inference-migrate`` ran, after the API refused to start on it."""
    with pytest.raises(SystemExit) as refused:
        checked_backend(settings)
    message = str(refused.value)
    assert "\n" not in message and re.search(r"schema version 0, this release needs [12]\b", message), message
    assert "run `inference-migrate`" in message
    backend = backend_for(settings)
    done = backend.migrate()
    versions = [line for line in done if "version" in line]
    assert versions and all(re.search(r"version 0 -> [12]$", line) for line in versions), done
    if backend.kind == REDIS:  # the celery backend's history moves from this machine's file into Redis
        assert f"{len(EXPECTED['history'])} results copied to Redis" in done[-1], done
    again = [re.sub(r"version 0 -> (\d)", r"version \1 -> \1", line) for line in versions]
    assert backend.migrate() == again, "a second run: nothing"
    backend.check()
    return backend


def test_every_job_comes_through(old_stores):
    settings, expected = old_stores
    backend = migrated(settings)
    jobs = RedisJobStore(backend.url) if backend.kind == REDIS else JobStore(backend.folder / "jobs.sqlite3")
    assert [job_fields(jobs.get(job["uid"])) for job in expected["jobs"]] == expected["jobs"]
    assert jobs.count_by_status() == {"completed": 4, "failed": 1, "running": 1}
    running = next(job for job in expected["jobs"] if job["status"] == "running")
    assert jobs.mark_completed(running["uid"], "/out/x"), "old records change state as new ones do"


def test_every_review_decision_comes_through(old_stores):
    settings, expected = old_stores
    reviews = review_records(migrated(settings))
    assert [review.to_json() for review in reviews.all()] == expected["reviews"]
    assert {r["status"] for r in expected["reviews"]} == {"accepted", "rejected", "corrected"}


def test_every_user_comes_through_and_their_tokens_still_work(old_stores):
    settings, expected = old_stores
    users = user_store(migrated(settings))
    assert [dataclasses.asdict(user) for user in users.all()] == expected["users"]
    authenticator = Authenticator(users)
    for name, token in expected["tokens"].items():
        found = authenticator.user_for(token)
        assert (found.name if found else None) == (None if name == "gone" else name), name


def test_every_feedback_record_and_decision_entry_comes_through(old_stores):
    settings, expected = old_stores
    records = radiomics_records(migrated(settings))
    assert [records.segmentation(s["uid"]).to_json() for s in expected["segmentations"]] == expected["segmentations"]
    for kind in (FEEDBACK, TELEMETRY, DECISION):
        assert records.entries(kind) == expected["entries"][kind], kind


def test_every_history_entry_comes_through(old_stores):
    settings, _ = old_stores
    backend = migrated(settings)
    # the old release's rows, with the columns added since (issue 37) unknown: flag, reasons, review, correction
    rows = [{**row, "flagged": None, "flag_reasons": None, "review": None, "corrected_volumes": None}
            for row in EXPECTED["history"]]
    stored = history_rows(backend)
    for patient_id, issuer in {(row["patient_id"], row["issuer"]) for row in rows}:
        assert sorted(stored.of_patient(patient_id, issuer, ""), key=lambda row: row["study_uid"]) == [
            row for row in rows if (row["patient_id"], row["issuer"]) == (patient_id, issuer)]
    first = Patient("P-1", "HOSP", "19500101")
    earlier = sorted(result_history(settings).earlier(first, "9"), key=lambda prior: prior.study_uid)
    assert [(p.study_uid, p.version, p.volumes_mm3, p.flagged, p.review) for p in earlier] == [
        (row["study_uid"], row["version"], json.loads(row["volumes"]), None, None)
        for row in rows if row["patient_id"] == "P-1"], "old results: volumes kept, flag unknown, not reviewed"


def test_the_migrate_console_script_migrates_the_stores_of_the_settings(tmp_path):
    output = tmp_path / "jobs"
    output.mkdir()
    for name in ("jobs.sqlite3", "radiomics.sqlite3", "history.sqlite3"):
        shutil.copy(RELEASE / name, output / name)
    env = {**os.environ, "INFERENCE_OUTPUT_ROOT": str(output), "INFERENCE_JOB_BACKEND": "local"}
    env.pop("INFERENCE_HISTORY_DB", None)
    script = Path(sys.executable).parent / "inference-migrate"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "inference.storage"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("version 0 -> 1") == 2 and done.stdout.count("version 0 -> 2") == 1, done.stdout
    JobStore(output / "jobs.sqlite3")  # opens: no refusal


def test_the_api_refuses_to_start_on_an_old_store_naming_the_command(tmp_path):
    import server

    output = tmp_path / "jobs"
    output.mkdir()
    shutil.copy(RELEASE / "jobs.sqlite3", output / "jobs.sqlite3")
    with pytest.raises(SystemExit, match=r"job store .* is at schema version 0, .*run `inference-migrate`"):
        server.create_app(settings=dataclasses.replace(Settings(), output_root=output))


def test_the_dicom_node_refuses_to_start_on_an_old_store_naming_the_command(tmp_path):
    output = tmp_path / "jobs"
    output.mkdir()
    shutil.copy(RELEASE / "jobs.sqlite3", output / "jobs.sqlite3")
    (tmp_path / "rules.yaml").write_text("rules: [{command: get-secondary-capture}]")
    result = subprocess.run([sys.executable, "dicom_node.py", "--rules", str(tmp_path / "rules.yaml"),
                             "--root", str(tmp_path / "pacs")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "INFERENCE_OUTPUT_ROOT": str(output),
                                              "INFERENCE_JOB_BACKEND": "local"})
    assert result.returncode == 2, result.stderr
    assert re.search(r"dicom_node: the job store .* is at schema version 0, .*run `inference-migrate`", result.stderr)


def test_a_worker_refuses_to_start_on_an_old_redis_naming_the_command(tmp_path):
    require(None if shutil.which("redis-server") else "needs redis-server (Debian package redis-server)")
    from bench.job_backend import CeleryWorker, RedisServer

    folder = tmp_path / "redis"
    folder.mkdir()
    shutil.copy(RELEASE / "redis.rdb", folder / "dump.rdb")
    server = RedisServer(folder)
    data, output = tmp_path / "data", tmp_path / "jobs"
    data.mkdir()
    output.mkdir()
    worker = CeleryWorker("old@test", {"INFERENCE_BROKER_URL": server.url, "INFERENCE_DATA_ROOT": str(data),
                                       "INFERENCE_OUTPUT_ROOT": str(output), "INFERENCE_JOB_BACKEND": "celery"},
                          tmp_path)
    try:
        assert worker.process.wait(120) == 2
    finally:
        worker.stop()
        server.stop()
    assert re.search(r"worker not started: the Redis store at .* is at schema version 0, .*run `inference-migrate`",
                     worker.log()), worker.log()
