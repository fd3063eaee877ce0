"""Asynchronous jobs: their state in SQLite, and runners that execute them.

``JobStore`` keeps every job in one SQLite file (WAL mode, one connection per call), so every
gunicorn worker answers for every job and a restarted server still knows past jobs. A runner
(``JobRunner``) executes jobs somewhere; ``LocalPoolRunner`` uses a bounded thread pool in this
process. ``inference.jobs.celery_backend`` holds the distributed one (Celery workers, records in Redis through
``inference.jobs.redis_store.RedisJobStore``, which has this store's interface).

Interrupted jobs: each runner stamps the jobs it accepts with its ``owner`` id. A local runner
holds an exclusive ``flock`` on ``<lock_dir>/<owner>.lock`` for as long as its process lives;
the OS drops the lock when the process dies, however it dies. ``recover()`` marks the queued
or running jobs of owners whose lock can be taken as failed with reason ``interrupted``, so a
worker starting never touches a job another live worker is running (and pid reuse cannot fool it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

log = logging.getLogger("inference.jobs")

QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
INTERRUPTED = "interrupted"
#: The error of a DICOM node job that never ran: its study arrived only in part (the reason follows).
INCOMPLETE = "incomplete study"
TIMEOUT = "timeout"
FINISHED = (COMPLETED, FAILED)
UNFINISHED = (QUEUED, RUNNING)
_UNFINISHED_SQL = "('queued', 'running')"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    uid TEXT PRIMARY KEY,
    job_name TEXT NOT NULL,
    command TEXT NOT NULL,
    in_dir TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    error TEXT,
    error_status INTEGER,
    output_dir TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    started REAL,
    finished REAL,
    spool INTEGER NOT NULL DEFAULT 0,
    user TEXT,
    study_uid TEXT,
    review TEXT
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status, owner);
"""
#: Columns added after the first release, with their type: added to older files when opened.
ADDED_COLUMNS = {"attempts": "INTEGER NOT NULL DEFAULT 0", "worker": "TEXT", "started": "REAL", "finished": "REAL",
                 "spool": "INTEGER NOT NULL DEFAULT 0", "user": "TEXT",
                 "study_uid": "TEXT", "review": "TEXT"}


