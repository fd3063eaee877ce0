"""The DICOM node's spool: instances received, one folder per study, until the study is complete.

An instance is written as received (file meta + the raw data set bytes, never decoded) to a
temporary file, its few routing tags read from the header, then renamed into
``incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. A study is complete ("stable") when no
instance of it arrived for ``stable_seconds``, or at once when ``complete`` says its sender is done
with it (the node does so when a routing PACS releases its association); it is then moved whole to ``work/<name>`` and
what arrives later starts a new incoming folder. ``.series.json`` in each study folder keeps what
the routing rules look at (Modality, SeriesDescription, calling AE per series). Everything is on
disk, so a restarted node picks up where the last one stopped.
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
        for tmp in self.tmp.iterdir():  # half-written instances of a stopped process: never acknowledged
            tmp.unlink()
        for study in self.incoming.iterdir():  # studies a stopped process was receiving
            mtimes = [p.stat().st_mtime for p in study.iterdir()] or [study.stat().st_mtime]
            self._last_arrival[study.name] = max(mtimes)

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
        """Move every study quiet for ``stable_seconds`` to ``work/``; the new folders."""
        now = time.time() if now is None else now
        taken = []
        with self._lock:
            for name, last in list(self._last_arrival.items()):
                if now - last < self.stable_seconds:
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

    def receiving(self) -> list[str]:
        """Folder names of the studies still being received."""
        with self._lock:
            return list(self._last_arrival)
