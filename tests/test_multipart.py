"""Request parsing (streaming, hashing, spooling, errors) and response encoding."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import pydicom
import pytest

from inference.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from inference.protocol.multipart_request import PartSpool, multipart_boundary, parse_multipart_related
from inference.protocol.multipart_response import ThreadedSHA256, decode_multipart_response, encode_multipart_related


def body_of(parts: list[tuple[list[str], bytes]], boundary: str = "XyZ123") -> bytes:
    out = b""
    for headers, content in parts:
        out += f"--{boundary}\r\n".encode() + "".join(h + "\r\n" for h in headers).encode() + b"\r\n"
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def parse(body: bytes, boundary: bytes = b"XyZ123", budget: int = 1 << 20, **kwargs):
    spool = PartSpool(budget)
    return parse_multipart_related(io.BytesIO(body), boundary, spool=spool,
                                   max_bytes=kwargs.pop("max_bytes", 1 << 30), **kwargs)


class _ChunkedStream(io.RawIOBase):
    """Hands the body out a few bytes at a time, as a slow network would."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def read(self, n: int = -1) -> bytes:
        piece = self.data[self.pos : self.pos + min(n, self.step)]
        self.pos += len(piece)
        return piece


@pytest.mark.parametrize("header", [
    'multipart/related; boundary="XyZ123"',
    "multipart/related; boundary=XyZ123",
    'multipart/related; type="application/dicom"; boundary=XyZ123; charset=utf-8',
    "multipart/form-data; boundary=XyZ123",
    "Multipart/Related; Boundary=XyZ123",
])
def test_boundary_is_read_from_every_accepted_content_type(header):
    assert multipart_boundary(header) == b"XyZ123"


@pytest.mark.parametrize("header", ["application/octet-stream", "text/plain", "", None, "multipart/mixed; boundary=a"])
def test_other_content_types_are_415(header):
    with pytest.raises(UnsupportedMediaType):
        multipart_boundary(header)


def test_missing_boundary_is_400():
    with pytest.raises(BadRequest, match="no boundary"):
        multipart_boundary("multipart/related")


def test_parts_hash_and_headers(study):
    contents = [b'{"studyUID": "1.2"}'] + [p.read_bytes() for p in study]
    parts = [(["Content-Type: text/json", 'Content-Disposition: form-data; name="json"'], contents[0])]
    parts += [([f'Content-Disposition: form-data; name="file"; filename="{p.name}"', "Content-Type: application/dicom"],
               c) for p, c in zip(study, contents[1:], strict=True)]
    parsed = parse(body_of(parts))
    assert [p.read_bytes() for p in parsed.parts] == contents
    assert parsed.input_hash == hashlib.sha256(b"".join(contents)).hexdigest()
    assert parsed.parts[1].filename == study[0].name and parsed.parts[1].content_type == "application/dicom"
    assert parsed.parts[0].content_type == "text/json"
    assert pydicom.dcmread(parsed.parts[3]).InstanceNumber == 3


def test_parts_without_content_disposition_are_accepted():
    parsed = parse(body_of([(["Content-Type: application/json"], b"{}"),
                            (["Content-Type: application/dicom"], b"abc")]))
    assert [p.read_bytes() for p in parsed.parts] == [b"{}", b"abc"]
    assert parsed.parts[1].filename is None


def test_slow_stream_with_boundary_split_across_reads(study):
    contents = [b"{}"] + [p.read_bytes() for p in study[:3]]
    body = body_of([(["Content-Type: application/dicom"], c) for c in contents])
    spool = PartSpool(1 << 20)
    parsed = parse_multipart_related(_ChunkedStream(body, 7), b"XyZ123", spool=spool, max_bytes=1 << 30)
    assert [p.read_bytes() for p in parsed.parts] == contents


