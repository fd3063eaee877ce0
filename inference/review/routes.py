"""The reviewer's routes on the gateway's app: the queue, one held result, and the decisions on it.

    GET  /reviews                       -> the held results (``?status=all`` adds the decided ones)
    GET  /reviews/<uid>                 -> one: its review, response JSON, result tables, model, image links
    GET  /reviews/<uid>/images/<n>.png  -> the source slices with the model's segmentation, or a result image
    POST /reviews/<uid>/accept          -> release it as it is (the DICOM node sends it, the job API serves it)
    POST /reviews/<uid>/reject          -> {"reason": "..."}: never released
    POST /reviews/<uid>/correct         -> a corrected DICOM SEG (application/dicom, or multipart/form-data
                                           field ``file``), released instead of the model's with a new SR
    GET  /review/                       -> the page (``inference.review.page``): no data in it, it reads the above

Every route but the page needs the ``reviewer`` role (admins too); each step is an audit record.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flask
import pydicom
from flask import g, request
from PIL import Image

from inference import protocol
from inference.config import Settings
from inference.dicom.results import Algorithm
from inference.dicom.writing import dataset_bytes
from inference.errors import BadRequest, Conflict, NotFound, UnprocessableInput, UnsupportedMediaType
from inference.http.current import audit_event
from inference.http.roles import PUBLIC, needs
from inference.jobs.executor import job_root
from inference.jobs.reviews import ACCEPTED, AWAITING, CORRECTED, REJECTED, Review, ReviewRecords
from inference.jobs.store import Job, JobRecords
from inference.pacs.priors import CORRECTED_BY
from inference.protocol.summary import model_version, result_rows
from inference.radiomics.records import RadiomicsRecords
from inference.review import correction as corrections
from inference.review.feedback import DECISION, ReviewCollector, decision_entry, is_overdue, mean_dice
from inference.review.images import overlay_slices, result_images
from inference.review.page import REVIEW_PAGE
from inference.users import REVIEWER
from models.registry import ModelRegistry

log = logging.getLogger("inference.review")
#: Results whose review images a process keeps drawn (a few PNGs of tens of kB each).
IMAGES_KEPT = 32
#: Largest corrected SEG accepted (a label SEG of a whole MR series is a few MB).
MAX_CORRECTION_BYTES = 256 * 1024**2


def review_blueprint(settings: Settings, jobs: JobRecords, reviews: ReviewRecords, records: RadiomicsRecords,
                     registry: ModelRegistry,
                     on_decision: Sequence[Callable[[Review], object]] = ()) -> flask.Blueprint:
    """The reviewer's routes and page for the jobs of ``jobs``; each new decision is also passed to ``on_decision``
    (e.g. the hippocampus result history, so a rejected result is no prior). Registered on a Gateway, the review
    counts join its ``/metrics``."""
    overdue_seconds = settings.review_overdue_seconds
    blueprint = flask.Blueprint("review", __name__)
    blueprint.record_once(lambda state: state.app.metrics_collectors.append(  # type: ignore[attr-defined]
        ReviewCollector(reviews, lambda: records, overdue_seconds)))

    def described(review: Review) -> dict:
        return {**review.to_json(), "overdue": is_overdue(review, overdue_seconds)}

    def held(uid: str) -> tuple[Review, Job, Path]:
        review, job = reviews.get(uid), jobs.get(uid)
        if review is None or job is None or not job.output_dir:
            raise NotFound(f"no result of job {uid!r} is held for review; GET /reviews lists them")
        return review, job, Path(job.output_dir)

    def structures_of(review: Review) -> tuple:
        if not review.model.get("family"):
            raise UnprocessableInput(f"the result of job {review.uid} ({review.command}) comes from no model "
                                     "family with structures: there is no segmentation to correct")
        return registry.family(review.model["family"]).resolve(review.model["version"]).structures

    def source_of(job: Job, seg: Path) -> list:
        """The headers of the series the model's SEG ``seg`` segments, from the job's input folder."""
        root = job_root(settings, job)
        if root is None:
            raise UnprocessableInput("INFERENCE_DATA_ROOT is not set here: the job's source series cannot be read")
        return corrections.source_series(root / job.in_dir, corrections.referenced_series_uid(pydicom.dcmread(seg)))

    def model_seg(output: Path) -> Path | None:
        for path in result_files(output):
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            if str(header.get("SOPClassUID", "")) == corrections.SEGMENTATION_STORAGE:
                return path
        return None

    def audit(event: str, review: Review, **fields: Any) -> None:
        audit_event(event, study_uid=review.study_uid,
                    input_hash=review.input_hash, job=review.uid, **fields)

    def decided(review: Review, changed: bool, event: str, **fields: Any) -> flask.Response:
        if changed:
            records.add_entry(DECISION, decision_entry(review))
            for listener in on_decision:
                try:
                    listener(review)
                except Exception:  # the decision stands; a store that missed it is logged, not the reviewer's error
                    log.exception("job %s: decision %s not passed on to %r", review.uid, review.status, listener)
            audit(event, review, decision=review.status, **fields)
            log.info("job %s %s by %s", review.uid, review.status, review.decided_by)
        else:
            audit(event, review, decision=review.status, repeated=True)
        return flask.jsonify({"review": described(review), "new": changed})

    @blueprint.get("/reviews")
    @needs(REVIEWER)
    def reviews_queue() -> flask.Response:
        everything = request.args.get("status") == "all"
        items = [described(r) for r in reviews.all() if everything or r.status == AWAITING]
        return flask.jsonify({"reviews": items, "awaiting": sum(r["status"] == AWAITING for r in items),
                              "overdue": sum(r["overdue"] for r in items), "overdue_seconds": overdue_seconds})

    @blueprint.get("/reviews/<uid>")
    @needs(REVIEWER)
    def review_show(uid: str) -> flask.Response:
        review, job, output = held(uid)
        response_json = json.loads((output / "response.json").read_text(encoding="utf-8"))
        tables = [{"title": "Study", "rows": result_rows(response_json["study_ml_json"])}] \
            if response_json.get("study_ml_json") else []
        tables += [{"title": f"Series {series}", "rows": result_rows(values)}
                   for series, values in (response_json.get("series_ml_json") or {}).items()]
        count = len(review_images(review, job, output))
        audit("result-viewed", review, path=request.path)
        return flask.jsonify({
            "review": described(review), "model": model_version(response_json) or _model_text(review),
            "tables": [{"title": t["title"], "rows": [vars(row) for row in t["rows"]]} for t in tables],
            "images": [f"/reviews/{uid}/images/{n}.png" for n in range(count)], "response": response_json})

    drawn: OrderedDict[str, list[bytes]] = OrderedDict()  # job uid -> its PNGs (a result never changes once held)
    drawn_lock = threading.Lock()

    def review_images(review: Review, job: Job, output: Path) -> list[bytes]:
        """The PNGs of a held result: overlay slices of the model's SEG, then its image outputs (the last few kept)."""
        with drawn_lock:
            if review.uid in drawn:
                drawn.move_to_end(review.uid)
                return drawn[review.uid]
        images: list[Image.Image] = []
        seg = model_seg(output)
        if seg is not None and review.model.get("family"):
            source = source_of(job, seg)
            structures = structures_of(review)
            labels = corrections.read_segmentation(seg.read_bytes(), source, structures,
                                                   "the model's segmentation").labels
            images += overlay_slices(source, labels, structures)
        pngs = []
        for image in images + result_images(result_files(output)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        with drawn_lock:
            drawn[review.uid] = pngs
            while len(drawn) > IMAGES_KEPT:
                drawn.popitem(last=False)
        return pngs

    @blueprint.get("/reviews/<uid>/images/<int:number>.png")
    @needs(REVIEWER)
    def review_image(uid: str, number: int) -> flask.Response:
        review, job, output = held(uid)
        images = review_images(review, job, output)
        if number >= len(images):
            raise NotFound(f"job {uid}'s result has {len(images)} images; GET /reviews/{uid} lists them")
        audit("result-viewed", review, path=request.path)
        return flask.Response(images[number], mimetype="image/png")

    @blueprint.post("/reviews/<uid>/accept")
    @needs(REVIEWER)
    def review_accept(uid: str) -> flask.Response:
        held(uid)
        review, changed = reviews.decide(uid, ACCEPTED, g.get("user"))
        return decided(review, changed, "result-accepted")

    @blueprint.post("/reviews/<uid>/reject")
    @needs(REVIEWER)
    def review_reject(uid: str) -> flask.Response:
        held(uid)
        body = request.get_json(silent=True) if request.mimetype == "application/json" else None
        reason = (body or {}).get("reason") if isinstance(body, dict) else None
        if not isinstance(reason, str) or not reason.strip():
            raise BadRequest('a rejection needs a reason: POST {"reason": "..."} as application/json')
        review, changed = reviews.decide(uid, REJECTED, g.get("user"), reason=reason.strip()[:2000])
        return decided(review, changed, "result-rejected")

    @blueprint.post("/reviews/<uid>/correct")
    @needs(REVIEWER)
    def review_correct(uid: str) -> flask.Response:
        review, job, output = held(uid)
        if review.status == CORRECTED:
            return decided(review, False, "result-corrected")
        if review.status != AWAITING:
            raise Conflict(f"job {uid} was already {review.status} by {review.decided_by}; a decision is final")
        data = uploaded_seg()
        seg = model_seg(output)
        if seg is None:
            raise UnprocessableInput(f"the result of job {uid} has no DICOM SEG to correct")
        structures = structures_of(review)
        source = source_of(job, seg)
        model = corrections.read_segmentation(seg.read_bytes(), source, structures, "the model's segmentation")
        corrected = corrections.read_segmentation(data, source, structures)
        comparison = corrections.compare(model.labels, corrected.labels, structures,
                                         corrections.voxel_volume_mm3(source))
        user = g.get("user") or "unnamed reviewer"
        algorithm = Algorithm(review.model["family"], f"{review.model['version']} (weights sha256 "
                                                      f"{review.model['sha256'][:12]}){CORRECTED_BY}{user}")
        report = corrections.corrected_report(source, corrected, structures, algorithm, user)
        partial = output / f"correction.partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            (partial / "corrected_seg.dcm").write_bytes(data)  # released as the viewer exported it
            (partial / "corrected_sr.dcm").write_bytes(dataset_bytes(report))  # what it cannot write is dropped
            os.rename(partial, output / "correction")  # fails when another correction got there first
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            raise Conflict(f"job {uid} is being corrected by another request; GET /reviews/{uid}") from None
        details = {"files": ["correction/corrected_seg.dcm", "correction/corrected_sr.dcm"],
                   "structures": comparison, "mean_dice": mean_dice(comparison),
                   "seg_series_uid": str(corrected.dataset.SeriesInstanceUID),
                   "sr_series_uid": str(report.SeriesInstanceUID)}
        try:
            review, changed = reviews.decide(uid, CORRECTED, g.get("user"), correction=details)
        except Conflict:
            shutil.rmtree(output / "correction", ignore_errors=True)
            raise
        return decided(review, changed, "result-corrected", mean_dice=details["mean_dice"])

    @blueprint.get("/review/")
    @needs(PUBLIC)  # the page's shell holds no data: it asks for a token and reads through the routes above
    def review_page() -> flask.Response:
        """The reviewer's page: the queue, a result's images and volumes, the decisions (it asks for the token)."""
        return flask.Response(REVIEW_PAGE, mimetype="text/html")

    return blueprint


def uploaded_seg() -> bytes:
    """The corrected SEG of a request: its body (application/dicom) or the form field ``file``; 400 otherwise."""
    if (request.content_length or 0) > MAX_CORRECTION_BYTES:
        raise BadRequest(f"a corrected segmentation must be under {MAX_CORRECTION_BYTES // 1024**2} MiB")
    request.max_content_length = MAX_CORRECTION_BYTES  # a chunked body without a length stops there too (413)
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise BadRequest("send the corrected DICOM SEG in the form field 'file'")
        return upload.read()
    if request.mimetype == "application/dicom":
        return request.get_data(cache=False)
    raise UnsupportedMediaType("send the corrected DICOM SEG as Content-Type: application/dicom, or as "
                               "multipart/form-data with the field 'file'")


def result_files(output: Path) -> list[Path]:
    """The DICOM files of a job's result (``response.json``'s parts)."""
    response = json.loads((output / "response.json").read_text(encoding="utf-8"))
    return [output / part["file"] for part in response["parts"] if part["binary_type"] in protocol.DICOM_TYPES]


def _model_text(review: Review) -> str:
    model = review.model
    return f"{model.get('family', '')} {model.get('version', '')}".strip() or review.command

