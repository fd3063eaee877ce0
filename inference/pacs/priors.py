"""Earlier results of a patient in a PACS: their TID 1500 measurement reports found by QIDO-RS, read by WADO-RS.

A prior is one SR measurement report of an earlier study of the same patient (Patient ID and issuer, and
birth date when both sides have one; never the name), read back into what the report says: the study's
date, the algorithm (name and version) and one volume per tracking identifier (structure).

A PACS that is down must not hold a job: a look-up has one deadline for all its requests (a
connection gets at most ``CONNECT_TIMEOUT`` of it; dicomweb_client's own retries, 30 s against a
refused connection, are off), and a PACS that did not answer is not asked again for ``retry_after``
seconds (a circuit breaker per URL, per process); then one look-up tries it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from pydicom.dataset import Dataset

log = logging.getLogger("inference.pacs.priors")

#: Seconds a connection to the PACS may take (within the look-up's deadline).
CONNECT_TIMEOUT = 2.0

#: Concept names read from a TID 1500 report (code value, scheme): tracking identifier, algorithm name and
#: version, volume.
TRACKING_IDENTIFIER = ("112039", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
VOLUME = ("118565006", "SCT")
#: Our SR's quality evaluation (``handlers.hippocampus.report``): its concept name, the value code saying it
#: passed, the prefix of the flag reasons' value codes; and what a reviewer's corrected SR's algorithm says.
RESULT_QUALITY = ("RESULTQUALITY", "99HIPPOAI")
QUALITY_PASSED, QUALITY_FLAG_PREFIX = "QUALITYOK", "QUALITYFLAG"
CORRECTED_BY = ", corrected by "


@dataclass(frozen=True)
class Patient:
    """Who a study belongs to, as far as matching goes: ID, its issuer, birth date (empty when absent)."""

    patient_id: str
    issuer: str = ""
    birth_date: str = ""

    @classmethod
    def of(cls, dataset: Dataset) -> Patient | None:
        """The patient of a DICOM header; None without a Patient ID (such a study is never matched)."""
        patient_id = str(dataset.get("PatientID", "") or "").strip()
        if not patient_id:
            return None
        return cls(patient_id, str(dataset.get("IssuerOfPatientID", "") or "").strip(),
                   str(dataset.get("PatientBirthDate", "") or "").strip())

    def matches(self, other: Patient) -> bool:
        """Same ID and issuer; same birth date when both have one."""
        return (self.patient_id == other.patient_id and self.issuer == other.issuer
                and (not self.birth_date or not other.birth_date or self.birth_date == other.birth_date))


@dataclass
class PriorResult:
    """One earlier result: its study, date (YYYYMMDD), model, volumes (mm3) by structure, where it was found, its
    quality flag (None: not known) with the reasons, and a reviewer's decision on it (None: none made)."""

    study_uid: str
    study_date: str
    family: str
    version: str
    volumes_mm3: dict[str, float] = field(default_factory=dict)
    source: str = "result store"
    flagged: bool | None = None
    flag_reasons: list[str] = field(default_factory=list)
    review: str | None = None


def _code(item: Dataset) -> tuple[str, str]:
    name = item.get("ConceptNameCodeSequence")
    if not name:
        return ("", "")
    return (str(name[0].get("CodeValue", "")), str(name[0].get("CodingSchemeDesignator", "")))


def _groups(items: Iterable[Dataset]) -> Iterable[Dataset]:
    """Every CONTAINER of the content tree that holds a tracking identifier (a measurement group)."""
    for item in items:
        if item.get("ValueType") == "CONTAINER":
            children = item.get("ContentSequence", [])
            if any(_code(child) == TRACKING_IDENTIFIER for child in children):
                yield item
            else:
                yield from _groups(children)


def read_report(report: Dataset) -> PriorResult | None:
    """The volumes, algorithm and quality flag of a TID 1500 report; None when it holds no volume measurement.

    The flag is read from our own quality evaluation (None when the report has none); a reviewer's corrected
    report (its algorithm version says who corrected it) is a corrected result.
    """
    family = version = ""
    volumes: dict[str, float] = {}
    passed, reasons = False, []
    for group in _groups(report.get("ContentSequence", [])):
        name, value = "", None
        for item in group.get("ContentSequence", []):
            code = _code(item)
            if code == RESULT_QUALITY and item.get("ConceptCodeSequence"):
                concept = item.ConceptCodeSequence[0]
                if str(concept.CodeValue) == QUALITY_PASSED:
                    passed = True
                elif str(concept.CodeValue).startswith(QUALITY_FLAG_PREFIX) and concept.CodeMeaning not in reasons:
                    reasons.append(str(concept.CodeMeaning))
            elif code == TRACKING_IDENTIFIER:
                name = str(item.get("TextValue", ""))
            elif code == ALGORITHM_NAME:
                family = str(item.get("TextValue", ""))
            elif code == ALGORITHM_VERSION:
                version = str(item.get("TextValue", ""))
            elif code == VOLUME and item.get("MeasuredValueSequence"):
                value = float(item.MeasuredValueSequence[0].NumericValue)
        if name and value is not None:
            volumes[name] = value
    if not volumes:
        return None
    flagged = True if reasons else (False if passed else None)
    return PriorResult(str(report.StudyInstanceUID), str(report.get("StudyDate", "")), family,
                       version.split(" (")[0], volumes, source="PACS", flagged=flagged, flag_reasons=reasons,
                       review="corrected" if CORRECTED_BY in version else None)