def test_parts_spill_to_disk_past_the_memory_budget(study):
    contents = [b"{}"] + [p.read_bytes() for p in study]
    body = body_of([(["Content-Type: application/dicom"], c) for c in contents])
    parsed = parse(body, budget=len(contents[1]) + 10)
    spilled = [p for p in parsed.parts if p._memory is None]
    assert len(spilled) >= len(study) - 1, "parts past the budget must live in the spool file"
    assert [p.read_bytes() for p in parsed.parts] == contents
    ds = pydicom.dcmread(parsed.parts[-1])
    assert ds.pixel_array.shape == (32, 40)
    parsed.spool.close()


def test_part_reads_and_seeks_like_a_file():
    part = parse(body_of([(["Content-Type: application/dicom"], b"0123456789")])).parts[0]
    assert part.read(4) == b"0123" and part.tell() == 4
    part.seek(-2, io.SEEK_END)
    assert part.read() == b"89"
    part.seek(1)
    buffer = bytearray(3)
    assert part.readinto(buffer) == 3 and bytes(buffer) == b"123"


def test_truncated_body_is_400():
    body = body_of([(["Content-Type: application/json"], b"{}"), (["Content-Type: application/dicom"], b"x" * 100)])
    with pytest.raises(BadRequest, match="truncated"):
        parse(body[:-40])


def test_body_shorter_than_content_length_is_400():
    body = body_of([(["Content-Type: application/json"], b"{}")])
    with pytest.raises(BadRequest, match="truncated"):
        parse(body, content_length=len(body) + 10)


def test_garbage_body_is_400_naming_where():
    with pytest.raises(BadRequest, match="malformed multipart body"):
        parse(b"--XyZ123\r\nno colon header line\r\n\r\n{}\r\n--XyZ123--\r\n")


def test_too_large_by_content_length_is_413_before_reading():
    stream = io.BytesIO(b"never read")
    with pytest.raises(PayloadTooLarge):
        parse_multipart_related(stream, b"XyZ123", spool=PartSpool(10), max_bytes=100, content_length=101)
    assert stream.tell() == 0


def test_too_large_while_streaming_without_content_length_is_413():
    body = body_of([(["Content-Type: application/dicom"], b"x" * 5000)])
    with pytest.raises(PayloadTooLarge):
        parse(body, max_bytes=1000)


def test_encoded_response_has_exact_length_hashes_and_closing_delimiter():
    parts = [("application/json", b'{"parts": []}'), ("application/octet-stream", memoryview(b"\x00\x01" * 50))]
    encoded = encode_multipart_related(parts, input_hash="a" * 64, boundary="BOUND")
    body = b"".join(bytes(c) for c in encoded.chunks)
    assert len(body) == encoded.content_length
    assert body.startswith(b"--BOUND\r\n") and body.endswith(b"\r\n--BOUND--")
    assert encoded.content_type == 'multipart/related; boundary="BOUND"'
    decoded = decode_multipart_response(encoded.content_type, body)
    assert [ctype for ctype, _ in decoded] == ["application/json", "application/octet-stream", "text/plain"]
    expected_output = hashlib.sha256(b'{"parts": []}' + b"\x00\x01" * 50).hexdigest()
    assert decoded[2][1] == f"{'a' * 64}:{expected_output}".encode()
    assert len(decoded[2][1]) == 129


# -- properties (hypothesis, fixed seed) --------------------------------------------------------
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CONTENTS = st.lists(st.binary(max_size=300).filter(lambda b: b"--XyZ123" not in b), min_size=1, max_size=6)


@seed(1919)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONTENTS, st.integers(1, 97), st.integers(0, 700))
def test_any_parts_in_any_chunking_and_budget_come_back_whole(contents, step, budget):
    body = body_of([(["Content-Type: application/octet-stream"], c) for c in contents])
    spool = PartSpool(budget)
    try:
        parsed = parse_multipart_related(_ChunkedStream(body, step), b"XyZ123", spool=spool, max_bytes=1 << 20)
        assert [p.read_bytes() for p in parsed.parts] == contents
        assert parsed.input_hash == hashlib.sha256(b"".join(contents)).hexdigest()
        assert parsed.bytes_read == len(body)
    finally:
        spool.close()


