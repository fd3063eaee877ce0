"""Run one job through the pipeline on a folder of the data root, and write its outputs.

Both job backends use it: the local thread pool (``inference.jobs.store.LocalPoolRunner``) and the
Celery workers (``inference.jobs.celery_backend``). Outputs go to ``<INFERENCE_OUTPUT_ROOT>/<uid>/``
(``write_outputs``, plus ``job.json``: the job, its input hash and run time), which appears only
once complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import traceback
import uuid
from pathlib import Path

import numpy as np

from inference import protocol
from inference.audit import audit_log
from inference.config import Settings
from inference.dicom.files import study_folder_files
from inference.dicom.series import Geometry, Volume
from inference.disk_space import StoreFull, check_free_space, disk_full_as
from inference.errors import (
    GatewayError,
)
from inference.jobs.reviews import Review, ReviewRecords, is_flagged, must_hold
from inference.jobs.store import (
    UNFINISHED,
    Job,
    JobRecords,
)
from inference.logs import TaggedLogger, bind_request_tags
from inference.metrics import record_store_full
from inference.pipeline.pipeline import Pipeline

log = TaggedLogger(logging.getLogger("inference.jobs"))

#: Job names of the seed's clients, mapped to the inference command they run.
JOB_ALIASES = {"3dblur": "gaussian-blur-3d"}
#: The job name of a request whose result was held for review (``review`` in its JSON): completed when recorded.
HELD_REQUEST = "held-request"
#: The job name of a job whose input is a posted volume (the Radiomics door), not a folder of DICOM files.
VOLUME_JOB = "posted-volume"


def volume_input_folder(output_root: Path, uid: str) -> Path:
    """Where a posted-volume job's input waits for its worker: ``<INFERENCE_OUTPUT_ROOT>/<uid>.input/``."""
    return Path(output_root) / f"{uid}.input"


def save_volume_input(folder: Path, volume: Volume, input_hash: str) -> None:
    """Keep a posted volume for its job: ``voxels.npy`` and ``volume.json`` (spacing, geometry, hash).

    Written under a temporary name and renamed, so a worker never reads half of it.
    """
    partial = folder.with_name(folder.name.removesuffix(".input") + ".partial-input")
    geometry = dataclasses.asdict(volume.geometry) if volume.geometry is not None else None
    try:
        with disk_full_as("output"):
            partial.mkdir(parents=True)
            np.save(partial / "voxels.npy", volume.voxels, allow_pickle=False)
            (partial / "volume.json").write_text(json.dumps({"spacing": volume.spacing, "geometry": geometry,
                                                             "uid": volume.uid, "input_hash": input_hash}),
                                                 encoding="utf-8")
            os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_volume_input(folder: Path) -> tuple[Volume, str]:
    """A posted volume kept by ``save_volume_input`` and its input hash."""
    meta = json.loads((folder / "volume.json").read_text(encoding="utf-8"))
    voxels = np.load(folder / "voxels.npy", allow_pickle=False)
    geometry = Geometry(**{k: tuple(v) for k, v in meta["geometry"].items()}) if meta["geometry"] else None
    spacing = tuple(float(v) for v in meta["spacing"])
    return Volume(voxels, (spacing[0], spacing[1], spacing[2]), [], geometry, uid=meta["uid"]), meta["input_hash"]


def known_job_names(pipeline: Pipeline) -> dict[str, str]:
    """Every job name accepted now, mapped to its command: aliases of served commands, and the commands."""
    commands = [spec.command for spec in pipeline.specs]
    aliases = {name: command for name, command in JOB_ALIASES.items() if command in commands}
    return {**aliases, **{command: command for command in commands}}


def study_files(root: Path | None, in_dir: str) -> list[Path]:
    """The DICOM files of job folder ``in_dir``: 403 outside the data root, 422 for no DICOM there.

    Errors say that ``in_dir`` is relative to the data root (``INFERENCE_DATA_ROOT``), never the root's path:
    answers show no server paths.
    """
    try:
        return study_folder_files(root, in_dir, field="in_dir")
    except GatewayError as exc:
        if root is None:
            raise
        raise type(exc)(f"{exc.message} (in_dir is relative to the server's data root, INFERENCE_DATA_ROOT)",
                        status=exc.status) from None


