"""gunicorn settings of the served gateway; every value comes from inference.config (env vars)."""

import os
import shutil
import ssl
import sys
import tempfile

from inference.config import get_settings
from inference.paths import private_files
from inference.tls import TLSConfigError, harden

private_files()  # job store, history, audit trail, job folders: 0600 files, 0700 folders (workers inherit it)
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
# HTTPS when INFERENCE_TLS_CERT and INFERENCE_TLS_KEY are set (checked here: a bad file stops the start naming
# it); gthread workers build the context per connection, so a replaced certificate file is served at once
try:
    _tls = _settings.gateway_tls()
except TLSConfigError as exc:
    raise SystemExit(f"HTTPS: {exc}") from None
if _tls is not None:
    certfile, keyfile = str(_tls.cert), str(_tls.key)
    if _tls.ca is not None:  # mutual TLS: every client presents a certificate from this CA
        ca_certs, cert_reqs = str(_tls.ca), ssl.CERT_REQUIRED


def ssl_context(config, default_ssl_context_factory):
    """gunicorn's context, held to the policy of inference.tls (TLS 1.2+, AEAD forward-secret suites)."""
    return harden(default_ssl_context_factory())


accesslog = None  # the gateway logs one line per request itself, tagged with the input hash
errorlog = "-"
capture_output = True
# No gunicornc control socket: every instance would share one default path (tests and the
# benchmark run several at once) and the gateway has no use for it. Ignored by gunicorn < 25.1.
control_socket_disable = True


def on_starting(server):
    from inference.folders import SERVER_FOLDERS, UnusableFolder, check_folders
    from inference.metrics_dir import prepare_multiproc_dir
    from inference.storage.backend import checked_backend

    try:  # every folder setting created or writable, before a worker loads a model or takes a request
        check_folders(_settings, SERVER_FOLDERS)
    except UnusableFolder as exc:
        if _own_metrics_dir:
            shutil.rmtree(_metrics_dir, ignore_errors=True)
        sys.exit(f"gateway not started: {exc}")
    checked_backend(_settings)  # a store of another schema version stops gunicorn here, with one line, not each worker
    prepare_multiproc_dir(_metrics_dir)


def child_exit(server, worker):
    from inference.metrics_dir import worker_exited

    worker_exited(_metrics_dir, worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
