"""The Arterys inference protocol: every rule and limit of it lives in this package.

- ``rules``: what a handler's output and the response must be (binary types, mask shapes,
  boxes, palettes, the hashes part, the response's size); re-exported here, so
  ``from inference import protocol`` then ``protocol.prepare_output(...)`` reads as the rule it is.
- ``request``: the request JSON's own keys and the limits it is parsed within.
- ``multipart_request`` / ``multipart_response``: the wire format, read while it streams in /
  written as chunks.
- ``client``: a client of the protocol, used by the test tool, the benchmark and the tests.
"""

from inference.protocol.rules import (
    BINARY_TYPES,
    DEFAULT_DRAW_THRESHOLD,
    DICOM_TYPES,
    HASHES_CONTENT_TYPE,
    HASHES_LENGTH,
    JSON_CONTENT_TYPE,
    MASK_TYPES,
    BytesLike,
    SeriesInfo,
    check_against_study,
    check_response_size,
    content_type_for,
    format_hashes,
    is_hashes_part,
    mask_array_shape,
    mask_length,
    normalize_buffer,
    prepare_output,
    validate_response,
)

__all__ = [
    "BINARY_TYPES", "BytesLike", "DEFAULT_DRAW_THRESHOLD", "DICOM_TYPES", "HASHES_CONTENT_TYPE", "HASHES_LENGTH",
    "JSON_CONTENT_TYPE", "MASK_TYPES", "SeriesInfo", "check_against_study", "check_response_size",
    "content_type_for", "format_hashes", "is_hashes_part", "mask_array_shape", "mask_length",
    "normalize_buffer", "prepare_output", "validate_response",
]