@seed(1920)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONTENTS, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=5),
       st.integers(0, 10_000), st.booleans())
def test_damaged_bodies_parse_or_are_a_400(contents, flips, cut, declare_length):
    """Flipped bytes and truncation: parts or a 400/413, never another exception."""
    body = bytearray(body_of([(["Content-Type: application/dicom"], c) for c in contents]))
    for position, value in flips:
        body[position % len(body)] = value
    body = bytes(body[: cut % (len(body) + 1)])
    spool = PartSpool(256)
    try:
        parsed = parse_multipart_related(io.BytesIO(body), b"XyZ123", spool=spool, max_bytes=1 << 20,
                                         content_length=len(body) + (7 if declare_length else 0))
    except (BadRequest, PayloadTooLarge) as exc:
        assert exc.message and "Traceback" not in exc.message
    else:
        assert sum(p.size for p in parsed.parts) <= len(body)
    finally:
        spool.close()


def test_each_part_is_handed_over_whole_as_soon_as_it_ends():
    contents = [b'{"a": 1}', b"x" * 700, b"", b"y" * 50]
    body = body_of([(["Content-Type: application/octet-stream"], c) for c in contents])
    seen = []
    stream = _ChunkedStream(body, 13)
    spool = PartSpool(256)  # the second part spills to disk
    try:
        parse_multipart_related(stream, b"XyZ123", spool=spool, max_bytes=1 << 20,
                                on_part=lambda part: seen.append((part.index, part.read_bytes(), stream.pos)))
    finally:
        spool.close()
    assert [(index, content) for index, content, _ in seen] == list(enumerate(contents))
    assert seen[0][2] < len(body)  # the first part came before the body had all streamed in


def test_the_hashing_thread_gives_hashlibs_digest_and_ends_on_errors():
    digest = ThreadedSHA256()
    for piece in (b"a" * 5000, b"", b"b" * 3):
        digest.update(piece)
    assert digest.hexdigest() == hashlib.sha256(b"a" * 5000 + b"b" * 3).hexdigest()
    before = threading.active_count()
    for _ in range(5):  # truncated bodies: the parse fails, its hashing thread must not linger
        with pytest.raises(BadRequest):
            parse(body_of([(["Content-Type: application/dicom"], b"x" * 100)])[:60])
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_a_response_never_sent_whole_leaves_no_hashing_thread_behind():
    before = threading.active_count()
    for _ in range(5):
        encoded = encode_multipart_related([("application/json", b"{}"), ("application/octet-stream", b"x" * 10)],
                                           input_hash="0" * 64)
        next(encoded.chunks)  # the client went away after the first chunk
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_without_new_threads_the_caller_hashes(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    digest = ThreadedSHA256()
    digest.update(b"abc")
    assert digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()


def test_one_hashing_thread_per_process_others_hash_as_they_feed():
    assert ThreadedSHA256._spare.acquire(timeout=5)  # earlier tests' hashing threads have finished
    ThreadedSHA256._spare.release()
    first, second = ThreadedSHA256(), ThreadedSHA256()
    assert first._thread is not None and second._thread is None  # the second request's cores are busy
    for digest in (first, second):
        digest.update(b"xyz")
    assert first.hexdigest() == second.hexdigest() == hashlib.sha256(b"xyz").hexdigest()
    assert ThreadedSHA256._spare.acquire(timeout=5)  # the thread is free again once it has finished
    ThreadedSHA256._spare.release()
    third = ThreadedSHA256()
    assert third._thread is not None
    third.close()


def test_a_slow_senders_tiny_pieces_are_gathered_not_kept_one_by_one():
    spool = PartSpool(1 << 20)
    part = spool.begin_part([("Content-Type", "application/dicom")])
    content = bytes(range(256)) * 600  # 153,600 bytes, fed one byte at a time
    for i in range(len(content)):
        spool.append(part, content[i : i + 1])
    assert len(part._memory) <= 3  # 64 KiB blocks, not 153,600 objects
    assert part.read_bytes() == content and part.head()[:10] == content[:10]
    spool.close()
