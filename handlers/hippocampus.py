"""Hippocampal volume: segment anterior and posterior hippocampus in a study's crop series.

Over HTTP (``inference_command`` ``get-hippocampus-volume``, or ``POST /hippocampus``) the
handler finds the crop series (SeriesDescription matching the model version's rule, or
``INFERENCE_HIPPOCAMPUS_SERIES``), segments it with the version of the ``hippocampus`` family the
request names (``model_version``; the manifest's default otherwise, see ``models/registry.py``) and
answers a ``numeric_label_mask``, the volumes in ``series_ml_json``, the model's provenance and a
Secondary Capture report. From the command line it does the same for
study folders:

    python -m handlers.hippocampus STUDY_DIR [STUDY_DIR ...] --out DIR [--send-to AE@HOST:PORT] [--stow-url URL]

(with ``--send-to`` / ``--stow-url`` each study's SEG, SR and report also go to a PACS, through
the DICOM node's outbox: ``inference/pacs/delivery.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from PIL import Image, ImageDraw

from inference.pipeline.handler_registry import Param, register
from inference.config import Settings
from inference.dicom.files import dicom_files_in
from inference.dicom.series import Volume, describe_series, group_by_series, load_volume, require_instances
from inference.dicom.writing import secondary_capture, series_from_volume
from inference.dicom.instance import DicomInstance
from inference.pipeline.context import HandlerContext
from inference.pacs.delivery import STORED, DeliveryStatus, ResultSender
from inference.dicom.results import Algorithm, measurement_report, segmentation
from inference.errors import UnprocessableInput
from models.registry import ModelUnavailable, ModelVersion, Provenance, Structure, registry_for
from inference.pacs.outbox import DicomDestination, StowDestination
from inference.pipeline.pipeline import Pipeline
from inference.imaging.render import font, overlay_labels, to_rgb, upscale, window_values
from inference.logs import TaggedLogger

log = TaggedLogger(logging.getLogger("inference.hippocampus"))

ANTERIOR, POSTERIOR = 1, 2  # label values, as in the training data and the manifest's structures
COMMAND = "get-hippocampus-volume"
FAMILY = "hippocampus"
#: What ``dicom_outputs`` may ask for: a DICOM Segmentation, a TID 1500 measurement report.
DICOM_OUTPUTS = ("seg", "sr")


def load_version(version: ModelVersion, onnx_cache: Path | None = None):
    """The segmenter of a registry version: its weights with its inference settings (CUDA when available).

    ``onnx_cache`` (``INFERENCE_MODEL_CACHE``) keeps the exported ONNX graphs between loads.
    """
    from models.segmenter import HippocampusSegmenter

    started = time.perf_counter()
    members = version.inference.get("members", "all")
    segmenter = HippocampusSegmenter.load(version.weights, members=None if members == "all" else list(members),
                                          flips=bool(version.inference.get("flips", True)),
                                          canvas=str(version.inference.get("canvas", "fixed")), onnx_cache=onnx_cache)
    log.info("loaded %s in %.1fs", version.provenance.short, time.perf_counter() - started)
    return segmenter


def segmenter_for(settings: Settings, version: ModelVersion):
    """The loaded model of a registry version (loaded once per process, then shared)."""
    registry = registry_for(settings.model_manifest)
    return registry.model(version, partial(load_version, onnx_cache=settings.model_cache))


def warm_up(settings: Settings) -> str | None:
    """Load every version of the family; fail if the default cannot load, report the others that could not."""
    registry = registry_for(settings.model_manifest)
    failed = registry.load_family(FAMILY, partial(load_version, onnx_cache=settings.model_cache))
    default = registry.family(FAMILY).default_version
    if default in failed:
        raise ModelUnavailable(f"{FAMILY} {default} (the default): {failed[default]}")
    return "; ".join(f"{FAMILY} {name} unavailable: {why}" for name, why in failed.items()) or None


def find_crop_series(series: dict[str, list[DicomInstance]], pattern: str) -> list[DicomInstance]:
    """The series whose SeriesDescription matches ``pattern``; a 422 listing the series otherwise."""
    matcher = re.compile(pattern, re.IGNORECASE)
    matches = [items for items in series.values()
               if matcher.search(str(items[0].dataset.get("SeriesDescription", "")))]
    if not matches:
        raise UnprocessableInput(f"no series has a SeriesDescription matching {pattern!r} (the hippocampus crop); "
                                 f"series present: {describe_series(series)}")
    if len(matches) > 1:
        log.warning("%d series match %r; using the first", len(matches), pattern)
    return matches[0]


def ras_affine(volume: Volume) -> np.ndarray:
    """4x4 affine from (column, row, slice) indices of ``volume`` to RAS millimetres.

    DICOM patient coordinates are LPS; NIfTI, which the model was trained on, is RAS: the two
    differ by the sign of x and y. Without orientation tags the series is taken as axial.
    """
    first = volume.datasets[0]
    orientation = np.asarray(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    row_direction, column_direction = orientation[:3], orientation[3:]
    slice_spacing, row_spacing, column_spacing = volume.spacing
    affine = np.eye(4)
    affine[:3, 0] = row_direction * column_spacing  # along a row: the column index grows
    affine[:3, 1] = column_direction * row_spacing
    affine[:3, 2] = np.cross(row_direction, column_direction) * slice_spacing
    affine[:3, 3] = np.asarray(first.get("ImagePositionPatient", [0, 0, 0]), float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def to_model_orientation(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The crop as the model saw its training data (RAS axes, as nibabel loads the NIfTI files).

    Returns the array and the orientation that ``from_model_orientation`` needs to undo it.
    """
    orientation = io_orientation(ras_affine(volume))
    voxels = volume.voxels.transpose(2, 1, 0)  # (slices, rows, columns) -> (columns, rows, slices)
    return np.ascontiguousarray(apply_orientation(voxels, orientation)), orientation


def from_model_orientation(labels: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """Labels in the model's RAS order back to (slices, rows, columns), the 3D mask's order on the wire."""
    undo = ornt_transform(axcodes2ornt("RAS"), orientation)
    return np.ascontiguousarray(apply_orientation(labels, undo).transpose(2, 1, 0))


def series_from_nifti(image_path: str | Path, description: str = "HippoCrop", **kwargs) -> list:
    """A NIfTI crop (as in the training data) written as the DICOM series a viewer would send.

    The voxels are reoriented from the NIfTI's axes to LPS (DICOM's patient axes) and stored as
    axial slices (rows run posterior-wards, columns leftwards). Used by the tests, and to try the
    model on training cases through the whole DICOM path.
    """
    import nibabel

    image = nibabel.load(str(image_path))
    to_lps = ornt_transform(io_orientation(image.affine), axcodes2ornt("LPS"))
    voxels = apply_orientation(np.rint(np.asarray(image.dataobj)).astype(np.int16), to_lps)
    zooms = np.asarray(image.header.get_zooms()[:3], float)[to_lps[:, 0].astype(int).argsort()]
    x, y, z = (float(v) for v in zooms)
    return series_from_volume(np.ascontiguousarray(voxels.transpose(2, 1, 0)), spacing=(z, y, x),
                              description=description, orientation=(1, 0, 0, 0, 1, 0), **kwargs)


def measure_volumes(labels: np.ndarray, volume: Volume) -> dict:
    """Voxel counts and volumes in mm3 (voxel count x slice spacing x pixel spacing)."""
    voxel_mm3 = volume.voxel_volume_mm3
    counts = np.bincount(labels.ravel(), minlength=3)
    anterior, posterior = int(counts[ANTERIOR]), int(counts[POSTERIOR])
    return {
        "anterior_volume_mm3": round(anterior * voxel_mm3, 1),
        "posterior_volume_mm3": round(posterior * voxel_mm3, 1),
        "total_volume_mm3": round((anterior + posterior) * voxel_mm3, 1),
        "anterior_voxels": anterior,
        "posterior_voxels": posterior,
        "voxel_volume_mm3": round(voxel_mm3, 4),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
    }


def segment_study(instances: Sequence[DicomInstance], settings: Settings, version: ModelVersion,
                  segmenter) -> tuple[Volume, np.ndarray, dict, float]:
    """Find and segment the crop series: its volume, labels (slices, rows, columns), measures, seconds."""
    pattern = settings.hippocampus_series or version.input["series_description"]
    crop = find_crop_series(group_by_series(require_instances(instances)), pattern)
    volume = load_volume(crop)
    started = time.perf_counter()
    voxels, orientation = to_model_orientation(volume)
    labels = from_model_orientation(segmenter.segment(voxels), orientation)
    seconds = time.perf_counter() - started
    return volume, labels, measure_volumes(labels, volume), seconds


def render_report(volume: Volume, labels: np.ndarray, measures: dict, model_version: str,
                  structures: Sequence[Structure]) -> np.ndarray:
    """The report image (RGB uint8): three slices with the overlay, the volumes, the model, a warning."""
    counts = labels.reshape(labels.shape[0], -1).astype(bool).sum(axis=1)
    present = np.flatnonzero(counts)
    if present.size:
        picks = [int(present[int(round(q * (present.size - 1)))]) for q in (0.25, 0.5, 0.75)]
    else:
        picks = [labels.shape[0] // 4, labels.shape[0] // 2, 3 * labels.shape[0] // 4]
    scale = max(1, 300 // max(volume.voxels.shape[1:]))
    low, high = np.percentile(volume.voxels, [0.5, 99.5])  # one window for the whole crop
    colors = {s.label: s.color for s in structures}
    tiles = []
    for k in picks:
        gray = window_values(volume.voxels[k], (low + high) / 2, max(high - low, 1.0))
        rgb = overlay_labels(to_rgb(upscale(gray, scale)), upscale(labels[k], scale), colors)
        tiles.append((k, Image.fromarray(rgb)))
    pad, header = 16, 78
    tile_w, tile_h = tiles[0][1].size
    width = max(3 * tile_w + 4 * pad, 600)
    height = header + tile_h + 24 + 170
    image = Image.new("RGB", (width, height), (12, 12, 12))
    draw = ImageDraw.Draw(image)
    white, grey, small, value_font = (255, 255, 255), (200, 200, 200), font(13), font(15)
    draw.text((pad, 10), "Hippocampal volume report", fill=white, font=font(18))
    draw.text((pad, 34), "Research use only. NOT FOR CLINICAL USE.", fill=(255, 180, 0), font=font(14))
    draw.text((pad, 54), f"Series: {volume.datasets[0].get('SeriesDescription', '')}  "
                         f"({volume.voxels.shape[0]} slices, {volume.voxels.shape[1]}x{volume.voxels.shape[2]})",
              fill=grey, font=small)
    for i, (k, tile) in enumerate(tiles):
        x = pad + i * (tile_w + pad)
        image.paste(tile, (x, header))
        draw.text((x, header + tile_h + 4), f"slice {k + 1} of {labels.shape[0]}", fill=grey, font=small)
    y = header + tile_h + 32
    rows = [("Anterior", measures["anterior_volume_mm3"], colors[ANTERIOR]),
            ("Posterior", measures["posterior_volume_mm3"], colors[POSTERIOR]),
            ("Total", measures["total_volume_mm3"], white)]
    for name, value, color in rows:
        draw.rectangle((pad, y + 3, pad + 12, y + 15), fill=tuple(color))
        draw.text((pad + 20, y), name, fill=white, font=value_font)
        amount = f"{value:,.1f} mm3"  # right-aligned so the digits line up (the bundled font has no "³")
        draw.text((pad + 200 - draw.textlength(amount, font=value_font), y), amount, fill=white, font=value_font)
        y += 24
    spacing = " x ".join(f"{s:g}" for s in measures["spacing_mm"])
    draw.text((pad, y + 6), f"Voxel spacing (slice x row x column): {spacing} mm", fill=grey, font=small)
    draw.text((pad, y + 28), f"Model: {model_version}", fill=grey, font=small)
    return np.asarray(image)


def dicom_results(volume: Volume, labels: np.ndarray, structures: Sequence[Structure], provenance: Provenance,
                  wanted: Sequence[str]) -> list[tuple[dict, object]]:
    """The SEG and/or SR asked for, as (response part, dataset) pairs, in the study of ``volume``.

    Segments and measurements are the model version's structures (the manifest's codes and colours);
    the algorithm is identified by family, version and the weights' SHA-256.
    """
    algorithm = Algorithm(provenance.family, f"{provenance.version} (weights sha256 {provenance.weights_sha256[:12]})")
    try:
        seg = segmentation(volume.datasets, labels, structures, algorithm, description="Hippocampus segmentation")
    except ValueError as exc:  # highdicom's checks of the source images (e.g. no FrameOfReferenceUID)
        raise UnprocessableInput(f"no DICOM Segmentation can be made on series {volume.series_uid}: {exc}; "
                                 f"request without dicom_outputs for the mask alone") from exc
    out = []
    if "seg" in wanted:
        out.append(({"label": "Hippocampus segmentation", "binary_type": "dicom"}, seg))
    if "sr" in wanted:
        # as measure_volumes rounds them, so the report says what series_ml_json says
        volumes = {s.name: round(int(np.count_nonzero(labels == s.label)) * volume.voxel_volume_mm3, 1)
                   for s in structures}
        report = measurement_report(volume.datasets, seg, volumes, structures, algorithm,
                                    description="Hippocampal volume measurements")
        out.append(({"label": "Hippocampal volume measurements", "binary_type": "dicom"}, report))
    return out


@register(COMMAND, route="/hippocampus", warm_up=warm_up, family=FAMILY,
          description="Anterior/posterior hippocampus segmentation and volumes (HippoCrop series)",
          params=[Param("dicom_outputs", "string-list", default=[], choices=DICOM_OUTPUTS,
                        description="DICOM results to add: 'seg' (a DICOM Segmentation), 'sr' (a TID 1500 "
                                    "volume report)")])
def hippocampus_volume(instances: Sequence[DicomInstance], context: HandlerContext) -> tuple[dict, list]:
    """Segment the hippocampus crop series: label mask, volumes and a Secondary Capture report.

    ``"dicom_outputs": ["seg", "sr"]`` adds a DICOM Segmentation and a measurement report.
    """
    settings, wanted, version = context.settings, context.params["dicom_outputs"], context.model_version
    segmenter = segmenter_for(settings, version)
    provenance = version.provenance
    volume, labels, measures, seconds = segment_study(instances, settings, version, segmenter)
    model_version = provenance.short
    log.info("segmented %s in %.3fs: total %.1f mm3", volume.voxels.shape, seconds, measures["total_volume_mm3"])
    reference = volume.datasets[0]
    report = secondary_capture(render_report(volume, labels, measures, model_version, version.structures), reference,
                               description="Hippocampal volume report", algorithm=provenance)
    series_uid = volume.series_uid
    response = {
        "protocol_version": "1.0",
        "parts": [
            {"label": "Hippocampus", "binary_type": "numeric_label_mask",
             "label_map": {str(s.label): s.name for s in version.structures},
             "binary_data_shape": {"timepoints": 1, "depth": int(labels.shape[0]),
                                   "height": int(labels.shape[1]), "width": int(labels.shape[2])},
             "SeriesInstanceUID": series_uid},
            {"label": "Hippocampal volume report", "binary_type": "dicom_secondary_capture"},
        ],
        "series_ml_json": {series_uid: {**measures, "model": model_version, "inference_seconds": round(seconds, 3)}},
        "model": provenance.as_json(),
    }
    buffers = [labels, report]
    for part, dataset in dicom_results(volume, labels, version.structures, provenance, wanted) if wanted else []:
        response["parts"].append(part)
        buffers.append(dataset)
    return response, buffers


# -- command line -------------------------------------------------------------------------
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
    for part, buffer in zip(result.response_json["parts"], result.buffers):
        if part["binary_type"] in ("dicom_secondary_capture", "dicom"):
            kind = pydicom.dcmread(io.BytesIO(buffer), stop_before_pixels=True).Modality
            path = out_dir / {"SEG": "seg.dcm", "SR": "sr.dcm"}.get(kind, "report.dcm")
            path.write_bytes(buffer)
            written.append(path)
    # the PNG is drawn from the file as written, so a report that does not read back fails the study
    Image.fromarray(pydicom.dcmread(out_dir / "report.dcm").pixel_array).save(out_dir / "report.png")
    measures = next(iter(result.response_json["series_ml_json"].values()))
    (out_dir / "volumes.json").write_text(json.dumps({"study": str(folder), "input_hash": result.input_hash,
                                                      **measures}, indent=2))
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


if __name__ == "__main__":
    sys.exit(main())
