"""The gateway's gunicorn worker, against a live gunicorn over raw sockets: what gunicorn's own HTTP
parser refuses is answered as JSON with the right status; probes stay fast while slow senders hold
every request thread, and slow senders are cut off so other clients get served."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest
import requests
from gunicorn.http import errors as http_errors

from inference.http.gunicorn_worker import error_response_bytes, parser_error_answer
from inference.protocol.client import send_inference_request
from tests.conftest import RunningServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The shipped 2 workers x 4 request threads, a short read timeout and the default minimum upload rate."""
    running = RunningServer({"INFERENCE_READ_TIMEOUT": "5", "INFERENCE_WORKERS": "2", "INFERENCE_ENABLE_MOCKS": "1"},
                            tmp_path_factory.mktemp("worker"))
    yield running
    running.stop()


def exchange(server: RunningServer, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


HOSTILE = {
    "negative Content-Length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    "non-numeric Content-Length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n", 400, "Content-Length"),
    "duplicate Content-Length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
                                 400, "Content-Length"),
    "Content-Length and chunked": ((b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), 400, "Content-Length"),
    "duplicate Content-Type": ((b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Type: a/b\r\n"
                                b"Content-Length: 0\r\n\r\n"), 400, "CONTENT-TYPE"),
    "unknown transfer coding": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: foo\r\n\r\n", 501, "foo"),
    "oversized header": (b"GET /models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers"),
    "too many headers": (b"GET /models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
                         + b"\r\n", 431, "headers"),
    "request line too long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request line"),
    "garbage request line": (b"\x16\x03\x01 hello\r\n\r\n", 400, "request"),
    "bad chunk size": ((b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; boundary=b\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"), 400, None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_parser_errors_are_json(live, name):
    data, status, mention = HOSTILE[name]
    got, headers, body = exchange(live, data)
    assert got == status, (name, got, body)
    assert headers["content-type"].startswith("application/json"), (name, headers, body)
    error = json.loads(body)["error"]
    assert "<" not in error and "Traceback" not in error
    if mention:
        assert mention.lower() in error.lower(), (name, error)
    # the server keeps serving
    assert requests.get(f"{live.url}/healthcheck", timeout=5).text == "READY"


def test_parser_error_mapping_without_a_server():
    assert parser_error_answer(http_errors.UnsupportedTransferCoding("gzip"))[0] == 501
    assert parser_error_answer(http_errors.LimitRequestHeaders("too many"))[0] == 431
    status, _, message = parser_error_answer(RuntimeError("/secret/path in a traceback"))
    assert status == 500 and "/secret" not in message
    raw = error_response_bytes(431, "Request Header Fields Too Large", "x")
    assert raw.startswith(b"HTTP/1.1 431 ") and raw.endswith(b'{"error": "x"}')


def _slow_upload(server: RunningServer, stop: threading.Event, outcome: list) -> None:
    """A multipart upload announcing 10 MB and sending 20 bytes every 0.5 s until the server answers."""
    head = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/related; boundary=b\r\n"
            b"Content-Length: 10000000\r\n\r\n--b\r\nContent-Type: application/json\r\n\r\n{}")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head)
            sock.settimeout(0.5)
            while not stop.is_set():
                try:
                    sock.sendall(b"\r\n--b\r\nContent-Type: application/dicom\r\n\r\n"[:20])
                except OSError:
                    break
                try:
                    answer = sock.recv(4096)
                except TimeoutError:
                    continue
                outcome.append(answer.split(b"\r\n", 1)[0])
                break
    except OSError as exc:
        outcome.append(repr(exc).encode())


def test_slow_senders_do_not_starve_probes_or_clients(live, study):
    stop = threading.Event()
    outcomes: list = []
    senders = [threading.Thread(target=_slow_upload, args=(live, stop, outcomes)) for _ in range(16)]
    for thread in senders:
        thread.start()
    try:
        time.sleep(1.0)  # every request thread now reads a slow body
        latencies = []
        for _ in range(10):
            started = time.perf_counter()
            assert requests.get(f"{live.url}/healthcheck", timeout=5).text == "READY"
            latencies.append(time.perf_counter() - started)
            time.sleep(0.3)
        assert max(latencies) < 1.0, latencies
        # a normal client is served once the slow senders are cut off (5 s grace, 32 KiB/s minimum)
        started = time.perf_counter()
        result = send_inference_request(f"{live.url}/", {"inference_command": "get-probability-mask"}, study,
                                        timeout=60)
        served_after = time.perf_counter() - started
        assert result.response_json["parts"], result.response_json
        assert served_after < 30, served_after
        for thread in senders:  # every slow sender is cut off, none is left waiting
            thread.join(30)
    finally:
        stop.set()
    assert len(outcomes) == 16
    assert all(line.startswith(b"HTTP/1.1 408") for line in outcomes), outcomes
    print(f"healthcheck median {statistics.median(latencies):.3f}s max {max(latencies):.3f}s; "
          f"valid request served after {served_after:.1f}s")


def test_paced_socket_gives_up_on_a_slow_sender_and_on_silence():
    from inference.http.gunicorn_worker import PacedSocket, set_socket_timeouts

    server, client = socket.socketpair()
    with server, client:
        paced = PacedSocket(server, min_rate=1000, read_timeout=0.3, grace=0.2)
        client.sendall(b"x" * 10)
        assert paced.recv(100) == b"x" * 10  # within the grace time: fine
        time.sleep(0.25)
        client.sendall(b"y")
        with pytest.raises(TimeoutError, match="under the minimum of 1000 bytes/s"):
            paced.recv(100)
        set_socket_timeouts(server, 0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no data for 0.3 s"):
            PacedSocket(server, min_rate=0, read_timeout=0.3).recv(100)
        assert 0.2 < time.monotonic() - started < 2


def test_an_idle_keep_alive_connection_is_reused_past_the_old_5_s_limit(live):
    """A client reusing a connection idle 6 s (gunicorn closed them at 5 s: the soak's resets) is served on it."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    try:
        connection.request("GET", "/models")
        first = connection.getresponse()
        assert first.status == 200 and first.getheader("Connection", "").lower() != "close"
        first.read()
        local_port = connection.sock.getsockname()[1]
        time.sleep(6.0)
        connection.request("GET", "/models")  # raises RemoteDisconnected when the server closed it meanwhile
        second = connection.getresponse()
        assert second.status == 200 and connection.sock.getsockname()[1] == local_port, "the same connection"
        second.read()
    finally:
        connection.close()
