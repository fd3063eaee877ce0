"""The inference test tool end to end: against the real server (every mock command), against a
hand-written server that breaks the protocol, and its input handling (PNG/JPEG, sorting, options)."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from requests_toolbelt.multipart.decoder import MultipartDecoder
from werkzeug.serving import make_server

from conftest import PROJECT_ROOT, free_port, shared_data, write_study
from utils import protocol
from utils.dicom import dataset_bytes, secondary_capture
from utils.multipart import encode_multipart_related


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "send_inference_request", PROJECT_ROOT / "inference-test-tool" / "send_inference_request.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tool = load_tool()
SHAPE = (8, 32, 40)  # depth, rows, columns of the generated study


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A generated series whose file names are shuffled, so sorting by position is needed."""
    folder = tmp_path_factory.mktemp("tool-study") / "study"
    paths = write_study(folder, shape=SHAPE)
    names = [f"img{n}.dcm" for n in random.Random(3).sample(range(100), len(paths))]
    for path, name in zip(paths, names):
        path.rename(folder / name)
    return folder


def run_tool(*args: str) -> int:
    return tool.main([str(a) for a in args])


def pngs(output: Path) -> list[Path]:
    return sorted((output / "images").rglob("*.png"))


def check_mask_files(output: Path) -> list[np.ndarray]:
    """Every mask part was saved with the shape its binary_data_shape advertises."""
    response = json.loads((output / "response.json").read_text())
    arrays = []
    for index, part in enumerate(response["parts"]):
        if part["binary_type"] in protocol.MASK_TYPES:
            array = np.load(output / f"output_masks_{index}.npy")
            assert array.shape == protocol.mask_array_shape(part["binary_data_shape"])
            arrays.append(array)
    return arrays


# -- against the project's server ----------------------------------------------------------
MASK_3D = {"get-probability-mask", "get-boolean-mask", "get-heatmap", "get-label-mask"}
COMMANDS = sorted(MASK_3D | {"get-probability-mask-2d", "get-bounding-box-2d", "get-linear-measurements",
                             "get-classification", "get-secondary-capture"})


@pytest.mark.parametrize("command", COMMANDS)
def test_every_mock_command_renders_one_png_per_image(server, study_dir, tmp_path, capsys, command):
    output = tmp_path / "out"
    extra = ["-l"] if command == "get-classification" else []
    assert run_tool("-i", study_dir, "--port", server.port, "-o", output, "-c", command, *extra) == 0
    summary = capsys.readouterr().out
    assert "checked against the protocol and the study sent: OK" in summary
    images = pngs(output)
    assert len(images) == SHAPE[0]
    index = (output / "index.html").read_text()
    assert all(p.relative_to(output).as_posix() in index for p in images)
    masks = check_mask_files(output)
    if command in MASK_3D:
        assert [m.shape for m in masks] == [(1, *SHAPE)]
        assert "output_masks_0.npy" in index
    if command == "get-probability-mask-2d":
        assert [m.shape for m in masks] == [SHAPE[1:]] * SHAPE[0]
    if command == "get-secondary-capture":
        assert (output / "output_dicom_0.dcm").is_file() and (output / "output_dicom_0.png").is_file()
    if command == "get-classification":
        assert "study classification: label=" in summary
        assert "study: label=" in index  # the captions carry what -l wrote on the images
    with Image.open(images[0]) as first:
        assert first.width >= 256  # 32 x 40 images are upscaled to be legible


def test_segmentation_flag_requires_masks(server, study_dir, tmp_path, capsys):
    assert run_tool(study_dir, "-s", "--port", server.port, "-o", tmp_path, "-c", "get-probability-mask") == 0
    assert run_tool(study_dir, "-s", "--port", server.port, "-o", tmp_path, "-c", "get-bounding-box-2d") == 1
    assert "no mask parts" in capsys.readouterr().err


def test_png_and_jpeg_inputs_are_converted_to_dicom(server, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (51, 35), dtype=np.uint8)).save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(folder / "sub" / "colour.jpg")
    Image.fromarray(rng.integers(0, 4000, (16, 24), dtype=np.uint16)).save(folder / "deep.png")
    (folder / "notes.txt").write_text("not an image")
    output = tmp_path / "out"
    assert run_tool("-i", folder, "--port", server.port, "-o", output, "-c", "get-probability-mask-2d") == 0
    out = capsys.readouterr().out
    assert "converted 3 PNG/JPEG images" in out and "skipped 1 files" in out
    assert len(pngs(output)) == 3
    shapes = sorted(m.shape for m in check_mask_files(output))
    assert shapes == sorted([(51, 35), (20, 30), (16, 24)])


