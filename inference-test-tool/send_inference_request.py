"""Send a study to an inference server, check the answer against the protocol, render what a viewer would show.

    send-inference-request.sh -i path/to/study -c get-probability-mask
    send-inference-request.sh path/to/study -s --port 8900 -o out/
    send-inference-request.sh --job Study1/13_HCropVolume -c gaussian-blur-3d -R sigma_mm=1.5

Exit status: 0 when the response is valid, 1 for an HTTP error, an unreachable server, an
unusable input or a protocol violation (the message names the part and why), 2 for bad
arguments (and when called without any, or with a command the server does not serve),
130 when interrupted (Ctrl-C); an earlier run's output folder is then left as it was.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pydicom
import requests
from pydicom.dataset import Dataset
from requests_toolbelt.multipart.decoder import (
    ImproperBodyPartContentException,
    NonMultipartContentTypeException,
)

# tool_* sit next to this script (its folder is sys.path[0] when it runs); inference is the installed
# package (pip install -e . at the repository root; the tool's image sets PYTHONPATH=/app).
from inference import protocol
from inference.errors import OutputValidationError
from inference.protocol.client import InferenceRequestError, InferenceResponse, send_inference_request
from inference.tls import https_session
from tool_gallery import Gallery, PageInfo, format_result, image_count, write_index, write_outputs
from tool_input import Study, ToolError, load_study

TOOL_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = TOOL_DIR / "output"
PROGRESS_MIN_BYTES = 5 * 1024 * 1024  # smaller requests go out without a progress bar
JOB_POLL_SECONDS = 0.5

#: What decoding a response raises when it is not multipart or part 0 is not JSON.
UNDECODABLE = (ValueError, ImproperBodyPartContentException, NonMultipartContentTypeException)


class UsageError(Exception):
    """A request the server cannot serve as asked (e.g. an unknown command): exit status 2."""


# -- arguments -----------------------------------------------------------------------------
EPILOG = """\
Request options (-R/--request_options KEY=VALUE): each VALUE is read as JSON, so numbers,
booleans, null, lists and objects arrive typed; anything that is not JSON is sent as a string.
To send a string that looks like JSON, quote it JSON-style (shell-quoted once more):
  -R sigma_mm=1.5            -> {"sigma_mm": 1.5}
  -R flag=true ids='[1, 2]'  -> {"flag": true, "ids": [1, 2]}
  -R name=left hippocampus   -> two options; write name='left hippocampus' for one string
  -R code='"007"'            -> {"code": "007"} (a string, not the number 7)
Put INPUT before -R (or use -i): -R takes every word after it.

Examples:
  send-inference-request.sh -i ../shared/data/studies/Study1 -c get-hippocampus-volume
  send-inference-request.sh study/ --series HippoCrop -c gaussian-blur-3d -R sigma_mm=1.5
  send-inference-request.sh one_image.dcm -c get-bounding-box-2d -o out/
  send-inference-request.sh --request_study_path Study1 -i study/ -c get-label-mask
  send-inference-request.sh --job Study1/13_HCropVolume -c gaussian-blur-3d -i study/13_HCropVolume

