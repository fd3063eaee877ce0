"""Soak: the served gateway under a long mixed load; does it stay correct, and does memory level off?

    python -m bench.soak                       # 10 minutes, 16 clients (what bench/README.md reports)
    python -m bench.soak --minutes 2 --clients 8

Starts the gateway with the shipped ``gunicorn.conf.py`` (mocks enabled, a small in-memory spool
budget, so request parts spill to temp files too) and runs ``--clients`` threads for ``--minutes``, each
picking at random: a valid small-study request (60 %), an invalid one (corrupt DICOM, bad JSON,
unknown command, deeply nested JSON, a header gunicorn refuses: 20 %), an aborted upload (half
the body, then the connection closes: 10 %) or a slow sender (under the minimum upload rate:
10 %). Prints one JSON line: errors on valid requests, p50/p99 latency of valid requests,
answers that were not JSON or were 5xx, and the server's RSS, open descriptors and open spool
files at the start and end, with RSS sampled every 15 s to judge whether it levels off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import requests

from bench.run import Server
from bench.study import cached_study
from inference.protocol.client import (
    build_multipart_request,
    close_request_files,
    decode_response,
    related_content_type,
)

log = logging.getLogger("bench.soak")

COMMAND = "get-probability-mask"
KINDS = (("valid", 0.6), ("invalid", 0.2), ("aborted", 0.1), ("slow", 0.1))


def server_resources(server: Server, spool_dir: Path) -> dict:
    """RSS (MB) and open descriptors of the server's process tree, and open spool files."""
    master = psutil.Process(server.process.pid)
    processes = [master, *master.children(recursive=True)]
    rss = fds = spool = 0
    for process in processes:
        try:
            rss += process.memory_info().rss
            fds += process.num_fds()
            for fd in Path(f"/proc/{process.pid}/fd").iterdir():  # temp files show as "<dir>/#n (deleted)"
                with contextlib.suppress(OSError):
                    spool += os.readlink(fd).startswith(str(spool_dir))
        except (psutil.NoSuchProcess, FileNotFoundError, PermissionError):
            continue
    return {"rss_mb": round(rss / 1e6, 1), "fds": fds, "open_spool_files": int(spool),
            "spool_dir_entries": len(list(spool_dir.iterdir()))}


def multipart_body(files: list[Path], json_input: dict) -> tuple[bytes, str]:
    encoder = build_multipart_request(json_input, files)
    try:
        return encoder.to_string(), related_content_type(encoder)
    finally:
        close_request_files(encoder)