def test_request_study_path_reads_the_study_on_the_server(server, tmp_path, capsys):
    write_study(server.data_root / "tool-study", shape=(5, 24, 20))
    local = tmp_path / "local"
    shutil.copytree(server.data_root / "tool-study", local)  # the same study, for checking and rendering
    output = tmp_path / "out"
    assert run_tool("--request_study_path", "tool-study", "-i", local, "--port", server.port,
                    "-o", output, "-c", "get-label-mask") == 0
    assert "studyPath 'tool-study'" in capsys.readouterr().out
    assert len(pngs(output)) == 5
    assert [m.shape for m in check_mask_files(output)] == [(1, 5, 24, 20)]
    bare = tmp_path / "bare"  # without a local copy, the response is only validated and saved
    assert run_tool("--request_study_path", "tool-study", "--port", server.port, "-o", bare) == 0
    assert (bare / "response.json").is_file() and (bare / "output_masks_0.npy").is_file()
    assert not pngs(bare)


def test_http_error_exits_1_with_the_server_message(server, study_dir, tmp_path, capsys):
    assert run_tool(study_dir, "--port", server.port, "-o", tmp_path, "-c", "no-such-command") == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "unknown inference_command 'no-such-command'" in err


def test_unreachable_server_exits_1(study_dir, tmp_path, capsys):
    assert run_tool(study_dir, "--port", free_port(), "-o", tmp_path) == 1
    assert "cannot reach the server" in capsys.readouterr().err


def test_without_arguments_prints_usage(capsys):
    assert tool.main([]) == 2
    assert "usage: send-inference-request.sh" in capsys.readouterr().err


def available_commands(server) -> set[str]:
    models = requests.get(f"{server.url}/models", timeout=10).json()["models"]
    return {model["inference_command"] for model in models}


def test_hippocampus_volume_on_study1(server, tmp_path, capsys):
    assert "get-hippocampus-volume" in available_commands(server)
    study = shared_data("studies", "Study1")
    output = tmp_path / "out"
    assert run_tool("-i", study, "--port", server.port, "-o", output, "-c", "get-hippocampus-volume") == 0
    n_images = sum(1 for p in study.rglob("*") if p.is_file())
    assert len(pngs(output)) == n_images
    check_mask_files(output)


def test_gaussian_blur_3d(server, study_dir, tmp_path):
    assert "gaussian-blur-3d" in available_commands(server)
    output = tmp_path / "out"
    assert run_tool("-i", study_dir, "--port", server.port, "-o", output, "-c", "gaussian-blur-3d") == 0
    assert len(pngs(output)) == SHAPE[0]
    check_mask_files(output)


