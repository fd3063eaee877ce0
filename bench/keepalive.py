"""Idle keep-alive connections (issue 27): are they kept past common idle timeouts, and do they cost threads?

    python -m bench.keepalive                  # 200 idle connections, reused after 65 s; one JSON line on stdout
    python -m bench.keepalive --connections 50 --idle 10

Starts the gateway with the shipped ``gunicorn.conf.py`` (2 workers x 4 request threads), measures
the latency of ``GET /models`` from a fresh client (30 requests one after the other), opens
``--connections`` keep-alive connections that each make one request and then sit idle, measures
the same latency again while they sit there (request threads are not held by idle connections:
gthread parks them in its poller), and after ``--idle`` seconds sends a second request on every
idle connection: each must be answered on the same connection (none closed, none reset).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import time

import requests

from bench.run import Server

log = logging.getLogger("bench.keepalive")

REQUEST = b"GET /models HTTP/1.1\r\nHost: bench\r\n\r\n"


def read_response(sock: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length from ``sock``; its status (0: the server closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return 0
        body += chunk
    return int(lines[0].split()[1])


def latencies_ms(url: str, count: int = 30) -> list[float]:
    """``count`` sequential ``GET /models`` from a fresh session; milliseconds each."""
    session = requests.Session()
    out = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(f"{url}/models", timeout=30).raise_for_status()
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_ms": round(statistics.median(ordered), 1), "max_ms": round(ordered[-1], 1)}


def run(connections: int, idle: float) -> dict:
    server = Server("keepalive")
    try:
        port = int(server.url.rsplit(":", 1)[1])
        latencies_ms(server.url, 5)  # warm-up
        before = summary(latencies_ms(server.url))
        socks = []
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(REQUEST)
            if read_response(sock) != 200:
                raise RuntimeError("a first request on a keep-alive connection failed")
            socks.append(sock)
        opened = time.monotonic()
        log.info("%d connections idle; measuring meanwhile", connections)
        during = summary(latencies_ms(server.url))
        time.sleep(max(0.0, idle - (time.monotonic() - opened)))
        reused = closed = reset = 0
        for sock in socks:
            try:
                sock.sendall(REQUEST)
                status = read_response(sock)
            except (ConnectionResetError, BrokenPipeError):
                reset += 1
                continue
            if status == 200:
                reused += 1
            else:
                closed += 1
        idle_seconds = round(time.monotonic() - opened, 1)
        for sock in socks:
            sock.close()
    finally:
        server.stop()
    return {"idle_connections": connections, "idle_s": idle_seconds,
            "latency_no_idle": before, f"latency_with_{connections}_idle": during,
            "reused_after_idle": reused, "closed_by_server": closed, "reset": reset}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.keepalive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--idle", type=float, default=65.0, help="seconds the connections sit idle (default 65)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    print(json.dumps(run(args.connections, args.idle)))


if __name__ == "__main__":
    main()
