"""Review before release with the real Orthanc and the DICOM node (``1.0-fast`` hippocampus model): a study
routed by a rule with ``review: required`` leaves nothing in Orthanc until a reviewer accepts it, then SEG,
SR and Secondary Capture arrive; a rejected one leaves nothing; an uploaded correction SEG arrives instead
of the model's, with an SR whose volumes are the correction's and whose observer is the reviewer. The
decisions are made on a gateway sharing the node's job store, as ``make serve`` runs them."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from bench.pacs_services import DicomNodeProcess, Orthanc, c_store, free_port, orthanc_missing
from inference.audit import verify
from inference.config import Settings
from inference.dicom.results import Algorithm, segmentation
from inference.dicom.series import slice_spacing, sort_by_position
from tests.conftest import require, shared_data
from tests.dicom_readback import decode_segmentation, report_volumes
from tests.test_dicom_node import eventually, wait_for_results
from tests.test_security import add_user, bearer

RULES = """
rules:
  - name: hippocampus-reviewed
    match:
      modality: MR
      series_description: HippoCrop
    command: get-hippocampus-volume
    review: required
    params:
      dicom_outputs: [seg, sr]
      model_version: 1.0-fast
"""


@pytest.fixture(scope="module")
def reviewed_pacs(tmp_path_factory):
    """Orthanc routing to a node whose rule asks for review, and a gateway on the node's job store."""
    require(orthanc_missing())
    crop = shared_data("studies", "Study1", "13_HCropVolume")
    import server

    root = tmp_path_factory.mktemp("reviewed")
    (root / "rules.yaml").write_text(RULES)
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc", node_port=node_port)
    try:
        node = DicomNodeProcess(root / "node", port=node_port, args=[
            "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--stable-seconds", "1",
            "--rules", str(root / "rules.yaml")])
    except BaseException:
        orthanc.stop()
        raise
    tokens = {name: add_user(node.folder / "jobs", name, role)
              for name, role in (("sam", "submitter"), ("rita", "reviewer"), ("ada", "admin"))}
    settings = dataclasses.replace(Settings(), output_root=node.folder / "jobs", pacs_root=node.folder / "pacs")
    app = server.create_app(settings=settings)
    yield orthanc, node, app.test_client(), tokens, sorted(crop.rglob("*.dcm"))
    node.stop()
    orthanc.stop()


