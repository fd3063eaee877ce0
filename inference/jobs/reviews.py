"""Review before release: held results and the decisions on them, on the job store (SQLite or Redis).

A job whose ``review`` is ``required`` (or ``flagged``, and its response JSON carries
``"quality": {"flagged": true}``) is held when it completes: a ``Review`` in status
``awaiting review``, and nothing of it is released (the DICOM node sends nothing, the job API
serves no file) until a reviewer decides. A decision is final: the same decision again changes
nothing (``decide`` says it was not new), another one is a 409. The records sit beside the jobs
(the same SQLite file, the same Redis), so every API instance, worker and the node see the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from pathlib import Path
from typing import Protocol, cast

import redis

from inference.errors import BadRequest, Conflict, NotFound
from inference.storage.backend import REDIS, Backend
from inference.storage.migrations import JOBS, open_sqlite, redis_prefix
from inference.storage.redis_client import reaching
from inference.storage.sqlite import connection

AWAITING, ACCEPTED, REJECTED, CORRECTED = "awaiting review", "accepted", "rejected", "corrected"
DECISIONS = (ACCEPTED, REJECTED, CORRECTED)
#: What a rule, a job or a request may ask: every result held, or only the flagged ones.
REVIEW_MODES = ("required", "flagged")


def review_mode(value: object, where: str) -> str | None:
    """A ``review`` option checked: None (no review), ``required`` or ``flagged``; 400 naming ``where`` otherwise."""
    if value is None or value == "none":
        return None
    if value not in REVIEW_MODES:
        raise BadRequest(f"{where}: review must be one of {', '.join(REVIEW_MODES)} (or left out), got {value!r}")
    return str(value)


def is_flagged(response_json: dict) -> bool:
    """Whether a result's quality check flagged it (``"quality": {"flagged": true}``); no ``quality``: not flagged."""
    quality = response_json.get("quality")
    return isinstance(quality, dict) and quality.get("flagged") is True


def must_hold(mode: str | None, response_json: dict) -> bool:
    """Whether a result asked to be reviewed in ``mode`` is held: always when required, when flagged otherwise."""
    return mode == "required" or (mode == "flagged" and is_flagged(response_json))


@dataclasses.dataclass
class Review:
    """A held result (job ``uid``) and, once decided, the decision: who, when, why, the correction."""

    uid: str
    command: str
    mode: str
    study_uid: str | None = None
    input_hash: str | None = None
    flagged: bool = False
    #: the model that produced it: family, version, sha256 of the weights (empty for handlers without one)
    model: dict = dataclasses.field(default_factory=dict)
    submitter: str | None = None
    #: the DICOM node's jobs are released by the node; the job API's by serving their files
    node: bool = False
    held: float = dataclasses.field(default_factory=time.time)
    status: str = AWAITING
    decided_by: str | None = None
    decided: float | None = None
    reason: str | None = None
    #: a correction's files (relative to the job's output folder), Dice per structure and volume changes
    correction: dict | None = None

    def to_json(self) -> dict:
        """The review as JSON values (what the routes answer and the stores keep)."""
        return {"uid": self.uid, "command": self.command, "mode": self.mode, "study_uid": self.study_uid,
                "input_hash": self.input_hash, "flagged": self.flagged, "model": self.model,
                "submitter": self.submitter, "node": self.node, "held": self.held, "status": self.status,
                "decided_by": self.decided_by, "decided": self.decided, "reason": self.reason,
                "correction": self.correction}

    @classmethod
    def from_json(cls, values: dict) -> Review:
        """The review of stored JSON: the fields this release knows, a default for any a record lacks."""
        return cls(uid=values["uid"], command=values["command"], mode=values["mode"],
                   study_uid=values.get("study_uid"), input_hash=values.get("input_hash"),
                   flagged=bool(values.get("flagged")), model=dict(values.get("model") or {}),
                   submitter=values.get("submitter"), node=bool(values.get("node")), held=values["held"],
                   status=values.get("status", AWAITING), decided_by=values.get("decided_by"),
                   decided=values.get("decided"), reason=values.get("reason"), correction=values.get("correction"))


class ReviewRecords(Protocol):
    """Held results and decisions, whatever the backend."""

    def hold(self, review: Review) -> Review:
        """Record a held result (once: holding it again keeps the first record); the record."""
        ...

    def get(self, uid: str) -> Review | None:
        """The review of job ``uid``, or None when it was never held."""
        ...

    def all(self) -> list[Review]:
        """Every review, oldest first."""
        ...

    def decide(self, uid: str, status: str, user: str | None, *, reason: str | None = None,
               correction: dict | None = None) -> tuple[Review, bool]:
        """Record a decision; (the review, whether this call decided). 404/409 as ``settle`` says."""
        ...


