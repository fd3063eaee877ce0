"""Change since the prior and the quality flag, end to end on generated priors of Study1's crop.

A prior is Study1's HippoCrop series copied into a new study (new UIDs, a date two years earlier). Its change
is known because either its pixel spacing is scaled (our own store: the model labels the same voxels, so
every volume scales by the spacing's product) or its SR is written from Study1's labels eroded by one voxel
(the PACS: Orthanc, found by QIDO-RS). The report image is saved for looking at.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from scipy import ndimage

from bench.pacs_services import Orthanc, free_port, orthanc_missing
from handlers.hippocampus.handler import COMMAND
from handlers.hippocampus.report import change_lines, dicom_results
from inference.config import get_settings
from inference.dicom.series import load_volume
from inference.dicom.writing import dataset_bytes
from inference.pacs.priors import read_report
from inference.pipeline.pipeline import Pipeline
from inference.protocol.summary import result_rows
from models.registry import registry_for
from tests.conftest import PROJECT_ROOT, require, shared_data

WEIGHTS = PROJECT_ROOT / "models" / "hippocampus_unet.pt"
PRIOR_DATE, TODAY = "20180119", "20200119"  # Study1's own date is 2020-01-19
YEARS = 730 / 365.25


@pytest.fixture(scope="module")
def crop():
    if not WEIGHTS.exists():
        pytest.skip(f"model weights {WEIGHTS.name} are not in models/")
    folder = next(shared_data("studies", "Study1").glob("*HCrop*"))
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def copy_study(datasets, study_date: str, *, spacing_scale: float = 1.0, **patient) -> list[pydicom.Dataset]:
    """The series in a new study: new study, series, instance and frame-of-reference UIDs, another date."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out = []
    for ds in datasets:
        c = copy.deepcopy(ds)
        c.StudyInstanceUID, c.SeriesInstanceUID, c.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        c.SOPInstanceUID = c.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        c.StudyDate = study_date
        c.PixelSpacing = [float(v) * spacing_scale for v in ds.PixelSpacing]
        for keyword, value in patient.items():
            setattr(c, keyword, value)
        out.append(c)
    return out


def run(datasets, settings, version="1.0-fast", outputs=("sr",)):
    pipeline = Pipeline(settings, commands=[COMMAND])
    result = pipeline.run({"model_version": version, "dicom_outputs": list(outputs)},
                          [io.BytesIO(dataset_bytes(ds)) for ds in datasets], "0" * 64, command=COMMAND)
    return result.response_json, result.buffers


def settings_for(tmp_path, **more):
    return dataclasses.replace(get_settings(), history_db=tmp_path / "history.sqlite3", **more)


def dicom_of(buffers, modality: str) -> pydicom.Dataset:
    """The response's DICOM object of ``modality`` (buffers after the label mask are DICOM files)."""
    return next(ds for ds in (pydicom.dcmread(io.BytesIO(bytes(b))) for b in buffers[1:]) if ds.Modality == modality)


def sr_of(buffers) -> pydicom.Dataset:
    return dicom_of(buffers, "SR")


