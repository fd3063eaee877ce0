"""The DICOM node under faults (issue 36), with a real Orthanc where the fault is Orthanc's part.

A node killed mid-transfer, and a spool that fills mid-study, leave a partial study that must never
run: it waits for a re-send (then runs once, whole) and is reported. A spool too full to route a
complete study backs off and logs once, and audits the arrival once. A PACS that is down (stopped or
frozen) costs a prior look-up a few seconds once, then nothing until it is asked again. The node's
instance counters and outbox gauge are served and move. The rest are unit tests of the pieces.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from bench.pacs_services import Orthanc, c_store, free_port, orthanc_missing
from inference.jobs.store import FAILED, INCOMPLETE
from inference.pacs.retry import RepeatedFailures
from inference.pacs.spool import FOUND_AT_START, StudySpool
from tests.conftest import require, shared_data, write_study
from tests.test_dicom_node import eventually, start_light_node


def jobs_of(node_folder: Path, study_uid: str) -> list[tuple[str, str | None]]:
    """(status, error) of the node's jobs (local backend) on a study."""
    with sqlite3.connect(node_folder / "jobs" / "jobs.sqlite3") as db:
        return db.execute("SELECT status, error FROM jobs WHERE study_uid = ? ORDER BY created",
                          (study_uid,)).fetchall()


def audited(node_folder: Path, study_uid: str, event: str) -> int:
    """How many records of ``event`` the node's audit trail holds for a study."""
    path = node_folder / "jobs" / "audit.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines()
               if json.loads(line)["event"] == event and json.loads(line)["study_uid"] == study_uid)


def send_again(orthanc: Orthanc, study_uid: str) -> None:
    """The operator re-sends a study from Orthanc to the node (what Orthanc Explorer's "Send to" does)."""
    response = requests.post(f"{orthanc.url}/modalities/hippoai/store", timeout=120,
                             json={"Resources": [orthanc.study_id(study_uid)]})
    assert response.ok, response.text


def test_a_node_killed_mid_transfer_runs_nothing_until_the_study_is_sent_again(tmp_path):
    require(orthanc_missing())
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port)
    node = None
    try:
        args = ("--stable-seconds", "1", "--complete-on-release", orthanc.aet)  # as compose configures it
        node = start_light_node(tmp_path, *args, port=node_port)
        files = write_study(tmp_path / "study", shape=(300, 64, 64), description="Report me")
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        incoming = node.folder / "pacs" / "spool" / "incoming"
        assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)  # Orthanc routes it
        deadline = time.monotonic() + 60
        while len(list(incoming.glob("*/*.dcm"))) < 20:  # polled often: the whole study takes about a second
            assert time.monotonic() < deadline, node.log_text()[-2000:]
            time.sleep(0.01)
        os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()
        node.stop()
        received = len(list(incoming.glob("*/*.dcm")))
        assert 0 < received < len(files), "the kill came mid-transfer"

        metrics_port = free_port()
        node = start_light_node(tmp_path, *args, port=node_port,  # restarted on the same folders
                                env={"INFERENCE_PACS_METRICS_PORT": str(metrics_port)})
        uid = re.escape(study_uid)
        log = node.wait_for_log(rf"study={uid}\] study incomplete and nothing completed it: {received} instances", 30)
        assert FOUND_AT_START in log
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert metric(text, "inference_dicom_node_incomplete_studies_total") == 1
        time.sleep(1.5)
        assert f"study={study_uid}] study complete" not in node.log_text(), "a partial study must never run"
        [(status, error)] = jobs_of(node.folder, study_uid)  # reported in the job store too
        assert status == FAILED and error.startswith(INCOMPLETE)

        send_again(orthanc, study_uid)
        log = node.wait_for_log(rf"study={uid} input_hash=\w+\] job \w+ completed", 60)
        assert f"study={study_uid}] study complete: {len(files)} instances in 1 series" in log
        assert len(re.findall(rf"study={uid}\] study complete", log)) == 1
        assert [status for status, _ in jobs_of(node.folder, study_uid)] == [FAILED, "completed"]
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


@pytest.fixture
def small_spool(tmp_path):
    """The spool folder of ``start_light_node(tmp_path / "node")`` on a 2 MiB tmpfs (root only; skipped otherwise)."""
    spool = tmp_path / "node" / "node" / "pacs" / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs for the spool cannot be mounted here (needs root): {mounted.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def resize(spool: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(spool)], check=True)