Exit status: 0 valid response, 1 error or protocol violation, 2 bad arguments or unknown
command, 130 interrupted (an earlier output folder is left untouched)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="send-inference-request.sh",
        description="Send a study to an inference server, check the response against the protocol "
                    "and render what a viewer would draw (open OUTPUT/index.html).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", nargs="*", help="DICOM files or folders of the study (DICOM, PNG or JPEG files, "
                                                 "searched recursively)")
    parser.add_argument("-i", "--input", dest="input_option", action="append", default=[], metavar="INPUT",
                        help="the same, as an option (repeatable)")
    parser.add_argument("--series", action="append", default=[], metavar="DESCRIPTION|UID",
                        help="send only the series with this SeriesInstanceUID or whose SeriesDescription contains "
                             "this text (case-insensitive); repeatable")
    parser.add_argument("-s", "--segmentation", action="store_true",
                        help="segmentation model: the response must hold at least one mask")
    parser.add_argument("--host", default="127.0.0.1", help="server host name or address (default %(default)s)")
    parser.add_argument("-p", "--port", type=int, default=8900, help="server port (default %(default)s)")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT,
                        help="output folder, replaced whole once the new one is complete "
                             "(default inference-test-tool/output)")
    parser.add_argument("-c", "--inference_command", help="sets inference_command in the request JSON "
                                                          "(checked against the server's GET /models first)")
    parser.add_argument("-r", "--route", default="/", help="route to POST to (default %(default)s)")
    parser.add_argument("-a", "--attachments", nargs="+", action="extend", default=[], metavar="ATTACHMENT",
                        help="files sent between the JSON part and the DICOM files")
    parser.add_argument("-S", "--include_study_size", action="store_true",
                        help="add depth (images sent), height and width (first image) to the request JSON")
    parser.add_argument("-l", "--plot_labels", action="store_true",
                        help="also list classification results (study_ml_json, series_ml_json) under every image")
    parser.add_argument("-R", "--request_options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra entries of the request JSON; VALUE is read as JSON (see below)")
    parser.add_argument("--request_study_path", metavar="PATH",
                        help="send only {\"studyPath\": PATH} (a folder under the server's data root); "
                             "give INPUT too to check and render against a local copy")
    parser.add_argument("--job", metavar="IN_DIR",
                        help="run -c as a job on IN_DIR (a folder under the server's data root): POST /job, "
                             "wait for it, fetch its files and render them (with INPUT, against a local copy)")
    parser.add_argument("--ca-file", type=Path, metavar="PEM",
                        help="CA certificate(s) to verify an https:// server with (default: the system's)")
    parser.add_argument("--cert", type=Path, metavar="PEM",
                        help="client certificate for a server that asks for one (mutual TLS); the key in it or --key")
    parser.add_argument("--key", type=Path, metavar="PEM", help="private key of --cert")
    parser.add_argument("--token", default=None,
                        help="bearer token (default: environment variable INFERENCE_API_TOKEN)")
    return parser


def option_value(text: str) -> Any:
    """A request option's value: JSON when it parses as JSON (NaN and Infinity excepted), else the text."""
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError:
        return text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.inputs = [*args.input, *args.input_option]
    if not args.inputs and not args.request_study_path and not args.job:
        parser.error("give the study (INPUT or -i INPUT), --request_study_path or --job")
    if args.request_study_path and args.job:
        parser.error("give --request_study_path or --job, not both")
    if args.job and not args.inference_command:
        parser.error("--job needs -c: the command (job name) to run")
    options = {}
    for item in args.request_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"-R/--request_options takes KEY=VALUE, got {item!r}")
        options[key] = option_value(value)
    args.request_options = options
    args.token = args.token or os.environ.get("INFERENCE_API_TOKEN") or None
    if args.key and not args.cert:
        parser.error("--key needs --cert")
    for option in ("ca_file", "cert", "key"):
        path = getattr(args, option)
        if path is not None and not path.is_file():
            parser.error(f"--{option.replace('_', '-')}: {path} is not a file")
    args.session = https_session(args.ca_file, args.cert, args.key)
    return args


# -- talking to the server ---------------------------------------------------------------------
def base_url(host: str, port: int) -> str:
    base = host if "://" in host else f"http://{host}"
    return f"{base.rstrip('/')}:{port}"


def server_url(host: str, port: int, route: str) -> str:
    return f"{base_url(host, port)}/{route.lstrip('/')}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: causes, contexts, urllib3's ``reason`` and exceptions passed as arguments."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen or len(seen) > 20:  # a str reason
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__, getattr(current, "reason", None),
                    *(arg for arg in current.args if isinstance(arg, BaseException))]