def sr_items(sr: pydicom.Dataset) -> list[tuple[str, str]]:
    """(concept name meaning, value) of every NUM and CODE item of the SR's content tree."""
    out = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "NUM":
                out.append((name, float(item.MeasuredValueSequence[0].NumericValue)))
            elif item.ValueType == "CODE":
                out.append((name, item.ConceptCodeSequence[0].CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def test_study1_after_its_prior_reports_change_and_rate_everywhere(crop, tmp_path):
    settings = settings_for(tmp_path)
    scale = 1.02  # the prior's pixels 2% wider each way: the same labels measure 1.02**2 times more
    prior_json, _ = run(copy_study(crop, PRIOR_DATE, spacing_scale=scale), settings)
    assert prior_json["change_since_prior"]["prior"] is None  # nothing earlier
    assert not prior_json["quality"]["flagged"], prior_json["quality"]["reasons"]  # 1.02 mm: within the tolerance
    assert set(prior_json["change_since_prior"]) == {"searched", "prior", "structures", "earlier_comparable",
                                                     "untrusted", "not_comparable", "note"}  # one shape

    now_json, buffers = run(crop, settings)
    change = now_json["change_since_prior"]
    assert change["prior"]["study_date"] == "2018-01-19" and change["prior"]["source"] == "result store"
    assert change["prior"]["interval_years"] == pytest.approx(YEARS, abs=1e-3)
    measures = next(iter(now_json["series_ml_json"].values()))
    before = next(iter(prior_json["series_ml_json"].values()))
    for name, key in (("Anterior", "anterior_volume_mm3"), ("Posterior", "posterior_volume_mm3"),
                      ("Total", "total_volume_mm3")):
        row = change["structures"][name]
        assert row["prior_volume_mm3"] == before[key] and row["volume_mm3"] == measures[key]
        assert row["change_mm3"] == pytest.approx(measures[key] - before[key], abs=0.11)
        assert row["change_percent"] == pytest.approx(100 * (1 / scale**2 - 1), abs=0.05)  # -3.88 %
        assert row["annualised_percent_per_year"] == pytest.approx(row["change_percent"] / YEARS, abs=0.01)
    assert not now_json["quality"]["flagged"], now_json["quality"]["reasons"]

    items = sr_items(sr_of(buffers))
    changes = [v for name, v in items if name == "Volume change since the prior study, percent"]
    assert changes == pytest.approx([change["structures"][n]["change_percent"] for n in ("Anterior", "Posterior")])
    assert [v for name, v in items if name == "Annualised volume change rate"] == pytest.approx(
        [change["structures"][n]["annualised_percent_per_year"] for n in ("Anterior", "Posterior")])
    assert ("Result quality", "Within validated input range and uncertainty threshold") in items

    report = dicom_of(buffers, "OT")
    from PIL import Image
    out = Path(tmp_path / "report.png")
    Image.fromarray(report.pixel_array).save(out)
    # the change rows add height to the report (a table of four columns over the volumes)
    assert report.Rows > 400


def test_flagged_result_says_why_in_the_sr(crop, tmp_path):
    settings = settings_for(tmp_path)
    flagged_json, buffers = run(copy_study(crop, TODAY, spacing_scale=0.8), settings)
    assert flagged_json["quality"]["flagged"] is True
    reasons = flagged_json["quality"]["reasons"]
    assert reasons and all(isinstance(r, str) for r in reasons)
    evaluations = [v for name, v in sr_items(sr_of(buffers)) if name == "Result quality"]
    assert evaluations and all(v.startswith(("input: voxel_size_mm", "uncertainty")) for v in evaluations)


def test_axis_order_is_named_and_the_same_in_the_reason_the_geometry_line_and_spacing(crop, tmp_path):
    """Issue 37: 2.0 mm pixels were [2.0, 2.0, 1.0] in the reason, 1 x 2 x 2 (slice x row x column) on the image and
    [1.0, 2.0, 2.0] in spacing_mm: now all three in the series' order, slice x row x column."""
    response, buffers = run(copy_study(crop, TODAY, spacing_scale=2.0), settings_for(tmp_path))
    measures = next(iter(response["series_ml_json"].values()))
    assert measures["spacing_mm"][1:] == [2.0, 2.0]
    slice_mm = f"{measures['spacing_mm'][0]:g}"
    assert f"input: voxel_size_mm (slice x row x column) {slice_mm} x 2 x 2 mm outside the validated range" in \
        " ".join(response["quality"]["reasons"])
    properties = response["quality"]["input"]["properties"]
    assert properties["axes"] == ["slice", "row", "column"] and properties["voxel_size_mm"] == measures["spacing_mm"]
    assert properties["matrix"] == [len(crop), crop[0].Rows, crop[0].Columns]
    assert measures["spacing_axes"] == ["slice", "row", "column"]
    rows = {row.name: row.value for row in result_rows(measures)}  # as the test tool's page and the review show it
    assert rows["spacing"] == f"{slice_mm} × 2 × 2" and rows["spacing axes"] == "slice × row × column"
    save_report(buffers, tmp_path / "two-mm.png")


def save_report(buffers, path: Path) -> np.ndarray:
    """The report image of a response, written as PNG for looking at; its pixels."""
    from PIL import Image

    pixels = dicom_of(buffers, "OT").pixel_array
    Image.fromarray(pixels).save(path)
    return pixels


def test_a_flagged_prior_is_never_a_silent_prior(crop, tmp_path):
    """Issue 37: a crop with 2.0 mm pixels (correctly flagged) became the prior of a normal study, whose report
    showed -75 % beside a green quality line. Now no change is given, and the JSON, SR and image say why."""
    settings = settings_for(tmp_path)
    flagged_json, _ = run(copy_study(crop, PRIOR_DATE, spacing_scale=2.0), settings)
    assert flagged_json["quality"]["flagged"]
    now_json, buffers = run(crop, settings)
    change = now_json["change_since_prior"]
    assert change["prior"] is None and change["structures"] == {} and change["earlier_comparable"] == []
    [untrusted] = change["untrusted"]
    assert untrusted["study_date"] == "2018-01-19" and untrusted["reason"].startswith("flagged: input: voxel_size_mm")
    assert change["note"].startswith("no change given") and "cannot be trusted" in change["note"]
    items = sr_items(sr_of(buffers))
    assert not [v for name, v in items if name == "Volume in the prior study"]
    assert ("Comparison with the prior study", "No change given: the earlier results cannot be trusted") in items
    assert not now_json["quality"]["flagged"]
    save_report(buffers, tmp_path / "untrusted-prior.png")

    # a trustworthy result older than the flagged one is the prior, and the flagged one is named as passed over
    run(copy_study(crop, "20160119", spacing_scale=1.02), settings)
    now_json, buffers = run(crop, settings)
    change = now_json["change_since_prior"]
    assert change["prior"]["study_date"] == "2016-01-19" and change["prior"]["flagged"] is False
    assert [u["study_date"] for u in change["untrusted"]] == ["2018-01-19"]
    assert change["structures"]["Total"]["change_percent"] == pytest.approx(100 * (1 / 1.02**2 - 1), abs=0.05)
    assert ("Comparison with the prior study", "A more recent earlier result was not trusted, not used") in \
        sr_items(sr_of(buffers))
    save_report(buffers, tmp_path / "older-prior.png")


def test_review_decisions_decide_which_result_is_the_prior(tmp_path):
    """Rejected: never a prior. Corrected: the prior, with the correction's volumes. Flagged then accepted: the
    prior, saying so. A result whose flag was never recorded: not trusted."""
    from handlers.hippocampus import history as module
    from handlers.hippocampus.history import compare, learn_decision, result_history
    from inference.jobs.reviews import ACCEPTED, CORRECTED, DECISIONS, REJECTED, Review
    from inference.pacs.priors import Patient, PriorResult

    assert (module.ACCEPTED, module.REJECTED, module.CORRECTED) == (ACCEPTED, REJECTED, CORRECTED) and \
        set(DECISIONS) == {ACCEPTED, REJECTED, CORRECTED}  # the history's copy of the review's names

    settings = settings_for(tmp_path)
    history = result_history(settings)
    patient, volumes = Patient("P1"), {"Anterior": 1000.0, "Posterior": 900.0, "Total": 1900.0}
    for uid, date, flagged in (("1.1", "20190101", False), ("1.2", "20180101", True), ("1.3", "20170101", False)):
        history.record(patient, PriorResult(uid, date, "hippocampus", "1.0", volumes, flagged=flagged,
                                            flag_reasons=["uncertainty: high"] if flagged else []))

    def change_now() -> dict:
        return compare("20200101", {"Anterior": 990.0, "Posterior": 900.0, "Total": 1890.0}, "hippocampus", "1.0",
                       history.earlier(patient, "9.9"), ["result store"])

    assert change_now()["prior"]["study_uid"] == "1.1"
    model = {"family": "hippocampus", "version": "1.0", "sha256": "0" * 64}
    assert learn_decision(settings, Review("j1", "c", "required", study_uid="1.1", model=model, status=REJECTED))
    change = change_now()
    assert change["prior"]["study_uid"] == "1.3"  # 1.1 rejected, 1.2 flagged and not reviewed
    assert {u["study_uid"]: u["reason"] for u in change["untrusted"]} == {
        "1.1": "rejected on review", "1.2": "flagged: uncertainty: high"}
    assert learn_decision(settings, Review("j2", "c", "flagged", study_uid="1.2", model=model, status=ACCEPTED))
    prior = change_now()["prior"]
    assert (prior["study_uid"], prior["flagged"], prior["review"]) == ("1.2", True, ACCEPTED)
    correction = {"structures": {"Anterior": {"corrected_mm3": 1100.0}, "Posterior": {"corrected_mm3": 900.0}}}
    history.record(patient, PriorResult("1.4", "20190601", "hippocampus", "1.0", volumes, flagged=True))
    assert learn_decision(settings, Review("j3", "c", "flagged", study_uid="1.4", model=model, status=CORRECTED,
                                           correction=correction))
    change = change_now()
    assert change["prior"]["study_uid"] == "1.4" and change["prior"]["volumes"] == "corrected by a reviewer"
    assert change["structures"]["Anterior"]["prior_volume_mm3"] == 1100.0
    assert change["structures"]["Total"]["prior_volume_mm3"] == 2000.0
    assert [e["study_uid"] for e in change["earlier_comparable"]] == ["1.2", "1.3"]
    assert not learn_decision(settings, Review("j4", "c", "required", study_uid="7.7", model=model, status=REJECTED))


def test_results_recorded_before_flags_were_kept_are_not_trusted(tmp_path):
    """A history file of the first schema (no flag columns) gets them by its migration; its results' flags are
    unknown."""
    import sqlite3

    from handlers.hippocampus.history import ResultHistory, compare
    from inference.pacs.priors import Patient
    from inference.storage.history import SqliteHistoryRows
    from inference.storage.migrations import HISTORY, migrate_sqlite

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE results (patient_id TEXT NOT NULL, issuer TEXT NOT NULL, birth_date TEXT NOT NULL, "
                   "study_uid TEXT NOT NULL, study_date TEXT NOT NULL, family TEXT NOT NULL, version TEXT NOT NULL, "
                   "volumes TEXT NOT NULL, recorded TEXT NOT NULL, PRIMARY KEY (study_uid, family, version))")
        db.execute("INSERT INTO results VALUES ('P1', '', '', '1.1', '20190101', 'hippocampus', '1.0', "
                   "'{\"Total\": 1900.0}', '2019-01-01')")
    db.close()
    assert migrate_sqlite(path, HISTORY) == (0, 2)
    earlier = ResultHistory(SqliteHistoryRows(path)).earlier(Patient("P1"), "9.9")
    assert earlier[0].flagged is None
    change = compare("20200101", {"Total": 1890.0}, "hippocampus", "1.0", earlier, ["result store"])
    assert change["prior"] is None and change["untrusted"][0]["reason"].startswith("its quality flag is not known")


def test_a_rejected_result_is_no_prior_once_the_reviewer_decides(crop, tmp_path):
    """Through the gateway: the prior study's job is held for review and rejected at POST /reviews/<uid>/reject;
    the history learns it, so the next study of the patient gets no change from it."""
    import server
    from tests.test_security import add_user, bearer

    folder = tmp_path / "data" / "prior"
    folder.mkdir(parents=True)
    for number, dataset in enumerate(copy_study(crop, PRIOR_DATE)):
        dataset.save_as(folder / f"{number:03d}.dcm")
    sam, rita = (add_user(tmp_path / "jobs", name, role) for name, role in (("sam", "submitter"), ("rita", "reviewer")))
    settings = settings_for(tmp_path, data_root=tmp_path / "data", output_root=tmp_path / "jobs")
    client = server.create_app(settings=settings).test_client()
    body = {"job_name": COMMAND, "in_dir": "prior", "model_version": "1.0-fast", "review": "required"}
    created = client.post("/job/", json=body, headers=bearer(sam))
    assert created.status_code == 201, created.get_json()
    uid = created.get_json()["uid"]
    deadline = time.monotonic() + 120
    while client.get(f"/query/{uid}", headers=bearer(sam)).get_json().get("review") != "awaiting review":
        assert time.monotonic() < deadline, client.get(f"/query/{uid}", headers=bearer(sam)).get_json()
        time.sleep(0.1)
    before, _ = run(crop, settings)
    assert before["change_since_prior"]["prior"]["study_date"] == "2018-01-19"  # not flagged, not yet decided
    rejected = client.post(f"/reviews/{uid}/reject", json={"reason": "motion"}, headers=bearer(rita))
    assert rejected.status_code == 200, rejected.get_json()
    now_json, _ = run(crop, settings)
    change = now_json["change_since_prior"]
    assert change["prior"] is None and change["untrusted"][0]["reason"] == "rejected on review"


def test_other_versions_are_listed_as_not_comparable_and_other_patients_never_match(crop, tmp_path):
    settings = settings_for(tmp_path)
    run(copy_study(crop, "20190119"), settings, version="1.0")  # same patient (no birth date), the ensemble
    run(copy_study(crop, "20170119", IssuerOfPatientID="OTHER-HOSPITAL"), settings)  # same ID, another issuer
    run(copy_study(crop, "20160119", PatientBirthDate="19500101"), settings)  # another birth date
    run(copy_study(crop, "20150119", PatientID="SOMEONE-ELSE"), settings)  # same name, another patient
    now_json, _ = run(copy_study(crop, TODAY, PatientBirthDate="19400101"), settings)
    change = now_json["change_since_prior"]
    assert change["prior"] is None and change["structures"] == {}
    assert [(o["study_date"], o["model"]) for o in change["not_comparable"]] == [("2019-01-19", "hippocampus 1.0")]
    assert "not comparable" in change["not_comparable"][0]["note"]


def test_study_without_patient_id_is_never_compared(crop, tmp_path):
    settings = settings_for(tmp_path)
    run(copy_study(crop, PRIOR_DATE, PatientID=""), settings)
    now_json, buffers = run(copy_study(crop, TODAY, PatientID=""), settings)
    change = now_json["change_since_prior"]
    assert change["prior"] is None and "name alone" in change["note"]
    assert change["earlier_comparable"] == [] and change["untrusted"] == [] and change["searched"] == []
    # the image gives the JSON's reason, not "No earlier result of this patient" (issue 37)
    texts = [text for text, *_ in change_lines(change)]
    assert texts == ["The study has no PatientID: earlier results are never matched on the name alone."]
    save_report(buffers, tmp_path / "no-patient-id.png")


def eroded_prior_report(crop, settings, version_name="1.0-fast") -> tuple[list[pydicom.Dataset], pydicom.Dataset, dict]:
    """A prior study with an SR whose labels are Study1's, each structure eroded by one voxel in-plane on every
    fourth slice."""
    prior = copy_study(crop, PRIOR_DATE)
    scratch = dataclasses.replace(settings, history_db=settings.history_db.with_suffix(".scratch"),
                                  prior_dicomweb_url=None)
    response, buffers = run(crop, scratch, version=version_name, outputs=())
    shape = response["parts"][0]["binary_data_shape"]
    labels = np.frombuffer(bytes(buffers[0]), np.uint8).reshape(shape["depth"], shape["height"], shape["width"])
    eroded = np.zeros_like(labels)
    for value in (1, 2):  # slightly: in-plane, on every fourth slice only (a whole erosion takes ~40% away)
        mask = labels == value
        mask[::4] = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))[::4]
        eroded[mask] = value
    version = registry_for(settings.model_manifest).family("hippocampus").resolve(version_name)
    volume = load_volume(prior)
    [(_, sr)] = dicom_results(volume, eroded, version.structures, version.provenance, ["sr"],
                              quality={"flagged": False, "reasons": []})  # as our own SRs carry the flag
    volumes = {"Anterior": float(np.count_nonzero(eroded == 1)), "Posterior": float(np.count_nonzero(eroded == 2))}
    return prior, sr, volumes


