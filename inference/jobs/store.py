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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from inference.storage.migrations import JOBS, open_sqlite
from inference.storage.sqlite import BUSY_TIMEOUT, connection

log = logging.getLogger("inference.jobs")

QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
INTERRUPTED = "interrupted"
#: The error of a DICOM node job that never ran: its study arrived only in part (the reason follows).
INCOMPLETE = "incomplete study"
TIMEOUT = "timeout"
FINISHED = (COMPLETED, FAILED)
UNFINISHED = (QUEUED, RUNNING)
_UNFINISHED_SQL = "('queued', 'running')"

#: The job table's columns (``inference.storage.migrations.JOBS`` makes them), in the order written.
COLUMNS = ("uid", "job_name", "command", "in_dir", "params", "status", "owner", "error", "error_status", "output_dir",
           "created", "updated", "attempts", "worker", "started", "finished", "spool", "user", "study_uid", "review")


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


def job_fields(job: Job) -> dict[str, Any]:
    """A job as plain values by name (what a store writes; ``params`` still a dict)."""
    return {"uid": job.uid, "job_name": job.job_name, "command": job.command, "in_dir": job.in_dir,
            "params": job.params, "status": job.status, "owner": job.owner, "error": job.error,
            "error_status": job.error_status, "output_dir": job.output_dir, "created": job.created,
            "updated": job.updated, "attempts": job.attempts, "worker": job.worker, "started": job.started,
            "finished": job.finished, "spool": job.spool, "user": job.user, "study_uid": job.study_uid,
            "review": job.review}


def job_from_fields(values: Mapping[str, Any]) -> Job:
    """The job of stored values by name: the fields this release knows, a default for any a record lacks."""
    return Job(job_name=values["job_name"], command=values["command"], in_dir=values["in_dir"],
               params=dict(values.get("params") or {}), uid=values["uid"], status=values["status"],
               owner=values.get("owner"), error=values.get("error"), error_status=values.get("error_status"),
               output_dir=values.get("output_dir"), created=values["created"], updated=values["updated"],
               attempts=values.get("attempts") or 0, worker=values.get("worker"), started=values.get("started"),
               finished=values.get("finished"), spool=bool(values.get("spool")), user=values.get("user"),
               study_uid=values.get("study_uid"), review=values.get("review"))


def to_row(job: Job) -> tuple:
    """A job as the job table's row (``COLUMNS``)."""
    fields = job_fields(job)
    fields["params"], fields["spool"] = json.dumps(job.params), int(job.spool)
    return tuple(fields[name] for name in COLUMNS)


def from_row(row: Mapping[str, Any]) -> Job:
    """The job of a job table row."""
    return job_from_fields({**dict(row), "params": json.loads(row["params"])})


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

    def __init__(self, path: str | os.PathLike, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        open_sqlite(self.path, JOBS)  # created at this release's schema, or refused at another one

    def _connect(self, *, write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, write=write, busy_timeout=self.busy_timeout)

    def add(self, job: Job) -> Job:
        with self._connect(write=True) as db:
            db.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                       to_row(job))
        return job

    def get(self, uid: str) -> Job | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE uid = ?", (uid,)).fetchone()
        return None if row is None else from_row(row)

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
