"""Write the stores of the release before the storage layer (main at 125255a), for the upgrade tests.

Run once, from a checkout of that commit (its code, this project's .venv), with a folder to write to:

    git archive 125255a | tar -x -C /tmp/release && cd /tmp/release
    cp <repo>/tests/upgrade/make_release_stores.py .
    <repo>/.venv/bin/python make_release_stores.py <repo>/tests/upgrade/release-125255a

It writes what that release's own classes write: ``jobs.sqlite3`` (jobs, reviews, users),
``radiomics.sqlite3`` (segmentations, feedback, telemetry, review decisions), ``history.sqlite3``
(the hippocampus result history, SQLite only then), ``redis.rdb`` (a redis-server's dump of the same
jobs, reviews, users and records through the Redis classes) and ``expected.json``: every record as
that release read it back, the users' tokens, and the history's rows. Kept under tests/, never rerun
by the tests: the point is that they are the old release's bytes.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.job_backend import RedisServer
from handlers.hippocampus.history import ResultHistory
from inference.jobs.redis_store import RedisJobStore
from inference.jobs.reviews import ACCEPTED, CORRECTED, REJECTED, RedisReviews, Review, SqliteReviews
from inference.jobs.store import Job, JobStore
from inference.pacs.priors import Patient, PriorResult
from inference.radiomics.records import (
    FEEDBACK,
    TELEMETRY,
    RedisRadiomicsRecords,
    Segmentation,
    SqliteRadiomicsRecords,
)
from inference.review.feedback import DECISION, decision_entry
from inference.users import Authenticator, RedisUsers, SqliteUsers, new_user

MODEL = {"family": "hippocampus", "version": "1.0", "sha256": "ab" * 32}


def fill(jobs, reviews, users, records) -> dict:
    """The same records written through one backend's classes; what that release reads back."""
    made = [
        Job("3dblur", "gaussian-blur-3d", "study1", params={"sigma_mm": 2.0}, owner="1-a", user="alice",
            study_uid="1.2.3.1"),
        Job("hippocampus", "get-hippocampus-volume", "study2", params={"model_version": "1.0"}, owner="1-a",
            study_uid="1.2.3.2", review="required"),
        Job("hippocampus", "get-hippocampus-volume", "study3", owner="1-a", user="rita", review="flagged"),
        Job("3dblur", "gaussian-blur-3d", "study4", spool=True, study_uid="1.2.3.4"),
        Job("3dblur", "gaussian-blur-3d", "study5", params={"sigma_mm": 1.0}, owner="1-b"),
        Job("hippocampus", "get-hippocampus-volume", "study6", review="required", study_uid="1.2.3.6"),
    ]
    for job in made:
        jobs.add(job)
    jobs.mark_running(made[0].uid, worker="1-a")
    jobs.mark_completed(made[0].uid, f"/out/{made[0].uid}")
    for job in made[1:3] + made[5:]:
        jobs.mark_running(job.uid, worker="1-a")
        jobs.mark_completed(job.uid, f"/out/{job.uid}")
    jobs.mark_running(made[3].uid, worker="node-1")
    jobs.mark_failed(made[3].uid, "the study has no DICOM files", 422)
    jobs.mark_running(made[4].uid, worker="1-b")  # left running

    held = [reviews.hold(Review(uid=job.uid, command=job.command, mode=str(job.review), study_uid=job.study_uid,
                                input_hash=f"{index:064x}", flagged=index == 1, model=MODEL, submitter=job.user,
                                node=job.spool))
            for index, job in enumerate((made[1], made[2], made[5]))]
    reviews.decide(held[0].uid, ACCEPTED, "rita")
    reviews.decide(held[1].uid, REJECTED, "rita", reason="motion artefacts")
    correction = {"files": ["correction/corrected_seg.dcm", "correction/corrected_sr.dcm"],
                  "structures": {"Anterior": {"dice": 0.91, "volume_change_mm3": -12.5}},
                  "mean_dice": 0.91, "seg_series_uid": "1.2.9.1", "sr_series_uid": "1.2.9.2"}
    reviews.decide(held[2].uid, CORRECTED, "ada", correction=correction)

    tokens = {}
    for name, role in (("alice", "submitter"), ("rita", "reviewer"), ("ada", "admin"), ("gone", "submitter")):
        user, token = new_user(name, role)
        users.add(user)
        tokens[name] = token
    users.revoke("gone")
    assert Authenticator(users).user_for(tokens["rita"]) is not None

    segmentations = [Segmentation(f"0000000{n}-0000-4000-8000-00000000000{n}", "hippocampus-1.0", "hippocampus",
                                  "1.0", f"{n:064x}", received=1_700_000_000.0 + n) for n in range(1, 4)]
    segmentations[2].error_code, segmentations[2].error = 3, "the input's ChannelIDs must be the model's"
    for record in segmentations:
        records.add_segmentation(record)
    records.add_entry(FEEDBACK, {"received": 1_700_000_100.0, "segmentation_id": segmentations[0].uid,
                                 "model_id": "hippocampus-1.0", "family": "hippocampus", "model_version": "1.0",
                                 "input_hash": segmentations[0].input_hash,
                                 "message": {"SegmentationID": segmentations[0].uid, "SegmentationAccepted": True}})
    records.add_entry(TELEMETRY, {"received": 1_700_000_200.0, "segmentation_id": segmentations[1].uid,
                                  "model_id": "hippocampus-1.0", "family": None, "model_version": None,
                                  "input_hash": None, "message": {"ModelID": "hippocampus-1.0"}})
    for review in reviews.all():
        if review.status != "awaiting review":
            records.add_entry(DECISION, decision_entry(review))
    return {
        "jobs": [dataclasses.asdict(jobs.get(job.uid)) for job in made],
        "reviews": [review.to_json() for review in reviews.all()],
        "users": [dataclasses.asdict(user) for user in users.all()],
        "tokens": tokens,
        "segmentations": [dataclasses.asdict(records.segmentation(r.uid)) for r in segmentations],
        "entries": {kind: records.entries(kind) for kind in (FEEDBACK, TELEMETRY, DECISION)},
    }


