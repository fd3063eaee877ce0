"""The Radiomics Segmentation API's routes on the gateway's app (Velocity's door).

    GET  /ping, /api/ping                                   ApiInformation
    GET  /api/v2/VendorStatus                               VendorStatus
    GET  /api/v2/Credits                                    Credits
    GET  /api/v2/Model/                                     ModelsCollection (from the model registry)
    POST /api/v2/Model/{ModelID}/segmentation               ModelInput -> SegmentationTask (a job)
    GET  /api/v2/Model/{ModelID}/segmentation/{ID}          SegmentationProgress
    GET  /api/v2/Model/{ModelID}/segmentation/{ID}/result   ModelOutput, one channel per structure
    POST /api/v2/Feedback/segmentation                      SegmentationFeedback, stored
    POST /api/v2/Telemetry/segmentation                     SegmentationTelemetry, stored

Bodies are raw protobuf (``Content-Type: application/x-protobuf``, else 415); answers are protobuf when
``Accept`` prefers ``application/x-protobuf``, protobuf-JSON otherwise (a missing Accept too). Handled
errors answer a BadRequestResponse; a wrong method is 403 (the reference's choice, kept). Paths match
case-insensitively, with or without a trailing slash, without redirects. A posted input becomes a job
(``VOLUME_JOB``) on the configured backend; its result is kept ``INFERENCE_RADIOMICS_RESULT_SECONDS``
after the job finished, then deleted.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Response, g, request
from flask.blueprints import BlueprintSetupState
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from inference import metrics
from inference.errors import GatewayError
from inference.http.current import audit_event, may_read
from inference.http.roles import needs
from inference.jobs.executor import VOLUME_JOB, save_volume_input, volume_input_folder
from inference.jobs.store import COMPLETED, FAILED, FINISHED, QUEUED, RUNNING, Job, JobRecords, JobRunner
from inference.logs import TaggedLogger
from inference.pipeline.pipeline import Pipeline
from inference.protocol.input_hash import input_hash_of
from inference.radiomics.catalogue import Catalogue, CatalogueModel
from inference.radiomics.proto import Model_pb2 as M
from inference.radiomics.records import (
    FEEDBACK,
    TELEMETRY,
    RadiomicsRecords,
    Segmentation,
)
from inference.radiomics.volumes import ERROR_CODES, InputRejected, channel_volume, output_channels
from inference.users import SUBMITTER

log = TaggedLogger(logging.getLogger("inference.radiomics"))

PROTOBUF, JSON = "application/x-protobuf", "application/json"
#: Largest Feedback or Telemetry body (they hold a few strings and numbers).
MAX_MESSAGE_BYTES = 1024**2
#: Methods every Radiomics route receives, so that a wrong one gets the protocol's 403, not Flask's 405.
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
#: The literal path segments of the API, in their canonical case.
LITERALS = {name.lower(): name for name in ("api", "v2", "ping", "VendorStatus", "Credits", "Model", "segmentation",
                                            "result", "Feedback", "Telemetry")}
#: Progress reported for a job's states (0 for queued serializes to an empty body, as the reference's).
PROGRESS = {QUEUED: 0, RUNNING: 50, COMPLETED: 100, FAILED: 0}


class RadiomicsError(Exception):
    """A request answered with a BadRequestResponse: its status and one sentence on what was wrong."""

    def __init__(self, status: int, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


class CanonicalPaths:
    """WSGI middleware: the API's paths in their canonical case, without a trailing slash.

    Only the literal segments change (``/API/V2/model/x/Segmentation/`` becomes
    ``/api/v2/Model/x/segmentation``); the model and segmentation ids keep their case.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        lower = path.lower()
        if lower.startswith("/api/") or lower in ("/api", "/ping/"):
            segments = path.strip("/").split("/")
            model_path = len(segments) > 2 and segments[2].lower() == "model"
            environ["PATH_INFO"] = "/" + "/".join(
                segment if model_path and index in (3, 5) else LITERALS.get(segment.lower(), segment)
                for index, segment in enumerate(segments))
        return self.app(environ, start_response)


