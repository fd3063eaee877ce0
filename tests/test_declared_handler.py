"""A declared family served on POST / by its manifest command, no code per model: label mask, volumes within 5 % of
the synthetic truth, provenance, a report, SEG and SR naming the model; broken versions unavailable, not fatal."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

import server
from handlers import REGISTRY, load_handlers
from inference.config import Settings
from inference.dicom.writing import series_from_volume, write_series
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.multipart_response import decode_multipart_response
from models.registry import DEFAULT_MANIFEST, registry_for
from tests import declared_models as phantom
from tests.dicom_readback import decode_segmentation, report_volumes

SPHERE, ORGANS = "get-phantom-volume", "get-organ-volumes"


def manifest_with_declared(folder: Path, networks: dict, *, broken_default: bool = False) -> Path:
    """The shipped manifest (its weights referred to where they are) plus two declared families."""
    folder.mkdir(parents=True, exist_ok=True)
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8").replace(
        "weights: hippocampus", f"weights: {DEFAULT_MANIFEST.parent}/hippocampus")
    one, five = networks["one"], networks["five"]
    broken = phantom.declared_version(one["onnx"], "onnx", 1, {"mode": "tiles"}, phantom.SPACING_MM)
    sphere = phantom.declared_family(SPHERE, {
        "1": broken if broken_default else phantom.declared_version(one["onnx"], "onnx", 1, {"mode": "whole"},
                                                                    phantom.SPACING_MM),
        "2": phantom.declared_version(one["torchscript"], "torchscript", 1,
                                      {"mode": "sliding_window", "patch": [24, 24, 24], "overlap": 0.25,
                                       "blend": "gaussian", "batch": 2}, phantom.SPACING_MM),
        "broken": broken}, "1", description="A sphere in an MR phantom")
    organs = phantom.declared_family(ORGANS, {
        "1": phantom.declared_version(five["onnx"], "onnx", 5, {"mode": "whole"}, None)}, "1",
        description="Five spheres in an MR phantom")
    block = yaml.safe_dump({"sphere": sphere, "organs": organs}, sort_keys=False)
    path = folder / "manifest.yaml"
    path.write_text(text + "".join("  " + line + "\n" for line in block.splitlines()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory, phantom_networks):
    folder = tmp_path_factory.mktemp("declared")
    settings = dataclasses.replace(Settings(), model_manifest=manifest_with_declared(folder / "models",
                                                                                     phantom_networks),
                                   output_root=folder / "jobs", data_root=folder / "data", metrics_dir=None)
    (folder / "data").mkdir()
    return server.create_app(settings=settings, warm_up_first=True)


def study(folder: Path, count: int, extra: bool = False) -> tuple[list[Path], np.ndarray, float]:
    """The phantom series written as files (with an unrelated series when ``extra``), its truth and voxel volume."""
    series, truth, _ = phantom.phantom_study(count)
    files = write_series(series, folder / "phantom")
    if extra:
        other = series_from_volume(np.zeros((3, 8, 8), np.int16), description="Localizer",
                                   study_uid=str(series[0].StudyInstanceUID))
        files += write_series(other, folder / "localizer")
    return files, truth, float(np.prod(phantom.GRID_SPACING))


def post(client, files, json_input):
    encoder = build_multipart_request(json_input, files)
    response = client.post("/", data=encoder.to_string(), content_type=related_content_type(encoder))
    if response.status_code != 200:
        return response.status_code, response.json, []
    parts = decode_multipart_response(response.headers["Content-Type"], response.data)
    return 200, json.loads(parts[0][1]), [body for _, body in parts[1:-1]]


def test_a_one_structure_family_on_post_by_its_command(app, tmp_path):
    files, truth, voxel_mm3 = study(tmp_path, 1, extra=True)
    status, body, buffers = post(app.test_client(), files, {"inference_command": SPHERE})
    assert status == 200, body
    mask, report = body["parts"][0], body["parts"][1]
    assert (mask["binary_type"], mask["label_map"]) == ("numeric_label_mask", {"1": "Spleen"})
    depth, height, width = truth.shape
    assert mask["binary_data_shape"] == {"timepoints": 1, "depth": depth, "height": height, "width": width}
    labels = np.frombuffer(buffers[0], np.uint8).reshape(truth.shape)
    measures = body["series_ml_json"][mask["SeriesInstanceUID"]]
    true_mm3 = np.count_nonzero(truth) * voxel_mm3
    assert measures["spleen_volume_mm3"] == pytest.approx(true_mm3, rel=0.05)
    assert measures["total_volume_mm3"] == measures["spleen_volume_mm3"]
    assert measures["voxel_volume_mm3"] == pytest.approx(voxel_mm3, abs=1e-3)
    assert measures["spleen_voxels"] == np.count_nonzero(labels == 1)
    assert np.count_nonzero((labels == 1) & (truth == 1)) > 0.9 * np.count_nonzero(truth)
    assert body["model"]["family"] == "sphere" and body["model"]["version"] == "1"
    assert len(body["model"]["weights_sha256"]) == 64 and measures["model"].startswith("sphere 1 (")
    assert report["binary_type"] == "dicom_secondary_capture"
    capture = pydicom.dcmread(io.BytesIO(buffers[1]))
    assert capture.SeriesDescription == "sphere volume report"
    assert capture.StudyInstanceUID == pydicom.dcmread(files[0]).StudyInstanceUID


def test_model_version_chooses_a_declared_version(app, tmp_path):
    files, truth, voxel_mm3 = study(tmp_path, 1)
    status, body, _ = post(app.test_client(), files, {"inference_command": SPHERE, "model_version": "2"})
    assert status == 200, body
    measures = next(iter(body["series_ml_json"].values()))
    assert body["model"]["version"] == "2"
    assert measures["spleen_volume_mm3"] == pytest.approx(np.count_nonzero(truth) * voxel_mm3, rel=0.05)


def test_five_structures_with_seg_and_sr_naming_the_model(app, tmp_path):
    files, truth, voxel_mm3 = study(tmp_path, 5)
    status, body, buffers = post(app.test_client(), files, {"inference_command": ORGANS,
                                                            "dicom_outputs": ["seg", "sr"]})
    assert status == 200, body
    assert body["parts"][0]["label_map"] == {"1": "Spleen", "2": "Liver", "3": "Pancreas", "4": "Left kidney",
                                             "5": "Right kidney"}
    measures = next(iter(body["series_ml_json"].values()))
    for label, key in enumerate(["spleen", "liver", "pancreas", "left_kidney", "right_kidney"], 1):
        assert measures[f"{key}_volume_mm3"] == pytest.approx(np.count_nonzero(truth == label) * voxel_mm3, rel=0.05)
    assert measures["total_volume_mm3"] == pytest.approx(np.count_nonzero(truth) * voxel_mm3, rel=0.05)
    kinds = [(p["binary_type"], p["label"]) for p in body["parts"][1:]]
    assert kinds == [("dicom_secondary_capture", "organs volume report"), ("dicom", "organs segmentation"),
                     ("dicom", "organs volume measurements")]
    seg, sr = (pydicom.dcmread(io.BytesIO(b)) for b in buffers[2:4])
    labels = np.frombuffer(buffers[0], np.uint8).reshape(truth.shape)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Spleen", "Liver", "Pancreas", "Left kidney",
                                                             "Right kidney"]
    structures = registry_for(app.pipeline.settings.model_manifest).family("organs").versions["1"].structures
    sources = [str(ds.SOPInstanceUID) for ds in sorted((pydicom.dcmread(f) for f in files),
                                                        key=lambda ds: int(ds.InstanceNumber))]
    assert np.array_equal(decode_segmentation(seg, structures, sources), labels)
    assert report_volumes(sr) == pytest.approx({"Spleen": measures["spleen_volume_mm3"],
                                                "Liver": measures["liver_volume_mm3"],
                                                "Pancreas": measures["pancreas_volume_mm3"],
                                                "Left kidney": measures["left_kidney_volume_mm3"],
                                                "Right kidney": measures["right_kidney_volume_mm3"]})
    for written in (seg, sr):
        assert written.ManufacturerModelName == "organs" and written.SoftwareVersions.startswith("1 (weights")
        assert "Hippocampus" not in written.Manufacturer


def test_a_study_without_the_series_is_a_422_listing_what_came(app, tmp_path):
    other = write_series(series_from_volume(np.zeros((3, 8, 8), np.int16), description="Localizer"), tmp_path)
    status, body, _ = post(app.test_client(), other, {"inference_command": SPHERE})
    assert status == 422
    assert "sphere takes one series (modality MR and a SeriesDescription matching 'Phantom'); no series fit" in \
           body["error"] and "Localizer" in body["error"]


def test_a_broken_version_is_unavailable_and_the_rest_serves(app, tmp_path):
    client = app.test_client()
    health = client.get("/healthcheck").text
    assert health.startswith("DEGRADED: ") and "sphere broken unavailable" in health
    families = {f["family"]: f for f in client.get("/models").json["families"]}
    versions = {v["version"]: v for v in families["sphere"]["versions"]}
    assert "inference.mode: must be one of whole, slices, sliding_window" in versions["broken"]["unavailable"]
    assert "unavailable" not in versions["1"] and families["sphere"]["command"] == SPHERE
    served = {m["inference_command"]: m for m in client.get("/models").json["models"]}
    assert served[SPHERE]["model_family"] == "sphere" and served[ORGANS]["model_family"] == "organs"
    files, _, _ = study(tmp_path, 1)
    status, body, _ = post(client, files, {"inference_command": SPHERE, "model_version": "broken"})
    assert status == 503 and "sphere broken is unavailable" in body["error"] and "inference.mode" in body["error"]


def test_a_broken_default_stops_the_start(tmp_path, phantom_networks):
    manifest = manifest_with_declared(tmp_path / "models", phantom_networks, broken_default=True)
    settings = dataclasses.replace(Settings(), model_manifest=manifest, output_root=tmp_path / "jobs")
    with pytest.raises(SystemExit, match=r"model manifest: .*sphere 1 \(the default version\) cannot be served: "
                                         r"line \d+: inference.mode: must be one of"):
        server.create_app(settings=settings)


def test_a_command_taken_by_another_handler_is_refused(tmp_path, phantom_networks):
    manifest = manifest_with_declared(tmp_path / "models", phantom_networks)
    manifest.write_text(manifest.read_text().replace(f"command: {ORGANS}", "command: gaussian-blur-3d"))
    load_handlers()
    with pytest.raises(ValueError, match="its command 'gaussian-blur-3d' is already served"):
        load_handlers(manifest)
    assert REGISTRY.get("gaussian-blur-3d").family is None


def test_an_app_of_another_manifest_does_not_serve_the_declared_commands(app, tmp_path):
    """The registry is the process's: an app on the shipped manifest (no declared family) leaves them out."""
    settings = dataclasses.replace(Settings(), output_root=tmp_path / "jobs")
    assert SPHERE in REGISTRY.commands()
    served = server.served_commands(settings)
    assert SPHERE not in served and ORGANS not in served and "get-hippocampus-volume" in served


