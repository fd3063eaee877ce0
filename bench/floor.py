"""The floor of the benchmark: the least a server can do with our requests under gunicorn.

It reads the body in chunks, SHA-256-hashes it and answers a canned ``multipart/related``
response of the size the client asks for (header ``X-Floor-Response-Bytes``, else the env var
``FLOOR_RESPONSE_BYTES``), so the client does the same decoding work as with the gateway;
it parses nothing. Run it like the gateway, with the app swapped:

    gunicorn -c gunicorn.conf.py bench.floor:app
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator

READ_CHUNK = 1024 * 1024
WRITE_CHUNK = 4 * 1024 * 1024
SIZE_HEADER = "X-Floor-Response-Bytes"
SIZE_ENV = "FLOOR_RESPONSE_BYTES"
BOUNDARY = "floor0boundary0b5f6a1c"
_ZEROS = bytes(WRITE_CHUNK)  # WSGI servers take bytes only (gunicorn refuses memoryview)

_JSON = json.dumps({"protocol_version": "1.0", "parts": [], "floor": True}).encode()
_HEAD = f"--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n".encode() + _JSON
_FILLER_HEAD = f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
_HASH_HEAD = f"\r\n--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\n".encode()
_CLOSING = f"\r\n--{BOUNDARY}--".encode()
#: The smallest response: JSON part, empty filler part, hashes part (129 characters) and closing.
MIN_RESPONSE_BYTES = len(_HEAD) + len(_FILLER_HEAD) + len(_HASH_HEAD) + 129 + len(_CLOSING)


def read_and_hash(stream, content_length: int | None) -> tuple[str, int]:
    """SHA-256 hex digest and length of the body, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    remaining = content_length
    total = 0
    while remaining is None or remaining > 0:
        chunk = stream.read(READ_CHUNK if remaining is None else min(READ_CHUNK, remaining))
        if not chunk:
            break
        digest.update(chunk)
        total += len(chunk)
        if remaining is not None:
            remaining -= len(chunk)
    return digest.hexdigest(), total


def canned_response(size: int, input_hash: str) -> Iterator[bytes]:
    """Chunks of a valid multipart/related body of exactly ``max(size, MIN_RESPONSE_BYTES)`` bytes.

    Its filler part is zeros, streamed from one shared buffer; the last part echoes the input
    hash like the gateway's (the output hash is zeros: the floor hashes nothing it sends).
    """
    yield _HEAD
    yield _FILLER_HEAD
    filler = max(0, size - MIN_RESPONSE_BYTES)
    while filler > 0:
        piece = _ZEROS if filler >= WRITE_CHUNK else _ZEROS[:filler]
        filler -= len(piece)
        yield piece
    yield _HASH_HEAD + f"{input_hash}:{'0' * 64}".encode()
    yield _CLOSING


def app(environ: dict, start_response: Callable) -> Iterator[bytes]:
    """WSGI app: ``/healthcheck`` answers READY; anything else is hashed and answered canned."""
    if environ.get("PATH_INFO") == "/healthcheck":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return iter([b"READY"])
    length = environ.get("CONTENT_LENGTH")
    input_hash, _ = read_and_hash(environ["wsgi.input"], int(length) if length else None)
    size = max(int(environ.get("HTTP_X_FLOOR_RESPONSE_BYTES") or os.environ.get(SIZE_ENV) or 0),
               MIN_RESPONSE_BYTES)
    start_response("200 OK", [("Content-Type", f'multipart/related; boundary="{BOUNDARY}"'),
                              ("Content-Length", str(size))])
    return canned_response(size, input_hash)
