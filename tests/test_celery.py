"""The celery job backend with the real thing: redis-server, celery worker processes, jobs over HTTP.

Each cluster gets its own redis-server (free port, no persistence) and workers started with
``celery -A worker worker``; the API is the gunicorn server (``INFERENCE_JOB_BACKEND=celery``) or
an in-process gateway with the same settings. Visibility timeouts are seconds here, so a killed
worker's job comes back quickly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
import redis
import requests
from celery.exceptions import TimeLimitExceeded

import handlers.gaussian_blur
import handlers.hippocampus
import handlers.mock  # noqa: F401
from bench.job_backend import CeleryWorker, RedisServer
from bench.pacs_services import DicomNodeProcess, c_store
from gateway import Gateway
from inference.config import Settings
from inference.errors import ServiceUnavailable
from inference.jobs.api import add_job_routes
from inference.jobs.celery_backend import TASK_NAME, CeleryRunner, hard_time_limit, make_celery, retry_delay
from inference.jobs.redis_store import LEASES, RedisJobStore
from inference.jobs.store import Job
from inference.pipeline.handler_registry import REGISTRY, HandlerSpec
from inference.pipeline.pipeline import Pipeline
from inference.protocol.client import build_multipart_request
from inference.radiomics.records import FEEDBACK, RedisRadiomicsRecords
from tests.conftest import RunningServer, free_port, write_study
from tests.test_radiomics import check_against_arterys, run_velocity_sequence

if shutil.which("redis-server") is None and not os.environ.get("CI"):
    pytest.skip("needs redis-server (Debian package redis-server; .ci/run installs it)", allow_module_level=True)


#: Workers for blur jobs only: they skip loading the hippocampus model (slow on a busy machine), which
#: a pool process started to replace a lost one would otherwise do before taking the job again.
CPU_ONLY = ("-Q", "cpu")


@dataclasses.dataclass
class Cluster:
    """A redis-server, the worker environment and the roots they share; workers started on demand."""

    root: Path
    redis: RedisServer
    env: dict[str, str]
    workers: list[CeleryWorker] = dataclasses.field(default_factory=list)

    @property
    def data(self) -> Path:
        return Path(self.env["INFERENCE_DATA_ROOT"])

    @property
    def output(self) -> Path:
        return Path(self.env["INFERENCE_OUTPUT_ROOT"])

    def settings(self) -> Settings:
        return dataclasses.replace(
            Settings(), job_backend="celery", broker_url=self.redis.url, data_root=self.data,
            output_root=self.output, job_time_limit=int(self.env["INFERENCE_JOB_TIME_LIMIT"]),
            broker_visibility_timeout=int(self.env["INFERENCE_BROKER_VISIBILITY_TIMEOUT"]),
            job_lease_seconds=int(self.env["INFERENCE_JOB_LEASE_SECONDS"]))

    def start_workers(self, *names: str, args: tuple[str, ...] = ()) -> list[CeleryWorker]:
        started = [CeleryWorker(f"{name}@test", self.env, self.root, ["--concurrency", "1", *args]) for name in names]
        self.workers += started
        return [worker.wait_ready() for worker in started]

    def store(self) -> RedisJobStore:
        return RedisJobStore(self.redis.url)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.redis.stop()


def make_cluster(root: Path, time_limit: int, visibility: int, lease: int = 20, appendonly: bool = False) -> Cluster:
    (root / "data").mkdir(parents=True)
    (root / "jobs").mkdir()
    server = RedisServer(root, appendonly=appendonly)
    env = {"INFERENCE_JOB_BACKEND": "celery", "INFERENCE_BROKER_URL": server.url,
           "INFERENCE_DATA_ROOT": str(root / "data"), "INFERENCE_OUTPUT_ROOT": str(root / "jobs"),
           "INFERENCE_ENABLE_MOCKS": "1",  # the API and the workers serve the mocks too
           "INFERENCE_JOB_TIME_LIMIT": str(time_limit), "INFERENCE_BROKER_VISIBILITY_TIMEOUT": str(visibility),
           "INFERENCE_JOB_LEASE_SECONDS": str(lease)}
    return Cluster(root, server, env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Redis and a worker (one process) serving every queue, for the tests that keep them alive."""
    running = make_cluster(tmp_path_factory.mktemp("celery"), time_limit=60, visibility=120)
    try:
        running.start_workers("w1")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def api(cluster, tmp_path_factory):
    """The gunicorn server with the celery backend, on the cluster's Redis."""
    server = RunningServer(cluster.env, tmp_path_factory.mktemp("api"), wait=False)
    wait_for_ping(server.url)
    yield server
    server.stop()


