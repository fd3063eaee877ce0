"""The asynchronous job API: run a registered handler on a folder of the data root, poll for it.

    POST /job/ (or /job) {"job_name": "3dblur", "in_dir": "study1", "sigma_mm": 2.0}  -> 201 {"uid": ...}
    GET  /query/<uid> -> 202 {"msg": "Job is queued"} | 202 {"msg": "Job is running"}
                      -> 200 {"msg": "Job has completed", "output_dir": ...}
                      -> {"msg": "Job has failed", "error": ...} with the status its error would have
                         had as a request (400/403/422 for bad input, 500 for a server-side failure
                         or a job ``interrupted`` by a stopped server)
                      -> 404 for an unknown uid
                      every answer for a job also carries "attempts": how many times a worker started it
    GET  /job/<uid>/files         -> 200 {"uid": ..., "files": [{"name": ..., "bytes": ...}]} of a completed job
    GET  /job/<uid>/files/<name>  -> that file (only files of that job's folder); 409 while not completed
    A job with "review": "required" (or "flagged") is held once complete: its files answer 409 until a
    reviewer accepts it (the model's files) or corrects it (the correction's); see ``inference.review``.

A job name is a served inference command, or an alias of one (``JOB_ALIASES``). The job's other
JSON keys, plus ``inference_command``, are the handler's request JSON, checked at submission; the
job runs through the same pipeline as an upload, on the folder's DICOM files. Outputs go to
``<INFERENCE_OUTPUT_ROOT>/<uid>/`` (see ``write_outputs``, plus ``job.json``: the job, its input hash and run
time), which appears only once complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import flask
import pydicom
import pydicom.errors
from flask import g, request
from flask.blueprints import BlueprintSetupState

from inference.disk_space import check_free_space, disk_full_as
from inference.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    UnsupportedMediaType,
)
from inference.http.current import audit_event, may_read
from inference.http.roles import needs
from inference.jobs.executor import (
    HELD_REQUEST,
    JobExecutor,
    hold_result,
    job_request_json,
    known_job_names,
    remove_debris,
    study_files,
    write_outputs,
)
from inference.jobs.reviews import ACCEPTED, CORRECTED, ReviewRecords, review_mode, review_records
from inference.jobs.store import (
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    JobRecords,
    JobRunner,
    JobStore,
    LocalPoolRunner,
)
from inference.logs import TaggedLogger
from inference.metrics import JobCountsCollector
from inference.paths import is_inside
from inference.pipeline.pipeline import InferenceResult, Pipeline
from inference.protocol.multipart_request import ParsedBody
from inference.protocol.request import parse_json_object
from inference.storage.backend import REDIS, Backend, checked_backend
from inference.users import SUBMITTER

log = TaggedLogger(logging.getLogger("inference.jobs"))
#: Job states reported by /metrics.
JOB_STATES = (QUEUED, RUNNING, COMPLETED, FAILED)
#: Keys of the job JSON that are about the job, not parameters of the handler.
JOB_KEYS = ("job_name", "in_dir", "review")


def shown_folder(output_dir: str | None, output_root: Path) -> str | None:
    """A job's output folder as answers show it: relative to the output root (no server path)."""
    if output_dir is None:
        return None
    try:
        return Path(output_dir).relative_to(output_root).as_posix()
    except ValueError:
        return Path(output_dir).name


