"""Read a ``multipart/related`` request into parts while it streams in, hashing it (SHA-256).

Requests are parsed while they stream in, with the push parser of the ``multipart`` package
(taught to accept ``multipart/related`` parts, whose Content-Disposition is optional). Part
contents are kept in memory up to a budget and spill to one temporary file beyond it, so a
large study is never held twice. A folder on disk is turned into the same parts, hashed the
same way (``parts_from_files``).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import multipart as multipart_lib
from werkzeug.http import parse_options_header

from inference.disk_space import check_free_space, disk_full_as
from inference.errors import (
    BadRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from inference.protocol.input_hash import file_chunks, input_hasher

READ_CHUNK = 1024 * 1024
READ_AHEAD = 64 * 1024
#: Pieces of a part smaller than this are gathered in one buffer (a slow sender's one-byte reads
#: must not each become an object kept until the part is read).
SMALL_PIECE = 64 * 1024
MULTIPART_TYPES = ("multipart/related", "multipart/form-data")


def parse_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its lower-cased media type and its parameters."""
    mimetype, params = parse_options_header(header or "")
    return mimetype.lower(), params


def multipart_boundary(header: str | None) -> bytes:
    """The boundary of a multipart Content-Type, or a 415/400 saying what is wrong with it."""
    mimetype, params = parse_content_type(header)
    if mimetype not in MULTIPART_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {header!r} is not supported: send multipart/related "
            "(or multipart/form-data) with a JSON part and DICOM parts"
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise BadRequest(f"Content-Type {header!r} has no boundary parameter")
    if len(boundary) > 200 or any(c in boundary for c in "\r\n"):
        raise BadRequest("multipart boundary is malformed (longer than 200 characters or has a line break)")
    return boundary.encode("latin-1", errors="replace")


