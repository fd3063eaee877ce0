"""The DICOM node against a real Orthanc (Debian's package, the shipped config and Lua script).

End to end: Study1 sent to Orthanc comes back as SEG + SR + Secondary Capture in the same study,
equal to what the HTTP path answers. Then the node alone: calling AEs not allowed are refused, a
study no rule matches is logged and left, a half-sent study waits until stable and runs once, a
study a routing PACS sent is complete when its association is released (not one aborted, not a
scanner's),
results for a destination that is down wait in the outbox (across a restart) until it is up, and a
study sent again gets its stored results again (not recomputed, not duplicated in Orthanc).
"""

from __future__ import annotations

import collections
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from bench.pacs_services import DicomNodeProcess, Orthanc, c_store, free_port, orthanc_missing
from inference.audit import verify
from inference.jobs.store import COMPLETED, JobStore
from tests.conftest import require, shared_data, write_study

#: Rules for the node-only tests: a mock command (no model to load) on generated series.
LIGHT_RULES = """
rules:
  - name: mock-report
    match:
      series_description: "^Report me"
    command: get-secondary-capture
"""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc routing to a node with the shipped rules, the node sending results back to Orthanc."""
    require(orthanc_missing())
    root = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc", node_port=node_port)
    try:
        node = DicomNodeProcess(root / "node", port=node_port, args=[
            "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--stable-seconds", "1",
            "--complete-on-release", orthanc.aet])  # as deployed (docker-compose.yml)
    except BaseException:
        orthanc.stop()
        raise
    yield orthanc, node
    node.stop()
    orthanc.stop()


def eventually(condition, timeout: float = 10) -> bool:
    """Whether ``condition()`` becomes true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for_results(orthanc: Orthanc, study_uid: str, timeout: float) -> dict[str, dict]:
    """The SEG, SR and result Secondary Capture series of a study, once Orthanc holds all three."""
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while time.monotonic() < deadline:
        found = {}
        for series in orthanc.series_of(study_uid):
            modality = series["MainDicomTags"].get("Modality")
            if modality in ("SEG", "SR", "OT"):
                found[modality] = series
        if len(found) == 3:
            return found
        time.sleep(0.5)
    raise AssertionError(f"after {timeout}s Orthanc holds only {sorted(found)} of SEG, SR, OT for {study_uid};\n"
                         f"Orthanc log:\n{orthanc.log_text()[-2000:]}")


def test_study_routed_by_orthanc_comes_back_as_seg_sr_and_report(pacs, server, tmp_path):
    from inference.config import get_settings
    from inference.dicom.series import sort_by_position
    from inference.protocol.client import send_inference_request
    from models.registry import registry_for
    from tests.dicom_readback import decode_segmentation, report_volumes

    orthanc, node = pacs
    files = sorted(shared_data("studies", "Study1").rglob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    study_uid = str(headers[0].StudyInstanceUID)
    started = time.monotonic()
    assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)
    results = wait_for_results(orthanc, study_uid, 60)
    elapsed = time.monotonic() - started
    seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(results["SEG"])))
    sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(results["SR"])))
    sc = pydicom.dcmread(io.BytesIO(orthanc.instance_file(results["OT"])))
    assert {seg.StudyInstanceUID, sr.StudyInstanceUID, sc.StudyInstanceUID} == {study_uid}
    assert seg.PatientID == sr.PatientID == sc.PatientID == headers[0].PatientID

    http = send_inference_request(server.url + "/hippocampus", {}, files)
    part = http.response_json["parts"][0]
    shape = part["binary_data_shape"]
    mask = np.frombuffer(http.buffers[0], np.uint8).reshape(shape["depth"], shape["height"], shape["width"])
    crop = sort_by_position([ds for ds in headers if ds.SeriesInstanceUID == part["SeriesInstanceUID"]])
    labels = decode_segmentation(
        seg, registry_for(get_settings().model_manifest).family("hippocampus").resolve(None).structures,
        [ds.SOPInstanceUID for ds in crop])
    assert np.array_equal(labels, mask) and mask.any()
    measures = http.response_json["series_ml_json"][part["SeriesInstanceUID"]]
    assert report_volumes(sr) == {"Anterior": measures["anterior_volume_mm3"],
                                  "Posterior": measures["posterior_volume_mm3"]}

    log = node.wait_for_log(r"study done", 30)
    hashes = set(re.findall(rf"study={re.escape(study_uid)} input_hash=([0-9a-f]{{64}})", log))
    assert len(hashes) == 1, "every step logs the study and one input hash"
    jobs = [JobStore(node.folder / "jobs" / "jobs.sqlite3").get(uid)
            for uid in re.findall(r"job ([0-9a-f]{32}) queued", log)]
    assert [job.status for job in jobs] == [COMPLETED]
    # the node's input hash is the pipeline's (the same study and JSON hash the same through every door)
    assert json.loads((Path(jobs[0].output_dir) / "job.json").read_text())["input_hash"] in hashes
    assert elapsed < 60
    # Orthanc's stable event fires again when the results arrive: the Lua script must not route again
    assert eventually(lambda: "was already routed" in orthanc.log_text(), 15)
    assert len(re.findall(r"sent to hippoai", orthanc.log_text())) == 1
    assert len(re.findall(r"job [0-9a-f]{32} queued", node.log_text())) == 1