def test_a_pacs_report_tells_its_flag_and_a_reviewers_correction(crop):
    """A prior read from the PACS is judged like our own: the SR's quality evaluation gives its flag (none: not
    known), and a reviewer's corrected SR (its algorithm names the corrector) is a corrected result."""
    from inference.dicom.results import Algorithm
    from inference.pacs.priors import CORRECTED_BY

    version = registry_for(get_settings().model_manifest).family("hippocampus").resolve("1.0-fast")
    volume = load_volume(copy_study(crop, PRIOR_DATE))
    labels = np.zeros(volume.voxels.shape, np.uint8)
    labels[10:20, 10:20, 10:20], labels[10:20, 20:30, 10:20] = 1, 2

    def report(quality):
        [(_, sr)] = dicom_results(volume, labels, version.structures, version.provenance, ["sr"], quality=quality)
        return read_report(sr)

    reason = "input: intensity_mean 33,270 outside the validated ranges (47.89 to 78.31, 311.5 to 858.1)"
    flagged = report({"flagged": True, "reasons": [reason]})
    assert flagged.flagged is True and flagged.flag_reasons == [reason[:61] + "..."]  # a code meaning's 64 chars
    assert report({"flagged": False, "reasons": []}).flagged is False
    assert report(None).flagged is None
    from inference.review import correction

    seg = dicom_results(volume, labels, version.structures, version.provenance, ["seg"])[0][1]
    read = correction.read_segmentation(dataset_bytes(seg), volume.datasets, version.structures)
    algorithm = Algorithm("hippocampus", f"1.0-fast (weights sha256 0123456789ab){CORRECTED_BY}rita")
    corrected = read_report(correction.corrected_report(volume.datasets, read, version.structures, algorithm, "rita"))
    assert corrected.review == "corrected" and corrected.version == "1.0-fast"
    assert corrected.volumes_mm3 == {"Anterior": 1000.0, "Posterior": 1000.0}


