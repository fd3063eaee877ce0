"""The asynchronous job API: run a registered handler on a folder of the data root, poll for it.

    POST /job/ (or /job) {"job_name": "3dblur", "in_dir": "study1", "sigma_mm": 2.0}  -> 201 {"uid": ...}
    GET  /query/<uid> -> 202 {"msg": "Job is queued"} | 202 {"msg": "Job is running"}
                      -> 200 {"msg": "Job has completed", "output_dir": ...}
                      -> {"msg": "Job has failed", "error": ...} with the status its error would have
                         had as a request (400/403/422 for bad input, 500 for a server-side failure
                         or a job ``interrupted`` by a stopped server)
                      -> 404 for an unknown uid
    GET  /job/<uid>/files         -> 200 {"uid": ..., "files": [{"name": ..., "bytes": ...}]} of a completed job
    GET  /job/<uid>/files/<name>  -> that file (only files of that job's folder); 409 while not completed

A job name is a served inference command, or an alias of one (``JOB_ALIASES``). The job's other
JSON keys, plus ``inference_command``, are the handler's request JSON, checked at submission; the
job runs through the same pipeline as an upload, on the folder's DICOM files. Outputs go to
``<INFERENCE_OUTPUT_ROOT>/<uid>/`` (see ``write_outputs``, plus ``job.json``: the job, its input hash and run
time), which appears only once complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import traceback
from pathlib import Path

import flask
from flask import request

from utils import protocol
from utils.dicom import study_folder_files
from utils.errors import BadRequest, Conflict, GatewayError, NotFound, UnsupportedMediaType
from utils.jobs import COMPLETED, FAILED, QUEUED, RUNNING, UNFINISHED, Job, JobRunner, JobStore, LocalPoolRunner
from utils.metrics import JobCountsCollector
from utils.paths import is_inside
from utils.pipeline import Pipeline
from utils.request_json import parse_json_object
from utils.tagged_logger import TaggedLogger, bind_request_tags

log = TaggedLogger(logging.getLogger("inference.jobs"))

#: Job names of the seed's clients, mapped to the inference command they run.
JOB_ALIASES = {"3dblur": "gaussian-blur-3d"}
#: Job states reported by /metrics.
JOB_STATES = (QUEUED, RUNNING, COMPLETED, FAILED)
#: Keys of the job JSON that are about the job, not parameters of the handler.
JOB_KEYS = ("job_name", "in_dir")


def known_job_names(pipeline: Pipeline) -> dict[str, str]:
    """Every job name accepted now, mapped to its command: aliases of served commands, and the commands."""
    commands = [spec.command for spec in pipeline.specs]
    aliases = {name: command for name, command in JOB_ALIASES.items() if command in commands}
    return {**aliases, **{command: command for command in commands}}


def study_files(root: Path | None, in_dir: str) -> list[Path]:
    """The DICOM files of job folder ``in_dir``: 403 outside the data root, 422 for no DICOM there.

    Errors name the data root as configured (``INFERENCE_DATA_ROOT``), so a client can tell
    which folder ``in_dir`` is read from.
    """
    try:
        return study_folder_files(root, in_dir, field="in_dir")
    except GatewayError as exc:
        if root is None:
            raise
        raise type(exc)(f"{exc.message} (in_dir is relative to the data root INFERENCE_DATA_ROOT={root})",
                        status=exc.status) from None


def write_outputs(folder: Path, response_json: dict, buffers: list) -> None:
    """Write a prepared handler output into ``folder``: one file per part, then ``response.json``.

    Part ``i`` becomes ``output_dicom_<i>.dcm`` (DICOM types) or ``output_masks_<i>.raw``: the
    mask's uint8 bytes, C order of its ``binary_data_shape`` ((timepoints,) depth, height, width).
    Each part of ``response.json`` names its file under ``"file"``.
    """
    folder.mkdir(parents=True)
    for index, (part, buffer) in enumerate(zip(response_json["parts"], buffers)):
        dicom = part["binary_type"] in protocol.DICOM_TYPES
        name = f"output_dicom_{index:04d}.dcm" if dicom else f"output_masks_{index:04d}.raw"
        (folder / name).write_bytes(buffer)
        part["file"] = name
    (folder / "response.json").write_text(json.dumps(response_json, indent=1), encoding="utf-8")


class JobExecutor:
    """Runs one job through the pipeline on its folder's DICOM files; outputs written, state recorded."""

    def __init__(self, store: JobStore, pipeline: Pipeline) -> None:
        self.store = store
        self.pipeline = pipeline

    def __call__(self, job: Job) -> None:
        settings = self.pipeline.settings
        output = Path(settings.output_root) / job.uid
        partial = output.with_name(f"{job.uid}.partial")
        bind_request_tags({"job": job.uid})
        try:
            files = study_files(settings.data_root, job.in_dir)
            log.info("job %s: %s on %d files of %s", job.uid, job.command, len(files), job.in_dir)
            result = self.pipeline.run_files(job_request_json(job), files, command=job.command)
            shutil.rmtree(partial, ignore_errors=True)
            write_outputs(partial, result.response_json, result.buffers)
            (partial / "job.json").write_text(json.dumps({
                "uid": job.uid, "job_name": job.job_name, "command": result.command, "in_dir": job.in_dir,
                "params": job.params, "input_hash": result.input_hash, "seconds": round(result.seconds, 3),
            }, indent=1), encoding="utf-8")
            os.replace(partial, output)
        except GatewayError as exc:
            log.warning("job %s failed (%d): %s", job.uid, exc.status, exc.message)
            self.store.mark_failed(job.uid, exc.message, exc.status)
        except Exception as exc:
            log.error("job %s: handler %s failed:\n%s", job.uid, job.command, traceback.format_exc())
            self.store.mark_failed(job.uid, "internal error while running the job; the detail is in the server "
                                            f"log under job {job.uid}", 500)
        else:
            self.store.mark_completed(job.uid, str(output))
            log.info("job %s completed: %d outputs in %s", job.uid, len(result.buffers), output)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


