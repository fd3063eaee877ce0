"""Prometheus metrics of the gateway (``GET /metrics``), correct across gunicorn's worker processes.

Under gunicorn, ``gunicorn.conf.py`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before
the workers start, so every worker writes its samples there and any worker's ``/metrics`` sums
them (prometheus-client's multiprocess mode); a dead worker's gauges are dropped by the
``child_exit`` hook (``inference.metrics_dir``, which gunicorn's master imports instead of this module:
importing this one creates the metrics, and their files, in the importing process).
Without that variable (``python mock_server.py``, tests in one process)
the process's own registry is served.

The DICOM node reports through ``record_dicom_received``, ``record_dicom_sent``, ``set_dicom_outbox`` and
``record_dicom_incomplete``; jobs are counted from the job store at scrape time (``JobCountsCollector``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from models.monitoring import BUCKETS as WATCHED_BUCKETS

log = logging.getLogger("inference.metrics")

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
BYTES_BUCKETS = tuple(1024 * 4**k for k in range(12))  # 1 KiB to 4 GiB

REQUESTS = Counter("inference_http_requests_total", "HTTP requests answered, by route, command and status",
                   ["route", "command", "status"])
LATENCY = Histogram("inference_http_request_seconds", "Time from the request's start to the last byte sent",
                    ["route"], buckets=SECONDS_BUCKETS)
BYTES_IN = Histogram("inference_http_request_bytes", "Request body bytes read", ["route"], buckets=BYTES_BUCKETS)
BYTES_OUT = Histogram("inference_http_response_bytes", "Response body bytes", ["route"], buckets=BYTES_BUCKETS)
MODEL_SECONDS = Histogram("inference_model_seconds", "Seconds a handler (model) ran, by model and version",
                          ["model", "version"], buckets=SECONDS_BUCKETS)
RADIOMICS_MESSAGES = Counter("inference_radiomics_messages_total",
                             "Radiomics API Feedback and Telemetry messages stored, by kind and outcome "
                             "(feedback: accepted or rejected by the clinician; telemetry: the client error)",
                             ["kind", "outcome"])
STORE_FULL = Counter("inference_store_full_total", "Writes refused because a store's filesystem was full "
                     "(507), by store (spool, output, pacs)", ["store"])
DICOM_RECEIVED = Counter("inference_dicom_node_received_total", "DICOM instances the node received")
DICOM_SENT = Counter("inference_dicom_node_sent_total", "DICOM instances the node sent")
DICOM_INCOMPLETE = Counter("inference_dicom_node_incomplete_studies_total",
                           "Studies the node received only part of and nothing completed: reported, not run")
DICOM_OUTBOX = Gauge("inference_dicom_node_outbox", "DICOM instances waiting in the node's outbox",
                     multiprocess_mode="mostrecent")

WATCHED = {name: Histogram(f"inference_model_{name}", f"Results' {name.replace('_', ' ')} (drift watch), by model "
                                                      "family and version", ["family", "version"], buckets=bounds)
           for name, bounds in WATCHED_BUCKETS.items()}
RESULTS = Counter("inference_model_results_total", "Model results made, by family, version and quality flag",
                  ["family", "version", "flagged"])
FLAG_REASONS = Counter("inference_model_flag_reasons_total", "Reasons results were flagged, by family, version and "
                       "kind (an input check's name, uncertainty, not_validated)", ["family", "version", "kind"])


def observe_result(family: str, version: str, values: dict[str, float], flagged: bool, kinds: list[str]) -> None:
    """Record one model result: its watched quantities (``WATCHED_BUCKETS`` names), its flag and the flag's kinds."""
    for name, value in values.items():
        WATCHED[name].labels(family, version).observe(value)
    RESULTS.labels(family, version, "true" if flagged else "false").inc()
    for kind in kinds:
        FLAG_REASONS.labels(family, version, kind).inc()


