"""A logger adapter whose messages carry tags, such as the input hash of the request being served.

    log = TaggedLogger(logging.getLogger(__name__))
    req_log = log.tag({"input_hash": digest[:12]})
    req_log.info("parsed %d parts", n)   # -> "[input_hash=1a2b3c4d5e6f] parsed 12 parts"

Tags also land on the record as ``record.tags`` (a dict) for structured formatters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any


class TaggedLogger(logging.LoggerAdapter):
    """Prefixes every message with ``[key=value ...]`` and attaches the tags to the record."""

    def __init__(self, logger: logging.Logger, tags: Mapping[str, Any] | None = None) -> None:
        super().__init__(logger, {})
        self.tags: dict[str, Any] = dict(tags or {})

    def add_tags(self, tags: Mapping[str, Any]) -> None:
        """Add (or overwrite) tags on this logger in place."""
        self.tags.update(tags)

    def tag(self, tags: Mapping[str, Any]) -> "TaggedLogger":
        """A child logger with this logger's tags plus ``tags``; this one is left unchanged."""
        return TaggedLogger(self.logger, {**self.tags, **tags})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra["tags"] = dict(self.tags)
        kwargs["extra"] = extra
        if not self.tags:
            return msg, kwargs
        prefix = " ".join(f"{key}={value}" for key, value in self.tags.items())
        return f"[{prefix}] {msg}", kwargs
