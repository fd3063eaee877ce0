"""Limits on what a request may make the server produce (the request's own size is checked while reading)."""

from __future__ import annotations

from collections.abc import Sequence

from utils.errors import PayloadTooLarge


def check_response_size(buffers: Sequence[bytes | memoryview], json_bytes: int, limit: int) -> None:
    """413 when a prepared response (JSON plus buffers) exceeds ``limit`` bytes, before any of it is sent."""
    total = json_bytes + sum(memoryview(buffer).nbytes for buffer in buffers)
    if total > limit:
        raise PayloadTooLarge(f"the response would be {total} bytes, over the limit of {limit} bytes "
                              "(INFERENCE_MAX_RESPONSE_BYTES); send a smaller study or fewer series")
