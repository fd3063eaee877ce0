"""The audit trail: one append-only, hash-chained JSON line per event that touches patient data.

Every front door (HTTP inference, jobs, Radiomics, the DICOM node) and the users command append here
through ``audit_log(settings).append(...)``. Each line is a record's canonical JSON (sorted keys, no
spaces) holding ``prev``, the SHA-256 of the line before (64 zeros for the first), and ``hash``, its
own SHA-256 over the record without ``hash``: an edited or deleted line breaks the chain and
``verify`` names the first bad line. Appends hold an exclusive ``fcntl.flock`` so that gunicorn's
workers and the node can share the file. With ``INFERENCE_AUDIT_SYSLOG`` each record is also sent as
an RFC 5424 syslog message over UDP (IHE ATNA's transport). Records never hold pixel data or tokens:
callers pass identifiers only.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.config import Settings

log = logging.getLogger("inference.audit")

GENESIS = "0" * 64
#: Syslog priority of every record: facility authpriv (10) * 8 + severity notice (5), as IHE ATNA uses.
SYSLOG_PRIORITY = 10 * 8 + 5
#: Outcomes a record may carry.
OUTCOMES = ("success", "failure", "refused")
#: Every event kind a record may name, with what it means (the documentation's reference is built from this).
EVENTS: dict[str, str] = {
    "study-received": "a study arrived: by ``POST /`` (or a model's route), ``POST /job/``, a Radiomics "
                      "segmentation, or the DICOM node",
    "result-produced": "a request or a job finished (``success``) or failed (``failure``)",
    "result-viewed": "a job's status or file list, a held result or its images on the review routes were read; "
                     "``refused`` for another submitter's job",
    "result-downloaded": "a job's file or a Radiomics result was downloaded",
    "result-held": "a result was kept for review instead of being released",
    "result-accepted": "a reviewer accepted a held result (``repeated`` when that decision was already made)",
    "result-rejected": "a reviewer rejected a held result, with a reason (``repeated`` as above)",
    "result-corrected": "a reviewer replaced the model's segmentation with a corrected one (``repeated`` as above)",
    "result-released": "the DICOM node sends a reviewed result on to its destinations",
    "result-sent": "every destination confirmed the DICOM node's results of a study",
    "feedback-received": "a Radiomics SegmentationFeedback message was stored",
    "telemetry-received": "a Radiomics SegmentationTelemetry message was stored",
    "user-created": "``python -m inference.users add`` created a user (``detail``: name and role)",
    "user-revoked": "``python -m inference.users revoke`` revoked a user's token",
    "authentication-failed": "a request's bearer token was not valid (``detail``: method, path, the token's id)",
    "request-refused": "a known user asked for a route that needs a higher role (``detail``: the role needed)",
}


def canonical(record: dict[str, Any]) -> str:
    """The canonical JSON of ``record``: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(text: str) -> str:
    """SHA-256 hex digest of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _last_line(handle: Any) -> str | None:
    """The last non-empty line of an open binary file, read backwards from its end."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return None
    block, data = 4096, b""
    position = end
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        data = handle.read(step) + data
        stripped = data.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1].decode("utf-8")
    return data.rstrip(b"\n").decode("utf-8") or None


@dataclass(frozen=True)
class SyslogTarget:
    """Where records are forwarded: a UDP syslog receiver, ``host:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> SyslogTarget:
        """``host:port`` (``[v6]:port`` for IPv6); a clear ValueError otherwise."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"INFERENCE_AUDIT_SYSLOG must be host:port, got {text!r}")
        return cls(host.strip("[]"), int(port))


def syslog_frame(record: dict[str, Any], app_name: str = "hippoai") -> bytes:
    """One RFC 5424 message for ``record``: header, no structured data, the record's JSON as MSG."""
    hostname = socket.gethostname() or "-"
    header = f"<{SYSLOG_PRIORITY}>1 {record['time']} {hostname[:255]} {app_name} {os.getpid()} {record['event'][:32]} -"
    return f"{header} {canonical(record)}".encode()


