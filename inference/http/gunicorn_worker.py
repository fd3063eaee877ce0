"""The gunicorn worker of the gateway: gthread, plus JSON errors, probe threads and socket timeouts.

``gunicorn.conf.py`` sets ``worker_class = "inference.http.gunicorn_worker.GatewayWorker"``. On top of
gunicorn's threaded worker it

* answers the requests gunicorn's own HTTP parser refuses (bad or duplicated Content-Length,
  Content-Length with chunked, a repeated singleton header, unknown transfer codings, oversized
  headers...) with the gateway's JSON error body ``{"error": ...}`` and the right status,
  instead of gunicorn's HTML page;
* serves liveness probes and scrapes (``GET /healthcheck``, ``/ping``, ``/metrics``) on a small
  pool of their own, recognised by peeking at the request line, so slow uploads holding every
  request thread cannot make an orchestrator believe the server is dead;
* bounds how long a socket read or write may wait without progress (``SO_RCVTIMEO`` and
  ``SO_SNDTIMEO``, ``INFERENCE_READ_TIMEOUT``), so a stalled client frees its thread;
* on SIGTERM, returns (and lets the interpreter shut down) only once every request in flight is answered
  or the graceful timeout passed: a request still uploading at the stop gets its 200, whatever thread pool
  it then uses (the model's, the blur's, the hash's refuse work once the interpreter shuts down).
"""

from __future__ import annotations

import json
import selectors
import socket
import ssl
import struct
import threading
import time
from concurrent import futures
from functools import partial

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from inference.config import get_settings

#: Request lines (peeked, never consumed) served by the probe pool.
PROBE_PREFIXES = tuple(f"{method} {path}".encode() for method in ("GET", "HEAD")
                       for path in ("/healthcheck ", "/healthcheck?", "/ping ", "/ping?", "/metrics ", "/metrics?"))
#: Seconds a request body may take before its average rate is held to INFERENCE_MIN_UPLOAD_RATE.
UPLOAD_GRACE_SECONDS = 5.0
#: Threads per worker process for probes and scrapes.
PROBE_THREADS = 2
_PEEK_BYTES = 32

# (exception class, status, reason, message prefix telling the client what to fix), most specific first
_PARSER_ERRORS: tuple[tuple[type, int, str, str], ...] = (
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented",
     "unsupported Transfer-Encoding; send the body with Content-Length or chunked"),
    (http_errors.LimitRequestLine, 414, "URI Too Long", "the request line is too long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large",
     "the request headers are too many or too large"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "only 'Expect: 100-continue' is supported"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "proxy protocol request refused"),
    (http_errors.ConfigurationProblem, 500, "Internal Server Error", "server configuration problem"),
    (http_errors.InvalidHeader, 400, "Bad Request", "malformed or repeated header"),
    (http_errors.InvalidHeaderName, 400, "Bad Request", "malformed header name"),
    (http_errors.InvalidRequestLine, 400, "Bad Request", "malformed request line"),
    (http_errors.InvalidRequestMethod, 400, "Bad Request", "malformed request method"),
    (http_errors.InvalidHTTPVersion, 400, "Bad Request", "unsupported HTTP version"),
    (http_errors.ParseException, 400, "Bad Request", "malformed HTTP request"),
)

_HEADER_ADVICE = {
    "CONTENT-LENGTH": "invalid Content-Length: send it once, as a non-negative decimal integer, "
                      "and never together with Transfer-Encoding",
    "TRANSFER-ENCODING": "invalid Transfer-Encoding: send it once, ending with 'chunked', "
                         "and never together with Content-Length",
}


def parser_error_answer(exc: BaseException) -> tuple[int, str, str]:
    """Status, reason phrase and JSON-ready message for an exception gunicorn raised while parsing.

    Exceptions that are not parser errors (a bug, say) are a 500 with a generic message: their
    text may carry internals and stays in the log.
    """
    for kind, status, reason, message in _PARSER_ERRORS:
        if isinstance(kind, type) and isinstance(exc, kind):
            if isinstance(exc, http_errors.UnsupportedTransferCoding):
                return status, reason, f"{message}; got {exc.hdr!r}"
            if isinstance(exc, http_errors.InvalidHeader):
                return status, reason, _HEADER_ADVICE.get(str(exc.hdr).upper(), f"{message}: {exc.hdr!r} "
                                                          "(headers such as Content-Type may appear once)")
            return status, reason, message
    return 500, "Internal Server Error", "internal server error; the detail is in the server log"