def host_error(exc: requests.ConnectionError, url: str, host: str) -> ToolError:
    """A connection failure in words: a host name that does not resolve, or nothing listening there."""
    if any(isinstance(cause, socket.gaierror) for cause in _causes(exc)):
        return ToolError(f"cannot resolve the host name {host!r}: check --host (a misspelt name, or no DNS entry)")
    if isinstance(exc, requests.exceptions.SSLError):
        return ToolError(f"TLS with {url} failed: {exc} (check --ca-file for the server's CA, and --cert/--key "
                         "when it requires a client certificate)")
    return ToolError(f"cannot reach the server at {url}: is it running (make serve) on that host and port? ({exc})")


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def get_json(url: str, token: str | None, host: str, session: requests.Session) -> tuple[int, Any]:
    """GET ``url``: status and decoded JSON (None when the body is not JSON)."""
    try:
        response = session.get(url, headers=auth_headers(token), timeout=30)
    except requests.ConnectionError as exc:
        raise host_error(exc, url, host) from exc
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


@dataclass
class ServedModels:
    """What ``GET /models`` says is served: command -> description, and the default command."""

    descriptions: dict[str, str]
    default_command: str


def served_models(args: argparse.Namespace) -> ServedModels | None:
    """The server's ``GET /models``; None when it has no such route (another server of the protocol)."""
    status, body = get_json(f"{base_url(args.host, args.port)}/models", args.token, args.host, args.session)
    if status in (401, 403):
        message = body.get("error") if isinstance(body, dict) else ""
        raise InferenceRequestError(status, f"{message} (GET /models; give --token or set INFERENCE_API_TOKEN)")
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("models"), list):
        return None
    return ServedModels({str(m.get("inference_command")): str(m.get("description") or "") for m in body["models"]},
                        str(body.get("default_command") or ""))


