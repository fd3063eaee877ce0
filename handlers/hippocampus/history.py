"""Change since the prior: our own record of earlier hippocampus results, and the comparison with them.

Every result made from DICOM is recorded with the patient's identity (Patient ID, issuer, birth date), its
study and date, the model (family and version), the volumes, its quality flag and, once a reviewer decides,
the review decision (a correction's volumes with it). A new study of the same patient is compared with the
most recent trustworthy earlier one made by the same family and version (found here first, then in the PACS
when ``INFERENCE_PRIOR_DICOMWEB_URL`` is set); flagged, rejected or unchecked results are listed as untrusted,
never used silently, and results of other versions are listed as not comparable.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from inference.config import Settings
from inference.pacs.priors import Patient, PriorResult
from inference.storage.backend import REDIS, Backend, backend_for
from inference.storage.history import HistoryRows, RedisHistoryRows, SqliteHistoryRows

#: A reviewer's decisions, as ``inference.jobs.reviews`` names them (that module is in a layer above this one).
ACCEPTED, REJECTED, CORRECTED = "accepted", "rejected", "corrected"


class Decision(Protocol):
    """What the history needs of a decided review (``inference.jobs.reviews.Review``)."""

    study_uid: str | None
    model: dict
    status: str
    correction: dict | None


class ResultHistory:
    """Earlier results by patient, in the history of the stores' backend (``inference.storage.history``): an
    SQLite file (``INFERENCE_HISTORY_DB``) shared by a machine's processes, or the celery backend's Redis."""

    def __init__(self, rows: HistoryRows) -> None:
        self.rows = rows

    def record(self, patient: Patient, result: PriorResult) -> None:
        """Keep one result with its flag (a study processed again by the same version replaces its earlier
        record, review decision included: the new result has not been reviewed)."""
        self.rows.put(to_row(patient, result))

    def learn_review(self, study_uid: str, family: str, version: str, decision: str,
                     corrected_volumes: Mapping[str, float] | None = None) -> bool:
        """Record a reviewer's decision on the result of a study by a model version; whether a result was found."""
        return self.rows.update(study_uid, family, version, {
            "review": decision,
            "corrected_volumes": None if corrected_volumes is None else json.dumps(dict(corrected_volumes))})

    def earlier(self, patient: Patient, study_uid: str) -> list[PriorResult]:
        """The patient's results of other studies, any model (matched on ID, issuer and birth date when known);
        a corrected result carries the correction's volumes."""
        rows = self.rows.of_patient(patient.patient_id, patient.issuer, study_uid)
        return [result for row_patient, result in map(from_row, rows) if patient.matches(row_patient)]


def history_rows(backend: Backend) -> HistoryRows:
    """The history of ``backend``: its Redis with the celery backend (one for every machine), else the SQLite
    file (``INFERENCE_HISTORY_DB``, ``<INFERENCE_OUTPUT_ROOT>/history.sqlite3`` by default)."""
    if backend.kind == REDIS:
        return RedisHistoryRows(backend.redis)
    return SqliteHistoryRows(backend.history_path)


def result_history(settings: Settings) -> ResultHistory:
    """The history of ``settings``' stores."""
    return ResultHistory(history_rows(backend_for(settings)))


def to_row(patient: Patient, result: PriorResult) -> dict[str, Any]:
    """One result of ``patient`` as a history row with its flag, recorded now (not reviewed yet)."""
    return {"patient_id": patient.patient_id, "issuer": patient.issuer, "birth_date": patient.birth_date,
            "study_uid": result.study_uid, "study_date": result.study_date, "family": result.family,
            "version": result.version, "volumes": json.dumps(result.volumes_mm3),
            "recorded": datetime.datetime.now(datetime.UTC).isoformat(),
            "flagged": None if result.flagged is None else int(result.flagged),
            "flag_reasons": json.dumps(result.flag_reasons), "review": None, "corrected_volumes": None}


def from_row(row: Mapping[str, Any]) -> tuple[Patient, PriorResult]:
    """The patient and result of a history row; a corrected result carries the correction's volumes, a row
    recorded before flags were kept an unknown flag (None)."""
    corrected = json.loads(row["corrected_volumes"]) if row.get("corrected_volumes") else None
    return (Patient(row["patient_id"], row["issuer"], row["birth_date"]),
            PriorResult(row["study_uid"], row["study_date"], row["family"], row["version"],
                        corrected or json.loads(row["volumes"]),
                        flagged=None if row.get("flagged") is None else bool(row["flagged"]),
                        flag_reasons=json.loads(row.get("flag_reasons") or "[]"), review=row.get("review")))


def learn_decision(settings: Settings, review: Decision) -> bool:
    """Tell the history a reviewer's decision on a held result (the review routes call it for every new
    decision); whether the history held that result. A correction's volumes replace the model's as the prior."""
    family, version = review.model.get("family"), review.model.get("version")
    if not family or not version or not review.study_uid:
        return False
    corrected = None
    if review.status == CORRECTED and review.correction:
        volumes = {name: float(row["corrected_mm3"]) for name, row in review.correction["structures"].items()}
        corrected = {**volumes, "Total": round(sum(volumes.values()), 1)}
    return result_history(settings).learn_review(review.study_uid, family, version, review.status, corrected)