def job_client(settings: Settings):
    """An in-process gateway serving the job routes (and every registered handler) with ``settings``."""
    pipeline = Pipeline(settings)
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline)
    return app


def wait_for_ping(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer /ping in {timeout}s")


def submit(url: str, **job) -> requests.Response:
    return requests.post(url + "/job/", json=job, timeout=30)


def poll(url: str, uid: str, timeout: float = 90) -> requests.Response:
    """Query ``uid`` until it is no longer 202 (or ``timeout``); the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(f"{url}/query/{uid}", timeout=30)
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def local_outputs(data: Path, tmp_path: Path, **job) -> Path:
    """Run ``job`` on the local backend (in-process gateway, thread pool, SQLite); its output folder."""
    client = job_client(dataclasses.replace(Settings(), data_root=data,
                                            output_root=tmp_path / "local-jobs")).test_client()
    uid = client.post("/job/", json=job).get_json()["uid"]
    deadline = time.monotonic() + 90
    while (response := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert response.status_code == 200, response.get_json()
    return tmp_path / "local-jobs" / response.get_json()["output_dir"]


def assert_whole(folder: Path) -> dict:
    """``folder`` holds exactly response.json, job.json and the file each part names; no partial folder is left."""
    response_json = json.loads((folder / "response.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([p["file"] for p in response_json["parts"]]
                                                              + ["response.json", "job.json"])
    assert not list(folder.parent.glob("*.partial*"))
    return response_json


# -- the tests ----------------------------------------------------------------------------------
def test_results_are_identical_to_the_local_backend(cluster, api, tmp_path):
    write_study(cluster.data / "same", shape=(6, 24, 28))
    for job in ({"job_name": "get-probability-mask", "in_dir": "same"},
                {"job_name": "3dblur", "in_dir": "same", "sigma_mm": 1.5}):
        response = submit(api.url, **job)
        assert response.status_code == 201, response.text
        done = poll(api.url, response.json()["uid"])
        assert done.status_code == 200, done.text
        assert done.json()["attempts"] == 1 and done.json()["msg"] == "Job has completed"
        celery_dir, local_dir = cluster.output / done.json()["output_dir"], local_outputs(cluster.data, tmp_path, **job)
        celery_json, local_json = assert_whole(celery_dir), assert_whole(local_dir)
        assert celery_json == local_json
        for part in celery_json["parts"]:
            ours, theirs = celery_dir / part["file"], local_dir / part["file"]
            if part["binary_type"] == "dicom":  # a derived series: new UIDs each run, the same pixels
                assert np.array_equal(pydicom.dcmread(ours).pixel_array, pydicom.dcmread(theirs).pixel_array)
            else:
                assert ours.read_bytes() == theirs.read_bytes()
    record = cluster.store().get(response.json()["uid"])
    assert record.worker.partition("/")[0] in {w.name for w in cluster.workers} and record.started <= record.finished
    banner = cluster.workers[0].log()  # started without -Q: it consumes every configured queue
    assert ".> cpu " in banner and ".> gpu " in banner


def test_a_velocity_client_segments_study1_on_the_workers(cluster, api, study1_crop):
    """The Radiomics sequence with the celery backend: the job runs on a worker, the masks equal the
    Arterys door's, the feedback lands in Redis with the job's model version and input hash."""
    made = run_velocity_sequence(api.url, study1_crop)
    record = cluster.store().get(made["task"].SegmentationID)
    assert record.worker.partition("/")[0] in {w.name for w in cluster.workers} and record.status == "completed"
    check_against_arterys(api.url, study1_crop, made["output"], "1.0-fast")
    [feedback] = [e for e in RedisRadiomicsRecords(cluster.redis.url).entries(FEEDBACK)
                  if e["segmentation_id"] == made["task"].SegmentationID]
    assert (feedback["model_version"], feedback["input_hash"]) == ("1.0-fast", made["input_hash"])
    assert not (cluster.output / f"{made['task'].SegmentationID}.input").exists()  # the worker's input is gone


def test_bad_parameters_are_refused_at_submission(cluster, api):
    write_study(cluster.data / "bad", shape=(2, 8, 8))
    keys_before = set(redis.Redis.from_url(cluster.redis.url).keys())
    for job in ({"job_name": "3dblur", "in_dir": "bad", "sigma_mm": -2},
                {"job_name": "3dblur", "in_dir": "bad", "sigma": 2}):
        response = submit(api.url, **job)
        assert response.status_code == 400, response.text
        assert "sigma" in response.json()["error"]
    assert set(redis.Redis.from_url(cluster.redis.url).keys()) == keys_before, "no record, no message"


def test_two_api_instances_answer_for_the_same_job(cluster, api, tmp_path):
    write_study(cluster.data / "two", shape=(4, 16, 16))
    other = RunningServer(cluster.env, tmp_path, wait=False)
    try:
        wait_for_ping(other.url)
        uid = submit(api.url, job_name="get-probability-mask", in_dir="two").json()["uid"]
        answer = poll(other.url, uid)
        assert answer.status_code == 200, answer.text
        again = requests.get(f"{api.url}/query/{uid}", timeout=30)
        assert again.status_code == 200 and again.json() == answer.json()
        assert answer.json()["attempts"] == 1
        assert requests.get(f"{other.url}/query/0123abcd", timeout=30).status_code == 404
    finally:
        other.stop()


def test_jobs_go_to_the_queue_of_their_command_and_a_q_worker_takes_only_its_queue(tmp_path):
    running = make_cluster(tmp_path, time_limit=60, visibility=120)  # no worker yet: messages stay queued
    try:
        write_study(running.data / "q", shape=(2, 8, 8))
        client = job_client(running.settings()).test_client()
        uids = {}
        for name in ("3dblur", "get-hippocampus-volume", "get-probability-mask"):
            response = client.post("/job/", json={"job_name": name, "in_dir": "q"})
            assert response.status_code == 201, response.get_json()
            uids[name] = response.get_json()["uid"]
            assert client.get(response.headers["Location"]).get_json() == {"msg": "Job is queued", "attempts": 0}
        queues = redis.Redis.from_url(running.redis.url)
        assert (queues.llen("cpu"), queues.llen("gpu")) == (2, 1)

        gpu_box, = running.start_workers("gpu", args=("-Q", "gpu"))  # takes the model's job, not the others
        deadline = time.monotonic() + 60
        while queues.llen("gpu") or running.store().get(uids["get-hippocampus-volume"]).status in ("queued", "running"):
            assert time.monotonic() < deadline, gpu_box.log()
            time.sleep(0.1)
        hippocampus = client.get(f"/query/{uids['get-hippocampus-volume']}")
        assert hippocampus.status_code == 422 and "HippoCrop" in hippocampus.get_json()["error"]  # ran: no crop here
        time.sleep(1)
        assert queues.llen("cpu") == 2 and client.get(f"/query/{uids['3dblur']}").get_json()["msg"] == "Job is queued"
    finally:
        running.stop()


def wait_running(store: RedisJobStore, uid: str, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while (job := store.get(uid)).status != "running":
        assert time.monotonic() < deadline and job.status == "queued", job
        time.sleep(0.01)
    return job


def test_a_killed_worker_s_job_runs_again_within_a_lease_whatever_the_time_limit(tmp_path):
    # a time limit and visibility timeout far beyond the test: only the lease can bring the job back
    running = make_cluster(tmp_path, time_limit=3000, visibility=4000, lease=4)
    try:
        write_study(running.data / "slow", shape=(32, 128, 128))
        first, second = running.start_workers("k1", "k2", args=CPU_ONLY)
        client = job_client(running.settings()).test_client()
        uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "slow"}).get_json()["uid"]
        store = running.store()
        job = wait_running(store, uid)
        victim, survivor = (first, second) if job.worker.startswith(first.name) else (second, first)
        victim.kill()  # the worker and its pool process at once: a machine that died
        killed = time.monotonic()
        assert store.get(uid).status == "running" and not (running.output / uid).exists(), "killed mid-job"

        while (job := store.get(uid)).attempts < 2:
            assert time.monotonic() - killed < 60, (job, survivor.log())
            time.sleep(0.1)
        assert time.monotonic() - killed < 4 * 1.25 + 5, "back within a lease and a reaper's look (and pickup)"
        assert "its lease ran out" in survivor.log()
        deadline = time.monotonic() + 60
        while (response := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert response.status_code == 200, (response.get_json(), survivor.log())
        assert response.get_json()["attempts"] == 2
        assert store.get(uid).worker.startswith(survivor.name)
        response_json = assert_whole(running.output / uid)
        assert len(response_json["parts"]) == 32
        assert survivor.log().count(f"job {uid} completed") == 1
        assert store.client.zscore(LEASES, uid) is None, "a finished job holds no lease"
    finally:
        running.stop()


def test_a_job_whose_worker_lives_is_never_started_twice(tmp_path):
    # a job many leases long, and a second copy of its message (as a visibility timeout or a broker
    # reconnection delivers one) reaching an idle worker while it runs
    running = make_cluster(tmp_path, time_limit=3000, visibility=4000, lease=1)
    try:
        write_study(running.data / "long", shape=(384, 256, 256))  # reading and writing it takes seconds
        first, second = running.start_workers("l1", "l2", args=CPU_ONLY)
        client = job_client(running.settings()).test_client()
        uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "long", "sigma_mm": 4}).get_json()["uid"]
        store = running.store()
        wait_running(store, uid)
        make_celery(running.settings()).send_task(TASK_NAME, args=[uid], queue="cpu")
        deadline = time.monotonic() + 120
        while (response := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        record = store.get(uid)
        assert response.status_code == 200 and record.attempts == 1, (response.get_json(), first.log(), second.log())
        assert record.finished - record.started > 2, "the job outlived several leases (renewed every 0.25 s)"
        logs = first.log() + second.log()
        assert "this copy of its message is dropped" in logs and "lease ran out" not in logs
        assert logs.count(f"job {uid}: attempt") == 1
    finally:
        running.stop()


def test_a_crashed_and_restarted_broker_loses_no_job_and_the_api_answers_503_meanwhile(tmp_path):
    running = make_cluster(tmp_path, time_limit=3000, visibility=4000, lease=2, appendonly=True)
    try:
        for index in range(4):
            write_study(running.data / f"r{index}", shape=(96, 256, 256), seed=index)
        running.start_workers("r1", args=CPU_ONLY)
        client = job_client(running.settings()).test_client()
        uids = [client.post("/job/", json={"job_name": "3dblur", "in_dir": f"r{index}"}).get_json()["uid"]
                for index in range(4)]
        store = running.store()
        wait_running(store, uids[0])
        running.redis.crash()  # SIGKILL, jobs running and queued: only what its append-only file holds comes back
        down = time.monotonic()
        assert client.get(f"/query/{uids[0]}").status_code == 503
        submitted = client.post("/job/", json={"job_name": "3dblur", "in_dir": "r0"})
        assert submitted.status_code == 503 and "retry later" in submitted.get_json()["error"]
        scrape = client.get("/metrics")  # the other metrics are still served, the job store said to be down
        assert scrape.status_code == 200 and "inference_job_store_up 0.0" in scrape.get_data(as_text=True)
        time.sleep(5)  # the running job finishes meanwhile and cannot record it
        running.redis = RedisServer(tmp_path, port=running.redis.port, appendonly=True)
        outage = time.monotonic() - down

        deadline = time.monotonic() + 120
        while any((job := store.get(uid)).status in ("queued", "running") for uid in uids):
            assert time.monotonic() < deadline, (job, running.workers[0].log()[-4000:])
            time.sleep(0.2)
        answers = [client.get(f"/query/{uid}") for uid in uids]  # the same API, recovered by itself
        assert [answer.status_code for answer in answers] == [200] * 4, [a.get_json() for a in answers]
        for uid in uids:
            assert_whole(running.output / uid)
        assert client.post("/job/", json={"job_name": "3dblur", "in_dir": "r0"}).status_code == 201
        scrape = client.get("/metrics").get_data(as_text=True)
        assert "inference_job_store_up 1.0" in scrape and 'inference_jobs{state="completed"} 4.0' in scrape
        assert outage > 5
    finally:
        running.stop()


def test_a_lost_pool_process_gives_its_job_back_at_once(tmp_path):
    running = make_cluster(tmp_path, time_limit=60, visibility=600)  # far beyond this test: no redelivery by timeout
    try:
        write_study(running.data / "slow", shape=(32, 128, 128))
        worker, = running.start_workers("p1", args=CPU_ONLY)
        client = job_client(running.settings()).test_client()
        uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "slow"}).get_json()["uid"]
        store = running.store()
        deadline = time.monotonic() + 60
        while store.get(uid).status != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool, = psutil.Process(worker.process.pid).children()
        pool.kill()  # the process running the job dies (out-of-memory killer, say); the worker lives on

        deadline = time.monotonic() + 60
        while (response := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert response.status_code == 200 and response.get_json()["attempts"] == 2, (response.get_json(), worker.log())
        assert_whole(running.output / uid)
        assert "WorkerLostError" in worker.log() or "signal 9" in worker.log(), worker.log()
    finally:
        running.stop()


def test_a_job_past_its_time_limit_fails_with_timeout(tmp_path):
    running = make_cluster(tmp_path, time_limit=1, visibility=5)
    try:
        # reading, blurring and writing 256 slices of 512 x 512 takes well over 1 s (192 of 256 x 256 took
        # under 1 s on a faster machine)
        write_study(running.data / "big", shape=(256, 512, 512))
        running.start_workers("t1", args=CPU_ONLY)
        client = job_client(running.settings()).test_client()
        uid = client.post("/job/", json={"job_name": "3dblur", "in_dir": "big"}).get_json()["uid"]
        deadline = time.monotonic() + 60
        while (response := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert response.status_code == 500
        assert response.get_json() == {"msg": "Job has failed", "error": "timeout", "attempts": 1}
        time.sleep(1)  # not retried: still one attempt, no output
        assert running.store().get(uid).attempts == 1 and not (running.output / uid).exists()
    finally:
        running.stop()


def test_broker_down_at_submission_is_a_503_and_synchronous_requests_still_work(tmp_path, study):
    running = make_cluster(tmp_path, time_limit=60, visibility=120)
    write_study(running.data / "s", shape=(2, 8, 8))
    app = job_client(running.settings())
    app.add_inference_route("/", "get-probability-mask")
    client = app.test_client()
    assert client.post("/job/", json={"job_name": "3dblur", "in_dir": "s"}).status_code == 201
    running.redis.stop()

    started = time.monotonic()
    response = client.post("/job/", json={"job_name": "3dblur", "in_dir": "s"})
    assert response.status_code == 503 and time.monotonic() - started < 10
    assert "unreachable" in response.get_json()["error"] and "retry later" in response.get_json()["error"]
    assert client.get("/query/0123abcd").status_code == 503
    body = build_multipart_request({"inference_command": "get-probability-mask"}, study)  # as a viewer sends it
    assert client.post("/", data=body.to_string(), content_type=body.content_type).status_code == 200

    restarted = RedisServer(tmp_path, port=running.redis.port)  # back (empty: no persistence in tests)
    try:
        assert client.post("/job/", json={"job_name": "3dblur", "in_dir": "s"}).status_code == 201
    finally:
        restarted.stop()


def test_a_submission_the_broker_refuses_leaves_no_record(tmp_path):
    server = RedisServer(tmp_path)
    try:
        store = RedisJobStore(server.url)  # records reachable, broker not: the runner must take the record back
        dead_broker = dataclasses.replace(Settings(), broker_url=f"redis://127.0.0.1:{free_port()}/0")
        runner = CeleryRunner(make_celery(dead_broker), store)
        job = store.add(Job("3dblur", "gaussian-blur-3d", "s"))
        with pytest.raises(ServiceUnavailable, match="not queued"):
            runner.submit(job)
        assert store.get(job.uid) is None
    finally:
        server.stop()


def test_transient_errors_are_retried_a_bounded_number_of_times_and_bad_input_never(tmp_path, monkeypatch):
    server = RedisServer(tmp_path)
    try:
        data, output = tmp_path / "data", tmp_path / "jobs"
        write_study(data / "s", shape=(2, 8, 8))
        write_study(data / "mixed" / "a", shape=(2, 8, 8), description="First")
        write_study(data / "mixed" / "b", shape=(2, 8, 8), description="Second")
        settings = dataclasses.replace(Settings(), broker_url=server.url, data_root=data, output_root=output,
                                       job_retries=2)
        calls = {"flaky": 0, "broken": 0}
        mask = REGISTRY.get("get-probability-mask").handler

        def flaky(instances, context):  # out of memory twice, then fine
            calls["flaky"] += 1
            if calls["flaky"] <= 2:
                raise MemoryError("no memory left")
            return mask(instances, context)

        def broken(instances, context):
            calls["broken"] += 1
            raise ConnectionResetError("connection reset by peer")

        for name, handler in (("test-flaky", flaky), ("test-broken", broken)):
            monkeypatch.setitem(REGISTRY._specs, name, HandlerSpec(name, handler))
        task = make_celery(settings, Pipeline(settings)).tasks[TASK_NAME]  # eager: a retry runs at once, here
        store = RedisJobStore(server.url)

        def run(command: str, in_dir: str = "s") -> Job:
            job = store.add(Job(command, command, in_dir))
            task.apply(args=[job.uid])
            return store.get(job.uid)

        flaky_job = run("test-flaky")
        assert (flaky_job.status, flaky_job.attempts, calls["flaky"]) == ("completed", 3, 3)
        assert_whole(Path(flaky_job.output_dir))
        broken_job = run("test-broken")
        assert (broken_job.status, broken_job.attempts, calls["broken"]) == ("failed", 3, 3), "1 run + 2 retries"
        assert broken_job.error.startswith("gave up after 3 runs") and "connection reset" in broken_job.error
        bad = run("gaussian-blur-3d", "mixed")
        assert (bad.status, bad.error_status, bad.attempts) == ("failed", 422, 1), "bad input is not retried"
        assert retry_delay(0) < retry_delay(1) < retry_delay(2) <= 60
    finally:
        server.stop()


def test_a_job_killed_by_the_hard_time_limit_is_recorded_as_timeout(tmp_path):
    server = RedisServer(tmp_path)  # the hook the worker's main process calls once it killed the job's process
    try:
        settings = dataclasses.replace(Settings(), broker_url=server.url, job_time_limit=5)
        task = make_celery(settings).tasks[TASK_NAME]
        store = RedisJobStore(server.url)
        job = store.add(Job("3dblur", "gaussian-blur-3d", "s"))
        store.mark_running(job.uid, worker="w@test")
        task.on_failure(TimeLimitExceeded(6), job.uid, [job.uid], {}, None)
        record = store.get(job.uid)
        assert (record.status, record.error, record.error_status, record.attempts) == ("failed", "timeout", 500, 1)
        assert hard_time_limit(5) == 6 and hard_time_limit(900) == 930
    finally:
        server.stop()


@pytest.mark.parametrize("problem", ["missing", "read-only", "model cache"])
def test_worker_refuses_to_start_without_writable_roots(tmp_path, problem):
    data, output = tmp_path / "data", tmp_path / "jobs"
    data.mkdir()
    if problem == "model cache":
        output.mkdir()
        (tmp_path / "a-file").write_text("not a folder")
    if problem == "read-only":
        output.mkdir()
        output.chmod(0o555)
    env = {"INFERENCE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "INFERENCE_DATA_ROOT": str(data),
           "INFERENCE_OUTPUT_ROOT": str(output)}
    if problem == "read-only" and os.geteuid() == 0:
        env["INFERENCE_OUTPUT_ROOT"] = "/proc"  # root writes anywhere chmod allows; /proc takes no files
    if problem == "model cache":
        env["INFERENCE_MODEL_CACHE"] = str(tmp_path / "a-file" / "cache")
    worker = CeleryWorker("refused@test", env, tmp_path)
    try:
        assert worker.process.wait(120) == 2
    finally:
        worker.stop()
    expected = {"missing": "does not exist", "read-only": "is not writable",
                "model cache": f"INFERENCE_MODEL_CACHE={tmp_path / 'a-file' / 'cache'}: it cannot be created"}[problem]
    assert "worker not started" in worker.log() and expected in worker.log(), worker.log()


def test_dicom_node_jobs_run_on_the_workers_and_show_in_the_api_across_a_node_restart(tmp_path):
    running = make_cluster(tmp_path, time_limit=60, visibility=120)
    node_root = tmp_path / "node"
    running.env["INFERENCE_PACS_ROOT"] = str(node_root / "pacs")  # the spool: a volume the workers share
    rules = tmp_path / "rules.yaml"
    rules.write_text('rules:\n  - name: mock-report\n    match:\n      series_description: "^Report me"\n'
                     '    command: get-secondary-capture\n')
    args = ["--rules", str(rules), "--stable-seconds", "1"]
    node = DicomNodeProcess(node_root, args=args, env=running.env)
    try:
        files = write_study(tmp_path / "study", description="Report me")
        assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
        log = node.wait_for_log(r"rule mock-report: job \w+ queued", 30)
        uid, = re.findall(r"rule mock-report: job (\w+) queued", log)
        client = job_client(running.settings()).test_client()
        assert client.get(f"/query/{uid}").get_json() == {"msg": "Job is queued", "attempts": 0}, "no worker yet"
        assert 'inference_jobs{state="queued"} 1.0' in client.get("/metrics").get_data(as_text=True)
        node.stop()  # the node stops with its job queued; a worker comes, the node starts again

        worker, = running.start_workers("n1")
        node = DicomNodeProcess(node_root, port=node.port, args=args, env=running.env)
        deadline = time.monotonic() + 60
        while (done := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.status_code == 200 and done.get_json()["attempts"] == 1, (done.get_json(), worker.log())
        assert f"job {uid} completed" in worker.log(), "run by the worker"
        assert "outputs in" not in node.log_text(), "not run by the node (the executor logs that line)"
        assert 'inference_jobs{state="completed"} 1.0' in client.get("/metrics").get_data(as_text=True)
        node.wait_for_log(rf"job {uid} completed: 1 DICOM results", 30)  # the restarted node delivers them
        assert not (running.output.parent / "node" / "jobs" / "jobs.sqlite3").exists(), "no SQLite job store"
        assert_whole(running.output / uid)
    finally:
        node.stop()
        running.stop()


def test_leases_start_once_take_over_when_expired_and_reap_once(tmp_path):
    server = RedisServer(tmp_path)
    try:
        store, other = RedisJobStore(server.url), RedisJobStore(server.url)  # two machines' views
        job = store.add(Job("3dblur", "gaussian-blur-3d", "s"))
        assert store.start(job.uid, "a/1", 1) == 1
        assert other.start(job.uid, "b/2", 1) == 0, "a live lease: the second copy does not start"
        assert store.renew(job.uid, "a/1", 1) and not other.renew(job.uid, "b/2", 1)
        time.sleep(1.2)  # a/1 died: its lease ran out
        assert other.reap(republish_after=60) == [job.uid] and store.reap(republish_after=60) == [], "one reaper"
        assert store.get(job.uid).status == "queued"
        assert other.start(job.uid, "b/2", 1) == 1 and store.get(job.uid).attempts == 2
        assert not store.renew(job.uid, "a/1", 1), "the dead attempt's worker lost it"
        assert store.mark_completed(job.uid, "/out") and store.start(job.uid, "c/3", 1) == -1
        time.sleep(1.2)
        assert store.reap(republish_after=60) == [] and store.client.zscore(LEASES, job.uid) is None
    finally:
        server.stop()


def test_a_time_limit_a_library_wraps_in_its_own_error_is_still_a_timeout(tmp_path, monkeypatch):
    # pydicom's writer turns any exception into an OSError: the soft time limit must still read as one
    from celery.exceptions import SoftTimeLimitExceeded

    server = RedisServer(tmp_path)
    try:
        write_study(tmp_path / "data" / "s", shape=(2, 8, 8))
        settings = dataclasses.replace(Settings(), broker_url=server.url, data_root=tmp_path / "data",
                                       output_root=tmp_path / "jobs")

        def wrapping(instances, context):
            try:
                raise SoftTimeLimitExceeded()  # as billiard's signal handler raises it, mid-write
            except Exception as exc:
                raise OSError(f"{exc}\nfor data_element: (0002,0000)")  # noqa: B904 (pydicom's own words)

        monkeypatch.setitem(REGISTRY._specs, "test-wrapping", HandlerSpec("test-wrapping", wrapping))
        task = make_celery(settings, Pipeline(settings)).tasks[TASK_NAME]
        store = RedisJobStore(server.url)
        job = store.add(Job("test-wrapping", "test-wrapping", "s"))
        task.apply(args=[job.uid])
        record = store.get(job.uid)
        assert (record.status, record.error, record.attempts) == ("failed", "timeout", 1)
    finally:
        server.stop()
