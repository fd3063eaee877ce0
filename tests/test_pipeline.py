"""The one pipeline: parameters, commands, settings that travel, and every front door going through it."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import server
from gateway import Gateway
from handlers import REGISTRY, load_handlers
from inference import protocol
from inference.config import Settings
from inference.dicom.files import dicom_files_in
from inference.dicom.writing import series_from_volume, write_series
from inference.errors import BadRequest, UnprocessableInput
from inference.jobs.api import add_job_routes
from inference.pipeline.handler_registry import HandlerRegistry, Param
from inference.pipeline.pipeline import Pipeline
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.multipart_response import decode_multipart_response
from models.registry import registry_for
from tests.conftest import PROJECT_ROOT, corrupt_manifest, shared_data, write_study

HIPPOCAMPUS = "get-hippocampus-volume"


# -- parameters ---------------------------------------------------------------------------------
SIGMA = Param("sigma_mm", "number", default=2.0, minimum=0, exclusive_minimum=True, maximum=1000)


@pytest.mark.parametrize("value", [2, 0.5, 1000])
def test_number_in_range_is_accepted_as_float(value):
    assert SIGMA.validate(value) == float(value) and isinstance(SIGMA.validate(value), float)


@pytest.mark.parametrize("value", [0, -1, 1000.5, "2", True, None, [2], float("nan"), float("inf"), 10 ** 400])
def test_number_out_of_range_or_of_another_type_is_a_400_naming_it(value):
    with pytest.raises(BadRequest, match=r"parameter 'sigma_mm' must be a number > 0 and <= 1000, got"):
        SIGMA.validate(value)


def test_long_values_are_shortened_in_the_message():
    with pytest.raises(BadRequest) as error:
        SIGMA.validate(10 ** 400)
    assert len(error.value.message) < 150 and error.value.message.endswith("...")


def test_other_kinds():
    outputs = Param("dicom_outputs", "string-list", default=[], choices=("seg", "sr"))
    assert outputs.validate(["seg"]) == ["seg"]
    with pytest.raises(BadRequest, match=r"a list of 'seg', 'sr', got \['pdf'\]"):
        outputs.validate(["pdf"])
    count = Param("count", "integer", minimum=1)
    assert count.validate(3) == 3
    with pytest.raises(BadRequest, match="an integer >= 1"):
        count.validate(2.5)
    with pytest.raises(BadRequest, match="true or false"):
        Param("flag", "boolean").validate(1)
    with pytest.raises(ValueError, match="kind must be one of"):
        Param("x", "float")


def make_registry() -> HandlerRegistry:
    registry = HandlerRegistry()

    @registry.register("echo-params", params=[SIGMA, Param("label", "string", default="x")])
    def echo_params(instances, context):
        """Answers the checked parameters and the settings it runs with."""
        return {"parts": [], "study_ml_json": {"params": context.params, "series": context.settings.hippocampus_series,
                                               "n": len(instances), "hash": context.input_hash,
                                               "version": context.model_version}}, []

    return registry


def test_pipeline_fills_defaults_and_hands_the_settings_to_the_handler():
    settings = dataclasses.replace(Settings(), hippocampus_series="CustomCrop")
    result = Pipeline(settings, make_registry()).run({"inference_command": "echo-params", "sigma_mm": 3}, [], "h")
    assert result.response_json["study_ml_json"] == {"params": {"sigma_mm": 3.0, "label": "x"},
                                                     "series": "CustomCrop", "n": 0, "hash": "h", "version": None}
    assert result.command == "echo-params" and result.seconds >= 0


def test_unknown_parameter_is_refused_with_the_nearest_name():
    pipeline = Pipeline(Settings(), make_registry())
    with pytest.raises(BadRequest, match=r"unknown parameter 'sigma' for echo-params \(did you mean 'sigma_mm'\?\)"):
        pipeline.check_request({"inference_command": "echo-params", "sigma": 2})
    # the protocol's own keys are not parameters and always pass
    pipeline.check_request({"inference_command": "echo-params", "studyUID": "1.2", "seriesUID": "3"})


def test_command_resolution():
    pipeline = Pipeline(Settings(), make_registry())
    with pytest.raises(BadRequest, match=r"names no inference_command .* commands served: echo-params"):
        pipeline.check_request({})
    with pytest.raises(BadRequest, match=r"unknown inference_command 'echo-param' \(did you mean 'echo-params'\?\)"):
        pipeline.check_request({"inference_command": "echo-param"})
    with pytest.raises(BadRequest, match="must be a string"):
        pipeline.check_request({"inference_command": 3})
    defaulted = Pipeline(Settings(), make_registry(), default_command="echo-params")
    assert defaulted.check_request({})[0].command == "echo-params"
    with pytest.raises(ValueError, match="not served"):
        Pipeline(Settings(), make_registry(), default_command="nothing")


def test_a_family_handler_gets_the_resolved_model_version(monkeypatch):
    registry = HandlerRegistry()
    seen = {}

    @registry.register("versioned", params=None, family="hippocampus")
    def versioned(instances, context):
        seen["version"] = context.model_version
        return {"parts": []}, []

    pipeline = Pipeline(Settings(), registry)
    family = registry_for(Settings().model_manifest).family("hippocampus")
    pipeline.run({"inference_command": "versioned"}, [], "h")
    assert seen["version"].version == family.default_version
    other = next(name for name in family.versions if name != family.default_version)
    pipeline.run({"inference_command": "versioned", "model_version": other}, [], "h")
    assert seen["version"].version == other
    with pytest.raises(BadRequest, match="unknown model_version"):
        pipeline.check_request({"inference_command": "versioned", "model_version": "0.0-none"})
    with pytest.raises(BadRequest, match="has no model versions"):
        Pipeline(Settings(), make_registry()).check_request({"inference_command": "echo-params",
                                                              "model_version": "1.0"})


def test_no_module_calls_a_handler_but_the_pipeline():
    """Front doors translate their transport; only inference/pipeline/pipeline.py calls ``spec.handler``."""
    sources = [p for p in PROJECT_ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    callers = [p.relative_to(PROJECT_ROOT).as_posix() for p in sources
               if re.search(r"\.handler\(", p.read_text(encoding="utf-8"))]
    assert callers == ["inference/pipeline/pipeline.py"]


# -- settings travel --------------------------------------------------------------------------
def crop_study(folder: Path) -> list[Path]:
    voxels = np.random.default_rng(1).integers(0, 300, (12, 20, 16)).astype(np.int16)
    return write_series(series_from_volume(voxels, spacing=(1.0, 1.0, 1.0), description="HippoCrop"), folder)


def post(app, files, json_input, route="/"):
    encoder = build_multipart_request(json_input, files)
    return app.test_client().post(route, data=encoder.to_string(), content_type=related_content_type(encoder))


def test_two_apps_with_different_settings_behave_differently(tmp_path):
    files = crop_study(tmp_path / "crop")
    plain = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "a"),
                                   warm_up_first=True)
    other = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "b",
                                                                hippocampus_series="^T2 axial$"),
                                   warm_up_first=True)
    request = {"inference_command": HIPPOCAMPUS}
    assert post(plain, files, request).status_code == 200
    refused = post(other, files, request)
    assert refused.status_code == 422 and "'^T2 axial$'" in refused.get_json()["error"]


def test_an_app_warms_up_the_models_of_its_own_settings(tmp_path):
    broken = server.create_app(settings=dataclasses.replace(
        Settings(), output_root=tmp_path / "a", model_manifest=corrupt_manifest(tmp_path / "models")),
        warm_up_first=True)
    shipped = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "b"),
                                     warm_up_first=True)
    health = broken.test_client().get("/healthcheck").get_data(as_text=True)
    assert health.startswith("FAILED") and HIPPOCAMPUS in health and "SHA-256" in health
    assert shipped.test_client().get("/healthcheck").get_data(as_text=True) == "READY"


# -- production serves no mock -------------------------------------------------------------------
def test_production_app_serves_the_real_handlers_only(tmp_path, study):
    app = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "jobs"))
    listed = {m["inference_command"] for m in app.test_client().get("/models").get_json()["models"]}
    declared = {f.command for f in registry_for(Settings().model_manifest).families.values() if f.command}
    assert listed == {HIPPOCAMPUS, "gaussian-blur-3d"} | declared  # and any family the manifest declares
    bare = post(app, study, {"studyUID": "1"})
    assert bare.status_code == 400
    assert "names no inference_command" in bare.get_json()["error"]
    assert "gaussian-blur-3d, get-hippocampus-volume" in bare.get_json()["error"]
    mock = post(app, study, {"inference_command": "get-probability-mask"})
    assert mock.status_code == 400 and "unknown inference_command" in mock.get_json()["error"]


def test_mocks_and_a_default_command_when_asked(tmp_path, study):
    settings = dataclasses.replace(Settings(), output_root=tmp_path / "jobs", enable_mocks=True,
                                   default_command="get-boolean-mask")
    app = server.create_app(settings=settings)
    models = app.test_client().get("/models").get_json()
    assert models["default_command"] == "get-boolean-mask"
    assert {m["inference_command"] for m in models["models"] if m["mock"]} >= {"get-probability-mask", "get-heatmap"}
    response = post(app, study, {"studyUID": "1"})
    assert response.status_code == 200
    assert json.loads(decode_multipart_response(response.headers["Content-Type"], response.data)[0][1])[
        "parts"][0]["binary_type"] == "boolean_mask"


def test_a_default_command_that_is_not_served_stops_start_up(tmp_path):
    with pytest.raises(SystemExit, match="INFERENCE_ENABLE_MOCKS"):
        server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "jobs",
                                                            default_command="get-heatmap"))


def test_models_lists_each_handlers_parameters(tmp_path):
    app = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "jobs"))
    models = {m["inference_command"]: m for m in app.test_client().get("/models").get_json()["models"]}
    sigma = models["gaussian-blur-3d"]["parameters"][0]
    assert sigma["name"] == "sigma_mm" and sigma["default"] == 2.0 and sigma["allowed"] == "a number > 0 and <= 1000"


def test_bad_parameters_are_refused_before_reading_any_instance(tmp_path, study):
    app = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "jobs"))
    response = post(app, study, {"sigma_mm": "1.5"}, route="/gaussian-blur")
    assert response.status_code == 400
    assert response.get_json()["error"] == "parameter 'sigma_mm' must be a number > 0 and <= 1000, got '1.5'"


# -- the same input hash through every front door ----------------------------------------------
def test_input_hash_agrees_across_http_job_and_command_line(tmp_path):
    """One study, one JSON: the HTTP gateway, a job and the hippocampus command line hash it alike."""
    data = tmp_path / "data"
    files = crop_study(data / "study")
    settings = dataclasses.replace(Settings(), data_root=data, output_root=tmp_path / "jobs")
    pipeline = Pipeline(settings, commands=[HIPPOCAMPUS])
    seen: list[str] = []
    original_run = Pipeline.run

    def spy(self, json_input, instances, input_hash, **kwargs):
        seen.append(input_hash)
        return original_run(self, json_input, instances, input_hash, **kwargs)

    request = {"inference_command": HIPPOCAMPUS}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pipeline, "run", spy)
        app = Gateway(__name__, pipeline=pipeline)
        app.add_inference_route("/")
        add_job_routes(app, pipeline)
        response = post(app, dicom_files_in(data / "study"), request)
        assert response.status_code == 200, response.data
        http_hash = decode_multipart_response(response.headers["Content-Type"], response.data)[-1][1].decode()[:64]
        uid = app.test_client().post("/job/", json={"job_name": HIPPOCAMPUS, "in_dir": "study"}).get_json()["uid"]
        deadline = time.monotonic() + 120
        while app.test_client().get(f"/query/{uid}").status_code == 202 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert app.test_client().get(f"/query/{uid}").status_code == 200
    job_hash = json.loads((tmp_path / "jobs" / uid / "job.json").read_text())["input_hash"]
    assert seen == [http_hash, job_hash], "both front doors went through Pipeline.run"
    cli = subprocess.run([sys.executable, "-m", "handlers.hippocampus", str(data / "study"), "--out",
                          str(tmp_path / "cli")], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    cli_hash = json.loads(next((tmp_path / "cli").glob("*/volumes.json")).read_text())["input_hash"]
    assert http_hash == job_hash == cli_hash
    assert len(files) == 12


def test_benchmark_times_the_pipeline(monkeypatch):
    """The benchmark's hippocampus row runs the real handler path: the pipeline, on Study1."""
    shared_data("studies", "Study1")
    import bench.run
    from models.registry import ModelRegistry

    calls = []
    original_run = Pipeline.run
    monkeypatch.setattr(Pipeline, "run", lambda self, *a, **k: calls.append(1) or original_run(self, *a, **k))

    class NoServer:
        def commands(self):
            return []

    out = bench.run.measure_hippocampus(NoServer(), repeats=1)
    versions = ModelRegistry.load().family("hippocampus").versions
    # warm-up + one timed run for the default version and for the fast one, then for every version, in turn
    # (bench/model_versions.py)
    assert len(calls) == 4 + 2 * len(versions)
    assert set(out["hippocampus_version_model_s"]) == set(versions)
    assert 0 < out["hippocampus_model_s"] <= out["hippocampus_pipeline_s"]
    assert out["hippocampus_fast_model_s"] > 0
    assert out["hippocampus_crop_shape"]["depth"] > 0


