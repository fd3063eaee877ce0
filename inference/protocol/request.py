"""What a request's JSON may hold: the protocol's own keys, and the limits it is parsed within.

The JSON comes as the multipart JSON part, a ``studyPath`` request or a job.

``json.loads`` alone turns hostile JSON into server errors: nesting a thousand levels deep raises
``RecursionError``, and an integer of hundreds of digits parses but overflows the first float
conversion of a handler. ``parse_json_object`` answers both with a 400 naming where it happened.
"""

from __future__ import annotations

import json
from typing import Any

from inference.errors import BadRequest

#: Request keys of the protocol itself, accepted whatever the command: they are not handler parameters.
#: ``depth``/``height``/``width`` are the volume size the Arterys test tool's ``-S`` option sends; ``review``
#: (``required``/``flagged``) holds the result for a reviewer instead of answering it (``inference.jobs.reviews``).
PROTOCOL_KEYS = frozenset({"inference_command", "studyUID", "seriesUID", "studyPath", "model_version",
                           "depth", "height", "width", "review"})
#: Largest JSON body read (studyPath requests, jobs): they are read whole, so they are kept small.
MAX_JSON_BYTES = 1024 * 1024
#: Deepest nesting of arrays and objects accepted in request JSON.
MAX_DEPTH = 32
#: Largest magnitude of an integer in request JSON (beyond it no float holds it; 2**63 - 1 is int64's top).
MAX_INTEGER = 2**63 - 1


def parse_json_object(raw: bytes | str, what: str) -> dict:
    """``raw`` as a JSON object, or a 400 saying what is wrong with ``what`` (e.g. "part 0 (the request JSON)")."""
    try:
        value = json.loads(raw or b"null")
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply; at most {MAX_DEPTH} levels of arrays and objects") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    check_json_limits(value, what)
    return value


def check_json_limits(value: Any, what: str) -> None:
    """A 400 when ``value`` nests deeper than ``MAX_DEPTH`` or holds an integer beyond ``MAX_INTEGER``."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_DEPTH:
                raise BadRequest(f"{what} is nested too deeply at {path or 'the top'}; "
                                 f"at most {MAX_DEPTH} levels of arrays and objects")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                stack.append((child, f"{path}.{key}" if path and isinstance(key, str) else
                              f"{path}[{key}]" if path else str(key), depth + 1))
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INTEGER:
            raise BadRequest(f"parameter {path} is an integer of {len(str(abs(item)))} digits; "
                             f"numbers must lie within +-{MAX_INTEGER}")
