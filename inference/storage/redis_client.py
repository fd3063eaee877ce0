"""The one way the stores talk to Redis: one client per URL and process (the same timeouts and retries for
every store), and one error policy: Redis unreachable is a ``ServiceUnavailable`` (503) naming the store
and the server (never its password), never a hang."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache

import redis

from inference.errors import ServiceUnavailable

#: Seconds to connect to / wait for Redis before the request is answered 503.
CONNECT_TIMEOUT, SOCKET_TIMEOUT = 2.0, 10.0
#: What counts as Redis unreachable: the connection, not a command Redis refused.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


@cache
def client_for(url: str) -> redis.Redis:
    """This process's client for ``url`` (one connection pool per process and URL); values as bytes."""
    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
                                health_check_interval=30)


def where(client: redis.Redis) -> str:
    """``host:port`` of ``client``'s server, for messages (no password)."""
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


@contextlib.contextmanager
def reaching(client: redis.Redis, what: str, advice: str = "retry later") -> Iterator[None]:
    """Run the block's Redis calls; unreachable Redis becomes a 503 naming ``what`` and the server."""
    try:
        yield
    except UNREACHABLE as exc:
        raise ServiceUnavailable(f"the {what} (Redis at {where(client)}) is unreachable ({exc}); {advice}") from exc