def test_the_job_executor_runs_through_the_pipeline(tmp_path, monkeypatch):
    load_handlers()
    data = tmp_path / "data"
    write_study(data / "s", shape=(3, 8, 8))
    settings = dataclasses.replace(Settings(), data_root=data, output_root=tmp_path / "jobs")
    calls = []
    original_run = Pipeline.run
    monkeypatch.setattr(Pipeline, "run", lambda self, *a, **k: calls.append(k.get("command")) or
                        original_run(self, *a, **k))
    pipeline = Pipeline(settings, REGISTRY)
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline)
    uid = app.test_client().post("/job/", json={"job_name": "3dblur", "in_dir": "s", "sigma_mm": 1}).get_json()["uid"]
    deadline = time.monotonic() + 60
    while app.test_client().get(f"/query/{uid}").status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.test_client().get(f"/query/{uid}").status_code == 200
    assert calls == ["gaussian-blur-3d"]
    response = json.loads((tmp_path / "jobs" / uid / "response.json").read_text())
    assert [p["binary_type"] for p in response["parts"]] == ["dicom"] * 3


def test_handler_errors_keep_their_status_through_the_pipeline(tmp_path):
    pipeline = Pipeline(Settings(), commands=[HIPPOCAMPUS])
    series = write_series(series_from_volume(np.zeros((2, 8, 8), np.int16), description="T2 axial"), tmp_path / "t2")
    with pytest.raises(UnprocessableInput, match="series present: .*T2 axial"):
        pipeline.run_files({"inference_command": HIPPOCAMPUS}, series)


