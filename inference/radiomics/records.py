"""What the Radiomics door keeps besides the job records: one interface, ``RadiomicsRecords``, with an
SQLite implementation (local job backend) and a Redis one (celery backend, the same Redis as the jobs).

- a segmentation record per posted input: its job uid, model id, registry family and version, input
  hash, arrival time, and the ErrorCode of an input refused before it could run;
- every Feedback and Telemetry message received, as protobuf-JSON, with the job, its model version and
  input hash when the job is known: the clinician-review work reads them (``entries``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, cast

import redis

from inference.errors import ServiceUnavailable

FEEDBACK, TELEMETRY = "feedback", "telemetry"


@dataclasses.dataclass
class Segmentation:
    """One posted input: its job (``uid``, the SegmentationID), what ran it, how it was refused if it was."""

    uid: str
    model_id: str
    family: str
    version: str
    input_hash: str
    received: float = dataclasses.field(default_factory=time.time)
    error_code: int = 0
    error: str = ""


class RadiomicsRecords(Protocol):
    """Segmentation records, feedback and telemetry, whatever the backend."""

    def add_segmentation(self, record: Segmentation) -> None:
        """Record a posted input."""
        ...

    def segmentation(self, uid: str) -> Segmentation | None:
        """The record of SegmentationID ``uid``, or None."""
        ...

    def segmentations_before(self, received: float) -> list[str]:
        """The uids of inputs received before ``received`` (seconds since the epoch)."""
        ...

    def remove_segmentation(self, uid: str) -> None:
        """Forget a segmentation record (its result was cleaned up)."""
        ...

    def add_entry(self, kind: str, entry: dict) -> None:
        """Keep one Feedback or Telemetry entry (``kind`` FEEDBACK or TELEMETRY)."""
        ...

    def entries(self, kind: str) -> list[dict]:
        """Every entry of ``kind``, oldest first."""
        ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS segmentations (uid TEXT PRIMARY KEY, received REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS segmentations_received ON segmentations (received);
CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, entry TEXT NOT NULL);
"""


class SqliteRadiomicsRecords:
    """The records in one SQLite file (WAL, a connection per call: safe across gunicorn's workers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            with db:  # one transaction, committed on success
                yield db
        finally:
            db.close()

    def add_segmentation(self, record: Segmentation) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO segmentations VALUES (?, ?, ?)",
                       (record.uid, record.received, json.dumps(dataclasses.asdict(record))))

    def segmentation(self, uid: str) -> Segmentation | None:
        with self._connect() as db:
            row = db.execute("SELECT record FROM segmentations WHERE uid = ?", (uid,)).fetchone()
        return None if row is None else Segmentation(**json.loads(row[0]))

    def segmentations_before(self, received: float) -> list[str]:
        with self._connect() as db:
            return [row[0] for row in db.execute("SELECT uid FROM segmentations WHERE received < ?", (received,))]

    def remove_segmentation(self, uid: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM segmentations WHERE uid = ?", (uid,))

    def add_entry(self, kind: str, entry: dict) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO entries (kind, entry) VALUES (?, ?)", (kind, json.dumps(entry)))

    def entries(self, kind: str) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT entry FROM entries WHERE kind = ? ORDER BY id", (kind,)).fetchall()
        return [json.loads(row[0]) for row in rows]


class RedisRadiomicsRecords:
    """The records in Redis: a hash per segmentation (plus a sorted set by arrival), a list per entry kind."""

    PREFIX = "inference:radiomics:"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
        kwargs = self.client.connection_pool.connection_kwargs
        self.where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable(f"the Radiomics records (Redis at {self.where}) are unreachable ({exc}); "
                                     "retry later") from exc

    def add_segmentation(self, record: Segmentation) -> None:
        with self._reaching():
            pipe = self.client.pipeline()
            pipe.set(f"{self.PREFIX}segmentation:{record.uid}", json.dumps(dataclasses.asdict(record)))
            pipe.zadd(f"{self.PREFIX}segmentations", {record.uid: record.received})
            pipe.execute()

    def segmentation(self, uid: str) -> Segmentation | None:
        with self._reaching():
            value = cast("bytes | None", self.client.get(f"{self.PREFIX}segmentation:{uid}"))
        return None if value is None else Segmentation(**json.loads(value))

    def segmentations_before(self, received: float) -> list[str]:
        with self._reaching():
            uids = cast("list[bytes]", self.client.zrangebyscore(f"{self.PREFIX}segmentations", "-inf",
                                                                 f"({received}"))
        return [uid.decode() for uid in uids]

    def remove_segmentation(self, uid: str) -> None:
        with self._reaching():
            pipe = self.client.pipeline()
            pipe.delete(f"{self.PREFIX}segmentation:{uid}")
            pipe.zrem(f"{self.PREFIX}segmentations", uid)
            pipe.execute()

    def add_entry(self, kind: str, entry: dict) -> None:
        with self._reaching():
            self.client.rpush(f"{self.PREFIX}{kind}", json.dumps(entry))

    def entries(self, kind: str) -> list[dict]:
        with self._reaching():
            values = cast("list[bytes]", self.client.lrange(f"{self.PREFIX}{kind}", 0, -1))
        return [json.loads(value) for value in values]
