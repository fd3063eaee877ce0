"""A client of the inference protocol: send a study, get back the checked response.

Used by the inference test tool, the benchmark and the end-to-end tests, so that what they
send is what viewers send (see ``shared/PROTOCOL-NOTES.md``) and what they accept is what the
protocol allows (``inference.protocol.rules``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import requests
from requests_toolbelt.multipart.encoder import MultipartEncoder, MultipartEncoderMonitor

from inference import protocol
from inference.errors import OutputValidationError
from inference.protocol.multipart_response import decode_multipart_response


class InferenceRequestError(Exception):
    """The server answered with an error status; ``status`` and the server's ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


@dataclass
class InferenceResponse:
    """A decoded response: the JSON, one bytes buffer per part, and the hashes part if any."""

    response_json: dict
    buffers: list[bytes]
    hashes: str | None
    request_bytes: int
    response_bytes: int


def build_multipart_request(
    json_input: dict,
    files: Sequence[os.PathLike | str],
    attachments: Sequence[os.PathLike | str] = (),
) -> MultipartEncoder:
    """A streaming multipart body as viewers send it: JSON, then attachments, then DICOM files.

    Its ``content_type`` is ``multipart/related`` with a quoted boundary.
    """
    fields: list[tuple[str, tuple[str, bytes | BinaryIO, str]]] = [
        ("request_json", ("request.json", json.dumps(json_input).encode(), "text/json"))]
    for path in attachments:
        fields.append(("attachment", (Path(path).name, open(path, "rb"), "application/octet-stream")))
    for path in files:
        fields.append(("file", (Path(path).name, open(path, "rb"), "application/dicom")))
    return MultipartEncoder(fields=fields)


def close_request_files(encoder: MultipartEncoder) -> None:
    """Close the files ``build_multipart_request`` opened for ``encoder``."""
    for _, value in encoder.fields:
        if isinstance(value, tuple) and hasattr(value[1], "close"):
            value[1].close()


def related_content_type(encoder: MultipartEncoder) -> str:
    return f'multipart/related; boundary="{encoder.boundary_value}"'


def decode_response(response: requests.Response) -> InferenceResponse:
    """Split a 200 response into JSON and buffers; raise for an error status."""
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise InferenceRequestError(response.status_code, message)
    parts = decode_multipart_response(response.headers.get("Content-Type", ""), response.content)
    if not parts:
        raise OutputValidationError("the response has no parts; part 0 must be the response JSON")
    response_json = json.loads(parts[0][1])
    rest = parts[1:]
    hashes = None
    if rest and protocol.is_hashes_part(*rest[-1]):
        hashes = rest.pop()[1].decode()
    return InferenceResponse(response_json, [body for _, body in rest], hashes, 0, len(response.content))


def send_inference_request(
    url: str,
    json_input: dict,
    files: Sequence[os.PathLike | str] = (),
    *,
    attachments: Sequence[os.PathLike | str] = (),
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    timeout: float | None = None,
    session: requests.Session | None = None,
) -> InferenceResponse:
    """POST a study (or, with no files, a JSON-only ``studyPath`` request) and decode the answer.

    ``progress(sent, total)`` is called as the body goes out; ``session`` carries TLS settings (CA file,
    client certificate) when the server needs them. Raises ``InferenceRequestError``
    for an error status; the caller checks the result with ``inference.protocol.rules``.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if not files:
        body: bytes | MultipartEncoderMonitor = json.dumps(json_input).encode()
        headers["Content-Type"] = "application/json"
        size = len(body)
    else:
        encoder = build_multipart_request(json_input, files, attachments)
        size = encoder.len
        headers["Content-Type"] = related_content_type(encoder)
        body = MultipartEncoderMonitor(encoder, (lambda m: progress(m.bytes_read, size)) if progress else None)
    try:
        response = (session or requests).post(url, data=body, headers=headers, timeout=timeout)
    finally:
        if files:
            close_request_files(encoder)
    result = decode_response(response)
    result.request_bytes = size
    return result
