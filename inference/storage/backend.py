"""The stores' backend, chosen once from the settings and handed to every store: SQLite files below
``INFERENCE_OUTPUT_ROOT`` (the local job backend) or the broker's Redis (``INFERENCE_JOB_BACKEND=celery``),
so every API instance, worker and the DICOM node share the same records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import redis

from inference.config import Settings
from inference.storage import migrations
from inference.storage.migrations import HISTORY, JOBS, RADIOMICS, Database, StoreVersionError
from inference.storage.redis_client import UNREACHABLE, client_for, where

log = logging.getLogger("inference.storage")

SQLITE, REDIS = "sqlite", "redis"


@dataclass(frozen=True)
class Backend:
    """Where the stores keep their records: ``kind`` SQLITE (files in ``folder``, the result history in
    ``history_path``) or REDIS (at ``url``; a ``history_path`` file left by an older release is copied there by
    ``migrate``)."""

    kind: str
    folder: Path
    history_path: Path
    url: str = ""

    @property
    def redis(self) -> redis.Redis:
        """This process's client of the Redis backend."""
        return client_for(self.url)

    def sqlite_files(self) -> dict[Path, Database]:
        """The SQLite files of this backend and their schemas."""
        if self.kind == REDIS:
            return {}
        return {self.folder / "jobs.sqlite3": JOBS, self.folder / "radiomics.sqlite3": RADIOMICS,
                self.history_path: HISTORY}

    def check(self) -> None:
        """Refuse (``StoreVersionError``, one line) a store at a version this release does not run on; create
        missing ones. An unreachable Redis is not checked here: its stores answer 503 until it is back."""
        for path, database in self.sqlite_files().items():
            migrations.open_sqlite(path, database)
        if self.kind == REDIS:
            try:
                migrations.check_redis(self.redis)
            except UNREACHABLE as exc:
                log.warning("Redis at %s unreachable at start-up (%s): its schema version is not checked",
                            where(self.redis), exc)
            if self.history_path.exists():
                raise StoreVersionError(
                    f"the result history {self.history_path} of an older release is not in Redis yet (the celery "
                    f"backend keeps it there): run `{migrations.MIGRATE_COMMAND}` (python -m inference.storage) on "
                    "this machine with the same settings")

    def migrate(self) -> list[str]:
        """Bring every store to this release's schema; a line per store saying what was done."""
        done = []
        for path, database in self.sqlite_files().items():
            before, after = migrations.migrate_sqlite(path, database)
            done.append(f"{database.name} {path}: version {before} -> {after}")
        if self.kind == REDIS:
            before, after = migrations.migrate_redis(self.redis)
            done.append(f"Redis at {where(self.redis)}: version {before} -> {after}")
            if self.history_path.exists():
                done.append(self._history_to_redis())
        return done

    def _history_to_redis(self) -> str:
        """Copy this machine's result history file (an older release's) into Redis, then rename it ``.imported``."""
        from inference.storage.history import RedisHistoryRows, SqliteHistoryRows  # they stand on this module

        migrations.migrate_sqlite(self.history_path, HISTORY)
        rows = SqliteHistoryRows(self.history_path).all()
        target = RedisHistoryRows(self.redis)
        for row in rows:
            target.put(row)
        imported = self.history_path.with_name(self.history_path.name + ".imported")
        self.history_path.rename(imported)
        return f"result history {self.history_path}: {len(rows)} results copied to Redis, the file renamed {imported}"


def backend_for(settings: Settings) -> Backend:
    """The backend of ``settings``' ``INFERENCE_JOB_BACKEND``; a ValueError naming the setting otherwise."""
    folder = Path(settings.output_root)
    history = Path(settings.history_db or folder / "history.sqlite3")
    if settings.job_backend == "celery":
        return Backend(REDIS, folder, history, settings.redis_url())  # rediss:// with the TLS files (issue 39)
    if settings.job_backend != "local":
        raise ValueError(f"INFERENCE_JOB_BACKEND must be 'local' or 'celery', got {settings.job_backend!r}")
    return Backend(SQLITE, folder, history)


def checked_backend(settings: Settings) -> Backend:
    """``backend_for(settings)`` after ``Backend.check``: what the API, the workers and the node start with.

    A store at another schema version stops the process with one line naming the migrate command.
    """
    backend = backend_for(settings)
    try:
        backend.check()
    except StoreVersionError as exc:
        raise SystemExit(str(exc)) from None
    return backend
