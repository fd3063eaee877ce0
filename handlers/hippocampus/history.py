"""Change since the prior: our own record of earlier hippocampus results (SQLite), and the comparison with them.

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
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from inference.config import Settings
from inference.pacs.priors import Patient, PriorResult

#: A reviewer's decisions, as ``inference.jobs.reviews`` names them (that module is in a layer above this one).
ACCEPTED, REJECTED, CORRECTED = "accepted", "rejected", "corrected"


class Decision(Protocol):
    """What the history needs of a decided review (``inference.jobs.reviews.Review``)."""

    study_uid: str | None
    model: dict
    status: str
    correction: dict | None

_SCHEMA = """CREATE TABLE IF NOT EXISTS results (
    patient_id TEXT NOT NULL, issuer TEXT NOT NULL, birth_date TEXT NOT NULL, study_uid TEXT NOT NULL,
    study_date TEXT NOT NULL, family TEXT NOT NULL, version TEXT NOT NULL, volumes TEXT NOT NULL,
    recorded TEXT NOT NULL, PRIMARY KEY (study_uid, family, version))"""
# ---- Schema change of issue 37 (the only one since the table above): columns added to ``results``. --------
#: flagged: 1/0, NULL for a result recorded before flags were kept; flag_reasons: JSON list of the flag's
#: reasons; review: the reviewer's decision (accepted, rejected, corrected), NULL until one is made;
#: corrected_volumes: JSON of the correction's volumes (mm3) by structure, NULL unless corrected.
#: A file made before them gets them by ALTER TABLE when opened (existing rows keep NULL: unknown).
ADDED_COLUMNS = (("flagged", "INTEGER"), ("flag_reasons", "TEXT"), ("review", "TEXT"),
                 ("corrected_volumes", "TEXT"))
# ------------------------------------------------------------------------------------------------------------
_COLUMNS = ("patient_id", "issuer", "birth_date", "study_uid", "study_date", "family", "version", "volumes",
            "recorded", *(name for name, _ in ADDED_COLUMNS))
_lock = threading.Lock()


def history_path(settings: Settings) -> Path:
    """The history's SQLite file: ``INFERENCE_HISTORY_DB``, or ``history.sqlite3`` in the output root."""
    return settings.history_db or Path(settings.output_root) / "history.sqlite3"


class ResultHistory:
    """Earlier results by patient, in an SQLite file (``INFERENCE_HISTORY_DB``) shared by the processes of a machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock, self._connect() as db:
            db.execute(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(results)")}
            for name, kind in ADDED_COLUMNS:
                if name not in present:
                    db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def record(self, patient: Patient, result: PriorResult) -> None:
        """Keep one result with its flag (a study processed again by the same version replaces its earlier
        record, review decision included: the new result has not been reviewed)."""
        values = (patient.patient_id, patient.issuer, patient.birth_date, result.study_uid, result.study_date,
                  result.family, result.version, json.dumps(result.volumes_mm3),
                  datetime.datetime.now(datetime.UTC).isoformat(),
                  None if result.flagged is None else int(result.flagged), json.dumps(result.flag_reasons), None, None)
        with _lock, self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO results ({', '.join(_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)

    def learn_review(self, study_uid: str, family: str, version: str, decision: str,
                     corrected_volumes: Mapping[str, float] | None = None) -> bool:
        """Record a reviewer's decision on the result of a study by a model version; whether a result was found."""
        with _lock, self._connect() as db:
            cursor = db.execute("UPDATE results SET review = ?, corrected_volumes = ? "
                                "WHERE study_uid = ? AND family = ? AND version = ?",
                                (decision, None if corrected_volumes is None else json.dumps(dict(corrected_volumes)),
                                 study_uid, family, version))
        return cursor.rowcount > 0

    def earlier(self, patient: Patient, study_uid: str) -> list[PriorResult]:
        """The patient's results of other studies, any model (matched on ID, issuer and birth date when known);
        a corrected result carries the correction's volumes."""
        with self._connect() as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM results "
                              "WHERE patient_id = ? AND issuer = ? AND study_uid != ?",
                              (patient.patient_id, patient.issuer, study_uid)).fetchall()
        out = []
        for row in rows:
            item = dict(zip(_COLUMNS, row, strict=True))
            if not patient.matches(Patient(item["patient_id"], item["issuer"], item["birth_date"])):
                continue
            corrected = json.loads(item["corrected_volumes"]) if item["corrected_volumes"] else None
            out.append(PriorResult(item["study_uid"], item["study_date"], item["family"], item["version"],
                                   corrected or json.loads(item["volumes"]),
                                   flagged=None if item["flagged"] is None else bool(item["flagged"]),
                                   flag_reasons=json.loads(item["flag_reasons"] or "[]"), review=item["review"]))
        return out


def learn_decision(settings: Settings, review: Decision) -> bool:
    """Tell the history a reviewer's decision on a held result (the review routes call it for every new
    decision); whether the history held that result. A correction's volumes replace the model's as the prior."""
    family, version = review.model.get("family"), review.model.get("version")
    path = history_path(settings)
    if not family or not version or not review.study_uid or not path.exists():
        return False
    corrected = None
    if review.status == CORRECTED and review.correction:
        volumes = {name: float(row["corrected_mm3"]) for name, row in review.correction["structures"].items()}
        corrected = {**volumes, "Total": round(sum(volumes.values()), 1)}
    return ResultHistory(path).learn_review(review.study_uid, family, version, review.status, corrected)


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
