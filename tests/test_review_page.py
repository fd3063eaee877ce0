"""The review page (``GET /review/``) in headless Chromium (Debian's, driven by Playwright) against a gateway
served over HTTP: the queue loads with the reviewer's token, a result opens with its images and volumes
table, and a reviewer accepts one, rejects one with a reason and uploads a correction SEG for a third.
A screenshot is written under the test's temp folder (``review-page*``) for a person to look at."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from werkzeug.serving import make_server

from inference.config import Settings
from inference.dicom.results import Algorithm, segmentation
from inference.dicom.series import sort_by_position
from inference.jobs.reviews import ACCEPTED, CORRECTED, REJECTED, SqliteReviews
from tests.conftest import free_port, shared_data, write_study
from tests.dicom_readback import decode_segmentation
from tests.test_page import browser  # noqa: F401  (the fixture: Debian's chromium through Playwright)
from tests.test_security import add_user, bearer


@pytest.fixture
def served(tmp_path):
    """The full gateway (mocks on) on a free port, a reviewer and a submitter, the crop of Study1 as a folder."""
    import server

    crop = shared_data("studies", "Study1", "13_HCropVolume")
    (tmp_path / "data").mkdir()
    shutil.copytree(crop, tmp_path / "data" / "crop")
    write_study(tmp_path / "data" / "study")
    tokens = {name: add_user(tmp_path / "jobs", name, role) for name, role in (("sam", "submitter"),
                                                                               ("rita", "reviewer"))}
    settings = dataclasses.replace(Settings(), enable_mocks=True, data_root=tmp_path / "data",
                                   output_root=tmp_path / "jobs")
    app = server.create_app(settings=settings, warm_up_first=True)
    port = free_port()
    http = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{port}", tokens, tmp_path
    http.shutdown()


def submit(client, token: str, body: dict) -> str:
    response = client.post("/job/", json={**body, "review": "required"}, headers=bearer(token))
    assert response.status_code == 201, response.get_json()
    uid = response.get_json()["uid"]
    deadline = time.monotonic() + 120
    while client.get(f"/query/{uid}", headers=bearer(token)).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.1)
    return uid


def corrected_seg(job_dir: Path, crop: Path, out: Path) -> Path:
    """The model's SEG with the posterior part removed from the first half of the slices, as a viewer exports it."""
    from models.registry import registry_for

    model = next(pydicom.dcmread(p) for p in job_dir.glob("*.dcm") if pydicom.dcmread(p).Modality == "SEG")
    source = sort_by_position([pydicom.dcmread(p) for p in sorted(crop.rglob("*.dcm"))])
    structures = registry_for(Settings().model_manifest).family("hippocampus").resolve("1.0-fast").structures
    labels = decode_segmentation(model, structures, [ds.SOPInstanceUID for ds in source])
    half = labels[: len(labels) // 2]
    half[half == structures[1].label] = 0
    segmentation(source, labels, structures, Algorithm("OHIF", "3.8")).save_as(out, enforce_file_format=True)
    return out


def test_the_page_reviews_accepts_rejects_and_corrects(served, browser, tmp_path_factory):  # noqa: F811
    app, url, tokens, root = served
    client = app.test_client()
    accept = submit(client, tokens["sam"], {"job_name": "get-secondary-capture", "in_dir": "study"})
    reject = submit(client, tokens["sam"], {"job_name": "get-secondary-capture", "in_dir": "study"})
    correct = submit(client, tokens["sam"], {"job_name": "get-hippocampus-volume", "in_dir": "crop",
                                             "model_version": "1.0-fast", "dicom_outputs": ["seg", "sr"]})
    seg_file = corrected_seg(root / "jobs" / correct, root / "data" / "crop", root / "corrected.dcm")

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/review/")
    page.fill("#token", tokens["rita"])
    page.click("#load")
    page.wait_for_selector("#queue tbody tr:nth-child(3)")
    assert page.locator("#queue tbody tr").count() == 3
    assert "3 awaiting, 0 overdue" in page.inner_text("#summary")

    def open_row(uid: str) -> None:
        page.click(f"#queue tbody tr[data-uid='{uid}']")
        page.wait_for_function(f"() => document.getElementById('title').textContent.includes('{uid}')")
        page.wait_for_selector("#images[data-loaded='true']")
        assert page.evaluate("() => [...document.images].every(img => img.complete && img.naturalWidth > 0)")

    open_row(correct)
    assert "hippocampus 1.0-fast" in page.inner_text("#model")
    assert page.locator("#images img").count() == 4, "three slices with the segmentation over them, the report"
    assert "volume" in page.inner_text("#tables") and "mm³" in page.inner_text("#tables")
    shots = tmp_path_factory.mktemp("review-page")
    page.screenshot(path=str(shots / "result.png"), full_page=True)
    page.set_input_files("#seg", str(seg_file))
    page.click("#correct")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('corrected by rita')")

    open_row(accept)
    page.click("#accept")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('accepted by rita')")

    open_row(reject)
    page.click("#reject")  # no reason: the server's 400 is shown
    page.wait_for_function("() => document.getElementById('message').textContent.includes('400')")
    page.fill("#reason", "wrong series")
    page.click("#reject")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('rejected by rita')")
    page.wait_for_function("() => document.querySelectorAll('#queue tbody tr').length === 0")
    page.screenshot(path=str(shots / "after.png"), full_page=True)
    assert errors == []

    reviews = SqliteReviews(root / "jobs" / "jobs.sqlite3")
    assert [reviews.get(uid).status for uid in (accept, reject, correct)] == [ACCEPTED, REJECTED, CORRECTED]
    assert reviews.get(reject).reason == "wrong series"
    assert client.get(f"/job/{correct}/files", headers=bearer(tokens["sam"])).get_json()["files"]
