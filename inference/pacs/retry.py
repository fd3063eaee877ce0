"""Steps that fail again and again (a full disk, a study that cannot be routed): retried after a doubling wait,
logged once with a count instead of a traceback per attempt.

The DICOM node's watcher runs every 0.1 s; without this, a spool on a full disk logged a traceback
each time (122 in 12 s) and every retry of a routing step wrote its audit record again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Failing:
    first: float  # when it first failed (clock seconds)
    count: int
    wait: float  # seconds until the next try
    next_try: float
    message: str
    logged: float  # when it was last logged


class RepeatedFailures:
    """Run named steps; one that failed waits ``first_wait`` seconds, doubling up to ``max_wait``, before it runs
    again. Its first failure is logged with the traceback; later ones only when the error changes or every
    ``remind_seconds`` (with the count so far); the first success after failures is logged with the count."""

    def __init__(self, logger: Any, *, first_wait: float = 0.5, max_wait: float = 60.0,
                 remind_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.first_wait, self.max_wait, self.remind_seconds = first_wait, max_wait, remind_seconds
        self.clock = clock
        self._failing: dict[str, _Failing] = {}

    def run(self, key: str, what: str, step: Callable[[], object]) -> bool:
        """Run ``step`` unless ``key`` is still waiting after a failure; whether it ran and succeeded."""
        now = self.clock()
        state = self._failing.get(key)
        if state is not None and now < state.next_try:
            return False
        try:
            step()
        except Exception as exc:  # the caller (a watcher loop) must outlive any one step's trouble
            self._failed(key, what, exc, now)
            return False
        if state is not None:
            del self._failing[key]
            self.log.info("%s works again after %d failures in %.0f s", what, state.count, now - state.first)
        return True

    def failing(self) -> dict[str, int]:
        """The steps failing now: key -> failures in a row."""
        return {key: state.count for key, state in self._failing.items()}

    def _failed(self, key: str, what: str, exc: Exception, now: float) -> None:
        message = f"{type(exc).__name__}: {exc}"
        state = self._failing.get(key)
        if state is None:
            self._failing[key] = _Failing(now, 1, self.first_wait, now + self.first_wait, message, now)
            self.log.error("%s failed: %s; tried again in %.1f s, then less often (logged again with a count "
                           "when it works, when the error changes, or every %.0f min)", what, message,
                           self.first_wait, self.remind_seconds / 60, exc_info=exc)
            return
        state.count += 1
        state.wait = min(state.wait * 2, self.max_wait)
        state.next_try = now + state.wait
        if message != state.message or now - state.logged >= self.remind_seconds:
            self.log.error("%s failed %d times in %.0f s: %s; next try in %.1f s", what, state.count,
                           now - state.first, message, state.wait)
            state.message, state.logged = message, now