def write_outputs(folder: Path, response_json: dict, buffers: list) -> None:
    """Write a prepared handler output into ``folder``: one file per part, then ``response.json``.

    Part ``i`` becomes ``output_dicom_<i>.dcm`` (DICOM types) or ``output_masks_<i>.raw``: the
    mask's uint8 bytes, C order of its ``binary_data_shape`` ((timepoints,) depth, height, width).
    Each part of ``response.json`` names its file under ``"file"``.
    """
    folder.mkdir(parents=True)
    for index, (part, buffer) in enumerate(zip(response_json["parts"], buffers, strict=True)):
        dicom = part["binary_type"] in protocol.DICOM_TYPES
        name = f"output_dicom_{index:04d}.dcm" if dicom else f"output_masks_{index:04d}.raw"
        (folder / name).write_bytes(buffer)
        part["file"] = name
    (folder / "response.json").write_text(json.dumps(response_json, indent=1), encoding="utf-8")


class JobExecutor:
    """Runs one job through the pipeline on its folder's DICOM files; outputs written, state recorded.

    Exceptions of the ``reraise`` types are not recorded but raised to the runner, which decides
    (the celery runner retries transient errors and fails timeouts). Running a job again after its
    output folder appeared only records it completed: a re-delivered job is not written twice.
    """

    def __init__(self, store: JobRecords, pipeline: Pipeline, *, reviews: ReviewRecords,
                 reraise: tuple[type[BaseException], ...] = ()) -> None:
        self.store = store
        self.reviews = reviews
        self.pipeline = pipeline
        self.reraise = reraise

    def __call__(self, job: Job) -> None:
        settings = self.pipeline.settings
        output = Path(settings.output_root) / job.uid
        # one folder per attempt: two attempts at once (a worker cut off from Redis past its lease) never mix files
        partial = output.with_name(f"{job.uid}.partial.{uuid.uuid4().hex[:8]}")
        bind_request_tags({"job": job.uid})
        if output.is_dir():  # an earlier attempt finished it (the folder appears only once whole)
            log.info("job %s: output already complete in %s", job.uid, output)
            self.store.mark_completed(job.uid, str(output))
            remove_partials(output)
            return
        volume_input = volume_input_folder(settings.output_root, job.uid)
        try:
            check_free_space("output", settings.output_root, settings.min_free_space_mb)
            if job.job_name == VOLUME_JOB:
                volume, input_hash = load_volume_input(volume_input)
                log.info("job %s: %s on a posted volume %s", job.uid, job.command, volume.voxels.shape)
                result = self.pipeline.run_volume(job_request_json(job), volume, input_hash, command=job.command)
            else:
                files = study_files(job_root(settings, job), job.in_dir)
                log.info("job %s: %s on %d files of %s", job.uid, job.command, len(files), job.in_dir)
                result = self.pipeline.run_files(job_request_json(job), files, command=job.command)
            with disk_full_as("output"):
                write_outputs(partial, result.response_json, result.buffers)
                (partial / "job.json").write_text(json.dumps({
                    "uid": job.uid, "job_name": job.job_name, "command": result.command, "in_dir": job.in_dir,
                    "params": job.params, "input_hash": result.input_hash, "seconds": round(result.seconds, 3),
                }, indent=1), encoding="utf-8")
            try:
                os.replace(partial, output)
            except OSError:
                if not output.is_dir():
                    raise
                log.warning("job %s: another attempt completed it first; keeping its output", job.uid)
        except self.reraise:
            raise  # the runner decides: a retry needs the input again
        except GatewayError as exc:
            wrapped = wrapped_exception(exc, self.reraise)
            if wrapped is not None:  # e.g. the time limit struck while pixel data was decoded (a 422 around it)
                raise wrapped from None
            log.warning("job %s failed (%d): %s", job.uid, exc.status, exc.message)
            if isinstance(exc, StoreFull):
                record_store_full(exc.store)
                shutil.rmtree(partial, ignore_errors=True)  # the room the job store needs to record the failure
            self.store.mark_failed(job.uid, exc.message, exc.status)
            shutil.rmtree(volume_input, ignore_errors=True)
        except Exception as exc:
            wrapped = wrapped_exception(exc, self.reraise)
            if wrapped is not None:  # a library re-raised it as its own error (pydicom's writer does)
                raise wrapped from None
            log.error("job %s: handler %s failed:\n%s", job.uid, job.command, traceback.format_exc())
            self.store.mark_failed(job.uid, "internal error while running the job; the detail is in the server "
                                            f"log under job {job.uid}", 500)
            shutil.rmtree(volume_input, ignore_errors=True)
        else:
            audit_log(settings).append("result-produced", user=job.user, study_uid=job.study_uid,
                                       input_hash=result.input_hash, job=job.uid, command=result.command)
            if must_hold(job.review, result.response_json):  # held before it is seen completed: never released early
                hold_result(self.reviews, self.pipeline, job, result.response_json, result.input_hash)
            self.store.mark_completed(job.uid, str(output))
            shutil.rmtree(volume_input, ignore_errors=True)
            log.info("job %s completed: %d outputs in %s", job.uid, len(result.buffers), output)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
            if output.is_dir():
                remove_partials(output)


