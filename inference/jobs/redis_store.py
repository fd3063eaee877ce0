"""Job records in Redis, for the celery backend: every API instance and worker reads the same ones.

``RedisJobStore`` has ``inference.jobs.store.JobStore``'s interface (``add``, ``get``, ``mark_*``). A job is
one Redis hash, ``inference:job:<uid>``, each field a JSON value; state changes are one Lua
script, so "change it only while its status is one of these" is atomic across machines. Records
are kept, as the SQLite store keeps them: give Redis persistence (AOF) in production. Redis
unreachable is a ``ServiceUnavailable`` (503) naming the server, never a hang: connects time out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any, cast

import redis

from inference.errors import ServiceUnavailable
from inference.jobs.store import COMPLETED, FAILED, QUEUED, RUNNING, UNFINISHED, Job

KEY_PREFIX = "inference:job:"
#: Seconds to connect to / wait for Redis before the request is answered 503.
CONNECT_TIMEOUT, SOCKET_TIMEOUT = 2.0, 10.0

# KEYS[1]: the job; ARGV[1]: "1" to count an attempt; ARGV[2]: JSON {field: encoded value};
# ARGV[3..]: encoded statuses the job must be in. Returns 1 when changed, 0 otherwise.
TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 3, #ARGV do
  if status == ARGV[i] then
    for field, value in pairs(cjson.decode(ARGV[2])) do redis.call('HSET', KEYS[1], field, value) end
    if ARGV[1] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
    return 1
  end
end
return 0
"""


class RedisJobStore:
    """Jobs as Redis hashes; safe for any number of processes and machines."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT,
                                           socket_timeout=SOCKET_TIMEOUT, health_check_interval=30)
        kwargs = self.client.connection_pool.connection_kwargs
        self.where = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"  # no password in messages
        self._transition = self.client.register_script(TRANSITION)

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable(f"the job store (Redis at {self.where}) is unreachable ({exc}); jobs can "
                                     "be neither submitted nor queried until it is back: retry later") from exc

    def add(self, job: Job) -> Job:
        values = {name: json.dumps(value) for name, value in dataclasses.asdict(job).items()}
        with self._reaching():
            self.client.hset(KEY_PREFIX + job.uid, mapping=values)
        return job

    def get(self, uid: str) -> Job | None:
        with self._reaching():
            # redis-py types its sync and asyncio clients as one: this (sync) client answers a dict
            values = cast("dict[bytes, bytes]", self.client.hgetall(KEY_PREFIX + uid))
        if not values:
            return None
        return Job(**{name.decode(): json.loads(value) for name, value in values.items()})

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (for the metrics): one scan of the job keys."""
        with self._reaching():
            keys = list(self.client.scan_iter(match=KEY_PREFIX + "*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, "status")
            statuses = pipe.execute()
        counts: dict[str, int] = {}
        for status in statuses:
            if status is not None:
                name = json.loads(status)
                counts[name] = counts.get(name, 0) + 1
        return counts

    def remove(self, uid: str) -> None:
        """Forget job ``uid`` (a submission whose message could not be queued, or a result cleaned up)."""
        with self._reaching():
            self.client.delete(KEY_PREFIX + uid)

    def _update(self, uid: str, only_if: tuple[str, ...], *, count_attempt: bool = False, **changes: Any) -> bool:
        """Set ``changes`` on job ``uid`` when its status is one of ``only_if``; whether it was."""
        changes["updated"] = time.time()
        encoded = json.dumps({name: json.dumps(value) for name, value in changes.items()})
        with self._reaching():
            done = self._transition(keys=[KEY_PREFIX + uid],
                                    args=["1" if count_attempt else "0", encoded, *map(json.dumps, only_if)])
        return done == 1

    def mark_running(self, uid: str, worker: str | None = None) -> bool:
        """Queued (or running: re-delivered after its worker died) -> running, one more attempt by ``worker``."""
        return self._update(uid, UNFINISHED, count_attempt=True, status=RUNNING, worker=worker, started=time.time())

    def mark_queued(self, uid: str) -> bool:
        """Running -> queued again, waiting for a retry."""
        return self._update(uid, (RUNNING,), status=QUEUED)

    def mark_completed(self, uid: str, output_dir: str) -> bool:
        return self._update(uid, UNFINISHED, status=COMPLETED, output_dir=output_dir, finished=time.time())

    def mark_failed(self, uid: str, error: str, error_status: int = 500) -> bool:
        return self._update(uid, UNFINISHED, status=FAILED, error=error, error_status=error_status,
                            finished=time.time())