class AuditLog:
    """Appends records to the hash-chained file ``path``, forwarding each to ``syslog`` when given."""

    def __init__(self, path: str | os.PathLike, syslog: SyslogTarget | None = None) -> None:
        self.path = Path(path)
        self.syslog = syslog

    def append(self, event: str, *, outcome: str = "success", user: str | None = None, client: str | None = None,
               study_uid: str | None = None, series_uids: Iterable[str] = (), input_hash: str | None = None,
               sync: bool = True, **detail: Any) -> dict[str, Any]:
        """Append one record; the record. ``detail`` holds identifiers only (job uid, file name, role).

        The file is fsynced before returning, unless ``sync`` is false: for a record the caller's next
        append follows within the same request (an fsync makes every earlier write durable too).
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {OUTCOMES}, got {outcome!r}")
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "event": event, "outcome": outcome, "user": user, "client": client, "study_uid": study_uid,
            "series_uids": sorted(set(series_uids)), "input_hash": input_hash}
        if detail:
            record["detail"] = detail
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when closed; several processes append in turn
            last = _last_line(handle)
            record["prev"] = GENESIS if last is None else digest(last)
            record["hash"] = digest(canonical(record))
            handle.seek(0, os.SEEK_END)
            handle.write(canonical(record).encode("utf-8") + b"\n")
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        if self.syslog is not None:
            self._forward(record)
        return record

    def _forward(self, record: dict[str, Any]) -> None:
        """Send ``record`` to the syslog receiver; a failure is logged, never lost from the file."""
        assert self.syslog is not None
        try:
            with socket.socket(socket.AF_INET6 if ":" in self.syslog.host else socket.AF_INET,
                               socket.SOCK_DGRAM) as sock:
                sock.sendto(syslog_frame(record), (self.syslog.host, self.syslog.port))
        except OSError as exc:
            log.error("audit record not forwarded to syslog %s:%d: %s", self.syslog.host, self.syslog.port, exc)

    def records(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first (none when the file does not exist yet)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)

    def search(self, *, study: str | None = None, user: str | None = None, start: float | None = None,
               end: float | None = None) -> list[dict[str, Any]]:
        """Records matching every filter given: study UID, user, time from ``start`` to ``end`` (epoch seconds)."""
        found = []
        for record in self.records():
            when = datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()
            if ((study is None or record.get("study_uid") == study) and (user is None or record.get("user") == user)
                    and (start is None or when >= start) and (end is None or when <= end)):
                found.append(record)
        return found


def verify(path: str | os.PathLike) -> tuple[int, str | None]:
    """Check the chain of the file ``path``: (records checked, None) when intact, else (bad line number, why)."""
    previous = GENESIS
    count = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.rstrip("\n")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                return number, f"not JSON: {exc.msg}"
            if not isinstance(record, dict) or canonical(record) != text:
                return number, "not a record in canonical JSON (edited by hand?)"
            own = record.pop("hash", None)
            if own != digest(canonical(record)):
                return number, "its hash does not match its content (the line was altered)"
            if record.get("prev") != previous:
                return number, "its 'prev' is not the hash of the line before (a line was deleted or inserted)"
            previous = digest(text)
            count = number
    return count, None


def audit_log(settings: Settings) -> AuditLog:
    """The audit log of ``settings``: INFERENCE_AUDIT_LOG, forwarded to INFERENCE_AUDIT_SYSLOG when set."""
    path = settings.audit_log or Path(settings.output_root) / "audit.jsonl"
    return AuditLog(path, SyslogTarget.parse(settings.audit_syslog) if settings.audit_syslog else None)


def epoch(text: str, name: str) -> float:
    """An ISO 8601 time (``2026-01-31T12:00:00Z``; no zone means UTC) as epoch seconds; ValueError naming ``name``."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time such as 2026-01-31T12:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