# -- against a hand-written server ---------------------------------------------------------
class FakeServer:
    """A WSGI server that records requests and answers with ``self.answer(request_json)``."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, list[tuple[str, bytes]]]] = []
        self.answer: Callable[[dict], tuple[str, str, bytes]] = lambda _: ("500 Internal Server Error",
                                                                            "text/plain", b"no answer set")
        self._server = make_server("127.0.0.1", 0, self, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
        headers["content-type"] = environ.get("CONTENT_TYPE", "")
        headers["path"] = environ["PATH_INFO"]
        parts = [(p.headers.get(b"Content-Type", b"").decode(), p.content)
                 for p in MultipartDecoder(body, headers["content-type"]).parts]
        self.requests.append((headers, parts))
        status, content_type, payload = self.answer(json.loads(parts[0][1]))
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(payload)))])
        return [payload]

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.stop()


def multipart_answer(response_json: dict, buffers: list[bytes]) -> tuple[str, str, bytes]:
    """A 200 multipart response written by hand: no gateway checks in between."""
    parts = [(protocol.JSON_CONTENT_TYPE, json.dumps(response_json).encode())]
    parts += [(protocol.content_type_for(p["binary_type"]), b) for p, b in zip(response_json["parts"], buffers)]
    encoded = encode_multipart_related(parts, input_hash="0" * 64)
    return "200 OK", encoded.content_type, b"".join(bytes(chunk) for chunk in encoded.chunks)


def series_uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def mask_3d(binary_type: str, series_uid: str, depth: int = SHAPE[0]) -> dict:
    return {"label": "broken", "binary_type": binary_type, "SeriesInstanceUID": series_uid,
            "binary_data_shape": {"timepoints": 1, "depth": depth, "height": SHAPE[1], "width": SHAPE[2]}}


def test_wrong_size_mask_exits_1_naming_the_part(fake, study_dir, tmp_path, capsys):
    part = mask_3d("probability_mask", series_uid_of(study_dir))
    fake.answer = lambda _: multipart_answer({"parts": [part]}, [bytes(int(np.prod(SHAPE)) - 40)])
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path) == 1
    err = capsys.readouterr().err
    assert "parts[0] (probability_mask)" in err and f"{int(np.prod(SHAPE)) - 40} bytes" in err


def test_mask_of_the_wrong_depth_for_its_series_exits_1(fake, study_dir, tmp_path, capsys):
    part = mask_3d("boolean_mask", series_uid_of(study_dir), depth=SHAPE[0] - 1)
    fake.answer = lambda _: multipart_answer({"parts": [part]}, [bytes((SHAPE[0] - 1) * SHAPE[1] * SHAPE[2])])
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path) == 1
    assert "parts[0] (boolean_mask): 3D mask is 7x32x40" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_unparsable_dicom_part_exits_1(fake, study_dir, tmp_path, capsys):
    garbage = b"\0" * 128 + b"DICM" + b"\xff" * 50
    fake.answer = lambda _: multipart_answer({"parts": [{"binary_type": "dicom_secondary_capture"}]}, [garbage])
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path) == 1
    assert "parts[0] (dicom_secondary_capture): does not parse as DICOM" in capsys.readouterr().err


def test_non_multipart_answer_exits_1(fake, study_dir, tmp_path, capsys):
    fake.answer = lambda _: ("200 OK", "application/json", b'{"parts": []}')
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path) == 1
    assert "breaks the protocol" in capsys.readouterr().err


def test_request_is_built_as_viewers_send_it(fake, study_dir, tmp_path, monkeypatch):
    fake.answer = lambda _: multipart_answer({"parts": []}, [])
    licence = tmp_path / "licence.txt"
    licence.write_text("licence")
    monkeypatch.setenv("INFERENCE_API_TOKEN", "secret-token")
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path / "out", "-c", "cmd", "-r", "/other",
                    "-S", "--request_options", "a=1", "b=x=y", "-a", licence) == 0
    headers, parts = fake.requests[-1]
    assert headers["path"] == "/other" and headers["authorization"] == "Bearer secret-token"
    assert headers["content-type"].startswith('multipart/related; boundary="')
    request = json.loads(parts[0][1])
    assert request["inference_command"] == "cmd" and request["a"] == "1" and request["b"] == "x=y"
    assert (request["depth"], request["height"], request["width"]) == SHAPE
    assert parts[1][1] == b"licence"  # attachments before the DICOM files
    datasets = [pydicom.dcmread(io.BytesIO(body)) for _, body in parts[2:]]
    assert request["studyUID"] == datasets[0].StudyInstanceUID
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, SHAPE[0] + 1))  # sorted by position


def test_3d_mask_is_drawn_on_the_right_image_and_the_right_way_up(fake, study_dir, tmp_path):
    """Slice 2 of the mask marks the top-left corner: only the 3rd image in position order shows it there."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[2, :8, :10] = 1
    part = mask_3d("boolean_mask", series_uid_of(study_dir))
    fake.answer = lambda _: multipart_answer({"parts": [part]}, [labels.tobytes()])
    output = tmp_path / "out"
    assert run_tool(study_dir, "--port", fake.port, "-o", output) == 0
    factor = 8  # 32 x 40 images are shown 8 times larger
    for position, path in enumerate(pngs(output)):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)[: SHAPE[1] * factor, : SHAPE[2] * factor]
        coloured = pixels[..., 0] - pixels[..., 1] > 20  # the grey image has R == G; the overlay is red
        if position == 2:
            assert coloured[4 * factor, 5 * factor]  # inside the marked corner
            assert coloured[: 8 * factor, : 10 * factor].mean() > 0.9
            assert not coloured[8 * factor:].any() and not coloured[:, 10 * factor:].any()
        else:
            assert not coloured.any(), f"image {position + 1} shows a mask meant for image 3"


