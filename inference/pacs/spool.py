"""The DICOM node's spool: instances received, one folder per study, until the study is complete.

An instance is written as received (file meta + the raw data set bytes, never decoded) to a
temporary file, its few routing tags read from the header, then renamed into
``incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. A study is complete ("stable") when no
instance of it arrived for ``stable_seconds``, or at once when ``complete`` says its sender is done
with it (the node does so when a routing PACS releases its association); it is then moved whole to ``work/<name>`` and
what arrives later starts a new incoming folder. ``.series.json`` in each study folder keeps what
the routing rules look at (Modality, SeriesDescription, calling AE per series). Everything is on
disk, so a restarted node picks up where the last one stopped.

A study may be known to be incomplete: its sender's association ended after a C-STORE we refused
or failed, or its files were found in ``incoming/`` at start (a stopped node may have taken only
part of it). ``mark_incomplete`` records why (``.incomplete.json``, and in memory when the disk
is too full for it); such a study is never taken as complete, whatever the wait, until an
association that began after the mark stores into it and ends cleanly (``confirm``: a re-send).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom

from inference.dicom.header import read_header
from inference.pacs.routing import ReceivedSeries

SERIES_FILE = ".series.json"
INCOMPLETE_FILE = ".incomplete.json"
#: Why files found in ``incoming/`` at start are incomplete.
FOUND_AT_START = "its instances were found in the spool at start: the node stopped while receiving it"
#: How long a study whose sender released its association waits for a follow-up association
#: (``INFERENCE_PACS_RELEASE_GRACE_SECONDS`` sets the node's; this is its default).
RELEASE_GRACE_SECONDS = 0.5


def safe_name(uid: str) -> str:
    """A UID (or AE title) as a file name: anything but digits, letters, dots and dashes replaced."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", uid.strip())[:128] or "unknown"


