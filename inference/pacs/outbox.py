"""Deliver result files to PACS destinations (DICOM C-STORE, DICOMweb STOW-RS) from a folder on disk.

Each destination has its own folder under the outbox root; a result is copied into every
destination's folder (written under a temporary name, then renamed) before anything else
happens, and a file is deleted only once its destination confirmed it. A thread per
destination sends what is there, retrying with exponential backoff while the destination is
down; files left behind by a stopped process are sent when the next one starts. Files are
named ``<batch>__<name>.dcm``; ``<batch>.json`` beside them holds the batch's log tags (study
UID, input hash), so every line about a file can name them.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import ssl
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from inference.logs import TaggedLogger
from inference.metrics import record_dicom_sent, set_dicom_outbox
from inference.pacs.transport import NO_DELAY_HANDLERS

log = TaggedLogger(logging.getLogger("inference.pacs.outbox"))

#: C-STORE statuses that mean stored: success and the warnings (coercion, elements discarded).
STORED_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}


class DeliveryError(Exception):
    """A destination did not take a file (down, refused, or answered a failure status)."""


@dataclass(frozen=True)
class DicomDestination:
    """A DICOM node results go to by C-STORE, written ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int
    calling_ae: str = "HIPPOAI"
    timeout: float = 30.0
    #: DICOM TLS (INFERENCE_PACS_TLS_*): the destination's certificate is verified for ``host``
    tls: ssl.SSLContext | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, text: str, calling_ae: str, tls: ssl.SSLContext | None = None) -> DicomDestination:
        match = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", text.strip())
        if not match:
            raise ValueError(f"destination {text!r} must be AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        return cls(match.group(1), match.group(2), int(match.group(3)), calling_ae, tls=tls)

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"dimse-{self.ae_title}@{self.host}-{self.port}")

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def send(self, paths: Sequence[Path]) -> list[Path]:
        """C-STORE ``paths`` over one association; the paths stored. ``DeliveryError`` if none could be."""
        classes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
                          for p in paths})
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        for sop_class in classes:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, evt_handlers=NO_DELAY_HANDLERS,
                             tls_args=None if self.tls is None else (self.tls, self.host))
        if not assoc.is_established:
            raise DeliveryError(f"{self}: association refused or destination unreachable"
                                + (" (or its TLS certificate not trusted)" if self.tls else ""))
        stored, failures = [], []
        try:
            for path in paths:
                status = assoc.send_c_store(path)
                code = int(status.Status) if status and "Status" in status else None
                if code in STORED_STATUSES:
                    stored.append(path)
                else:
                    failures.append(f"{path.name}: status {'none' if code is None else hex(code)}")
        finally:
            assoc.release()
        if failures and not stored:
            raise DeliveryError(f"{self}: C-STORE failed: {'; '.join(failures)}")
        return stored


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server results go to by STOW-RS."""

    url: str
    #: the session to send with (an https:// URL verified against INFERENCE_PACS_TLS_CA); None: requests' default
    session: requests.Session | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return "stow-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.url)[:100]

    def __str__(self) -> str:
        return f"STOW-RS {self.url}"

    def send(self, paths: Sequence[Path]) -> list[Path]:
        from dicomweb_client.api import DICOMwebClient

        try:
            DICOMwebClient(url=self.url, session=self.session).store_instances([pydicom.dcmread(p) for p in paths])
        except Exception as exc:  # requests' and the client's errors alike: the destination did not confirm
            raise DeliveryError(f"{self}: {type(exc).__name__}: {exc}") from exc
        return list(paths)


Destination = DicomDestination | StowDestination


class Outbox:
    """Result files waiting for their destinations, on disk, with one sending thread per destination."""

    def __init__(self, root: str | Path, destinations: Iterable[Destination], *, retry_max_seconds: float = 60.0,
                 retry_first_seconds: float = 1.0) -> None:
        self.root = Path(root)
        self.destinations = list(destinations)
        self.retry_max_seconds = retry_max_seconds
        self.retry_first_seconds = min(retry_first_seconds, retry_max_seconds)
        self._wake = {d.key: threading.Event() for d in self.destinations}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for destination in self.destinations:
            (self.root / destination.key).mkdir(parents=True, exist_ok=True)

    def put(self, batch: str, files: Sequence[Path], tags: dict) -> None:
        """Copy ``files`` into every destination's folder (durably, before returning) and wake the senders."""
        for destination in self.destinations:
            folder = self.root / destination.key
            (folder / f"{batch}.json.tmp").write_text(json.dumps(tags))
            (folder / f"{batch}.json.tmp").replace(folder / f"{batch}.json")
            for path in files:
                target = folder / f"{batch}__{path.name}"
                shutil.copyfile(path, target.with_suffix(".tmp"))
                target.with_suffix(".tmp").replace(target)
            log.tag(tags).info("%d results queued for %s", len(files), destination)
            self._wake[destination.key].set()
        set_dicom_outbox(self.waiting())

    def waiting(self) -> int:
        """Files waiting for some destination (a file for two destinations counts twice)."""
        return sum(len(list((self.root / d.key).glob("*__*.dcm"))) for d in self.destinations)

    def pending(self, batch: str) -> int:
        """Files of ``batch`` not yet confirmed by some destination."""
        return sum(len(list((self.root / d.key).glob(f"{batch}__*.dcm"))) for d in self.destinations)

    def batches(self, destination: Destination) -> dict[str, int]:
        """The batches with files waiting for ``destination`` (one of this outbox's): {batch: files}."""
        return dict(Counter(path.name.split("__", 1)[0] for path in (self.root / destination.key).glob("*__*.dcm")))

    def start(self) -> None:
        set_dicom_outbox(self.waiting())  # what a stopped process left
        for destination in self.destinations:
            thread = threading.Thread(target=self._sender, args=(destination,), name=f"outbox-{destination.key}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for event in self._wake.values():
            event.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _tags(self, folder: Path, batch: str) -> dict:
        try:
            return json.loads((folder / f"{batch}.json").read_text())
        except (OSError, ValueError):
            return {"batch": batch}

    def _sender(self, destination: Destination) -> None:
        folder = self.root / destination.key
        delay = self.retry_first_seconds
        failures: dict[str, tuple[int, str]] = {}  # batch -> failed attempts in a row, the last error: logged once
        while not self._stop.is_set():
            self._wake[destination.key].clear()
            files = sorted(folder.glob("*__*.dcm"))
            if not files:
                self._wake[destination.key].wait(timeout=5.0)
                continue
            batches: dict[str, list[Path]] = {}
            for path in files:
                batches.setdefault(path.name.split("__", 1)[0], []).append(path)
            failed = False
            for batch, paths in batches.items():
                tags = self._tags(folder, batch)
                try:
                    stored = destination.send(paths)
                except Exception as exc:  # anything a destination raises: keep the files, retry later
                    failed = True
                    count, last = failures.get(batch, (0, ""))
                    failures[batch] = (count + 1, str(exc))
                    if str(exc) != last:  # the first failure, or another error: a repeat is not logged again
                        log.tag(tags).warning("delivery of %d results to %s failed (%s); retrying in %.1fs, then "
                                              "less often (logged again when it changes or succeeds)",
                                              len(paths), destination, exc, delay)
                    continue
                for path in stored:
                    path.unlink()
                record_dicom_sent(len(stored))
                set_dicom_outbox(self.waiting())
                if len(stored) < len(paths):
                    failed = True
                    log.tag(tags).warning("%s took %d of %d results; the rest stay in the outbox",
                                          destination, len(stored), len(paths))
                else:
                    (folder / f"{batch}.json").unlink(missing_ok=True)
                count, _ = failures.pop(batch, (0, ""))
                log.tag(tags).info("%d results delivered to %s%s", len(stored), destination,
                                   f" after {count} failed attempts" if count else "")
            if failed:
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max_seconds)
            else:
                delay = self.retry_first_seconds
