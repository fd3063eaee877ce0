"""The inference test tool end to end: against the real server (every mock command), against a
hand-written server that breaks the protocol, and its input handling (PNG/JPEG, sorting, options)."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
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
from inference import protocol
from inference.dicom.writing import dataset_bytes, secondary_capture
from inference.errors import OutputValidationError
from inference.protocol.multipart_response import encode_multipart_related


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
    for path, name in zip(paths, names, strict=True):
        path.rename(folder / name)
    return folder


def run_tool(*args: str) -> int:
    return tool.main([str(a) for a in args])


def pngs(output: Path) -> list[Path]:
    """The pictures of the input images (not their overlays nor derived images), in order."""
    return sorted(p for p in (output / "images").rglob("*.png") if not p.stem.endswith(("-overlay", "-derived")))


def overlay_alpha(picture: Path) -> np.ndarray:
    """The alpha channel of an image's overlay PNG (all zero when it has none)."""
    overlay = picture.with_name(f"{picture.stem}-overlay.png")
    if not overlay.exists():
        with Image.open(picture) as base:
            return np.zeros((base.height, base.width), np.uint8)
    with Image.open(overlay) as image:
        assert image.mode == "RGBA"
        return np.asarray(image)[..., 3]


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
        assert "study: label=" in index  # -l lists the results under every image
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
    assert run_tool(study_dir, "--port", server.port, "-o", tmp_path, "-c", "gaussian-blur-3d",
                    "-R", "sigma_mm=-1") == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "sigma_mm" in err


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


def test_page_shows_the_quality_flag_and_the_change_since_the_prior(server, tmp_path):
    """A prior of Study1's crop (2018, pixels 2% wider: within the voxel-size tolerance), then the crop itself:
    the page shows both quality lines and the change."""
    from tests.test_hippocampus_priors import copy_study

    crop_folder = next(shared_data("studies", "Study1").glob("*HCrop*"))
    crop = [pydicom.dcmread(p) for p in sorted(crop_folder.iterdir())]
    prior = tmp_path / "prior"
    prior.mkdir()
    for number, dataset in enumerate(copy_study(crop, "20180119", spacing_scale=1.02)):
        dataset.save_as(prior / f"{number:03d}.dcm")
    args = ("--port", server.port, "-c", "get-hippocampus-volume", "-R", "model_version=1.0-fast")
    assert run_tool("-i", prior, "-o", tmp_path / "prior-page", *args) == 0
    page = (tmp_path / "prior-page" / "index.html").read_text()
    assert 'class="quality passed"' in page
    assert "No earlier result of this patient by this model version (searched: result store)." in page
    assert run_tool("-i", crop_folder, "-o", tmp_path / "page", *args) == 0
    page = (tmp_path / "page" / "index.html").read_text()
    assert 'class="quality passed"' in page
    assert "Change since the prior" in page and "Prior 2018-01-19 (hippocampus 1.0-fast, from the result store)" in page
    assert "<td>Total</td>" in page and "-3.88" in page  # 1 / 1.02**2 - 1


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

    models: dict | None = None  # what GET /models answers; None: 404, as servers without that route

    def __call__(self, environ, start_response):
        if environ["PATH_INFO"] == "/models":
            payload = json.dumps(self.models or {"error": "not found"}).encode()
            start_response("200 OK" if self.models else "404 Not Found", [("Content-Type", "application/json")])
            return [payload]
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        headers = {key[5:].replace("_", "-").lower(): value
                   for key, value in environ.items() if key.startswith("HTTP_")}
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


@pytest.fixture
def fresh_fake(fake) -> Iterator[FakeServer]:
    """The fake server with its recorded requests and /models answer reset."""
    fake.requests.clear()
    fake.models = None
    yield fake
    fake.models = None


