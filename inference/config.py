"""Every setting of the gateway, read from the environment in one place.

Each field documents its environment variable and default. Call ``Settings.from_env()``
(or ``get_settings()`` for the process-wide cached copy); nothing else reads ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

if TYPE_CHECKING:
    from inference.tls import TLSFiles

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env_str(name: str, default: str | None) -> str | None:
    value = os.environ.get(name)
    return default if value is None or value == "" else value


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {value!r}") from None


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma- or whitespace-separated list."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return tuple(item for item in value.replace(",", " ").split() if item)


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name} must be 1/true/yes/on or 0/false/no/off, got {value!r}")


def _env_path(name: str, default: str | None) -> Path | None:
    value = _env_str(name, default)
    return None if value is None else Path(value).expanduser()


@dataclass(frozen=True)
class Settings:
    """Gateway settings; the metadata ``env`` names the variable each one comes from."""

    #: INFERENCE_HOST: address the server binds to; this machine only unless set (the Docker image sets 0.0.0.0).
    host: str = field(default="127.0.0.1", metadata={"env": "INFERENCE_HOST"})
    #: INFERENCE_PORT: TCP port.
    port: int = field(default=8900, metadata={"env": "INFERENCE_PORT"})
    #: INFERENCE_TLS_CERT: PEM certificate (chain) the gateway serves HTTPS with; with INFERENCE_TLS_KEY it turns
    #: HTTPS on (TLS 1.2/1.3, AEAD forward-secret suites: inference/tls.py). Unset: plain HTTP (``make serve``).
    #: The file is read per connection: a replaced certificate is served without a restart.
    tls_cert: Path | None = field(default=None, metadata={"env": "INFERENCE_TLS_CERT"})
    #: INFERENCE_TLS_KEY: PEM private key of INFERENCE_TLS_CERT.
    tls_key: Path | None = field(default=None, metadata={"env": "INFERENCE_TLS_KEY"})
    #: INFERENCE_TLS_CLIENT_CA: PEM CA certificate(s); when set, every client must present a certificate from it
    #: (mutual TLS, for service clients). Unset: no client certificate asked.
    tls_client_ca: Path | None = field(default=None, metadata={"env": "INFERENCE_TLS_CLIENT_CA"})
    #: INFERENCE_WORKERS: gunicorn worker processes (gthread workers).
    workers: int = field(default=2, metadata={"env": "INFERENCE_WORKERS"})
    #: INFERENCE_THREADS: threads per gunicorn worker.
    threads: int = field(default=4, metadata={"env": "INFERENCE_THREADS"})
    #: INFERENCE_TIMEOUT: seconds a worker may spend on one request before gunicorn restarts it.
    timeout: int = field(default=900, metadata={"env": "INFERENCE_TIMEOUT"})
    #: INFERENCE_GRACEFUL_TIMEOUT: seconds in-flight requests get to finish after SIGTERM.
    graceful_timeout: int = field(default=120, metadata={"env": "INFERENCE_GRACEFUL_TIMEOUT"})
    #: INFERENCE_MAX_REQUEST_BYTES: largest accepted request body: 413 above, from Content-Length before reading,
    #: or while a chunked body streams in.
    max_request_bytes: int = field(default=2 * 1024**3, metadata={"env": "INFERENCE_MAX_REQUEST_BYTES"})
    #: INFERENCE_SPOOL_MEMORY_BYTES: request part bytes kept in memory; the rest spills to a temp file.
    spool_memory_bytes: int = field(default=16 * 1024**2, metadata={"env": "INFERENCE_SPOOL_MEMORY_BYTES"})
    #: INFERENCE_SPOOL_DIR: folder for spilled request parts (default: the system temp folder).
    spool_dir: Path | None = field(default=None, metadata={"env": "INFERENCE_SPOOL_DIR"})
    #: INFERENCE_READ_TIMEOUT: seconds a socket read or write may wait without progress before the
    #: connection is dropped (a stalled client frees its thread; 408 while reading a body).
    read_timeout: int = field(default=30, metadata={"env": "INFERENCE_READ_TIMEOUT"})
    #: INFERENCE_KEEPALIVE: seconds an idle keep-alive connection is kept open between requests: above the
    #: 60 s idle timeout of common clients and load balancers, so they close first, never racing our close.
    keepalive: int = field(default=75, metadata={"env": "INFERENCE_KEEPALIVE"})
    #: INFERENCE_MIN_UPLOAD_RATE: bytes per second a request body must average once it has been
    #: arriving for inference.http.gunicorn_worker.UPLOAD_GRACE_SECONDS (5 s; 408 below it); 0 turns the check off.
    min_upload_rate: int = field(default=32 * 1024, metadata={"env": "INFERENCE_MIN_UPLOAD_RATE"})
    #: INFERENCE_MIN_FREE_SPACE_MB: free space (MiB) a store's filesystem (spool, output, PACS root) must keep;
    #: below it ``/healthcheck`` says degraded and writes to that store are refused with 507 naming the store
    #: (inference.disk_space).
    min_free_space_mb: int = field(default=512, metadata={"env": "INFERENCE_MIN_FREE_SPACE_MB"})
    #: INFERENCE_MAX_SERIES_VOXELS: largest series (rows x columns x frames x instances) a request may hold
    #: (422 above, before any handler runs).
    max_series_voxels: int = field(default=256 * 1024**2, metadata={"env": "INFERENCE_MAX_SERIES_VOXELS"})
    #: INFERENCE_MODEL_MEMORY_BYTES: the memory one model run may take (default 4 GiB): a series whose run would
    #: need more (the model's own count, ``HippocampusSegmenter.peak_bytes``, checked against measured peaks in
    #: bench/README.md) gets a 422 naming this limit and the series, before its pixels are read. The networks take
    #: ``BATCH_PIXELS`` (128 x 64 x 64) pixels per batch whatever the slice size, so their memory does not grow
    #: with the series.
    model_memory_bytes: int = field(default=4 * 1024**3, metadata={"env": "INFERENCE_MODEL_MEMORY_BYTES"})
    #: INFERENCE_MAX_RESPONSE_BYTES: largest response body a handler may produce (413 above, before any of it is sent).
    max_response_bytes: int = field(default=1024**3, metadata={"env": "INFERENCE_MAX_RESPONSE_BYTES"})
    #: PROMETHEUS_MULTIPROC_DIR: folder where gunicorn's workers keep their metrics (prometheus-client's
    #: variable); gunicorn.conf.py empties it at start, or makes a temporary one when unset.
    metrics_dir: Path | None = field(default=None, metadata={"env": "PROMETHEUS_MULTIPROC_DIR"})
    #: INFERENCE_DATA_ROOT: folder that ``studyPath`` requests and jobs may read; unset disables both.
    data_root: Path | None = field(default=None, metadata={"env": "INFERENCE_DATA_ROOT"})
    #: INFERENCE_OUTPUT_ROOT: folder where jobs write their outputs, one sub-folder per job.
    output_root: Path = field(default=PROJECT_ROOT / "output" / "jobs", metadata={"env": "INFERENCE_OUTPUT_ROOT"})
    #: INFERENCE_JOB_WORKERS: jobs run at the same time in each server process (local backend).
    job_workers: int = field(default=1, metadata={"env": "INFERENCE_JOB_WORKERS"})
    #: INFERENCE_JOB_BACKEND: where jobs run: ``local`` (thread pool + SQLite) or ``celery`` (workers + Redis).
    job_backend: str = field(default="local", metadata={"env": "INFERENCE_JOB_BACKEND"})
    #: INFERENCE_BROKER_URL: Redis of the celery backend: its broker and its job records.
    broker_url: str = field(default="redis://localhost:6379/0",
                            metadata={"env": "INFERENCE_BROKER_URL", "secret": True})
    #: INFERENCE_REDIS_TLS_CERT: PEM client certificate presented to Redis over TLS (a ``rediss://``
    #: INFERENCE_BROKER_URL, e.g. ``rediss://inference:PASSWORD@redis:6380/0`` with an ACL user), for a Redis with
    #: ``tls-auth-clients yes``.
    redis_tls_cert: Path | None = field(default=None, metadata={"env": "INFERENCE_REDIS_TLS_CERT"})
    #: INFERENCE_REDIS_TLS_KEY: PEM private key of INFERENCE_REDIS_TLS_CERT.
    redis_tls_key: Path | None = field(default=None, metadata={"env": "INFERENCE_REDIS_TLS_KEY"})
    #: INFERENCE_REDIS_TLS_CA: PEM CA that Redis's certificate is verified against (unset: the system's CAs).
    redis_tls_ca: Path | None = field(default=None, metadata={"env": "INFERENCE_REDIS_TLS_CA"})
    #: INFERENCE_JOB_QUEUES: celery queue of each command, ``command=queue`` comma-separated, ``*`` for the rest.
    job_queues: str = field(default="get-hippocampus-volume=gpu,*=cpu", metadata={"env": "INFERENCE_JOB_QUEUES"})
    #: INFERENCE_JOB_TIME_LIMIT: seconds a celery job may run; it then fails with reason ``timeout`` (its process is
    #: killed a tenth of the limit later, 1 to 30 s).
    job_time_limit: int = field(default=900, metadata={"env": "INFERENCE_JOB_TIME_LIMIT"})
    #: INFERENCE_JOB_RETRIES: re-runs of a celery job after a transient error (out of memory, connection lost),
    #: with backoff 1, 2, 4 ... s.
    job_retries: int = field(default=3, metadata={"env": "INFERENCE_JOB_RETRIES"})
    #: INFERENCE_BROKER_VISIBILITY_TIMEOUT: seconds before Redis hands an unacknowledged job to another
    #: worker; must exceed the job time limit plus its grace. The broker's own late redelivery: the lease
    #: (INFERENCE_JOB_LEASE_SECONDS) brings a dead worker's job back sooner.
    broker_visibility_timeout: int = field(default=1200, metadata={"env": "INFERENCE_BROKER_VISIBILITY_TIMEOUT"})
    #: INFERENCE_JOB_LEASE_SECONDS: a running celery job's lease, renewed by its worker every quarter of it;
    #: a job whose lease ran out (its worker died) is queued again within about 1.25 times this.
    job_lease_seconds: int = field(default=20, metadata={"env": "INFERENCE_JOB_LEASE_SECONDS"})
    #: INFERENCE_API_TOKEN: when set, every route but /healthcheck and /ping needs ``Authorization: Bearer``;
    #: the Radiomics routes too, except from INFERENCE_RADIOMICS_NETWORKS; its holder acts as an admin. Named users
    #: (``python -m inference.users``) have tokens of their own, and turn the check on as well.
    api_token: str | None = field(default=None, metadata={"env": "INFERENCE_API_TOKEN", "secret": True})
    #: INFERENCE_AUTH_FAILURE_LIMIT: failed authentications (a bearer token not valid) allowed per client address and
    #: per token id within INFERENCE_AUTH_FAILURE_WINDOW_SECONDS; past it such requests get 429 with Retry-After.
    auth_failure_limit: int = field(default=10, metadata={"env": "INFERENCE_AUTH_FAILURE_LIMIT"})
    #: INFERENCE_AUTH_FAILURE_WINDOW_SECONDS: the sliding window of INFERENCE_AUTH_FAILURE_LIMIT.
    auth_failure_window_seconds: float = field(default=60.0, metadata={"env": "INFERENCE_AUTH_FAILURE_WINDOW_SECONDS"})
    #: INFERENCE_AUDIT_LOG: the audit trail, one hash-chained JSON line per event touching patient data;
    #: unset: ``<INFERENCE_OUTPUT_ROOT>/audit.jsonl``.
    audit_log: Path | None = field(default=None, metadata={"env": "INFERENCE_AUDIT_LOG"})
    #: INFERENCE_AUDIT_SYSLOG: ``host:port`` of a syslog receiver (UDP) every audit record is also sent to,
    #: as RFC 5424 (IHE ATNA); unset: none.
    audit_syslog: str | None = field(default=None, metadata={"env": "INFERENCE_AUDIT_SYSLOG"})
    #: INFERENCE_REVIEW_OVERDUE_SECONDS: a result held for review (``review: required``) longer than this is
    #: reported overdue in ``/metrics`` (``inference_reviews_overdue``), ``GET /reviews`` and the ``/review/`` page;
    #: it is never released without a decision.
    review_overdue_seconds: float = field(default=24 * 3600.0, metadata={"env": "INFERENCE_REVIEW_OVERDUE_SECONDS"})
    #: INFERENCE_RADIOMICS_NETWORKS: client networks (CIDR, e.g. ``10.1.2.0/24``, comma-separated) whose requests
    #: to the Radiomics API routes (``/api/...``) need no bearer token even when INFERENCE_API_TOKEN is set
    #: (Velocity sends none); unset: none.
    radiomics_networks: tuple[str, ...] = field(default=(), metadata={"env": "INFERENCE_RADIOMICS_NETWORKS"})
    #: INFERENCE_RADIOMICS_RESULT_SECONDS: seconds a Radiomics segmentation's result is kept after its job
    #: finished (a retried download works), then it is deleted with its records.
    radiomics_result_seconds: int = field(default=3600, metadata={"env": "INFERENCE_RADIOMICS_RESULT_SECONDS"})
    #: INFERENCE_RADIOMICS_SERVICE_URL: the service URL VendorStatus announces (ends in ``/api/v2/``); unset:
    #: the address the client called, from its Host header.
    radiomics_service_url: str | None = field(default=None, metadata={"env": "INFERENCE_RADIOMICS_SERVICE_URL"})
    #: INFERENCE_LOGGING_CONFIG: logging configuration (YAML, ``logging.config.dictConfig`` schema).
    logging_config: Path = field(default=PROJECT_ROOT / "logging.yaml", metadata={"env": "INFERENCE_LOGGING_CONFIG"})
    #: INFERENCE_DEFAULT_COMMAND: command run on ``POST /`` when the request JSON names none; unset: a 400 listing
    #: the commands served.
    default_command: str | None = field(default=None, metadata={"env": "INFERENCE_DEFAULT_COMMAND"})
    #: INFERENCE_ENABLE_MOCKS: also serve the mock handlers (integration and tests; ``mock_server.py`` always does);
    #: off in production.
    enable_mocks: bool = field(default=False, metadata={"env": "INFERENCE_ENABLE_MOCKS"})
    #: INFERENCE_MODEL_MANIFEST: the model registry's manifest (families, versions, weights and their SHA-256).
    model_manifest: Path = field(default=PROJECT_ROOT / "models" / "manifest.yaml",
                                 metadata={"env": "INFERENCE_MODEL_MANIFEST"})
    #: INFERENCE_MODEL_CACHE: folder keeping the models' exported ONNX graphs between starts (named by the
    #: weights' SHA-256, each checked against its own SHA-256 when read; the ensemble then loads in 0.6 s instead of
    #: 2.4 s); safe to delete.
    model_cache: Path = field(default=PROJECT_ROOT / "output" / "model-cache",
                              metadata={"env": "INFERENCE_MODEL_CACHE"})
    #: INFERENCE_HIPPOCAMPUS_SERIES: regular expression matched against SeriesDescription to find the crop;
    #: unset: the model version's own rule (``input.series_description`` in the manifest: ``HippoCrop``).
    hippocampus_series: str | None = field(default=None, metadata={"env": "INFERENCE_HIPPOCAMPUS_SERIES"})
    #: INFERENCE_HISTORY_DB: SQLite file of earlier hippocampus results by patient, for the change since the prior
    #: (the local job backend; the celery backend keeps them in Redis, shared by every machine: ``inference-migrate``
    #: copies such a file there);
    #: unset: ``<INFERENCE_OUTPUT_ROOT>/history.sqlite3``.
    history_db: Path | None = field(default=None, metadata={"env": "INFERENCE_HISTORY_DB"})
    #: INFERENCE_PRIOR_DICOMWEB_URL: a DICOMweb base URL (QIDO-RS, WADO-RS) where earlier studies' measurement
    #: reports are also looked up (set it for the DICOM node, e.g. the PACS's ``/dicom-web``); unset: our own store
    #: only.
    prior_dicomweb_url: str | None = field(default=None, metadata={"env": "INFERENCE_PRIOR_DICOMWEB_URL"})
    #: INFERENCE_PRIOR_TIMEOUT_SECONDS: longest a job waits for that PACS's priors (all its requests together; a
    #: connection gets at most 2 s of it); past it the result is made without them.
    prior_timeout_seconds: float = field(default=5.0, metadata={"env": "INFERENCE_PRIOR_TIMEOUT_SECONDS"})
    #: INFERENCE_PRIOR_RETRY_SECONDS: after that PACS failed to answer (refused, timed out, 5xx), how long it is not
    #: asked (each job's look-up skipped at once) before one look-up tries it again.
    prior_retry_seconds: float = field(default=60.0, metadata={"env": "INFERENCE_PRIOR_RETRY_SECONDS"})
    # -- the DICOM node (dicom_node.py); each also a command-line flag --------------------------
    #: INFERENCE_PACS_AE_TITLE: the node's own AE title (what the PACS calls and what its results carry).
    pacs_ae_title: str = field(default="HIPPOAI", metadata={"env": "INFERENCE_PACS_AE_TITLE"})
    #: INFERENCE_PACS_HOST: address the DICOM listener binds to.
    pacs_host: str = field(default="0.0.0.0", metadata={"env": "INFERENCE_PACS_HOST"})
    #: INFERENCE_PACS_PORT: TCP port of the DICOM listener.
    pacs_port: int = field(default=11112, metadata={"env": "INFERENCE_PACS_PORT"})
    #: INFERENCE_PACS_DESTINATIONS: where results go by C-STORE, ``AE@HOST:PORT`` separated by commas.
    pacs_destinations: tuple[str, ...] = field(default=(), metadata={"env": "INFERENCE_PACS_DESTINATIONS"})
    #: INFERENCE_PACS_STOW_URL: a DICOMweb base URL results are also stored to by STOW-RS (unset: none).
    pacs_stow_url: str | None = field(default=None, metadata={"env": "INFERENCE_PACS_STOW_URL"})
    #: INFERENCE_PACS_STABLE_SECONDS: a study is complete once no instance of it arrived for this long.
    pacs_stable_seconds: float = field(default=5.0, metadata={"env": "INFERENCE_PACS_STABLE_SECONDS"})
    #: INFERENCE_PACS_ALLOWED_AES: calling AE titles accepted, separated by commas (unset: any).
    pacs_allowed_aes: tuple[str, ...] = field(default=(), metadata={"env": "INFERENCE_PACS_ALLOWED_AES"})
    #: INFERENCE_PACS_COMPLETE_ON_RELEASE: calling AE titles (separated by commas) of routing PACSs that send
    #: a whole study on one association (Orthanc's routing does): such a study is complete shortly after that
    #: association is released (``INFERENCE_PACS_RELEASE_GRACE_SECONDS``), with no stability wait; their aborted
    #: association leaves the study incomplete (it waits for a re-send); any other AE keeps
    #: ``INFERENCE_PACS_STABLE_SECONDS`` (unset: every study waits, for senders that trickle). Compose sets ``ORTHANC``.
    pacs_complete_on_release: tuple[str, ...] = field(default=(),
                                                      metadata={"env": "INFERENCE_PACS_COMPLETE_ON_RELEASE"})
    #: INFERENCE_PACS_RELEASE_GRACE_SECONDS: after such a release, how long a study waits for a follow-up
    #: association of the same sender (Orthanc 1.10 opens one 0.06-0.13 s later for a study mixing SOP classes
    #: and transfer syntaxes: ``python -m bench.pacs_reopen``, five runs, loaded machine); an instance arriving
    #: meanwhile brings back the stability wait.
    pacs_release_grace_seconds: float = field(default=0.5, metadata={"env": "INFERENCE_PACS_RELEASE_GRACE_SECONDS"})
    #: INFERENCE_PACS_RULES: routing rules (YAML) deciding what runs on a complete study.
    pacs_rules: Path = field(default=PROJECT_ROOT / "deploy" / "routing-rules.yaml",
                             metadata={"env": "INFERENCE_PACS_RULES"})
    #: INFERENCE_PACS_ROOT: the node's folders: ``spool/`` (studies received), ``outbox/`` (results not yet
    #: confirmed), ``processed/`` (inputs already run, by input hash), ``results-series/`` (series it produced).
    pacs_root: Path = field(default=PROJECT_ROOT / "output" / "pacs", metadata={"env": "INFERENCE_PACS_ROOT"})
    #: INFERENCE_PACS_METRICS_PORT: TCP port where the node serves its Prometheus metrics (``GET /metrics``,
    #: no token: bind it to a private network; ``inference_dicom_node_*``; compose sets 9102, which
    #: deploy/prometheus.yml scrapes); 0: not served.
    pacs_metrics_port: int = field(default=0, metadata={"env": "INFERENCE_PACS_METRICS_PORT"})
    #: INFERENCE_PACS_TLS_CERT: PEM certificate (chain; RSA, as the BCP 195 suites need) of the node's DICOM TLS;
    #: with INFERENCE_PACS_TLS_KEY it turns TLS on for the listener and every C-STORE destination (port 2762 is
    #: the registered ``dicom-tls`` port). Unset: plain DICOM.
    pacs_tls_cert: Path | None = field(default=None, metadata={"env": "INFERENCE_PACS_TLS_CERT"})
    #: INFERENCE_PACS_TLS_KEY: PEM private key of INFERENCE_PACS_TLS_CERT.
    pacs_tls_key: Path | None = field(default=None, metadata={"env": "INFERENCE_PACS_TLS_KEY"})
    #: INFERENCE_PACS_TLS_CA: PEM CA certificate(s): callers must present a certificate from it, destinations (and
    #: an https:// STOW-RS URL) are verified against it. Unset with TLS on: callers need no certificate, destinations
    #: are verified against the system's CAs.
    pacs_tls_ca: Path | None = field(default=None, metadata={"env": "INFERENCE_PACS_TLS_CA"})
    #: INFERENCE_PACS_RETRY_MAX_SECONDS: longest wait between two delivery attempts (the wait doubles from 1 s).
    pacs_retry_max_seconds: float = field(default=60.0, metadata={"env": "INFERENCE_PACS_RETRY_MAX_SECONDS"})

    @classmethod
    def from_env(cls) -> Settings:
        """Build settings from the environment, falling back to each field's default."""
        values = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if f.type in ("int", int):
                values[f.name] = _env_int(name, f.default)
            elif f.type in ("float", float):
                values[f.name] = _env_float(name, f.default)
            elif str(f.type).startswith("tuple"):
                values[f.name] = _env_list(name, f.default)


            elif f.type in ("bool", bool):
                values[f.name] = _env_bool(name, f.default)
            elif "Path" in str(f.type):
                default = None if f.default is None else str(f.default)
                values[f.name] = _env_path(name, default)
            else:
                values[f.name] = _env_str(name, f.default)
        return cls(**values)

    def job_queue(self, command: str) -> str:
        """The celery queue that jobs of ``command`` go to (``INFERENCE_JOB_QUEUES``)."""
        routes = self.job_queue_routes()
        return routes.get(command, routes["*"])

    def job_queue_routes(self) -> dict[str, str]:
        """``INFERENCE_JOB_QUEUES`` parsed: command (or ``*``) -> queue; ``*`` defaults to ``cpu``."""
        routes = {"*": "cpu"}
        for item in filter(None, (part.strip() for part in self.job_queues.split(","))):
            command, sep, queue = (text.strip() for text in item.partition("="))
            if not sep or not command or not queue:
                raise ValueError(f"INFERENCE_JOB_QUEUES: {item!r} is not command=queue; "
                                 "e.g. 'get-hippocampus-volume=gpu,*=cpu'")
            routes[command] = queue
        return routes

    def gateway_tls(self) -> TLSFiles | None:
        """The gateway's HTTPS files, checked (``inference.tls.TLSConfigError`` names a bad one); None: plain HTTP."""
        from inference.tls import tls_files

        return tls_files(self.tls_cert, self.tls_key, self.tls_client_ca, "INFERENCE_TLS")

    def pacs_tls(self) -> TLSFiles | None:
        """The DICOM node's TLS files, checked (``inference.tls.TLSConfigError`` names a bad one); None: plain DICOM."""
        from inference.tls import tls_files

        return tls_files(self.pacs_tls_cert, self.pacs_tls_key, self.pacs_tls_ca, "INFERENCE_PACS_TLS")

    def redis_ssl_options(self, check: bool = True) -> dict[str, object] | None:
        """TLS options of every Redis client (redis-py's ``ssl_*`` names, as Celery's ``broker_use_ssl`` takes
        them) for a ``rediss://`` INFERENCE_BROKER_URL; None for ``redis://``. With ``check``, the files are checked
        and TLS files beside a ``redis://`` URL are an error (``redis_url`` checks; Celery's configuration,
        made where the files may not exist, does not)."""
        import ssl

        from inference.tls import TLSConfigError, check_ca, tls_files

        tls_set = any((self.redis_tls_cert, self.redis_tls_key, self.redis_tls_ca))
        if not self.broker_url.startswith("rediss://"):
            if tls_set and check:
                raise TLSConfigError("INFERENCE_REDIS_TLS_* are set but INFERENCE_BROKER_URL is not a rediss:// URL")
            return None
        options: dict[str, object] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
        if self.redis_tls_ca is not None:
            if check:
                check_ca(self.redis_tls_ca, "INFERENCE_REDIS_TLS_CA")
            options["ssl_ca_certs"] = str(self.redis_tls_ca)
        if check:
            tls_files(self.redis_tls_cert, self.redis_tls_key, None, "INFERENCE_REDIS_TLS")
        if self.redis_tls_cert is not None:
            options["ssl_certfile"] = str(self.redis_tls_cert)
        if self.redis_tls_key is not None:
            options["ssl_keyfile"] = str(self.redis_tls_key)
        return options

    def redis_url(self) -> str:
        """INFERENCE_BROKER_URL with its TLS options as query parameters (redis-py's ``from_url`` reads them): the
        one URL every Redis client of the job, user, review and Radiomics stores is made from."""
        options = self.redis_ssl_options()
        if not options:
            return self.broker_url
        query = {**options, "ssl_cert_reqs": "required"}
        return self.broker_url + ("&" if "?" in self.broker_url else "?") + urlencode(query)

    def describe(self) -> dict[str, str]:
        """Settings as strings for the start-up log, secrets masked."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            out[f.metadata["env"]] = str(value)
        return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings.from_env()