def hold_result(reviews: ReviewRecords, pipeline: Pipeline, job: Job, response_json: dict, input_hash: str) -> Review:
    """Keep a completed job's result for a reviewer (``inference.jobs.reviews``), with the model that made it."""
    version = pipeline.check_request(job_request_json(job), command=job.command).model_version
    model = {} if version is None else {"family": version.family, "version": version.version,
                                        "sha256": version.sha256}
    review = reviews.hold(Review(
        uid=job.uid, command=job.command, mode=str(job.review), study_uid=job.study_uid, input_hash=input_hash,
        flagged=is_flagged(response_json), model=model, submitter=job.user, node=job.spool))
    holder = job.user or (f"ae:{pipeline.settings.pacs_ae_title}" if job.spool else None)  # the node holds its own
    audit_log(pipeline.settings).append("result-held", user=holder, study_uid=job.study_uid, input_hash=input_hash,
                                        job=job.uid, review=job.review, flagged=review.flagged)
    log.info("job %s: result held for review (%s%s)", job.uid, job.review, ", flagged" if review.flagged else "")
    return review


def wrapped_exception(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The exception of one of ``kinds`` that ``exc`` was raised while handling (its context chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and kinds:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def remove_partials(output: Path) -> None:
    """Delete every partial folder of a job whose ``output`` is complete: those of attempts that died."""
    for leftover in output.parent.glob(f"{output.name}.partial*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_debris(output_root: Path, store: JobRecords) -> list[Path]:
    """Delete the ``<uid>.partial*`` (and posted-volume ``<uid>.input``) folders of jobs no longer queued or running.

    A job killed mid-write leaves one behind. It goes once the job is marked failed (``interrupted``,
    at start-up) or is unknown; a folder of a job some live worker still runs is kept.
    """
    removed = []
    debris = [*Path(output_root).glob("*.partial*"), *Path(output_root).glob("*.input")]
    for partial in sorted(debris):
        job = store.get(partial.name.split(".")[0])
        if job is not None and job.status in UNFINISHED:
            continue
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    if removed:
        log.warning("removed %d unfinished output folders of stopped jobs: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def job_root(settings: Settings, job: Job) -> Path | None:
    """The folder ``job.in_dir`` is relative to: the DICOM node's spool for its jobs, the output root for a
    request held for review (its study kept in ``<uid>/input``), else the data root."""
    if job.job_name == HELD_REQUEST:
        return Path(settings.output_root)
    return Path(settings.pacs_root) / "spool" if job.spool else settings.data_root


def job_request_json(job: Job) -> dict:
    """The request JSON a job runs with: its parameters and its command, as an HTTP request would carry them."""
    return {"inference_command": job.command, **job.params}