def job_from_request(pipeline: Pipeline) -> Job:
    """The job a ``POST /job/`` asks for, checked up front: name, parameters, folder, DICOM present."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType('send the job as Content-Type: application/json: '
                                   '{"job_name": "3dblur", "in_dir": "<folder>", ...}')
    body = parse_json_object(request.get_data(cache=False), "the job")
    names = known_job_names(pipeline)
    job_name, in_dir = body.get("job_name"), body.get("in_dir")
    if not isinstance(job_name, str) or job_name not in names:
        raise BadRequest(f"unknown job_name {job_name!r}; known job names: {', '.join(sorted(names))}")
    if not isinstance(in_dir, str) or not in_dir:
        raise BadRequest("in_dir must be the folder of the study, relative to the server's data root")
    params = {key: value for key, value in body.items() if key not in JOB_KEYS}
    job = Job(job_name=job_name, command=names[job_name], in_dir=in_dir, params=params,
              review=review_mode(body.get("review"), "the job"))
    pipeline.check_request(job_request_json(job), command=job.command)  # bad parameters: 400 now, not later
    files = study_files(pipeline.settings.data_root, in_dir)
    job.study_uid = first_study_uid(files)
    return job


def first_study_uid(files: list[Path]) -> str | None:
    """The StudyInstanceUID of the first readable file of ``files`` (what the audit trail records), else None."""
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        return str(header.get("StudyInstanceUID", "")) or None
    return None


def job_service(pipeline: Pipeline, backend: Backend, *, store: JobRecords | None = None,
                runner: JobRunner | None = None) -> tuple[JobRecords, JobRunner]:
    """The job store and runner of ``pipeline``'s settings, interrupted jobs recovered and their debris removed.

    Default store: ``<INFERENCE_OUTPUT_ROOT>/jobs.sqlite3``; default runner: a local pool of
    ``INFERENCE_JOB_WORKERS`` threads. ``INFERENCE_JOB_BACKEND=celery``: records in Redis, jobs run by celery
    workers (``inference.jobs.celery_backend``) with the same handlers. A ``store`` other than a ``JobStore``
    comes with its ``runner``: the local pool recovers interrupted jobs from a ``JobStore``.
    """
    settings = pipeline.settings
    output_root = Path(settings.output_root)
    if store is None and runner is None and backend.kind == REDIS:
        from inference.jobs.celery_backend import (
            celery_backend,  # celery is imported only by servers that use it
        )

        store, runner = celery_backend(settings)
    if store is None:
        store = JobStore(backend.folder / "jobs.sqlite3")
    if runner is None:
        if not isinstance(store, JobStore):
            raise TypeError(f"a {type(store).__name__} needs its own runner: the local pool keeps jobs in a JobStore")
        runner = LocalPoolRunner(store, JobExecutor(store, pipeline, reviews=review_records(backend)),
                                 workers=settings.job_workers, lock_dir=output_root / ".owners")
    runner.recover()
    remove_debris(output_root, store)
    return store, runner


def add_job_routes(app: flask.Flask, pipeline: Pipeline, *, store: JobRecords | None = None,
                   runner: JobRunner | None = None) -> tuple[JobRecords, JobRunner]:
    """The job API on a gateway built by hand: ``job_service``'s store and runner, ``job_blueprint`` registered."""
    backend = checked_backend(pipeline.settings)
    store, runner = job_service(pipeline, backend, store=store, runner=runner)
    app.register_blueprint(job_blueprint(pipeline, store, runner, review_records(backend)))
    return store, runner


