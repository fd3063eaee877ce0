"""The benchmark: the gateway under gunicorn against the floor, printed as one JSON line.

    python -m bench.run                 # everything (what ``make bench`` runs)
    python -m bench.run --quick         # fewer repeats: a smoke run
    python -m bench.run --only small    # some sections: large, small, blur, hippocampus, radiomics, celery, pacs,
                                        # header
                                        # (comma-separated)

Both servers run with the shipped ``gunicorn.conf.py`` (the floor with its app swapped) on
free ports, and both are driven by the same client code, so their ratio is the gateway's own
cost. Progress goes to stderr; stdout gets exactly one JSON line. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.floor import SIZE_HEADER
from bench.pacs import measure as measure_pacs
from bench.study import CACHE_DIR, cached_study
from inference.config import PROJECT_ROOT, get_settings
from inference.protocol.client import (
    InferenceRequestError,
    InferenceResponse,
    build_multipart_request,
    decode_response,
    related_content_type,
)

log = logging.getLogger("bench")

MB = 1e6
MASK_COMMAND = "get-probability-mask"
HIPPOCAMPUS_COMMAND = "get-hippocampus-volume"
STUDY1 = PROJECT_ROOT.parent / "shared" / "data" / "studies" / "Study1"
#: The gateway serving only the 3D mask handler on ``/`` (``mock_server.py -s3D`` under gunicorn).
MASK_ONLY_APP = f"server:create_app({MASK_COMMAND!r})"
SECTIONS = ("large", "small", "blur", "hippocampus", "radiomics", "celery", "pacs", "header")
#: Issue 17's targets (they tighten issue 2's); ``blur_ratio`` is "keep" (0.13 when set), with room for noise.
TARGETS = {"small_seq_ratio": (">=", 0.9), "small_8_ratio": (">=", 0.9), "large_ratio": ("<=", 1.15),
           "rss_to_payload": ("<=", 1.0), "hippocampus_model_ratio": ("<=", 1.5),
           "hippocampus_fast_model_s": ("<=", 0.08), "hippocampus_roundtrip_s": ("<=", 0.6),
           "pacs_over_stable_age_s": ("<=", 6.0), "blur_ratio": ("<=", 0.2)}
#: Issue 28's table, in its order: (figure, result key, how the figure is shown from the results).
ISSUE_TABLE = (
    ("Study1 round trip, default version", "hippocampus_roundtrip_s",
     lambda r: f"{r['hippocampus_roundtrip_s']} s (1.0-fast {r.get('hippocampus_fast_roundtrip_s', '-')} s)"),
    ("model time on Study1's crop, default / 1.0-fast", "hippocampus_model_ratio",
     lambda r: f"{r['hippocampus_model_s']} s / {r['hippocampus_fast_model_s']} s = "
               f"{r['hippocampus_model_ratio']} x"),
    ("PACS loop, first C-STORE -> SEG, SR, SC stored back", "pacs_over_stable_age_s",
     lambda r: f"{r['pacs_total_s']} s = StableAge {r['pacs_orthanc_stable_age_s']} s + "
               f"{r['pacs_over_stable_age_s']} s"),
    ("small study requests/s, ours / floor, 1 client", "small_seq_ratio",
     lambda r: f"{r['small_seq_ratio']} ({r['small_rps_seq']} vs {r['floor_small_rps_seq']} req/s)"),
    ("small study requests/s, ours / floor, 8 clients", "small_8_ratio",
     lambda r: f"{r['small_8_ratio']} ({r['small_rps_8']} vs {r['floor_small_rps_8']} req/s)"),
    ("large study round trip, ours / floor", "large_ratio",
     lambda r: f"{r['large_ratio']} ({r['large_roundtrip_s']} s vs {r['floor_large_roundtrip_s']} s)"),
)
#: Small-study requests alternate between ours and the floor in this many batches (same load for both).
SMALL_ROUNDS = 5
#: The registry's fast hippocampus version (models/manifest.yaml): member 0 alone, no mirrored pass.
FAST_HIPPOCAMPUS_VERSION = "1.0-fast"


# -- servers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerNotReady(RuntimeError):
    """A server that exited, reported a failed warm-up, or never said READY."""


class Server:
    """gunicorn with the shipped config (``app`` overrides its ``wsgi_app``), on a free local port."""

    def __init__(self, name: str, app: str | None = None, ready_timeout: float = 300) -> None:
        self.name = name
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # the mask workload is the 3D mock, which production serves only when mocks are enabled
        env = {**os.environ, "INFERENCE_HOST": "127.0.0.1", "INFERENCE_PORT": str(port), "INFERENCE_API_TOKEN": "",
               "INFERENCE_ENABLE_MOCKS": "1"}
        command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *([app] if app else [])]
        log_dir = CACHE_DIR / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerNotReady(f"{self.name} server exited with {self.process.returncode}; "
                                     f"see {self.log_path}")
            try:
                status = requests.get(f"{self.url}/healthcheck", timeout=2).text
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                status = ""
            if status == "READY":
                return
            if status.startswith("FAILED"):
                self.stop()
                raise ServerNotReady(f"{self.name} server: {status}")
            time.sleep(0.2)
        self.stop()
        raise ServerNotReady(f"{self.name} server not READY after {timeout:.0f}s; see {self.log_path}")

    def tree_rss(self) -> int:
        """Resident memory of the master and all its workers, in bytes."""
        import psutil  # here, not at the top: --help works with the runtime's packages alone

        try:
            master = psutil.Process(self.process.pid)
            processes = [master, *master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def commands(self) -> list[str]:
        """Inference commands the server lists on ``GET /models``."""
        response = requests.get(f"{self.url}/models", timeout=10)
        response.raise_for_status()
        return [m["inference_command"] for m in response.json()["models"]]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # gunicorn's master stops its workers on SIGTERM
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class PeakSampler:
    """Samples each server's process-tree RSS every ``interval`` seconds in a thread; keeps the peaks."""

    def __init__(self, servers: Sequence[Server], interval: float = 0.02) -> None:
        self.servers, self.interval = list(servers), interval
        self.peaks = {s.name: 0 for s in self.servers}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for server in self.servers:
                self.peaks[server.name] = max(self.peaks[server.name], server.tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def idle_rss(server: Server, samples: int = 5) -> int:
    """Median tree RSS of a server at rest."""
    time.sleep(0.5)
    values = []
    for _ in range(samples):
        values.append(server.tree_rss())
        time.sleep(0.05)
    return int(statistics.median(values))


# -- client ----------------------------------------------------------------------------------
def post_study(url: str, command: str, files: Sequence[Path], floor_bytes: int | None = None,
               **request_json) -> InferenceResponse:
    """One request as ``inference.protocol.client.send_inference_request`` sends it.

    The floor gets its response size.
    """
    encoder = build_multipart_request({"inference_command": command, **request_json}, files)
    headers = {"Content-Type": related_content_type(encoder)}
    if floor_bytes is not None:
        headers[SIZE_HEADER] = str(floor_bytes)
    response = requests.post(url, data=encoder, headers=headers, timeout=900)
    result = decode_response(response)
    result.request_bytes = encoder.len
    return result


def timed(call: Callable[[], InferenceResponse]) -> tuple[float, InferenceResponse]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def requests_per_second(call: Callable[[], object], total: int, clients: int) -> float:
    """``total`` calls spread over ``clients`` threads; completed calls per second of wall time."""
    started = time.perf_counter()
    if clients == 1:
        for _ in range(total):
            call()
    else:
        with ThreadPoolExecutor(clients) as pool:
            for future in [pool.submit(call) for _ in range(total)]:
                future.result()
    return total / (time.perf_counter() - started)


def interleaved_rps(calls: dict[str, Callable[[], object]], total: int, clients: int, rounds: int) -> dict[str, float]:
    """Requests/s of each call, measured in ``rounds`` alternating batches so both see the same machine load."""
    seconds = dict.fromkeys(calls, 0.0)
    batch = max(1, total // rounds)
    for _ in range(rounds):
        for name, call in calls.items():
            seconds[name] += batch / requests_per_second(call, batch, clients)
    return {name: batch * rounds / spent for name, spent in seconds.items()}


def warm_up(server: Server, files: Sequence[Path], floor_bytes: int | None = None) -> None:
    """A few concurrent small requests, so every worker has imported and allocated what it needs."""
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(post_study, server.url, MASK_COMMAND, files, floor_bytes) for _ in range(8)]:
            future.result()


# -- sections --------------------------------------------------------------------------------
def measure_large(ours: Server, floor: Server, repeats: int) -> dict:
    """Large-study round trips (interleaved with the floor's) and both servers' peak RSS above idle."""
    files = cached_study("large")
    idle = {s.name: idle_rss(s) for s in (ours, floor)}
    times: dict[str, list[float]] = {"ours": [], "floor": []}
    response_bytes = None
    with PeakSampler([ours, floor]) as sampler:
        for i in range(repeats):
            seconds, result = timed(lambda: post_study(ours.url, MASK_COMMAND, files))
            response_bytes = response_bytes or result.response_bytes
            times["ours"].append(seconds)
            seconds, _ = timed(lambda size=response_bytes: post_study(floor.url, MASK_COMMAND, files, size))
            times["floor"].append(seconds)
            log.info("large %d/%d: ours %.2fs, floor %.2fs", i + 1, repeats, times["ours"][-1], times["floor"][-1])
    payload = result.request_bytes
    ours_s, floor_s = statistics.median(times["ours"]), statistics.median(times["floor"])
    peak = (sampler.peaks["ours"] - idle["ours"]) / MB
    return {
        "large_roundtrip_s": round(ours_s, 3),
        "floor_large_roundtrip_s": round(floor_s, 3),
        "large_ratio": round(ours_s / floor_s, 3),
        "large_roundtrips_s": [round(t, 2) for t in times["ours"]],
        "floor_large_roundtrips_s": [round(t, 2) for t in times["floor"]],
        "idle_rss_mb": round(idle["ours"] / MB, 1),
        "peak_rss_above_idle_mb": round(peak, 1),
        "floor_peak_rss_above_idle_mb": round((sampler.peaks["floor"] - idle["floor"]) / MB, 1),
        "payload_mb": round(payload / MB, 1),
        "response_mb": round(response_bytes / MB, 1),
        "rss_to_payload": round(peak * MB / payload, 3),
    }


def measure_small(ours: Server, floor: Server, sequential: int, concurrent: int, clients: int = 8) -> dict:
    """Small-study requests/s, one client then ``clients`` concurrent clients, for both servers."""
    files = cached_study("small")
    small_bytes = post_study(ours.url, MASK_COMMAND, files).response_bytes
    out = {}
    calls = {"ours": lambda: post_study(ours.url, MASK_COMMAND, files),
             "floor": lambda: post_study(floor.url, MASK_COMMAND, files, small_bytes)}
    for key, total, n_clients in (("seq", sequential, 1), (str(clients), concurrent, clients)):
        rps = interleaved_rps(calls, total, n_clients, rounds=SMALL_ROUNDS)
        ours_rps, floor_rps = rps["ours"], rps["floor"]
        log.info("small, %d client(s): ours %.1f/s, floor %.1f/s", n_clients, ours_rps, floor_rps)
        out[f"small_rps_{key}"] = round(ours_rps, 2)
        out[f"floor_small_rps_{key}"] = round(floor_rps, 2)
        out[f"small_{key}_ratio"] = round(ours_rps / floor_rps, 3)
    return out


def measure_blur(repeats: int) -> dict:
    """The blur handler's own section (``bench/blur.py``)."""
    from bench.blur import measure_blur as blur_section

    blur = blur_section(repeats=repeats)
    return {"blur": blur, "blur_ratio": blur["ratio"]}


def measure_celery(quick: bool) -> dict:
    """The celery job backend's section (``bench/job_backend.py``); skipped without redis-server."""
    if shutil.which("redis-server") is None:
        return {"celery_jobs_skipped": "redis-server is not installed (apt-get install -y redis-server)"}
    from bench.job_backend import measure_celery_jobs

    return {"celery_jobs": measure_celery_jobs(quick)}


def measure_radiomics(ours: Server, repeats: int) -> dict:
    """The Radiomics door's section (``bench/radiomics.py``): conversions; Study1's crop against the Arterys door."""
    from bench.radiomics import measure_conversions, measure_roundtrip

    return {"radiomics_conversions": measure_conversions(repeats), **measure_roundtrip(ours.url, repeats)}


def measure_header(repeats: int) -> dict:
    """Header reading per file (``bench/dicom_header.py``): the fast reader against pydicom's partial reads."""
    from bench.dicom_header import measure_headers

    return measure_headers(repeats)


def measure_hippocampus(ours: Server, repeats: int) -> dict:
    """Study1 round trip over HTTP, and the same study through the pipeline in-process.

    The in-process row runs the one pipeline (``inference.pipeline.pipeline``) exactly as every front door does:
    series selection, orientation, the model, the report. ``hippocampus_model_s`` is the handler's
    own ``inference_seconds`` (reorientation + model on the crop), ``hippocampus_pipeline_s`` the whole run.
    """
    if not STUDY1.is_dir():
        return {"hippocampus_skipped": "needs ../shared/data/studies/Study1 (absent on this machine)"}
    from handlers import load_handlers
    from inference.dicom.files import dicom_files_in
    from inference.pipeline.pipeline import Pipeline

    out: dict = {}
    files = dicom_files_in(STUDY1)
    if HIPPOCAMPUS_COMMAND in ours.commands():
        post_study(ours.url, HIPPOCAMPUS_COMMAND, files)  # warm-up, not counted
        times = [timed(lambda: post_study(ours.url, HIPPOCAMPUS_COMMAND, files))[0] for _ in range(repeats)]
        out["hippocampus_roundtrip_s"] = round(statistics.median(times), 3)
        fast = {"model_version": FAST_HIPPOCAMPUS_VERSION}
        post_study(ours.url, HIPPOCAMPUS_COMMAND, files, **fast)  # warm-up, not counted
        times = [timed(lambda: post_study(ours.url, HIPPOCAMPUS_COMMAND, files, **fast))[0] for _ in range(repeats)]
        out["hippocampus_fast_roundtrip_s"] = round(statistics.median(times), 3)
    else:
        out["hippocampus_roundtrip_skipped"] = f"{HIPPOCAMPUS_COMMAND} is not served (GET /models)"
    settings = get_settings()
    load_handlers()  # registers the handlers the pipeline looks commands up in
    pipeline = Pipeline(settings, commands=[HIPPOCAMPUS_COMMAND])
    failed = pipeline.warm_up().failed
    if failed:
        out["hippocampus_model_skipped"] = f"the model cannot be loaded: {failed[HIPPOCAMPUS_COMMAND]}"
        return out
    request = {"inference_command": HIPPOCAMPUS_COMMAND}
    pipeline.run_files(request, files)  # warm-up
    runs = [pipeline.run_files(request, files) for _ in range(repeats)]
    measures = [next(iter(r.response_json["series_ml_json"].values())) for r in runs]
    out["hippocampus_model_s"] = round(statistics.median(m["inference_seconds"] for m in measures), 4)
    out["hippocampus_pipeline_s"] = round(statistics.median(r.seconds for r in runs), 4)
    out["hippocampus_crop_shape"] = runs[0].response_json["parts"][0]["binary_data_shape"]
    fast = {**request, "model_version": FAST_HIPPOCAMPUS_VERSION}
    pipeline.run_files(fast, files)  # warm-up (loads the version)
    fast_measures = [next(iter(pipeline.run_files(fast, files).response_json["series_ml_json"].values()))
                     for _ in range(repeats)]
    out["hippocampus_fast_model_s"] = round(statistics.median(m["inference_seconds"] for m in fast_measures), 4)
    from bench.model_versions import measure_versions

    return {**out, **measure_versions(repeats)}  # every version, interleaved; GFLOP; default / 1.0-fast


def derived_figures(results: dict) -> dict:
    """The figures targets are stated in that are ratios or differences of measured ones."""
    out = {}
    if results.get("hippocampus_fast_model_s") and "hippocampus_model_s" in results:
        out["hippocampus_model_ratio"] = round(results["hippocampus_model_s"] / results["hippocampus_fast_model_s"], 2)
    if "pacs_total_s" in results and "pacs_orthanc_stable_age_s" in results:
        out["pacs_over_stable_age_s"] = round(results["pacs_total_s"] - results["pacs_orthanc_stable_age_s"], 2)
    return out


def targets_met(results: dict) -> dict:
    """Each target of the issue that was measured: whether this run meets it."""
    met = {}
    for key, (op, bound) in TARGETS.items():
        if key in results:
            met[f"{key}{op}{bound}"] = results[key] <= bound if op == "<=" else results[key] >= bound
    return met


def issue_table(results: dict) -> str:
    """Issue 28's table as this run measured it: each row's figure, its target and whether it is met."""
    lines = ["| figure | this run | target | judged |", "|---|---|---|---|"]
    for figure, key, shown in ISSUE_TABLE:
        op, bound = TARGETS[key]
        target = f"{key} {op} {bound}"
        if key not in results:
            reason = next((str(v) for k, v in results.items() if k.endswith(("_skipped", "_error"))
                           and k.split("_")[0] == key.split("_")[0]), "section not run")
            lines.append(f"| {figure} | not measured ({reason}) | {target} | - |")
            continue
        met = results[key] <= bound if op == "<=" else results[key] >= bound
        lines.append(f"| {figure} | {shown(results)} | {target} | {'met' if met else 'not met'} |")
    return "\n".join(lines)


def warm_up_both(ours: Server, floor: Server) -> dict:
    """Warm both servers up with small requests (the floor answering our response's size)."""
    small = cached_study("small")
    warm_up(ours, small)
    warm_up(floor, small, post_study(ours.url, MASK_COMMAND, small).response_bytes)
    return {}


def current_commit() -> str | None:
    """The checked-out commit (short hash, ``+dirty`` with local changes), to tie figures to code."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def start_ours(results: dict) -> Server:
    """The gateway serving every handler; if one cannot warm up (e.g. no model weights yet), the mask handler only."""
    try:
        return Server("ours")
    except ServerNotReady as exc:
        log.warning("%s; falling back to the 3D mask handler alone", exc)
        results["full_server_not_ready"] = str(exc)
        results["server_app"] = MASK_ONLY_APP
        return Server("ours", MASK_ONLY_APP)


def run(sections: Sequence[str], quick: bool) -> dict:
    """Measure ``sections`` in order; a section whose requests fail is reported as ``<section>_error``."""
    settings = get_settings()
    results: dict = {"cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                     "commit": current_commit(), "workers": settings.workers, "threads": settings.threads,
                     "quick": quick, "sections": list(sections)}
    servers: list[Server] = []

    def attempt(section: str, measure: Callable[[], dict]) -> bool:
        try:
            results.update(measure())
            return True
        except (requests.RequestException, InferenceRequestError) as exc:
            logs = ", ".join(str(s.log_path.relative_to(PROJECT_ROOT)) for s in servers)
            results[f"{section}_error"] = f"{type(exc).__name__}: {exc} (server logs: {logs})"
            log.error("%s failed: %s; see %s", section, exc, logs)
            return False

    try:
        if {"large", "small", "hippocampus", "radiomics"} & set(sections):
            servers.append(ours := start_ours(results))
        if {"large", "small"} & set(sections):
            servers.append(floor := Server("floor", "bench.floor:app"))
            if not attempt("warm_up", lambda: warm_up_both(ours, floor)):
                sections = [s for s in sections if s not in ("large", "small")]
        measures = {
            "large": lambda: measure_large(ours, floor, repeats=2 if quick else 5),
            "small": lambda: measure_small(ours, floor, *((10, 16) if quick else (30, 80))),
            "blur": lambda: measure_blur(repeats=1 if quick else 3),
            "hippocampus": lambda: measure_hippocampus(ours, repeats=2 if quick else 5),
            "radiomics": lambda: measure_radiomics(ours, repeats=2 if quick else 5),
            "celery": lambda: measure_celery(quick),
            "pacs": lambda: measure_pacs(runs=1 if quick else 3),
            "header": lambda: measure_header(repeats=3 if quick else 9),
        }
        for section in sections:
            attempt(section, measures[section])
    finally:
        for server in servers:
            server.stop()
    results["load_avg_end_1m"] = round(os.getloadavg()[0], 2)
    results.update(derived_figures(results))
    results["targets_met"] = targets_met(results)
    return results


def sections_list(text: str) -> list[str]:
    """``--only``'s value: comma-separated section names, each checked."""
    sections = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown or not sections:
        raise argparse.ArgumentTypeError(f"unknown section {', '.join(unknown) or text!r}; choose from "
                                         f"{', '.join(SECTIONS)}")
    return sections


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    parser.add_argument("--only", type=sections_list, metavar="SECTION[,SECTION...]",
                        help=f"run these sections only, in the order given ({', '.join(SECTIONS)})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    results = run(args.only or list(SECTIONS), args.quick)
    print(issue_table(results), file=sys.stderr, flush=True)  # for people; stdout keeps the one JSON line
    print(json.dumps(results), flush=True)
    if any(key.endswith("_error") for key in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