def test_prior_report_found_in_the_pacs_by_qido(crop, tmp_path):
    require(orthanc_missing())
    orthanc = Orthanc(tmp_path / "orthanc", node_port=free_port())
    try:
        from dicomweb_client.api import DICOMwebClient

        url = f"{orthanc.url}/dicom-web"
        settings = settings_for(tmp_path, prior_dicomweb_url=url)
        prior, sr, volumes = eroded_prior_report(crop, settings)
        assert read_report(sr).volumes_mm3 == volumes  # what the PACS will give back is what was written
        DICOMwebClient(url=url).store_instances([*prior, sr])
        now_json, buffers = run(crop, settings)
        change = now_json["change_since_prior"]
        assert change["searched"] == ["result store", "PACS (QIDO-RS)"]
        assert change["prior"]["source"] == "PACS" and change["prior"]["study_date"] == "2018-01-19"
        measures = next(iter(now_json["series_ml_json"].values()))
        for name, key in (("Anterior", "anterior_volume_mm3"), ("Posterior", "posterior_volume_mm3")):
            row = change["structures"][name]
            assert row["prior_volume_mm3"] == volumes[name]  # 1 mm voxels
            assert row["change_mm3"] == pytest.approx(measures[key] - volumes[name], abs=0.11)
            assert row["change_mm3"] > 0  # erosion made the prior smaller: the known change
    finally:
        orthanc.stop()