def test_a_spool_that_fills_mid_study_keeps_the_partial_study_from_running(tmp_path, small_spool):
    require(orthanc_missing())
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port)
    node = None
    try:
        node = start_light_node(tmp_path / "node", "--stable-seconds", "1", "--complete-on-release", orthanc.aet,
                                port=node_port, env={"INFERENCE_MIN_FREE_SPACE_MB": "0"})  # the disk itself fills
        files = write_study(tmp_path / "study", shape=(96, 128, 128), description="Report me")  # 3 MiB
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        uid = re.escape(study_uid)
        assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)
        log = node.wait_for_log(r"association from ORTHANC \w+: \d+ instances stored, \d+ refused or failed", 60)
        node.wait_for_log(rf"study={uid}\] study incomplete: the association from ORTHANC ended after", 10)
        node.wait_for_log(rf"study={uid}\] study incomplete and nothing completed it", 10)
        time.sleep(2)
        log = node.log_text()
        assert f"study={study_uid}] study complete" not in log
        assert [status for status, _ in jobs_of(node.folder, study_uid)] == [FAILED], "reported, never run"
        assert "Traceback" not in log

        resize(small_spool, "16m")  # room again; the operator sends the study again
        send_again(orthanc, study_uid)
        log = node.wait_for_log(rf"study={uid} input_hash=\w+\] job \w+ completed", 60)
        assert f"study={study_uid}] study complete: {len(files)} instances in 1 series" in log
        assert audited(node.folder, study_uid, "study-received") == 1
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


def test_a_spool_too_full_to_route_backs_off_logs_once_and_audits_the_arrival_once(tmp_path, small_spool):
    node = start_light_node(tmp_path / "node", "--stable-seconds", "3", env={"INFERENCE_MIN_FREE_SPACE_MB": "0"})
    try:
        files = write_study(tmp_path / "study", description="Report me")
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
        filler = small_spool / "filler"  # the disk fills before the study is routed: its state cannot be written
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False)
        node.wait_for_log(rf"moving study {re.escape(study_uid)}--\d+ on failed", 10)
        time.sleep(4)  # 40 passes of the watcher
        log = node.log_text()
        assert log.count("Traceback") == 1, "one traceback, not one per pass"
        assert len(re.findall(r"moving study \S+ on failed", log)) <= 2
        assert audited(node.folder, study_uid, "study-received") == 1

        filler.unlink()
        log = node.wait_for_log(rf"study={re.escape(study_uid)} input_hash=\w+\] job \w+ completed", 90)
        assert re.search(r"moving study \S+ on works again after \d+ failures", log)
        assert audited(node.folder, study_uid, "study-received") == 1
        assert len(re.findall(rf"study={re.escape(study_uid)}\] study complete", log)) == 1
    finally:
        node.stop()


def test_a_spool_below_the_free_space_floor_refuses_associations_and_counts_them(tmp_path):
    metrics_port = free_port()
    node = start_light_node(tmp_path, env={"INFERENCE_MIN_FREE_SPACE_MB": str(1 << 40),
                                           "INFERENCE_PACS_METRICS_PORT": str(metrics_port)})
    try:
        files = write_study(tmp_path / "study", description="Report me")
        with pytest.raises(ConnectionError, match="refused the association"):
            c_store(files, "127.0.0.1", node.port, node.ae_title)
        node.wait_for_log(r"association from SCANNER .* refused: insufficient storage: the pacs store", 10)
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert re.search(r'inference_store_full_total\{store="pacs"\} [1-9]', text), text
        assert not list((node.folder / "pacs" / "spool" / "incoming").iterdir())
    finally:
        node.stop()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the node's metrics"
    return float(match.group(1))