def job_blueprint(pipeline: Pipeline, store: JobRecords, runner: JobRunner,
                  reviews: ReviewRecords) -> flask.Blueprint:
    """``POST /job/``, ``GET /query/<uid>`` and a job's files, for the jobs of ``store`` run by ``runner``.

    Registered on a Gateway, it counts jobs by state on ``/metrics`` and keeps the requests that ask for
    review as held jobs (the gateway's ``hold_result``).
    """
    settings = pipeline.settings
    output_root = Path(settings.output_root)
    blueprint = flask.Blueprint("jobs", __name__)

    def keep_for_review(result: InferenceResult, body: ParsedBody, json_input: dict, study_uid: str | None,
                        mode: str) -> str:
        """A request's result held for review: a completed job with its outputs and the study's instances
        (``<uid>/input``, for a correction's checks) and its review; the job uid."""
        job = Job(job_name=HELD_REQUEST, command=result.command, in_dir="", status=COMPLETED, review=mode,
                  params={k: v for k, v in json_input.items() if k != "inference_command"}, user=g.get("user"),
                  study_uid=study_uid, finished=time.time())
        job.in_dir = f"{job.uid}/input"
        output = output_root / job.uid
        partial = output_root / f"{job.uid}.partial.request"
        try:
            with disk_full_as("output"):
                write_outputs(partial, result.response_json, result.buffers)
                (partial / "input").mkdir()
                for index, part in enumerate(body.parts[1:]):
                    (partial / "input" / f"instance_{index:05d}.dcm").write_bytes(part.read_bytes())
                os.replace(partial, output)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        job.output_dir = str(output)
        hold_result(reviews, pipeline, job, result.response_json, result.input_hash)  # before the job is seen
        store.add(job)
        return job.uid

    def joined(state: BlueprintSetupState) -> None:
        app: Any = state.app
        app.metrics_collectors.append(JobCountsCollector(store.count_by_status, JOB_STATES))
        app.hold_result = keep_for_review  # requests with "review" are held as jobs here

    blueprint.record_once(joined)

    def readable(uid: str) -> Job:
        """Job ``uid`` when this request's user may read it: 404 unknown, 403 another submitter's (audited)."""
        job = store.get(uid)
        if job is None:
            raise NotFound(f"no job with uid {uid!r}; POST /job/ answers the uid of a new job")
        if not may_read(job.user):
            audit_event("result-viewed", outcome="refused", study_uid=job.study_uid, job=uid, path=request.path)
            raise Forbidden(f"job {uid} was submitted by another user; a submitter reads only its own jobs",
                            required_role="reviewer")
        return job

    @blueprint.post("/job/", strict_slashes=False)  # POST /job answers too, without a redirect
    @needs(SUBMITTER)
    def submit_job() -> tuple[flask.Response, int]:
        job = job_from_request(pipeline)
        check_free_space("output", output_root, settings.min_free_space_mb)  # 507 now, not a job failing later
        job.owner = runner.owner
        job.user = g.get("user")
        store.add(job)
        audit_event("study-received", study_uid=job.study_uid, door="job", job=job.uid, in_dir=job.in_dir,
                    command=job.command)
        runner.submit(job)
        log.info("job %s queued: %s (%s) on %s", job.uid, job.job_name, job.command, job.in_dir)
        response = flask.jsonify({"uid": job.uid})
        response.headers["Location"] = f"/query/{job.uid}"
        return response, 201

    @blueprint.get("/query/<uid>")
    @needs(SUBMITTER)
    def query_job(uid: str) -> tuple[flask.Response, int]:
        job = readable(uid)
        if job.status == COMPLETED:
            audit_event("result-viewed", study_uid=job.study_uid, job=uid, path=request.path)
            # the folder relative to INFERENCE_OUTPUT_ROOT, never the server's path; its files at /job/<uid>/files
            answer = {"msg": "Job has completed", "output_dir": shown_folder(job.output_dir, output_root),
                      "files": f"/job/{uid}/files", "attempts": job.attempts}
            review = reviews.get(uid) if job.review else None
            if review is not None:
                answer["review"] = review.status
            return flask.jsonify(answer), 200
        if job.status == FAILED:
            return flask.jsonify({"msg": "Job has failed", "error": job.error,
                                  "attempts": job.attempts}), job.error_status or 500
        return flask.jsonify({"msg": "Job is queued" if job.status == QUEUED else "Job is running",
                              "attempts": job.attempts}), 202

    def completed_folder(uid: str) -> tuple[Job, Path]:
        """Completed job ``uid`` and its output folder: 404 unknown, 409 not (or not successfully) complete."""
        job = readable(uid)
        if job.status != COMPLETED:
            state = "has failed" if job.status == FAILED else "is queued" if job.status == QUEUED else "is running"
            raise Conflict(f"job {uid} {state}: it has no files; GET /query/{uid} tells its state")
        folder = Path(job.output_dir) if job.output_dir else output_root / uid
        review = reviews.get(uid) if job.review else None
        if review is not None and review.status not in (ACCEPTED, CORRECTED):
            raise Conflict(f"job {uid}'s result is {review.status}: it is released only once a reviewer accepts "
                           "or corrects it (GET /reviews)")
        if review is not None and review.status == CORRECTED:
            folder = folder / "correction"  # the reviewer's segmentation and report, not the model's
        return job, folder

    @blueprint.get("/job/<uid>/files")
    @needs(SUBMITTER)
    def list_job_files(uid: str) -> flask.Response:
        """The files of a completed job: name and size of each (409 while it runs or when it failed)."""
        job, folder = completed_folder(uid)
        files = [{"name": path.name, "bytes": path.stat().st_size}
                 for path in sorted(folder.iterdir()) if path.is_file() and is_inside(folder, path)]
        audit_event("result-viewed", study_uid=job.study_uid, job=uid, path=request.path)
        return flask.jsonify({"uid": uid, "files": files})

    @blueprint.get("/job/<uid>/files/<name>")
    @needs(SUBMITTER)
    def get_job_file(uid: str, name: str) -> flask.Response:
        """One file of a completed job's own folder, as an attachment."""
        job, folder = completed_folder(uid)
        path = folder / name
        if "/" in name or name.startswith(".") or not path.is_file() or not is_inside(folder, path):
            raise NotFound(f"job {uid} has no file {name!r}; GET /job/{uid}/files lists them")
        audit_event("result-downloaded", study_uid=job.study_uid, job=uid, file=name)
        return flask.send_file(path, as_attachment=True, download_name=name,
                               mimetype="application/json" if name.endswith(".json") else None)

    return blueprint
