"""The model registry: the manifest, verified weights, versions chosen per request, provenance on results."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

import server
from inference.config import Settings
from inference.dicom.writing import series_from_volume, write_series
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.multipart_response import decode_multipart_response
from models.registry import DEFAULT_MANIFEST, ManifestError, ModelRegistry, add_version, file_sha256, parse_manifest
from tests.conftest import PROJECT_ROOT, copy_shipped_weights

HIPPOCAMPUS = "get-hippocampus-volume"


def shipped() -> dict:
    return yaml.safe_load(DEFAULT_MANIFEST.read_text())


def write_manifest(folder: Path, data: dict) -> Path:
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def copy_weights(folder: Path, version: dict) -> None:
    """Copy a version's weights next to a test manifest (the manifest's paths are relative to it)."""
    shutil.copy(DEFAULT_MANIFEST.parent / version["weights"], folder / version["weights"])


# -- the shipped manifest -------------------------------------------------------------------------
def test_the_shipped_manifest_has_two_verified_hippocampus_versions():
    registry = ModelRegistry.load()
    family = registry.family("hippocampus")
    assert family.default_version in family.versions and len(family.versions) >= 2
    for version in family.versions.values():
        version.verify()
        assert version.sha256 == file_sha256(version.weights)
        assert {s.name: s.label for s in version.structures} == {"Anterior": 1, "Posterior": 2}
        assert all(s.anatomy.value == "5366008" and s.anatomy.scheme_designator == "SCT" for s in version.structures)
        assert {s.modifier.meaning for s in version.structures} == {"Anterior", "Posterior"}
        assert version.evaluation["mean_dice"] > 0.9 and "models.evaluate" in version.evaluation["command"]
        assert version.training_data["licence"] == "CC-BY-SA 4.0" and version.input["modality"] == "MR"
    assert {v.inference["flips"] for v in family.versions.values()} == {True, False}


def test_command_line_list_and_verify():
    listed = subprocess.run([sys.executable, "-m", "models.registry", "list"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "* hippocampus 1.0 " in listed.stdout
    verified = subprocess.run([sys.executable, "-m", "models.registry", "verify"], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0 and verified.stdout.count("OK") >= 2


def test_verify_exits_1_on_a_corrupt_weights_file(tmp_path):
    data = shipped()
    versions = data["families"]["hippocampus"]["versions"]
    copy_shipped_weights(tmp_path)  # every version's file present (every family's): only 1.0's is then damaged
    version = versions["1.0"]
    with open(tmp_path / version["weights"], "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00corrupt")
    manifest = write_manifest(tmp_path, data)
    result = subprocess.run([sys.executable, "-m", "models.registry", "--manifest", str(manifest), "verify"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "MISMATCH" in result.stdout and "corrupt or was replaced" in result.stdout


# -- manifest errors name the line and the fix ------------------------------------------------------
def test_yaml_that_does_not_parse_names_the_line(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text("families:\n  hippocampus:\n    versions: [unclosed\n    default_version: x\n")
    with pytest.raises(ManifestError, match=r"manifest.yaml, line \d+: not valid YAML"):
        parse_manifest(path)


def test_a_missing_weights_file_names_the_versions_line_and_the_fix(tmp_path):
    data = shipped()
    manifest = write_manifest(tmp_path, data)  # no weights copied next to it
    lines = manifest.read_text().splitlines()
    version_line = next(i for i, line in enumerate(lines, 1) if line.strip() == "'1.0':") + 1
    with pytest.raises(ManifestError) as error:
        parse_manifest(manifest)
    assert f"line {version_line}:" in str(error.value) and "does not exist" in str(error.value)
    assert "correct the path" in str(error.value)


def test_a_default_that_is_not_a_version_is_refused(tmp_path):
    data = shipped()
    for version in data["families"]["hippocampus"]["versions"].values():
        if not (tmp_path / version["weights"]).exists():
            copy_weights(tmp_path, version)
    data["families"]["hippocampus"]["default_version"] = "9.9"
    with pytest.raises(ManifestError, match="default_version '9.9' is not one of its versions"):
        parse_manifest(write_manifest(tmp_path, data))


def test_a_broken_manifest_stops_start_up(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text("families: [")
    with pytest.raises(SystemExit, match="model manifest: manifest.yaml, line"):
        server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "jobs",
                                                            model_manifest=path))


def test_add_registers_a_new_version_and_never_overwrites(tmp_path):
    data = shipped()
    new_version = "9.9-test"  # a name no shipped version takes
    version = data["families"]["hippocampus"]["versions"]["1.0"]
    copy_shipped_weights(tmp_path)
    manifest = write_manifest(tmp_path, data)
    new_weights = tmp_path / "retrained.pt"
    shutil.copy(tmp_path / version["weights"], new_weights)
    with open(new_weights, "ab") as handle:
        handle.write(b"different bytes")
    metrics = tmp_path / "retrained.metrics.json"
    metrics.write_text(json.dumps({"test": {"mean_dice": 0.91234, "n": 35}}))
    entry = add_version(manifest, "hippocampus", new_version, new_weights, metrics, like="1.0", make_default=True)
    assert entry["sha256"] == file_sha256(new_weights) and entry["evaluation"]["mean_dice"] == 0.9123
    family = parse_manifest(manifest)["hippocampus"]
    assert family.default_version == new_version and family.versions[new_version].weights == new_weights.resolve()
    assert "&id0" not in manifest.read_text() and "*id0" not in manifest.read_text(), "no YAML anchors or aliases"
    with pytest.raises(ManifestError, match="exists already"):
        add_version(manifest, "hippocampus", new_version, new_weights, None, like=None)


def test_add_keeps_the_manifests_comments_and_lines_and_switches_the_default(tmp_path):
    text = DEFAULT_MANIFEST.read_text()
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(text)
    copy_shipped_weights(tmp_path)
    new_weights = tmp_path / "retrained.pt"
    new_weights.write_bytes((tmp_path / "hippocampus_unet.pt").read_bytes() + b"retrained")
    add_version(manifest, "hippocampus", "9.9-test", new_weights, None, like="1.0-fast", make_default=True)
    written = manifest.read_text()
    lines = written.splitlines()
    start = lines.index("      9.9-test:")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i].startswith("       ")),
               len(lines))
    without = "\n".join(lines[:start] + lines[end:]) + "\n"
    assert without == text.replace("default_version: '1.0'", "default_version: 9.9-test"), "only the block added"
    assert written.startswith(text.splitlines()[0]) and "# How the Radiomics Segmentation API" in written
    family = parse_manifest(manifest)["hippocampus"]
    assert family.default_version == "9.9-test" and list(family.versions)[-1] == "9.9-test"
    assert family.versions["9.9-test"].inference == family.versions["1.0-fast"].inference


# -- serving: versions side by side, a corrupt one refused while the others serve ----------------------
def crop_files(folder: Path) -> list[Path]:
    voxels = np.random.default_rng(2).integers(0, 300, (12, 20, 16)).astype(np.int16)
    return write_series(series_from_volume(voxels, spacing=(1.0, 1.0, 1.0), description="HippoCrop"), folder)


def post(app, files, json_input):
    encoder = build_multipart_request(json_input, files)
    return app.test_client().post("/", data=encoder.to_string(), content_type=related_content_type(encoder))


def answer(response) -> tuple[dict, list[bytes]]:
    parts = decode_multipart_response(response.headers["Content-Type"], response.data)
    return json.loads(parts[0][1]), [body for _, body in parts[1:-1]]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry-app")
    return server.create_app(settings=dataclasses.replace(Settings(), output_root=folder / "jobs"),
                                  warm_up_first=True)


def test_each_request_gets_the_version_it_asked_for(app, tmp_path):
    files = crop_files(tmp_path / "crop")
    family = ModelRegistry.load().family("hippocampus")
    for name, version in family.versions.items():
        response = post(app, files, {"inference_command": HIPPOCAMPUS, "model_version": name})
        assert response.status_code == 200, response.data
        response_json, buffers = answer(response)
        assert response_json["model"] == {"family": "hippocampus", "version": name, "weights_sha256": version.sha256}
        report = pydicom.dcmread(io.BytesIO(buffers[1]))
        assert report.Manufacturer == "inference-gateway"
        assert report.ManufacturerModelName == f"hippocampus {name}"
        assert list(report.SoftwareVersions) == [name, f"weights sha256 {version.sha256[:16]}"]
        assert version.sha256 in report.DerivationDescription
    default = answer(post(app, files, {"inference_command": HIPPOCAMPUS}))[0]["model"]["version"]
    assert default == family.default_version


def test_an_unknown_version_is_a_400_listing_the_available_ones(app, tmp_path):
    response = post(app, crop_files(tmp_path / "crop"), {"inference_command": HIPPOCAMPUS, "model_version": "7"})
    assert response.status_code == 400
    assert "unknown model_version '7' of hippocampus; available: 1.0" in response.get_json()["error"]
    response = post(app, crop_files(tmp_path / "crop2"), {"inference_command": HIPPOCAMPUS, "model_version": 1.2})
    assert response.status_code == 400
    assert 'model_version must be a string naming a version, got the float 1.2: send it quoted' in \
        response.get_json()["error"]


def test_models_shows_the_registry(app):
    models = app.test_client().get("/models").get_json()
    family = next(f for f in models["families"] if f["family"] == "hippocampus")
    assert [v["default"] for v in family["versions"]].count(True) == 1
    version = family["versions"][0]
    assert version["structures"][0]["anatomy"] == {"value": "5366008", "scheme": "SCT", "meaning": "Hippocampus"}
    assert version["structures"][0]["color"] == [255, 64, 64] and "mean_dice" in version["evaluation"]
    assert app.test_client().get("/models/hippocampus").get_json()["family"] == "hippocampus"
    assert app.test_client().get("/models/lungs").status_code == 404


def test_a_corrupt_version_is_refused_and_the_others_keep_serving(tmp_path):
    data = shipped()
    versions = data["families"]["hippocampus"]["versions"]
    corrupt = next(name for name in versions if name != data["families"]["hippocampus"]["default_version"])
    copy_shipped_weights(tmp_path)
    bad = tmp_path / "corrupt.pt"
    shutil.copy(tmp_path / versions["1.0"]["weights"], bad)
    with open(bad, "r+b") as handle:
        handle.seek(5000)
        handle.write(b"flipped")
    versions[corrupt]["weights"] = bad.name
    manifest = write_manifest(tmp_path, data)
    app = server.create_app(settings=dataclasses.replace(Settings(), output_root=tmp_path / "jobs",
                                                              model_manifest=manifest), warm_up_first=True)
    health = app.test_client().get("/healthcheck").get_data(as_text=True)
    assert health.startswith("DEGRADED") and f"hippocampus {corrupt} unavailable" in health and "SHA-256" in health
    files = crop_files(tmp_path / "crop")
    assert post(app, files, {"inference_command": HIPPOCAMPUS}).status_code == 200
    refused = post(app, files, {"inference_command": HIPPOCAMPUS, "model_version": corrupt})
    assert refused.status_code == 503 and "SHA-256" in refused.get_json()["error"]
    listed = app.test_client().get("/models/hippocampus").get_json()["versions"]
    assert "SHA-256" in next(v for v in listed if v["version"] == corrupt)["unavailable"]


def test_jobs_name_a_model_version_and_bad_ones_are_refused_at_submission(tmp_path):
    from gateway import Gateway
    from handlers import load_handlers
    from inference.jobs.api import add_job_routes
    from inference.pipeline.pipeline import Pipeline

    load_handlers()
    data = tmp_path / "data"
    crop_files(data / "crop")
    pipeline = Pipeline(dataclasses.replace(Settings(), data_root=data, output_root=tmp_path / "jobs"))
    app = Gateway(__name__, pipeline=pipeline)
    add_job_routes(app, pipeline)
    client = app.test_client()
    refused = client.post("/job/", json={"job_name": HIPPOCAMPUS, "in_dir": "crop", "model_version": "0.1"})
    assert refused.status_code == 400 and "available: 1.0" in refused.get_json()["error"]
    blur = client.post("/job/", json={"job_name": "3dblur", "in_dir": "crop", "model_version": "1.0"})
    assert blur.status_code == 400 and "gaussian-blur-3d has no model versions" in blur.get_json()["error"]