def check_command(command: str | None, models: ServedModels | None) -> None:
    """Refuse (exit 2) a command the server does not serve, naming the nearest ones, before any upload."""
    if not command or models is None or command in models.descriptions:
        return
    near = difflib.get_close_matches(command, list(models.descriptions), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise UsageError(f"the server does not serve inference_command {command!r}; {hint}"
                     f"served: {', '.join(sorted(models.descriptions))}")


def command_dimensions(command: str, description: str) -> str:
    """'2D', '3D' or '' for a served command, from its name and description (``...-2d``, '3D ...', 'per image')."""
    text = f"{command} {description}".lower()
    if re.search(r"\b2d\b|-2d\b|per image|each image", text):
        return "2D"
    if re.search(r"\b3d\b|-3d\b|per series|volume", text):
        return "3D"
    return ""


def study_dimensions(study: Study) -> str:
    """'3D' when some series has several images with a position, else '2D'."""
    for series in study.series:
        if sum(1 for image in series.images if "ImagePositionPatient" in image.header) > 1:
            return "3D"
    return "2D"


def nothing_to_show(response_json: dict) -> bool:
    return not (response_json.get("parts") or response_json.get("bounding_boxes_2d")
                or response_json.get("linear_measurements_2d") or response_json.get("study_ml_json")
                or response_json.get("series_ml_json"))


def empty_response_warning(study: Study | None, models: ServedModels | None, command: str) -> str:
    """The warning for a response without parts or results, naming commands fitting the study."""
    text = f"the response holds no parts and no results: {command or 'the default command'} found nothing to return"
    if study is None:
        return text
    dims = study_dimensions(study)
    text += f" for this {dims} study"
    if models is not None:
        fitting = [c for c, d in sorted(models.descriptions.items())
                   if command_dimensions(c, d) == dims and c != command]
        if fitting:
            text += f"; commands for {dims} studies: {', '.join(fitting)}"
    return text


# -- progress ------------------------------------------------------------------------------
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
        stream.write(f"{start}uploading [{'#' * filled}{'.' * (width - filled)}] {percent:3d}%  "
                     f"{sent / 1e6:.1f}/{total / 1e6:.1f} MB")
        if sent >= total or not interactive:
            stream.write("\n")
        stream.flush()

    return update


def count_progress(stream: TextIO, what: str) -> Callable[[int, int], None]:
    """A callback printing ``rendering 120/256 images`` on ``stream`` (per image on a terminal, per 10 % else)."""
    interactive = stream.isatty()
    last = [-1]

    def update(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if not interactive and tenth == last[0] and done != total:
            return
        last[0] = tenth
        stream.write(f"{chr(13) if interactive else ''}{what} {done}/{total}")
        if done >= total or not interactive:
            stream.write("\n")
        stream.flush()

    return update


class Waiting:
    """Shows ``message()`` with the seconds elapsed while something runs: each second on a terminal, else every 10 s."""

    def __init__(self, stream: TextIO, message: Callable[[], str], every: float | None = None) -> None:
        self.stream, self.message = stream, message
        self.interactive = stream.isatty()
        self.every = every or (1.0 if self.interactive else 10.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        started = time.perf_counter()
        self.stream.write(self.message() if self.interactive else f"{self.message()}\n")
        self.stream.flush()

        def run() -> None:
            while not self._stop.wait(self.every):
                line = f"{self.message()} {time.perf_counter() - started:.0f} s"
                self.stream.write(f"\r{line}" if self.interactive else f"{line}\n")
                self.stream.flush()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()


@contextmanager
def waiting(stream: TextIO, message: Callable[[], str]) -> Iterator[None]:
    """``Waiting`` around a block."""
    shown = Waiting(stream, message)
    shown.start()
    try:
        yield
    finally:
        shown.stop()


# -- checking the response -----------------------------------------------------------------
def parse_dicom_parts(response_json: dict, buffers: Sequence[bytes]) -> dict[int, Dataset]:
    """Every DICOM part parsed by pydicom, by part index; a part that does not parse is a violation."""
    parsed = {}
    # a count mismatch is a violation of its own (protocol.validate_response): parse what pairs up
    for index, (part, buffer) in enumerate(zip(response_json.get("parts", []), buffers, strict=False)):
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


def check_response(result: InferenceResponse, study: Study | None, expect_masks: bool) -> dict[int, Dataset]:
    """Apply the protocol's rules (and, with a local study, the checks against it); returns the DICOM parts."""
    protocol.validate_response(result.response_json, result.buffers)
    if study is not None:
        protocol.check_against_study(result.response_json, study.series_infos())
    dicom_parts = parse_dicom_parts(result.response_json, result.buffers)
    if expect_masks and not any(p.get("binary_type") in protocol.MASK_TYPES for p in result.response_json["parts"]):
        raise OutputValidationError("-s (segmentation model) was given but the response has no mask parts")
    return dicom_parts


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


# -- the output folder ---------------------------------------------------------------------------
@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """A new folder to write into, which becomes ``output`` when the block completes.

    The new folder is made beside ``output`` and renamed into place. When that cannot be done
    (``output`` is a mount point, as ``/output`` in the tool's image, or its parent is not
    writable) it is made inside ``output`` and its files replace the old ones at the end. An
    interrupted or failed run removes it and leaves an earlier ``output`` as it was. An existing
    ``output`` that is not empty and does not look like this tool's (no response.json) is refused.
    """
    output = Path(os.path.realpath(output))
    if output.exists() and (not output.is_dir() or (any(p for p in output.iterdir() if not p.name.startswith("."))
                                                    and not (output / "response.json").exists())):
        raise ToolError(f"output folder {output} exists and holds files this tool did not write; "
                        "give a new or empty folder with -o")
    beside = not os.path.ismount(output) and (output.parent.is_dir() or not output.parent.exists())
    if beside:
        output.parent.mkdir(parents=True, exist_ok=True)
        beside = os.access(output.parent, os.W_OK)
    if not beside:
        output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-" if beside else ".partial-",
                                    dir=output.parent if beside else output))
    try:
        yield staging
        if beside:
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            if output.exists():
                os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=output))
            for entry in output.iterdir():
                if entry not in (staging, old):
                    os.replace(entry, old / entry.name)
            for entry in staging.iterdir():
                os.replace(entry, output / entry.name)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- sending ---------------------------------------------------------------------------------
