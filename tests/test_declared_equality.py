"""The declaration is expressive enough for the hippocampus: 1.0-fast declared in a copy of the manifest gives, through
POST /, labels identical voxel for voxel to the hippocampus handler's 1.0-fast on Study1 and Study2.

The network is member 0 of the checkpoint exported as ONNX (softmax included, as the segmenter's own
export); everything else is declaration: RAS, the crop's own spacing, a 0.5-99.5 percentile clip then a
z-score, sagittal slices with one neighbour each side as channels, slices padded to the next multiple of
the network's size, argmax.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import server
from inference.config import Settings
from inference.protocol.client import build_multipart_request, related_content_type
from inference.protocol.multipart_response import decode_multipart_response
from models.registry import DEFAULT_MANIFEST, registry_for
from tests.conftest import shared_data

COMMAND = "get-hippocampus-declared"


def declared_fast(folder: Path) -> Path:
    """A manifest copy with the family ``hippocampus-declared``: 1.0-fast as a declaration and its exported network."""
    from models.runtime import export_onnx
    from models.segmenter import HippocampusSegmenter, version_settings

    fast = registry_for(DEFAULT_MANIFEST).family("hippocampus").versions["1.0-fast"]
    segmenter = HippocampusSegmenter.load(fast.weights, **version_settings(fast.inference))
    (network, config), = segmenter.members
    graph = folder / "hippocampus-1.0-fast.onnx"
    graph.write_bytes(export_onnx(network))
    data = yaml.safe_load(DEFAULT_MANIFEST.read_text(encoding="utf-8"))
    structures = data["families"]["hippocampus"]["versions"]["1.0-fast"]["structures"]
    from models.registry import file_sha256

    version = {
        "weights": graph.name, "sha256": file_sha256(graph),
        "architecture": "member 0 of the 1.0 ensemble exported as ONNX", "framework": "onnx",
        "input": {"modality": "MR", "series_description": "HippoCrop"},
        "preprocessing": {"orientation": "RAS", "spacing_mm": None,
                          "intensity": [{"percentiles": {"source": [0.5, 99.5], "clip": True}}, {"zscore": {}}],
                          "pad": {"multiple": network.size_multiple, "value": 0}},
        "inference": {"mode": "slices", "axis": int(config["axis"]), "context": int(config["context"]),
                      "batch": 128},
        "postprocessing": {"activation": "none", "discretize": "argmax"},
        "structures": structures, "training_data": {"name": "as hippocampus 1.0-fast"}, "date": "2026-12-08",
    }
    family = {"description": "hippocampus 1.0-fast, declared", "command": COMMAND, "default_version": "1.0-fast",
              "versions": {"1.0-fast": version}}
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8").replace(
        "weights: hippocampus", f"weights: {DEFAULT_MANIFEST.parent}/hippocampus")
    text = text.replace("drift_reference: drift/", f"drift_reference: {DEFAULT_MANIFEST.parent}/drift/")
    block = yaml.safe_dump({"hippocampus-declared": family}, sort_keys=False)
    path = folder / "manifest.yaml"
    path.write_text(text + "".join("  " + line + "\n" for line in block.splitlines()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    shared_data("studies", "Study1")  # skips without the shared data
    folder = tmp_path_factory.mktemp("equality")
    settings = dataclasses.replace(Settings(), model_manifest=declared_fast(folder), output_root=folder / "jobs",
                                   metrics_dir=None)
    return server.create_app(settings=settings).test_client()


def labels_of(client, files, json_input) -> tuple[np.ndarray, dict]:
    encoder = build_multipart_request(json_input, files)
    response = client.post("/", data=encoder.to_string(), content_type=related_content_type(encoder))
    assert response.status_code == 200, response.json
    parts = decode_multipart_response(response.headers["Content-Type"], response.data)
    body = json.loads(parts[0][1])
    shape = body["parts"][0]["binary_data_shape"]
    return np.frombuffer(parts[1][1], np.uint8).reshape(shape["depth"], shape["height"], shape["width"]), body


@pytest.mark.parametrize("study_name", ["Study1", "Study2"])
def test_declared_1_0_fast_equals_the_handler_voxel_for_voxel(client, study_name):
    files = sorted(shared_data("studies", study_name).rglob("*.dcm"))
    handler, by_handler = labels_of(client, files, {"inference_command": "get-hippocampus-volume",
                                                    "model_version": "1.0-fast"})
    declared, by_declaration = labels_of(client, files, {"inference_command": COMMAND})
    assert by_handler["model"]["version"] == "1.0-fast" and by_declaration["model"]["family"] == "hippocampus-declared"
    assert np.count_nonzero(handler) > 1000
    assert np.array_equal(declared, handler), f"{np.count_nonzero(declared != handler)} voxels differ"
    volumes = next(iter(by_declaration["series_ml_json"].values()))
    expected = next(iter(by_handler["series_ml_json"].values()))
    assert (volumes["anterior_volume_mm3"], volumes["posterior_volume_mm3"], volumes["total_volume_mm3"]) == \
           (expected["anterior_volume_mm3"], expected["posterior_volume_mm3"], expected["total_volume_mm3"])