def test_a_study_holding_our_seg_sr_and_report_is_accepted_when_sent_again(pacs, tmp_path):
    """An operator re-sends a study that already holds our results: every instance is accepted (Orthanc failed
    the whole transfer when the node refused SEG and SR), ours are ignored, the stored results go again."""
    from tests.test_review_pacs import new_study

    orthanc, node = pacs
    files = new_study(sorted(next(shared_data("studies", "Study1").glob("*HCrop*")).iterdir()), tmp_path / "study")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    uid = re.escape(study_uid)
    assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)
    first = {modality: series["Instances"] for modality, series in wait_for_results(orthanc, study_uid, 120).items()}
    before = len(node.wait_for_log(rf"study={uid} input_hash=\w+\] job \w+: every result confirmed", 30))

    response = requests.post(f"{orthanc.url}/modalities/hippoai/store", timeout=120,
                             json={"Resources": [orthanc.study_id(study_uid)]})
    assert response.ok, f"Orthanc could not send the study: {response.text}\n{orthanc.log_text()[-1500:]}"
    log = node.wait_for_log(rf"study={uid} input_hash=\w+\] job \w+: every result confirmed", 60, count=2)
    # Orthanc may send them on more than one association (it reopens one for another SOP class)
    resent = re.findall(r"association from ORTHANC released: (\d+) instances stored(?:, (\d+) of our own results "
                        r"ignored)?\n", log[before:])
    assert sum(int(stored) for stored, _ in resent) == len(files) and sum(int(own or 0) for _, own in resent) == 3
    assert f"study={study_uid}] study complete: {len(files)} instances in 1 series" in log
    assert re.search(rf"study={uid} input_hash=\w+\] rule .*delivering its stored results again", log)
    assert len(re.findall(rf"study={uid} input_hash=\w+\] rule \S+: job \w+ queued", log)) == 1, "not run again"
    assert {modality: series["Instances"] for modality, series in wait_for_results(orthanc, study_uid, 5).items()} \
        == first, "the same results, nothing duplicated"


def start_light_node(folder: Path, *args: str, env: dict | None = None, port: int | None = None) -> DicomNodeProcess:
    """A node with mock rules (no model), stable after 2 s, accepting only SCANNER and ORTHANC."""
    rules = folder / "rules.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    rules.write_text(LIGHT_RULES)
    return DicomNodeProcess(folder / "node", port=port, env=env, args=[
        "--rules", str(rules), "--stable-seconds", "2", "--allow-ae", "SCANNER", "--allow-ae", "ORTHANC", *args])


@pytest.fixture(scope="module")
def light_node(tmp_path_factory):
    """One light node shared by the tests that need no destination."""
    node = start_light_node(tmp_path_factory.mktemp("light"))
    yield node
    node.stop()


def test_calling_ae_not_allowed_is_rejected(light_node, tmp_path):
    node = light_node
    files = write_study(tmp_path / "study", description="Report me")
    with pytest.raises(ConnectionError, match="refused the association from INTRUDER"):
        c_store(files, "127.0.0.1", node.port, node.ae_title, calling_ae="INTRUDER")
    node.wait_for_log(r"association from INTRUDER .* rejected", 10)
    assert c_store(files[:1], "127.0.0.1", node.port, node.ae_title, calling_ae="SCANNER") == 1


def test_study_no_rule_matches_is_logged_and_left(light_node, tmp_path):
    node = light_node
    files = write_study(tmp_path / "study", description="T2 axial")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
    log = node.wait_for_log(rf"study={re.escape(study_uid)}\] no routing rule matches", 30)
    assert not re.search(rf"study={re.escape(study_uid)} .*queued", log) and node.process.poll() is None
    assert eventually(lambda: not list((node.folder / "pacs" / "spool" / "work").iterdir()))
    # still serving
    assert c_store(files[:1], "127.0.0.1", node.port, node.ae_title) == 1


