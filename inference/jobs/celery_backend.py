"""The celery job backend: jobs published to Redis, run by ``celery -A worker worker`` processes.

``make_celery(settings)`` builds the Celery application that the API (to publish) and the
workers (to consume, see ``worker.py``) share: queues by command (``INFERENCE_JOB_QUEUES``),
one task, ``inference.run_job(uid)``, whose job record lives in ``RedisJobStore``.

Nothing is lost, nothing waits: the message is acknowledged only once the job has finished
(``acks_late``), and a worker process that dies mid-job gives it back at once
(``task_reject_on_worker_lost``). A whole worker that dies (machine gone, SIGKILL) cannot give
anything back, and Redis would hand its message on only after the visibility timeout, which must
exceed the longest job. So a running job holds a lease (``INFERENCE_JOB_LEASE_SECONDS``) that the
process running it renews every quarter of it; every worker's ``LeaseReaper`` publishes the job
again once its lease ran out, whatever the time limit, and an attempt starts only on a job no
live lease holds, so a late copy of the message (the visibility timeout, a broker reconnection)
never starts a job twice while its worker lives. A worker reserves one job at a time (prefetch 1),
so no job waits behind another. Every start counts an attempt; bad input fails at once; transient
errors are retried with backoff; a job past its time limit fails with reason ``timeout``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from functools import cache
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError

from inference.config import Settings
from inference.errors import ServiceUnavailable
from inference.jobs.executor import JobExecutor
from inference.jobs.redis_store import RedisJobStore
from inference.jobs.reviews import RedisReviews
from inference.jobs.store import FINISHED, TIMEOUT, Job
from inference.pipeline.pipeline import Pipeline

log = logging.getLogger("inference.jobs")

TASK_NAME = "inference.run_job"
#: Errors worth running the job again for: memory, network, the job store or broker briefly gone.
TRANSIENT_ERRORS = (MemoryError, ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError,
                    OperationalError, ServiceUnavailable)


def retry_delay(retries: int) -> float:
    """Seconds before retry number ``retries + 1``: 1, 2, 4, ... capped at a minute."""
    return float(min(60, 2 ** retries))


def hard_time_limit(time_limit: int) -> int:
    """Seconds after which a job's process is killed: its time limit plus a tenth of it (1 to 30 s) to clean up."""
    return time_limit + min(30, max(1, time_limit // 10))


def celery_config(settings: Settings) -> dict:
    """Celery settings for ``settings``; a ValueError when the visibility timeout would run jobs twice."""
    hard_limit = hard_time_limit(settings.job_time_limit)
    if settings.broker_visibility_timeout <= hard_limit:
        raise ValueError(
            f"INFERENCE_BROKER_VISIBILITY_TIMEOUT ({settings.broker_visibility_timeout} s) must exceed the job's hard "
            f"time limit ({hard_limit} s for INFERENCE_JOB_TIME_LIMIT={settings.job_time_limit}): Redis would hand "
            "a running job to a second worker. Raise it or lower the time limit.")
    routes = settings.job_queue_routes()
    # a dead worker's job is looked for every tenth of the timeout (1 to 10 s): one cheap Redis query
    restore_every = max(1, min(10, settings.broker_visibility_timeout // 10))
    return {
        "broker_url": settings.broker_url,
        # rediss://: TLS with the CA and client certificate of INFERENCE_REDIS_TLS_* (None: plain redis://)
        "broker_use_ssl": settings.redis_ssl_options(check=False),  # the stores check the files at start
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 2,
        "broker_transport_options": {
            "visibility_timeout": settings.broker_visibility_timeout,
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2,
        },
        # a submission with the broker down answers 503 in about a second, instead of hanging
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2,
                                      "interval_max": 0.5},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_time_limit,
        "task_time_limit": hard_limit,
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in sorted(set(routes.values()))],
        "task_default_queue": routes["*"],
        "task_ignore_result": True,  # the job record is the result
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


@cache
def _store(url: str) -> RedisJobStore:
    return RedisJobStore(url)


def job_store(settings: Settings) -> RedisJobStore:
    """This process's store for ``settings`` (one connection pool per process and URL)."""
    return _store(settings.redis_url())


class JobTask(Task):
    """Records what the task body cannot: a job killed by the hard time limit fails with ``timeout``."""

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        uid = args[0] if args else "?"
        if isinstance(exc, TimeLimitExceeded):
            log.error("job %s: past the hard time limit; its process was killed", uid)
            job_store(self.app.job_settings).mark_failed(uid, TIMEOUT, 500)
        else:
            log.error("job %s: the task failed outside the job: %r", uid, exc)
            job_store(self.app.job_settings).mark_failed(uid, "internal error while running the job; "
                                                              "see the worker log")


def run_job(task: Task, uid: str) -> None:
    """Body of ``inference.run_job``: one attempt at job ``uid`` with the shared executor."""

    settings: Settings = task.app.job_settings
    pipeline: Pipeline | None = task.app.job_pipeline
    if pipeline is None:
        raise RuntimeError("this celery app has no job pipeline: workers set app.job_pipeline at start (worker.py)")
    store = job_store(settings)
    job = store.get(uid)
    if job is None:
        log.warning("job %s: no record (submission withdrawn); message dropped", uid)
        return
    if job.status in FINISHED:
        log.info("job %s: already %s; duplicate delivery ignored", uid, job.status)
        return
    if job.attempts > settings.job_retries:  # its worker died every time: a job that kills its worker
        store.mark_failed(uid, f"gave up after {job.attempts} attempts: the worker running it died each time", 500)
        return
    worker = f"{task.request.hostname or socket.gethostname()}/{os.getpid()}"
    started = store.start(uid, worker, settings.job_lease_seconds)
    if started == 0:
        log.info("job %s: running under a live lease elsewhere; this copy of its message is dropped", uid)
        return
    if started < 0:
        return  # finished meanwhile by another delivery
    log.info("job %s: attempt %d on %s", uid, job.attempts + 1, worker)
    try:
        with LeaseKeeper(store, uid, worker, settings.job_lease_seconds):
            JobExecutor(store, pipeline, reviews=RedisReviews(store.client),
                        reraise=(SoftTimeLimitExceeded, *TRANSIENT_ERRORS))(job)
    except SoftTimeLimitExceeded:
        log.error("job %s: past its time limit (%d s)", uid, settings.job_time_limit)
        store.mark_failed(uid, TIMEOUT, 500)
    except TRANSIENT_ERRORS as exc:
        retries = task.request.retries
        if retries >= settings.job_retries:
            log.error("job %s: transient error, no retries left: %r", uid, exc)
            store.mark_failed(uid, f"gave up after {retries + 1} runs; last error: {type(exc).__name__}: {exc}", 500)
            return
        delay = retry_delay(retries)
        log.warning("job %s: transient error %r; retry %d of %d in %.0f s", uid, exc, retries + 1,
                    settings.job_retries, delay)
        store.mark_queued(uid)
        try:
            retry = task.retry(exc=exc, countdown=delay, max_retries=settings.job_retries, throw=False)
        except Reject:  # the retry could not be published: the broker is gone too
            store.mark_failed(uid, f"could not be queued for a retry after {type(exc).__name__}: {exc}", 500)
            raise
        raise retry from exc


class LeaseKeeper:
    """Renews a running job's lease every quarter of it, from a thread, while the job runs (a ``with`` block)."""

    def __init__(self, store: RedisJobStore, uid: str, worker: str, lease_seconds: float) -> None:
        self.store, self.uid, self.worker, self.lease_seconds = store, uid, worker, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{uid}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            try:
                if not self.store.renew(self.uid, self.worker, self.lease_seconds):
                    log.error("job %s: its lease was taken over (this worker was unreachable longer than the "
                              "lease); another attempt may run it too", self.uid)
                    return
            except ServiceUnavailable as exc:  # Redis briefly gone: keep trying, the reaper waits for us
                log.warning("job %s: could not renew its lease: %s", self.uid, exc)


class LeaseReaper:
    """Publishes again the jobs whose lease ran out: their worker died. One per worker main process.

    Every quarter of the lease it asks Redis (``RedisJobStore.reap``, atomic: each job goes to one
    reaper) and publishes each job to its queue. After Redis was unreachable it waits one lease
    before reaping again, so live workers renew the leases that ran out during the outage first.
    """

    def __init__(self, app: Celery, store: RedisJobStore) -> None:
        self.app = app
        self.store = store
        self.settings: Settings = app.job_settings

    def run_once(self) -> list[str]:
        """One look: the uids published again."""
        uids = self.store.reap(republish_after=10 * self.settings.job_lease_seconds)
        for uid in uids:
            job = self.store.get(uid)
            if job is None:
                continue
            self.app.send_task(TASK_NAME, args=[uid], queue=self.settings.job_queue(job.command))
            log.warning("job %s: its lease ran out (worker %s died or lost Redis); queued again after %d attempts",
                        uid, job.worker, job.attempts)
        return uids

    def start(self) -> None:
        """Look every quarter lease from a daemon thread, for the life of this process."""
        threading.Thread(target=self._loop, name="lease-reaper", daemon=True).start()

    def _loop(self) -> None:
        every = self.settings.job_lease_seconds / 4
        last_failure = -float("inf")
        while True:
            time.sleep(every)
            try:
                if time.monotonic() - last_failure < self.settings.job_lease_seconds:
                    self.store.client.ping()  # back for less than a lease: live workers renew theirs first
                    continue
                self.run_once()
            except (ServiceUnavailable, OperationalError, redis.RedisError) as exc:
                if time.monotonic() - last_failure > every * 2:
                    log.warning("lease reaper: Redis unreachable (%s); reaping resumes a lease after it is back", exc)
                last_failure = time.monotonic()
            except Exception:  # the reaper must outlive any one job's trouble
                log.exception("lease reaper: unexpected error; it keeps running")


def make_celery(settings: Settings, pipeline: Pipeline | None = None) -> Celery:
    """The Celery application of the job backend, configured from ``settings``.

    ``pipeline`` runs the jobs: workers need one (``worker.py`` gives it the commands the API
    serves), an API that only publishes does not.
    """
    app = Celery("inference", task_cls=JobTask)
    app.conf.update(celery_config(settings))
    app.job_settings = settings
    app.job_pipeline = pipeline
    app.task(bind=True, name=TASK_NAME)(run_job)
    return app


class CeleryRunner:
    """Submits jobs to the workers through the broker, on the queue of the job's command."""

    def __init__(self, app: Celery, store: RedisJobStore) -> None:
        self.app = app
        self.store = store
        self.owner = "celery"

    def submit(self, job: Job) -> None:
        """Publish ``job`` (already in the store); a 503 without a record left when the broker is down."""
        settings: Settings = self.app.job_settings
        try:
            self.app.send_task(TASK_NAME, args=[job.uid], task_id=job.uid, queue=settings.job_queue(job.command))
        except OperationalError as exc:
            self.store.remove(job.uid)
            raise ServiceUnavailable(f"the job broker is unreachable ({exc}); the job was not queued: retry "
                                     "later. Synchronous requests are still served.") from exc

    def recover(self) -> list[str]:
        """Nothing to do: the broker gives a dead worker's jobs to another worker."""
        return []


def celery_backend(settings: Settings) -> tuple[RedisJobStore, CeleryRunner]:
    """The store and runner of ``INFERENCE_JOB_BACKEND=celery``."""
    store = job_store(settings)
    return store, CeleryRunner(make_celery(settings), store)