def test_2d_annotations_go_on_the_named_image(fake, study_dir, tmp_path):
    by_instance = {int(ds.InstanceNumber): str(ds.SOPInstanceUID)
                   for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in study_dir.iterdir())}
    target = by_instance[5]
    mask = np.zeros(SHAPE[1:], np.uint8)
    mask[20:, 30:] = 255  # bottom-right
    response = {"parts": [{"binary_type": "probability_mask", "dicom_image": {"SOPInstanceUID": target},
                           "binary_data_shape": {"width": SHAPE[2], "height": SHAPE[1]}}],
                "bounding_boxes_2d": [{"label": "box", "SOPInstanceUID": target,
                                       "top_left": [1, 1], "bottom_right": [5, 5]}]}
    fake.answer = lambda _: multipart_answer(response, [mask.tobytes()])
    output = tmp_path / "out"
    assert run_tool(study_dir, "--port", fake.port, "-o", output) == 0
    factor = 8
    for position, path in enumerate(pngs(output)):
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)[: SHAPE[1] * factor, : SHAPE[2] * factor]
        coloured = np.abs(pixels[..., 0] - pixels[..., 2]) > 20
        if position == 4:  # instance 5
            assert coloured[25 * factor, 35 * factor] and not coloured[12 * factor, 20 * factor]
            assert coloured[1 * factor, 3 * factor]  # the box's top edge
        else:
            assert not coloured.any()


def test_secondary_capture_dicom_part_is_saved_and_rendered(fake, study_dir, tmp_path):
    reference = pydicom.dcmread(next(study_dir.iterdir()), stop_before_pixels=True)
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (0, 0, 255)
    report = dataset_bytes(secondary_capture(rgb, reference, description="report"))
    fake.answer = lambda _: multipart_answer({"parts": [{"binary_type": "dicom_secondary_capture"}]}, [report])
    output = tmp_path / "out"
    assert run_tool(study_dir, "--port", fake.port, "-o", output) == 0
    assert (output / "output_dicom_0.dcm").read_bytes() == report
    with Image.open(output / "output_dicom_0.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels[0, 0].tolist() == [0, 0, 255] and pixels[-1, -1].tolist() == [0, 0, 0]


# -- protocol rules the tool needed (utils/protocol.check_against_study) ---------------------
def mixed_series() -> dict[str, protocol.SeriesInfo]:
    """One series of two photos: 'a' is 51 x 35, 'b' is 16 x 24."""
    return {"s": protocol.SeriesInfo(51, 35, ["a", "b"], {"b": (16, 24)})}


def mask_2d(sop: str, rows: int, columns: int) -> dict:
    return {"binary_type": "probability_mask", "dicom_image": {"SOPInstanceUID": sop},
            "binary_data_shape": {"width": columns, "height": rows}}


def test_2d_masks_are_checked_against_their_own_image_size():
    protocol.check_against_study({"parts": [mask_2d("a", 51, 35), mask_2d("b", 16, 24)]}, mixed_series())
    with pytest.raises(protocol.OutputValidationError, match=r"parts\[0\].*2D mask is 51x35, its image is 16x24"):
        protocol.check_against_study({"parts": [mask_2d("b", 51, 35)]}, mixed_series())


def test_3d_mask_over_a_series_of_mixed_sizes_is_refused():
    part = {"binary_type": "boolean_mask", "SeriesInstanceUID": "s",
            "binary_data_shape": {"depth": 2, "height": 51, "width": 35}}
    with pytest.raises(protocol.OutputValidationError, match="differ in size"):
        protocol.check_against_study({"parts": [part]}, mixed_series())


def test_boxes_and_measurements_must_lie_inside_their_image():
    series = {"s": protocol.SeriesInfo(20, 60, ["a"])}  # 20 rows, 60 columns
    inside = {"SOPInstanceUID": "a", "label": "x", "top_left": [10, 2], "bottom_right": [59, 19]}
    protocol.check_against_study({"parts": [], "bounding_boxes_2d": [inside]}, series)
    swapped = {"SOPInstanceUID": "a", "label": "x", "start": [2, 10], "end": [19, 59]}  # [row, column]
    with pytest.raises(protocol.OutputValidationError, match=r"linear_measurements_2d\[0\].end .* outside its 20x60"):
        protocol.check_against_study({"parts": [], "linear_measurements_2d": [swapped]}, series)