def test_half_sent_study_waits_until_stable_and_runs_once(light_node, tmp_path):
    node = light_node
    files = write_study(tmp_path / "study", description="Report me")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert c_store(files, "127.0.0.1", node.port, node.ae_title, abort_after=3) == 3
    node.wait_for_log("association from SCANNER aborted: 3 instances stored", 10)
    time.sleep(0.5)  # less than --stable-seconds: the study is still being received
    assert f"study={study_uid}] study complete" not in node.log_text()
    assert c_store(files[3:], "127.0.0.1", node.port, node.ae_title) == len(files) - 3
    log = node.wait_for_log(rf"study={re.escape(study_uid)} input_hash=\w+\] job \w+ completed", 60)
    assert f"study complete: {len(files)} instances in 1 series" in log
    # the same study again (a PACS's stable event firing twice): recognised, not run again
    assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
    log = node.wait_for_log("already processed", 30)
    assert len(re.findall(rf"study={re.escape(study_uid)} input_hash=\w+\] rule mock-report: job", log)) == 1


def test_a_study_from_a_routing_pacs_is_complete_when_its_association_is_released(tmp_path):
    # stable only after 60 s, except what ORTHANC sends: complete on the release of its association
    node = start_light_node(tmp_path, "--stable-seconds", "60", "--complete-on-release", "ORTHANC")
    try:
        studies = {}
        for name, calling, abort_after in (("routed", "ORTHANC", None), ("aborted", "ORTHANC", 2),
                                           ("scanner", "SCANNER", None)):
            files = write_study(tmp_path / name, description="Report me")
            studies[name] = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            c_store(files, "127.0.0.1", node.port, node.ae_title, calling_ae=calling, abort_after=abort_after)
        log = node.wait_for_log(rf"study={re.escape(studies['routed'])} input_hash=\w+\] job \w+ completed", 30)
        assert "or when ORTHANC releases its association" in log
        time.sleep(1)  # the watcher would have taken them by now had they been complete
        log = node.log_text()
        # a routing PACS's aborted association leaves its study incomplete (it waits for a re-send); a sender not
        # listed keeps the stability wait (senders that trickle)
        for name in ("aborted", "scanner"):
            assert f"study={studies[name]}] study complete" not in log, name
        assert f"study={studies['aborted']}] study incomplete: the association from ORTHANC, a routing PACS" in log
        incoming = node.folder / "pacs" / "spool" / "incoming"
        waiting = collections.Counter(path.parent.name for path in incoming.glob("*/*.dcm"))
        assert waiting == {studies["aborted"]: 2, studies["scanner"]: 8}
    finally:
        node.stop()


def test_a_study_orthanc_routes_on_two_associations_is_one_study_within_the_release_grace(tmp_path):
    # Orthanc 1.10 opens a second association for this study (bench/pacs_reopen.py); the grace
    # (INFERENCE_PACS_RELEASE_GRACE_SECONDS, default 0.5 s) must keep both in one complete study
    from bench.pacs_reopen import mixed_syntax_study

    require(orthanc_missing())
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port)
    try:
        node = start_light_node(tmp_path, "--stable-seconds", "60", "--complete-on-release", orthanc.aet,
                                port=node_port)
        try:
            files = mixed_syntax_study(tmp_path / "study")
            study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)
            log = node.wait_for_log(rf"study={re.escape(study_uid)}\] study complete", 60)
            assert len(re.findall(r"association from ORTHANC released", log)) == 2, "Orthanc reopened"
            assert f"study={study_uid}] study complete: {len(files)} instances in 4 series" in log
            time.sleep(1)
            assert len(re.findall(rf"study={re.escape(study_uid)}\] study complete", node.log_text())) == 1
            assert not list((node.folder / "pacs" / "spool" / "incoming").glob("*/*.dcm")), "nothing left behind"
        finally:
            node.stop()
    finally:
        orthanc.stop()


