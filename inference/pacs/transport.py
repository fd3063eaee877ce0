"""TCP settings of the node's DICOM associations: Nagle's algorithm off, so C-STOREs are not held back.

A C-STORE ends with a partial TCP segment; with Nagle's algorithm on, the sender holds it until
the peer acknowledges the previous one, and the peer delays that acknowledgement (about 40 ms on
Linux), so every instance waited for it: Study1's 120 instances took 7 s to cross the loopback
instead of 0.6 s (``bench/README.md``, "PACS loop"). pynetdicom leaves the option at the system's
default; ``NO_DELAY_HANDLERS`` switches it off on each association's socket as it opens.
"""

from __future__ import annotations

import logging
import socket

from pynetdicom import evt
from pynetdicom.events import EventHandlerType

log = logging.getLogger("inference.pacs.transport")


def disable_nagle(event: evt.Event) -> None:
    """Set TCP_NODELAY on the socket of the association that just connected (``EVT_CONN_OPEN``)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket (a test's), or already closed: sending still works, slower
        log.debug("TCP_NODELAY not set: %s", exc)


#: Event handlers for ``AE.start_server`` / ``AE.associate``.
NO_DELAY_HANDLERS: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, disable_nagle)]
