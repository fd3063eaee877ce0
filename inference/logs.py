"""A logger adapter whose messages carry tags, such as the input hash of the request being served.

    log = TaggedLogger(logging.getLogger(__name__))
    req_log = log.tag({"input_hash": digest[:12]})
    req_log.info("parsed %d parts", n)   # -> "[input_hash=1a2b3c4d5e6f] parsed 12 parts"

Tags also land on the record as ``record.tags`` (a dict) for structured formatters.

The gateway binds the request's tags to the serving thread (``bind_request_tags``), so a
handler's own ``TaggedLogger`` carries them too without being passed anything.
"""

from __future__ import annotations

import logging
import logging.config
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

import yaml

#: The default is never changed in place: ``bind_request_tags`` sets a new dict each time.
_request_tags: ContextVar[Mapping[str, Any]] = ContextVar("request_tags", default=MappingProxyType({}))


def bind_request_tags(tags: Mapping[str, Any]) -> None:
    """Tag every ``TaggedLogger`` line of the current request (thread or task) with ``tags``."""
    _request_tags.set(dict(tags))


@contextmanager
def request_tags(**tags: Any) -> Iterator[None]:
    """Add ``tags`` to the current request's for the block, then put the previous ones back (no leak into
    later lines of the same thread: a command line, a job runner, a test)."""
    token = _request_tags.set({**_request_tags.get(), **tags})
    try:
        yield
    finally:
        _request_tags.reset(token)


def current_request_tags() -> dict[str, Any]:
    """The tags bound to the current request (thread or task), as a new dict."""
    return dict(_request_tags.get())


class TaggedLogger(logging.LoggerAdapter):
    """Prefixes every message with ``[key=value ...]`` and attaches the tags to the record."""

    def __init__(self, logger: logging.Logger, tags: Mapping[str, Any] | None = None) -> None:
        super().__init__(logger, {})
        self.tags: dict[str, Any] = dict(tags or {})

    def add_tags(self, tags: Mapping[str, Any]) -> None:
        """Add (or overwrite) tags on this logger in place."""
        self.tags.update(tags)

    def tag(self, tags: Mapping[str, Any]) -> TaggedLogger:
        """A child logger with this logger's tags plus ``tags``; this one is left unchanged."""
        return TaggedLogger(self.logger, {**self.tags, **tags})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        tags = {**_request_tags.get(), **self.tags}
        extra = dict(kwargs.get("extra") or {})
        extra["tags"] = tags
        kwargs["extra"] = extra
        if not tags:
            return msg, kwargs
        prefix = " ".join(f"{key}={value}" for key, value in tags.items())
        return f"[{prefix}] {msg}", kwargs


def configure_logging(config_file: str | os.PathLike) -> None:
    """Load a logging config such as ``logging.yaml`` (``INFERENCE_LOGGING_CONFIG``).

    Plain stderr logging if it is missing.
    """
    try:
        with open(config_file, encoding="utf-8") as handle:
            logging.config.dictConfig(yaml.safe_load(handle))
    except FileNotFoundError:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("inference.logs").warning("logging config %s not found; logging to stderr", config_file)
