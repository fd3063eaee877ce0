"""The batch command line sending its results to real Orthancs (Debian's package, the shipped config).

One command on Study1 and Study2 with one PACS up and two down: the results of both studies are
stored in the first, each in its own study; the command reports what it could not deliver and
leaves it in the DICOM node's outbox. Then a re-run delivers what waits for one destination,
each result once, and a DICOM node sharing the outbox delivers the other's.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom

from bench.pacs_services import DicomNodeProcess, Orthanc, free_port, orthanc_missing
from tests.conftest import PROJECT_ROOT, require, shared_data

MOCK_RULES = "rules: [{name: mock-report, match: {series_description: '^Report me'}, command: get-secondary-capture}]\n"


def run_batch(studies: list[Path], out: Path, pacs_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INFERENCE_PACS_ROOT": str(pacs_root), "INFERENCE_PACS_RETRY_MAX_SECONDS": "1"}
    return subprocess.run([sys.executable, "-m", "handlers.hippocampus", *map(str, studies), "--out", str(out), *args],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


def results_in(orthanc: Orthanc, study_uid: str) -> Counter:
    """How many instances of each result modality (OT, SEG, SR) Orthanc holds in the study."""
    counts = Counter()
    for series in orthanc.series_of(study_uid):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("OT", "SEG", "SR"):
            counts[modality] += len(series["Instances"])
    return counts


def test_two_studies_stored_in_orthanc_and_undelivered_results_wait_in_the_outbox(tmp_path):
    require(orthanc_missing())
    studies = [shared_data("studies", "Study1"), shared_data("studies", "Study2")]
    study_uids = [str(pydicom.dcmread(next(s.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
                  for s in studies]
    assert study_uids[0] != study_uids[1]
    pacs_root = tmp_path / "pacs"
    up = Orthanc(tmp_path / "up", node_port=free_port())
    later, last = free_port(), free_port()  # destinations down during the first run
    down = [f"ORTHANC@127.0.0.1:{later}", f"ORTHANC@127.0.0.1:{last}"]
    orthancs = [up]
    try:
        result = run_batch(studies, tmp_path / "out", pacs_root, "--send-to", f"{up.aet}@127.0.0.1:{up.dicom_port}",
                           "--send-to", down[0], "--send-to", down[1], "--send-timeout", "3")
        assert result.returncode == 1, result.stderr  # results undelivered
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        stored = f"{up.aet}@127.0.0.1:{up.dicom_port}"
        for study, study_uid in zip(studies, study_uids, strict=True):
            entry = summary[str(study)]
            assert entry["status"] == "ok"
            assert entry["delivery"][stored] == {"status": "stored", "files": 3}
            for destination in down:
                waiting = entry["delivery"][destination]
                assert waiting["status"] == "outbox" and waiting["files"] == 3
                assert Path(waiting["outbox"]).parent == pacs_root / "outbox"
                assert len(list(Path(waiting["outbox"]).glob("*.dcm"))) == 6  # both studies' results
            # stored in the source study, one SEG, SR and report each; the files written are the ones stored
            assert results_in(up, study_uid) == {"OT": 1, "SEG": 1, "SR": 1}
            seg = next(s for s in up.series_of(study_uid) if s["MainDicomTags"]["Modality"] == "SEG")
            stored_seg = pydicom.dcmread(io.BytesIO(up.instance_file(seg)))
            written = pydicom.dcmread(next((tmp_path / "out").glob(f"*-{study.name}/seg.dcm")))
            assert stored_seg.SOPInstanceUID == written.SOPInstanceUID and stored_seg.StudyInstanceUID == study_uid
            assert f"{study}: ok; sending 3 results" in result.stderr
            assert f"{study}: 3 results to {stored}: stored" in result.stderr
        table = result.stdout.splitlines()
        assert stored in table[0] and down[0] in table[0]
        assert all(re.search(r"stored +outbox +outbox +ok$", line) for line in table[1:3])
        assert len(re.findall(rf"not delivered: .* -> {re.escape(down[1])}: 3 results wait in", result.stdout)) == 2

        # the first destination comes up: a re-run delivers what waits for it, without sending new copies
        orthancs.append(Orthanc(tmp_path / "later", node_port=free_port(), dicom_port=later))
        rerun = run_batch(studies[:1], tmp_path / "rerun", pacs_root, "--send-to", down[0])
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads((tmp_path / "rerun" / "summary.json").read_text())[str(studies[0])]["delivery"] == \
            {down[0]: {"status": "stored", "files": 3}}
        assert f"earlier runs' results for {down[0]}: 3 delivered now, 0 still waiting" in rerun.stderr
        for study_uid in study_uids:  # the outbox's sender also took Study2's waiting results
            assert results_in(orthancs[1], study_uid) == {"OT": 1, "SEG": 1, "SR": 1}
        assert not list((pacs_root / "outbox").glob(f"*-{later}/*.dcm"))

        # the last one comes up: a DICOM node sharing the outbox delivers what waits for it
        orthancs.append(Orthanc(tmp_path / "last", node_port=free_port(), dicom_port=last))
        (tmp_path / "rules.yaml").write_text(MOCK_RULES)
        node = DicomNodeProcess(tmp_path / "node", args=["--destination", down[1], "--root", str(pacs_root),
                                                         "--rules", str(tmp_path / "rules.yaml")])
        try:
            for study_uid in study_uids:
                node.wait_for_log(rf"study={re.escape(study_uid)} input_hash=\w+\] 3 results delivered", 60)
                assert results_in(orthancs[2], study_uid) == {"OT": 1, "SEG": 1, "SR": 1}
        finally:
            node.stop()
        assert not list((pacs_root / "outbox").rglob("*.dcm"))
    finally:
        for orthanc in orthancs:
            orthanc.stop()


def test_a_malformed_destination_is_refused_before_any_work(tmp_path):
    result = run_batch([tmp_path], tmp_path / "out", tmp_path / "pacs", "--send-to", "not-a-destination")
    assert result.returncode == 2 and "must be AE@HOST:PORT" in result.stderr
    assert not (tmp_path / "pacs").exists()