def distrust(prior: PriorResult) -> str | None:
    """Why an earlier result must not be compared with, or None when it may (the most recent such is the prior).

    Rejected on review: never. Corrected: yes, with the correction's volumes. Flagged: only once a reviewer
    accepted it. A result whose flag was never recorded (made before flags were kept, or an SR without one)
    is not trusted: nobody can tell whether it was flagged.
    """
    if prior.review == REJECTED:
        return "rejected on review"
    if prior.review in (CORRECTED, ACCEPTED):
        return None
    if prior.flagged is None:
        return "its quality flag is not known (not recorded with it)"
    if prior.flagged:
        return "flagged: " + ("; ".join(prior.flag_reasons) or "no reason recorded")
    return None


def empty_change(searched: list[str], note: str | None = None) -> dict:
    """The ``change_since_prior`` block with nothing to compare (every key present: the JSON keeps one shape)."""
    return {"searched": searched, "prior": None, "structures": {}, "earlier_comparable": [], "untrusted": [],
            "not_comparable": [], "note": note}


def _date(text: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def iso(text: str) -> str:
    """A DICOM date (YYYYMMDD) as ISO 8601, or as given when it is not one."""
    day = _date(text)
    return day.isoformat() if day else text


def compare(study_date: str, volumes_mm3: Mapping[str, float], family: str, version: str,
            candidates: Iterable[PriorResult], searched: list[str]) -> dict:
    """The ``change_since_prior`` block: the most recent trustworthy comparable prior, the change per structure,
    the other trustworthy comparable ones, the untrusted ones and why, the not comparable ones.

    Only earlier studies count (a dated study before this one's date). The annualised rate is the change in
    percent divided by the interval in years (365.25 days), a linear rate as volumetry reports give it. When
    only untrusted comparable results exist, ``prior`` is None and ``note`` says why no change is given.
    """
    today = _date(study_date)
    earlier, seen = [], set()
    for prior in candidates:
        day, key = _date(prior.study_date), (prior.study_uid, prior.family, prior.version)
        if key in seen or today is None or day is None or day >= today:
            continue  # the same result found twice (our store first, then the PACS), or not earlier
        seen.add(key)
        earlier.append((day, prior))
    earlier.sort(key=lambda pair: pair[0], reverse=True)
    same_model = [(d, p) for d, p in earlier if p.family == family and p.version == version]
    trusted = [(d, p) for d, p in same_model if distrust(p) is None]
    out = empty_change(searched)
    out["untrusted"] = [{"study_uid": p.study_uid, "study_date": d.isoformat(), "model": f"{p.family} {p.version}",
                         "source": p.source, "reason": distrust(p)}
                        for d, p in same_model if distrust(p) is not None]
    out["not_comparable"] = [
        {"study_uid": p.study_uid, "study_date": d.isoformat(), "model": f"{p.family} {p.version}".strip(),
         "source": p.source, "note": f"made by {p.family or 'an unnamed model'} {p.version}, not "
                                     f"{family} {version}: volumes are not comparable"}
        for d, p in earlier if (p.family, p.version) != (family, version)]
    if today is None:
        out["note"] = "this study has no StudyDate: no earlier study can be dated against it"
    if not trusted:
        if out["untrusted"]:
            dates = ", ".join(u["study_date"] for u in out["untrusted"])
            out["note"] = (f"no change given: the earlier result{'s' if len(out['untrusted']) > 1 else ''} of this "
                           f"patient by {family} {version} ({dates}) cannot be trusted (listed under untrusted)")
        return out
    day, prior = trusted[0]
    years = (today - day).days / 365.25
    out["prior"] = {"study_uid": prior.study_uid, "study_date": day.isoformat(), "source": prior.source,
                    "model": f"{prior.family} {prior.version}", "interval_years": round(years, 3),
                    "flagged": prior.flagged, "review": prior.review,
                    "volumes": "corrected by a reviewer" if prior.review == CORRECTED else "the model's"}
    if [u for u in out["untrusted"] if u["study_date"] > day.isoformat()]:
        out["note"] = ("a more recent earlier result was not used as the prior: it cannot be trusted (listed under "
                       "untrusted)")
    current = dict(volumes_mm3)
    previous = dict(prior.volumes_mm3)
    if "Total" not in previous and all(name in previous for name in current if name != "Total"):
        previous["Total"] = sum(previous[name] for name in current if name != "Total")
    for name, value in current.items():
        if name not in previous:
            continue
        before = float(previous[name])
        change = float(value) - before
        percent = 100.0 * change / before if before else None
        out["structures"][name] = {
            "prior_volume_mm3": round(before, 1), "volume_mm3": round(float(value), 1),
            "change_mm3": round(change, 1), "change_percent": None if percent is None else round(percent, 2),
            "annualised_percent_per_year": None if percent is None or years <= 0 else round(percent / years, 2)}
    out["earlier_comparable"] = [{"study_uid": p.study_uid, "study_date": d.isoformat(), "volumes_mm3": p.volumes_mm3,
                                  "source": p.source, "review": p.review} for d, p in trusted[1:]]
    return out