def read_series_info(folder: Path) -> list[ReceivedSeries]:
    """The series of a spooled study, as the routing rules see them."""
    try:
        entries = json.loads((folder / SERIES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [ReceivedSeries(e.get("modality", ""), e.get("description", ""), e.get("calling_ae", ""))
            for e in entries.values()]


class StudySpool:
    """Incoming studies on disk, their last arrival times, and the move of complete ones to ``work/``."""

    def __init__(self, root: str | Path, stable_seconds: float) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.work = self.root / "work"
        self.tmp = self.root / "tmp"
        for folder in (self.incoming, self.work, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.stable_seconds = stable_seconds
        self._lock = threading.Lock()
        self._last_arrival: dict[str, float] = {}
        self._incomplete: dict[str, dict] = {}  # name -> {"reason", "since", "reported"}
        for tmp in self.tmp.iterdir():  # half-written instances of a stopped process: never acknowledged
            tmp.unlink()
        for study in self.incoming.iterdir():  # studies a stopped process was receiving: part of them, maybe
            mtimes = [p.stat().st_mtime for p in study.iterdir()] or [study.stat().st_mtime]
            self._last_arrival[study.name] = max(mtimes)
            try:
                self._incomplete[study.name] = json.loads((study / INCOMPLETE_FILE).read_text())
            except (OSError, ValueError):
                self._set_mark(study.name, FOUND_AT_START)

    def store(self, data: bytes, calling_ae: str,
              keep: Callable[[pydicom.Dataset], bool] = lambda header: True) -> tuple[pydicom.Dataset, str | None]:
        """Write one instance (``data``: a Part 10 file's bytes) durably, file it under its study unless
        ``keep(header)`` says not; its header and the incoming folder's name it was filed in (None: not filed).

        The header is read from ``data`` in memory by the fast reader (``inference.dicom.header``; values
        decoded by pydicom when read), not from the file again. Raises ``ValueError`` when it lacks a
        StudyInstanceUID or SOPInstanceUID.
        """
        tmp = self.tmp / f"{uuid.uuid4().hex}.dcm"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # before the C-STORE is acknowledged: an acknowledged instance is kept
            header = read_header(data).dataset
            study, sop = str(header.get("StudyInstanceUID", "")), str(header.get("SOPInstanceUID", ""))
            if not study or not sop:
                raise ValueError("the instance has no StudyInstanceUID or SOPInstanceUID")
            if not keep(header):
                return header, None
            with self._lock:
                folder = self.incoming / safe_name(study)
                folder.mkdir(exist_ok=True)
                self._note_series(folder, header, calling_ae)
                tmp.replace(folder / f"{safe_name(sop)}.dcm")
                self._last_arrival[folder.name] = time.time()
            return header, folder.name
        finally:
            tmp.unlink(missing_ok=True)

    def _note_series(self, folder: Path, header: pydicom.Dataset, calling_ae: str) -> None:
        path = folder / SERIES_FILE
        try:
            series = json.loads(path.read_text())
        except (OSError, ValueError):
            series = {}
        uid = str(header.get("SeriesInstanceUID", ""))
        entry = {"modality": str(header.get("Modality", "")), "description": str(header.get("SeriesDescription", "")),
                 "calling_ae": calling_ae.strip(), "study_uid": str(header.StudyInstanceUID)}
        if series.get(uid) != entry:
            series[uid] = entry
            path.with_suffix(".tmp").write_text(json.dumps(series))
            path.with_suffix(".tmp").replace(path)

    def take_stable(self, now: float | None = None) -> list[Path]:
        """Move every study quiet for ``stable_seconds`` and not marked incomplete to ``work/``; the new folders."""
        now = time.time() if now is None else now
        taken = []
        with self._lock:
            for name, last in list(self._last_arrival.items()):
                if now - last < self.stable_seconds or name in self._incomplete:
                    continue
                target = self.work / f"{name}--{time.time_ns()}"
                (self.incoming / name).replace(target)
                del self._last_arrival[name]
                taken.append(target)
        return taken

    def complete(self, names: Iterable[str], grace: float = RELEASE_GRACE_SECONDS) -> list[str]:
        """Mark the studies in incoming folders ``names`` complete (their sender said it is done): a
        ``take_stable`` takes them once ``grace`` seconds pass with nothing more arriving. The grace
        covers a sender that reopens an association mid-study (Orthanc does so to propose a SOP
        class it had not proposed); an instance arriving meanwhile brings back the full stability
        wait. The names that were still being received."""
        marked = []
        with self._lock:
            due = time.time() - self.stable_seconds + min(grace, self.stable_seconds)
            for name in names:
                if name in self._last_arrival:
                    self._last_arrival[name] = min(self._last_arrival[name], due)
                    marked.append(name)
        return marked

    def mark_incomplete(self, names: Iterable[str], reason: str) -> list[str]:
        """Mark the studies in incoming folders ``names`` incomplete for ``reason``; the names marked."""
        marked = []
        with self._lock:
            for name in names:
                if name in self._last_arrival:
                    self._set_mark(name, reason)
                    marked.append(name)
        return marked

    def confirm(self, names: Iterable[str], since: float) -> list[str]:
        """Clear the marks of ``names`` set before ``since`` (an association that began then stored into them
        and ended cleanly: a re-send); the names cleared."""
        cleared = []
        with self._lock:
            for name in names:
                mark = self._incomplete.get(name)
                if mark is not None and mark["since"] < since:
                    del self._incomplete[name]
                    (self.incoming / name / INCOMPLETE_FILE).unlink(missing_ok=True)
                    cleared.append(name)
        return cleared

    def stalled(self, now: float | None = None) -> list[tuple[Path, str]]:
        """Incomplete studies quiet for ``stable_seconds`` and not reported yet (``reported``): (folder, reason)."""
        now = time.time() if now is None else now
        with self._lock:
            return [(self.incoming / name, str(mark["reason"])) for name, mark in self._incomplete.items()
                    if not mark.get("reported") and now - self._last_arrival.get(name, now) >= self.stable_seconds]

    def reported(self, name: str) -> None:
        """Note that the incomplete study in incoming folder ``name`` was reported: ``stalled`` leaves it out."""
        with self._lock:
            if name in self._incomplete:
                self._incomplete[name]["reported"] = True
                self._save_mark(name)

    def incomplete(self) -> dict[str, str]:
        """The studies marked incomplete: incoming folder name -> why."""
        with self._lock:
            return {name: str(mark["reason"]) for name, mark in self._incomplete.items()}

    def _set_mark(self, name: str, reason: str) -> None:
        self._incomplete[name] = {"reason": reason, "since": time.time(), "reported": False}
        self._save_mark(name)

    def _save_mark(self, name: str) -> None:
        """Write a mark to its folder; on a full disk it stays in memory (a restart marks the folder again)."""
        path = self.incoming / name / INCOMPLETE_FILE
        try:
            path.with_suffix(".tmp").write_text(json.dumps(self._incomplete[name]))
            path.with_suffix(".tmp").replace(path)
        except OSError:
            path.with_suffix(".tmp").unlink(missing_ok=True)

    def receiving(self) -> list[str]:
        """Folder names of the studies still being received."""
        with self._lock:
            return list(self._last_arrival)
