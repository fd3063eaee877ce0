"""Benchmark of the celery job backend: blur jobs on 1 and 2 worker processes, against the local backend.

    python -m bench.job_backend            # 8 blur jobs on a 128 x 256 x 256 study; one JSON line on stdout
    python -m bench.job_backend --quick    # 4 jobs on 64 x 256 x 256

A real redis-server (free port, no persistence) and ``celery -A worker worker --concurrency N``
(prefork, one torch thread per process), fed by an in-process gateway with the celery backend;
the local backend runs the same jobs on its one-job pool in a child process of this one with
the same one-thread environment. Times come from the job records (``started``, ``finished``), so polling does
not blur them. Figures:

- ``throughput_ratio``: jobs/s with 2 worker processes over jobs/s with 1 (target >= 1.7);
- ``submit_to_start_ms``: median from ``POST /job/`` to the record's ``started``, each job
  submitted to an idle worker (target <= 50 ms);
- ``overhead_per_job``: celery (1 process) wall time per job over the local backend's, minus 1
  (target <= 0.10).

    python -m bench.job_backend --recovery 10   # ten worker kills: how soon their job runs again

Recovery (issue 27): two workers, a blur job at a time with the shipped time limit (900 s) and
visibility timeout (1,200 s); once the job runs, its worker and pool process get SIGKILL (a machine
that died). ``restart_s`` is from the kill to the second attempt's start in the job record (the
lease, ``INFERENCE_JOB_LEASE_SECONDS``, default 20, running out, then a reaper's look); each job
must then complete with 2 attempts and whole output. A fresh worker replaces the dead one between kills.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from bench.study import CACHE_DIR, cached_study
from inference.config import PROJECT_ROOT, Settings

log = logging.getLogger("bench.celery")

SHAPE, QUICK_SHAPE = (128, 256, 256), (64, 256, 256)
LATENCY_SHAPE = (8, 64, 64)  # dispatch does not depend on the study: small, so the latency phase is quick
TARGETS = {"throughput_ratio": (">=", 1.7), "submit_to_start_ms": ("<=", 50.0), "overhead_per_job": ("<=", 0.10)}
#: Seconds between two /query calls: figures come from the records, so polling need not be fast, and
#: in the local backend's process it competes with the jobs for the interpreter.
POLL_S = 0.1
#: One compute thread per process, for the workers and the local pool alike.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_redis(client: redis.Redis, process: subprocess.Popen, what: str, timeout: float = 10) -> None:
    """Return once ``client``'s server answers a PING; a RuntimeError naming ``what`` if ``process`` exits or
    ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


