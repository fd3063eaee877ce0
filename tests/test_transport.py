"""The node's associations switch Nagle's algorithm off (inference/pacs/transport.py)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

from pynetdicom import evt

from inference.pacs.transport import NO_DELAY_HANDLERS, disable_nagle


def event_for(sock) -> SimpleNamespace:
    """What pynetdicom's EVT_CONN_OPEN hands a handler, as far as ``disable_nagle`` reads it."""
    return SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=sock))))


def test_the_connection_gets_tcp_nodelay():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        disable_nagle(event_for(client))
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert NO_DELAY_HANDLERS == [(evt.EVT_CONN_OPEN, disable_nagle)]


def test_a_socket_that_is_gone_or_not_tcp_is_left_alone():
    disable_nagle(event_for(None))  # pynetdicom's socket already closed
    left, right = socket.socketpair()  # a Unix socket has no TCP options
    with left, right:
        disable_nagle(event_for(left))