def watched_counts(multiproc_dir: Path | None) -> dict[tuple[str, str], dict]:
    """The watched histograms and result counts as served now: (family, version) -> {quantity: per-bucket counts
    (not cumulative, the last above the highest bound)}, plus ``results`` and ``flagged`` totals."""
    registry = CollectorRegistry()
    if multiproc_dir is not None:
        multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))
    else:
        registry.register(_ThisProcess())
    out: dict[tuple[str, str], dict] = {}
    prefixes = {f"inference_model_{name}_bucket": name for name in WATCHED_BUCKETS}
    for family in registry.collect():
        for sample in family.samples:
            key = (sample.labels.get("family", ""), sample.labels.get("version", ""))
            if sample.name in prefixes:
                name = prefixes[sample.name]
                bounds = WATCHED_BUCKETS[name]
                le = sample.labels["le"]
                index = len(bounds) if le == "+Inf" else bounds.index(float(le))
                entry = out.setdefault(key, {"results": 0.0, "flagged": 0.0})
                entry.setdefault(name, [0.0] * (len(bounds) + 1))[index] += sample.value
            elif sample.name == "inference_model_results_total":
                entry = out.setdefault(key, {"results": 0.0, "flagged": 0.0})
                entry["results"] += sample.value
                if sample.labels.get("flagged") == "true":
                    entry["flagged"] += sample.value
    for entry in out.values():  # cumulative (le) -> per bucket
        for name in WATCHED_BUCKETS:
            if name in entry:
                cumulative = entry[name]
                entry[name] = [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)]
    return out


def observe_request(route: str, command: str | None, status: int, seconds: float, bytes_in: int,
                    bytes_out: int) -> None:
    """Record one answered request (route is the URL rule, e.g. ``/query/<uid>``, never the raw path)."""
    REQUESTS.labels(route, command or "-", str(status)).inc()
    LATENCY.labels(route).observe(seconds)
    BYTES_IN.labels(route).observe(bytes_in)
    BYTES_OUT.labels(route).observe(bytes_out)


def observe_model(model: str, version: str | None, seconds: float) -> None:
    """Record one handler run of ``model`` (an inference command) at ``version``."""
    MODEL_SECONDS.labels(model, version or "default").observe(seconds)


def record_radiomics_message(kind: str, outcome: str) -> None:
    """Count one stored Radiomics Feedback or Telemetry message."""
    RADIOMICS_MESSAGES.labels(kind, outcome).inc()


def record_store_full(store: str) -> None:
    """Count a write refused for want of space in ``store`` (``inference.disk_space.STORES``)."""
    STORE_FULL.labels(store=store).inc()


def record_dicom_received(count: int = 1) -> None:
    """Hook for the DICOM node: ``count`` instances received."""
    DICOM_RECEIVED.inc(count)


def record_dicom_sent(count: int = 1) -> None:
    """Hook for the DICOM node: ``count`` instances sent."""
    DICOM_SENT.inc(count)


def record_dicom_incomplete() -> None:
    """Hook for the DICOM node: a study it received only part of, reported and not run."""
    DICOM_INCOMPLETE.inc()


def set_dicom_outbox(count: int) -> None:
    """Hook for the DICOM node: instances now waiting in its outbox."""
    DICOM_OUTBOX.set(count)


class JobCountsCollector(Collector):
    """Jobs by state and the queue depth, read from the shared job store when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]], states: tuple[str, ...]) -> None:
        self._counts = counts
        self._states = states

    def collect(self):
        try:
            counts = self._counts()
        except Exception as exc:  # the job store (Redis) unreachable: the other metrics are still served
            log.warning("job metrics left out of this scrape: %s", exc)
            yield GaugeMetricFamily("inference_job_store_up", "Whether the job store answered this scrape", value=0)
            return
        yield GaugeMetricFamily("inference_job_store_up", "Whether the job store answered this scrape", value=1)
        by_state = GaugeMetricFamily("inference_jobs", "Jobs in the job store, by state", labels=["state"])
        for state in self._states:
            by_state.add_metric([state], counts.get(state, 0))
        yield by_state
        yield GaugeMetricFamily("inference_job_queue_depth", "Jobs queued and not yet running",
                                value=counts.get("queued", 0))


class _ThisProcess(Collector):
    """The metrics of this process's default registry (when not under gunicorn)."""

    def collect(self):
        yield from REGISTRY.collect()


def render(multiproc_dir: Path | None, extra: tuple[Collector, ...] = ()) -> tuple[bytes, str]:
    """The exposition text (and its content type): all workers' samples in multiprocess mode."""
    registry = CollectorRegistry()
    if multiproc_dir is not None:
        multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))
    else:
        registry.register(_ThisProcess())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
