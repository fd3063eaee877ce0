"""The OpenAPI 3.0 description of the gateway's JSON routes, served at ``GET /openapi.json``.

Built from the handler registry, so the command and job-name lists are the served ones. The
multipart inference protocol itself is described in docs/protocol.md (OpenAPI cannot express its
ordered parts); ``POST /`` appears here with its JSON form (``studyPath``) and its errors. The
Radiomics API's routes are listed with their protobuf messages (``inference/radiomics/proto/*.proto``),
the reviewer's routes (``/reviews``) with their decisions.
A test runs schemathesis against the live server to keep the document and the server in step.
"""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, dict]:
    reasons = {400: "malformed request or bad parameter", 401: "bearer token missing",
               403: "wrong token, or a path outside the data root", 404: "unknown job",
               405: "method not allowed", 408: "request body too slow", 413: "request or response too large",
               415: "unsupported Content-Type", 422: "input the handler cannot use (e.g. not DICOM)",
               500: "the handler failed (detail in the server log under input_hash)"}
    return {str(status): _json(ERROR, reasons[status]) for status in statuses}


def _radiomics(message: str, description: str) -> dict:
    """A Radiomics API answer: protobuf-JSON of ``message``, or its binary form (``Accept``)."""
    return {"description": f"{description} (Radiomics.{message}; binary with Accept: application/x-protobuf)",
            "content": {"application/json": {"schema": {"type": "object"}},
                        "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}}}}


def radiomics_paths(model_ids: list[str], auth_errors: tuple[int, ...]) -> dict[str, Any]:
    """The Radiomics Segmentation API's routes (inference/radiomics; messages in its .proto files)."""
    bad = {"400": _radiomics("BadRequestResponse", "the request cannot be served, and why"),
           "403": _radiomics("BadRequestResponse", "wrong method (the protocol's 403), or wrong token"),
           **{str(s): _json(ERROR, "bearer token missing") for s in auth_errors if s == 401}}
    model = {"name": "ModelID", "in": "path", "required": True, "schema": {"type": "string", "enum": model_ids}}
    job = {"name": "SegmentationID", "in": "path", "required": True, "schema": {"type": "string"}}
    body = {"required": True, "content": {"application/x-protobuf": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}}
    stored = {"description": "stored", "content": {"text/plain": {"schema": {"type": "string"}}}}

    def get(summary: str, answer: str, parameters: list | None = None) -> dict:
        return {"get": {"summary": summary, "tags": ["Radiomics"], "parameters": parameters or [],
                        "responses": {"200": _radiomics(answer, summary), **bad}}}

    def post(summary: str, message: str, answer: dict, parameters: list | None = None) -> dict:
        return {"post": {"summary": summary, "tags": ["Radiomics"], "parameters": parameters or [],
                         "requestBody": {**body, "description": f"Radiomics.{message}, raw protobuf bytes"},
                         "responses": {"200": answer, **bad, "413": _radiomics("BadRequestResponse", "body too large"),
                                       "415": _radiomics("BadRequestResponse", "not application/x-protobuf")}}}

    return {
        "/api/ping": get("Server version", "ApiInformation"),
        "/api/v2/VendorStatus": get("Service status and URL", "VendorStatus"),
        "/api/v2/Credits": get("Credits (they do not apply on premises)", "Credits"),
        "/api/v2/Model/": get("Model families and versions, from the model registry", "ModelsCollection"),
        "/api/v2/Model/{ModelID}/segmentation": post(
            "Segment a volume: a job; inputs that cannot run fail through the progress poll", "ModelInput",
            _radiomics("SegmentationTask", "the job"), [model]),
        "/api/v2/Model/{ModelID}/segmentation/{SegmentationID}": get(
            "Progress: 0 queued, 50 running, 100 done; Errors and ErrorCode when it failed", "SegmentationProgress",
            [model, job]),
        "/api/v2/Model/{ModelID}/segmentation/{SegmentationID}/result": get(
            "The masks, one channel per structure, gzip-compressed bytes on the input grid", "ModelOutput",
            [model, job]),
        "/api/v2/Feedback/segmentation": post("A clinician's feedback on a result, stored", "SegmentationFeedback",
                                              stored),
        "/api/v2/Telemetry/segmentation": post("The client's timings and errors, stored", "SegmentationTelemetry",
                                               stored),
    }


def review_paths(auth_errors: tuple[int, ...]) -> dict[str, Any]:
    """The reviewer's routes (``inference.review.routes``; role reviewer): the queue, one result, the decisions."""
    uid = {"name": "uid", "in": "path", "required": True, "schema": {"type": "string"}, "description": "job uid"}
    review = _json({"type": "object", "required": ["review", "new"],
                    "properties": {"review": {"type": "object"}, "new": {"type": "boolean"}}},
                   "the review after the decision; new is false when it was already made (nothing happens twice)")
    decided = {"409": _json(ERROR, "another decision was already made: decisions are final"),
               "404": _json(ERROR, "no result of that job is held for review")}

    def decision(summary: str, operation: str, body: dict | None, *more: int) -> dict:
        entry: dict[str, Any] = {"summary": summary, "operationId": operation, "tags": ["Review"],
                                 "parameters": [uid], "responses": {"200": review, **decided,
                                                                    **_errors(*more, *auth_errors)}}
        if body is not None:
            entry["requestBody"] = body
        return {"post": entry}

    return {
        "/reviews": {"get": {
            "summary": "Results held for review (status=all: decided ones too); overdue ones flagged",
            "operationId": "listReviews", "tags": ["Review"],
            "parameters": [{"name": "status", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["all"]}}],
            "responses": {"200": _json({"type": "object", "required": ["reviews", "awaiting", "overdue"],
                                        "properties": {"reviews": {"type": "array", "items": {"type": "object"}},
                                                       "awaiting": {"type": "integer"},
                                                       "overdue": {"type": "integer"}}}, "the queue"),
                          **_errors(*auth_errors)}}},
        "/reviews/{uid}": {"get": {
            "summary": "One held result: its review, response JSON, result tables, model version, image links",
            "operationId": "showReview", "tags": ["Review"], "parameters": [uid],
            "responses": {"200": _json({"type": "object"}, "the result"), "404": decided["404"],
                          **_errors(422, *auth_errors)}}},
        "/reviews/{uid}/images/{number}.png": {"get": {
            "summary": "Image n of a held result: source slices with the model's segmentation, result images",
            "operationId": "reviewImage", "tags": ["Review"],
            "parameters": [uid, {"name": "number", "in": "path", "required": True,
                                 "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": {"description": "PNG", "content": {"image/png": {"schema": {
                "type": "string", "format": "binary"}}}}, "404": _json(ERROR, "no such result or image"),
                          **_errors(422, *auth_errors)}}},
        "/reviews/{uid}/accept": decision("Accept: release the result to its destinations", "acceptReview", None),
        "/reviews/{uid}/reject": decision(
            "Reject with a reason: nothing is ever released", "rejectReview",
            {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["reason"], "properties": {"reason": {"type": "string"}}}}}}, 400),
        "/reviews/{uid}/correct": decision(
            "Correct: a DICOM SEG of the same series, released instead of the model's with a new SR",
            "correctReview", {"required": True, "content": {
                "application/dicom": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "file": {"type": "string", "format": "binary"}}}}}}, 400, 413, 415, 422),
    }