def wants_protobuf() -> bool:
    """Whether the answer is binary protobuf: ``Accept`` prefers ``application/x-protobuf`` to JSON."""
    if not request.headers.get("Accept"):
        return False
    return request.accept_mimetypes.best_match([JSON, PROTOBUF], default=JSON) == PROTOBUF


def answer(message: Message, status: int = 200) -> Response:
    """``message`` in the negotiated format."""
    if wants_protobuf():
        return Response(message.SerializeToString(), status=status, content_type=PROTOBUF)
    text = json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)
    return Response(text, status=status, mimetype=JSON)


def read_body(limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 past it, before reading when Content-Length says so)."""
    if (request.content_length or 0) > limit:
        raise RadiomicsError(413, f"the body of {request.content_length} bytes exceeds this route's limit of "
                                  f"{limit} bytes")
    chunks, total = [], 0
    while chunk := request.stream.read(min(1 << 20, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise RadiomicsError(413, f"the body exceeds this route's limit of {limit} bytes")
    return b"".join(chunks)


def parse(kind: type[Message], body: bytes) -> Any:
    """``body`` parsed as a ``kind`` message; a 400 naming the message when it does not parse."""
    message = kind()
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise RadiomicsError(400, f"the body is not a valid Radiomics.{kind.__name__} message ({exc})") from None
    return message


def server_version() -> str:
    """What ping answers: the gateway's package version."""
    try:
        return f"inference-gateway {version('inference-gateway')}"
    except PackageNotFoundError:
        return "inference-gateway"


def token_free_networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``INFERENCE_RADIOMICS_NETWORKS`` parsed; a ValueError naming the entry that is not a network."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ValueError(f"INFERENCE_RADIOMICS_NETWORKS: {cidr!r} is not a network (e.g. 10.1.2.0/24 or "
                             "192.168.0.7)") from None
    return tuple(networks)