def test_the_hashes_part_is_the_protocols():
    from inference.protocol.multipart_response import encode_multipart_related

    encoded = encode_multipart_related([("application/json", b"{}")], input_hash="a" * 64)
    body = b"".join(encoded.chunks)
    hashes = body.split(b"\r\n\r\n")[-1].split(b"\r\n")[0]
    assert protocol.is_hashes_part("text/plain", hashes) and hashes.startswith(b"a" * 64 + b":")


def test_the_input_hash_tags_the_run_and_does_not_leak_into_the_callers_later_lines():
    from inference.logs import current_request_tags

    seen = {}
    registry = HandlerRegistry()

    @registry.register("tagged", params=None)
    def tagged(instances, context):
        seen.update(current_request_tags())
        return {"parts": []}, []

    before = current_request_tags()
    Pipeline(Settings(), registry).run({"inference_command": "tagged"}, [], "f" * 64)
    assert seen["input_hash"] == "f" * 64
    assert current_request_tags() == before


def test_a_posted_volume_gets_the_checks_of_an_upload_response_size_included():
    """run_volume and run share their output checks: a response over INFERENCE_MAX_RESPONSE_BYTES is a 413
    before anything is sent, whatever the input (run_volume lacked the check)."""
    from inference.dicom.series import Volume
    from inference.errors import PayloadTooLarge

    registry = HandlerRegistry()

    @registry.register("mask-volume", volume_input=True)
    def mask_volume(instances, context):
        depth, height, width = context.volume.voxels.shape
        mask = np.ones((depth, height, width), dtype=np.uint8)
        return {"protocol_version": "1.0", "parts": [{"label": "mask", "binary_type": "numeric_label_mask",
                                                      "label_map": {"1": "everything"},
                                                      "binary_data_shape": {"depth": depth, "height": height,
                                                                            "width": width}}]}, [mask]

    volume = Volume(np.zeros((4, 16, 16), dtype=np.int16), (1.0, 1.0, 1.0), [], uid="1.2.3")
    roomy = Pipeline(dataclasses.replace(Settings(), max_response_bytes=1 << 20), registry)
    assert roomy.run_volume({}, volume, "ab" * 32, command="mask-volume").buffers[0].nbytes == 4 * 16 * 16
    tight = Pipeline(dataclasses.replace(Settings(), max_response_bytes=512), registry)
    with pytest.raises(PayloadTooLarge, match="over the limit of 512 bytes"):
        tight.run_volume({}, volume, "ab" * 32, command="mask-volume")
