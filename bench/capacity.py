"""Capacity on paper (issue 42): how many workers and API replicas a site needs for N studies an hour at a
given 95th-percentile wait, and how many jobs one Redis carries, from service times measured on this machine.

    python -m bench.capacity measure > capacity.json    # measure (a few minutes; needs redis-server, Study1)
    python -m bench.capacity measure --pacs pacs.json   # reuse an earlier `python -m bench.pacs` JSON line
    python -m bench.capacity table capacity.json        # the docs/kubernetes.md table (Markdown) from them

``measure`` takes, per study (Study1, 120 files), medians of ``--runs`` runs:

- the DICOM node's receive and its sending of the results: ``bench.pacs``'s phases ``transfer_to_node`` and
  ``transfer_out`` (Orthanc routing Study1 to the node as deployed);
- a worker's time on one hippocampus job as the routing rules queue it (SEG and SR; the record's ``started`` to
  ``finished``: reading, the model, writing the outputs) through a real Redis (append-only, fsync at every
  write, as the chart runs it) and ``celery -A worker worker --concurrency 1``, jobs one at a time; and the
  Redis commands one job costs
  (``INFO commandstats`` before and after), with the lease renewals a running job adds;
- what that Redis answers: ``redis-benchmark`` LPUSH and HSET with fsync at every write.

``table`` models the workers as an M/M/c queue (Erlang C: Poisson arrivals, c workers of one job at a time).
Service times of one study type vary little, so real waits are shorter than this (M/D/c): the table errs on
the safe side. The API's replicas are sized the same way for studies sent to the API synchronously (the
gateway runs the model itself: a gunicorn process is busy for the worker's time plus the upload, taken as the
node's receive time), never below two (the PodDisruptionBudget keeps one serving during a drain).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from bench import pacs
from bench.job_backend import ONE_THREAD, CeleryWorker, RedisServer, job_client
from inference.config import Settings

log = logging.getLogger("bench.capacity")

STUDIES = pacs.STUDY1.parent
COMMAND = "get-hippocampus-volume"
#: rows and columns of the table: studies an hour, and the 95th-percentile wait for a worker (seconds)
RATES = (60, 250, 1000, 2000, 4000)
WAITS = (60, 600)
#: a worker pod runs one job at a time (worker.concurrency 1); a gateway replica runs INFERENCE_WORKERS processes
GATEWAY_PROCESSES = 2
#: above this share of its time receiving and sending, one DICOM node is not enough (the table marks it)
NODE_LIMIT = 0.7
#: Redis is kept below this share of its measured write rate
REDIS_HEADROOM = 0.5


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls per command since Redis started (``INFO commandstats``)."""
    return {name.removeprefix("cmdstat_"): int(values["calls"])
            for name, values in client.info("commandstats").items()}


def measure_jobs(runs: int) -> dict:
    """``runs`` hippocampus jobs on Study1, one at a time, through Redis and one celery worker process."""
    work = Path(tempfile.mkdtemp(prefix="capacity-bench-"))
    output = work / "jobs"
    output.mkdir()
    server = RedisServer(work, appendonly=True)
    settings = dataclasses.replace(Settings(), job_backend="celery", broker_url=server.url, data_root=STUDIES,
                                   output_root=output)
    env = {**ONE_THREAD, "INFERENCE_BROKER_URL": server.url, "INFERENCE_DATA_ROOT": str(STUDIES),
           "INFERENCE_OUTPUT_ROOT": str(output), "INFERENCE_JOB_BACKEND": "celery"}
    client, store = job_client(settings)
    statistics_client = redis.Redis.from_url(server.url)
    worker = CeleryWorker("capacity@bench", env, work, ["--concurrency", "1"]).wait_ready()
    try:
        def one_job() -> dict:
            answer = client.post("/job/", json={"job_name": COMMAND, "in_dir": pacs.STUDY1.name,
                                                "dicom_outputs": ["seg", "sr"]})
            if answer.status_code != 201:
                raise RuntimeError(f"submission refused: {answer.get_json()}")
            uid = answer.get_json()["uid"]
            deadline = time.monotonic() + 600
            while (query := client.get(f"/query/{uid}")).status_code == 202:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {uid} not done after 600 s")
                time.sleep(0.1)
            if query.status_code != 200:
                raise RuntimeError(f"job {uid} failed: {query.get_json()}")
            record = store.get(uid)
            return {"run_s": round(record.finished - record.started, 3)}

        one_job()  # warm-up: the pool process loads the model on its first job
        before = commandstats(statistics_client)
        jobs = [one_job() for _ in range(runs)]
        after = commandstats(statistics_client)
    finally:
        worker.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    calls = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    # the polling of GET /query by this client reads records too: reads are counted apart from writes
    writes = sum(count for name, count in calls.items() if name in WRITE_COMMANDS)
    return {"worker_job_s": statistics.median(job["run_s"] for job in jobs),
            "worker_job_runs_s": [job["run_s"] for job in jobs],
            "redis_commands_per_job": round(sum(calls.values()) / runs, 1),
            "redis_writes_per_job": round(writes / runs, 1),
            "redis_calls": calls}