def test_results_wait_in_the_outbox_while_the_destination_is_down_and_after_a_restart(tmp_path):
    require(orthanc_missing())
    orthanc_port = free_port()
    args = ("--destination", f"ORTHANC@127.0.0.1:{orthanc_port}")
    env = {"INFERENCE_PACS_RETRY_MAX_SECONDS": "1"}
    node = start_light_node(tmp_path, *args, env=env)
    files = write_study(tmp_path / "study", description="Report me")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
    node.wait_for_log(rf"study={re.escape(study_uid)} input_hash=\w+\] delivery of 1 results to .* failed", 60)
    outbox = node.folder / "pacs" / "outbox"
    assert len(list(outbox.rglob("*.dcm"))) == 1
    node.stop()
    node = start_light_node(tmp_path, *args, env=env, port=node.port)  # a restart, same folders
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node.port, dicom_port=orthanc_port)
    try:
        node.wait_for_log(rf"study={re.escape(study_uid)} input_hash=\w+\] 1 results delivered", 30)
        modalities = [s["MainDicomTags"].get("Modality") for s in orthanc.series_of(study_uid)]
        assert modalities == ["OT"]
        assert not list(outbox.rglob("*.dcm"))
        node.wait_for_log("study done", 10)
        assert eventually(lambda: not list((node.folder / "pacs" / "spool" / "work").iterdir()))
        trail = [json.loads(line) for line in (node.folder / "jobs" / "audit.jsonl").read_text().splitlines()]
        mine = [(e["event"], e["user"]) for e in trail if e["study_uid"] == study_uid]
        assert mine == [("study-received", "ae:SCANNER"), ("result-produced", None),
                        ("result-sent", f"ae:{node.ae_title}")]
        sent = trail[-1]
        assert sent["detail"]["destinations"] == [f"ORTHANC@127.0.0.1:{orthanc_port}"] and sent["input_hash"]
        assert verify(node.folder / "jobs" / "audit.jsonl")[1] is None
    finally:
        orthanc.stop()
        node.stop()


def test_shipped_orthanc_compose_and_node_settings_agree():
    import yaml

    from bench.pacs_services import AUTOROUTE_LUA, ORTHANC_CONFIG, read_orthanc_json
    from inference.config import PROJECT_ROOT, Settings

    orthanc = read_orthanc_json(ORTHANC_CONFIG)
    lua = AUTOROUTE_LUA.read_text()
    ae, host, port = orthanc["DicomModalities"]["hippoai"]
    assert re.search(r"AI_MODALITY = 'hippoai'", lua) and re.search(rf"AI_AET = '{ae}'", lua)
    assert re.search(r"AI_MARK = '(\w+)'", lua).group(1) in orthanc["UserMetadata"]
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    node = compose["services"]["hippoai"]
    assert (node["environment"]["INFERENCE_PACS_AE_TITLE"], int(node["environment"]["INFERENCE_PACS_PORT"])) == \
        (ae, port) and host == "hippoai"
    known = {f.metadata["env"] for f in __import__("dataclasses").fields(Settings)}
    assert set(node["environment"]) <= known
    assert node["environment"]["INFERENCE_PACS_DESTINATIONS"] == f"{orthanc['DicomAet']}@orthanc:{orthanc['DicomPort']}"
    mounts = compose["services"]["orthanc"]["volumes"]
    for path in ("deploy/orthanc/orthanc.json", "deploy/orthanc/autoroute.lua"):
        assert any(str(m).startswith(f"./{path}:") for m in mounts) and (PROJECT_ROOT / path).exists()
    assert orthanc["LuaScripts"] == ["/etc/orthanc/autoroute.lua"]


def test_echo_and_compressed_instances_are_accepted_as_sent(light_node, tmp_path):
    from pydicom.uid import JPEGLSLossless, RLELossless
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from inference.dicom.series import load_volume

    node = light_node
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    files = write_study(tmp_path / "study", description="T1 compressed")
    originals = load_volume([pydicom.dcmread(p) for p in files]).voxels
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless if index % 2 else JPEGLSLossless)
        ds.save_as(path, enforce_file_format=True)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
    spooled = sorted((node.folder / "pacs" / "spool" / "incoming").glob(f"{study_uid}/*.dcm"))
    assert {str(pydicom.dcmread(p).file_meta.TransferSyntaxUID) for p in spooled} == {RLELossless, JPEGLSLossless}
    assert np.array_equal(load_volume([pydicom.dcmread(p) for p in spooled]).voxels, originals)
    node.wait_for_log(rf"study={re.escape(study_uid)}\] study complete: {len(files)} instances", 30)


