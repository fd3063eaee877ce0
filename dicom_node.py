"""The DICOM node: takes studies a PACS routes to it (C-STORE), runs the models on them, stores results back.

    python dicom_node.py --ae-title HIPPOAI --port 11112 --destination ORTHANC@127.0.0.1:4242

Flow: C-STORE -> spool (one folder per study, raw bytes) -> study quiet for ``--stable-seconds``
(or, from a calling AE given to ``--complete-on-release``, its association released; never while it
is known incomplete: a C-STORE of it refused or failed, its files found at start) -> routing
rules (``--rules``) pick the commands -> one job per command through the job store and runner
(shown by the gateway's ``/query``) -> the job's DICOM outputs (SEG, SR, Secondary Capture) -> outbox
-> C-STORE to every ``--destination`` (and STOW-RS to ``--stow-url``), retried with backoff until
confirmed. Everything in between is on disk: a restarted node resumes.
Jobs go to the configured backend (``INFERENCE_JOB_BACKEND``): a local thread pool and SQLite, or,
with ``celery``, the Celery workers and the Redis job records the API answers ``/query`` from.
A rule with ``review: required`` (or ``flagged``) holds its results until a reviewer decides through
the gateway (``GET /reviews``, the ``/review/`` page): accepted ones go out as above, a correction
goes out instead of the model's, rejected ones go nowhere; the study's spool folder stays meanwhile.
Each (study content, command, parameters, model version) runs once: ``processed/<input hash>``
names its job. A study sent again delivers that job's stored results again (the same files, so
the same SOP Instance UIDs: a PACS that still holds them stores nothing twice); a changed study
or model version runs again.
Every flag has an environment variable (``inference/config.py``; the README's configuration table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import logging.config
import shutil
import signal
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
import yaml
from prometheus_client import start_http_server
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from handlers import load_handlers
from inference import protocol
from inference.audit import audit_log
from inference.config import Settings
from inference.dicom.files import dicom_files_in
from inference.dicom.header import read_header
from inference.disk_space import StoreFull, check_free_space
from inference.errors import GatewayError
from inference.folders import NODE_FOLDERS, check_folders
from inference.jobs.executor import JobExecutor, job_request_json
from inference.jobs.reviews import AWAITING, CORRECTED, REJECTED, Review, review_records
from inference.jobs.store import (
    COMPLETED,
    FAILED,
    INCOMPLETE,
    INTERRUPTED,
    UNFINISHED,
    Job,
    JobRecords,
    JobRunner,
    JobStore,
    LocalPoolRunner,
)
from inference.logs import TaggedLogger
from inference.metrics import record_dicom_incomplete, record_dicom_received, record_store_full
from inference.pacs.outbox import Destination, DicomDestination, Outbox, StowDestination
from inference.pacs.retry import RepeatedFailures
from inference.pacs.routing import Rule, load_rules, matching_rules
from inference.pacs.spool import StudySpool, read_series_info, safe_name
from inference.pacs.transport import NO_DELAY_HANDLERS, LazyHandshakeContext
from inference.paths import private_files
from inference.pipeline.pipeline import Pipeline
from inference.protocol.input_hash import input_hash_of_files
from inference.storage.backend import REDIS, Backend, backend_for
from inference.storage.migrations import StoreVersionError
from inference.tls import TLSConfigError
from models.registry import ManifestError

log = TaggedLogger(logging.getLogger("inference.pacs"))

#: Image storage classes the models read: MR, CT, their enhanced forms, secondary captures. Every other
#: storage class (``AllStoragePresentationContexts``: SEG, SR, presentation states, documents...) is
#: accepted too, as a study re-sent whole holds them, and acknowledged without being kept.
INPUT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
)
#: Uncompressed and the usual compressed syntaxes (pydicom decodes them: RLE itself, JPEG and
#: JPEG 2000 through Pillow, JPEG-LS through pyjpegls).
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
)
STATE_FILE = ".work.json"
#: In a study's work folder once its arrival is in the audit trail (a retried routing step does not add it again).
RECEIVED_FILE = ".received"
DELIVERING, DONE_FAILED = "delivering", "failed"
#: A job's results held for a reviewer (``inference.jobs.reviews``), and results a reviewer rejected: nothing sent.
HELD, DONE_REJECTED = "held", "rejected"


def job_pipeline(settings: Settings, rules: Sequence[Rule]) -> Pipeline:
    """The pipeline the node's jobs run through: the rules' commands, each rule's parameters checked.

    Its data root is the node's spool, where the jobs' study folders are. ``ValueError`` naming the
    rule when a command is unknown or a parameter is refused.
    """
    job_settings = dataclasses.replace(settings, data_root=Path(settings.pacs_root) / "spool")
    try:
        pipeline = Pipeline(job_settings, commands=sorted({rule.command for rule in rules}))
    except GatewayError as exc:
        raise ValueError(f"routing rules: {exc.message}") from None
    for rule in rules:
        try:
            pipeline.check_request({"inference_command": rule.command, **rule.params})
        except GatewayError as exc:
            raise ValueError(f"routing rule {rule.name}: {exc.message}") from None
    return pipeline


def job_backend(settings: Settings, backend: Backend, pipeline: Pipeline) -> tuple[JobRecords, JobRunner]:
    """The job store and runner of ``backend``: the API's, so ``/query`` and ``/metrics`` show node jobs.

    Redis (``INFERENCE_JOB_BACKEND=celery``): jobs queued for the workers (they read the spool below
    ``INFERENCE_PACS_ROOT``: a shared volume). SQLite: ``<INFERENCE_OUTPUT_ROOT>/jobs.sqlite3``, a thread pool here.
    """
    if backend.kind == REDIS:
        from inference.jobs.celery_backend import celery_backend  # celery is imported only when used

        return celery_backend(settings)
    store = JobStore(backend.folder / "jobs.sqlite3")
    return store, LocalPoolRunner(store, JobExecutor(store, pipeline, reviews=review_records(backend)),
                                  workers=settings.job_workers, lock_dir=backend.folder / ".owners")


@dataclasses.dataclass
class Transfer:
    """What one association did: instances stored and ignored, C-STOREs refused or failed, studies added to."""

    started: float = dataclasses.field(default_factory=time.time)
    stored: int = 0
    own: int = 0  # instances of our own results, ignored
    not_input: int = 0  # instances of storage classes the models do not read (SEG, SR, ...), ignored
    failed: int = 0  # C-STOREs answered with an error status
    first_error: str = ""
    studies: set[str] = dataclasses.field(default_factory=set)

    def summary(self) -> str:
        ignored = [f"{self.own} of our own results" if self.own else "",
                   f"{self.not_input} not images the models read (SEG, SR, ...)" if self.not_input else ""]
        text = f"{self.stored} instances stored"
        if any(ignored):
            text += f", {' and '.join(filter(None, ignored))} ignored"
        if self.failed:
            text += f", {self.failed} refused or failed (first: {self.first_error})"
        return text


def model_version_label(pipeline: Pipeline, rule: Rule) -> str:
    """What identifies the model a rule runs: family, version and weights digest; ``-`` for a handler without one."""
    version = pipeline.check_request({"inference_command": rule.command, **rule.params}).model_version
    return "-" if version is None else f"{version.family}:{version.version}:{version.sha256[:16]}"


class DicomNode:
    """The listener, the spool watcher, the job submission and the outbox of one node process."""

    def __init__(self, settings: Settings, rules: Sequence[Rule]) -> None:
        self.settings = settings
        self.rules = list(rules)
        root = Path(settings.pacs_root)
        self.pipeline = job_pipeline(settings, self.rules)
        self.spool = StudySpool(self.pipeline.settings.data_root, settings.pacs_stable_seconds)
        self.processed = root / "processed"
        self.processed.mkdir(parents=True, exist_ok=True)
        self.own_series = root / "results-series"  # one empty file per series of results we produced
        self.own_series.mkdir(parents=True, exist_ok=True)
        try:
            self.tls = settings.pacs_tls()  # DICOM TLS both ways, and STOW-RS verified against its CA
        except TLSConfigError as exc:
            raise ValueError(f"DICOM TLS: {exc}") from None
        client_tls = None if self.tls is None else self.tls.client_context()
        destinations: list[Destination] = [DicomDestination.parse(text, settings.pacs_ae_title, client_tls)
                                           for text in settings.pacs_destinations]
        if settings.pacs_stow_url:
            destinations.append(StowDestination(settings.pacs_stow_url,
                                                None if self.tls is None else self.tls.https_session()))
        self.outbox = Outbox(root / "outbox", destinations, retry_max_seconds=settings.pacs_retry_max_seconds)
        backend = backend_for(settings)
        backend.check()  # a store at another schema version: StoreVersionError, naming the migrate command
        self.store, self.runner = job_backend(settings, backend, self.pipeline)
        self.reviews = review_records(backend)  # decisions made on any API instance, seen here
        self.audit = audit_log(settings)
        self.ae = self._make_ae()
        self._server = None
        self._tls_stamp = None if self.tls is None else self.tls.stamp()  # the files' state the listener serves
        self._metrics_server = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._transfers: dict[int, Transfer] = {}  # per open association (by id)
        self._studies_lock = threading.Lock()
        self.failures = RepeatedFailures(log)  # the watcher's steps that fail again and again
        self._audited: set[str] = set()  # work folders whose arrival is in the audit trail

    # -- DICOM ----------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.pacs_ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
        if self.settings.pacs_allowed_aes:
            ae.require_calling_aet = list(self.settings.pacs_allowed_aes)
        return ae

    def _transfer(self, assoc) -> Transfer:
        with self._studies_lock:
            return self._transfers.setdefault(id(assoc), Transfer())

    def _check_space(self) -> None:
        """``StoreFull`` (counted in ``inference_store_full_total``) while the spool's filesystem has less free
        space than INFERENCE_MIN_FREE_SPACE_MB: a study the node cannot keep is refused, not half-taken."""
        try:
            check_free_space("pacs", self.spool.root, self.settings.min_free_space_mb)
        except StoreFull:
            record_store_full("pacs")
            raise

    def _on_requested(self, event) -> None:
        """Refuse an association (rejected-transient, local-limit-exceeded) while the spool has no room."""
        try:
            self._check_space()
        except StoreFull as exc:
            calling = event.assoc.requestor.primitive.calling_ae_title  # not yet in requestor.ae_title
            log.warning("association from %s (%s) refused: %s", str(calling).strip(), event.assoc.requestor.address,
                        exc.message)
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)
            event.assoc.kill()  # returns once the rejection is sent

    def _on_store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        transfer = self._transfer(event.assoc)
        data = event.encoded_dataset()
        ignored: list[str] = []

        def keep(header: pydicom.Dataset) -> bool:
            reason = self._ignored_as(header)
            if reason:
                ignored.append(reason)
            return not reason

        try:
            self._check_space()  # below the floor mid-study: refused with "out of resources", the study incomplete
            header, folder = self.spool.store(data, calling, keep=keep)
        except (ValueError, OSError, StoreFull) as exc:
            # the study this instance belonged to is incomplete here: the association's end marks it so
            transfer.failed += 1
            study = self._study_of(data)
            if study is not None:
                with self._studies_lock:
                    transfer.studies.add(study)
            if transfer.failed == 1:  # once per association; its end says how many
                transfer.first_error = f"{type(exc).__name__}: {exc}"
                log.error("%s an instance from %s: %s", "refused" if isinstance(exc, ValueError) else
                          "could not spool", calling, exc.message if isinstance(exc, StoreFull) else exc)
            return 0xC000 if isinstance(exc, ValueError) else 0xA700  # cannot understand; out of resources
        record_dicom_received()
        if folder is None:  # ours (a PACS sending a whole study back), or no image the models read
            log.tag({"study": header.StudyInstanceUID}).debug("ignored %s from %s: %s", header.SOPInstanceUID,
                                                             calling, ignored[0])
            if ignored[0] == "own":
                transfer.own += 1
            else:
                transfer.not_input += 1
            return 0x0000
        log.tag({"study": header.StudyInstanceUID}).debug("stored %s from %s", header.SOPInstanceUID, calling)
        transfer.stored += 1
        with self._studies_lock:
            transfer.studies.add(folder)
        return 0x0000

    @staticmethod
    def _study_of(data: bytes) -> str | None:
        """The spool folder name of the study an instance that could not be stored belongs to, if readable."""
        try:
            study = str(read_header(data).dataset.get("StudyInstanceUID", ""))
        except Exception:  # unreadable: nothing of it was kept either
            return None
        return safe_name(study) if study else None

    def _ignored_as(self, header: pydicom.Dataset) -> str:
        """Why an instance is no input: ``own`` (one of our results), ``not input`` (a class the models do not
        read: SEG, SR, ...); empty for an input."""
        if self._is_own_result(header):
            return "own"
        return "" if str(header.get("SOPClassUID", "")) in INPUT_CLASSES else "not input"

    def _is_own_result(self, header: pydicom.Dataset) -> bool:
        """Whether an instance belongs to a series of results this node produced (recorded when delivered)."""
        series = str(header.get("SeriesInstanceUID", ""))
        return bool(series) and (self.own_series / safe_name(series)).exists()

    def _record_own_series(self, files: Sequence[Path]) -> None:
        """Note the series of result ``files`` as ours, so they are never taken as input when a PACS sends them back."""
        for path in files:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            (self.own_series / safe_name(str(header.SeriesInstanceUID))).touch()

    def _on_association(self, event) -> None:
        log.info("association from %s (%s:%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address,
                 event.assoc.requestor.port)

    def _on_association_end(self, event) -> None:
        released = event.event is evt.EVT_RELEASED
        calling = event.assoc.requestor.ae_title.strip()
        with self._studies_lock:
            transfer = self._transfers.pop(id(event.assoc), Transfer())
            still_sending = set().union(*(t.studies for t in self._transfers.values()))
        log.info("association from %s %s: %s", calling, "released" if released else "aborted", transfer.summary())
        routing_pacs = calling in self.settings.pacs_complete_on_release
        if transfer.failed:
            # not every instance the sender sent is here: the study must not run until a re-send completes it
            self._mark_incomplete(transfer.studies, f"the association from {calling} ended after {transfer.failed} "
                                                    f"C-STOREs refused or failed ({transfer.first_error})")
        elif not released and routing_pacs:
            self._mark_incomplete(transfer.studies, f"the association from {calling}, a routing PACS that sends a "
                                                    "whole study on one association, was aborted")
        elif released:
            for name in self.spool.confirm(transfer.studies, since=transfer.started):
                log.info("study folder %s: the re-send from %s completed it", name, calling)
            if routing_pacs:
                # a routing PACS sends a whole study on one association: its release ends the study (after a
                # short grace for a follow-up association), unless another association is still adding to it
                self.spool.complete(transfer.studies - still_sending, grace=self.settings.pacs_release_grace_seconds)

    def _mark_incomplete(self, studies: set[str], reason: str) -> None:
        for name in self.spool.mark_incomplete(studies, reason):
            log.tag({"study": self._study_uid(self.spool.incoming / name)}).warning(
                "study incomplete: %s; it is not run until a re-send completes it", reason)

    def _on_rejected(self, event) -> None:
        log.warning("association from %s (%s) rejected: calling AE title not in INFERENCE_PACS_ALLOWED_AES",
                    event.assoc.requestor.ae_title, event.assoc.requestor.address)

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Recover (interrupted jobs, outbox), start the senders, the watcher and the listener."""
        self.runner.recover()
        self.outbox.start()
        if not self.outbox.destinations:
            log.warning("no destination configured: results stay in the job output folders")
        if self.settings.pacs_metrics_port:
            self._metrics_server, _ = start_http_server(self.settings.pacs_metrics_port, self.settings.pacs_host)
            log.info("metrics on http://%s:%d/metrics", self.settings.pacs_host, self.settings.pacs_metrics_port)
        self._watcher = threading.Thread(target=self._watch, name="pacs-watch", daemon=True)
        self._watcher.start()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_ACCEPTED, self._on_association),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_association_end),
                    (evt.EVT_ABORTED, self._on_association_end), *NO_DELAY_HANDLERS]
        self._server = self.ae.start_server((self.settings.pacs_host, self.settings.pacs_port), block=False,
                                            evt_handlers=handlers, ssl_context=self.server_tls_context())
        log.info("DICOM node %s listening on %s:%d%s; destinations: %s; study stable after %.1fs%s; rules: %s",
                 self.settings.pacs_ae_title, self.settings.pacs_host, self.settings.pacs_port,
                 "" if self.tls is None else " (DICOM TLS" + (", client certificates required)" if self.tls.ca
                                                              else ")"),
                 ", ".join(map(str, self.outbox.destinations)) or "none", self.settings.pacs_stable_seconds,
                 f" or when {', '.join(self.settings.pacs_complete_on_release)} releases its association"
                 if self.settings.pacs_complete_on_release else "",
                 ", ".join(f"{r.name} -> {r.command}" for r in self.rules))

    def _reload_tls_if_changed(self) -> None:
        """Serve replaced certificate files (rotation) to the next associations, without a restart; files that
        do not serve (a key not matching yet, half-copied) keep the previous context until they do."""
        if self.tls is None or self._server is None:
            return
        stamp = self.tls.stamp()
        if stamp == self._tls_stamp:
            return
        try:
            self.tls.check()
            context = self.server_tls_context()
        except (TLSConfigError, ssl.SSLError, OSError) as exc:
            log.warning("DICOM TLS files changed but do not serve yet; keeping the previous certificate: %s", exc)
        else:
            self._server.ssl_context = context
            log.info("DICOM TLS: certificate reloaded from %s", self.tls.cert)
        self._tls_stamp = stamp

    def server_tls_context(self) -> ssl.SSLContext | None:
        """The listener's TLS context (handshakes out of the accept loop), None for plain DICOM."""
        return None if self.tls is None else self.tls.server_context(LazyHandshakeContext)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        self.outbox.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()

    def _watch(self) -> None:
        # short: a study completed by a release, or a finished job's results, move on within this
        interval = max(0.05, min(0.1, self.settings.pacs_stable_seconds / 4))
        while not self._stop.wait(interval):
            self.watch_once()
            self.failures.run("tls", "reloading the DICOM TLS certificate", self._reload_tls_if_changed)

    def watch_once(self) -> None:
        """One pass of the watcher: report incomplete studies nothing completed, take complete ones, move every
        study in ``work/`` on (routed, its jobs' results to the outbox). A step that fails is retried after a
        doubling wait and logged once with a count (``RepeatedFailures``); the other studies go on meanwhile."""
        self.failures.run("stalled", "reporting incomplete studies", self._report_stalled)
        folders: list[Path] = []
        self.failures.run("spool", "taking complete studies from the spool",
                          lambda: folders.extend(self._take_and_list()))
        for folder in folders:
            self.failures.run(f"study {folder.name}", f"moving study {folder.name} on",
                              lambda folder=folder: self.advance(folder))

    def _take_and_list(self) -> list[Path]:
        self.spool.take_stable()  # moved to work/: routed by advance() below
        return sorted(self.spool.work.iterdir())

    def _report_stalled(self) -> None:
        """Incomplete studies quiet for the stability wait: logged, counted, a failed job per matching rule."""
        for folder, reason in self.spool.stalled():
            series = read_series_info(folder)
            study_uid = self._study_uid(folder)
            rules = matching_rules(self.rules, series)
            for rule in rules:  # first: a store that cannot take them now leaves the report for the next try
                job = self._new_job(rule, folder)
                job.status, job.error, job.error_status = FAILED, f"{INCOMPLETE}: {reason}", 422
                job.finished = time.time()
                self.store.add(job)
            log.tag({"study": study_uid}).warning(
                "study incomplete and nothing completed it: %d instances in %d series received; %s; not run "
                "(rules %s); a re-send of the whole study runs it", len(dicom_files_in(folder)), len(series), reason,
                ", ".join(rule.name for rule in rules) or "none")
            record_dicom_incomplete()
            self.spool.reported(folder.name)

    # -- a complete study -----------------------------------------------------------------
    def route(self, folder: Path) -> None:
        """A study just became stable: run every matching rule's command once per input hash."""
        series = read_series_info(folder)
        study_uid = self._study_uid(folder)
        files = dicom_files_in(folder)
        study_log = log.tag({"study": study_uid})
        rules = matching_rules(self.rules, series)
        if folder.name not in self._audited and not (folder / RECEIVED_FILE).exists():
            # once per arrival, however often a later step fails and routing is tried again
            study_log.info("study complete: %d instances in %d series (%s)", len(files), len(series),
                           "; ".join(f"{s.modality} '{s.description}' from {s.calling_ae}" for s in series))
            entries = json.loads((folder / ".series.json").read_text()) if (folder / ".series.json").exists() else {}
            callers = ", ".join(sorted({f"ae:{s.calling_ae}" for s in series})) or None
            self.audit.append("study-received", user=callers, study_uid=study_uid, series_uids=entries.keys(),
                              door="dicom", instances=len(files), rules=[rule.name for rule in rules])
            self._audited.add(folder.name)
            try:
                (folder / RECEIVED_FILE).touch()
            except OSError:  # a full disk: remembered in memory meanwhile
                pass
        if not rules:
            study_log.warning("no routing rule matches this study (rules: %s); nothing run, no results",
                              "; ".join(f"{r.name}: modality={r.modality} series_description={r.series_description}"
                                        f" calling_ae={r.calling_ae}" for r in self.rules))
            self._drop(folder)
            return
        state: dict = {"study_uid": study_uid, "jobs": {}}
        for rule in rules:
            job = self._new_job(rule, folder)
            digest = input_hash_of_files(json.dumps(job_request_json(job)).encode(), files)
            run_log = study_log.tag({"input_hash": digest})
            version = model_version_label(self.pipeline, rule)
            marker = self.processed / digest
            earlier = self._earlier_job(marker, version)
            if earlier is not None and earlier.status in UNFINISHED:
                run_log.info("rule %s: this input is being processed by job %s (model %s); its results will be "
                             "delivered", rule.name, earlier.uid, version)
                continue
            if earlier is not None:  # completed, its outputs still there: deliver them again
                state["jobs"][earlier.uid] = {"rule": rule.name, "input_hash": digest, "state": "running"}
                self._save_state(folder, state)
                run_log.info("rule %s: this input was already processed with model %s (job %s); delivering its "
                             "stored results again, not running it again", rule.name, version, earlier.uid)
                continue
            # recorded before the job exists: after a crash in between, advance() finds the job
            # missing and submits it, and a second arrival of the study is still recognised
            self._mark(marker, job.uid, version)
            state["jobs"][job.uid] = {"rule": rule.name, "input_hash": digest, "state": "running"}
            self._save_state(folder, state)
            self._submit(job)
            run_log.info("rule %s: job %s queued (%s %s, model %s)", rule.name, job.uid, rule.command,
                         json.dumps(rule.params), version)
        if not state["jobs"]:
            self._drop(folder)

    def _earlier_job(self, marker: Path, version: str) -> Job | None:
        """The job that ran (or runs) this input with model ``version``: unfinished, or completed with its
        outputs still on disk; None when the input must run (never seen, another model, failed, outputs gone)."""
        try:
            mark = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None  # never processed (or a mark of an older node, which named no model: run again)
        if not isinstance(mark, dict) or mark.get("model") != version:
            return None
        job = self.store.get(str(mark.get("job")))
        if job is None or job.status == FAILED:
            return None
        if job.status == COMPLETED and not (Path(job.output_dir or "") / "response.json").is_file():
            return None
        return job

    @staticmethod
    def _mark(marker: Path, uid: str, version: str) -> None:
        marker.with_suffix(".tmp").write_text(json.dumps({"job": uid, "model": version}))
        marker.with_suffix(".tmp").replace(marker)

    def _new_job(self, rule: Rule, folder: Path) -> Job:
        return Job(job_name=rule.command, command=rule.command, in_dir=str(folder.relative_to(self.spool.root)),
                   params=dict(rule.params), spool=True, study_uid=self._study_uid(folder), review=rule.review)

    def _submit(self, job: Job) -> None:
        job.owner = self.runner.owner
        self.store.add(job)
        self.runner.submit(job)

    def advance(self, folder: Path) -> None:
        """Move a study's jobs on: finished ones to the outbox; the folder goes once all is delivered."""
        state = self._load_state(folder)
        if state is None:  # taken from incoming but not routed yet (a stop in between): route it now
            self.route(folder)
            return
        study_log = log.tag({"study": state["study_uid"]})
        changed = False
        for uid, entry in list(state["jobs"].items()):
            run_log = study_log.tag({"input_hash": entry["input_hash"]})
            if entry["state"] not in ("running", HELD):
                continue
            job = self.store.get(uid)
            if job is None or (job.status == FAILED and job.error == INTERRUPTED):
                rule = next((r for r in self.rules if r.name == entry["rule"]), None)
                if rule is None:
                    entry["state"] = DONE_FAILED
                    run_log.error("job %s was interrupted and its rule %s is no longer in the rules; not resubmitted",
                                  uid, entry["rule"])
                else:
                    replacement = self._new_job(rule, folder)
                    self._mark(self.processed / entry["input_hash"], replacement.uid,
                               model_version_label(self.pipeline, rule))
                    state["jobs"][replacement.uid] = state["jobs"].pop(uid)
                    self._save_state(folder, state)
                    self._submit(replacement)
                    run_log.warning("job %s was interrupted or never started; resubmitted as %s", uid,
                                    replacement.uid)
                changed = True
            elif job.status == COMPLETED:
                review = self.reviews.get(uid) if job.review else None
                if review is not None and review.status == AWAITING:
                    if entry["state"] != HELD:
                        entry["state"] = HELD
                        run_log.info("job %s completed: its results wait for a reviewer (review %s); nothing sent",
                                     uid, job.review)
                        changed = True
                    continue
                if review is not None and review.status == REJECTED:
                    entry["state"] = DONE_REJECTED
                    run_log.info("job %s: rejected by %s (%s); nothing sent", uid, review.decided_by, review.reason)
                    changed = True
                    continue
                files = self._release_files(job, review)
                self._record_own_series(files)  # before any destination has them
                self.outbox.put(uid, files, {"study": state["study_uid"], "input_hash": entry["input_hash"]})
                entry["state"] = DELIVERING
                if review is not None:
                    self.audit.append("result-released", user=f"ae:{self.settings.pacs_ae_title}",
                                      study_uid=state["study_uid"], input_hash=entry["input_hash"], job=uid,
                                      decision=review.status, decided_by=review.decided_by,
                                      files=[p.name for p in files])
                run_log.info("job %s completed%s: %d DICOM results (%s) to deliver", uid,
                             f", {review.status} by {review.decided_by}" if review else "", len(files),
                             ", ".join(p.name for p in files))
                changed = True
            elif job.status == FAILED:
                entry["state"] = DONE_FAILED
                run_log.error("job %s failed, no results for this study: %s", uid, job.error)
                changed = True
        if changed:
            self._save_state(folder, state)
        entries = state["jobs"].items()
        if all(e["state"] in (DONE_FAILED, DONE_REJECTED) or (e["state"] == DELIVERING and not self.outbox.pending(uid))
               for uid, e in entries):
            for uid, entry in entries:
                if entry["state"] == DELIVERING and self.outbox.destinations:
                    self.audit.append("result-sent", user=f"ae:{self.settings.pacs_ae_title}",
                                      study_uid=state["study_uid"], input_hash=entry["input_hash"], job=uid,
                                      destinations=[str(d) for d in self.outbox.destinations])
                    study_log.tag({"input_hash": entry["input_hash"]}).info(
                        "job %s: every result confirmed by every destination; study done", uid)
            self._drop(folder)

    def _drop(self, folder: Path) -> None:
        """A study's work folder is done with: removed."""
        shutil.rmtree(folder)
        self._audited.discard(folder.name)

    def _release_files(self, job: Job, review: Review | None) -> list[Path]:
        """What a completed job sends: the model's DICOM results, or, once corrected, the reviewer's."""
        output_dir = Path(job.output_dir or "")
        if review is not None and review.status == CORRECTED and review.correction:
            return [output_dir / name for name in review.correction["files"]]
        return self._dicom_outputs(output_dir)

    @staticmethod
    def _dicom_outputs(output_dir: Path) -> list[Path]:
        response = json.loads((output_dir / "response.json").read_text())
        return [output_dir / part["file"] for part in response["parts"] if part["binary_type"] in protocol.DICOM_TYPES]

    @staticmethod
    def _study_uid(folder: Path) -> str:
        entries = json.loads((folder / ".series.json").read_text()) if (folder / ".series.json").exists() else {}
        return next((e["study_uid"] for e in entries.values()), folder.name.split("--")[0])

    @staticmethod
    def _load_state(folder: Path) -> dict | None:
        try:
            return json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _save_state(folder: Path, state: dict) -> None:
        (folder / f"{STATE_FILE}.tmp").write_text(json.dumps(state))
        (folder / f"{STATE_FILE}.tmp").replace(folder / STATE_FILE)