class Soak:
    """The clients, their tallies, and the request kinds they send."""

    def __init__(self, server: Server, files: list[Path], seed: int) -> None:
        self.server = server
        self.host, self.port = server.url.removeprefix("http://").split(":")
        self.port = int(self.port)
        self.valid_body, self.valid_type = multipart_body(files, {"inference_command": COMMAND})
        corrupt = bytearray(files[3].read_bytes())
        corrupt_file = Path(tempfile.mkdtemp(prefix="soak-")) / "corrupt.dcm"
        corrupt_file.write_bytes(bytes(corrupt[: len(corrupt) // 2]))
        self.corrupt_body, self.corrupt_type = multipart_body([*files[:3], corrupt_file],
                                                              {"inference_command": COMMAND})
        self.seed = seed
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.outcomes: Counter = Counter()
        self.problems: list[str] = []
        self.local = threading.local()

    def record(self, kind: str, status: int | str, seconds: float | None = None, problem: str | None = None) -> None:
        with self.lock:
            self.outcomes[f"{kind}:{status}"] += 1
            if seconds is not None:
                self.latencies.append(seconds)
            if problem and len(self.problems) < 20:
                self.problems.append(f"{problem} (session connection idle {self.local.idle:.1f} s before)")

    # -- request kinds -------------------------------------------------------------------
    def valid(self, session: requests.Session, rng: random.Random) -> None:
        started = time.perf_counter()
        try:
            response = session.post(self.server.url + "/", data=self.valid_body,
                                    headers={"Content-Type": self.valid_type}, timeout=120)
            decode_response(response)
        except Exception as exc:  # any failure of a valid request is an error of the server
            self.record("valid", "error", problem=f"valid request failed: {type(exc).__name__}: {exc}"[:300])
            return
        self.record("valid", response.status_code, time.perf_counter() - started)

    def invalid(self, session: requests.Session, rng: random.Random) -> None:
        choice = rng.randrange(5)
        if choice == 4:  # refused by gunicorn's parser: answered by our worker class
            raw = (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")
            self.check_answer("invalid", self.raw_exchange(raw))
            return
        if choice == 0:
            body, ctype = self.corrupt_body, self.corrupt_type
        elif choice == 1:
            body, ctype = b'{"studyPath": ', "application/json"
        elif choice == 2:
            body, ctype = multipart_body([], {"inference_command": "no-such-command"})
        else:
            body, ctype = ("[" * 5000 + "]" * 5000).encode(), "application/json"
        response = session.post(self.server.url + "/", data=body, headers={"Content-Type": ctype}, timeout=120)
        self.check_answer("invalid", (response.status_code, response.headers.get("Content-Type", ""),
                                      response.content))

    def aborted(self, session: requests.Session, rng: random.Random) -> None:
        head = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {self.valid_type}\r\n"
                f"Content-Length: {len(self.valid_body)}\r\n\r\n").encode()
        with socket.create_connection((self.host, self.port), timeout=30) as sock:
            sock.sendall(head + self.valid_body[: rng.randrange(1, len(self.valid_body))])
        self.record("aborted", "sent")

    def slow(self, session: requests.Session, rng: random.Random) -> None:
        """Send the valid body at about 2 KB/s: the server cuts it off with a 408 after its grace time."""
        head = (f"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: {self.valid_type}\r\n"
                f"Content-Length: {len(self.valid_body)}\r\nConnection: close\r\n\r\n").encode()
        with socket.create_connection((self.host, self.port), timeout=60) as sock:
            sock.sendall(head)
            sock.settimeout(0.25)
            for start in range(0, len(self.valid_body), 512):
                try:
                    sock.sendall(self.valid_body[start:start + 512])
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if answer:
                    sock.settimeout(10)
                    self.check_answer("slow", parse_raw(answer + read_rest(sock)))
                    return
            self.record("slow", "no answer", problem="a slow sender got no answer")

    # -- helpers -------------------------------------------------------------------------
    def raw_exchange(self, data: bytes) -> tuple[int, str, bytes]:
        with socket.create_connection((self.host, self.port), timeout=30) as sock:
            sock.sendall(data)
            return parse_raw(read_rest(sock))

    def check_answer(self, kind: str, answer: tuple[int, str, bytes]) -> None:
        status, ctype, body = answer
        problem = None
        if status >= 500 or not ctype.startswith("application/json"):
            problem = f"{kind}: {status} {ctype} {body[:200]!r}"
        else:
            try:
                json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                problem = f"{kind}: {status} answer is not a JSON error: {body[:200]!r}"
        self.record(kind, status, problem=problem)

    def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        session = requests.Session()
        names, weights = zip(*KINDS, strict=True)
        last_session_use = time.monotonic()
        while time.monotonic() < deadline:
            kind = rng.choices(names, weights)[0]
            # how long the session's kept-alive connection sat unused, for the problems list
            self.local.idle = time.monotonic() - last_session_use
            try:
                getattr(self, kind)(session, rng)
            except Exception as exc:  # a client-side failure of an invalid/aborted/slow request
                self.record(kind, "client-error", problem=f"{kind}: {type(exc).__name__}: {exc}"[:300])
            if kind in ("valid", "invalid"):
                last_session_use = time.monotonic()


def read_rest(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def parse_raw(data: bytes) -> tuple[int, str, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
    return int(lines[0].split()[1]), headers.get("content-type", ""), body


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def run(minutes: float, clients: int, seed: int) -> dict:
    files = cached_study("small", (24, 256, 256))
    spool_dir = Path(tempfile.mkdtemp(prefix="soak-spool-"))
    os.environ.update({"INFERENCE_SPOOL_DIR": str(spool_dir), "INFERENCE_SPOOL_MEMORY_BYTES": str(1024 * 1024),
                       "INFERENCE_ENABLE_MOCKS": "1"})
    server = Server("soak")
    try:
        soak = Soak(server, files, seed)
        for _ in range(3):
            soak.valid(requests.Session(), random.Random(0))  # warm every path once
        start = server_resources(server, spool_dir)
        rss_series = [start["rss_mb"]]
        deadline = time.monotonic() + minutes * 60
        threads = [threading.Thread(target=soak.client, args=(i, deadline), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            time.sleep(15)
            rss_series.append(server_resources(server, spool_dir)["rss_mb"])
            log.info("rss %.0f MB, %d valid answered", rss_series[-1], len(soak.latencies))
        time.sleep(2)
        end = server_resources(server, spool_dir)
    finally:
        server.stop()
    valid_total = sum(n for key, n in soak.outcomes.items() if key.startswith("valid:"))
    half = len(rss_series) // 2
    return {
        "minutes": minutes, "clients": clients, "seed": seed,
        "requests": sum(soak.outcomes.values()), "outcomes": dict(sorted(soak.outcomes.items())),
        "valid_requests": valid_total, "valid_errors": soak.outcomes.get("valid:error", 0),
        "valid_p50_s": percentile(soak.latencies, 0.5), "valid_p99_s": percentile(soak.latencies, 0.99),
        "problems": soak.problems, "start": start, "end": end, "rss_mb_every_15s": rss_series,
        "rss_growth_first_half_mb": round(rss_series[half] - rss_series[0], 1),
        "rss_growth_second_half_mb": round(rss_series[-1] - rss_series[half], 1),
        "rss_median_mb": statistics.median(rss_series),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seed", type=int, default=19, help="random seed of the clients' choices (default 19)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    print(json.dumps(run(args.minutes, args.clients, args.seed)))


if __name__ == "__main__":
    main()