#: commands that change data (reach the append-only file); the rest of what a job costs Redis are reads
WRITE_COMMANDS = {"set", "setex", "del", "unlink", "hset", "hdel", "hincrby", "hmset", "lpush", "rpush", "lrem",
                  "ltrim", "zadd", "zrem", "zremrangebyscore", "sadd", "srem", "expire", "pexpire", "incr",
                  "incrby", "rpoplpush", "brpoplpush", "lmove", "blmove", "rpop", "lpop", "brpop", "blpop",
                  "publish", "multi", "exec", "eval", "evalsha", "persist", "getdel", "setnx", "hsetnx"}


def measure_redis(work: Path) -> dict:
    """LPUSH and HSET per second on a Redis with fsync at every write (redis-benchmark, 4 clients)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"redis_benchmark_skipped": "redis-benchmark missing (Debian's redis-tools)"}
    server = RedisServer(work, appendonly=True)
    try:
        run = subprocess.run([binary, "-p", str(server.port), "-t", "lpush,hset", "-n", "20000", "-c", "4", "--csv"],
                             capture_output=True, text=True, timeout=600, check=True)
    finally:
        server.stop()
    rates = {row[0].strip('"').lower(): float(row[1].strip('"'))
             for row in (line.split(",") for line in run.stdout.splitlines()) if len(row) > 1
             and re.fullmatch(r'"?[\d.]+"?', row[1])}
    return {"redis_writes_per_s": min(rates.values()), "redis_benchmark": rates}


def measure(runs: int, loop: dict | None = None) -> dict:
    """Every measured figure of the model, with the machine's load when measured (``loop``: bench.pacs's, if run)."""
    if not pacs.STUDY1.exists():
        raise SystemExit(f"needs {pacs.STUDY1} (the shared data folder beside the repository)")
    load = os.getloadavg()[0]
    if loop is None:
        log.info("the PACS loop, %d runs (bench.pacs)", runs)
        loop = pacs.measure(runs)
    if "pacs_error" in loop or "pacs_skipped" in loop:
        raise SystemExit(f"bench.pacs: {loop}")
    log.info("%d hippocampus jobs through Redis and one celery worker", runs)
    jobs = measure_jobs(runs)
    with tempfile.TemporaryDirectory(prefix="capacity-redis-") as tmp:
        log.info("redis-benchmark with fsync at every write")
        writes = measure_redis(Path(tmp))
    return {"node_receive_s": loop["pacs_transfer_to_node_s"], "node_send_s": loop["pacs_transfer_out_s"],
            "pacs_inference_s": loop["pacs_inference_s"], **jobs, **writes, "runs": runs,
            "lease_renewal_every_s": Settings().job_lease_seconds / 4, "cpus": os.cpu_count(),
            "load_avg_1m_before": round(load, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits (Erlang C) with ``servers`` servers and ``offered`` Erlangs (< servers)."""
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / (servers - offered)  # a^c / c! * c / (c - a)
    return last / (total + last)