class RadiomicsDoor:
    """The routes' state: the pipeline, the catalogue, the job store and runner, the records."""

    def __init__(self, pipeline: Pipeline, catalogue: Catalogue, store: JobRecords, runner: JobRunner,
                 records: RadiomicsRecords) -> None:
        self.pipeline = pipeline
        self.settings = pipeline.settings
        self.catalogue = catalogue
        self.store = store
        self.runner = runner
        self.records = records
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()

    # -- jobs --------------------------------------------------------------------------------------
    def submit(self, model: CatalogueModel, body: bytes, user: str | None = None) -> tuple[str, float, str]:
        """Turn a posted ModelInput into a job of ``user``: its SegmentationID, arrival time and input hash.

        An input that cannot run (channels, sizes, compression) still gets a job, failed at once with
        its ErrorCode, so the client learns why from the progress poll (the protocol's way).
        """
        received = time.time()
        message = parse(M.ModelInput, body)
        if not message.Channels:
            raise RadiomicsError(400, f"ModelInput has no Channels; {model.model_id} needs one per input channel: "
                                      f"{', '.join(model.channel_ids)}")
        json_input = {"inference_command": model.command, "model_version": model.version.version}
        self.pipeline.check_request(json_input, command=model.command)
        input_hash = input_hash_of([json.dumps(json_input).encode(), body])
        uid = str(uuid.uuid4())
        record = Segmentation(uid, model.model_id, model.version.family, model.version.version, input_hash, received)
        job = Job(job_name=VOLUME_JOB, command=model.command, in_dir="",
                  params={"model_version": model.version.version}, uid=uid, user=user)
        folder = volume_input_folder(self.settings.output_root, uid)
        try:
            channel = self.input_channel(message, model)
            save_volume_input(folder, channel_volume(channel, self.settings.max_series_voxels), input_hash)
        except InputRejected as exc:
            log.warning("segmentation %s refused (ErrorCode %s): %s", uid, ERROR_CODES.Name(exc.code), exc.message)
            record.error_code, record.error = exc.code, exc.message
            job.status, job.error, job.error_status, job.finished = FAILED, exc.message, 422, time.time()
            self.records.add_segmentation(record)
            self.store.add(job)
            return uid, received, input_hash
        try:
            self.records.add_segmentation(record)
            job.owner = self.runner.owner
            self.store.add(job)
            self.runner.submit(job)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("segmentation %s queued: %s, input_hash %s", uid, model.model_id, input_hash)
        return uid, received, input_hash

    @staticmethod
    def input_channel(message: M.ModelInput, model: CatalogueModel) -> M.ModelInputChannel:
        """The channel the model reads; ``InputRejected`` unless the ChannelIDs are the model's, one each."""
        sent = [channel.ChannelID for channel in message.Channels]
        if sorted(sent) != sorted(model.channel_ids):
            raise InputRejected(ERROR_CODES.UnknownClientError,
                                f"the input's ChannelIDs {sent} must be the model's InputChannels "
                                f"{list(model.channel_ids)}, one each")
        return next(channel for channel in message.Channels if channel.ChannelID == model.channel_ids[0])

    def find(self, model_id: str, segmentation_id: str) -> tuple[Segmentation, Job]:
        """The record and job of a segmentation, addressed by both path ids; a 400 saying why otherwise."""
        try:
            uuid.UUID(segmentation_id)
        except ValueError:
            raise RadiomicsError(400, f"{segmentation_id!r} is not a SegmentationID (a UUID from POST "
                                      f"/api/v2/Model/{model_id}/segmentation)") from None
        record = self.records.segmentation(segmentation_id)
        job = self.store.get(segmentation_id)
        if record is None or job is None:
            raise RadiomicsError(400, f"no segmentation {segmentation_id}: unknown, or its result was deleted "
                                      f"{self.settings.radiomics_result_seconds} s after it finished")
        if record.model_id != model_id:
            raise RadiomicsError(400, f"segmentation {segmentation_id} was posted to model {record.model_id!r}, "
                                      f"not {model_id!r}")
        return record, job

    def progress(self, record: Segmentation, job: Job) -> M.SegmentationProgress:
        """A job's state as SegmentationProgress: 0 queued, 50 running, 100 done; a failure with its ErrorCode."""
        message = M.SegmentationProgress(Progress=PROGRESS.get(job.status, 0))
        if job.status == FAILED:
            message.Errors = record.error or job.error or "the segmentation failed"
            client_fault = (job.error_status or 500) < 500
            message.ErrorCode = record.error_code or (
                ERROR_CODES.UnknownClientError if client_fault else ERROR_CODES.InternalError)
        return message

    def result(self, record: Segmentation, job: Job) -> M.ModelOutput:
        """A finished job's label mask as ModelOutput, one channel per structure of the version."""
        if job.status != COMPLETED:
            state = {QUEUED: "queued", RUNNING: "running", FAILED: "failed"}.get(job.status, job.status)
            raise RadiomicsError(400, f"segmentation {record.uid} has no result: it is {state}; poll its progress "
                                      "until Progress is 100")
        model = self.catalogue.model(record.model_id)
        folder = Path(job.output_dir or Path(self.settings.output_root) / job.uid)
        try:
            response_json = json.loads((folder / "response.json").read_text(encoding="utf-8"))
            part = next(p for p in response_json["parts"] if p["binary_type"] == "numeric_label_mask")
            shape = part["binary_data_shape"]
            labels = np.fromfile(folder / part["file"], dtype=np.uint8).reshape(
                shape["depth"], shape["height"], shape["width"])
        except (OSError, StopIteration, KeyError, ValueError) as exc:
            log.error("segmentation %s: result unreadable in %s: %r", record.uid, folder, exc)
            raise RadiomicsError(400, f"the result of segmentation {record.uid} cannot be read") from None
        if model is None:
            raise RadiomicsError(400, f"model {record.model_id!r} is no longer served")
        output = M.ModelOutput(ModelID=model.model_id, ProcesserVersion=model.processer_version,
                               LanguageCode=model.language)
        output.Channels.extend(output_channels(model, labels, part["label_map"]))
        return output

    def keep(self, kind: str, message: Message, segmentation_id: str, model_id: str | None, outcome: str) -> dict:
        """Store a Feedback or Telemetry message with its job's model version and input hash, and count it."""
        record = self.records.segmentation(segmentation_id) if segmentation_id else None
        entry = {"received": time.time(), "segmentation_id": segmentation_id,
                 "model_id": record.model_id if record else model_id,
                 "family": record.family if record else None, "model_version": record.version if record else None,
                 "input_hash": record.input_hash if record else None,
                 "message": json_format.MessageToDict(message, preserving_proto_field_name=True)}
        self.records.add_entry(kind, entry)
        metrics.record_radiomics_message(kind, outcome)
        log.info("%s stored for segmentation %r (%s)", kind, segmentation_id,
                 "known job" if record else "no such job here")
        return entry

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete the results and records of segmentations finished more than the grace period ago.

        Runs at most once a minute per process, from the routes; returns the uids deleted.
        """
        now = time.time() if now is None else now
        with self._sweep_lock:
            if now - self._last_sweep < 60:
                return []
            self._last_sweep = now
        grace = self.settings.radiomics_result_seconds
        removed = []
        for uid in self.records.segmentations_before(now - grace):
            job = self.store.get(uid)
            if job is not None and (job.status not in FINISHED or (job.finished or job.updated) > now - grace):
                continue
            shutil.rmtree(Path(self.settings.output_root) / uid, ignore_errors=True)
            shutil.rmtree(volume_input_folder(self.settings.output_root, uid), ignore_errors=True)
            if job is not None:
                self.store.remove(uid)
            self.records.remove_segmentation(uid)
            removed.append(uid)
        if removed:
            log.info("deleted %d Radiomics results older than %d s: %s", len(removed), grace, ", ".join(removed))
        return removed


def radiomics_blueprint(door: RadiomicsDoor) -> Blueprint:
    """The Radiomics API of ``door``.

    Registered on a Gateway, its paths are matched case-insensitively (``CanonicalPaths``) and ``GET /ping``
    answers ApiInformation (POST stays the gateway's liveness answer). Requests from
    ``INFERENCE_RADIOMICS_NETWORKS`` reach these routes without the bearer token.
    """
    settings, catalogue = door.settings, door.catalogue
    networks = token_free_networks(settings.radiomics_networks)
    blueprint = Blueprint("radiomics", __name__)

    def joined(state: BlueprintSetupState) -> None:
        app: Any = state.app
        app.wsgi_app = CanonicalPaths(app.wsgi_app)
        app.ping_information = ping

    blueprint.record_once(joined)

    def route(rule: str, method: str, name: str, view: Callable[..., Response]) -> None:
        def serve(**kwargs: str) -> Response:
            try:
                if request.method != method:
                    raise RadiomicsError(403, f"{request.method} is not allowed on {request.path}; use {method}")
                if method == "POST" and request.mimetype != PROTOBUF:
                    raise RadiomicsError(415, f"send the body as Content-Type: {PROTOBUF} (raw protobuf bytes), "
                                              f"not {request.mimetype or 'nothing'}")
                door.sweep()
                return view(**kwargs)
            except RadiomicsError as exc:
                status, details = exc.status, exc.details
            except GatewayError as exc:  # e.g. the job broker or Redis unreachable (503)
                status, details = exc.status, exc.message
            (log.error if status >= 500 else log.warning)("%s %s: %d %s", request.method, request.path, status, details)
            return answer(M.BadRequestResponse(ErrorMessage="Invalid request.", ExceptionDetails=details), status)

        blueprint.add_url_rule(rule, name, needs(SUBMITTER, token_free_networks=networks)(serve), methods=ALL_METHODS)

    def ping() -> Response:
        # the version only to a client that authenticated (a token): it helps an attacker pick an exploit
        return answer(M.ApiInformation(Version=server_version() if g.get("user") else "inference-gateway"))

    def vendor_status() -> Response:
        url = settings.radiomics_service_url or request.host_url.rstrip("/") + "/api/v2/"
        return answer(M.VendorStatus(
            TotalCredits=100000, LowCreditsWarningMessage="Credits do not apply to this on-premise server.",
            ClientCountryCode="US", SegmentationServiceStatus=M.VendorStatus.Available, SegmentationServiceUrl=url,
            AvailableSegmentationServiceLocations=["on-premise"], VendorName="Medical-imaging inference gateway",
            LanguageCode="en-US"))

    def credits() -> Response:
        return answer(M.Credits(TotalCredits=100000, DisplayCreditsWarning=False,
                                CreditsWarningMessage="Credits do not apply to this on-premise server.",
                                LanguageCode="en-US"))

    def models() -> Response:
        return answer(catalogue.collection())

    def post_segmentation(model_id: str) -> Response:
        model = catalogue.model(model_id)
        if model is None:
            raise RadiomicsError(400, f"unknown model {model_id!r}; GET /api/v2/Model/ lists the model ids: "
                                      f"{', '.join(catalogue.models) or 'none'}")
        uid, received, input_hash = door.submit(model, read_body(settings.max_request_bytes), g.get("user"))
        audit_event("study-received", input_hash=input_hash, door="radiomics", job=uid, model=model_id)
        task = M.SegmentationTask(SegmentationID=uid)
        task.StartTime.FromDatetime(datetime.fromtimestamp(received, UTC))
        return answer(task)

    def readable(model_id: str, segmentation_id: str) -> tuple[Segmentation, Job]:
        """The segmentation when this request's user may read it (a submitter: only its own)."""
        record, job = door.find(model_id, segmentation_id)
        if not may_read(job.user):
            audit_event("result-viewed", outcome="refused", input_hash=record.input_hash, door="radiomics",
                            job=job.uid)
            raise RadiomicsError(403, f"segmentation {segmentation_id} was posted by another user; a submitter "
                                      "reads only its own")
        return record, job

    def get_progress(model_id: str, segmentation_id: str) -> Response:
        return answer(door.progress(*readable(model_id, segmentation_id)))

    def get_result(model_id: str, segmentation_id: str) -> Response:
        record, job = readable(model_id, segmentation_id)
        result = door.result(record, job)
        audit_event("result-downloaded", input_hash=record.input_hash, door="radiomics", job=job.uid,
                        model=model_id)
        return answer(result)

    def post_feedback() -> Response:
        feedback = parse(M.SegmentationFeedback, read_body(MAX_MESSAGE_BYTES))
        scores = [feedback.GeneralScore] if feedback.HasField("GeneralScore") else []
        scores += [comment.Score for comment in feedback.StructureComments if comment.HasField("Score")]
        if any(not 0 <= score.Value <= 1 for score in scores):
            raise RadiomicsError(400, "scores are between 0 and 1 inclusive (leave Score out for 'not rated')")
        entry = door.keep(FEEDBACK, feedback, feedback.SegmentationID, None,
                          "accepted" if feedback.SegmentationAccepted else "rejected")
        audit_event("feedback-received", input_hash=entry["input_hash"], door="radiomics",
                        job=feedback.SegmentationID, accepted=feedback.SegmentationAccepted)
        return Response("feedback stored", mimetype="text/plain")

    def post_telemetry() -> Response:
        telemetry = parse(M.SegmentationTelemetry, read_body(MAX_MESSAGE_BYTES))
        entry = door.keep(TELEMETRY, telemetry, telemetry.SegmentationID, telemetry.ModelID,
                          M.SegmentationTelemetry.ClientErrorType.Name(telemetry.ClientError))
        audit_event("telemetry-received", input_hash=entry["input_hash"], door="radiomics",
                        job=telemetry.SegmentationID, model=entry["model_id"])
        return Response("telemetry stored", mimetype="text/plain")

    route("/api/ping", "GET", "radiomics_ping", ping)
    route("/api/v2/VendorStatus", "GET", "radiomics_vendor_status", vendor_status)
    route("/api/v2/Credits", "GET", "radiomics_credits", credits)
    route("/api/v2/Model", "GET", "radiomics_models", models)
    route("/api/v2/Model/<model_id>/segmentation", "POST", "radiomics_segmentation", post_segmentation)
    route("/api/v2/Model/<model_id>/segmentation/<segmentation_id>", "GET", "radiomics_progress", get_progress)
    route("/api/v2/Model/<model_id>/segmentation/<segmentation_id>/result", "GET", "radiomics_result", get_result)
    route("/api/v2/Feedback/segmentation", "POST", "radiomics_feedback", post_feedback)
    route("/api/v2/Telemetry/segmentation", "POST", "radiomics_telemetry", post_telemetry)
    return blueprint


def family_commands(pipeline: Pipeline) -> dict[str, str]:
    """Model family -> the served command that runs it on posted volumes (what the catalogue offers)."""
    return {spec.family: spec.command for spec in pipeline.specs if spec.family and spec.volume_input}

