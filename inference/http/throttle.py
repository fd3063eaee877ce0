"""Failed authentications: audited with the client address, and throttled per address and per user id.

A bearer token that is not valid is an ``authentication-failed`` audit record and a warning naming the client
address (never the token). Past INFERENCE_AUTH_FAILURE_LIMIT failures within INFERENCE_AUTH_FAILURE_WINDOW_SECONDS
from one address, or for one token id (the part before the dot: a user), requests with a token from there (or
for that id) are answered 429 with ``Retry-After`` before any token is checked, so guessing costs the server
nothing. Counts are per server process (each gunicorn worker keeps its own).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import flask

from inference.config import Settings

log = logging.getLogger("inference.auth")


class FailureThrottle:
    """Failures per key (an address, a token id) in a sliding window; a key over the limit waits."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def failed(self, keys: Iterable[str]) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
            if len(self._failures) > 10_000:  # forget keys whose window passed (bounded memory)
                for key in [k for k, times in self._failures.items() if times[-1] <= now - self.window]:
                    del self._failures[key]

    def retry_after(self, keys: Iterable[str]) -> int:
        """Seconds until every key in ``keys`` may try again; 0: now."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._failures.get(key)
                if not times:
                    continue
                while times and times[0] <= now - self.window:
                    times.popleft()
                if len(times) >= self.limit:
                    wait = max(wait, times[-self.limit] + self.window - now)
        return math.ceil(wait) if wait > 0 else 0


def _keys() -> list[str]:
    """The throttle's keys for this request: its client address and, for a ``<id>.<secret>`` token, the id."""
    keys = [f"address:{flask.request.remote_addr}"]
    scheme, _, token = flask.request.headers.get("Authorization", "").partition(" ")
    token_id, dot, _ = token.strip().partition(".")
    if scheme.lower() == "bearer" and dot and token_id:
        keys.append(f"id:{token_id[:64]}")
    return keys


def install(app: flask.Flask, settings: Settings) -> None:
    """Throttle and audit failed authentications on ``app`` (a Gateway: ``g.auth_failed`` marks them)."""
    throttle = app.extensions["auth_throttle"] = FailureThrottle(settings.auth_failure_limit,
                                                                 settings.auth_failure_window_seconds)

    def refuse_while_throttled() -> flask.Response | None:
        if "Authorization" not in flask.request.headers:
            return None
        wait = throttle.retry_after(_keys())
        if not wait:
            return None
        response = flask.jsonify(error=f"too many failed authentications from this address or for this user; "
                                       f"try again in {wait} s")
        response.status_code = 429
        response.headers["Retry-After"] = str(wait)
        return response

    # first, before the gateway's own checks (and their scrypt): a throttled client costs nothing
    app.before_request_funcs.setdefault(None, []).insert(0, refuse_while_throttled)

    @app.after_request
    def count_failures(response: flask.Response) -> flask.Response:
        if flask.g.get("auth_failed"):
            keys = _keys()
            throttle.failed(keys)
            log.warning("authentication failed from %s on %s %s: the bearer token is not valid",
                        flask.request.remote_addr, flask.request.method, flask.request.path)
            token_id = next((key[3:] for key in keys if key.startswith("id:")), None)
            app.audit.append("authentication-failed", outcome="refused", client=flask.request.remote_addr,  # type: ignore[attr-defined]
                             method=flask.request.method, path=flask.request.path, token_id=token_id)
        return response