def send(args: argparse.Namespace, url: str, request_json: dict, files: Sequence[Path]) -> InferenceResponse:
    """POST the request: an upload bar on stderr for large studies, then the wait for the answer."""
    size = sum(path.stat().st_size for path in [*files, *map(Path, args.attachments)]) if files else 0
    bar = progress_bar(sys.stderr) if size > PROGRESS_MIN_BYTES else None
    wait = Waiting(sys.stderr, lambda: "sent; waiting for the answer...")

    def progress(sent: int, total: int) -> None:
        if bar is not None:
            bar(sent, total)
        if sent >= total:
            wait.start()

    try:
        if bar is None:
            wait.start()
        return send_inference_request(url, request_json, files, attachments=args.attachments if files else (),
                                      token=args.token, progress=progress, session=args.session)
    except requests.ConnectionError as exc:
        raise host_error(exc, url, args.host) from exc
    except OutputValidationError as exc:
        raise ToolError(f"the response breaks the protocol: {exc.message}") from exc
    except UNDECODABLE as exc:
        raise ToolError(f"the response breaks the protocol: it cannot be decoded ({type(exc).__name__}: {exc}); "
                        "it must be multipart with the JSON object as part 0") from exc
    finally:
        wait.stop()


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


def run_job(args: argparse.Namespace, staging: Path) -> InferenceResponse:
    """Submit ``-c`` as a job on ``--job IN_DIR``, wait for it, fetch its files; the result as if it was answered."""
    base = base_url(args.host, args.port)
    job = {"job_name": args.inference_command, "in_dir": args.job, **args.request_options}
    try:
        response = args.session.post(f"{base}/job", json=job, headers=auth_headers(args.token), timeout=60)
    except requests.ConnectionError as exc:
        raise host_error(exc, f"{base}/job", args.host) from exc
    if response.status_code != 201:
        raise InferenceRequestError(response.status_code, _error_text(response))
    uid = response.json()["uid"]
    state = ["queued"]
    with waiting(sys.stderr, lambda: f"job {uid} {state[0]}..."):
        while True:
            status, body = get_json(f"{base}/query/{uid}", args.token, args.host, args.session)
            message = (body or {}).get("msg", "") if isinstance(body, dict) else ""
            if status == 200:
                break
            if status != 202:
                raise InferenceRequestError(status, f"job {uid}: {(body or {}).get('error') or message}")
            state[0] = "running" if "running" in message else "queued"
            time.sleep(JOB_POLL_SECONDS)
    status, listing = get_json(f"{base}/job/{uid}/files", args.token, args.host, args.session)
    if status != 200:
        raise InferenceRequestError(status, f"listing the files of job {uid}: {listing}")
    folder = staging / "job-files"
    folder.mkdir()
    received = 0
    for entry in listing["files"]:
        got = args.session.get(f"{base}/job/{uid}/files/{entry['name']}", headers=auth_headers(args.token), timeout=300)
        if got.status_code != 200:
            raise InferenceRequestError(got.status_code, f"fetching {entry['name']} of job {uid}: {_error_text(got)}")
        (folder / entry["name"]).write_bytes(got.content)
        received += len(got.content)
    response_json = json.loads((folder / "response.json").read_text(encoding="utf-8"))
    buffers = [(folder / part["file"]).read_bytes() for part in response_json.get("parts", [])]
    for part in response_json.get("parts", []):
        part.pop("file", None)  # the job's file name: not part of the protocol's answer
    shutil.rmtree(folder)
    print(f"job {uid} completed; fetched {len(listing['files'])} files ({received / 1e6:.2f} MB)", file=sys.stderr)
    return InferenceResponse(response_json, buffers, None, len(json.dumps(job)), received)


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:300]