def openapi_document(commands: list[str], job_names: list[str], *, token_required: bool,
                     version: str = "1.0", radiomics_models: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI document for a server serving ``commands`` (and ``job_names`` as jobs), with the Radiomics
    API's routes when ``radiomics_models`` (its model ids) is given."""
    auth_errors = (401, 403) if token_required else ()
    paths: dict[str, Any] = {
        "/healthcheck": {"get": {
            "summary": "Liveness and readiness: READY once the models are loaded",
            "operationId": "healthcheck", "security": [],
            "responses": {"200": {"description": "READY, LOADING or FAILED: <reason>",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics of every worker process", "operationId": "metrics",
            "responses": {"200": {"description": "Prometheus text exposition format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(*auth_errors)}}},
        "/audit": {"get": {
            "summary": "The audit trail's records, oldest first (role admin)", "operationId": "readAudit",
            "parameters": [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                            "description": text} for name, text in (
                ("study", "StudyInstanceUID"), ("user", "user name or ae:<AE title>"),
                ("from", "ISO 8601 time, inclusive"), ("to", "ISO 8601 time, inclusive"))],
            "responses": {"200": _json({"type": "object", "required": ["records", "count"],
                                        "properties": {"records": {"type": "array", "items": {"type": "object"}},
                                                       "count": {"type": "integer"}}}, "matching records"),
                          **_errors(400, *auth_errors)}}},
        "/models": {"get": {
            "summary": "The inference commands served", "operationId": "listModels",
            "responses": {"200": _json({"$ref": "#/components/schemas/Models"}, "served commands"),
                          **_errors(*auth_errors)}}},
        "/models/{family}": {"get": {
            "summary": "A model family of the registry: its versions and which one is the default",
            "operationId": "showModelFamily",
            "parameters": [{"name": "family", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json({"type": "object"}, "the family"),
                          "404": _json(ERROR, "no such family"), **_errors(*auth_errors)}}},
        "/models/{family}/monitoring": {"get": {
            "summary": "Drift watch of a model family: per version, the results and flags served and each watched "
                       "quantity's histogram against the training split's, with its population stability index "
                       "(role reviewer)",
            "operationId": "monitorModelFamily",
            "parameters": [{"name": "family", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json({"type": "object", "required": ["family", "versions"], "properties": {
                "family": {"type": "string"}, "psi_alert": {"type": "number"}, "psi_min_count": {"type": "integer"},
                "versions": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                    "results": {"type": "integer"}, "flagged": {"type": "integer"},
                    "share_flagged": {"type": "number", "nullable": True},
                    "expected_share_flagged": {"type": "number", "nullable": True},
                    "drifting": {"type": "array", "items": {"type": "string"}},
                    "quantities": {"type": "object"}}}}}}, "the summary"),
                          "404": _json(ERROR, "no such family"), **_errors(*auth_errors)}}},
        "/job/": {"post": {
            "summary": "Run a command as a job on a folder of the data root", "operationId": "submitJob",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/JobRequest"}}}},
            "responses": {"201": _json({"$ref": "#/components/schemas/JobCreated"}, "job queued"),
                          **_errors(400, *auth_errors, 403, 408, 415, 422)}}},
        "/query/{uid}": {"get": {
            "summary": "State of a job", "operationId": "queryJob",
            "parameters": [{"name": "uid", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json({"$ref": "#/components/schemas/JobState"}, "completed"),
                          "202": _json({"$ref": "#/components/schemas/JobState"}, "queued or running"),
                          "404": _json(ERROR, "no such job"),
                          **{str(s): _json({"$ref": "#/components/schemas/JobState"}, "the job failed")
                             for s in (400, 403, 413, 422, 500)},
                          **_errors(*auth_errors)}}},
        "/": {"post": {
            "summary": "Inference on a study folder of the data root (multipart uploads: docs/protocol.md)",
            "operationId": "inferStudyPath",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/StudyPathRequest"}}}},
            "responses": {"200": {"description": "multipart/related: the response JSON, then one part per buffer",
                                  "content": {"multipart/related": {"schema": {"type": "string",
                                                                               "format": "binary"}}}},
                          "202": _json({"type": "object", "required": ["uid", "review"],
                                        "properties": {"uid": {"type": "string"}, "review": {"type": "string"},
                                                       "msg": {"type": "string"}}},
                                       "held for review (\"review\" in the JSON): a job, GET /query/{uid}"),
                          **_errors(400, *auth_errors, 403, 408, 413, 415, 422, 500)}}},
    }
    paths.update(review_paths(auth_errors))
    if radiomics_models is not None:
        paths.update(radiomics_paths(radiomics_models, auth_errors))
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "Medical-imaging inference gateway", "version": version,
                 "description": "Research software, not for clinical use. Every error is JSON "
                                "{\"error\": ..., \"input_hash\": ...}."},
        "paths": paths,
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"],
                      "properties": {"error": {"type": "string"}, "input_hash": {"type": "string"}}},
            "Models": {"type": "object", "required": ["default_command", "models"],
                       "properties": {"default_command": {"type": "string", "nullable": True},
                                      "families": {"type": "array", "items": {"type": "object"}},
                                      "models": {"type": "array", "items": {
                                          "type": "object", "required": ["inference_command", "route"],
                                          "properties": {"inference_command": {"type": "string", "enum": commands},
                                                         "route": {"type": "string"},
                                                         "description": {"type": "string"}}}}}},
            "JobRequest": {"type": "object", "required": ["job_name", "in_dir"],
                           "properties": {"job_name": {"type": "string", "enum": job_names},
                                          "in_dir": {"type": "string", "minLength": 1},
                                          "review": {"type": "string", "enum": ["required", "flagged"],
                                                     "description": "hold the result for a reviewer"}},
                           "additionalProperties": True},
            "JobCreated": {"type": "object", "required": ["uid"], "properties": {"uid": {"type": "string"}}},
            "JobState": {"type": "object", "required": ["msg"],
                         "properties": {"msg": {"type": "string"}, "output_dir": {"type": "string"},
                                        "error": {"type": "string"}}},
            "StudyPathRequest": {"type": "object", "required": ["studyPath"],
                                 "properties": {"studyPath": {"type": "string"},
                                                "inference_command": {"type": "string", "enum": commands},
                                                "review": {"type": "string", "enum": ["required", "flagged"],
                                                           "description": "hold the result for a reviewer"}},
                                 "additionalProperties": True},
        }},
    }
    if token_required:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