def error_response_bytes(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 response (``Connection: close``) whose body is the gateway's JSON error."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    return head + body


def set_socket_timeouts(sock: socket.socket, seconds: float) -> None:
    """Make blocking reads and writes on ``sock`` fail after ``seconds`` without progress.

    Kernel timeouts (not ``settimeout``), so they survive gunicorn's ``setblocking`` calls and
    apply to each ``recv``/``send`` rather than to a whole ``sendall``.
    """
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


class PacedSocket:
    """A socket whose ``recv`` gives up on a sender that is too slow (for reading one request body).

    ``recv`` raises ``TimeoutError`` once the bytes received average under ``min_rate`` bytes/s
    after ``grace`` seconds, or when the kernel's read timeout expired without data. Everything
    else is the wrapped socket's.
    """

    def __init__(self, sock: socket.socket, min_rate: int, read_timeout: float,
                 grace: float = UPLOAD_GRACE_SECONDS) -> None:
        self._sock = sock
        self._min_rate = min_rate
        self._read_timeout = read_timeout
        self._grace = grace
        self._started = time.monotonic()
        self._received = 0

    def recv(self, size: int, *flags: int) -> bytes:
        try:
            data = self._sock.recv(size, *flags)
        except BlockingIOError:  # SO_RCVTIMEO expired on the blocking socket
            raise TimeoutError(f"no data for {self._read_timeout:g} s") from None
        self._received += len(data)
        elapsed = time.monotonic() - self._started
        if self._min_rate > 0 and elapsed > self._grace and self._received < self._min_rate * elapsed:
            raise TimeoutError(f"the body averaged {self._received / elapsed:.0f} bytes/s over {elapsed:.0f} s, "
                               f"under the minimum of {self._min_rate} bytes/s")
        return data

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class GatewayWorker(ThreadWorker):
    """gunicorn's gthread worker with JSON parser errors, a probe pool and socket timeouts."""

    def init_process(self) -> None:
        settings = get_settings()
        self.read_timeout = settings.read_timeout
        self.min_upload_rate = settings.min_upload_rate
        self.probe_pool = futures.ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="probe")
        self.in_flight = 0  # connections being served on a request or probe thread
        self.in_flight_done = threading.Condition()
        self.stopping_since: float | None = None
        super().init_process()

    def run(self) -> None:
        """gthread's loop, then wait for the requests still in flight (the interpreter's shutdown follows)."""
        super().run()
        deadline = (self.stopping_since or time.monotonic()) + self.cfg.graceful_timeout
        with self.in_flight_done:
            while self.in_flight and time.monotonic() < deadline:
                self.notify()
                self.in_flight_done.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            if self.in_flight:
                self.log.warning("graceful timeout: %d request(s) still in flight are cut off", self.in_flight)

    def handle_exit(self, sig, frame) -> None:
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        super().handle_exit(sig, frame)

    def enqueue_req(self, conn) -> None:
        """Hand a connection to the probe pool when it starts with a probe's request line."""
        if not getattr(conn, "timeouts_set", False):
            set_socket_timeouts(conn.sock, self.read_timeout)
            conn.timeouts_set = True
        head = self._peek(conn)
        if head is None and not conn.initialized:
            # nothing sent yet: wait in the poller, not in a request thread's queue, and look again; a
            # new connection gets the read timeout to send its first request, not the long keep-alive
            conn.timeout = time.monotonic() + min(self.cfg.keepalive, self.read_timeout)
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
            return
        if head is not None and head.startswith(PROBE_PREFIXES):
            future = self.probe_pool.submit(self.handle, conn)
            future.add_done_callback(lambda fut: self.method_queue.defer(self.finish_request, conn, fut))
            return
        super().enqueue_req(conn)

    @staticmethod
    def _peek(conn) -> bytes | None:
        """The first bytes received on the connection (left in place), None when none arrived yet."""
        if conn.sock.gettimeout() != 0.0:  # peek only without blocking (the main loop must not wait)
            return b""
        if isinstance(conn.sock, ssl.SSLSocket):  # HTTPS keep-alive: the bytes are ciphertext, no peek
            return b""
        try:
            return conn.sock.recv(_PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""  # a broken connection: the request pool closes it as usual

    def handle(self, conn):
        """Serve a connection; one that closes lingers for the client here, not in the main loop.

        gunicorn's graceful close waits (up to 2 s) for the client to stop sending; done by the
        event loop, a slow sender that is being cut off would stall every connection of the process.
        """
        with self.in_flight_done:
            self.in_flight += 1
        try:
            result = super().handle(conn)
            if result is False:
                util.close_graceful(conn.sock, timeout=1.0)
                conn.closed_on_thread = True
            return result
        finally:
            with self.in_flight_done:
                self.in_flight -= 1
                self.in_flight_done.notify_all()

    def finish_request(self, conn, fs) -> None:
        """Count a connection closed on its thread (``handle``) once: gunicorn's own close of it fails on the
        closed socket and counted it twice, so its count of open connections went negative and a stop no
        longer waited for the requests in flight."""
        if getattr(conn, "closed_on_thread", False):
            self.nr_conns -= 1
            return
        super().finish_request(conn, fs)

    def handle_request(self, req, conn):
        """Serve one request with its body read through a ``PacedSocket`` (slow senders get a 408)."""
        unreader = getattr(conn.parser, "unreader", None)
        original = getattr(unreader, "sock", None)
        if original is None:
            return super().handle_request(req, conn)
        unreader.sock = PacedSocket(original, self.min_upload_rate, self.read_timeout)
        try:
            return super().handle_request(req, conn)
        finally:
            unreader.sock = original

    def handle_error(self, req, client, addr, exc) -> None:
        """Answer an error gunicorn caught (mostly its HTTP parser's) with the gateway's JSON body."""
        status, reason, message = parser_error_answer(exc)
        if status >= 500:
            self.log.exception("error handling request from %s", (addr or ("",))[0])
        else:
            self.log.warning("invalid request from %s: %s (%d)", (addr or ("",))[0], exc, status)
        answer = error_response_bytes(status, reason, message)
        # imported here: gunicorn's master imports this module, and must not create metric files itself
        from inference.metrics import observe_request

        # counted before the answer goes out: a client that has its answer finds it counted
        observe_request("unparsed", None, status, 0.0, 0, len(answer))
        try:
            client.setblocking(True)
            client.sendall(answer)
        except OSError:
            self.log.debug("could not send the error response; the client went away")

    def handle_quit(self, sig, frame) -> None:
        self.probe_pool.shutdown(wait=False)
        super().handle_quit(sig, frame)