@contextlib.contextmanager
def sqlite_connection(path: Path, busy_timeout: float, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A fresh connection to the job file (closed after), rows by name; with ``write``, one transaction
    (``BEGIN IMMEDIATE``: one writer at a time) committed on success, rolled back on any error."""
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        if write:
            db.execute("BEGIN IMMEDIATE")
        yield db
        if write:
            db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


@dataclass
class Job:
    """One job: what to run (handler ``command`` on ``in_dir`` with ``params``) and how it went."""

    job_name: str
    command: str
    in_dir: str
    params: dict = field(default_factory=dict)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: str = QUEUED
    owner: str | None = None
    error: str | None = None
    error_status: int | None = None  # the HTTP status the error would have had as a request
    output_dir: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    attempts: int = 0  # times a worker started it (a re-delivery or a retry counts again)
    worker: str | None = None  # who started the last attempt
    started: float | None = None  # when the last attempt started
    finished: float | None = None
    #: the folder ``in_dir`` is in the DICOM node's spool (``<INFERENCE_PACS_ROOT>/spool``), not the data root
    spool: bool = False
    #: the named user who submitted it (``inference.users``); None for the shared token, no token, or the node
    user: str | None = None
    #: the StudyInstanceUID of its input, when it is DICOM (for the audit trail)
    study_uid: str | None = None
    #: ``required`` or ``flagged``: its result is held for a reviewer (``inference.jobs.reviews``); None: released
    review: str | None = None


class JobRecords(Protocol):
    """What the job API and the executor need of a store: ``JobStore`` (SQLite) and
    ``inference.jobs.redis_store.RedisJobStore`` both are one."""

    def add(self, job: Job) -> Job:
        """Record a new job; the job."""
        ...

    def get(self, uid: str) -> Job | None:
        """Job ``uid``, or None when there is no such job."""
        ...

    def mark_completed(self, uid: str, output_dir: str) -> bool:
        """Record job ``uid`` completed with its outputs in ``output_dir``; whether it was unfinished."""
        ...

    def mark_failed(self, uid: str, error: str, error_status: int = 500) -> bool:
        """Record job ``uid`` failed; whether it was unfinished."""
        ...

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status."""
        ...

    def remove(self, uid: str) -> None:
        """Forget job ``uid``."""
        ...


class JobStore:
    """Jobs in an SQLite file, safe for several processes and threads (a connection per call)."""

    def __init__(self, path: str | os.PathLike, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout = busy_timeout
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.executescript(SCHEMA)
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in ADDED_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    def _connect(self, *, write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite_connection(self.path, self.busy_timeout, write=write)

    def add(self, job: Job) -> Job:
        with self._connect(write=True) as db:
            db.execute(
                "INSERT INTO jobs (uid, job_name, command, in_dir, params, status, owner, error, error_status,"
                " output_dir, created, updated, attempts, worker, started, finished, spool, user, study_uid, review)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.uid, job.job_name, job.command, job.in_dir, json.dumps(job.params), job.status, job.owner,
                 job.error, job.error_status, job.output_dir, job.created, job.updated, job.attempts, job.worker,
                 job.started, job.finished, int(job.spool), job.user, job.study_uid, job.review))
        return job

    def get(self, uid: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE uid = ?", (uid,)).fetchone()
        if row is None:
            return None
        values = dict(row)
        values["params"] = json.loads(values["params"])
        values["spool"] = bool(values["spool"])
        return Job(**values)

    def _update(self, uid: str, only_if: tuple[str, ...], *, count_attempt: bool = False, **changes: Any) -> bool:
        """Set ``changes`` on job ``uid`` when its status is one of ``only_if``; whether it was."""
        changes["updated"] = time.time()
        assignments = ", ".join([f"{name} = ?" for name in changes] + ["attempts = attempts + 1"] * count_attempt)
        marks = ", ".join("?" * len(only_if))
        with self._connect(write=True) as db:
            cursor = db.execute(f"UPDATE jobs SET {assignments} WHERE uid = ? AND status IN ({marks})",
                                (*changes.values(), uid, *only_if))
        return cursor.rowcount == 1

    def mark_running(self, uid: str, worker: str | None = None) -> bool:
        """Queued -> running, one more attempt by ``worker``; False when the job is no longer queued."""
        return self._update(uid, (QUEUED,), count_attempt=True, status=RUNNING, worker=worker, started=time.time())

    def mark_completed(self, uid: str, output_dir: str) -> bool:
        return self._update(uid, UNFINISHED, status=COMPLETED, output_dir=output_dir, finished=time.time())

    def mark_failed(self, uid: str, error: str, error_status: int = 500) -> bool:
        return self._update(uid, UNFINISHED, status=FAILED, error=error, error_status=error_status,
                            finished=time.time())

    def remove(self, uid: str) -> None:
        """Forget job ``uid`` (its results were cleaned up)."""
        with self._connect(write=True) as db:
            db.execute("DELETE FROM jobs WHERE uid = ?", (uid,))

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (for the metrics)."""
        with self._connect() as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {row["status"]: row["n"] for row in rows}

    def unfinished_owners(self) -> list[str | None]:
        """Owners of the jobs still queued or running (None for jobs that never got one)."""
        with self._connect() as db:
            rows = db.execute(f"SELECT DISTINCT owner FROM jobs WHERE status IN {_UNFINISHED_SQL}").fetchall()
        return [row["owner"] for row in rows]

    def fail_unfinished_of(self, owner: str | None, error: str = INTERRUPTED) -> list[str]:
        """Mark the queued and running jobs of ``owner`` failed with ``error``; their uids."""
        match = "owner IS NULL" if owner is None else "owner = ?"
        arguments = () if owner is None else (owner,)
        with self._connect(write=True) as db:
            rows = db.execute(f"SELECT uid FROM jobs WHERE status IN {_UNFINISHED_SQL} AND {match}",
                              arguments).fetchall()
            db.execute(f"UPDATE jobs SET status = ?, error = ?, error_status = 500, updated = ?, finished = ? "
                       f"WHERE status IN {_UNFINISHED_SQL} AND {match}",
                       (FAILED, error, time.time(), time.time(), *arguments))
        return [row["uid"] for row in rows]


class JobRunner(Protocol):
    """Executes jobs somewhere. ``owner`` is stamped on the jobs it accepts (before ``store.add``)."""

    @property
    def owner(self) -> str:
        """The id stamped on the jobs it accepts (read-only: a local runner's changes after a fork)."""
        ...

    def submit(self, job: Job) -> None:
        """Start ``job`` (already in the store, queued) without waiting for it."""

    def recover(self) -> list[str]:
        """Mark as failed (``interrupted``) the unfinished jobs whose executor is gone; their uids."""


class ProcessLock:
    """An owner id whose liveness other processes can test: an flock held for this process's life."""

    def __init__(self, lock_dir: str | os.PathLike) -> None:
        self.lock_dir = Path(lock_dir)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._pid: int | None = None
        self._owner = ""
        self._handle: TextIO | None = None  # the open lock file: the lock lasts as long as it is open
        self._guard = threading.Lock()

    @property
    def owner(self) -> str:
        """This process's owner id; a new one (and a new lock) after a fork."""
        with self._guard:
            if self._pid != os.getpid():
                owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
                handle = open(self.lock_dir / f"{owner}.lock", "w")
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._pid, self._owner, self._handle = os.getpid(), owner, handle
            return self._owner

    def is_alive(self, owner: str) -> bool:
        """Whether the process holding ``owner``'s lock still runs; removes the lock file of a dead one."""
        path = self.lock_dir / f"{owner}.lock"
        try:
            handle = open(path)
        except FileNotFoundError:
            return False  # never locked here, or already found dead
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return False


class LocalPoolRunner:
    """Runs jobs on a bounded thread pool in this process; ``execute(job)`` does the work."""

    def __init__(self, store: JobStore, execute: Callable[[Job], None], *, workers: int,
                 lock_dir: str | os.PathLike) -> None:
        self.store = store
        self.execute = execute
        self.workers = max(1, workers)
        self._lock = ProcessLock(lock_dir)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._guard = threading.Lock()

    @property
    def owner(self) -> str:
        return self._lock.owner

    def submit(self, job: Job) -> None:
        with self._guard:
            pool = self._pool
            if pool is None or self._pool_pid != os.getpid():  # created lazily: threads do not survive a fork
                pool = self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="job")
                self._pool_pid = os.getpid()
            pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        if not self.store.mark_running(job.uid, worker=self.owner):
            log.warning("job %s is no longer queued; not running it", job.uid)
            return
        try:
            self.execute(job)
        except Exception:  # execute records failures itself; this is the last guard of the pool thread
            log.exception("job %s failed outside its handler", job.uid)
            self.store.mark_failed(job.uid, "internal error while running the job; see the server log")

    def recover(self) -> list[str]:
        me = self.owner
        failed = []
        for owner in self.store.unfinished_owners():
            if owner != me and (owner is None or not self._lock.is_alive(owner)):
                failed += self.store.fail_unfinished_of(owner, INTERRUPTED)
        if failed:
            log.warning("marked %d jobs of stopped processes as failed (%s): %s", len(failed), INTERRUPTED,
                        ", ".join(failed))
        return failed
