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
from pathlib import Path
from typing import Protocol, cast

from inference.storage.backend import REDIS, Backend
from inference.storage.migrations import RADIOMICS, open_sqlite, redis_prefix
from inference.storage.redis_client import client_for, reaching
from inference.storage.sqlite import connection

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

    def to_json(self) -> dict:
        """The record as the stores keep it."""
        return {"uid": self.uid, "model_id": self.model_id, "family": self.family, "version": self.version,
                "input_hash": self.input_hash, "received": self.received, "error_code": self.error_code,
                "error": self.error}

    @classmethod
    def from_json(cls, values: dict) -> Segmentation:
        """The record of stored JSON: the fields this release knows, a default for any a record lacks."""
        return cls(uid=values["uid"], model_id=values["model_id"], family=values["family"],
                   version=values["version"], input_hash=values["input_hash"], received=values["received"],
                   error_code=values.get("error_code", 0), error=values.get("error", ""))


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


class SqliteRadiomicsRecords:
    """The records in one SQLite file (WAL, a connection per call: safe across gunicorn's workers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        open_sqlite(self.path, RADIOMICS)  # created at this release's schema, or refused at another one

    def _connect(self, *, write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, write=write)

    def add_segmentation(self, record: Segmentation) -> None:
        with self._connect(write=True) as db:
            db.execute("INSERT OR REPLACE INTO segmentations (uid, received, record) VALUES (?, ?, ?)",
                       (record.uid, record.received, json.dumps(record.to_json())))

    def segmentation(self, uid: str) -> Segmentation | None:
        with self._connect() as db:
            row = db.execute("SELECT record FROM segmentations WHERE uid = ?", (uid,)).fetchone()
        return None if row is None else Segmentation.from_json(json.loads(row[0]))

    def segmentations_before(self, received: float) -> list[str]:
        with self._connect() as db:
            return [row[0] for row in db.execute("SELECT uid FROM segmentations WHERE received < ?", (received,))]

    def remove_segmentation(self, uid: str) -> None:
        with self._connect(write=True) as db:
            db.execute("DELETE FROM segmentations WHERE uid = ?", (uid,))

    def add_entry(self, kind: str, entry: dict) -> None:
        with self._connect(write=True) as db:
            db.execute("INSERT INTO entries (kind, entry) VALUES (?, ?)", (kind, json.dumps(entry)))

    def entries(self, kind: str) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT entry FROM entries WHERE kind = ? ORDER BY id", (kind,)).fetchall()
        return [json.loads(row[0]) for row in rows]


class RedisRadiomicsRecords:
    """The records in Redis: a hash per segmentation (plus a sorted set by arrival), a list per entry kind."""

    PREFIX = redis_prefix() + "radiomics:"

    def __init__(self, url: str) -> None:
        self.client = client_for(url)

    def _reaching(self) -> contextlib.AbstractContextManager[None]:
        return reaching(self.client, "Radiomics records")

    def add_segmentation(self, record: Segmentation) -> None:
        with self._reaching():
            pipe = self.client.pipeline()
            pipe.set(f"{self.PREFIX}segmentation:{record.uid}", json.dumps(record.to_json()))
            pipe.zadd(f"{self.PREFIX}segmentations", {record.uid: record.received})
            pipe.execute()

    def segmentation(self, uid: str) -> Segmentation | None:
        with self._reaching():
            value = cast("bytes | None", self.client.get(f"{self.PREFIX}segmentation:{uid}"))
        return None if value is None else Segmentation.from_json(json.loads(value))

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


def radiomics_records(backend: Backend) -> RadiomicsRecords:
    """The records of ``backend``: its Redis (the broker's) with celery, else ``radiomics.sqlite3`` beside the jobs."""
    if backend.kind == REDIS:
        return RedisRadiomicsRecords(backend.url)
    return SqliteRadiomicsRecords(backend.folder / "radiomics.sqlite3")