def multipart_answer(response_json: dict, buffers: list[bytes]) -> tuple[str, str, bytes]:
    """A 200 multipart response written by hand: no gateway checks in between."""
    parts = [(protocol.JSON_CONTENT_TYPE, json.dumps(response_json).encode())]
    parts += [(protocol.content_type_for(p["binary_type"]), b)
              for p, b in zip(response_json["parts"], buffers, strict=True)]
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
                    "-S", "--request_options", "a=1", "b=x=y", 'c="1"', "-a", licence) == 0
    headers, parts = fake.requests[-1]
    assert headers["path"] == "/other" and headers["authorization"] == "Bearer secret-token"
    assert headers["content-type"].startswith('multipart/related; boundary="')
    request = json.loads(parts[0][1])
    assert request["inference_command"] == "cmd" and request["a"] == 1 and request["b"] == "x=y" and request["c"] == "1"
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
        coloured = overlay_alpha(path) > 0
        assert coloured.shape == (SHAPE[1] * factor, SHAPE[2] * factor)
        if position == 2:
            assert coloured[4 * factor, 5 * factor]  # inside the marked corner
            assert coloured[: 8 * factor, : 10 * factor].all()
            assert not coloured[8 * factor:].any() and not coloured[:, 10 * factor:].any()
        else:
            assert not coloured.any(), f"image {position + 1} shows a mask meant for image 3"
            assert not path.with_name(f"{path.stem}-overlay.png").exists()  # an empty plane: no overlay file


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
        coloured = overlay_alpha(path) > 0
        if position == 4:  # instance 5
            assert coloured[25 * factor, 35 * factor] and not coloured[12 * factor, 20 * factor]
            assert coloured[1 * factor, 3 * factor]  # the box's top edge
        else:
            assert not coloured.any()
            assert not path.with_name(f"{path.stem}-overlay.png").exists()  # nothing to draw: no overlay file


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
    with pytest.raises(OutputValidationError, match=r"parts\[0\].*2D mask is 51x35, its image is 16x24"):
        protocol.check_against_study({"parts": [mask_2d("b", 51, 35)]}, mixed_series())


def test_3d_mask_over_a_series_of_mixed_sizes_is_refused():
    part = {"binary_type": "boolean_mask", "SeriesInstanceUID": "s",
            "binary_data_shape": {"depth": 2, "height": 51, "width": 35}}
    with pytest.raises(OutputValidationError, match="differ in size"):
        protocol.check_against_study({"parts": [part]}, mixed_series())


def test_boxes_and_measurements_must_lie_inside_their_image():
    series = {"s": protocol.SeriesInfo(20, 60, ["a"])}  # 20 rows, 60 columns
    inside = {"SOPInstanceUID": "a", "label": "x", "top_left": [10, 2], "bottom_right": [59, 19]}
    protocol.check_against_study({"parts": [], "bounding_boxes_2d": [inside]}, series)
    swapped = {"SOPInstanceUID": "a", "label": "x", "start": [2, 10], "end": [19, 59]}  # [row, column]
    with pytest.raises(OutputValidationError, match=r"linear_measurements_2d\[0\].end .* outside its 20x60"):
        protocol.check_against_study({"parts": [], "linear_measurements_2d": [swapped]}, series)


# -- the tool as a person uses it (issue 18) ------------------------------------------------------
@pytest.mark.parametrize("text, value", [("1.5", 1.5), ("2", 2), ("true", True), ("null", None), ("[1, 2]", [1, 2]),
                                         ('{"a": 1}', {"a": 1}), ("left", "left"), ('"1.5"', "1.5"),
                                         ("x=y", "x=y"), ("NaN", "NaN"), ("", "")])
def test_request_option_values_are_json_with_a_string_escape(text, value):
    assert tool.option_value(text) == value


