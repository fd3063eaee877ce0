"""The input hash, one rule for every door: SHA-256 over a request's parts' contents in order, the request JSON
first (an upload as it streams in, a study folder named by ``studyPath``, a posted volume, a DICOM node job)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

#: Bytes read from a file at a time.
READ_CHUNK = 1024 * 1024


def input_hasher() -> hashlib._Hash:
    """A fresh hash to feed the parts' contents to, in order (what the streaming parser does)."""
    return hashlib.sha256()


def input_hash_of(parts: Iterable[bytes]) -> str:
    """The input hash of parts (or pieces of them) given in order, the request JSON first."""
    digest = input_hasher()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def file_chunks(path: Path) -> Iterator[bytes]:
    """The contents of ``path``, a chunk at a time."""
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def input_hash_of_files(json_bytes: bytes, files: Sequence[Path]) -> str:
    """The input hash of the request JSON and the files, in order: what an upload of them would have."""
    return input_hash_of([json_bytes, *(chunk for path in files for chunk in file_chunks(path))])
