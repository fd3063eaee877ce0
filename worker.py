"""The job worker of the celery backend: ``celery -A worker worker --concurrency N [-Q gpu,cpu]``.

Runs the jobs that API instances with ``INFERENCE_JOB_BACKEND=celery`` publish, with the same
handlers and job executor as the gateway. Settings come from the same ``INFERENCE_*`` variables
(``INFERENCE_BROKER_URL``, ``INFERENCE_DATA_ROOT``, ``INFERENCE_OUTPUT_ROOT``...). Before it
consumes anything it checks that the data root and output root exist and are writable (with
several machines they are shared volumes: the data root readable, the output root writable) and
refuses to start otherwise. Its main process runs a ``LeaseReaper``: jobs whose worker died (lease run
out) are published again within about 1.25 leases. Without ``-Q`` it
serves every queue of ``INFERENCE_JOB_QUEUES``. Handlers warm up (models load) in each pool
process after the fork: CUDA cannot be initialised before one.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from celery import signals

# `celery -A worker` imports this module with the current folder on sys.path and removes it afterwards;
# what handlers import later (models, at warm-up in the pool processes) comes from the installed
# package (`pip install -e .`; the Docker image sets PYTHONPATH=/app).
from handlers import REGISTRY
from inference.config import get_settings
from inference.folders import problem as folder_problem
from inference.jobs.celery_backend import LeaseReaper, job_store, make_celery
from inference.logs import configure_logging
from inference.paths import private_files
from inference.pipeline.pipeline import Pipeline
from inference.storage.backend import backend_for
from inference.storage.migrations import StoreVersionError
from server import served_commands

log = logging.getLogger("inference.worker")
#: Folder settings a worker writes to besides the output root (created, or checked writable, at start).
WORKER_FOLDERS = ("spool_dir", "model_cache", "history_db", "audit_log")

private_files()  # results, job records and folders: the service user's alone (0600 files, 0700 folders)
settings = get_settings()
app = make_celery(settings)  # its pipeline is made at worker start, once the handlers are loaded


def storage_problems(data_root: Path | None, output_root: Path) -> list[str]:
    """What stops a worker from reading job inputs and writing outputs; empty when nothing does.

    The data root must be readable (it is mounted read-only in docker-compose.yml: jobs never
    write there), the output root writable: checked by creating a file, so permissions,
    read-only mounts and full disks all show.
    """
    problems = []
    for variable, root in (("INFERENCE_DATA_ROOT", data_root), ("INFERENCE_OUTPUT_ROOT", output_root)):
        if root is None:
            problems.append(f"{variable} is not set: workers read job inputs and write outputs below it")
        elif not root.is_dir():
            problems.append(f"{variable}={root} does not exist or is not a folder on this machine")
        elif variable == "INFERENCE_DATA_ROOT":
            try:
                with os.scandir(root) as entries:
                    next(entries, None)
            except OSError as exc:
                problems.append(f"{variable}={root} is not readable by this worker ({exc.strerror})")
        else:
            try:
                with tempfile.NamedTemporaryFile(dir=root, prefix=".worker-check-"):
                    pass
            except OSError as exc:
                problems.append(f"{variable}={root} is not writable by this worker ({exc.strerror})")
    return problems


@signals.setup_logging.connect
def _logging(**_) -> None:
    configure_logging(settings.logging_config)  # logging.yaml, as the API: celery leaves the root logger alone


@signals.worker_init.connect
def _check_and_load(**_) -> None:
    # the roots first: the other folders' checks create what is missing, the output root included
    problems = storage_problems(settings.data_root, settings.output_root) or [
        why for name in WORKER_FOLDERS if (why := folder_problem(settings, name)) is not None]
    if problems:
        message = ("worker not started: " + "; ".join(problems) + ". Both roots must be the storage the API "
                   "instances use (a shared volume across machines): inputs readable, outputs writable.")
        print(message, file=sys.stderr, flush=True)  # before celery's logging is set up: plain stderr
        os._exit(2)  # an exception would not do: celery logs and ignores those of signal handlers
    try:
        backend_for(settings).check()  # stores at another schema version: refused, naming inference-migrate
    except StoreVersionError as exc:
        print(f"worker not started: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    # the commands the API serves (the same settings: mocks only with INFERENCE_ENABLE_MOCKS)
    app.job_pipeline = Pipeline(settings, REGISTRY, commands=served_commands(settings))
    log.info("job worker: queues %s, commands %s, time limit %d s, visibility timeout %d s, data %s, output %s",
             sorted(consumed_queues()), ", ".join(spec.command for spec in app.job_pipeline.specs),
             settings.job_time_limit, settings.broker_visibility_timeout, settings.data_root, settings.output_root)


def consumed_queues() -> set[str]:
    """The queues this worker consumes: those of ``-Q``, or every configured queue."""
    return set(app.amqp.queues.consume_from or app.amqp.queues)


@signals.worker_process_init.connect
def _warm_up(**_) -> None:
    # in each pool process, after the fork; only the handlers whose queue this worker serves. A failed
    # warm-up is logged and does not stop the worker: that command's jobs fail and say why.
    consumed = consumed_queues()
    commands = [spec.command for spec in app.job_pipeline.specs if settings.job_queue(spec.command) in consumed]
    Pipeline(settings, REGISTRY, commands=commands).warm_up()


@signals.worker_ready.connect
def _start_reaper(**_) -> None:
    # in the main process only (the pool processes run jobs); stopped with the process
    LeaseReaper(app, job_store(settings)).start()