def test_the_node_serves_its_received_sent_and_outbox_metrics_and_logs_a_down_destination_once(tmp_path):
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    metrics_port, destination_port = free_port(), free_port()
    node = start_light_node(tmp_path, "--destination", f"DEST@127.0.0.1:{destination_port}",
                            env={"INFERENCE_PACS_METRICS_PORT": str(metrics_port),
                                 "INFERENCE_PACS_RETRY_MAX_SECONDS": "1"})
    destination = None
    try:
        def scrape() -> str:
            return requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text

        files = write_study(tmp_path / "study", description="Report me")
        assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
        node.wait_for_log(r"delivery of 1 results to DEST@.* failed", 60)  # the destination is down
        text = scrape()
        assert metric(text, "inference_dicom_node_received_total") == len(files)
        assert metric(text, "inference_dicom_node_outbox") == 1
        assert metric(text, "inference_dicom_node_sent_total") == 0

        time.sleep(2.5)  # a few more attempts (the wait is at most 1 s here): each is not logged again
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        destination = ae.start_server(("127.0.0.1", destination_port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
        log = node.wait_for_log(r"1 results delivered to DEST@", 30)
        assert len(re.findall(r"delivery of 1 results to DEST@.* failed", log)) == 1
        assert re.search(r"1 results delivered to DEST@\S+ after ([2-9]|\d\d+) failed attempts", log)
        assert eventually(lambda: metric(scrape(), "inference_dicom_node_sent_total") == 1, 5)
        assert metric(scrape(), "inference_dicom_node_outbox") == 0
    finally:
        if destination is not None:
            destination.shutdown()
        node.stop()


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
def test_a_pacs_that_is_down_costs_a_prior_look_up_seconds_once_then_nothing(tmp_path, fault):
    from dicomweb_client.api import DICOMwebClient

    from handlers.hippocampus.report import dicom_results
    from inference.config import get_settings
    from inference.dicom.series import load_volume
    from inference.pacs.priors import CIRCUITS, Patient, find_in_pacs
    from models.registry import registry_for
    from tests.test_hippocampus_priors import PRIOR_DATE, copy_study

    require(orthanc_missing())
    crop = sorted(next(shared_data("studies", "Study1").glob("*HCrop*")).iterdir())
    prior = copy_study([pydicom.dcmread(p) for p in crop], PRIOR_DATE)
    volume = load_volume(prior)
    labels = np.zeros(volume.voxels.shape, np.uint8)  # any labels: the report's volumes are what is read back
    labels[10:20, 10:20, 10:20], labels[20:25, 10:20, 10:20] = 1, 2
    version = registry_for(get_settings().model_manifest).family("hippocampus").resolve("1.0-fast")
    [(_, sr)] = dicom_results(volume, labels, version.structures, version.provenance, ["sr"])
    orthanc = Orthanc(tmp_path / "orthanc", node_port=free_port())
    url = f"{orthanc.url}/dicom-web"
    try:
        DICOMwebClient(url=url).store_instances([*prior, sr])
        patient = Patient.of(prior[0])
        current = "1.2.3.4.5"
        assert find_in_pacs(url, patient, current), "found while the PACS is up"
        if fault == "stopped":
            orthanc.stop()
        else:
            os.killpg(orthanc.process.pid, signal.SIGSTOP)  # up but not answering: connects, never replies

        started = time.monotonic()
        assert find_in_pacs(url, patient, current, timeout=3, retry_after=2) == []
        assert time.monotonic() - started < 4, "one look-up is held at most its deadline"
        started = time.monotonic()
        assert find_in_pacs(url, patient, current, timeout=3, retry_after=2) == []
        assert time.monotonic() - started < 0.1, "the PACS is not asked again meanwhile"

        if fault == "frozen":
            os.killpg(orthanc.process.pid, signal.SIGCONT)
            time.sleep(2.1)
            assert find_in_pacs(url, patient, current, timeout=3, retry_after=2), "asked again, and it answers"
    finally:
        if fault == "frozen" and orthanc.process.poll() is None:
            os.killpg(orthanc.process.pid, signal.SIGCONT)
        orthanc.stop()
        CIRCUITS.answered(url)


# -- the pieces --------------------------------------------------------------------------------


def test_files_found_in_the_spool_at_start_wait_for_a_re_send(tmp_path):
    files = write_study(tmp_path / "study")
    spool = StudySpool(tmp_path / "spool", stable_seconds=1)
    for path in files[:3]:
        _, folder = spool.store(path.read_bytes(), "ORTHANC")
    restarted = StudySpool(tmp_path / "spool", stable_seconds=1)  # the node stopped mid-study
    assert restarted.incomplete() == {folder: FOUND_AT_START}
    later = time.time() + 5
    assert restarted.take_stable(now=later) == []
    assert restarted.stalled(now=later) == [(restarted.incoming / folder, FOUND_AT_START)]
    restarted.reported(folder)
    assert restarted.stalled(now=later) == [], "reported once"
    assert StudySpool(tmp_path / "spool", stable_seconds=1).stalled(now=later) == [], "and not again after a restart"

    resent_from = time.time()
    assert restarted.confirm([folder], since=resent_from - 60) == [], "an association older than the mark"
    for path in files:
        restarted.store(path.read_bytes(), "ORTHANC")
    assert restarted.confirm([folder], since=resent_from) == [folder]
    [taken] = restarted.take_stable(now=time.time() + 5)
    assert len(list(taken.glob("*.dcm"))) == len(files) and not (taken / ".incomplete.json").exists()


def test_a_repeated_failure_waits_longer_each_time_and_is_logged_once_with_a_count(caplog):
    now = [0.0]
    failures = RepeatedFailures(logging.getLogger("test.retry"), first_wait=0.5, max_wait=4, remind_seconds=600,
                                clock=lambda: now[0])
    attempts = []

    def step():
        attempts.append(now[0])
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.INFO, "test.retry"):
        while now[0] < 60:  # a watcher's 0.1 s passes for a minute
            failures.run("spool", "routing", step)
            now[0] += 0.1
    assert len(attempts) < 20, "backed off, not 600 attempts"
    waits = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert waits[:4] == pytest.approx([0.5, 1.0, 2.0, 4.0], abs=0.11)
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
    assert failures.failing() == {"spool": len(attempts)}
    with caplog.at_level(logging.INFO, "test.retry"):
        now[0] += 4
        assert failures.run("spool", "routing", lambda: None)
    assert f"routing works again after {len(attempts)} failures" in caplog.records[-1].getMessage()
    assert failures.failing() == {}


def test_a_series_short_of_its_announced_instances_or_with_a_gap_is_refused_before_the_model(tmp_path):
    from inference.dicom.series import load_volume
    from inference.errors import UnprocessableInput

    datasets = [pydicom.dcmread(p) for p in write_study(tmp_path / "study", shape=(10, 16, 16))]
    for ds in datasets:
        ds.ImagesInAcquisition = 10
    assert load_volume(datasets).voxels.shape == (10, 16, 16)
    with pytest.raises(UnprocessableInput, match=r"holds 6 instances, but its headers announce 10 \(ImagesInAc"):
        load_volume(datasets[:6])
    for ds in datasets:
        del ds.ImagesInAcquisition
    with pytest.raises(UnprocessableInput, match=r"a gap of 4.00 mm .* 2.00 mm apart: slices are missing"):
        load_volume(datasets[:4] + datasets[5:])
    assert load_volume(datasets[:6]).voxels.shape == (6, 16, 16), "a series whose headers say nothing more"


def test_a_job_whose_prior_pacs_is_frozen_finishes_within_the_look_ups_deadline(tmp_path):
    """The hippocampus job itself, with INFERENCE_PRIOR_DICOMWEB_URL at an Orthanc that accepts connections and
    never answers: it used to wait forever; now its look-up gives up after INFERENCE_PRIOR_TIMEOUT_SECONDS."""
    import threading

    from inference.pacs.priors import CIRCUITS
    from tests.test_hippocampus_priors import WEIGHTS, run, settings_for

    require(orthanc_missing())
    if not WEIGHTS.exists():
        pytest.skip(f"model weights {WEIGHTS.name} are not in models/")
    crop = [pydicom.dcmread(p) for p in sorted(next(shared_data("studies", "Study1").glob("*HCrop*")).iterdir())]
    orthanc = Orthanc(tmp_path / "orthanc", node_port=free_port())
    url = f"{orthanc.url}/dicom-web"
    os.killpg(orthanc.process.pid, signal.SIGSTOP)
    try:
        settings = settings_for(tmp_path, prior_dicomweb_url=url, prior_timeout_seconds=1.0)
        answers: list[dict] = []
        job = threading.Thread(target=lambda: answers.append(run(crop, settings)[0]), daemon=True)
        job.start()
        job.join(120)
        assert not job.is_alive(), "the job is held by the frozen PACS"
        assert answers[0]["change_since_prior"]["prior"] is None and "quality" in answers[0]
    finally:
        os.killpg(orthanc.process.pid, signal.SIGCONT)
        orthanc.stop()
        CIRCUITS.answered(url)
