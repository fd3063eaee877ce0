"""Job records in Redis, for the celery backend: every API instance and worker reads the same ones.

``RedisJobStore`` has ``inference.jobs.store.JobStore``'s interface (``add``, ``get``, ``mark_*``). A job is
one Redis hash, ``inference:job:<uid>``, each field a JSON value; state changes are one Lua
script, so "change it only while its status is one of these" is atomic across machines. Records
are kept, as the SQLite store keeps them: give Redis persistence (AOF) in production. The client, its
timeouts and the error policy (Redis unreachable: a 503 naming the server) are ``inference.storage``'s;
keys sit under its versioned prefix.

Leases: a running job holds one, a score in the sorted set ``inference:leases`` (its expiry, in
Redis' own clock, so the machines' clocks do not matter). The worker running it renews it
(``renew``); ``start`` refuses a job whose lease is live (a duplicate delivery while its worker
lives) and takes over one whose lease ran out (its worker died); ``reap`` puts the jobs of
expired leases back in the queue (see ``inference.jobs.celery_backend.LeaseReaper``).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any, cast

from inference.jobs.store import COMPLETED, FAILED, QUEUED, RUNNING, UNFINISHED, Job, job_fields, job_from_fields
from inference.storage.migrations import redis_prefix
from inference.storage.redis_client import client_for, reaching

KEY_PREFIX = redis_prefix() + "job:"
LEASES = redis_prefix() + "leases"

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

# Start an attempt. KEYS[1]: the job, KEYS[2]: the leases; ARGV[1]: encoded RUNNING, ARGV[2]: encoded
# QUEUED, ARGV[3]: JSON {field: encoded value} to set, ARGV[4]: lease seconds, ARGV[5]: uid.
# Returns 1 started, 0 running under a live lease (someone else's attempt), -1 not unfinished.
START = """
local status = redis.call('HGET', KEYS[1], 'status')
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if status == ARGV[1] then
  local lease = redis.call('ZSCORE', KEYS[2], ARGV[5])
  if lease and tonumber(lease) > now then return 0 end
elseif status ~= ARGV[2] then
  return -1
end
for field, value in pairs(cjson.decode(ARGV[3])) do redis.call('HSET', KEYS[1], field, value) end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[5])
return 1
"""

# Renew. KEYS[1]: the job, KEYS[2]: the leases; ARGV[1]: encoded RUNNING, ARGV[2]: encoded worker,
# ARGV[3]: lease seconds, ARGV[4]: uid. Returns 1 when the lease is still this worker's.
RENEW = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3]), ARGV[4])
return 1
"""

# Reap. KEYS[1]: the leases; ARGV[1]: key prefix, ARGV[2]: encoded RUNNING, ARGV[3]: encoded QUEUED,
# ARGV[4]: encoded "updated" value, ARGV[5]: seconds before a requeued job that is still queued is
# published again. Returns the uids to publish again: running jobs whose lease expired (now queued)
# and requeued jobs still queued after that delay (their message may have been lost).
REAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for _, uid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)) do
  local key = ARGV[1] .. uid
  local status = redis.call('HGET', key, 'status')
  if status == ARGV[2] or status == ARGV[3] then
    redis.call('HSET', key, 'status', ARGV[3], 'updated', ARGV[4])
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), uid)
    table.insert(out, uid)
  else
    redis.call('ZREM', KEYS[1], uid)
  end
end
return out
"""


def to_hash(job: Job) -> dict[str, str]:
    """A job as its Redis hash: each field a JSON value."""
    return {name: json.dumps(value) for name, value in job_fields(job).items()}


def from_hash(values: dict[bytes, bytes]) -> Job:
    """The job of a Redis hash (fields this release does not know are left out)."""
    return job_from_fields({name.decode(): json.loads(value) for name, value in values.items()})


class RedisJobStore:
    """Jobs as Redis hashes; safe for any number of processes and machines."""

    def __init__(self, url: str) -> None:
        self.client = client_for(url)
        self._transition = self.client.register_script(TRANSITION)
        self._start = self.client.register_script(START)
        self._renew = self.client.register_script(RENEW)
        self._reap = self.client.register_script(REAP)

    def _reaching(self) -> contextlib.AbstractContextManager[None]:
        return reaching(self.client, "job store", "jobs can be neither submitted nor queried until it is back: "
                                                  "retry later")

    def add(self, job: Job) -> Job:
        with self._reaching():
            self.client.hset(KEY_PREFIX + job.uid, mapping=to_hash(job))
        return job

    def get(self, uid: str) -> Job | None:
        with self._reaching():
            # redis-py types its sync and asyncio clients as one: this (sync) client answers a dict
            values = cast("dict[bytes, bytes]", self.client.hgetall(KEY_PREFIX + uid))
        return from_hash(values) if values else None

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
        """Queued -> running, one more attempt by ``worker``, as ``JobStore.mark_running``; the celery workers
        ``start`` instead (a lease, and a running job whose lease ran out taken over)."""
        return self._update(uid, (QUEUED,), count_attempt=True, status=RUNNING, worker=worker, started=time.time())

    def start(self, uid: str, worker: str, lease_seconds: float) -> int:
        """Queued (or running under an expired lease: its worker died) -> running by ``worker``, one more
        attempt, leased for ``lease_seconds``. 1 started; 0 when a live lease holds it; -1 when finished or gone."""
        now = time.time()
        encoded = json.dumps({"status": json.dumps(RUNNING), "worker": json.dumps(worker),
                              "started": json.dumps(now), "updated": json.dumps(now)})
        with self._reaching():
            return int(self._start(keys=[KEY_PREFIX + uid, LEASES],
                                   args=[json.dumps(RUNNING), json.dumps(QUEUED), encoded, lease_seconds, uid]))

    def renew(self, uid: str, worker: str, lease_seconds: float) -> bool:
        """Extend ``worker``'s lease on running job ``uid`` to ``lease_seconds`` from now; False when not its own."""
        with self._reaching():
            return self._renew(keys=[KEY_PREFIX + uid, LEASES],
                               args=[json.dumps(RUNNING), json.dumps(worker), lease_seconds, uid]) == 1

    def reap(self, republish_after: float) -> list[str]:
        """Jobs to publish again: running ones whose lease expired (set back to queued) and requeued ones
        still queued ``republish_after`` seconds later. Each uid goes to one caller only."""
        with self._reaching():
            uids = self._reap(keys=[LEASES], args=[KEY_PREFIX, json.dumps(RUNNING), json.dumps(QUEUED),
                                                    json.dumps(time.time()), republish_after])
        return [uid.decode() for uid in uids]

    def _release(self, uid: str) -> None:
        with self._reaching():
            self.client.zrem(LEASES, uid)

    def mark_queued(self, uid: str) -> bool:
        """Running -> queued again, waiting for a retry (no lease: its retry message is scheduled)."""
        done = self._update(uid, (RUNNING,), status=QUEUED)
        self._release(uid)
        return done

    def mark_completed(self, uid: str, output_dir: str) -> bool:
        done = self._update(uid, UNFINISHED, status=COMPLETED, output_dir=output_dir, finished=time.time())
        self._release(uid)
        return done

    def mark_failed(self, uid: str, error: str, error_status: int = 500) -> bool:
        done = self._update(uid, UNFINISHED, status=FAILED, error=error, error_status=error_status,
                            finished=time.time())
        self._release(uid)
        return done