def parse_args(argv: Sequence[str] | None, defaults: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python dicom_node.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ae-title", default=defaults.pacs_ae_title, help="our AE title (INFERENCE_PACS_AE_TITLE, "
                        "default %(default)s)")
    parser.add_argument("--host", default=defaults.pacs_host, help="bind address (INFERENCE_PACS_HOST, "
                        "default %(default)s)")
    parser.add_argument("--port", type=int, default=defaults.pacs_port, help="DICOM port (INFERENCE_PACS_PORT, "
                        "default %(default)s)")
    parser.add_argument("--destination", action="append", metavar="AE@HOST:PORT",
                        help="where results go by C-STORE; repeatable (INFERENCE_PACS_DESTINATIONS, comma-separated)")
    parser.add_argument("--stow-url", default=defaults.pacs_stow_url,
                        help="DICOMweb base URL results also go to by STOW-RS (INFERENCE_PACS_STOW_URL)")
    parser.add_argument("--stable-seconds", type=float, default=defaults.pacs_stable_seconds,
                        help="a study is complete once quiet this long (INFERENCE_PACS_STABLE_SECONDS, "
                             "default %(default)s)")
    parser.add_argument("--allow-ae", action="append", metavar="AE",
                        help="accept associations only from these calling AE titles; repeatable "
                             "(INFERENCE_PACS_ALLOWED_AES, comma-separated; default: any)")
    parser.add_argument("--complete-on-release", action="append", metavar="AE",
                        help="a study from this calling AE title (a routing PACS that sends a whole study on one "
                             "association) is complete when the association is released, without the stability "
                             "wait; repeatable (INFERENCE_PACS_COMPLETE_ON_RELEASE, comma-separated; default: none)")
    parser.add_argument("--rules", type=Path, default=defaults.pacs_rules,
                        help="routing rules YAML (INFERENCE_PACS_RULES, default deploy/routing-rules.yaml)")
    parser.add_argument("--tls-cert", type=Path, default=defaults.pacs_tls_cert,
                        help="PEM certificate: DICOM TLS for the listener and every destination "
                             "(INFERENCE_PACS_TLS_CERT)")
    parser.add_argument("--tls-key", type=Path, default=defaults.pacs_tls_key,
                        help="PEM private key of --tls-cert (INFERENCE_PACS_TLS_KEY)")
    parser.add_argument("--tls-ca", type=Path, default=defaults.pacs_tls_ca,
                        help="PEM CA: callers' certificates must come from it, destinations are verified against it "
                             "(INFERENCE_PACS_TLS_CA)")
    parser.add_argument("--root", type=Path, default=defaults.pacs_root,
                        help="folder for spool, outbox and processed marks (INFERENCE_PACS_ROOT)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace, defaults: Settings) -> Settings:
    """The environment's settings with the command line's flags on top."""
    for text in args.destination or []:
        DicomDestination.parse(text, args.ae_title)  # fail at start-up on a malformed one
    return dataclasses.replace(
        defaults, pacs_ae_title=args.ae_title, pacs_host=args.host, pacs_port=args.port,
        pacs_destinations=tuple(args.destination) if args.destination else defaults.pacs_destinations,
        pacs_stow_url=args.stow_url, pacs_stable_seconds=args.stable_seconds,
        pacs_allowed_aes=tuple(args.allow_ae) if args.allow_ae else defaults.pacs_allowed_aes,
        pacs_complete_on_release=tuple(args.complete_on_release) if args.complete_on_release
        else defaults.pacs_complete_on_release,
        pacs_rules=args.rules, pacs_root=args.root, pacs_tls_cert=args.tls_cert, pacs_tls_key=args.tls_key,
        pacs_tls_ca=args.tls_ca)


def main(argv: Sequence[str] | None = None) -> int:
    private_files()  # studies received, results, job records: the service user's alone (0600 / 0700)
    defaults = Settings.from_env()
    args = parse_args(argv, defaults)
    with open(defaults.logging_config, encoding="utf-8") as handle:
        logging.config.dictConfig(yaml.safe_load(handle))
    try:
        load_handlers(defaults.model_manifest)
        settings = settings_from_args(args, defaults)
        check_folders(settings, NODE_FOLDERS)  # UnusableFolder (a ValueError): the setting, its value and why
        rules = load_rules(settings.pacs_rules)
        node = DicomNode(settings, rules)
    except (ValueError, StoreVersionError, ManifestError) as exc:
        print(f"dicom_node: {exc}", file=sys.stderr)
        return 2
    if settings.job_backend == "local":  # its jobs run here: load the models now (the workers load their own)
        for spec in node.pipeline.specs:
            if spec.warm_up is not None:
                spec.warm_up(node.pipeline.settings)
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    node.start()
    while not stopped.wait(1.0):
        pass
    log.info("stopping")
    node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