def test_numeric_parameter_reaches_the_server_as_a_number(server, study_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert run_tool(study_dir, "--port", server.port, "-o", output, "-c", "gaussian-blur-3d", "-R", "sigma_mm=1.5") == 0
    derived = list((output / "images").rglob("*-derived.png"))
    assert len(derived) == SHAPE[0]  # the blurred series, beside the input on the same slider
    assert "Gaussian blur 3D sigma 1.5 mm" in (output / "index.html").read_text()


def test_unknown_command_exits_2_with_the_nearest_names_before_uploading(server, study_dir, tmp_path, capsys):
    assert run_tool(study_dir, "--port", server.port, "-o", tmp_path / "out", "-c", "get-hipocampus-volume") == 2
    err = capsys.readouterr().err
    assert "does not serve inference_command 'get-hipocampus-volume'" in err
    assert "did you mean get-hippocampus-volume" in err
    assert not (tmp_path / "out").exists()


def test_command_is_not_checked_when_the_server_has_no_models_route(fresh_fake, study_dir, tmp_path):
    fresh_fake.answer = lambda _: multipart_answer({"parts": [], "study_ml_json": {"label": "x"}}, [])
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", tmp_path / "out", "-c", "anything") == 0
    assert len(fresh_fake.requests) == 1


def test_series_are_picked_by_description_or_uid(fresh_fake, tmp_path, capsys):
    study = tmp_path / "study"
    write_study(study / "a", shape=(3, 8, 8), description="T1 axial", study_uid="1.2.3")
    write_study(study / "b", shape=(4, 8, 8), description="HippoCrop left", study_uid="1.2.3")
    uid_b = series_uid_of(study / "b")
    fresh_fake.answer = lambda _: multipart_answer({"parts": []}, [])
    for wanted in ("hippocrop", uid_b):
        assert run_tool(study, "--series", wanted, "--port", fresh_fake.port, "-o", tmp_path / "out") == 0
        _, parts = fresh_fake.requests[-1]
        assert len(parts) == 1 + 4  # the JSON part and series b's four files
    assert run_tool(study, "--series", "flair", "--port", fresh_fake.port, "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "no series matches --series flair" in err and "'T1 axial' (3 images" in err


def test_single_files_are_accepted_as_input(fresh_fake, study_dir, tmp_path):
    fresh_fake.answer = lambda _: multipart_answer({"parts": []}, [])
    files = sorted(study_dir.iterdir())[:2]
    assert run_tool(files[0], "-i", files[1], "--port", fresh_fake.port, "-o", tmp_path / "out") == 0
    _, parts = fresh_fake.requests[-1]
    assert sorted(body for _, body in parts[1:]) == sorted(f.read_bytes() for f in files)


def test_capital_r_is_request_options_as_in_the_arterys_tool(fresh_fake, study_dir, tmp_path):
    fresh_fake.answer = lambda _: multipart_answer({"parts": []}, [])
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", tmp_path / "out", "-R", "k=3", "name=x y") == 0
    request = json.loads(fresh_fake.requests[-1][1][0][1])
    assert request["k"] == 3 and request["name"] == "x y"


def test_an_answer_without_parts_warns_naming_commands_for_the_study(fresh_fake, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(photos / "xray.png")
    fresh_fake.models = {"default_command": "get-mask", "models": [
        {"inference_command": "get-mask", "description": "3D mask per series"},
        {"inference_command": "get-box-2d", "description": "a box per image"},
        {"inference_command": "get-label", "description": "classification"}]}
    fresh_fake.answer = lambda _: multipart_answer({"protocol_version": "1.0", "parts": []}, [])
    output = tmp_path / "out"
    assert run_tool(photos, "--port", fresh_fake.port, "-o", output) == 0
    err = capsys.readouterr().err
    assert "warning: the response holds no parts" in err and "get-mask found nothing" in err
    assert "this 2D study; commands for 2D studies: get-box-2d" in err
    assert "commands for 2D studies: get-box-2d" in (output / "index.html").read_text()


def test_misspelt_host_is_reported_as_a_host_name_error(study_dir, tmp_path, capsys):
    assert run_tool(study_dir, "--host", "no-such-host.invalid", "-o", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "cannot resolve the host name 'no-such-host.invalid'" in err and "Traceback" not in err


def test_progress_is_shown_for_waiting_and_rendering(fresh_fake, study_dir, tmp_path, capsys):
    fresh_fake.answer = lambda _: multipart_answer({"parts": []}, [])
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "waiting for the answer" in err and f"rendering images {SHAPE[0]}/{SHAPE[0]}" in err


def test_interrupted_rendering_leaves_the_previous_output_untouched(fresh_fake, study_dir, tmp_path, capsys,
                                                                  monkeypatch):
    fresh_fake.answer = lambda _: multipart_answer({"parts": []}, [])
    output = tmp_path / "out"
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", output) == 0
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    capsys.readouterr()

    def interrupted(staging, *args, **kwargs):
        (staging / "half-written.png").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(tool, "write_outputs", interrupted)
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", output) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"interrupted; {output} is as it was before this run"
    assert "Traceback" not in err
    after = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_ctrl_c_while_waiting_exits_130_with_one_line(fresh_fake, study_dir, tmp_path):
    """A real SIGINT to the tool as a process, while the server takes its time."""
    release = threading.Event()

    def slow(_):
        release.wait(30)
        return multipart_answer({"parts": []}, [])

    fresh_fake.answer = slow
    process = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "inference-test-tool" / "send_inference_request.py"),
                                str(study_dir), "--port", str(fresh_fake.port), "-o", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not fresh_fake.requests and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted;") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_output_folder_of_other_files_is_not_replaced(fresh_fake, study_dir, tmp_path, capsys):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", precious) == 1
    assert "holds files this tool did not write" in capsys.readouterr().err
    assert (precious / "thesis.txt").read_text() == "keep me"


def test_job_is_submitted_fetched_and_rendered(server, tmp_path, capsys):
    folder = server.data_root / "job-study"
    write_study(folder, shape=(4, 16, 20))
    output = tmp_path / "out"
    assert run_tool("--job", "job-study", "-c", "get-label-mask", "-i", folder, "--port", server.port,
                    "-o", output) == 0
    captured = capsys.readouterr()
    assert "sent job on 'job-study'" in captured.out and "completed; fetched" in captured.err
    assert [m.shape for m in check_mask_files(output)] == [(1, 4, 16, 20)]
    assert len(pngs(output)) == 4 and any(overlay_alpha(p).any() for p in pngs(output))
    assert "file" not in json.loads((output / "response.json").read_text())["parts"][0]


def test_job_with_a_bad_folder_names_the_data_root(server, tmp_path, capsys):
    assert run_tool("--job", "missing", "-c", "gaussian-blur-3d", "--port", server.port, "-o", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "HTTP 422" in err and "INFERENCE_DATA_ROOT" in err and str(server.data_root) not in err


def test_an_output_folder_that_cannot_be_renamed_is_replaced_from_inside(fresh_fake, study_dir, tmp_path, monkeypatch):
    """As /output in the tool's image (a mount point): the new files replace the old ones in place."""
    fresh_fake.answer = lambda _: multipart_answer({"parts": []}, [])
    output = tmp_path / "mounted"
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", output) == 0
    (output / "images" / "stale.png").write_bytes(b"old")
    inode = output.stat().st_ino
    monkeypatch.setattr(tool.os.path, "ismount", lambda path: Path(path) == output)
    assert run_tool(study_dir, "--port", fresh_fake.port, "-o", output) == 0
    assert output.stat().st_ino == inode  # the same folder, not a renamed one
    assert not (output / "images" / "stale.png").exists() and (output / "index.html").is_file()
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []


def test_study_size_option_is_accepted_by_every_command(server, study_dir, tmp_path):
    """-S (the Arterys tool's study size) adds depth/height/width to the JSON: protocol keys, not parameters."""
    assert run_tool(study_dir, "-S", "--port", server.port, "-o", tmp_path / "out", "-c", "get-probability-mask") == 0
    assert json.loads((tmp_path / "out" / "response.json").read_text())["parts"]


def test_the_page_names_the_model_from_its_provenance_or_its_results():
    import tool_gallery

    provenance = {"model": {"family": "hippocampus", "version": "1.0", "weights_sha256": "ab" * 32}}
    assert tool_gallery.model_version(provenance) == "hippocampus 1.0 (weights abababababab)"
    assert tool_gallery.model_version({"series_ml_json": {"1.2": {"model": "unet 2"}}}) == "unet 2"
    assert tool_gallery.model_version({"parts": []}) == ""


def test_page_says_why_there_is_no_prior_and_what_was_not_trusted(fake, study_dir, tmp_path):
    """A study without PatientID: the page gives the JSON's reason, never an empty "(searched: )"; untrusted
    earlier results are named with the reason they were not used."""
    no_patient = {"searched": [], "prior": None, "structures": {}, "earlier_comparable": [], "untrusted": [],
                  "not_comparable": [], "note": "the study has no PatientID: earlier results are never matched on the "
                                                "name alone"}
    fake.answer = lambda _: multipart_answer({"parts": [], "change_since_prior": no_patient}, [])
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path / "a") == 0
    page = (tmp_path / "a" / "index.html").read_text()
    assert "(searched: )" not in page and "has no PatientID" in page and "No earlier result" not in page
    untrusted = {**no_patient, "searched": ["result store"], "note": "no change given: cannot be trusted",
                 "untrusted": [{"study_uid": "1.2", "study_date": "2018-01-19", "model": "hippocampus 1.0",
                                "source": "result store", "reason": "rejected on review"}]}
    fake.answer = lambda _: multipart_answer({"parts": [], "change_since_prior": untrusted}, [])
    assert run_tool(study_dir, "--port", fake.port, "-o", tmp_path / "b") == 0
    page = (tmp_path / "b" / "index.html").read_text()
    assert "no change given" in page and "(searched: result store)" in page
    assert "Not used as prior: 2018-01-19 (hippocampus 1.0, result store): rejected on review" in page
