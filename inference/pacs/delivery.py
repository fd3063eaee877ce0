"""Deliver a command line's DICOM results through the DICOM node's outbox and say what each destination confirmed.

The batch command line (``python -m handlers.hippocampus ... --send-to AE@HOST:PORT``) queues each
study's results in the same outbox as ``dicom_node.py`` (``inference/pacs/outbox.py``: the same folders
under ``INFERENCE_PACS_ROOT``, senders and retries), waits until every destination confirmed them
or a deadline passed, and reports per study and destination: stored, or left in the outbox,
where the next run or a DICOM node sharing the outbox delivers them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inference.logs import TaggedLogger
from inference.pacs.outbox import Destination, Outbox

log = TaggedLogger(logging.getLogger("inference.pacs.delivery"))

STORED, IN_OUTBOX = "stored", "outbox"


@dataclass(frozen=True)
class DeliveryStatus:
    """What became of one batch of results at one destination."""

    destination: str
    status: str  # STORED (confirmed by the destination) or IN_OUTBOX (waiting in ``outbox``)
    files: int
    outbox: Path | None = None

    def as_json(self) -> dict:
        out = {"status": self.status, "files": self.files}
        if self.outbox is not None:
            out["outbox"] = str(self.outbox)
        return out


class ResultSender:
    """Sends batches of result files to destinations (one outbox sender each) for one run of a command.

    A batch already waiting in a destination's folder when the sender starts (an earlier run's,
    for the same input and model: the batch name says so) is delivered as it is and not queued
    again, so a re-run after an outage stores each result once.
    """

    def __init__(self, root: Path, destinations: Sequence[Destination], *, retry_max_seconds: float,
                 timeout: float) -> None:
        self.timeout = timeout
        self._outboxes = [(d, Outbox(root, [d], retry_max_seconds=retry_max_seconds)) for d in destinations]
        self._held = {d.key: outbox.batches(d) for d, outbox in self._outboxes}  # before any sender runs
        self._queued: dict[tuple[str, str], tuple[float, int]] = {}  # (batch, key) -> (queued at, files)
        self._reported: set[tuple[str, str]] = set()
        for _, outbox in self._outboxes:
            outbox.start()

    @property
    def destinations(self) -> list[str]:
        """The destinations, as ``AE@HOST:PORT`` / ``STOW-RS URL``."""
        return [str(d) for d, _ in self._outboxes]

    def queue(self, batch: str, files: Sequence[Path], tags: dict) -> None:
        """Queue ``files`` for every destination (durably, before returning) unless it holds ``batch`` already."""
        for destination, outbox in self._outboxes:
            if batch in self._held[destination.key]:
                count = self._held[destination.key][batch]
                log.tag(tags).info("%d results of this input wait for %s from an earlier run: sending those",
                                   count, destination)
            else:
                outbox.put(batch, files, tags)
                count = len(files)
            self._queued[(batch, destination.key)] = (time.monotonic(), count)

    def confirmed(self) -> list[tuple[str, DeliveryStatus]]:
        """(batch, status) of the batches every file of which a destination confirmed since the last call."""
        out = []
        for destination, outbox in self._outboxes:
            for (batch, key), (_, count) in self._queued.items():
                if key == destination.key and (batch, key) not in self._reported and not outbox.pending(batch):
                    self._reported.add((batch, key))
                    out.append((batch, DeliveryStatus(str(destination), STORED, count)))
        return out

    def close(self) -> list[tuple[str, DeliveryStatus]]:
        """Wait for confirmations until each batch's deadline (queued + timeout), stop the senders.

        Returns (batch, status) of every batch not reported by ``confirmed`` before: stored, or the
        outbox folder its files wait in. Decided after the senders stopped, so it is final.
        """
        out = []
        while True:
            out += self.confirmed()
            now = time.monotonic()
            waiting = [queued_at + self.timeout for pair, (queued_at, _) in self._queued.items()
                       if pair not in self._reported]
            if not waiting or now >= max(waiting):
                break
            time.sleep(0.2)
        for _, outbox in self._outboxes:
            outbox.stop()
        out += self.confirmed()
        for destination, outbox in self._outboxes:
            for batch, key in self._queued:
                if key == destination.key and (batch, key) not in self._reported:
                    self._reported.add((batch, key))
                    out.append((batch, DeliveryStatus(str(destination), IN_OUTBOX, outbox.pending(batch),
                                                      outbox.root / destination.key)))
        return out

    def earlier_results(self) -> dict[str, tuple[int, int]]:
        """After ``close``: per destination, files of earlier runs' batches this run did not queue,
        as (delivered now, still waiting)."""
        out = {}
        for destination, outbox in self._outboxes:
            delivered = waiting = 0
            for batch, count in self._held[destination.key].items():
                if (batch, destination.key) not in self._queued:
                    left = outbox.pending(batch)
                    delivered, waiting = delivered + count - left, waiting + left
            if delivered or waiting:
                out[str(destination)] = (delivered, waiting)
        return out