def test_unreachable_pacs_still_gives_the_result(crop, tmp_path):
    settings = settings_for(tmp_path, prior_dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    now_json, _ = run(crop, settings)
    assert now_json["change_since_prior"]["prior"] is None
    assert "quality" in now_json


def test_study1_sent_to_the_pacs_after_its_prior_comes_back_with_the_change(crop, tmp_path):
    """The DICOM node's door: Orthanc holds the prior's SR; Study1's crop sent to Orthanc is routed to the node,
    whose SR and report image, stored back in Orthanc, carry the change since that prior."""
    require(orthanc_missing())
    from dicomweb_client.api import DICOMwebClient

    from bench.pacs_services import DicomNodeProcess, c_store
    from tests.test_dicom_node import wait_for_results

    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node_port)
    node = None
    try:
        url = f"{orthanc.url}/dicom-web"
        node = DicomNodeProcess(tmp_path / "node", port=node_port, env={"INFERENCE_PRIOR_DICOMWEB_URL": url}, args=[
            "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--stable-seconds", "1"])
        default = registry_for(get_settings().model_manifest).family("hippocampus").default_version
        _, sr, volumes = eroded_prior_report(crop, settings_for(tmp_path), default)
        DICOMwebClient(url=url).store_instances([sr])  # an SR alone: Orthanc routes no study without images
        files = sorted(next(shared_data("studies", "Study1").glob("*HCrop*")).iterdir())
        assert c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet) == len(files)
        results = wait_for_results(orthanc, str(crop[0].StudyInstanceUID), 120)
        report = pydicom.dcmread(io.BytesIO(orthanc.instance_file(results["SR"])))
        items = sr_items(report)
        assert [v for name, v in items if name == "Volume in the prior study"] == [volumes["Anterior"],
                                                                                     volumes["Posterior"]]
        rates = [v for name, v in items if name == "Annualised volume change rate"]
        assert len(rates) == 2 and all(rate > 0 for rate in rates)  # the eroded prior was smaller
        assert any(name == "Result quality" for name, _ in items)
        picture = pydicom.dcmread(io.BytesIO(orthanc.instance_file(results["OT"])))
        from PIL import Image
        Image.fromarray(picture.pixel_array).save(tmp_path / "node-report.png")
        response = next((tmp_path / "node").rglob("response.json"))
        import json
        change = json.loads(response.read_text())["change_since_prior"]
        assert change["prior"]["source"] == "PACS" and change["prior"]["study_date"] == "2018-01-19"
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()
