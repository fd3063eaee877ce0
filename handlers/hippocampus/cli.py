"""The batch command line: measure hippocampal volumes of study folders, optionally delivering the results.

    python -m handlers.hippocampus STUDY_DIR [STUDY_DIR ...] --out DIR [--send-to AE@HOST:PORT] [--stow-url URL]

Each study runs through the same pipeline as an upload (``handler.py``); with ``--send-to`` /
``--stow-url`` each study's SEG, SR and report also go to a PACS, through the DICOM node's outbox
(``inference/pacs/delivery.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pydicom
from PIL import Image

from handlers.hippocampus.handler import COMMAND, DICOM_OUTPUTS
from inference.config import Settings
from inference.dicom.files import dicom_files_in
from inference.errors import UnprocessableInput
from inference.pacs.delivery import STORED, DeliveryStatus, ResultSender
from inference.pacs.outbox import DicomDestination, StowDestination
from inference.pipeline.pipeline import Pipeline


def process_study(pipeline: Pipeline, folder: Path, out_dir: Path, dicom_outputs: Sequence[str] = ()) -> dict:
    """Run the pipeline on one study folder; write ``report.dcm``, ``report.png`` and ``volumes.json``.

    With ``dicom_outputs`` (``seg``, ``sr``) also ``seg.dcm`` / ``sr.dcm``. Returns the measures,
    the input hash and ``files``: the DICOM results written (the report first).
    """
    files = dicom_files_in(folder)
    if not files:
        raise UnprocessableInput(f"{folder} holds no DICOM files")
    request = {"inference_command": COMMAND, **({"dicom_outputs": list(dicom_outputs)} if dicom_outputs else {})}
    result = pipeline.run_files(request, files)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for part, buffer in zip(result.response_json["parts"], result.buffers, strict=True):
        if part["binary_type"] in ("dicom_secondary_capture", "dicom"):
            kind = pydicom.dcmread(io.BytesIO(buffer), stop_before_pixels=True).Modality
            path = out_dir / {"SEG": "seg.dcm", "SR": "sr.dcm"}.get(kind, "report.dcm")
            path.write_bytes(buffer)
            written.append(path)
    # the PNG is drawn from the file as written, so a report that does not read back fails the study
    Image.fromarray(pydicom.dcmread(out_dir / "report.dcm").pixel_array).save(out_dir / "report.png")
    measures = next(iter(result.response_json["series_ml_json"].values()))
    # the result's quality flag and change since the prior, as the HTTP door's JSON carries them
    assessment = {key: result.response_json[key] for key in ("quality", "change_since_prior")
                  if key in result.response_json}
    (out_dir / "volumes.json").write_text(json.dumps({"study": str(folder), "input_hash": result.input_hash,
                                                      **measures, **assessment}, indent=2))
    return {**measures, "input_hash": result.input_hash, "files": [str(p) for p in sorted(written)]}


def result_sender(args: argparse.Namespace, settings: Settings) -> ResultSender | None:
    """The sender for ``--send-to`` / ``--stow-url`` (the DICOM node's outbox under INFERENCE_PACS_ROOT), or None."""
    destinations = [DicomDestination.parse(text, settings.pacs_ae_title) for text in args.send_to]
    if args.stow_url:
        destinations.append(StowDestination(args.stow_url))
    if not destinations:
        return None
    return ResultSender(Path(settings.pacs_root) / "outbox", destinations,
                        retry_max_seconds=settings.pacs_retry_max_seconds, timeout=args.send_timeout)


def send_results(sender: ResultSender, study: Path, result: dict) -> str:
    """Queue a study's DICOM results; the batch name (input hash and model: a re-run finds its own)."""
    batch = "cli-" + hashlib.sha256(f"{result['input_hash']}:{result['model']}".encode()).hexdigest()[:24]
    study_uid = pydicom.dcmread(result["files"][0], stop_before_pixels=True).StudyInstanceUID
    sender.queue(batch, [Path(p) for p in result["files"]], {"study": study_uid, "input_hash": result["input_hash"]})
    return batch


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every study named (in parallel), send results when asked; 1 if a study failed or was not delivered."""
    parser = argparse.ArgumentParser(
        prog="python -m handlers.hippocampus",
        description="Measure hippocampal volumes of study folders (not for clinical use): each study's HippoCrop\n"
                    "series is segmented; report.dcm, report.png and volumes.json go to OUT/<NN>-<study>/.",
        epilog="Example:\n"
               "  python -m handlers.hippocampus ../shared/data/studies/Study1 ../shared/data/studies/Study2 "
               "--out reports/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", type=Path, help="study folders (DICOM files, any depth)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one sub-folder per study")
    parser.add_argument("--jobs", type=int, default=2, help="studies processed in parallel (default %(default)s)")
    parser.add_argument("--send-to", action="append", default=[], metavar="AE@HOST:PORT",
                        help="also send each study's SEG, SR and report by C-STORE to this PACS (repeatable); "
                             "undelivered results stay in the DICOM node's outbox (INFERENCE_PACS_ROOT/outbox)")
    parser.add_argument("--stow-url", help="also send them by STOW-RS to this DICOMweb base URL")
    parser.add_argument("--send-timeout", type=float, default=60.0,
                        help="seconds to wait for each study's results to be confirmed (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = Settings.from_env()
    try:
        sender = result_sender(args, settings)
    except ValueError as exc:
        parser.error(str(exc))
    pipeline = Pipeline(settings, commands=[COMMAND])
    report = pipeline.warm_up()
    if report.failed:
        parser.exit(1, f"error: the model cannot be loaded: {report.failed[COMMAND]}\n")
    results: dict[str, dict] = {}
    batches: dict[str, str] = {}  # batch -> study

    def report_delivery(statuses: list[tuple[str, DeliveryStatus]]) -> None:
        for batch, status in statuses:
            results[batches[batch]].setdefault("delivery", {})[status.destination] = status.as_json()
            where = "stored" if status.status == STORED else f"NOT confirmed, left in the outbox {status.outbox}"
            print(f"{batches[batch]}: {status.files} results to {status.destination}: {where}", file=sys.stderr)

    names = {study: f"{i:02d}-{study.resolve().name}" for i, study in enumerate(args.studies)}
    outputs = DICOM_OUTPUTS if sender else ()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(process_study, pipeline, study, args.out / names[study], outputs): study
                   for study in args.studies}
        for done, future in enumerate(as_completed(futures), 1):
            study = futures[future]
            try:
                results[str(study)] = {"status": "ok", **future.result()}
            except Exception as exc:  # one bad study must not stop the others
                results[str(study)] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            step = results[str(study)]["status"]
            if sender and step == "ok":
                batches[send_results(sender, study, results[str(study)])] = str(study)
                step += f"; sending {len(results[str(study)]['files'])} results"
            print(f"[{done}/{len(futures)}] {study}: {step}", file=sys.stderr)
            if sender:
                report_delivery(sender.confirmed())
    if sender:
        report_delivery(sender.close())
        for destination, (delivered, waiting) in sender.earlier_results().items():
            print(f"earlier runs' results for {destination}: {delivered} delivered now, {waiting} still waiting",
                  file=sys.stderr)
    destinations = sender.destinations if sender else []
    print_summary(args.studies, results, destinations)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    undelivered = any(d["status"] != STORED for r in results.values() for d in r.get("delivery", {}).values())
    return 1 if undelivered or any(r["status"] != "ok" for r in results.values()) else 0


def print_summary(studies: Sequence[Path], results: dict[str, dict], destinations: Sequence[str]) -> None:
    """The table on stdout: volumes, one column per destination (stored / outbox), status; then what waits where."""
    width = max([len(d) for d in destinations] + [9])
    columns = "".join(f" {d:>{width}}" for d in destinations)
    print(f"{'study':<48} {'anterior':>10} {'posterior':>10} {'total mm3':>10}{columns}  status")
    for study in studies:
        r = results[str(study)]
        sent = "".join(f" {r.get('delivery', {}).get(d, {}).get('status', '-'):>{width}}" for d in destinations)
        if r["status"] == "ok":
            print(f"{str(study):<48} {r['anterior_volume_mm3']:>10,.1f} {r['posterior_volume_mm3']:>10,.1f} "
                  f"{r['total_volume_mm3']:>10,.1f}{sent}  ok")
        else:
            print(f"{str(study):<48} {'':>10} {'':>10} {'':>10}{sent}  FAILED: {r['error']}")
    for study in studies:
        for destination, d in results[str(study)].get("delivery", {}).items():
            if d["status"] != STORED:
                print(f"not delivered: {study} -> {destination}: {d['files']} results wait in {d['outbox']} "
                      f"(the next run or dicom_node.py with the same INFERENCE_PACS_ROOT sends them)")
