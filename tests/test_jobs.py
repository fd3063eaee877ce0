"""The asynchronous job API: submit, poll, outputs, bad input, restarts and several processes."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests

import handlers.gaussian_blur
import handlers.mock  # noqa: F401  (registers get-probability-mask, a handler answering a mask)
from gateway import Gateway
from inference.config import Settings
from inference.jobs.api import add_job_routes
from inference.jobs.store import FAILED, INTERRUPTED, RUNNING, Job, JobStore, LocalPoolRunner
from inference.pipeline.pipeline import Pipeline
from inference.storage.migrations import JOBS, StoreVersionError, migrate_sqlite
from tests.conftest import PROJECT_ROOT, RunningServer, write_study


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    data, output = tmp_path / "data", tmp_path / "jobs"
    data.mkdir()
    return data, output


@pytest.fixture
def client(roots):
    data, output = roots
    settings = dataclasses.replace(Settings(), data_root=data, output_root=output, job_workers=2)
    pipeline = Pipeline(settings)
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline)
    return app.test_client()


def poll(get, uid: str, timeout: float = 60.0):
    """Query ``uid`` until it is no longer 202; the last response."""
    deadline = time.monotonic() + timeout
    while True:
        response = get(f"/query/{uid}")
        if response.status_code != 202 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def submit(client, **job):
    return client.post("/job/", json=job)


def test_blur_job_runs_to_completion_and_writes_its_outputs(client, roots):
    data, output = roots
    files = write_study(data / "patient" / "study1", shape=(6, 16, 20))
    response = submit(client, job_name="3dblur", in_dir="patient/study1", sigma_mm=1.5)
    assert response.status_code == 201, response.get_json()
    uid = response.get_json()["uid"]
    assert response.headers["Location"] == f"/query/{uid}"

    done = poll(client.get, uid)
    assert done.status_code == 200, done.get_json()
    assert done.get_json() == {"msg": "Job has completed", "output_dir": uid, "files": f"/job/{uid}/files",
                               "attempts": 1}  # no server path
    folder = output / uid
    response_json = json.loads((folder / "response.json").read_text())
    assert len(response_json["parts"]) == len(files)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([p["file"] for p in response_json["parts"]] + ["job.json", "response.json"])
    outputs = [pydicom.dcmread(folder / p["file"]) for p in response_json["parts"]]
    original = pydicom.dcmread(files[0])
    assert {ds.SeriesDescription for ds in outputs} == {"Gaussian blur 3D sigma 1.5 mm"}
    assert len({ds.SeriesInstanceUID for ds in outputs}) == 1
    assert outputs[0].SeriesInstanceUID != original.SeriesInstanceUID
    assert not list(output.glob("*.partial*"))


def test_mask_outputs_are_raw_uint8_files(client, roots):
    data, output = roots
    write_study(data / "s", shape=(4, 10, 12))
    uid = submit(client, job_name="get-probability-mask", in_dir="s").get_json()["uid"]
    assert poll(client.get, uid).status_code == 200
    part = json.loads((output / uid / "response.json").read_text())["parts"][0]
    assert part["file"] == "output_masks_0000.raw"
    assert (output / uid / part["file"]).stat().st_size == 4 * 10 * 12


def test_queued_and_running_answer_202(roots):
    data, output = roots
    write_study(data / "s", shape=(2, 8, 8))

    class Holding:  # a runner that accepts jobs and never starts them
        owner = "holding"

        def submit(self, job):
            pass

        def recover(self):
            return []

    settings = dataclasses.replace(Settings(), data_root=data, output_root=output)
    store = JobStore(output / "jobs.sqlite3")
    pipeline = Pipeline(settings)
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline, store=store, runner=Holding())
    client = app.test_client()
    uid = submit(client, job_name="3dblur", in_dir="s").get_json()["uid"]
    assert client.get(f"/query/{uid}").get_json() == {"msg": "Job is queued", "attempts": 0}
    assert store.mark_running(uid, worker="w1")
    response = client.get(f"/query/{uid}")
    assert response.status_code == 202 and response.get_json() == {"msg": "Job is running", "attempts": 1}
    job = store.get(uid)
    assert job.owner == "holding" and job.params == {} and job.worker == "w1" and job.created <= job.started


def test_unknown_uid_is_404(client):
    response = client.get("/query/0123456789abcdef")
    assert response.status_code == 404 and "no job with uid" in response.get_json()["error"]


def test_unknown_job_name_is_400_listing_known_ones(client, roots):
    write_study(roots[0] / "s", shape=(2, 8, 8))
    response = submit(client, job_name="sharpen", in_dir="s")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert "sharpen" in error and "3dblur" in error and "gaussian-blur-3d" in error


@pytest.mark.parametrize("body", [None, [], {"in_dir": "s"}, {"job_name": "3dblur"},
                                  {"job_name": "3dblur", "in_dir": 3}])
def test_malformed_job_is_400(client, roots, body):
    write_study(roots[0] / "s", shape=(2, 8, 8))
    response = client.post("/job/", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400, response.get_json()


def test_paths_outside_the_data_root_are_403(client, roots, tmp_path):
    data, _ = roots
    outside = tmp_path / "outside"
    write_study(outside, shape=(2, 8, 8))
    (data / "link").symlink_to(outside, target_is_directory=True)
    for in_dir in ("../outside", str(outside), "link", "/etc"):
        response = submit(client, job_name="3dblur", in_dir=in_dir)
        assert response.status_code == 403, in_dir
        assert "outside the data root" in response.get_json()["error"]


def test_folders_without_a_study_are_422(client, roots):
    data, _ = roots
    (data / "empty").mkdir()
    (data / "text").mkdir()
    (data / "text" / "notes.txt").write_text("no images here")
    (data / "file.dcm").write_bytes(b"not a folder")
    cases = {"empty": "empty folder", "text": "holds no DICOM", "file.dcm": "not a folder", "missing": "not a folder"}
    for in_dir, message in cases.items():
        response = submit(client, job_name="3dblur", in_dir=in_dir)
        assert response.status_code == 422, in_dir
        assert message in response.get_json()["error"]


def test_bad_parameters_are_refused_at_submission(client, roots):
    write_study(roots[0] / "s", shape=(2, 8, 8))
    response = submit(client, job_name="3dblur", in_dir="s", sigma_mm=-2)
    assert response.status_code == 400
    assert "parameter 'sigma_mm' must be a number > 0 and <= 1000, got -2" in response.get_json()["error"]
    response = submit(client, job_name="3dblur", in_dir="s", sigma=2)
    assert response.status_code == 400
    assert "unknown parameter 'sigma'" in response.get_json()["error"]
    assert "did you mean 'sigma_mm'" in response.get_json()["error"]


def test_two_series_fail_the_job_with_a_422(client, roots):
    data, output = roots
    write_study(data / "mixed" / "a", shape=(2, 8, 8), description="First")
    write_study(data / "mixed" / "b", shape=(3, 8, 8), description="Second")
    uid = submit(client, job_name="3dblur", in_dir="mixed").get_json()["uid"]
    response = poll(client.get, uid)
    assert response.status_code == 422
    assert "First" in response.get_json()["error"] and "Second" in response.get_json()["error"]
    assert not (output / uid).exists()


# -- restarts and several processes -----------------------------------------------------------
HOLD_LOCK = """
import sys, time
from inference.jobs.store import ProcessLock
lock = ProcessLock(sys.argv[1])  # held while this process lives
print(lock.owner, flush=True)
time.sleep(120)
"""


def test_a_store_file_from_before_attempts_were_counted_is_upgraded(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:  # the first release's table
        db.execute("CREATE TABLE jobs (uid TEXT PRIMARY KEY, job_name TEXT NOT NULL, command TEXT NOT NULL, "
                   "in_dir TEXT NOT NULL, params TEXT NOT NULL, status TEXT NOT NULL, "
                   "owner TEXT, error TEXT, error_status INTEGER, "
                   "output_dir TEXT, created REAL NOT NULL, updated REAL NOT NULL)")
        db.execute("INSERT INTO jobs VALUES ('old', '3dblur', 'gaussian-blur-3d', 's', '{}', 'completed', NULL, NULL, "
                   "NULL, '/out/old', 1.0, 2.0)")
    db.close()
    with pytest.raises(StoreVersionError, match="schema version 0, this release needs 1: .* run `inference-migrate`"):
        JobStore(path)  # a file of an older release is migrated by the command, never by whoever opens it
    assert migrate_sqlite(path, JOBS) == (0, 1)
    store = JobStore(path)
    assert store.get("old").attempts == 0 and store.get("old").output_dir == "/out/old"
    new = store.add(Job("3dblur", "gaussian-blur-3d", "s"))
    assert store.mark_running(new.uid) and store.get(new.uid).attempts == 1
    assert not store.mark_running(new.uid), "a running job is not started twice by the local runner"


def test_store_survives_a_restart_and_interrupted_jobs_fail(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    live = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "owners")], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_owner = live.stdout.readline().strip()
        dead = store.add(Job("3dblur", "gaussian-blur-3d", "s", {"sigma_mm": 2}, owner="4242-gone"))
        running = store.add(Job("3dblur", "gaussian-blur-3d", "s", owner=live_owner))
        store.mark_running(running.uid)

        # A new process (a new store and runner on the same files) starts: only the dead owner's job fails.
        restarted = JobStore(tmp_path / "jobs.sqlite3")
        runner = LocalPoolRunner(restarted, lambda job: None, workers=1, lock_dir=tmp_path / "owners")
        assert runner.recover() == [dead.uid]
        assert restarted.get(dead.uid).status == FAILED and restarted.get(dead.uid).error == INTERRUPTED
        assert restarted.get(dead.uid).params == {"sigma_mm": 2}
        assert restarted.get(running.uid).status == RUNNING

        live.kill()
        live.wait()
        assert runner.recover() == [running.uid]
        assert store.get(running.uid).status == FAILED and store.get(running.uid).error == INTERRUPTED
        assert not (tmp_path / "owners" / f"{live_owner}.lock").exists()
    finally:
        live.kill()
        live.wait()


def test_interrupted_job_is_reported_failed_by_the_api(roots):
    data, output = roots
    uid = JobStore(output / "jobs.sqlite3").add(Job("3dblur", "gaussian-blur-3d", "s", owner="1-stopped")).uid
    settings = dataclasses.replace(Settings(), data_root=data, output_root=output)
    pipeline = Pipeline(settings)
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline)  # start-up recovery
    response = app.test_client().get(f"/query/{uid}")
    assert response.status_code == 500
    assert response.get_json() == {"msg": "Job has failed", "error": INTERRUPTED, "attempts": 0}


def test_partial_outputs_of_interrupted_jobs_are_removed_at_start_up(roots):
    data, output = roots
    store = JobStore(output / "jobs.sqlite3")
    killed = store.add(Job("3dblur", "gaussian-blur-3d", "s", owner="1-stopped"))
    store.mark_running(killed.uid)
    live = store.add(Job("3dblur", "gaussian-blur-3d", "s", owner="2-alive"))
    store.mark_running(live.uid)
    for uid in (killed.uid, live.uid):
        (output / f"{uid}.partial").mkdir()
        (output / f"{uid}.partial" / "output_masks_0000.raw").write_bytes(b"half")

    class KeepsLiveOwner(LocalPoolRunner):
        def recover(self):  # the owner "2-alive" stands for a worker that is still running its job
            return self.store.fail_unfinished_of("1-stopped", INTERRUPTED)

    settings = dataclasses.replace(Settings(), data_root=data, output_root=output)
    runner = KeepsLiveOwner(store, lambda job: None, workers=1, lock_dir=output / ".owners")
    pipeline = Pipeline(settings)
    add_job_routes(Gateway(__name__, pipeline=pipeline), pipeline, store=store, runner=runner)
    assert store.get(killed.uid).error == INTERRUPTED
    assert not (output / f"{killed.uid}.partial").exists()
    assert (output / f"{live.uid}.partial").is_dir()  # its job may still finish


def _pids_logging(log: str, text: str) -> set[str]:
    """Process ids of the log lines holding ``text`` (logging.yaml puts the pid in field 4)."""
    return {line.split()[3] for line in log.splitlines() if text in line}


def _wait_for_ping(server: RunningServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.log()
        try:
            if requests.get(server.url + "/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or busy starting
            time.sleep(0.2)
    raise AssertionError(f"server did not answer /ping in {timeout}s:\n{server.log()}")


def test_every_gunicorn_worker_answers_for_every_job(tmp_path):
    data, output = tmp_path / "data", tmp_path / "jobs"
    write_study(data / "study", shape=(8, 64, 64))
    server = RunningServer({"INFERENCE_DATA_ROOT": str(data), "INFERENCE_OUTPUT_ROOT": str(output),
                            "INFERENCE_WORKERS": "2", "INFERENCE_THREADS": "2"}, tmp_path, wait=False)
    try:
        _wait_for_ping(server)  # jobs need no model warm-up: do not wait for READY
        def get(path: str) -> requests.Response:  # a new connection each time: either worker may take it
            response = requests.get(server.url + path, headers={"Connection": "close"}, timeout=30)
            assert response.status_code in (200, 202), response.text
            return response

        uids = [requests.post(server.url + "/job/", json={"job_name": "3dblur", "in_dir": "study"},
                              timeout=30).json()["uid"] for _ in range(4)]
        for uid in uids:
            final = poll(get, uid, timeout=120)
            assert final.status_code == 200, final.text
            assert (output / final.json()["output_dir"]).is_dir()
        # which worker accepts a connection is up to the kernel and machine load: keep asking
        # (every answer must be right) until both have answered, or give up after a bound
        deadline = time.monotonic() + 60
        while len(_pids_logging(server.log(), "GET /query/")) < 2 and time.monotonic() < deadline:
            for uid in uids:
                assert get(f"/query/{uid}").json()["msg"] == "Job has completed"
    finally:
        server.stop()
    log = server.log()
    assert len(_pids_logging(log, "GET /query/")) == 2, "both workers should have answered queries"
    assert _pids_logging(log, "completed: ")


# -- what a client needs to finish a job: both URLs, the data root named, the files fetched ------------
def test_post_job_without_the_slash_is_served_not_redirected(client, roots):
    write_study(roots[0] / "s", shape=(2, 8, 8))
    response = client.post("/job", json={"job_name": "3dblur", "in_dir": "s"})
    assert response.status_code == 201, (response.status_code, response.data[:200])
    assert poll(client.get, response.get_json()["uid"]).status_code == 200


def test_in_dir_errors_name_the_data_root_setting_not_its_path(roots):
    data, output = roots
    pipeline = Pipeline(dataclasses.replace(Settings(), data_root=data, output_root=output))
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline)
    response = app.test_client().post("/job", json={"job_name": "3dblur", "in_dir": "case1"})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert "relative to the server's data root, INFERENCE_DATA_ROOT" in error and str(data) not in error


def test_a_completed_jobs_files_are_listed_and_downloaded(client, roots):
    data, output = roots
    write_study(data / "s", shape=(3, 8, 10))
    uid = submit(client, job_name="get-probability-mask", in_dir="s").get_json()["uid"]
    assert poll(client.get, uid).status_code == 200
    listing = client.get(f"/job/{uid}/files")
    assert listing.status_code == 200
    files = listing.get_json()["files"]
    on_disk = sorted(p.name for p in (output / uid).iterdir())
    assert [f["name"] for f in files] == on_disk
    for entry in files:
        got = client.get(f"/job/{uid}/files/{entry['name']}")
        assert got.status_code == 200
        assert got.data == (output / uid / entry["name"]).read_bytes() and len(got.data) == entry["bytes"]
    response_json = json.loads(client.get(f"/job/{uid}/files/response.json").data)
    assert response_json["parts"][0]["file"] in on_disk


def test_job_files_stay_inside_the_jobs_folder(client, roots, tmp_path):
    data, output = roots
    write_study(data / "s", shape=(2, 8, 8))
    first = submit(client, job_name="get-probability-mask", in_dir="s").get_json()["uid"]
    second = submit(client, job_name="get-probability-mask", in_dir="s").get_json()["uid"]
    assert poll(client.get, first).status_code == 200 and poll(client.get, second).status_code == 200
    (tmp_path / "secret.txt").write_text("secret")
    (output / first / "link.txt").symlink_to(tmp_path / "secret.txt")
    for name in ("../jobs.sqlite3", "..%2Fjobs.sqlite3", f"..%2F{second}%2Fresponse.json", "link.txt",
                 "%2Fetc%2Fpasswd", ".", ".."):
        response = client.get(f"/job/{first}/files/{name}")
        assert response.status_code == 404, name
        assert b"secret" not in response.data
    assert "link.txt" not in [f["name"] for f in client.get(f"/job/{first}/files").get_json()["files"]]


def test_files_of_unknown_failed_or_unfinished_jobs_are_refused(client, roots):
    assert client.get("/job/nope/files").status_code == 404
    write_study(roots[0] / "mixed" / "a", shape=(2, 8, 8), description="First")
    write_study(roots[0] / "mixed" / "b", shape=(3, 8, 8), description="Second")  # the blur takes one series
    failed = submit(client, job_name="3dblur", in_dir="mixed").get_json()["uid"]
    poll(client.get, failed)
    response = client.get(f"/job/{failed}/files")
    assert response.status_code == 409 and "has failed" in response.get_json()["error"]
    assert client.get(f"/job/{failed}/files/response.json").status_code == 409


def readme_job_example() -> str:
    """The first shell block of the jobs page (docs/jobs.md)."""
    readme = (PROJECT_ROOT / "docs" / "jobs.md").read_text()
    section = readme[readme.index("# Asynchronous jobs"):]
    start = section.index("```sh\n") + 6
    return section[start:section.index("\n```", start)]


def test_the_readme_job_example_runs_verbatim(tmp_path):
    """The jobs page's commands, as written (only the port differs), against a server started as it says."""
    example = readme_job_example()
    root = "../shared/data/studies"
    assert f"INFERENCE_DATA_ROOT={root}" in example
    if not (PROJECT_ROOT / root / "Study1").is_dir():
        pytest.skip(f"needs the shared data at {root} (present on the CI machine, not in a fresh clone)")
    commands = [line for line in example.splitlines() if not line.startswith(("INFERENCE_DATA_ROOT", "make "))]
    server = RunningServer({"INFERENCE_DATA_ROOT": root, "INFERENCE_OUTPUT_ROOT": str(tmp_path / "jobs")}, tmp_path)
    try:
        script = "\n".join(commands).replace("localhost:8900", f"127.0.0.1:{server.port}")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    finally:
        server.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"msg":"Job has completed"' in done.stdout
    assert (tmp_path / "response.json").is_file()
    response_json = json.loads((tmp_path / "response.json").read_text())
    assert all(part["binary_type"] == "dicom" for part in response_json["parts"]) and response_json["parts"]
