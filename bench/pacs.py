"""PACS benchmark: Study1 sent to a real Orthanc by C-STORE until its SEG is stored back, and where the time goes.

    python -m bench.pacs [--runs 3] [--stable-age 3] [--stable-seconds 5]

Debian's Orthanc runs with the shipped config and Lua script, the DICOM node with the shipped
rules; each run sends Study1 under new UIDs (a new study, as a scanner would), so neither
Orthanc's routed mark nor the node's processed-input record skips it. Phases come from the
node's log timestamps (ms): transfer in (scanner -> Orthanc), Orthanc's stability wait and
routing, transfer to the node, the node's stability wait, the job (reading, model, writing the
report, SEG and SR) and transfer out (node -> Orthanc, until Orthanc lists the SEG). Prints one
JSON line: medians over the runs, and each run.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from bench.pacs_services import DicomNodeProcess, Orthanc, c_store, free_port, orthanc_missing
from inference.config import PROJECT_ROOT

log = logging.getLogger("bench.pacs")
STUDY1 = PROJECT_ROOT.parent / "shared" / "data" / "studies" / "Study1"
STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def renamed_copy(source: Path, target: Path) -> tuple[list[Path], str]:
    """Study ``source`` copied to ``target`` with new study, series and instance UIDs; files, study UID."""
    study_uid, series_uids = generate_uid(), {}
    files = []
    for index, path in enumerate(sorted(source.rglob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out = target / f"{index:05d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return files, study_uid


def epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def last_stamp(text: str, pattern: str) -> float:
    """Time of the last log line matching ``pattern``."""
    found = re.findall(rf"^{STAMP} .*{pattern}", text, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no log line matches {pattern!r}")
    return epoch(found[-1])


def one_run(orthanc: Orthanc, node: DicomNodeProcess, folder: Path, timeout: float = 300, *,
            no_delay: bool = True) -> dict:
    """Send one renamed copy of Study1 and time its phases."""
    files, study_uid = renamed_copy(STUDY1, folder)
    study = re.escape(study_uid)
    started = time.time()
    c_store(files, "127.0.0.1", orthanc.dicom_port, orthanc.aet, no_delay=no_delay)
    sent = time.time()
    deadline = time.monotonic() + timeout
    while not any(s["MainDicomTags"].get("Modality") == "SEG" for s in orthanc.series_of(study_uid)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SEG in Orthanc {timeout}s after sending; node log: {node.log_path}")
        time.sleep(0.1)
    stored = time.time()
    text = node.wait_for_log(rf"study={study} input_hash=\w+\] job \w+: every result confirmed", 30)
    # the node's log lines of this study, in order
    complete = last_stamp(text, rf"study={study}\] study complete")
    queued = last_stamp(text, rf"study={study} input_hash=\w+\] rule .*: job \w+ queued")
    completed = last_stamp(text, rf"study={study} input_hash=\w+\] job \w+ completed")
    job_lines = text[text.rfind("study complete"):]
    first_assoc = epoch(re.findall(rf"^{STAMP} .*association from {orthanc.aet} \(", text[:text.find(
        f"study={study_uid}] study complete")], re.MULTILINE)[-1])
    released = epoch(re.findall(rf"^{STAMP} .*association from {orthanc.aet} released", text[:text.find(
        f"study={study_uid}] study complete")], re.MULTILINE)[-1])
    model = float(re.search(r"segmented \(.*?\) in ([\d.]+)s", job_lines).group(1))
    segmented = last_stamp(text, r"segmented \(")
    return {
        "total_s": round(stored - started, 2),
        "transfer_in_s": round(sent - started, 2),
        "orthanc_stable_wait_and_routing_s": round(first_assoc - sent, 2),
        "transfer_to_node_s": round(released - first_assoc, 2),
        "node_stable_wait_s": round(complete - released, 2),
        "job_queue_and_reading_s": round(segmented - model - queued, 2),
        "inference_s": round(model, 2),
        "writing_s": round(completed - segmented, 2),
        "transfer_out_s": round(stored - completed, 2),
    }


def measure(runs: int = 3, stable_age: int = 3, stable_seconds: float = 5.0, *, complete_on_release: bool = True,
            no_delay: bool = True) -> dict:
    """Median phases over ``runs`` runs (a dict for bench.run's JSON line)."""
    if not STUDY1.exists():
        return {"pacs_skipped": f"needs {STUDY1} (absent on this machine)"}
    if reason := orthanc_missing():
        return {"pacs_skipped": reason}
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as tmp:
        root = Path(tmp)
        node_port = free_port()
        orthanc = Orthanc(root / "orthanc", node_port=node_port, stable_age=stable_age, no_delay=no_delay)
        node = None
        try:
            node = DicomNodeProcess(root / "node", port=node_port, args=[
                "--destination", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                "--stable-seconds", str(stable_seconds),
                *(["--complete-on-release", orthanc.aet] if complete_on_release else [])])
            results = []
            for index in range(runs):
                (root / f"run{index}").mkdir()
                results.append(one_run(orthanc, node, root / f"run{index}", no_delay=no_delay))
                log.info("pacs run %d: %s", index + 1, results[-1])
        except (RuntimeError, OSError) as exc:  # Orthanc or the node failed, timed out, refused
            return {"pacs_error": f"{type(exc).__name__}: {exc}"}
        finally:
            if node is not None:
                node.stop()
            orthanc.stop()
    medians = {f"pacs_{key}": round(statistics.median(r[key] for r in results), 2) for key in results[0]}
    return {**medians, "pacs_runs": results, "pacs_orthanc_stable_age_s": stable_age,
            "pacs_node_stable_seconds": stable_seconds, "pacs_complete_on_release": complete_on_release,
            "pacs_no_delay": no_delay}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pacs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs (default %(default)s); medians are printed")
    parser.add_argument("--stable-age", type=int, default=3, help="Orthanc's StableAge (shipped: 3)")
    parser.add_argument("--stable-seconds", type=float, default=5.0, help="the node's --stable-seconds (default 5)")
    parser.add_argument("--stability-wait-only", action="store_true",
                        help="the node waits --stable-seconds even for Orthanc's studies (before issue 28; "
                             "default: complete when Orthanc releases its association, as deployed)")
    parser.add_argument("--nagle", action="store_true",
                        help="leave Nagle's algorithm on in the scanner and Orthanc (before issue 28)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench: %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    print(json.dumps(measure(args.runs, args.stable_age, args.stable_seconds,
                             complete_on_release=not args.stability_wait_only, no_delay=not args.nagle)), flush=True)


if __name__ == "__main__":
    main()
