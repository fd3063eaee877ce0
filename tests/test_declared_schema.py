"""A declared version's schema: every bad key named with why, when the manifest loads; a broken non-default version
is listed unavailable while the others serve, a broken default stops the start."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from models.declared.schema import parse_declaration
from models.registry import ManifestError, ModelRegistry, ModelUnavailable, parse_manifest

GOOD = {
    "framework": "onnx",
    "input": {"modality": "CT", "series_description": "abdomen|spleen"},
    "preprocessing": {"orientation": "RAS", "spacing_mm": [1.5, 1.5, 2.0],
                      "intensity": [{"window": {"source": [-57, 164], "to": [0, 1], "clip": True}},
                                    {"zscore": {"nonzero": True}}, {"percentiles": {"source": [0.5, 99.5]}},
                                    {"minmax": {"to": [0, 1]}}],
                      "crop": {"foreground": {"above": 0, "margin": 2}}, "pad": {"multiple": 16, "mode": "edge"}},
    "inference": {"mode": "sliding_window", "patch": [96, 96, 96], "overlap": 0.5, "blend": "gaussian", "batch": 4},
    "postprocessing": {"activation": "softmax", "discretize": "argmax", "largest_component": True,
                       "min_component_mm3": 200},
}


def with_change(path: str, value) -> dict:
    """GOOD with the key at dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    spec = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    target = spec
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value == "DELETE":
        del target[last]
    elif isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return spec


def test_the_full_declaration_reads_as_declared():
    declaration, problems = parse_declaration(GOOD)
    assert problems == []
    pre = declaration.preprocessing
    assert (declaration.framework, declaration.input.modality, pre.orientation, pre.spacing_mm) == \
           ("onnx", "CT", "RAS", (1.5, 1.5, 2.0))
    assert [step.kind for step in pre.intensity] == ["window", "zscore", "percentiles", "minmax"]
    assert pre.intensity[0].source == (-57.0, 164.0) and pre.intensity[0].clip and pre.intensity[1].nonzero
    assert pre.intensity[2].to is None and pre.intensity[2].clip  # a percentile clip, values kept
    assert (pre.crop.kind, pre.crop.margin, pre.pad.multiple, pre.pad.mode) == ("foreground", (2, 2, 2),
                                                                               (16, 16, 16), "edge")
    inference, post = declaration.inference, declaration.postprocessing
    assert (inference.mode, inference.patch, inference.overlap, inference.blend, inference.batch) == \
           ("sliding_window", (96, 96, 96), 0.5, "gaussian", 4)
    assert (post.activation, post.threshold, post.largest_component, post.min_component_mm3) == \
           ("softmax", None, True, 200.0)


@pytest.mark.parametrize(("path", "value", "message"), [
    ("framework", "pytorch", "framework: must be one of onnx, torchscript"),
    ("input.modality", "ct scan", "input.modality: must be a DICOM modality"),
    ("input.series_description", "([", "input.series_description: is not a regular expression"),
    ("input.body_part", "ABDOMEN", "input.body_part: unknown key; input takes modality, series_description"),
    ("preprocessing.orientation", "RAR", "preprocessing.orientation: must be three axis codes"),
    ("preprocessing.spacing_mm", [1.5, 0, 2], "preprocessing.spacing_mm: must be three numbers > 0"),
    ("preprocessing.intensity.0", {"window": {"source": [164, -57], "to": [0, 1]}},
     "preprocessing.intensity[0].window.source: must be [low, high] with low < high"),
    ("preprocessing.intensity.0", {"window": {"source": [0, 1]}}, "preprocessing.intensity[0].window.to: missing"),
    ("preprocessing.intensity.1", {"histogram": {}}, "preprocessing.intensity[1].histogram: unknown intensity step"),
    ("preprocessing.intensity.2", {"percentiles": {"source": [1, 101]}},
     "preprocessing.intensity[2].percentiles.source: percentiles lie in 0..100"),
    ("preprocessing.intensity.1", {"zscore": {"nonzero": "yes"}},
     "preprocessing.intensity[1].zscore.nonzero: must be true or false"),
    ("preprocessing.crop", {"foreground": {}, "box": {}}, "preprocessing.crop: give one of foreground or box"),
    ("preprocessing.crop", {"box": {"start": [0, 0], "size": [8, 8, 8]}},
     "preprocessing.crop.box.start: must be three integers >= 0"),
    ("preprocessing.pad", {"multiple": 0}, "preprocessing.pad.multiple: must be three integers > 0"),
    ("preprocessing.pad", {"mode": "reflect"}, "preprocessing.pad.mode: must be one of constant, edge"),
    ("preprocessing.resize", [96, 96, 96], "preprocessing.resize: unknown key"),
    ("inference", "DELETE", "inference: missing"),
    ("inference.mode", "tiles", "inference.mode: must be one of whole, slices, sliding_window"),
    ("inference.patch", "DELETE", "inference.patch: missing"),
    ("inference.patch", [96, 96], "inference.patch: must be three integers > 0"),
    ("inference.overlap", 1.0, "inference.overlap: must be a number in [0, 1)"),
    ("inference.blend", "cosine", "inference.blend: must be one of constant, gaussian"),
    ("inference.axis", 1, "inference.axis: does not apply to mode sliding_window"),
    ("inference.batch", 0, "inference.batch: must be an integer 1..1024"),
    ("postprocessing.activation", "relu", "postprocessing.activation: must be one of none, softmax, sigmoid"),
    ("postprocessing.discretize", "round", "postprocessing.discretize: must be argmax or {threshold: T}"),
    ("postprocessing.min_component_mm3", -5, "postprocessing.min_component_mm3: must be a number >= 0"),
    ("postprocessing.fill_holes", True, "postprocessing.fill_holes: unknown key"),
])
def test_each_bad_key_is_named_with_why(path, value, message):
    declaration, problems = parse_declaration(with_change(path, value))
    assert declaration is None
    assert any(problem.startswith(message) for problem in problems), problems