def remove_debris(output_root: Path, store: JobStore) -> list[Path]:
    """Delete the ``<uid>.partial`` folders of jobs that are no longer queued or running; their paths.

    A job killed mid-write leaves one behind. It goes once the job is marked failed (``interrupted``,
    at start-up) or is unknown; a folder of a job some live worker still runs is kept.
    """
    removed = []
    for partial in sorted(Path(output_root).glob("*.partial")):
        job = store.get(partial.name.removesuffix(".partial"))
        if job is not None and job.status in UNFINISHED:
            continue
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    if removed:
        log.warning("removed %d unfinished output folders of stopped jobs: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def job_request_json(job: Job) -> dict:
    """The request JSON a job runs with: its parameters and its command, as an HTTP request would carry them."""
    return {"inference_command": job.command, **job.params}


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
    job = Job(job_name=job_name, command=names[job_name], in_dir=in_dir, params=params)
    pipeline.check_request(job_request_json(job), command=job.command)  # bad parameters: 400 now, not later
    study_files(pipeline.settings.data_root, in_dir)
    return job


def add_job_routes(app: flask.Flask, pipeline: Pipeline, *, store: JobStore | None = None,
                   runner: JobRunner | None = None) -> JobRunner:
    """Serve ``POST /job/`` and ``GET /query/<uid>`` on ``app``; recover interrupted jobs first.

    Jobs run ``pipeline``'s handlers with its settings. Default store:
    ``<INFERENCE_OUTPUT_ROOT>/jobs.sqlite3``; default runner: a local pool of ``INFERENCE_JOB_WORKERS`` threads.
    """
    settings = pipeline.settings
    output_root = Path(settings.output_root)
    store = store or JobStore(output_root / "jobs.sqlite3")
    runner = runner or LocalPoolRunner(store, JobExecutor(store, pipeline), workers=settings.job_workers,
                                       lock_dir=output_root / ".owners")
    runner.recover()
    remove_debris(output_root, store)
    if hasattr(app, "metrics_collectors"):  # a Gateway: /metrics counts jobs by state from the store
        app.metrics_collectors.append(JobCountsCollector(store.count_by_status, JOB_STATES))

    @app.post("/job/", strict_slashes=False)  # POST /job answers too, without a redirect
    def submit_job():
        job = job_from_request(pipeline)
        job.owner = runner.owner
        store.add(job)
        runner.submit(job)
        log.info("job %s queued: %s (%s) on %s", job.uid, job.job_name, job.command, job.in_dir)
        response = flask.jsonify({"uid": job.uid})
        response.headers["Location"] = f"/query/{job.uid}"
        return response, 201

    @app.get("/query/<uid>")
    def query_job(uid: str):
        job = store.get(uid)
        if job is None:
            raise NotFound(f"no job with uid {uid!r}; POST /job/ answers the uid of a new job")
        if job.status == COMPLETED:
            return flask.jsonify({"msg": "Job has completed", "output_dir": job.output_dir}), 200
        if job.status == FAILED:
            return flask.jsonify({"msg": "Job has failed", "error": job.error}), job.error_status or 500
        return flask.jsonify({"msg": "Job is queued" if job.status == QUEUED else "Job is running"}), 202

    def completed_folder(uid: str) -> Path:
        """The output folder of completed job ``uid``: 404 unknown, 409 not (or not successfully) complete."""
        job = store.get(uid)
        if job is None:
            raise NotFound(f"no job with uid {uid!r}; POST /job/ answers the uid of a new job")
        if job.status != COMPLETED:
            state = "has failed" if job.status == FAILED else "is queued" if job.status == QUEUED else "is running"
            raise Conflict(f"job {uid} {state}: it has no files; GET /query/{uid} tells its state")
        return Path(job.output_dir) if job.output_dir else output_root / uid

    @app.get("/job/<uid>/files")
    def list_job_files(uid: str):
        folder = completed_folder(uid)
        files = [{"name": path.name, "bytes": path.stat().st_size}
                 for path in sorted(folder.iterdir()) if path.is_file() and is_inside(folder, path)]
        return flask.jsonify({"uid": uid, "files": files})

    @app.get("/job/<uid>/files/<name>")
    def get_job_file(uid: str, name: str):
        folder = completed_folder(uid)
        path = folder / name
        if "/" in name or name.startswith(".") or not path.is_file() or not is_inside(folder, path):
            raise NotFound(f"job {uid} has no file {name!r}; GET /job/{uid}/files lists them")
        return flask.send_file(path, as_attachment=True, download_name=name,
                               mimetype="application/json" if name.endswith(".json") else None)

    return runner
