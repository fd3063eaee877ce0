"""gunicorn settings of the served gateway; every value comes from inference.config (env vars)."""

import os
import shutil
import sys
import tempfile

from inference.config import get_settings

_settings = get_settings()
# Metrics across workers (inference.metrics): every worker writes its samples into one folder, named
# here, before any worker imports prometheus_client, and emptied of a previous run's samples.
_own_metrics_dir = _settings.metrics_dir is None
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="inference-metrics-")
    get_settings.cache_clear()  # the workers inherit these settings: with the folder
    _settings = get_settings()
_metrics_dir = _settings.metrics_dir

# Each worker loads the models before it accepts a connection: a ready worker answers every
# healthcheck and request, never one that is still loading (see server.create_app).
wsgi_app = "server:create_app(warm_up_first=True)"
bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
threads = _settings.threads
# gthread plus JSON errors for what gunicorn refuses itself, probe threads, socket timeouts
worker_class = "inference.http.gunicorn_worker.GatewayWorker"
timeout = _settings.timeout  # large studies take minutes on CPU
graceful_timeout = _settings.graceful_timeout  # SIGTERM: in-flight requests get this long to finish
# idle connections outlive the clients' and load balancers' idle timeouts (60 s): the client closes
# first, so it never sends a request on a connection we are closing (the soak's resets at 5 s)
keepalive = _settings.keepalive
accesslog = None  # the gateway logs one line per request itself, tagged with the input hash
errorlog = "-"
capture_output = True
# No gunicornc control socket: every instance would share one default path (tests and the
# benchmark run several at once) and the gateway has no use for it. Ignored by gunicorn < 25.1.
control_socket_disable = True


def on_starting(server):
    from inference.folders import SERVER_FOLDERS, UnusableFolder, check_folders
    from inference.metrics_dir import prepare_multiproc_dir

    try:  # every folder setting created or writable, before a worker loads a model or takes a request
        check_folders(_settings, SERVER_FOLDERS)
    except UnusableFolder as exc:
        if _own_metrics_dir:
            shutil.rmtree(_metrics_dir, ignore_errors=True)
        sys.exit(f"gateway not started: {exc}")
    prepare_multiproc_dir(_metrics_dir)


def child_exit(server, worker):
    from inference.metrics_dir import worker_exited

    worker_exited(_metrics_dir, worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
