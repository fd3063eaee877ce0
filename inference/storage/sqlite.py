"""The one way the stores talk to SQLite: a fresh connection per call, rows by name, and with ``write`` one
``BEGIN IMMEDIATE`` transaction (one writer at a time), committed on success, rolled back on any error."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

#: Seconds a connection waits for another process's write before it gives up ("database is locked").
BUSY_TIMEOUT = 30.0


@contextlib.contextmanager
def connection(path: Path, *, write: bool = False, busy_timeout: float = BUSY_TIMEOUT) -> Iterator[sqlite3.Connection]:
    """A fresh connection to ``path`` (closed after); with ``write``, one transaction around the block."""
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