def settle(current: Review | None, uid: str, status: str, user: str | None, reason: str | None,
           correction: dict | None) -> tuple[Review, bool]:
    """The review after a decision, and whether it changed: the same decision again is no change, another a 409."""
    if status not in DECISIONS:
        raise ValueError(f"a decision is one of {DECISIONS}, got {status!r}")
    if current is None:
        raise NotFound(f"job {uid} has no result awaiting review; GET /reviews lists them")
    if current.status == status:
        return current, False
    if current.status != AWAITING:
        raise Conflict(f"job {uid} was already {current.status} by {current.decided_by}; a decision is final")
    decided = dataclasses.replace(current, status=status, decided_by=user, decided=time.time(), reason=reason,
                                  correction=correction)
    return decided, True


class SqliteReviews:
    """Reviews in the job store's SQLite file (their own table): every local process sees the same."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        open_sqlite(self.path, JOBS)  # created at this release's schema, or refused at another one

    def _connect(self, *, write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, write=write)

    def hold(self, review: Review) -> Review:
        with self._connect(write=True) as db:
            db.execute("INSERT OR IGNORE INTO reviews (uid, held, record) VALUES (?, ?, ?)",
                       (review.uid, review.held, json.dumps(review.to_json())))
            row = db.execute("SELECT record FROM reviews WHERE uid = ?", (review.uid,)).fetchone()
        return Review.from_json(json.loads(row[0]))

    def get(self, uid: str) -> Review | None:
        with self._connect() as db:
            row = db.execute("SELECT record FROM reviews WHERE uid = ?", (uid,)).fetchone()
        return None if row is None else Review.from_json(json.loads(row[0]))

    def all(self) -> list[Review]:
        with self._connect() as db:
            rows = db.execute("SELECT record FROM reviews ORDER BY held").fetchall()
        return [Review.from_json(json.loads(row[0])) for row in rows]

    def decide(self, uid: str, status: str, user: str | None, *, reason: str | None = None,
               correction: dict | None = None) -> tuple[Review, bool]:
        with self._connect(write=True) as db:  # one writer at a time: two reviewers cannot both decide
            row = db.execute("SELECT record FROM reviews WHERE uid = ?", (uid,)).fetchone()
            current = None if row is None else Review.from_json(json.loads(row[0]))
            review, changed = settle(current, uid, status, user, reason, correction)
            if changed:
                db.execute("UPDATE reviews SET record = ? WHERE uid = ?", (json.dumps(review.to_json()), uid))
        return review, changed


class RedisReviews:
    """Reviews in the celery backend's Redis: a JSON value per review, a sorted set of all by hold time."""

    PREFIX = redis_prefix() + "review:"
    ALL = redis_prefix() + "reviews"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _reaching(self) -> contextlib.AbstractContextManager[None]:
        return reaching(self.client, "review records")

    def hold(self, review: Review) -> Review:
        with self._reaching():
            self.client.set(self.PREFIX + review.uid, json.dumps(review.to_json()), nx=True)
            self.client.zadd(self.ALL, {review.uid: review.held}, nx=True)
        held = self.get(review.uid)
        assert held is not None
        return held

    def get(self, uid: str) -> Review | None:
        with self._reaching():
            value = cast("bytes | None", self.client.get(self.PREFIX + uid))
        return None if value is None else Review.from_json(json.loads(value))

    def all(self) -> list[Review]:
        with self._reaching():
            uids = cast("list[bytes]", self.client.zrange(self.ALL, 0, -1))
            values = cast("list[bytes | None]", self.client.mget([self.PREFIX + u.decode() for u in uids])) \
                if uids else []
        return [Review.from_json(json.loads(value)) for value in values if value is not None]

    def decide(self, uid: str, status: str, user: str | None, *, reason: str | None = None,
               correction: dict | None = None) -> tuple[Review, bool]:
        key = self.PREFIX + uid
        with self._reaching(), self.client.pipeline() as pipe:
            while True:  # optimistic transaction: a concurrent decision makes EXEC fail, and this one re-reads
                try:
                    pipe.watch(key)
                    value = cast("bytes | None", pipe.get(key))
                    current = None if value is None else Review.from_json(json.loads(value))
                    review, changed = settle(current, uid, status, user, reason, correction)
                    if not changed:
                        pipe.unwatch()
                        return review, False
                    pipe.multi()
                    pipe.set(key, json.dumps(review.to_json()))
                    pipe.execute()
                    return review, True
                except redis.WatchError:
                    continue


def review_records(backend: Backend) -> ReviewRecords:
    """The reviews of ``backend``, beside its jobs: the job file (SQLite) or the same Redis."""
    if backend.kind == REDIS:
        return RedisReviews(backend.redis)
    return SqliteReviews(backend.folder / "jobs.sqlite3")