class RedisServer:
    """A redis-server on a free loopback port, in a subprocess: without persistence, or with its append-only
    file in ``log_dir``, fsynced at every write (``appendonly``, as the compose file runs it; a restart on
    the same port and folder reloads it)."""

    def __init__(self, log_dir: Path, port: int | None = None, *, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed: apt-get install -y redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = open(Path(log_dir) / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if appendonly else "no", "--appendfsync", "always",
             "--dir", str(log_dir)], stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_redis(redis.Redis.from_url(self.url), self.process, f"redis-server on port {self.port}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()

    def crash(self) -> None:
        """SIGKILL: Redis gone without writing anything more (a crash, a lost machine)."""
        self.process.kill()
        self.process.wait(10)
        self._log.close()


class CeleryWorker:
    """``celery -A worker worker -n NODE`` in its own process group, with ``env`` on top of this process's."""

    def __init__(self, node: str, env: dict[str, str], log_dir: Path, args: Sequence[str] = ()) -> None:
        self.name = node
        self.log_path = Path(log_dir) / f"worker-{node.partition('@')[0]}.log"
        self._log = open(self.log_path, "wb")
        command = [sys.executable, "-m", "celery", "-A", "worker", "worker", "-n", node,
                   "--without-mingle", "--without-gossip", *args]
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env={**os.environ, **env}, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> CeleryWorker:
        deadline = time.monotonic() + timeout
        while f"{self.name} ready." not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once: a machine that died."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        """SIGTERM (a warm shutdown: the running job finishes), SIGKILL after a minute."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def job_client(settings: Settings):
    """An in-process gateway serving the job routes with ``settings``: its test client and its store."""
    from gateway import Gateway
    from inference.jobs.api import add_job_routes
    from inference.pipeline.pipeline import Pipeline
    from server import served_commands

    pipeline = Pipeline(settings, commands=served_commands(settings))
    app = Gateway(__name__, pipeline=pipeline)
    store, _runner = add_job_routes(app, pipeline)
    return app.test_client(), store


def run_jobs(client, store, in_dir: str, count: int, *, one_at_a_time: bool = False) -> list[dict]:
    """Submit ``count`` blur jobs (all at once, or each after the previous finished); their timings."""
    submitted: dict[str, float] = {}

    def wait(uids: list[str]) -> None:
        deadline = time.monotonic() + 1800
        for uid in uids:
            while (response := client.get(f"/query/{uid}")).status_code == 202:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {uid} still {response.get_json()['msg']} after 30 minutes")
                time.sleep(POLL_S)
            if response.status_code != 200:
                raise RuntimeError(f"job {uid} failed: {response.get_json()}")

    for _ in range(count):
        now = time.time()
        response = client.post("/job/", json={"job_name": "3dblur", "in_dir": in_dir, "sigma_mm": 2.0})
        if response.status_code != 201:
            raise RuntimeError(f"submission refused: {response.get_json()}")
        submitted[response.get_json()["uid"]] = now
        if one_at_a_time:
            wait([response.get_json()["uid"]])
    wait(list(submitted))
    jobs = []
    for uid, at in submitted.items():
        record = store.get(uid)
        jobs.append({"submitted": at, "started": record.started, "finished": record.finished,
                     "attempts": record.attempts, "output_dir": record.output_dir})
    return jobs


def summary(jobs: list[dict]) -> dict:
    """Wall time (first submission to last finish), jobs per second, median run time and submit-to-start."""
    wall = max(j["finished"] for j in jobs) - min(j["submitted"] for j in jobs)
    return {"wall_s": round(wall, 2), "jobs_per_s": round(len(jobs) / wall, 4),
            "median_run_s": round(statistics.median(j["finished"] - j["started"] for j in jobs), 3),
            "median_submit_to_start_ms": round(
                1000 * statistics.median(j["started"] - j["submitted"] for j in jobs), 1),
            "run_s": [round(j["finished"] - j["started"], 2) for j in jobs]}


def clear_outputs(output: Path) -> None:
    for child in output.iterdir():
        if child.is_dir():
            shutil.rmtree(child)


def measure_local(settings: Settings, name: str, count: int) -> dict:
    """The local backend's figures, from a child process with one compute thread (``--local-phase``)."""
    command = [sys.executable, "-m", "bench.job_backend", "--local-phase", name, str(count),
               str(settings.output_root)]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env={**os.environ, **ONE_THREAD}, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the local phase failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def local_phase(name: str, count: int, output: Path) -> dict:
    """In the child: ``count`` jobs at once, then the latency jobs one at a time, on the local backend."""
    settings = dataclasses.replace(Settings(), data_root=CACHE_DIR, output_root=output, job_workers=1)
    client, store = job_client(settings)
    run_jobs(client, store, "jobs-latency", 1)  # warm-up: first-call costs out of the figures
    return {"throughput": summary(run_jobs(client, store, name, count)),
            "latency": summary(run_jobs(client, store, "jobs-latency", 5, one_at_a_time=True))}


def measure_celery_jobs(quick: bool = False, jobs: int | None = None) -> dict:
    """The section: local backend, then celery with 1 and 2 worker processes, on the same study."""
    shape = QUICK_SHAPE if quick else SHAPE
    count = jobs or (4 if quick else 8)
    name = "jobs-" + "x".join(map(str, shape))
    cached_study(name, shape)
    cached_study("jobs-latency", LATENCY_SHAPE)
    work = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    output = work / "jobs"
    output.mkdir()
    base = dataclasses.replace(Settings(), data_root=CACHE_DIR, output_root=output, job_workers=1,
                               job_time_limit=1800, broker_visibility_timeout=2400)
    results: dict = {"shape": list(shape), "jobs": count, "load_avg_1m": round(os.getloadavg()[0], 2)}
    try:
        log.info("local backend: %d jobs, one thread", count)
        local_phase_results = measure_local(base, name, count)
        local, latency_local = local_phase_results["throughput"], local_phase_results["latency"]
        clear_outputs(output)

        server = RedisServer(work)
        settings = dataclasses.replace(base, job_backend="celery", broker_url=server.url)
        env = {**ONE_THREAD, "INFERENCE_BROKER_URL": server.url, "INFERENCE_DATA_ROOT": str(CACHE_DIR),
               "INFERENCE_OUTPUT_ROOT": str(output), "INFERENCE_JOB_TIME_LIMIT": str(settings.job_time_limit),
               "INFERENCE_BROKER_VISIBILITY_TIMEOUT": str(settings.broker_visibility_timeout)}
        client, store = job_client(settings)
        celery: dict = {}
        try:
            for processes in (1, 2):
                worker = CeleryWorker(f"p{processes}@bench", env, work, ["--concurrency", str(processes)]).wait_ready()
                try:
                    run_jobs(client, store, "jobs-latency", processes)  # warm-up, as for the local backend
                    log.info("celery, %d worker process(es): %d jobs", processes, count)
                    celery[processes] = summary(run_jobs(client, store, name, count))
                    if processes == 1:
                        celery["latency"] = summary(run_jobs(client, store, "jobs-latency", 7, one_at_a_time=True))
                finally:
                    worker.stop()
                clear_outputs(output)
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.update({
        "local_1_thread": local, "celery_1_process": celery[1], "celery_2_processes": celery[2],
        "throughput_ratio": round(celery[2]["jobs_per_s"] / celery[1]["jobs_per_s"], 3),
        "submit_to_start_ms": celery["latency"]["median_submit_to_start_ms"],
        "local_submit_to_start_ms": latency_local["median_submit_to_start_ms"],
        "overhead_per_job": round(celery[1]["wall_s"] / local["wall_s"] - 1, 3),
    })
    results["targets_met"] = {f"{key}{op}{bound}": (results[key] >= bound if op == ">=" else results[key] <= bound)
                              for key, (op, bound) in TARGETS.items()}
    return results


def measure_recovery(kills: int, lease: int) -> dict:
    """Kill the worker running a job ``kills`` times; seconds from each kill to the job's next start."""
    cached_study("jobs-recovery", SHAPE)
    work = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    output = work / "jobs"
    output.mkdir()
    server = RedisServer(work)
    settings = dataclasses.replace(Settings(), job_backend="celery", broker_url=server.url, data_root=CACHE_DIR,
                                   output_root=output, job_lease_seconds=lease)
    env = {**ONE_THREAD, "INFERENCE_BROKER_URL": server.url, "INFERENCE_DATA_ROOT": str(CACHE_DIR),
           "INFERENCE_OUTPUT_ROOT": str(output), "INFERENCE_JOB_LEASE_SECONDS": str(lease),
           "INFERENCE_JOB_TIME_LIMIT": str(settings.job_time_limit),
           "INFERENCE_BROKER_VISIBILITY_TIMEOUT": str(settings.broker_visibility_timeout)}
    workers: list[CeleryWorker] = []

    def start_worker() -> CeleryWorker:
        worker = CeleryWorker(f"r{len(workers)}@bench", env, work, ["--concurrency", "1", "-Q", "cpu"])
        workers.append(worker)
        return worker.wait_ready()

    rounds = []
    try:
        client, store = job_client(settings)
        alive = [start_worker(), start_worker()]
        for index in range(kills):
            uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "jobs-recovery"}).get_json()["uid"]
            while (job := store.get(uid)).status != "running":
                time.sleep(0.01)
            victim = next(w for w in alive if job.worker.startswith(w.name + "/"))
            victim.kill()
            killed = time.time()
            alive.remove(victim)
            while (job := store.get(uid)).attempts < 2:
                if time.time() - killed > 300:
                    raise TimeoutError(f"kill {index + 1}: job {uid} not started again in 300 s")
                time.sleep(0.05)
            while (job := store.get(uid)).status == "running":
                time.sleep(0.1)
            response_json = json.loads((output / uid / "response.json").read_text())
            whole = all((output / uid / part["file"]).is_file() for part in response_json["parts"])
            rounds.append({"restart_s": round(job.started - killed, 2), "status": job.status,
                           "attempts": job.attempts, "parts": len(response_json["parts"]), "whole": whole})
            log.info("kill %d: job started again after %.1f s, %s", index + 1, job.started - killed, job.status)
            alive.append(start_worker())
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    restarts = [r["restart_s"] for r in rounds]
    return {"kills": kills, "lease_s": lease, "time_limit_s": settings.job_time_limit,
            "visibility_timeout_s": settings.broker_visibility_timeout, "restart_s": restarts,
            "median_restart_s": statistics.median(restarts), "max_restart_s": max(restarts),
            "all_completed_with_2_attempts_and_whole": all(
                r["status"] == "completed" and r["attempts"] == 2 and r["whole"] for r in rounds),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.job_backend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 jobs on a 64 x 256 x 256 study")
    parser.add_argument("--jobs", type=int, help="number of jobs per run (default 8, 4 with --quick)")
    parser.add_argument("--recovery", type=int, metavar="KILLS", help="measure recovery from KILLS worker kills")
    parser.add_argument("--lease", type=int, default=Settings().job_lease_seconds,
                        help="INFERENCE_JOB_LEASE_SECONDS for --recovery (default %(default)s)")
    parser.add_argument("--local-phase", nargs=3, metavar=("STUDY", "COUNT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", stream=sys.stderr)
    if args.local_phase:
        name, count, output = args.local_phase
        print(json.dumps(local_phase(name, int(count), Path(output))), flush=True)
        return
    if args.recovery:
        print(json.dumps(measure_recovery(args.recovery, args.lease)), flush=True)
        return
    print(json.dumps(measure_celery_jobs(args.quick, args.jobs)), flush=True)


if __name__ == "__main__":
    main()
