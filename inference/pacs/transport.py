"""TCP and TLS settings of the node's DICOM associations: Nagle's algorithm off, so C-STOREs are not held
back; TLS handshakes out of pynetdicom's accept loop.

A C-STORE ends with a partial TCP segment; with Nagle's algorithm on, the sender holds it until
the peer acknowledges the previous one, and the peer delays that acknowledgement (about 40 ms on
Linux), so every instance waited for it: Study1's 120 instances took 7 s to cross the loopback
instead of 0.6 s (``bench/README.md``, "PACS loop"). pynetdicom leaves the option at the system's
default; ``NO_DELAY_HANDLERS`` switches it off on each association's socket as it opens.
"""

from __future__ import annotations

import logging
import socket
import ssl

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


class LazyHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their TLS handshake on first read, in the association's own thread.

    pynetdicom wraps each accepted socket in its accept loop, and ``wrap_socket`` handshakes there by default:
    one TCP connection that sends nothing held every other association until it went away. Here the
    handshake waits for the first read (pynetdicom reads only once ``select`` says data came), and a
    socket timeout bounds a handshake that stalls half-way.
    """

    handshake_timeout: float = 10.0

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout)
            do_handshake_on_connect = False
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=server_hostname,
                                   session=session)