def p95_wait(servers: int, rate: float, service: float) -> float:
    """95th percentile of the wait before service in M/M/c (0 when 95 % of arrivals do not wait); inf if overloaded."""
    offered = rate * service
    if offered >= servers:
        return math.inf
    waiting = erlang_c(servers, offered)
    if waiting <= 0.05:
        return 0.0
    return math.log(waiting / 0.05) / (servers / service - rate)


def servers_needed(studies_per_hour: float, service: float, wait: float, minimum: int = 1) -> int:
    """Fewest servers whose 95th-percentile wait is at most ``wait`` seconds."""
    rate = studies_per_hour / 3600
    servers = max(minimum, math.ceil(rate * service) or 1)
    while p95_wait(servers, rate, service) > wait:
        servers += 1
    return servers


def table(figures: dict) -> str:
    """The Markdown table of docs/kubernetes.md."""
    worker = figures["worker_job_s"]
    api = worker + figures["node_receive_s"]
    node_load = figures["node_receive_s"] + figures["node_send_s"]
    renewals = worker / figures["lease_renewal_every_s"]
    writes_per_job = figures["redis_writes_per_job"] + renewals
    redis_jobs_per_hour = figures["redis_writes_per_s"] * REDIS_HEADROOM * 3600 / writes_per_job
    lines = ["| studies / hour | node busy | workers, p95 wait <= " + " s | workers, p95 wait <= ".join(map(str, WAITS))
             + " s | API replicas (synchronous, p95 <= 60 s) | Redis busy |",
             "| ---: | ---: |" + " ---: |" * len(WAITS) + " ---: | ---: |"]
    for rate in RATES:
        workers = [servers_needed(rate, worker, wait) for wait in WAITS]
        processes = servers_needed(rate, api, 60)
        replicas = max(2, math.ceil(processes / GATEWAY_PROCESSES))
        redis_busy = rate * writes_per_job / 3600 / figures["redis_writes_per_s"]
        busy = rate * node_load / 3600
        lines.append(f"| {rate:,} | {busy:.0%}{' (a second node)' if busy > NODE_LIMIT else ''} | "
                     + " | ".join(map(str, workers))
                     + f" | {replicas} | {redis_busy:.2%} |")
    lines += ["", (
        f"Measured here (medians of {figures['runs']} runs, {figures['cpus']} shared CPUs, load average "
        f"{figures['load_avg_1m_before']} before and {figures['load_avg_1m_after']} after): a worker's hippocampus "
        f"job {worker:.2f} s (Study1 with SEG and SR; runs {figures['worker_job_runs_s']}), the node's receive "
        f"{figures['node_receive_s']:.2f} s and sending {figures['node_send_s']:.2f} s, "
        f"{figures['redis_writes_per_job']:.0f} Redis writes and {figures['redis_commands_per_job']:.0f} commands "
        f"per job (plus a lease renewal every {figures['lease_renewal_every_s']:.0f} s of a running job), Redis "
        f"{figures['redis_writes_per_s']:,.0f} fsynced writes/s: one Redis carries about "
        f"{redis_jobs_per_hour:,.0f} jobs an hour at half that rate.")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    measuring = commands.add_parser("measure", help="measure the service times (one JSON line on stdout)")
    measuring.add_argument("--runs", type=int, default=3, help="runs of each measurement (default %(default)s)")
    measuring.add_argument("--pacs", type=Path, help="the JSON line of an earlier `python -m bench.pacs` (not rerun)")
    tabling = commands.add_parser("table", help="the capacity table from measured figures")
    tabling.add_argument("figures", type=Path, help="the JSON line `measure` printed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if args.command == "measure":
        loop = json.loads(args.pacs.read_text(encoding="utf-8")) if args.pacs else None
        print(json.dumps(measure(args.runs, loop)), flush=True)
    else:
        print(table(json.loads(args.figures.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