def test_every_fault_is_reported_at_once():
    spec = with_change("framework", "tensorflow")
    spec["inference"] = {"mode": "slices", "axis": 3, "context": -1}
    spec["postprocessing"] = {"activation": "tanh"}
    _, problems = parse_declaration(spec)
    assert [p.split(":")[0] for p in problems] == ["framework", "inference.axis", "inference.context",
                                                   "postprocessing.activation"]


def test_slices_and_thresholds_read():
    spec = {**GOOD, "inference": {"mode": "slices", "axis": 2, "context": 2, "edge": "zero", "batch": 32},
            "postprocessing": {"activation": "sigmoid", "discretize": {"threshold": 0.4}}}
    declaration, problems = parse_declaration(spec)
    assert problems == []
    assert (declaration.inference.axis, declaration.inference.context, declaration.inference.edge) == (2, 2, "zero")
    assert declaration.postprocessing.threshold == 0.4


# -- in the manifest -------------------------------------------------------------------------------
def manifest_with(folder: Path, versions: dict, default: str = "1") -> Path:
    weights = folder / "net.onnx"
    weights.write_bytes(b"not really a network")
    from models.registry import file_sha256

    base = {"weights": "net.onnx", "sha256": file_sha256(weights), "architecture": "a test network",
            "training_data": {"name": "none"}, "date": "2026-12-07",
            "structures": [{"name": "Spleen", "label": 1, "color": [230, 80, 60],
                            "anatomy": {"value": "78961009", "scheme": "SCT", "meaning": "Spleen"}}]}
    family = {"description": "a declared family", "command": "get-spleen-volume", "default_version": default,
              "versions": {name: {**base, **spec} for name, spec in versions.items()}}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump({"families": {"spleen": family}}, sort_keys=False))
    return path


def test_a_declared_family_loads_with_its_command_and_declaration(tmp_path):
    families = parse_manifest(manifest_with(tmp_path, {"1": GOOD}))
    family = families["spleen"]
    assert family.command == "get-spleen-volume"
    version = family.versions["1"]
    assert version.problem is None and version.declaration.inference.patch == (96, 96, 96)
    assert family.describe()["command"] == "get-spleen-volume"
    assert version.describe()["declaration"]["inference"]["mode"] == "sliding_window"


def test_a_broken_version_is_unavailable_naming_its_keys_and_the_others_serve(tmp_path):
    broken = with_change("inference.mode", "tiles")
    broken["preprocessing"]["orientation"] = "XYZ"
    registry = ModelRegistry.load(manifest_with(tmp_path, {"1": GOOD, "2": broken}))
    failures = registry.failures
    assert list(failures) == [("spleen", "2")]
    assert "inference.mode: must be one of" in failures[("spleen", "2")]
    assert "preprocessing.orientation: must be three axis codes" in failures[("spleen", "2")]
    with pytest.raises(ModelUnavailable, match="spleen 2 is unavailable: line .*inference.mode"):
        registry.model(registry.family("spleen").versions["2"], lambda version: "loaded")
    assert registry.model(registry.family("spleen").versions["1"], lambda version: "loaded") == "loaded"
    described = registry.describe()[0]["versions"]
    assert "unavailable" not in described[0] and "inference.mode" in described[1]["unavailable"]


def test_a_broken_default_stops_the_start_with_the_reason(tmp_path):
    path = manifest_with(tmp_path, {"1": with_change("framework", "keras"), "2": GOOD}, default="1")
    with pytest.raises(ManifestError, match=r"spleen 1 \(the default version\) cannot be served: "
                                            r"line \d+: framework: must be one of onnx, torchscript"):
        ModelRegistry.load(path)


def test_a_command_must_be_a_command_name(tmp_path):
    path = manifest_with(tmp_path, {"1": GOOD})
    path.write_text(path.read_text().replace("command: get-spleen-volume", "command: Get Spleen!"))
    with pytest.raises(ManifestError, match="command must be an inference command name"):
        parse_manifest(path)


def test_families_without_a_command_are_not_read_as_declarations():
    from models.registry import DEFAULT_MANIFEST

    hippocampus = parse_manifest(DEFAULT_MANIFEST)["hippocampus"]
    assert hippocampus.command is None
    assert all(v.declaration is None and v.problem is None for v in hippocampus.versions.values())