def test_the_job_api_runs_a_declared_family(app, tmp_path):
    """POST /job/ with the family's command as job_name: the same answer, written to the job's folder."""
    settings = app.pipeline.settings
    series, truth, _ = phantom.phantom_study(1)
    write_series(series, settings.data_root / "phantom-study")
    client = app.test_client()
    response = client.post("/job/", json={"job_name": SPHERE, "in_dir": "phantom-study"})
    assert response.status_code == 201, response.get_json()
    uid = response.get_json()["uid"]
    deadline = time.monotonic() + 120
    while (done := client.get(f"/query/{uid}")).status_code == 202 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done.status_code == 200, done.get_json()
    answer = json.loads((settings.output_root / uid / "response.json").read_text())
    measures = next(iter(answer["series_ml_json"].values()))
    voxel_mm3 = float(np.prod(phantom.GRID_SPACING))
    assert measures["spleen_volume_mm3"] == pytest.approx(np.count_nonzero(truth) * voxel_mm3, rel=0.05)
    mask = answer["parts"][0]
    assert mask["binary_type"] == "numeric_label_mask"
    assert (settings.output_root / uid / mask["file"]).stat().st_size == truth.size


def test_velocity_s_door_lists_the_families_and_runs_a_posted_volume(app):
    """The Radiomics API's catalogue offers every declared version; a posted volume (calibrated voxels and their
    geometry, no DICOM) is segmented on its own grid."""
    from inference.dicom.series import Geometry, Volume, load_volume
    from inference.radiomics.catalogue import Catalogue
    from inference.radiomics.routes import family_commands

    catalogue = Catalogue(registry_for(app.pipeline.settings.model_manifest), family_commands(app.pipeline))
    assert {"sphere-1", "sphere-2", "organs-1"} <= set(catalogue.models)
    assert catalogue.model("organs-1").command == ORGANS
    organs = next(f for f in catalogue.collection().Models if f.FamilyDescription.Description.startswith("Five"))
    assert [s.Name for s in organs.ModelVersions[0].Structures] == ["Spleen", "Liver", "Pancreas",
                                                                    "Left kidney", "Right kidney"]
    series, truth, _ = phantom.phantom_study(1)
    read = load_volume(series)
    orientation = np.asarray(series[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    geometry = Geometry(tuple(orientation[:3]), tuple(orientation[3:]), tuple(normal),
                        tuple(float(v) for v in series[0].ImagePositionPatient))
    posted = Volume(read.voxels, read.spacing, [], geometry=geometry, uid="1.2.826.0.1.3680043.8.498.1")
    result = app.pipeline.run_volume({"inference_command": SPHERE}, posted, "0" * 64)
    labels = np.frombuffer(bytes(result.buffers[0]), np.uint8).reshape(truth.shape)
    measures = result.response_json["series_ml_json"]["1.2.826.0.1.3680043.8.498.1"]
    assert measures["spleen_voxels"] == np.count_nonzero(labels)
    assert np.count_nonzero(labels) == pytest.approx(np.count_nonzero(truth), rel=0.05)
    assert [p["binary_type"] for p in result.response_json["parts"]] == ["numeric_label_mask"]