def render_outputs(args: argparse.Namespace, staging: Path, result: InferenceResponse, study: Study | None,
                   dicom_parts: dict[int, Dataset], models: ServedModels | None, command: str,
                   summary: list[str]) -> Gallery:
    """Warn about an empty answer, then write the files, the pictures (with progress) and index.html."""
    warnings = [empty_response_warning(study, models, command)] if nothing_to_show(result.response_json) else []
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    checked = ("response checked against the protocol"
               + (" and the study sent: OK" if study is not None else ": OK (no local study to compare with)"))
    page_summary = [*summary, checked]  # the page shows the results in tables, not as these lines
    summary += [*describe_response(result.response_json), checked]
    total = image_count(study)
    rendering = count_progress(sys.stderr, "rendering images") if total else None
    gallery = write_outputs(staging, result, study, dicom_parts, args.plot_labels, rendering)
    description = models.descriptions.get(command, "") if models else ""
    write_index(staging, gallery, result.response_json, PageInfo(command, description, page_summary, warnings), study)
    return gallery


def run(args: argparse.Namespace, work_dir: Path) -> int:
    """Load, check the command, send, check the answer, write and summarize; raises ToolError and friends."""
    study = load_study([Path(p) for p in args.inputs], work_dir, args.series) if args.inputs else None
    sending_files = not (args.request_study_path or args.job) and study is not None
    files = [image.path for image in study.images] if sending_files else []
    if not sending_files and args.attachments:
        print("warning: attachments are sent only with the study's files, not with --request_study_path or --job",
              file=sys.stderr)
    for attachment in args.attachments:
        if not Path(attachment).is_file():
            raise ToolError(f"attachment {attachment} is not a file")
    models = served_models(args)
    check_command(args.inference_command, models)
    command = args.inference_command or (models.default_command if models and args.route == "/" else "")
    with staged_output(Path(args.output)) as staging:
        started = time.perf_counter()
        if args.job:
            url = f"{base_url(args.host, args.port)}/job"
            result = run_job(args, staging)
        else:
            url = server_url(args.host, args.port, args.route)
            result = send(args, url, build_request_json(args, study), files)
        elapsed = time.perf_counter() - started
        sent = (f"{len(files)} files in {len(study.series)} series" if files else
                f"job on {args.job!r}" if args.job else f"studyPath {args.request_study_path!r}")
        summary = [f"sent {sent} ({result.request_bytes / 1e6:.2f} MB) to {url}"
                   + (f" with inference_command {args.inference_command}" if args.inference_command else ""),
                   f"round trip {elapsed:.2f} s, response {result.response_bytes / 1e6:.2f} MB"]
        if args.request_options:
            summary.insert(1, f"request options: {json.dumps(args.request_options)}")
        if study is not None and study.converted:
            summary.append(f"converted {len(study.converted)} PNG/JPEG images to a Secondary Capture series")
        if study is not None and study.skipped:
            summary.append(f"skipped {len(study.skipped)} files that are neither DICOM nor PNG/JPEG")
        try:
            dicom_parts = check_response(result, study, args.segmentation)
        except OutputValidationError as exc:  # keep the answer for a look: the folder holds only response.json
            (staging / "response.json").write_text(json.dumps(result.response_json, indent=2) + "\n", encoding="utf-8")
            violation = exc.message
        else:
            violation = ""
            gallery = render_outputs(args, staging, result, study, dicom_parts, models, command, summary)
    if violation:
        raise ToolError(f"the response breaks the protocol: {violation}\n"
                        f"(response JSON written to {Path(args.output) / 'response.json'})")
    index = Path(args.output) / "index.html"
    dicom_files = len(gallery.dicom_parts) + sum(map(len, gallery.derived_files.values()))
    summary.append(f"wrote {gallery.png_count} PNGs, {len(gallery.masks)} mask files and "
                   f"{dicom_files} DICOM files; open {index}")
    print("\n".join(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 valid, 1 failure, 2 bad arguments, 130 interrupted)."""
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
    except KeyboardInterrupt:
        start = "\n" if sys.stderr.isatty() else ""  # after a progress line drawn with \r
        print(f"{start}interrupted; {Path(args.output)} is as it was before this run", file=sys.stderr)
        return 130
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InferenceRequestError as exc:
        print(f"error: the server answered HTTP {exc.status}: {exc.message}", file=sys.stderr)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
