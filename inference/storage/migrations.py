"""Versioned schemas and the migrations between them, for each SQLite file and for the Redis keys.

SQLite: a file's version is its ``PRAGMA user_version``; migration ``n`` takes it from ``n - 1`` to ``n``,
inside one ``BEGIN IMMEDIATE`` transaction with the version bump (all or nothing, one migrator at a time).
A new file is created at the latest version by the same migrations. Version 0 with tables in it is a file
of the releases before versions were kept: migration 1 adopts it as it is.

Redis: the stores' keys sit under ``inference:v<version>:``; ``inference:schema-version`` says which.
Keys without the version (``inference:job:<uid>``...) are the releases' before it: migration 1 renames them.

A process opening a store of another version refuses it (``StoreVersionError``) with one line naming the
command that migrates it: ``inference-migrate`` (``python -m inference.storage``). A store newer than
this release is refused too: it was migrated by a later release.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis

from inference.storage.redis_client import where
from inference.storage.sqlite import connection

#: The command that migrates the stores of the current settings.
MIGRATE_COMMAND = "inference-migrate"

Step = Callable[[sqlite3.Connection], None]


class StoreVersionError(RuntimeError):
    """A store at a schema version this release does not run on; the message is one line naming the command."""


def _script(sql: str) -> Step:
    """A step running the statements of ``sql`` (in the step's transaction: ``executescript`` would commit)."""
    def run(db: sqlite3.Connection) -> None:
        for statement in filter(str.strip, sql.split(";")):
            db.execute(statement)
    return run


def _adopt_jobs(db: sqlite3.Connection) -> None:
    """Version 1 of the job file: its tables as the releases before versions left them, columns added since."""
    _script("""
CREATE TABLE IF NOT EXISTS jobs (
    uid TEXT PRIMARY KEY, job_name TEXT NOT NULL, command TEXT NOT NULL, in_dir TEXT NOT NULL,
    params TEXT NOT NULL, status TEXT NOT NULL, owner TEXT, error TEXT, error_status INTEGER, output_dir TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, worker TEXT, started REAL,
    finished REAL, spool INTEGER NOT NULL DEFAULT 0, user TEXT, study_uid TEXT, review TEXT);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status, owner);
CREATE TABLE IF NOT EXISTS reviews (uid TEXT PRIMARY KEY, held REAL NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, token_id TEXT NOT NULL UNIQUE,
    salt TEXT NOT NULL, token_hash TEXT NOT NULL, created REAL NOT NULL, revoked REAL)
""")(db)
    # columns the first releases' job tables lack (before attempts were counted, and so on)
    added = {"attempts": "INTEGER NOT NULL DEFAULT 0", "worker": "TEXT", "started": "REAL", "finished": "REAL",
             "spool": "INTEGER NOT NULL DEFAULT 0", "user": "TEXT", "study_uid": "TEXT", "review": "TEXT"}
    present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, kind in added.items():
        if name not in present:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


@dataclass(frozen=True)
class Database:
    """One SQLite file's schema: what it holds, and its migrations (``steps[n - 1]`` makes version ``n``)."""

    name: str
    steps: Sequence[Step]

    @property
    def version(self) -> int:
        return len(self.steps)


#: ``<INFERENCE_OUTPUT_ROOT>/jobs.sqlite3``: jobs, held results and their reviews, users.
JOBS = Database("job store", [_adopt_jobs])
#: ``<INFERENCE_OUTPUT_ROOT>/radiomics.sqlite3``: segmentation records, feedback, telemetry, review decisions.
RADIOMICS = Database("feedback store", [_script("""
CREATE TABLE IF NOT EXISTS segmentations (uid TEXT PRIMARY KEY, received REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS segmentations_received ON segmentations (received);
CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, entry TEXT NOT NULL)
""")])
def _flags_and_reviews(db: sqlite3.Connection) -> None:
    """Version 2 of the history (issue 37): each result's quality flag and reasons, and a reviewer's decision with
    a correction's volumes. Rows recorded before keep NULL: their flag is unknown. Columns a file already has
    (added when opened by the release that introduced them) are kept."""
    present = {row[1] for row in db.execute("PRAGMA table_info(results)")}
    for name, kind in (("flagged", "INTEGER"), ("flag_reasons", "TEXT"), ("review", "TEXT"),
                       ("corrected_volumes", "TEXT")):
        if name not in present:
            db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")


#: ``INFERENCE_HISTORY_DB`` (``<INFERENCE_OUTPUT_ROOT>/history.sqlite3``): the hippocampus result history.
HISTORY = Database("result history", [_script("""
CREATE TABLE IF NOT EXISTS results (
    patient_id TEXT NOT NULL, issuer TEXT NOT NULL, birth_date TEXT NOT NULL, study_uid TEXT NOT NULL,
    study_date TEXT NOT NULL, family TEXT NOT NULL, version TEXT NOT NULL, volumes TEXT NOT NULL,
    recorded TEXT NOT NULL, PRIMARY KEY (study_uid, family, version))
"""), _flags_and_reviews])


def sqlite_version(db: sqlite3.Connection) -> tuple[int, bool]:
    """A file's schema version, and whether it holds any table (version 0 without one: a new file)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = db.execute("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    return version, tables > 0


def migrate_sqlite(path: Path, database: Database, *, only_new: bool = False) -> tuple[int, int]:
    """Bring ``path`` to ``database``'s version, one transaction per step; (version before, after).

    With ``only_new`` a file that exists at another version is left alone and refused (``StoreVersionError``):
    what opening a store does, so only ``inference-migrate`` changes the schema of a file in use.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with connection(path) as db:
        db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    with connection(path, write=True) as db:
        before, has_tables = sqlite_version(db)
        if before != database.version and (before > database.version or (only_new and has_tables)):
            raise StoreVersionError(refusal(f"{database.name} {path}", before, database.version))
    for number in range(before + 1, database.version + 1):
        with connection(path, write=True) as db:
            current, _ = sqlite_version(db)
            if current >= number:
                continue  # another process migrated it meanwhile
            database.steps[number - 1](db)
            db.execute(f"PRAGMA user_version = {number}")
    return before, database.version


def open_sqlite(path: Path, database: Database) -> None:
    """What a store does when it opens ``path``: create it at the latest version, or check it is at it."""
    migrate_sqlite(Path(path), database, only_new=True)


def refusal(store: str, found: int, understood: int) -> str:
    """The one line a process refuses a store with."""
    if found > understood:
        return (f"the {store} is at schema version {found}, newer than this release's {understood}: it was "
                "migrated by a later release; run that release")
    return (f"the {store} is at schema version {found}, this release needs {understood}: stop every process "
            f"using it and run `{MIGRATE_COMMAND}` (python -m inference.storage) with the same settings")


# -- Redis -----------------------------------------------------------------------------------------------
#: The Redis keys' schema version, and the key that records it.
REDIS_VERSION = 1
SCHEMA_KEY = "inference:schema-version"
#: What the releases before versioned keys wrote: every key under ``inference:`` but the schema key.
LEGACY_PATTERN = "inference:*"


def redis_prefix(version: int = REDIS_VERSION) -> str:
    """The prefix of every store's keys at schema ``version``."""
    return f"inference:v{version}:"


def redis_version(client: redis.Redis) -> tuple[int, bool]:
    """The keys' schema version, and whether there are keys of the stores at all (none: a new Redis)."""
    value = cast("bytes | None", client.get(SCHEMA_KEY))  # a sync client: a value, not an awaitable
    if value is not None:
        return int(value), True
    return 0, any(_legacy(key) for key in client.scan_iter(match=LEGACY_PATTERN, count=1000))


def _legacy(key: bytes) -> bool:
    """Whether ``key`` is one of the unversioned keys of the releases before versions were kept."""
    return key != SCHEMA_KEY.encode() and re.match(rb"inference:v\d+:", key) is None


def check_redis(client: redis.Redis) -> None:
    """Refuse a Redis whose keys are at another version; mark a new one as the latest."""
    version, has_keys = redis_version(client)
    if version == REDIS_VERSION:
        return
    if not has_keys:
        client.set(SCHEMA_KEY, REDIS_VERSION, nx=True)
        return
    raise StoreVersionError(refusal(f"Redis store at {where(client)}", version, REDIS_VERSION))


def migrate_redis(client: redis.Redis) -> tuple[int, int]:
    """Bring the Redis keys to ``REDIS_VERSION``; (version before, after). Run with every process stopped."""
    before, _ = redis_version(client)
    if before > REDIS_VERSION:
        raise StoreVersionError(refusal(f"Redis store at {where(client)}", before, REDIS_VERSION))
    if before == 0:  # version 1: the unversioned keys move under the versioned prefix, unchanged
        for key in [key for key in client.scan_iter(match=LEGACY_PATTERN, count=1000) if _legacy(key)]:
            client.rename(key, redis_prefix(1) + key.decode()[len("inference:"):])
        client.set(SCHEMA_KEY, 1)
    return before, REDIS_VERSION