class Part(io.RawIOBase):
    """One part of a request: its headers, and its content as a seekable binary file.

    ``pydicom.dcmread(part)`` works on it directly. ``index`` is the position in the request
    (0 is the JSON part); ``filename`` and ``content_type`` come from the part's headers.
    """

    def __init__(self, index: int, headers: Sequence[tuple[str, str]], spool: PartSpool) -> None:
        super().__init__()
        self.index = index
        self.headers = list(headers)
        self._spool = spool
        self._memory: list[bytes] | None = []  # the content as received, joined on first read; None: on disk
        self._small = bytearray()  # small pieces (a slow sender's), gathered so they do not each cost an object
        self._offset = 0  # in the spool file, once spilled
        self.size = 0
        self._pos = 0

    @cached_property
    def _disposition(self) -> dict[str, str]:
        return parse_options_header(self.header("Content-Disposition") or "")[1]

    @property
    def name(self) -> str | None:
        """The ``name`` of the Content-Disposition header, if any."""
        return self._disposition.get("name")

    @property
    def filename(self) -> str | None:
        """The ``filename`` of the Content-Disposition header, if any."""
        return self._disposition.get("filename")

    @cached_property
    def content_type(self) -> str:
        """The part's media type, lower-cased, without parameters ("" when absent)."""
        return parse_content_type(self.header("Content-Type"))[0]

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name`` (case-insensitive), or ``default``."""
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), default)

    def describe(self) -> str:
        """How error messages name this part: its index, and its file name when it has one."""
        return f"part {self.index}" + (f" (file {self.filename!r})" if self.filename else "")

    # -- file protocol -----------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size
        data = self._read_at(self._pos, max(0, min(size, self.size - self._pos)))
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:  # a writable buffer: io.BufferedReader passes a memoryview
        n = max(0, min(len(buffer), self.size - self._pos))
        if n:
            buffer[:n] = self._read_at(self._pos, n)
            self._pos += n
        return n

    def read_bytes(self) -> bytes:
        """The whole content, whatever the current position."""
        return self._read_at(0, self.size)

    def head(self, n: int | None = None) -> bytes:
        """At least the first ``n`` bytes of the content (all of it with None); a part in memory gives
        all of it, without a copy."""
        if self._memory is not None:
            return self._in_memory()
        return self._spool.read_at(self._offset, self.size if n is None else min(n, self.size))

    def open(self) -> BinaryIO:
        """An independent binary file over the content, positioned at 0; fastest for parsers.

        A part held in memory gives an ``io.BytesIO``; a part spilled to disk gives a 64 KiB
        ``io.BufferedReader`` over its own view of the spool file. Either way parsers' many small
        reads are served in C, not by a Python call each.
        """
        if self._memory is not None:
            return io.BytesIO(self.read_bytes())
        view = Part(self.index, self.headers, self._spool)
        view._memory, view._offset, view.size = None, self._offset, self.size
        return io.BufferedReader(view, READ_AHEAD)

    def _read_at(self, position: int, n: int) -> bytes:
        if self._memory is not None:
            content = self._in_memory()
            return content if position == 0 and n == len(content) else content[position : position + n]
        return self._spool.read_at(self._offset + position, n)

    def _in_memory(self) -> bytes:
        """The in-memory content as one ``bytes`` (pieces joined once; no copy for a part that came in one piece)."""
        self._keep_small_pieces()
        memory = self._memory
        assert memory is not None, "the part is on disk"  # callers check first
        if len(memory) != 1:
            memory[:] = [b"".join(memory)]
        return memory[0]

    # -- filling (by PartSpool) ----------------------------------------------------------
    def _append(self, data: bytes) -> None:
        if self._memory is None:
            self._spool.write_file(data)
        elif len(data) < SMALL_PIECE:
            self._small += data
            if len(self._small) >= SMALL_PIECE:
                self._keep_small_pieces()
        else:
            self._keep_small_pieces()
            self._memory.append(data if type(data) is bytes else bytes(data))
        self.size += len(data)

    def _keep_small_pieces(self) -> None:
        if self._small:
            assert self._memory is not None, "small pieces are kept in memory only"
            self._memory.append(bytes(self._small))
            self._small = bytearray()

    def _spill(self, offset: int) -> bytes:
        memory = self._in_memory()
        self._memory, self._offset = None, offset
        return memory


class PartSpool:
    """Holds the parts of one request: in memory up to ``memory_budget`` bytes, then in one temp file.

    The file is not started on a filesystem with less than ``min_free_mb`` MiB free (default
    INFERENCE_MIN_FREE_SPACE_MB), and a write the filesystem refuses for want of space is a 507 naming
    the ``spool`` store (``inference.disk_space``), not an internal error.
    """

    def __init__(self, memory_budget: int, spool_dir: str | os.PathLike[str] | None = None,
                 min_free_mb: int | None = None) -> None:
        self.memory_budget = memory_budget
        self.spool_dir = spool_dir
        self.min_free_mb = min_free_mb
        self.parts: list[Part] = []
        self._in_memory = 0
        self._file: BinaryIO | None = None
        self._file_size = 0
        self._unflushed = False

    def begin_part(self, headers: Sequence[tuple[str, str]]) -> Part:
        part = Part(len(self.parts), headers, self)
        self.parts.append(part)
        return part

    def append(self, part: Part, data: bytes) -> None:
        """Add content to ``part``, the part being filled; spills it to disk past the budget."""
        if part._memory is not None and self._in_memory + len(data) > self.memory_budget:
            self._in_memory -= part.size
            self.write_file(part._spill(self._file_size))
        if part._memory is not None:
            self._in_memory += len(data)
        part._append(data)

    def write_file(self, data: bytes) -> None:
        with disk_full_as("spool"):
            if self._file is None:
                folder = Path(self.spool_dir) if self.spool_dir is not None else Path(tempfile.gettempdir())
                check_free_space("spool", folder, self.min_free_mb)
                self._file = tempfile.TemporaryFile(prefix="inference-parts-", dir=self.spool_dir)
            self._file.write(data)
        self._file_size += len(data)
        self._unflushed = True

    def read_at(self, offset: int, n: int) -> bytes:
        assert self._file is not None
        if self._unflushed:
            with disk_full_as("spool"):
                self._file.flush()
            self._unflushed = False
        return os.pread(self._file.fileno(), n, offset)

    def close(self) -> None:
        """Release memory and delete the temp file; the parts are unusable afterwards."""
        for part in self.parts:
            part._memory = [] if part._memory is not None else None
            part._small = bytearray()
            part.size = 0
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class ParsedBody:
    """The parts of a request, the SHA-256 of their contents in order, and the bytes read.

    ``early`` holds what the parser's ``on_part`` callback returned for a part, by part index
    (the gateway: DICOM headers read while the rest streamed in).
    """

    parts: list[Part]
    input_hash: str
    bytes_read: int
    spool: PartSpool
    early: dict[int, Any] = field(default_factory=dict)


class _RelatedParser(multipart_lib.PushMultipartParser):
    """The ``multipart`` push parser, accepting parts without a form-data Content-Disposition."""

    def _create_segment(self, headerlist: list[tuple[str, str]]) -> multipart_lib.MultipartSegment:
        return multipart_lib.MultipartSegment(headerlist)


def parse_multipart_related(
    stream: BinaryIO,
    boundary: bytes,
    *,
    spool: PartSpool,
    max_bytes: int,
    content_length: int | None = None,
    on_part: Callable[[Part], Any] | None = None,
) -> ParsedBody:
    """Read ``stream`` (to ``content_length`` or its end), split it into parts, hash their contents.

    ``on_part`` is called with each part as soon as its content is complete, while the rest of
    the body is still streaming in (the gateway reads DICOM headers there); what it returns, when
    not None, is kept in ``ParsedBody.early`` under the part's index.

    Raises ``PayloadTooLarge`` past ``max_bytes`` (also when no Content-Length was sent),
    ``BadRequest`` for a body that is truncated or not valid multipart, and ``RequestTimeout``
    when the server's socket gives up on a stalled or too slow sender (``inference.http.gunicorn_worker``).
    """
    if content_length is not None and content_length > max_bytes:
        raise PayloadTooLarge(f"request body of {content_length} bytes exceeds the limit of {max_bytes} bytes")
    # hashed on this thread: a hashing thread beside the parser measured slower (it takes the GIL back
    # after each piece while the parser and the header reads run Python), unlike the response's
    digest = input_hasher()
    early: dict[int, Any] = {}
    bytes_read = _split_parts(stream, boundary, spool, digest, max_bytes, content_length, on_part, early)
    return ParsedBody(spool.parts, digest.hexdigest(), bytes_read, spool, early)


def _split_parts(stream: BinaryIO, boundary: bytes, spool: PartSpool, digest: Any, max_bytes: int,
                 content_length: int | None, on_part: Callable[[Part], Any] | None, early: dict[int, Any]) -> int:
    """Read the body into ``spool``'s parts, feeding their contents to ``digest``; the bytes read."""
    parser = _RelatedParser(boundary, max_header_count=32)
    bytes_read = 0
    current: Part | None = None
    try:
        while content_length is None or bytes_read < content_length:
            want = READ_CHUNK if content_length is None else min(READ_CHUNK, content_length - bytes_read)
            try:
                chunk = stream.read(want)
            except TimeoutError as exc:  # the server gave up on a stalled or too slow sender
                raise RequestTimeout(f"request body too slow after {bytes_read} bytes: {exc}") from exc
            except Exception as exc:  # the client went away mid-body
                raise BadRequest(f"request body is truncated after {bytes_read} bytes") from exc
            if not chunk:
                break
            bytes_read += len(chunk)
            if bytes_read > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            for event in parser.parse(chunk):
                if isinstance(event, multipart_lib.MultipartSegment):
                    current = spool.begin_part(event.headerlist)
                elif event is None:
                    if on_part is not None and current is not None:
                        result = on_part(current)
                        if result is not None:
                            early[current.index] = result
                    current = None
                else:
                    assert current is not None, "the parser sends a part's headers before its content"
                    digest.update(event)
                    spool.append(current, event)
        parser.close()
    except multipart_lib.MultipartError as exc:
        where = f"part {len(spool.parts) - 1}" if current is not None else f"after part {len(spool.parts) - 1}"
        if not spool.parts:
            where = "before the first part"
        reason = str(exc)
        if "nexpected end" in reason or "incomplete" in reason.lower():
            reason = f"body is truncated ({reason}); the closing boundary never came"
        raise BadRequest(f"malformed multipart body at {where}: {reason}") from exc
    if content_length is not None and bytes_read < content_length:
        raise BadRequest(f"request body is truncated: got {bytes_read} of {content_length} bytes")
    return bytes_read


def parts_from_files(json_bytes: bytes, paths: Iterable[Path], spool: PartSpool) -> ParsedBody:
    """Parts (and their hash) of a JSON part and files on disk, as if they had been uploaded."""
    digest = input_hasher()
    total = 0
    sources: list[tuple[list[tuple[str, str]], Iterable[bytes]]] = [
        ([("Content-Type", "application/json")], [json_bytes])]
    sources += [([("Content-Type", "application/dicom"),
                  ("Content-Disposition", f'form-data; name="file"; filename="{path.name}"')], file_chunks(path))
                for path in paths]
    for headers, chunks in sources:
        part = spool.begin_part(headers)
        for chunk in chunks:
            digest.update(chunk)
            spool.append(part, chunk)
            total += len(chunk)
    return ParsedBody(spool.parts, digest.hexdigest(), total, spool)