class PriorDeadline(requests.Timeout):
    """The look-up's time is up: no more requests to the PACS."""


class _DeadlineSession(requests.Session):
    """A session whose every request's timeouts are cut to what is left of one deadline."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PriorDeadline("the look-up's deadline (INFERENCE_PRIOR_TIMEOUT_SECONDS) passed")
        kwargs["timeout"] = (min(CONNECT_TIMEOUT, left), left)
        return super().request(method, url, *args, **kwargs)


class _Circuits:
    """Per PACS URL: until when it is not asked (after it failed to answer). Shared by a process's jobs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open_until: dict[str, float] = {}

    def claim(self, url: str, probe_seconds: float) -> bool:
        """Whether a look-up may ask ``url`` now; once its wait is over, only one look-up probes it at a time."""
        with self._lock:
            until = self._open_until.get(url)
            if until is None:
                return True
            now = time.monotonic()
            if now < until:
                return False
            self._open_until[url] = now + probe_seconds  # the others skip while this one probes
            return True

    def failed(self, url: str, retry_after: float) -> bool:
        """Stop asking ``url`` for ``retry_after`` seconds; whether it had been answering until now."""
        with self._lock:
            was_closed = url not in self._open_until
            self._open_until[url] = time.monotonic() + retry_after
            return was_closed

    def answered(self, url: str) -> bool:
        """``url`` answered; whether it had been failing."""
        with self._lock:
            return self._open_until.pop(url, None) is not None


CIRCUITS = _Circuits()


def _is_unreachable(exc: Exception) -> bool:
    """Whether an error means the PACS is not answering (down, unreachable, too slow, failing inside)."""
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    response = getattr(exc, "response", None)
    return isinstance(exc, requests.HTTPError) and response is not None and response.status_code >= 500


def find_in_pacs(url: str, patient: Patient, exclude_study: str, *, timeout: float = 5.0,
                 retry_after: float = 60.0) -> list[PriorResult]:
    """Measurement reports of the patient's other studies on the DICOMweb server at ``url`` (QIDO-RS, WADO-RS).

    A server that cannot be reached within ``timeout`` seconds (all requests together) gives an empty list
    and a warning, and is not asked again for ``retry_after`` seconds: the result is still made, without
    the PACS's priors.
    """
    from dicomweb_client.api import DICOMwebClient

    if not CIRCUITS.claim(url, timeout):
        log.debug("priors not looked up at %s: it did not answer lately (retried after %.0f s)", url, retry_after)
        return []
    client = DICOMwebClient(url=url, session=_DeadlineSession(time.monotonic() + timeout))
    client.set_http_retry_params(retry=False)  # its retries waited 30 s on a refused connection
    found = []
    try:
        studies = client.search_for_studies(search_filters={"PatientID": patient.patient_id},
                                            fields=["IssuerOfPatientID", "PatientBirthDate", "StudyDate"])
        for entry in studies:
            study = Dataset.from_json(entry)
            other = Patient(str(study.get("PatientID", "")), str(study.get("IssuerOfPatientID", "") or ""),
                            str(study.get("PatientBirthDate", "") or ""))
            study_uid = str(study.StudyInstanceUID)
            if study_uid == exclude_study or not patient.matches(other):
                continue
            for series in client.search_for_series(study_uid, search_filters={"Modality": "SR"}):
                series_uid = str(Dataset.from_json(series).SeriesInstanceUID)
                for instance in client.search_for_instances(study_uid, series_uid):
                    sop_uid = str(Dataset.from_json(instance).SOPInstanceUID)
                    prior = read_report(client.retrieve_instance(study_uid, series_uid, sop_uid))
                    if prior is not None:
                        found.append(prior)
    except Exception as exc:  # requests' and the client's errors alike: no priors from there this time
        if _is_unreachable(exc):
            if CIRCUITS.failed(url, retry_after):
                log.warning("no priors from the PACS at %s: %s: %s; not asked again for %.0f s", url,
                            type(exc).__name__, exc, retry_after)
            return []
        log.warning("no priors from the PACS at %s: %s: %s", url, type(exc).__name__, exc)
        CIRCUITS.answered(url)
        return found
    if CIRCUITS.answered(url):
        log.info("the PACS at %s answers again: priors are looked up there", url)
    return found
