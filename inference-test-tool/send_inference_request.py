"""Send a study to an inference server, check the answer against the protocol, render what a viewer would show.

    send-inference-request.sh -i path/to/study -c get-probability-mask
    send-inference-request.sh path/to/study -s --port 8900 -o out/

Exit status: 0 when the response is valid, 1 for an HTTP error, an unreachable server, an
unusable input folder or a protocol violation (the message names the part and why), 2 for
bad arguments (and when called without any).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

TOOL_DIR = Path(__file__).resolve().parent
REPO_ROOT = TOOL_DIR.parent
for folder in (REPO_ROOT, TOOL_DIR):  # run as a script: utils/ is at the repo root, tool_* next to it
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import pydicom  # noqa: E402
import requests  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from requests_toolbelt.multipart.decoder import (  # noqa: E402
    ImproperBodyPartContentException,
    NonMultipartContentTypeException,
)

from tool_gallery import clear_previous_output, format_result, write_index, write_outputs  # noqa: E402
from tool_input import Study, ToolError, load_study  # noqa: E402
from utils import protocol  # noqa: E402
from utils.client import InferenceRequestError, InferenceResult, send_inference_request  # noqa: E402
from utils.errors import OutputValidationError  # noqa: E402

DEFAULT_OUTPUT = TOOL_DIR / "output"
PROGRESS_MIN_BYTES = 5 * 1024 * 1024  # smaller requests go out without a progress bar

#: What decoding a response raises when it is not multipart or part 0 is not JSON.
UNDECODABLE = (ValueError, ImproperBodyPartContentException, NonMultipartContentTypeException)


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
        lines.append(f"study classification: {format_result(response_json['study_ml_json'])}")
    for uid, value in (response_json.get("series_ml_json") or {}).items():
        lines.append(f"series {uid}: {format_result(value)}")
    return lines


def send(args: argparse.Namespace, url: str, request_json: dict, files: Sequence[Path]) -> InferenceResult:
    """POST the request (progress bar on stderr for large studies); undecodable answers become ToolError."""
    size = request_size([*files, *map(Path, args.attachments)]) if files else 0
    progress = progress_bar(sys.stderr) if size > PROGRESS_MIN_BYTES else None
    try:
        return send_inference_request(url, request_json, files, attachments=args.attachments if files else (),
                                      token=args.token, progress=progress)
    except requests.ConnectionError as exc:
        raise ToolError(f"cannot reach the server at {url}: is it running (make serve) on that host and port? ({exc})") from exc
    except OutputValidationError as exc:
        raise ToolError(f"the response breaks the protocol: {exc.message}") from exc
    except UNDECODABLE as exc:
        raise ToolError(f"the response breaks the protocol: it cannot be decoded ({type(exc).__name__}: {exc}); "
                        "it must be multipart with the JSON object as part 0") from exc


def run(args: argparse.Namespace, work_dir: Path) -> int:
    """Load, send, check, write and summarize; raises ToolError or InferenceRequestError on failure."""
    study = load_study(Path(args.input), work_dir) if args.input else None
    files = [] if args.request_study_path or study is None else [image.path for image in study.images]
    if args.request_study_path and args.attachments:
        print("warning: attachments are not sent with --request_study_path (a JSON-only request)", file=sys.stderr)
    for attachment in args.attachments:
        if not Path(attachment).is_file():
            raise ToolError(f"attachment {attachment} is not a file")
    url = server_url(args.host, args.port, args.route)
    started = time.perf_counter()
    result = send(args, url, build_request_json(args, study), files)
    elapsed = time.perf_counter() - started
    sent = f"{len(files)} files in {len(study.series)} series" if files else f"studyPath {args.request_study_path!r}"
    summary = [f"sent {sent} ({result.request_bytes / 1e6:.2f} MB) to {url}"
               + (f" with inference_command {args.inference_command}" if args.inference_command else ""),
               f"round trip {elapsed:.2f} s, response {result.response_bytes / 1e6:.2f} MB"]
    if study is not None and study.converted:
        summary.append(f"converted {len(study.converted)} PNG/JPEG images to a Secondary Capture series")
    if study is not None and study.skipped:
        summary.append(f"skipped {len(study.skipped)} files that are neither DICOM nor PNG/JPEG")
    output = Path(args.output)
    try:
        dicom_parts = check_response(result, study, args.segmentation)
    except OutputValidationError as exc:
        output.mkdir(parents=True, exist_ok=True)
        clear_previous_output(output)
        (output / "response.json").write_text(json.dumps(result.response_json, indent=2) + "\n", encoding="utf-8")
        raise ToolError(f"the response breaks the protocol: {exc.message}\n"
                        f"(response JSON written to {output / 'response.json'})") from exc
    summary += describe_response(result.response_json)
    summary.append("response checked against the protocol"
                   + (" and the study sent: OK" if study is not None else ": OK (no local study to compare with)"))
    gallery = write_outputs(output, result, study, dicom_parts, args.plot_labels)
    index = write_index(output, gallery, result.response_json, summary)
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