def fill_history(path: Path) -> list[dict]:
    """Hippocampus results of two patients, through the history class; its rows as stored."""
    history = ResultHistory(path)
    first, second = Patient("P-1", "HOSP", "19500101"), Patient("P-2")
    history.record(first, PriorResult("1.2.3.10", "20230105", "hippocampus", "1.0", {"Anterior": 1800.5,
                                                                                      "Posterior": 1500.25}))
    history.record(first, PriorResult("1.2.3.11", "20240110", "hippocampus", "1.1", {"Anterior": 1750.0,
                                                                                      "Posterior": 1490.0}))
    history.record(second, PriorResult("1.2.3.20", "20220301", "hippocampus", "1.0", {"Anterior": 2000.0}))
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(results)")]
        rows = db.execute("SELECT * FROM results ORDER BY study_uid").fetchall()
    return [dict(zip(columns, row, strict=True)) for row in rows]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jobs = JobStore(out / "jobs.sqlite3")
    expected = {"sqlite": fill(jobs, SqliteReviews(jobs.path), SqliteUsers(jobs.path),
                               SqliteRadiomicsRecords(out / "radiomics.sqlite3")),
                "history": fill_history(out / "history.sqlite3")}
    with tempfile.TemporaryDirectory() as folder:
        server = RedisServer(Path(folder))
        try:
            redis_jobs = RedisJobStore(server.url)
            expected["redis"] = fill(redis_jobs, RedisReviews(redis_jobs.client), RedisUsers(server.url),
                                     RedisRadiomicsRecords(server.url))
            redis.Redis.from_url(server.url).save()
        finally:
            server.stop()
        (out / "redis.rdb").write_bytes((Path(folder) / "dump.rdb").read_bytes())
    expected["made"] = {"commit": "125255a", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
