"""The inference gateway: a Flask app that turns viewer requests into handler calls and back.

    app = Gateway(__name__)
    app.add_inference_route("/", my_handler)   # my_handler(json_input, dicom_instances, input_hash)
    app.add_healthcheck_route(lambda: "READY")

The gateway parses the ``multipart/related`` request while it streams in, hashes its parts
(SHA-256), tags every log line with that hash, calls the handler, checks its output against
the protocol (``inference.protocol.rules``) and streams back a ``multipart/related`` response. Errors are
answered as JSON ``{"error": ..., "input_hash": ...}`` with a status that says whose fault it is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from functools import partial
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from typing import Any

import flask
from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from inference import metrics, protocol
from inference.audit import AuditLog, audit_log
from inference.config import Settings, get_settings
from inference.dicom.files import study_folder_files
from inference.dicom.header import SERIES_INSTANCE_UID, STUDY_INSTANCE_UID, InstanceHeader
from inference.dicom.validation import read_header_early
from inference.disk_space import StoreFull, is_disk_full, store_of, with_storage
from inference.errors import BadRequest, Forbidden, GatewayError, ServiceUnavailable, Unauthorized
from inference.http.metrics_routes import metrics_blueprint
from inference.http.roles import PUBLIC, declared_role, needs, role_of, token_free_networks_of
from inference.jobs.reviews import AWAITING, must_hold, review_mode
from inference.logs import TaggedLogger, bind_request_tags
from inference.pipeline.context import ArterysHandler, arterys_handler
from inference.pipeline.handler_registry import HandlerRegistry
from inference.pipeline.pipeline import InferenceResult, Pipeline, request_json
from inference.protocol.multipart_request import (
    ParsedBody,
    PartSpool,
    multipart_boundary,
    parse_content_type,
    parse_multipart_related,
    parts_from_files,
)
from inference.protocol.multipart_response import EncodedResponse, encode_multipart_related
from inference.protocol.request import MAX_JSON_BYTES, parse_json_object
from inference.users import ADMIN, REVIEWER, SUBMITTER, Authenticator, role_allows
from models.registry import ModelUnavailable, UnknownModel

#: Roles that read every user's jobs; a submitter reads only its own.
READS_ALL = (REVIEWER, ADMIN)


class Gateway(Flask):
    """A Flask app serving inference handlers over the Arterys-style multipart protocol.

    Every inference route goes through one ``Pipeline`` (``inference.pipeline.pipeline``): the app's own, built
    from its settings, or the one passed in.
    """

    def __init__(self, import_name: str, settings: Settings | None = None, *, pipeline: Pipeline | None = None,
                 **kwargs) -> None:
        super().__init__(import_name, **kwargs)
        self.settings = settings or (pipeline.settings if pipeline else get_settings())
        self.pipeline = pipeline or Pipeline(self.settings, HandlerRegistry())
        self.log = TaggedLogger(logging.getLogger("inference.gateway"))
        #: Finds named users by token (``inference.users``); None: only INFERENCE_API_TOKEN (apps built by hand).
        self.users: Authenticator | None = None
        #: The audit trail every front door of this app appends to.
        self.audit: AuditLog = audit_log(self.settings)
        self._routes: set[str] = set()
        #: What ``GET /ping`` answers besides liveness (the Radiomics door's ApiInformation); None: an empty 200.
        self.ping_information: Callable[[], Response] | None = None
        self.add_url_rule("/ping", "ping", self._ping, methods=["GET", "POST"])
        #: Keeps a request's result for a reviewer instead of answering it (``"review"`` in its JSON): set by the
        #: job API (``inference.jobs.api``), which answers for it afterwards; None: requests cannot ask for review.
        self.hold_result: Callable[[InferenceResult, ParsedBody, dict, str | None, str], str] | None = None
        #: Collected at each scrape of ``GET /metrics`` besides the request metrics (e.g. job counts).
        self.metrics_collectors: list = []
        self.register_blueprint(metrics_blueprint())
        self.register_error_handler(GatewayError, self._answer_gateway_error)
        # the model registry knows no HTTP: a family or version it lacks is the client's error, one it cannot load ours
        self.register_error_handler(UnknownModel, lambda error: self._answer_gateway_error(BadRequest(error.message)))
        self.register_error_handler(ModelUnavailable,
                                    lambda error: self._answer_gateway_error(ServiceUnavailable(error.message)))
        self.register_error_handler(HTTPException, self._answer_http_error)
        self.register_error_handler(Exception, self._answer_unexpected_error)
        self.before_request(self._start_request)
        self.after_request(self._finish_request)

    # -- public API --------------------------------------------------------------------
    def add_inference_route(self, route: str, handler: str | ArterysHandler | None = None) -> None:
        """Serve ``POST route`` through the pipeline; a route can be added once.

        ``handler`` is a command the pipeline serves (that command always runs there), ``None`` (the
        request's ``inference_command`` picks, else the default command), or a plain function with
        the Arterys SDK's signature ``(json_input, dicom_instances, input_hash)``, served on its own
        with no declared parameters (for apps built by hand; it gets the request's parts as sent).
        """
        if route in self._routes:
            raise ValueError(f"route {route!r} is already served; add each inference route once")
        pipeline, command = self.pipeline, handler
        if callable(handler):
            registry = HandlerRegistry()
            registry.register(handler.__name__, params=None)(arterys_handler(handler))
            pipeline, command = Pipeline(self.settings, registry), handler.__name__
        elif command is not None:
            pipeline.spec(command)  # fail now, not on the first request, for a command not served
        self._routes.add(route)
        endpoint = "inference" if route == "/" else f"inference{route.replace('/', '_')}"
        self.add_url_rule(route, endpoint, needs(SUBMITTER)(partial(self._serve_inference, pipeline, command)),
                          methods=["POST"])

    def add_healthcheck_route(self, check: Callable[[], str]) -> None:
        """Serve ``GET|POST /healthcheck``: 200 with the text ``check()`` returns (``READY`` when ready), degraded
        while a store's filesystem has less than INFERENCE_MIN_FREE_SPACE_MB free (``inference.disk_space``)."""

        def healthcheck() -> Response:
            return Response(with_storage(check(), self.store_folders(), self.settings.min_free_space_mb),
                            mimetype="text/plain")

        self.add_url_rule("/healthcheck", "healthcheck", needs(PUBLIC)(healthcheck), methods=["GET", "POST"])

    def store_folders(self) -> dict[str, Path]:
        """The stores this server writes to, by name (``inference.disk_space.STORES``): spool and output."""
        spool = self.settings.spool_dir if self.settings.spool_dir is not None else Path(tempfile.gettempdir())
        return {"spool": Path(spool), "output": Path(self.settings.output_root)}

    @property
    def route_roles(self) -> dict[str, str]:
        """endpoint -> the role its view declares (``inference.http.roles``); an endpoint missing here needs admin."""
        return {endpoint: role for endpoint, view in self.view_functions.items()
                if (role := declared_role(view)) is not None}

    @needs(PUBLIC)
    def _ping(self) -> Response | tuple[str, int]:
        """Liveness: an empty 200; a GET answers ``ping_information`` when a door declared it."""
        if request.method == "GET" and self.ping_information is not None:
            return self.ping_information()
        return "", 200

    # -- request life cycle -----------------------------------------------------------
    def _start_request(self) -> None:
        g.started = time.perf_counter()
        g.input_hash = None
        g.log = self.log
        bind_request_tags({})  # this thread served other requests before
        g.user, g.role = None, None
        view = self.view_functions.get(request.endpoint or "")
        if role_of(view) != PUBLIC and not self._from_token_free_network(view):
            self._authenticate(role_of(view) if request.endpoint else SUBMITTER)
        if request.mimetype == "application/json":
            # routes read JSON whole: Werkzeug stops one byte past the limit (a chunked body has no
            # Content-Length to check first), so a reader sees that the body is too large
            request.max_content_length = MAX_JSON_BYTES + 1

    def _authenticate(self, needed: str) -> None:
        """Check the bearer token against the shared token and the named users, then the route's role ``needed``.

        Nothing is asked while neither INFERENCE_API_TOKEN nor any user exists (as before users).
        """
        token = self.settings.api_token
        if not token and (self.users is None or not self.users.any_users()):
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise Unauthorized(f"this server requires 'Authorization: Bearer <token>'; this route needs role "
                               f"'{needed}'", required_role=needed)
        given = given.strip()
        if scheme.lower() == "bearer" and token and _same_secret(given, token):
            g.user, g.role = "api-token", ADMIN
            return
        user = self.users.user_for(given) if self.users is not None and scheme.lower() == "bearer" else None
        if user is None:
            g.auth_failed = True  # audited and counted by inference.http.throttle
            raise Forbidden("the bearer token is not valid for this server", required_role=needed)
        g.user, g.role = user.name, user.role
        if not role_allows(user.role, needed):
            self.audit.append("request-refused", outcome="refused", user=user.name, client=request.remote_addr,
                              method=request.method, path=request.path, role=user.role, required_role=needed)
            raise Forbidden(f"this route needs role '{needed}'; user '{user.name}' is a '{user.role}'",
                            required_role=needed)

    def audit_event(self, event: str, *, sync: bool = True, **fields: Any) -> None:
        """Append ``event`` to the audit trail with this request's user and client address."""
        self.audit.append(event, user=g.get("user"), client=request.remote_addr, sync=sync, **fields)

    def may_read(self, owner: str | None) -> bool:
        """Whether this request's user may read a job submitted by ``owner`` (submitters: only their own)."""
        return g.get("role") in (None, *READS_ALL) or owner == g.get("user")

    def _from_token_free_network(self, view: Callable[..., Any] | None) -> bool:
        """Whether this request's view lets its client's network in without the token."""
        networks = token_free_networks_of(view)
        if not networks or not request.remote_addr:
            return False
        try:
            address = ip_address(request.remote_addr)
        except ValueError:
            return False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in networks)

    def _finish_request(self, response: Response) -> Response:
        method, path, status = request.method, request.path, response.status_code
        bytes_in = g.get("bytes_in", request.content_length or 0)
        bytes_out = response.content_length or 0
        started = g.get("started", time.perf_counter())
        log = g.get("log", self.log)
        input_hash = g.get("input_hash")

        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        command = g.get("command")

        def log_request() -> None:
            seconds = time.perf_counter() - started
            metrics.observe_request(route, command, status, seconds, bytes_in, bytes_out)
            if path not in ("/healthcheck", "/ping", "/metrics"):
                log.info("%s %s %d in=%dB out=%dB %.3fs input_hash=%s", method, path, status, bytes_in,
                         bytes_out, seconds, input_hash or "-")

        response.call_on_close(log_request)
        return response

    # -- inference ----------------------------------------------------------------------
    def _serve_inference(self, pipeline: Pipeline, command: str | None) -> Response:
        spool = PartSpool(self.settings.spool_memory_bytes, self.settings.spool_dir,
                          self.settings.min_free_space_mb)
        try:
            body = self._read_request(spool)
            g.input_hash, g.bytes_in = body.input_hash, body.bytes_read
            bind_request_tags({"input_hash": body.input_hash})  # handlers' TaggedLoggers carry it too
            g.log = log = self.log.tag({"input_hash": body.input_hash})
            log.info("received %d parts, %d bytes", len(body.parts), body.bytes_read)
            g.command = command
            study, series = study_identity(body)
            # not fsynced by itself: the result-produced record below (success or failure) syncs both
            self.audit_event("study-received", study_uid=study, series_uids=series, input_hash=body.input_hash,
                             door="http", parts=len(body.parts), sync=False)
            try:
                json_input = request_json(body)
                review = review_mode(json_input.get("review"), "the request JSON")
                if review is not None and self.hold_result is None:
                    raise BadRequest("this server keeps no results for review (no job API): leave 'review' out")
                result = pipeline.run_body(body, command=command)
            except Exception as exc:
                self.audit_event("result-produced", outcome="failure", study_uid=study, series_uids=series,
                                 input_hash=body.input_hash, command=command, status=getattr(exc, "status", 500))
                raise
            g.command = result.command
            self.audit_event("result-produced", study_uid=study, series_uids=series, input_hash=body.input_hash,
                             command=result.command)
            if must_hold(review, result.response_json):
                assert self.hold_result is not None and review is not None
                uid = self.hold_result(result, body, json_input, study, review)
                spool.close()
                held = flask.jsonify({"uid": uid, "msg": "Result held for review: released once a reviewer "
                                                         "accepts or corrects it", "review": AWAITING})
                held.status_code = 202
                held.headers["Location"] = f"/query/{uid}"
                return held
        except BaseException:
            spool.close()
            raise  # answered by the error handlers below (or by the app's own, when registered)
        encoded = encode_inference_response(result)
        response = Response(encoded.chunks, status=200, content_type=encoded.content_type)
        response.content_length = encoded.content_length
        response.call_on_close(spool.close)
        return response

    def _read_request(self, spool: PartSpool) -> ParsedBody:
        mimetype, _ = parse_content_type(request.content_type)
        if mimetype == "application/json":
            return self._read_study_path(spool)
        boundary = multipart_boundary(request.content_type)
        environ = request.environ
        # The server's own input stream, bounded by Content-Length here, saves werkzeug's extra
        # copies of every chunk; without either a length or a terminated (chunked) input, use werkzeug's.
        direct = request.content_length is not None or environ.get("wsgi.input_terminated")
        stream = environ["wsgi.input"] if direct else request.stream
        return parse_multipart_related(stream, boundary, spool=spool,
                                       max_bytes=self.settings.max_request_bytes,
                                       content_length=request.content_length, on_part=read_header_early)

    def _read_study_path(self, spool: PartSpool) -> ParsedBody:
        """A JSON request naming a folder on the server (``studyPath``) instead of uploading it."""
        too_large = BadRequest("a JSON request must be under 1 MiB; upload studies as multipart/related")
        if (request.content_length or 0) > MAX_JSON_BYTES:
            raise too_large
        raw = request.get_data(cache=False)  # at most MAX_JSON_BYTES + 1 bytes (_start_request)
        if len(raw) > MAX_JSON_BYTES:
            raise too_large
        json_input = parse_json_object(raw, "the request body")
        if not isinstance(json_input.get("studyPath"), str):
            raise BadRequest("a JSON request must be an object with 'studyPath', the folder of the study "
                             "on the server; otherwise send multipart/related")
        files = study_folder_files(self.settings.data_root, json_input["studyPath"], field="studyPath")
        return parts_from_files(json.dumps(json_input).encode(), files, spool)

    # -- errors ------------------------------------------------------------------------
    def _error_response(self, status: int, message: str, **details: str) -> Response:
        body = {"error": message, **details}
        if g.get("input_hash"):
            body["input_hash"] = g.input_hash
        return flask.jsonify(body), status

    def _answer_gateway_error(self, error: GatewayError) -> Response:
        log = g.get("log", self.log)
        if isinstance(error, StoreFull):
            metrics.record_store_full(error.store)
        (log.error if error.status >= 500 else log.warning)("%d: %s", error.status, error.message)
        body, status = self._error_response(error.status, error.message, **error.details)
        challenge = {"WWW-Authenticate": 'Bearer realm="inference"'} if status == 401 else {}
        return body, status, challenge

    def _answer_http_error(self, error: HTTPException) -> Response:
        message = error.description or error.name
        if error.code == 405:
            message = f"{request.method} is not allowed on {request.path}; inference routes take POST"
        elif error.code == 413 and request.mimetype == "application/json":
            message = "a JSON request must be under 1 MiB; upload studies as multipart/related"
        return self._error_response(error.code or 500, message)

    def _answer_unexpected_error(self, error: Exception) -> Response:
        """A 500 that says nothing of the error itself (its text may hold paths or internals): the log has it."""
        log = g.get("log", self.log)
        if isinstance(error, TimeoutError):  # a request body read by werkzeug (JSON routes) stalled
            log.warning("%s %s: request body too slow: %s", request.method, request.path, error)
            return self._error_response(408, f"request body too slow: {error}")
        if is_disk_full(error):  # a write no store check wrapped (the audit trail, a SQLite store...)
            log.error("%s %s: a filesystem is full:\n%s", request.method, request.path, traceback.format_exc())
            return self._answer_gateway_error(StoreFull(store_of(error, self.store_folders())))
        if g.get("input_hash"):
            log.error("%s %s failed:\n%s", request.method, request.path, traceback.format_exc())
            return self._error_response(500, "internal error while handling the request; the detail is in "
                                             "the server log under this input_hash")
        error_id = uuid.uuid4().hex
        log.error("%s %s failed (error_id=%s):\n%s", request.method, request.path, error_id, traceback.format_exc())
        return flask.jsonify({"error": "internal error while handling the request; the detail is in the server "
                                       "log under this error_id", "error_id": error_id}), 500


def encode_inference_response(result: InferenceResult) -> EncodedResponse:
    """The multipart/related response of a pipeline result: JSON, one part per buffer, the hashes part."""
    response_json = result.response_json
    parts = [(protocol.JSON_CONTENT_TYPE, json.dumps(response_json).encode())]
    parts += [(protocol.content_type_for(p["binary_type"]), b)
              for p, b in zip(response_json["parts"], result.buffers, strict=True)]
    return encode_multipart_related(parts, input_hash=result.input_hash)


def study_identity(body: ParsedBody) -> tuple[str | None, list[str]]:
    """The study and series UIDs of a request's DICOM parts, from the headers read while it streamed in.

    Read raw from the fast headers: building a pydicom dataset per part for two UIDs was a fifth
    of a small study's request. A value pydicom would split (a backslash) is read by pydicom.
    """
    studies, series = set(), set()
    for header in body.early.values():
        if header is None:
            continue
        studies.add(_uid_text(header, STUDY_INSTANCE_UID, "StudyInstanceUID"))
        series.add(_uid_text(header, SERIES_INSTANCE_UID, "SeriesInstanceUID"))
    studies.discard(None)
    series.discard(None)
    return (", ".join(sorted(studies)) or None), sorted(series)


def _uid_text(header: InstanceHeader, tag: int, keyword: str) -> str | None:
    """A UID of ``header`` as ``str(dataset.get(keyword, ""))`` gives it, None when absent or empty."""
    text = header.text(tag)
    if text and "\\" in text:
        text = str(header.dataset.get(keyword, ""))
    return text or None


def _same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison; hashing first keeps the token's length from leaking through timing."""
    given_digest = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    expected_digest = hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given_digest, expected_digest)
