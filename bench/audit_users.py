"""What users and the audit trail cost a request: token checks (first and remembered) and audit appends.

    python -m bench.audit_users            # one JSON line on stdout

Measured in a temporary folder, on this machine's disk: an scrypt check (a token's first request in a
process), a remembered token (every later request), an audit append on a trail of ``--records`` lines
(one flock, a read of the last line, a write and an fsync), and ``verify`` over that trail.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from inference.audit import AuditLog, verify
from inference.users import Authenticator, SqliteUsers, new_user


def per_call_ms(call, count: int) -> float:
    """Mean milliseconds of ``call()`` over ``count`` calls."""
    started = time.perf_counter()
    for _ in range(count):
        call()
    return round((time.perf_counter() - started) * 1000 / count, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_users", description=__doc__)
    parser.add_argument("--records", type=int, default=10000, help="audit records written before timing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteUsers(Path(folder) / "jobs.sqlite3")
        user, token = new_user("bench", "submitter")
        store.add(user)
        first = per_call_ms(lambda: Authenticator(store).user_for(token), 5)
        remembered = Authenticator(store)
        remembered.user_for(token)
        cached = per_call_ms(lambda: remembered.user_for(token), 500)
        log = AuditLog(Path(folder) / "audit.jsonl")
        fill = per_call_ms(lambda: log.append("result-viewed", user="bench", client="127.0.0.1",
                                              study_uid="1.2.3", input_hash="ab" * 32, job="x"), args.records)
        started = time.perf_counter()
        count, problem = verify(log.path)
        verify_ms = round((time.perf_counter() - started) * 1000, 1)
    print(json.dumps({"token_first_check_ms": first, "token_remembered_ms": cached, "audit_append_ms": fill,
                      "audit_records": count, "audit_verify_ms": verify_ms, "chain_intact": problem is None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
