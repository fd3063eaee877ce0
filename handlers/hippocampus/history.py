"""Change since the prior: our own record of earlier hippocampus results, and the comparison with them.

Every result made from DICOM is recorded with the patient's identity (Patient ID, issuer, birth date), its
study and date, the model (family and version) and the volumes. A new study of the same patient is compared
with the most recent earlier one made by the same family and version (found here first, then in the PACS
when ``INFERENCE_PRIOR_DICOMWEB_URL`` is set); results of other versions are listed as not comparable.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from typing import Any

from inference.config import Settings
from inference.pacs.priors import Patient, PriorResult
from inference.storage.backend import REDIS, Backend, backend_for
from inference.storage.history import HistoryRows, RedisHistoryRows, SqliteHistoryRows


class ResultHistory:
    """Earlier results by patient, in the history of the stores' backend (``inference.storage.history``): an
    SQLite file (``INFERENCE_HISTORY_DB``) shared by a machine's processes, or the celery backend's Redis."""

    def __init__(self, rows: HistoryRows) -> None:
        self.rows = rows

    def record(self, patient: Patient, result: PriorResult) -> None:
        """Keep one result (a study processed again by the same version replaces its earlier record)."""
        self.rows.put(to_row(patient, result))

    def earlier(self, patient: Patient, study_uid: str) -> list[PriorResult]:
        """The patient's results of other studies, any model (matched on ID, issuer and birth date when known)."""
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
    """One result of ``patient`` as a history row, recorded now."""
    return {"patient_id": patient.patient_id, "issuer": patient.issuer, "birth_date": patient.birth_date,
            "study_uid": result.study_uid, "study_date": result.study_date, "family": result.family,
            "version": result.version, "volumes": json.dumps(result.volumes_mm3),
            "recorded": datetime.datetime.now(datetime.UTC).isoformat()}


def from_row(row: Mapping[str, Any]) -> tuple[Patient, PriorResult]:
    """The patient and result of a history row."""
    return (Patient(row["patient_id"], row["issuer"], row["birth_date"]),
            PriorResult(row["study_uid"], row["study_date"], row["family"], row["version"], json.loads(row["volumes"])))


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
    """The ``change_since_prior`` block: the most recent comparable prior, the change per structure, the others.

    Only earlier studies count (a dated study before this one's date). The annualised rate is the change in
    percent divided by the interval in years (365.25 days), a linear rate as volumetry reports give it.
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
    comparable = [(d, p) for d, p in earlier if p.family == family and p.version == version]
    out: dict = {"searched": searched, "prior": None, "structures": {}, "not_comparable": [
        {"study_uid": p.study_uid, "study_date": d.isoformat(), "model": f"{p.family} {p.version}".strip(),
         "source": p.source, "note": f"made by {p.family or 'an unnamed model'} {p.version}, not "
                                     f"{family} {version}: volumes are not comparable"}
        for d, p in earlier if (p.family, p.version) != (family, version)]}
    if today is None:
        out["note"] = "this study has no StudyDate: no earlier study can be dated against it"
    if not comparable:
        return out
    day, prior = comparable[0]
    years = (today - day).days / 365.25
    out["prior"] = {"study_uid": prior.study_uid, "study_date": day.isoformat(), "source": prior.source,
                    "model": f"{prior.family} {prior.version}", "interval_years": round(years, 3)}
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
    out["earlier_comparable"] = [{"study_date": d.isoformat(), "volumes_mm3": p.volumes_mm3, "source": p.source}
                                 for d, p in comparable[1:]]
    return out