def test_results_stored_by_stow_rs(tmp_path):
    require(orthanc_missing())
    orthanc = Orthanc(tmp_path / "orthanc", node_port=free_port())
    node = None
    try:
        node = start_light_node(tmp_path, "--stow-url", f"{orthanc.url}/dicom-web")
        files = write_study(tmp_path / "study", description="Report me")
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert c_store(files, "127.0.0.1", node.port, node.ae_title) == len(files)
        node.wait_for_log(rf"study={re.escape(study_uid)} input_hash=\w+\] 1 results delivered to STOW-RS", 60)
        assert [s["MainDicomTags"].get("Modality") for s in orthanc.series_of(study_uid)] == ["OT"]
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


@pytest.mark.parametrize("rules, message", [
    ("rules: [{command: get-nothing}]", "unknown inference_command 'get-nothing'"),
    ("rules: [{command: get-hippocampus-volume, params: {dicom_outputs: [mesh]}}]",
     "routing rule rule 1: .*dicom_outputs"),
])
def test_rules_the_pipeline_refuses_stop_the_node_at_start(tmp_path, rules, message):
    from inference.config import PROJECT_ROOT

    (tmp_path / "rules.yaml").write_text(rules)
    result = subprocess.run([sys.executable, "dicom_node.py", "--rules", str(tmp_path / "rules.yaml"),
                             "--root", str(tmp_path / "pacs")], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=120, env={**__import__("os").environ, "INFERENCE_OUTPUT_ROOT": str(tmp_path)})
    assert result.returncode == 2 and re.search(message, result.stderr), result.stderr


def result_sop_uids(orthanc: Orthanc, study_uid: str) -> list[str]:
    """SOP Instance UIDs of the results (Secondary Capture, OT) Orthanc holds for a study."""
    uids = []
    for series in orthanc.series_of(study_uid):
        if series["MainDicomTags"].get("Modality") == "OT":
            uids += [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get(f"/series/{series['ID']}/instances")]
    return sorted(uids)


def test_a_study_sent_again_gets_its_stored_results_again_without_recomputing(tmp_path):
    require(orthanc_missing())
    orthanc_port = free_port()
    node = start_light_node(tmp_path, "--destination", f"ORTHANC@127.0.0.1:{orthanc_port}")
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node.port, dicom_port=orthanc_port)
    try:
        files = write_study(tmp_path / "study", description="Report me")
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)  # Orthanc routes it
        assert eventually(lambda: result_sop_uids(orthanc, study_uid), 60), node.log_text()[-3000:]
        first = result_sop_uids(orthanc, study_uid)
        node.wait_for_log("study done", 30)

        def send_again(times_delivered: int) -> None:
            response = requests.post(f"{orthanc.url}/modalities/hippoai/store", timeout=60,
                                     json={"Resources": [orthanc.study_id(study_uid)]})
            assert response.ok, response.text
            node.wait_for_log("study done", 60, count=times_delivered)

        # the results are deleted in Orthanc (a purge, a migration), and the study is sent again
        for series in orthanc.series_of(study_uid):
            if series["MainDicomTags"].get("Modality") == "OT":
                requests.delete(f"{orthanc.url}/series/{series['ID']}", timeout=30).raise_for_status()
        assert not result_sop_uids(orthanc, study_uid)
        send_again(2)
        log = node.wait_for_log("delivering its stored results again", 1)
        assert result_sop_uids(orthanc, study_uid) == first, "the stored results, the same SOP Instance UIDs"
        assert len(re.findall(r"rule mock-report: job \w+ queued", log)) == 1, "not computed again"

        # sent again while Orthanc still holds them: nothing duplicated
        send_again(3)
        assert result_sop_uids(orthanc, study_uid) == first
        assert "1 of our own results ignored" in node.log_text(), "the study came with our result: not an input"
        assert len(re.findall(r"rule mock-report: job \w+ queued", node.log_text())) == 1

        # another model version behind the rule (what the mark of the input records): it runs again
        marker, = (node.folder / "pacs" / "processed").iterdir()
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "model": "mock:0.9:0123456789abcdef"}))
        send_again(4)
        assert len(re.findall(r"rule mock-report: job \w+ queued", node.log_text())) == 2
        assert len(result_sop_uids(orthanc, study_uid)) == 2, "a new result next to the first"

        # a changed input (another series in the study) runs again too
        changed = write_study(tmp_path / "changed", description="Report me", seed=1, study_uid=study_uid)
        assert c_store(changed, "127.0.0.1", node.port, node.ae_title) == len(changed)
        node.wait_for_log(r"rule mock-report: job \w+ queued", 60, count=3)
    finally:
        orthanc.stop()
        node.stop()
