"""The result history's rows (``handlers.hippocampus.history`` reads and writes them), on either backend.

A row is one result of a patient's study by a model version, its values by column (``COLUMNS``; JSON text
where the value is a structure). SQLite: the table ``results`` of ``INFERENCE_HISTORY_DB``. Redis (celery
backend, so the workers of every machine share one history): a JSON value per result and a set per patient
of their results. A study processed again by the same version replaces its row.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import redis

from inference.storage.migrations import HISTORY, open_sqlite, redis_prefix
from inference.storage.redis_client import reaching
from inference.storage.sqlite import connection

#: The results table's columns (``inference.storage.migrations.HISTORY`` makes them), in the order written. Since
#: issue 37 (schema version 2): ``flagged`` 1/0 (None: recorded before flags were kept), ``flag_reasons`` a JSON
#: list, ``review`` the reviewer's decision (None until one), ``corrected_volumes`` JSON (None unless corrected).
COLUMNS = ("patient_id", "issuer", "birth_date", "study_uid", "study_date", "family", "version", "volumes", "recorded",
           "flagged", "flag_reasons", "review", "corrected_volumes")
#: What identifies a row: a study's result by one model version.
KEY = ("study_uid", "family", "version")

Row = dict[str, Any]


class HistoryRows(Protocol):
    """The history's rows, whatever the backend."""

    def put(self, row: Mapping[str, Any]) -> None:
        """Keep ``row``, replacing the row of the same study, family and version."""
        ...

    def of_patient(self, patient_id: str, issuer: str, other_than: str) -> list[Row]:
        """The rows of a patient (ID and issuer) for studies other than ``other_than``."""
        ...

    def update(self, study_uid: str, family: str, version: str, changes: Mapping[str, Any]) -> bool:
        """Change columns of the row of a study's result by a model version; whether there was one."""
        ...


def full_row(row: Mapping[str, Any]) -> Row:
    """``row`` with every column of this release (None for those it lacks), in ``COLUMNS`` order."""
    return {name: row.get(name) for name in COLUMNS}


_lock = threading.Lock()


class SqliteHistoryRows:
    """The rows in an SQLite file shared by the processes of a machine."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        open_sqlite(self.path, HISTORY)  # created at this release's schema, or refused at another one

    def put(self, row: Mapping[str, Any]) -> None:
        with _lock, connection(self.path, write=True) as db:
            db.execute(f"INSERT OR REPLACE INTO results ({', '.join(COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(COLUMNS))})", tuple(full_row(row).values()))

    def of_patient(self, patient_id: str, issuer: str, other_than: str) -> list[Row]:
        with connection(self.path) as db:
            rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM results "
                              "WHERE patient_id = ? AND issuer = ? AND study_uid != ?",
                              (patient_id, issuer, other_than)).fetchall()
        return [dict(row) for row in rows]

    def update(self, study_uid: str, family: str, version: str, changes: Mapping[str, Any]) -> bool:
        unknown = set(changes) - set(COLUMNS)
        if unknown:
            raise ValueError(f"the results table has no column {sorted(unknown)}")
        with _lock, connection(self.path, write=True) as db:
            cursor = db.execute(f"UPDATE results SET {', '.join(f'{name} = ?' for name in changes)} "
                                "WHERE study_uid = ? AND family = ? AND version = ?",
                                (*changes.values(), study_uid, family, version))
        return cursor.rowcount > 0

    def all(self) -> list[Row]:
        """Every row (what a migration to Redis copies)."""
        with connection(self.path) as db:
            return [dict(row) for row in db.execute(f"SELECT {', '.join(COLUMNS)} FROM results")]


class RedisHistoryRows:
    """The rows in Redis: ``history:<study|family|version>`` a JSON row, ``history-patient:<id|issuer>`` the set
    of a patient's rows (both under the versioned prefix)."""

    ROW, PATIENT = redis_prefix() + "history:", redis_prefix() + "history-patient:"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _reaching(self) -> Any:
        return reaching(self.client, "result history")

    @staticmethod
    def _name(*parts: str) -> str:
        return json.dumps(list(parts))  # any text in an ID or UID stays unambiguous

    def put(self, row: Mapping[str, Any]) -> None:
        row = full_row(row)
        name = self._name(*(row[key] for key in KEY))
        with self._reaching():
            pipe = self.client.pipeline()
            pipe.set(self.ROW + name, json.dumps(row))
            pipe.sadd(self.PATIENT + self._name(row["patient_id"], row["issuer"]), name)
            pipe.execute()

    def of_patient(self, patient_id: str, issuer: str, other_than: str) -> list[Row]:
        with self._reaching():
            names = cast("set[bytes]", self.client.smembers(self.PATIENT + self._name(patient_id, issuer)))
            values = cast("list[bytes | None]", self.client.mget([self.ROW + n.decode() for n in names])) \
                if names else []
        rows = [full_row(json.loads(value)) for value in values if value is not None]
        return [row for row in rows if (row["patient_id"], row["issuer"]) == (patient_id, issuer)
                and row["study_uid"] != other_than]

    def update(self, study_uid: str, family: str, version: str, changes: Mapping[str, Any]) -> bool:
        unknown = set(changes) - set(COLUMNS)
        if unknown:
            raise ValueError(f"a history row has no column {sorted(unknown)}")
        key = self.ROW + self._name(study_uid, family, version)
        with self._reaching(), self.client.pipeline() as pipe:
            while True:  # optimistic transaction: a concurrent change makes EXEC fail, and this one re-reads
                try:
                    pipe.watch(key)
                    value = cast("bytes | None", pipe.get(key))
                    if value is None:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.set(key, json.dumps({**json.loads(value), **changes}))
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue
