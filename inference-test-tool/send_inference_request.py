"""Send a study to an inference server, check the answer against the protocol, render what a viewer would show.

    send-inference-request.sh -i path/to/study -c get-probability-mask
    send-inference-request.sh path/to/study -s --port 8900 -o out/

Exit status: 0 when the response is valid, 1 for an HTTP error, an unreachable server, an
unusable input folder or a protocol violation (the message names the part and why), 2 for
bad arguments (and when called without any).
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # the tool runs as a script; utils/ lives at the repo root

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import requests  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from requests_toolbelt.multipart.decoder import (  # noqa: E402
    ImproperBodyPartContentException,
    NonMultipartContentTypeException,
)
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid  # noqa: E402

from utils import protocol, render  # noqa: E402
from utils.client import InferenceRequestError, InferenceResult, send_inference_request  # noqa: E402
from utils.dicom import secondary_capture, sort_by_position  # noqa: E402
from utils.errors import OutputValidationError  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "inference-test-tool" / "output"
PROGRESS_MIN_BYTES = 5 * 1024 * 1024  # smaller requests go out without a progress bar
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BOX_COLOR = (255, 210, 0)
MEASUREMENT_COLOR = (0, 230, 190)
PNG_COMPRESSION = 3  # fast; the gallery of a full study is written in seconds


#: What decoding a response raises when it is not multipart or part 0 is not JSON.
UNDECODABLE = (ValueError, ImproperBodyPartContentException, NonMultipartContentTypeException)


class ToolError(Exception):
    """A failure the user can act on; printed without a traceback, exit status 1."""


# -- arguments -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="send-inference-request.sh",
        description="Send a study to an inference server, check the response against the protocol "
                    "and render what a viewer would draw.",
        epilog="Examples:\n"
               "  send-inference-request.sh -i ../shared/data/studies/Study1 -c get-hippocampus-volume\n"
               "  send-inference-request.sh study/ -s -c get-probability-mask -o out/\n"
               "  send-inference-request.sh --request_study_path Study1 -i study/ -c get-label-mask\n"
               "Exit status: 0 valid response, 1 error or protocol violation, 2 bad arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", nargs="?", help="folder of the study (DICOM, PNG or JPEG files, searched recursively)")
    parser.add_argument("-i", "--input", dest="input_option", metavar="INPUT", help="the same, as an option")
    parser.add_argument("-s", "--segmentation", action="store_true",
                        help="segmentation model: the response must hold at least one mask")
    parser.add_argument("--host", default="127.0.0.1", help="server host (default %(default)s)")
    parser.add_argument("-p", "--port", type=int, default=8900, help="server port (default %(default)s)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help="output folder (default inference-test-tool/output)")
    parser.add_argument("-c", "--inference_command", help="sets inference_command in the request JSON")
    parser.add_argument("-r", "--route", default="/", help="route to POST to (default %(default)s)")
    parser.add_argument("-a", "--attachments", nargs="+", action="extend", default=[], metavar="ATTACHMENT",
                        help="files sent between the JSON part and the DICOM files")
    parser.add_argument("-S", "--include_study_size", action="store_true",
                        help="add depth (images sent), height and width (first image) to the request JSON")
    parser.add_argument("-l", "--plot_labels", action="store_true",
                        help="write classification results (study_ml_json, series_ml_json) on the images")
    parser.add_argument("--request_options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra string entries of the request JSON")
    parser.add_argument("--request_study_path", metavar="PATH",
                        help="send only {\"studyPath\": PATH} (a folder under the server's data root); "
                             "give INPUT too to check and render against a local copy")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: environment variable INFERENCE_API_TOKEN)")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input and args.input_option and args.input != args.input_option:
        parser.error(f"two inputs given ({args.input} and -i {args.input_option}); give one")
    args.input = args.input or args.input_option
    if not args.input and not args.request_study_path:
        parser.error("give the study folder (INPUT or -i INPUT) or --request_study_path")
    options = {}
    for item in args.request_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--request_options takes KEY=VALUE, got {item!r}")
        options[key] = value
    args.request_options = options
    args.token = args.token or os.environ.get("INFERENCE_API_TOKEN") or None
    return args


# -- the input study -----------------------------------------------------------------------
@dataclass
class InputImage:
    """One file that is sent: its path and its header (pixels are read only to render)."""

    path: Path
    header: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.header.SOPInstanceUID)

    @property
    def has_pixels(self) -> bool:
        return "Rows" in self.header and "Columns" in self.header


@dataclass
class InputSeries:
    """A series as sent: its images sorted along the slice normal (InstanceNumber within a position)."""

    uid: str
    images: list[InputImage]

    @property
    def description(self) -> str:
        return str(self.images[0].header.get("SeriesDescription", "") or "no description")

    def info(self) -> protocol.SeriesInfo:
        """What the response is checked against; images of another size than the first are listed."""
        sizes = {image.sop_instance_uid: (int(image.header.get("Rows", 0)), int(image.header.get("Columns", 0)))
                 for image in self.images if image.has_pixels}
        rows, columns = next(iter(sizes.values()), (0, 0))
        return protocol.SeriesInfo(rows, columns, [image.sop_instance_uid for image in self.images],
                                   {sop: size for sop, size in sizes.items() if size != (rows, columns)})


@dataclass
class Study:
    """What was found in the input folder, in the order it is sent."""

    series: list[InputSeries]
    converted: list[Path] = field(default_factory=list)  # PNG/JPEG files turned into DICOM
    skipped: list[Path] = field(default_factory=list)  # neither DICOM nor an image

    @property
    def images(self) -> list[InputImage]:
        return [image for series in self.series for image in series.images]

    def series_infos(self) -> dict[str, protocol.SeriesInfo]:
        return {series.uid: series.info() for series in self.series}


def read_header(path: Path) -> tuple[Dataset | None, bool]:
    """The header of a DICOM file and whether it lacks the file preamble (None when not DICOM)."""
    with open(path, "rb") as handle:
        has_preamble = handle.read(132)[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except Exception:  # pydicom raises many kinds on non-DICOM files
        return None, False
    if "SOPInstanceUID" not in ds or "SOPClassUID" not in ds:
        return None, False  # DICOMDIR, or a file that only looked like DICOM to force=True
    return ds, not has_preamble


def rewrite_with_preamble(path: Path, folder: Path) -> Path:
    """A copy of a DICOM file without preamble/file meta, written as a proper DICOM file."""
    ds = pydicom.dcmread(path, force=True)
    implicit = ds.original_encoding[0] if ds.original_encoding[0] is not None else True
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def image_pixels(image: Image.Image) -> np.ndarray:
    """Pixels of a PNG/JPEG: uint8 or uint16 grey (rows, columns), or uint8 RGB (rows, columns, 3)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.clip(np.asarray(image), 0, 65535).astype("<u2")
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def image_to_dicom(path: Path, reference: Dataset, series_uid: str, number: int) -> Dataset:
    """A Secondary Capture instance (grey or RGB) of an image file, in the series ``series_uid``."""
    with Image.open(path) as image:
        pixels = image_pixels(image)
    rgb = pixels if pixels.ndim == 3 else np.zeros((*pixels.shape, 3), np.uint8)
    ds = secondary_capture(rgb, reference, description="Converted images", series_number=9001)
    if pixels.ndim == 2:
        bits = pixels.dtype.itemsize * 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        del ds.PlanarConfiguration
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = number
    ds.BurnedInAnnotation = "NO"
    ds.DerivationDescription = f"converted from {path.name} by the inference test tool"
    return ds


def convert_images(paths: Sequence[Path], headers: Sequence[Dataset], folder: Path) -> list[tuple[Path, Dataset]]:
    """Write the images as one new Secondary Capture series; joins the DICOM files' study if there is one."""
    studies = {str(h.get("StudyInstanceUID", "")) for h in headers}
    reference = Dataset()
    reference.StudyInstanceUID = studies.pop() if len(studies) == 1 else generate_uid()
    reference.PatientID = str(headers[0].get("PatientID", "ANON")) if headers else "ANON"
    reference.PatientName = str(headers[0].get("PatientName", "ANON")) if headers else "ANON"
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for number, path in enumerate(paths, start=1):
        try:
            ds = image_to_dicom(path, reference, series_uid, number)
        except OSError as exc:
            raise ToolError(f"cannot convert image {path} to DICOM: {exc}") from exc
        target = folder / f"image_{number:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append((target, pydicom.dcmread(target, stop_before_pixels=True)))
    return out


def load_study(folder: Path, work_dir: Path) -> Study:
    """Find DICOM files and images below ``folder``, group them by series and sort each series."""
    if not folder.is_dir():
        raise ToolError(f"input folder {folder} does not exist or is not a folder")
    found: list[tuple[Path, Dataset]] = []
    images, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
            continue
        header, needs_rewrite = read_header(path)
        if header is None:
            skipped.append(path)
            continue
        found.append((rewrite_with_preamble(path, work_dir / "rewritten") if needs_rewrite else path, header))
    if images:
        found += convert_images(images, [h for _, h in found], work_dir / "converted")
    if not found:
        raise ToolError(f"no DICOM, PNG or JPEG files found below {folder}")
    groups: dict[str, list[InputImage]] = {}
    for path, header in found:
        groups.setdefault(str(header.get("SeriesInstanceUID", "")), []).append(InputImage(path, header))
    series = []
    for uid, items in groups.items():
        by_header = {id(item.header): item for item in items}
        ordered = sort_by_position([item.header for item in items])
        series.append(InputSeries(uid, [by_header[id(h)] for h in ordered]))
    series.sort(key=lambda s: (int(s.images[0].header.get("SeriesNumber", 0) or 0), s.uid))
    return Study(series, images, skipped)


# -- the request ---------------------------------------------------------------------------
def build_request_json(args: argparse.Namespace, study: Study | None) -> dict[str, Any]:
    """The request JSON: studyUID (or studyPath), inference_command, study size and extra options."""
    request: dict[str, Any] = {}
    if args.request_study_path:
        request["studyPath"] = args.request_study_path
    if study is not None:
        request["studyUID"] = str(study.images[0].header.get("StudyInstanceUID", ""))
    if args.inference_command:
        request["inference_command"] = args.inference_command
    if args.include_study_size and study is not None:
        first = next((image.header for image in study.images if image.has_pixels), study.images[0].header)
        request.update(depth=len(study.images), height=int(first.get("Rows", 0)), width=int(first.get("Columns", 0)))
    request.update(args.request_options)
    return request


def server_url(host: str, port: int, route: str) -> str:
    base = host if "://" in host else f"http://{host}"
    return f"{base.rstrip('/')}:{port}/{route.lstrip('/')}"


def progress_bar(stream: TextIO, width: int = 40) -> Callable[[int, int], None]:
    """A callback drawing ``[#####.....]  42%  18.9/45.0 MB`` on ``stream``, redrawn per percent."""
    last = [-1]
    interactive = stream.isatty()
    step = 1 if interactive else 10  # a log file gets one line per 10 %
    start = "\r" if interactive else ""

    def update(sent: int, total: int) -> None:
        percent = 100 * sent // max(total, 1)
        if percent // step == last[0] // step:
            return
        last[0] = percent
        filled = width * percent // 100
        stream.write(f"{start}[{'#' * filled}{'.' * (width - filled)}] {percent:3d}%  "
                     f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB")
        if sent >= total:
            stream.write("\nsent; waiting for the answer\n")
        elif not interactive:
            stream.write("\n")
        stream.flush()

    return update


def request_size(files: Sequence[Path]) -> int:
    return sum(path.stat().st_size for path in files)


# -- checking the response -----------------------------------------------------------------
def parse_dicom_parts(response_json: dict, buffers: Sequence[bytes]) -> dict[int, Dataset]:
    """Every DICOM part parsed by pydicom, by part index; a part that does not parse is a violation."""
    parsed = {}
    for index, (part, buffer) in enumerate(zip(response_json.get("parts", []), buffers)):
        if part.get("binary_type") not in protocol.DICOM_TYPES:
            continue
        where = f"parts[{index}] ({part['binary_type']})"
        try:
            ds = pydicom.dcmread(io.BytesIO(buffer))
        except Exception as exc:
            raise OutputValidationError(f"{where}: does not parse as DICOM: {exc}") from exc
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
        if missing:
            raise OutputValidationError(f"{where}: does not parse as DICOM: no {' and no '.join(missing)} "
                                        "(truncated or not a DICOM object?)")
        parsed[index] = ds
    return parsed


def check_response(result: InferenceResult, study: Study | None, expect_masks: bool) -> dict[int, Dataset]:
    """Apply the protocol's rules (and, with a local study, the checks against it); returns the DICOM parts."""
    protocol.validate_response(result.response_json, result.buffers)
    if study is not None:
        protocol.check_against_study(result.response_json, study.series_infos())
    dicom_parts = parse_dicom_parts(result.response_json, result.buffers)
    if expect_masks and not any(p.get("binary_type") in protocol.MASK_TYPES for p in result.response_json["parts"]):
        raise OutputValidationError("-s (segmentation model) was given but the response has no mask parts")
    return dicom_parts


# -- rendering -----------------------------------------------------------------------------
@dataclass
class MaskPart:
    """A mask of the response as an array of its binary_data_shape: (T, D, H, W) for 3D, (H, W) for 2D."""

    index: int
    part: dict
    array: np.ndarray

    @property
    def is_3d(self) -> bool:
        return "depth" in self.part["binary_data_shape"]

    @property
    def name(self) -> str:
        return f"{self.part.get('label') or self.part['binary_type']} (part {self.index})"

    def plane_for(self, position: int, count: int) -> np.ndarray | None:
        """The 2D plane laid over the ``position``-th of ``count`` sorted images of its series."""
        if not self.is_3d:
            return self.array
        volume = self.array.reshape((-1, *self.array.shape[-3:]))
        timepoints, depth = volume.shape[:2]
        if timepoints > 1 and timepoints * depth == count:
            return volume[position % timepoints, position // timepoints]
        return volume[0, position] if position < depth else None


def mask_parts(response_json: dict, buffers: Sequence[bytes]) -> list[MaskPart]:
    out = []
    for index, (part, buffer) in enumerate(zip(response_json.get("parts", []), buffers)):
        if part.get("binary_type") in protocol.MASK_TYPES:
            shape = protocol.mask_array_shape(part["binary_data_shape"])
            out.append(MaskPart(index, part, np.frombuffer(buffer, np.uint8).reshape(shape)))
    return out


def _masks_for(masks: Sequence[MaskPart], series: InputSeries, single_series: bool, position: int,
               image: InputImage) -> list[tuple[MaskPart, np.ndarray]]:
    """(mask, plane) pairs drawn on one image: 3D masks of its series, 2D masks naming it."""
    out = []
    for mask in masks:
        if mask.is_3d:
            target = mask.part.get("SeriesInstanceUID")
            if target == series.uid or (target is None and single_series):
                plane = mask.plane_for(position, len(series.images))
                if plane is not None:
                    out.append((mask, plane))
        elif mask.part.get("dicom_image", {}).get("SOPInstanceUID") == image.sop_instance_uid:
            out.append((mask, mask.array))
    return out


def _format_result(value: Any) -> str:
    """A classification entry on one line: ``label=Normal, confidence=0.73``."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v if not isinstance(v, (dict, list)) else json.dumps(v)}" for k, v in value.items())
    return json.dumps(value)


def overlay_masks(rgb: np.ndarray, masks: Sequence[tuple[MaskPart, np.ndarray]], palettes: dict,
                  factor: int) -> tuple[np.ndarray, list[tuple[str, render.Color | None]]]:
    """Draw masks in viewer order (heatmaps, label maps, then probability/boolean masks); returns the legend."""
    order = {"heatmap": 0, "numeric_label_mask": 1, "probability_mask": 2, "boolean_mask": 2}
    legend: list[tuple[str, render.Color | None]] = []
    for mask, plane in sorted(masks, key=lambda item: order[item[0].part["binary_type"]]):
        part, binary_type = mask.part, mask.part["binary_type"]
        plane = render.upscale(plane, factor)
        empty = "" if plane.any() else " - empty here"
        color = render.label_color(mask.index + 1)
        if binary_type == "heatmap":
            palette = palettes[part["palette"]]
            rgb = render.overlay_heatmap(rgb, plane, palette)
            top = tuple(int(c) for c in render.palette_lut(palette)[255][:3])
            legend.append((f"heatmap {mask.name}, palette {part['palette']}{empty}", top))
        elif binary_type == "numeric_label_mask":
            colors = {int(k): render.label_color(int(k)) for k in part["label_map"] if int(k) != 0}
            rgb = render.overlay_labels(rgb, plane, colors)
            legend.append((f"{mask.name}{empty}", None))
            legend += [(f"  {k}: {part['label_map'][str(k)]}", c) for k, c in colors.items()]
        elif binary_type == "probability_mask":
            threshold = part.get("probability_threshold")
            drawn = plane > render.probability_cutoff(threshold)
            rgb = render.overlay_mask(rgb, drawn, color)
            rule = f"> {threshold} x 255" if threshold is not None else f"> {protocol.DEFAULT_DRAW_THRESHOLD}"
            legend.append((f"{mask.name} {rule}{'' if drawn.any() else ' - nothing drawn here'}", color))
        else:
            rgb = render.overlay_mask(rgb, plane.astype(bool), color)
            legend.append((f"{mask.name}{empty}", color))
    return rgb, legend


def render_image(image: InputImage, series: InputSeries, position: int, masks: Sequence[MaskPart],
                 response_json: dict, single_series: bool, plot_labels: bool) -> tuple[Image.Image, list[str]]:
    """The PNG of one input image with everything the response draws on it, and caption lines."""
    ds = pydicom.dcmread(image.path)
    notes: list[tuple[str, render.Color | None]] = []
    try:
        gray_or_rgb = render.window_image(ds)
    except Exception as exc:  # e.g. a compressed transfer syntax without its decoder installed
        gray_or_rgb = np.full((int(ds.Rows), int(ds.Columns)), 64, np.uint8)
        notes.append((f"pixels not shown: {type(exc).__name__}: {exc}", None))
    factor = render.display_factor(*gray_or_rgb.shape[:2])
    rgb = render.upscale(render.to_rgb(gray_or_rgb), factor)
    rgb, legend = overlay_masks(rgb, _masks_for(masks, series, single_series, position, image),
                                response_json.get("palettes") or {}, factor)
    legend = notes + legend
    picture = Image.fromarray(rgb)
    sop = image.sop_instance_uid
    for box in response_json.get("bounding_boxes_2d") or []:
        if box["SOPInstanceUID"] == sop:
            render.draw_box(picture, box["top_left"], box["bottom_right"], box["label"], BOX_COLOR, factor)
            legend.append((f"box {box['label']}: {box['top_left']} - {box['bottom_right']}", BOX_COLOR))
    for item in response_json.get("linear_measurements_2d") or []:
        if item["SOPInstanceUID"] == sop:
            text = render.measurement_text(item["start"], item["end"], item.get("label", ""), ds.get("PixelSpacing"))
            render.draw_measurement(picture, item["start"], item["end"], text, MEASUREMENT_COLOR, factor)
            legend.append((f"measurement {text}", MEASUREMENT_COLOR))
    if plot_labels:
        if "study_ml_json" in response_json:
            legend.append((f"study: {_format_result(response_json['study_ml_json'])}", None))
        series_result = (response_json.get("series_ml_json") or {}).get(series.uid)
        if series_result is not None:
            legend.append((f"series: {_format_result(series_result)}", None))
    caption = [f"{position + 1}/{len(series.images)} · instance {ds.get('InstanceNumber', '?')} · {window_description(ds)}"]
    caption += [text.strip() for text, _ in legend]
    return render.add_panel(picture, legend), caption


def window_description(ds: Dataset) -> str:
    """How the image was windowed, for its caption (a header window can make an image look dark)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        return "colour"
    if center is not None and width is not None:
        return f"window {render.first_value(center):g}/{render.first_value(width):g} (header)"
    return "window min/max"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "series"


@dataclass
class Gallery:
    """What was written, for index.html and the summary."""

    series: list[tuple[InputSeries, list[tuple[str, list[str]]]]] = field(default_factory=list)
    dicom_parts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # dcm, png or "", caption
    masks: list[tuple[str, str]] = field(default_factory=list)  # npy file, description

    @property
    def png_count(self) -> int:
        return sum(len(items) for _, items in self.series) + sum(1 for _, png, _ in self.dicom_parts if png)


def clear_previous_output(output: Path) -> None:
    """Remove what an earlier run of the tool wrote there, so the gallery never shows stale pictures."""
    if not (output / "response.json").exists():
        return
    for pattern in ("response.json", "index.html", "output_masks_*.npy", "output_dicom_*"):
        for path in output.glob(pattern):
            path.unlink()
    shutil.rmtree(output / "images", ignore_errors=True)


def write_outputs(output: Path, result: InferenceResult, study: Study | None,
                  dicom_parts: dict[int, Dataset], plot_labels: bool) -> Gallery:
    """response.json, mask .npy files, DICOM parts (.dcm and .png) and one PNG per input image."""
    output.mkdir(parents=True, exist_ok=True)
    clear_previous_output(output)
    response_json = result.response_json
    (output / "response.json").write_text(json.dumps(response_json, indent=2) + "\n", encoding="utf-8")
    gallery = Gallery()
    masks = mask_parts(response_json, result.buffers)
    for mask in masks:
        name = f"output_masks_{mask.index}.npy"
        np.save(output / name, mask.array)
        gallery.masks.append((name, f"{mask.part['binary_type']} {mask.name}, shape {list(mask.array.shape)}"))
    for index, ds in dicom_parts.items():
        name = f"output_dicom_{index}"
        (output / f"{name}.dcm").write_bytes(result.buffers[index])
        caption = [f"part {index}: {response_json['parts'][index]['binary_type']}",
                   str(ds.get("SeriesDescription", "") or ds.get("SOPClassUID", ""))]
        png = ""
        if "PixelData" in ds:
            pixels = render.to_rgb(render.window_image(ds))
            Image.fromarray(render.upscale(pixels, render.display_factor(*pixels.shape[:2]))).save(
                output / f"{name}.png", compress_level=PNG_COMPRESSION)
            png = f"{name}.png"
        gallery.dicom_parts.append((f"{name}.dcm", png, caption))
    if study is None:
        return gallery
    single = len(study.series) == 1
    for number, series in enumerate(study.series, start=1):
        folder = Path("images") / f"{number:02d}-{_slug(series.description)}"
        (output / folder).mkdir(parents=True, exist_ok=True)
        items = []
        for position, image in enumerate(series.images):
            if not image.has_pixels:
                continue
            picture, caption = render_image(image, series, position, masks, response_json, single, plot_labels)
            name = (folder / f"{position + 1:04d}.png").as_posix()
            picture.save(output / name, compress_level=PNG_COMPRESSION)
            items.append((name, caption))
        gallery.series.append((series, items))
    return gallery


# -- index.html ----------------------------------------------------------------------------
PAGE_STYLE = """
body { font-family: sans-serif; background: #111; color: #ddd; margin: 1.5em; }
h1, h2 { font-weight: normal; } h2 small { color: #999; font-size: 60%; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; background: #1c1c1c; padding: 6px; width: 260px; }
figure img { width: 256px; image-rendering: pixelated; }
figcaption { font-size: 12px; line-height: 1.35; word-break: break-word; }
pre { background: #1c1c1c; padding: 1em; overflow: auto; font-size: 12px; }
a { color: #7cf; }
"""


def _figure(href: str, caption: Sequence[str]) -> str:
    text = "<br>".join(html.escape(line) for line in caption)
    return f'<figure><a href="{html.escape(href)}"><img src="{html.escape(href)}" loading="lazy" alt=""></a>' \
           f"<figcaption>{text}</figcaption></figure>"


def write_index(output: Path, gallery: Gallery, response_json: dict, summary: Sequence[str]) -> Path:
    """A self-contained gallery page (relative links) of everything written, with the JSON response."""
    body = ["<h1>Inference test tool</h1>", "<p>" + "<br>".join(html.escape(line) for line in summary) + "</p>"]
    for series, items in gallery.series:
        body.append(f"<h2>{html.escape(series.description)} <small>{html.escape(series.uid)} · "
                    f"{len(series.images)} images</small></h2>")
        body.append('<div class="grid">' + "".join(_figure(name, caption) for name, caption in items) + "</div>")
    if gallery.dicom_parts:
        body.append("<h2>DICOM parts returned</h2><div class=\"grid\">")
        for dcm, png, caption in gallery.dicom_parts:
            link = f'<a href="{html.escape(dcm)}">{html.escape(dcm)}</a>'
            body.append(_figure(png, caption + [dcm]) if png else f"<figure>{link}<br>{'<br>'.join(map(html.escape, caption))}</figure>")
        body.append("</div>")
    if gallery.masks:
        body.append("<h2>Mask buffers</h2><ul>" + "".join(
            f'<li><a href="{html.escape(n)}">{html.escape(n)}</a>: {html.escape(d)}</li>' for n, d in gallery.masks) + "</ul>")
    body.append('<h2>Response JSON <small><a href="response.json">response.json</a></small></h2>')
    body.append(f"<pre>{html.escape(json.dumps(response_json, indent=2))}</pre>")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Inference test tool</title>"
            f"<style>{PAGE_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = output / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


# -- summary and main ----------------------------------------------------------------------
def describe_response(response_json: dict) -> list[str]:
    """What came back, in a few lines: parts by binary_type, boxes, measurements, classification."""
    counts: dict[str, int] = {}
    for part in response_json.get("parts", []):
        counts[part["binary_type"]] = counts.get(part["binary_type"], 0) + 1
    lines = ["parts: " + (", ".join(f"{n} {kind}" for kind, n in counts.items()) or "none")]
    lines.append(f"bounding boxes: {len(response_json.get('bounding_boxes_2d') or [])}, "
                 f"linear measurements: {len(response_json.get('linear_measurements_2d') or [])}")
    if "study_ml_json" in response_json:
        lines.append(f"study classification: {_format_result(response_json['study_ml_json'])}")
    for uid, value in (response_json.get("series_ml_json") or {}).items():
        lines.append(f"series {uid}: {_format_result(value)}")
    return lines


def run(args: argparse.Namespace, work_dir: Path) -> int:
    study = load_study(Path(args.input), work_dir) if args.input else None
    files = [] if args.request_study_path else [image.path for image in study.images]
    if args.request_study_path and args.attachments:
        print("warning: attachments are not sent with --request_study_path (a JSON-only request)", file=sys.stderr)
    for attachment in args.attachments:
        if not Path(attachment).is_file():
            raise ToolError(f"attachment {attachment} is not a file")
    request_json = build_request_json(args, study)
    url = server_url(args.host, args.port, args.route)
    size = request_size(files + [Path(a) for a in args.attachments]) if files else 0
    progress = progress_bar(sys.stderr) if size > PROGRESS_MIN_BYTES else None
    started = time.perf_counter()
    try:
        result = send_inference_request(url, request_json, files, attachments=args.attachments if files else (),
                                        token=args.token, progress=progress)
    except requests.ConnectionError as exc:
        raise ToolError(f"cannot reach the server at {url}: is it running (make serve) on that host and port? ({exc})") from exc
    except OutputValidationError as exc:
        raise ToolError(f"the response breaks the protocol: {exc.message}") from exc
    except UNDECODABLE as exc:
        raise ToolError(f"the response breaks the protocol: it cannot be decoded ({type(exc).__name__}: {exc}); "
                        "it must be multipart with the JSON object as part 0") from exc
    elapsed = time.perf_counter() - started
    sent = (f"{len(files)} files in {len(study.series)} series" if files
            else f"studyPath {args.request_study_path!r}")
    summary = [f"sent {sent} ({result.request_bytes / 1e6:.2f} MB) to {url}"
               + (f" with inference_command {args.inference_command}" if args.inference_command else ""),
               f"round trip {elapsed:.2f} s, response {result.response_bytes / 1e6:.2f} MB"]
    if study is not None and study.converted:
        summary.append(f"converted {len(study.converted)} PNG/JPEG images to a Secondary Capture series")
    if study is not None and study.skipped:
        summary.append(f"skipped {len(study.skipped)} files that are neither DICOM nor PNG/JPEG")
    try:
        dicom_parts = check_response(result, study, args.segmentation)
    except OutputValidationError as exc:
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "response.json").write_text(json.dumps(result.response_json, indent=2) + "\n", encoding="utf-8")
        raise ToolError(f"the response breaks the protocol: {exc.message}\n"
                        f"(response JSON written to {output / 'response.json'})") from exc
    summary += describe_response(result.response_json)
    summary.append("response checked against the protocol"
                   + (" and the study sent: OK" if study is not None else ": OK (no local study to compare with)"))
    gallery = write_outputs(Path(args.output), result, study, dicom_parts, args.plot_labels)
    index = write_index(Path(args.output), gallery, result.response_json, summary)
    summary.append(f"wrote {gallery.png_count} PNGs, {len(gallery.masks)} mask files and "
                   f"{len(gallery.dicom_parts)} DICOM files; open {index}")
    print("\n".join(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 valid response, 1 failure, 2 bad arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        build_parser().print_help(sys.stderr)
        return 2
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse exits on bad arguments and -h
        return int(exc.code or 0)
    try:
        with tempfile.TemporaryDirectory(prefix="inference-test-tool-") as work_dir:
            return run(args, Path(work_dir))
    except InferenceRequestError as exc:
        print(f"error: the server answered HTTP {exc.status}: {exc.message}", file=sys.stderr)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