def new_study(files: list[Path], folder: Path) -> list[Path]:
    """The crop series as a new study (new study, series, frame of reference and instance UIDs)."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(folder / path.name)
        ds.save_as(out[-1])
    return out


def results_in(orthanc: Orthanc, study_uid: str) -> list[str]:
    return sorted(s["MainDicomTags"].get("Modality") for s in orthanc.series_of(study_uid)
                  if s["MainDicomTags"].get("Modality") in ("SEG", "SR", "OT"))


def held_job(client, tokens, node: DicomNodeProcess, study_uid: str, count: int) -> str:
    """Wait until the node held the study's result; its job uid, from the reviewer's queue."""
    node.wait_for_log("its results wait for a reviewer", 180, count=count)
    queue = client.get("/reviews", headers=bearer(tokens["rita"])).get_json()["reviews"]
    uid, = [r["uid"] for r in queue if r["study_uid"] == study_uid]
    return uid


def send(orthanc: Orthanc, files: list[Path]) -> str:
    assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_nothing_reaches_orthanc_until_accepted(reviewed_pacs, tmp_path):
    orthanc, node, client, tokens, crop = reviewed_pacs
    study_uid = send(orthanc, new_study(crop, tmp_path / "accept"))
    uid = held_job(client, tokens, node, study_uid, 1)
    time.sleep(3)  # the node would have sent by now
    assert results_in(orthanc, study_uid) == []
    assert client.post(f"/reviews/{uid}/accept", headers=bearer(tokens["sam"])).status_code == 403
    shown = client.get(f"/reviews/{uid}", headers=bearer(tokens["rita"])).get_json()
    assert "1.0-fast" in shown["model"] and len(shown["images"]) >= 2, "overlay slices and the report image"
    assert any("volume" in row["name"] for table in shown["tables"] for row in table["rows"])
    assert client.post(f"/reviews/{uid}/accept", headers=bearer(tokens["rita"])).get_json()["new"] is True
    wait_for_results(orthanc, study_uid, 60)
    node.wait_for_log("study done", 60)
    assert client.post(f"/reviews/{uid}/accept", headers=bearer(tokens["ada"])).get_json()["new"] is False
    time.sleep(2)
    assert results_in(orthanc, study_uid) == ["OT", "SEG", "SR"], "a second accept sends nothing twice"
    records = client.get(f"/audit?study={study_uid}", headers=bearer(tokens["ada"])).get_json()["records"]
    by_event = {r["event"]: r["user"] for r in records}
    accepts = [(r["user"], r["detail"].get("repeated", False)) for r in records if r["event"] == "result-accepted"]
    assert accepts == [("rita", False), ("ada", True)], "the second accept is recorded, and changed nothing"
    assert by_event["result-released"] == "ae:HIPPOAI" and by_event["result-held"] == "ae:HIPPOAI"
    assert by_event["result-sent"] == "ae:HIPPOAI" and "study-received" in by_event
    assert client.get("/audit", headers=bearer(tokens["sam"])).status_code == 403


def test_a_rejected_study_leaves_nothing(reviewed_pacs, tmp_path):
    orthanc, node, client, tokens, crop = reviewed_pacs
    study_uid = send(orthanc, new_study(crop, tmp_path / "reject"))
    uid = held_job(client, tokens, node, study_uid, 2)
    rejected = client.post(f"/reviews/{uid}/reject", json={"reason": "motion artefacts"},
                           headers=bearer(tokens["rita"]))
    assert rejected.status_code == 200
    node.wait_for_log(rf"job {uid}: rejected by rita \(motion artefacts\); nothing sent", 30)
    time.sleep(2)
    assert results_in(orthanc, study_uid) == []
    records = client.get(f"/audit?study={study_uid}", headers=bearer(tokens["ada"])).get_json()["records"]
    assert [r["user"] for r in records if r["event"] == "result-rejected"] == ["rita"]
    assert not [r for r in records if r["event"] in ("result-sent", "result-released")]


def test_a_correction_arrives_instead_of_the_model_result(reviewed_pacs, tmp_path):
    from models.registry import registry_for

    orthanc, node, client, tokens, crop = reviewed_pacs
    files = new_study(crop, tmp_path / "correct")
    study_uid = send(orthanc, files)
    uid = held_job(client, tokens, node, study_uid, 3)
    rita = bearer(tokens["rita"])
    job_dir = node.folder / "jobs" / uid
    model_seg = next(pydicom.dcmread(p) for p in job_dir.glob("*.dcm") if pydicom.dcmread(p).Modality == "SEG")
    source = sort_by_position([pydicom.dcmread(p) for p in files])
    structures = registry_for(Settings().model_manifest).family("hippocampus").resolve("1.0-fast").structures
    labels = decode_segmentation(model_seg, structures, [ds.SOPInstanceUID for ds in source])
    corrected = labels.copy()
    corrected[: len(corrected) // 2][corrected[: len(corrected) // 2] == structures[1].label] = 0  # a reviewer's edit
    corrected[labels == structures[0].label] = structures[0].label
    seg = segmentation(source, corrected, structures, Algorithm("3D Slicer", "5.6"), description="Corrected")

    def upload(dataset) -> object:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return client.post(f"/reviews/{uid}/correct", data=buffer.getvalue(), content_type="application/dicom",
                           headers=rita)

    wrong = pydicom.dcmread(io.BytesIO(_bytes(seg)))
    wrong.FrameOfReferenceUID = generate_uid()
    refused = upload(wrong)
    assert refused.status_code == 422 and "frame of reference" in refused.get_json()["error"]
    not_seg = upload(source[0])
    assert not_seg.status_code == 422 and "not a Segmentation" in not_seg.get_json()["error"]
    assert results_in(orthanc, study_uid) == []

    answer = upload(seg)
    assert answer.status_code == 200, answer.get_json()
    correction = answer.get_json()["review"]["correction"]
    anterior, posterior = (correction["structures"][s.name] for s in structures)
    assert anterior["dice"] == 1.0 and anterior["change_mm3"] == 0
    assert posterior["dice"] < 1.0 and posterior["change_mm3"] < 0 and posterior["change_percent"] < 0
    assert eventually(lambda: results_in(orthanc, study_uid) == ["SEG", "SR"], 60), results_in(orthanc, study_uid)
    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.series_of(study_uid)}
    arrived = pydicom.dcmread(io.BytesIO(orthanc.instance_file(series["SEG"])))
    assert arrived.SOPInstanceUID == seg.SOPInstanceUID, "the reviewer's SEG, not the model's"
    sr = pydicom.dcmread(io.BytesIO(orthanc.instance_file(series["SR"])))
    voxel = float(np.prod([float(v) for v in source[0].PixelSpacing])) * slice_spacing(source)
    assert report_volumes(sr) == {s.name: round(int((corrected == s.label).sum()) * voxel, 1) for s in structures}
    assert report_volumes(sr) == {s.name: correction["structures"][s.name]["corrected_mm3"] for s in structures}
    observers = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121008"]
    names = [str(item.get("PersonName", "")).rstrip("^") for item in observers]  # Person Observer Name
    assert "rita" in names, "the reviewer is the observer"
    assert upload(seg).get_json()["new"] is False, "the same correction again changes nothing"
    assert client.post(f"/reviews/{uid}/accept", headers=rita).status_code == 409

    family = client.get("/models/hippocampus", headers=bearer(tokens["sam"])).get_json()["feedback"]["1.0-fast"]
    assert family["corrected"] >= 1 and family["accepted"] >= 1 and family["rejected"] >= 1
    assert 0 < family["mean_dice_corrected"] < 1
    metrics = client.get("/metrics", headers=bearer(tokens["ada"])).get_data(as_text=True)
    assert 'inference_review_decisions{decision="corrected",family="hippocampus",version="1.0-fast"} 1.0' in metrics
    records = client.get(f"/audit?study={study_uid}", headers=bearer(tokens["ada"])).get_json()["records"]
    assert [r["user"] for r in records if r["event"] == "result-corrected"] == ["rita", "rita"]
    assert verify(node.folder / "jobs" / "audit.jsonl")[1] is None


def _bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
