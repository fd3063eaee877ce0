"""python -m models.registry import-bundle: a MONAI bundle's configs read as data, never executed; hostile or broken
bundles refused by name with the manifest and the folder left as they were; ``add`` creating a new family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from handlers.hippocampus.orientation import ras_affine
from inference.dicom.series import load_volume
from models.declared.runner import DeclaredSegmenter
from models.registry import DEFAULT_MANIFEST, ManifestError, ModelRegistry, ModelUnavailable, main, parse_manifest
from tests import declared_models as phantom

METADATA = {
    "version": "0.2.0", "monai_version": "1.4.0", "name": "Phantom sphere segmentation",
    "description": "One sphere in an MR phantom", "authors": "the test suite", "data_source": "synthetic spheres",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "channel_def": {"0": "background", "1": "sphere"}}}},
}


def inference_config() -> dict:
    """An inference.json as the Model Zoo writes them: '$' in the parts never read, '@' references in the sections."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".", "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2},
        "network": "$@network_def.to(@device)",
        "spacing": [1.5, 1.5, 1.5],
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": "@spacing", "mode": "bilinear"},
            {"_target_": "monai.transforms.ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 1000,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4,
                    "overlap": 0.25, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "KeepLargestConnectedComponentd", "keys": "pred"},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg"}]},
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "network": "@network"},
        "run": ["$@evaluator.run()"],
    }


def write_bundle(folder: Path, model: Path, name: str = "model.onnx", config: dict | None = None,
                 metadata: dict | None = None) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata or METADATA))
    (folder / "configs" / "inference.json").write_text(json.dumps(config or inference_config()))
    shutil.copyfile(model, folder / "models" / name)
    (folder / "LICENSE").write_text("Apache-2.0\n")
    return folder


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A copy of the shipped manifest (its weights referred to where they are) in a folder of its own."""
    folder = tmp_path / "served"
    folder.mkdir()
    text = DEFAULT_MANIFEST.read_text(encoding="utf-8")
    text = text.replace("weights: hippocampus", f"weights: {DEFAULT_MANIFEST.parent}/hippocampus")
    path = folder / "manifest.yaml"
    path.write_text(text, encoding="utf-8")
    return path


SPHERE = "1=Sphere:SCT:91723000:Anatomical structure"


def import_args(manifest: Path, bundle: Path, *structures: str, version: str = "0.2", extra=()) -> list[str]:
    args = ["--manifest", str(manifest), "import-bundle", str(bundle), "--family", "phantom", "--version", version,
            "--command", "get-phantom-volume", *extra]
    for structure in structures:
        args += ["--structure", structure]
    return args


def test_a_bundle_is_imported_as_a_declaration_that_segments_the_phantom(tmp_path, manifest, phantom_networks, capsys):
    bundle = write_bundle(tmp_path / "phantom_bundle", phantom_networks["one"]["onnx"])
    before = manifest.read_text(encoding="utf-8")
    assert main(import_args(manifest, bundle, SPHERE, extra=["--default"])) == 0
    assert "imported" in capsys.readouterr().out
    after = manifest.read_text(encoding="utf-8")
    assert after.startswith(before)  # every line kept, comments included; the family appended
    version = parse_manifest(manifest)["phantom"].versions["0.2"]
    assert parse_manifest(manifest)["phantom"].command == "get-phantom-volume"
    assert version.weights == manifest.parent / "phantom-0.2.onnx" and version.weights.is_file()
    version.verify()  # the copy hashes to the manifest's SHA-256
    declaration = version.declaration
    assert (declaration.framework, declaration.input.modality, declaration.preprocessing.orientation,
            declaration.preprocessing.spacing_mm) == ("onnx", "MR", "RAS", (1.5, 1.5, 1.5))
    assert declaration.preprocessing.intensity[0].source == (0, 1000)
    assert (declaration.inference.mode, declaration.inference.patch, declaration.inference.blend) == \
           ("sliding_window", (32, 32, 32), "gaussian")
    assert (declaration.postprocessing.activation, declaration.postprocessing.largest_component) == ("softmax", True)
    assert [(s.label, s.name, s.anatomy.value) for s in version.structures] == [(1, "Sphere", "91723000")]

    series, truth, _ = phantom.phantom_study(1)
    volume = load_volume(series)
    labels = DeclaredSegmenter.load(version).segment(volume.voxels.transpose(2, 1, 0), ras_affine(volume))
    assert np.count_nonzero(labels) / np.count_nonzero(truth) == pytest.approx(1, abs=0.05)


def test_a_torchscript_bundle_and_a_second_version_of_the_family(tmp_path, manifest, phantom_networks):
    first = write_bundle(tmp_path / "a", phantom_networks["one"]["onnx"])
    assert main(import_args(manifest, first, SPHERE)) == 0
    text = manifest.read_text(encoding="utf-8")
    second = write_bundle(tmp_path / "b", phantom_networks["one"]["torchscript"], name="model.ts")
    assert main(import_args(manifest, second, SPHERE, version="0.3", extra=["--default"])) == 0
    family = parse_manifest(manifest)["phantom"]
    assert list(family.versions) == ["0.2", "0.3"] and family.default_version == "0.3"
    assert family.versions["0.3"].declaration.framework == "torchscript"
    added = manifest.read_text(encoding="utf-8").splitlines()
    # as ``add`` does: the old lines kept, the default line changed, the version appended
    assert [line for line in added if line not in text.splitlines()][0] == "    default_version: '0.3'"


def refused(tmp_path: Path, manifest: Path, model: Path, config: dict, message: str, *structures: str,
            metadata: dict | None = None, name: str = "model.onnx") -> None:
    """Import must fail naming ``message``, leaving the manifest and the folder as they were."""
    bundle = write_bundle(tmp_path / f"hostile-{len(list(tmp_path.iterdir()))}", model, name=name, config=config,
                          metadata=metadata)
    before, files = manifest.read_text(encoding="utf-8"), sorted(manifest.parent.iterdir())
    from models.registry import import_bundle

    with pytest.raises(ManifestError, match=message):
        import_bundle(manifest, bundle, "phantom", "0.2", "get-phantom-volume", list(structures or [SPHERE]))
    assert manifest.read_text(encoding="utf-8") == before and sorted(manifest.parent.iterdir()) == files


def test_a_dollar_expression_in_a_section_is_refused_by_name(tmp_path, manifest, phantom_networks):
    config = inference_config()
    config["preprocessing"]["transforms"][4]["a_min"] = "$__import__('os').system('touch pwned') or -57"
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], config,
            r"preprocessing#transforms#4#a_min: .*is a Python expression \(\$\)")
    assert not Path("pwned").exists()


def test_a_reference_to_a_dollar_expression_is_refused(tmp_path, manifest, phantom_networks):
    config = inference_config()
    config["spacing"] = "$[1.5] * 3"
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], config, r"pixdim: '\$\[1.5\] \* 3' is a Python")


def test_lambdad_is_refused_by_name(tmp_path, manifest, phantom_networks):
    config = inference_config()
    config["preprocessing"]["transforms"].insert(3, {"_target_": "Lambdad", "keys": "image",
                                                     "func": "$lambda x: x * 2"})
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], config, "_target_ 'Lambdad' is not one the gateway")


def test_an_unknown_target_is_refused_by_name(tmp_path, manifest, phantom_networks):
    config = inference_config()
    config["postprocessing"]["transforms"].append({"_target_": "subprocess.check_output", "args": ["id"]})
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], config,
            "_target_ 'subprocess.check_output' is not one the gateway")
    config = inference_config()
    config["inferer"] = {"_target_": "monai.inferers.SaliencyInferer", "cam_name": "GradCAM"}
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], config, "SaliencyInferer")


def test_an_unsupported_argument_is_refused(tmp_path, manifest, phantom_networks):
    config = inference_config()
    config["preprocessing"]["transforms"][2]["labels"] = [["L", "R"]]
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], config, r"\(Orientationd\): argument 'labels'")


def test_a_missing_model_file_is_refused(tmp_path, manifest, phantom_networks):
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], inference_config(),
            "neither models/model.onnx nor models/model.ts", name="model.pt")


def test_a_channel_without_a_structure_is_refused(tmp_path, manifest, phantom_networks):
    metadata = json.loads(json.dumps(METADATA))
    metadata["network_data_format"]["outputs"]["pred"].update(num_channels=3,
                                                              channel_def={"0": "bg", "1": "sphere", "2": "rim"})
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], inference_config(),
            r"output channel 2 \(rim\) has no --structure", SPHERE, metadata=metadata)
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], inference_config(),
            "write CHANNEL=NAME:SCHEME:CODE:MEANING", "1=Sphere", metadata=metadata)
    refused(tmp_path, manifest, phantom_networks["one"]["onnx"], inference_config(),
            "--structure for channel 4", SPHERE, "2=Rim:SCT:1:Rim", "4=X:SCT:2:X", metadata=metadata)


def test_an_altered_model_file_is_never_loaded(tmp_path, manifest, phantom_networks):
    bundle = write_bundle(tmp_path / "b", phantom_networks["one"]["onnx"])
    assert main(import_args(manifest, bundle, SPHERE)) == 0
    copied = manifest.parent / "phantom-0.2.onnx"
    copied.write_bytes(copied.read_bytes()[:-16] + b"altered by hand!")
    registry = ModelRegistry.load(manifest)
    version = registry.family("phantom").versions["0.2"]
    loaded = []
    with pytest.raises(ModelUnavailable, match="have SHA-256 .* the manifest says"):
        registry.model(version, lambda v: loaded.append(v))
    assert loaded == []


def test_an_existing_version_or_another_command_is_refused(tmp_path, manifest, phantom_networks):
    bundle = write_bundle(tmp_path / "b", phantom_networks["one"]["onnx"])
    assert main(import_args(manifest, bundle, SPHERE)) == 0
    from models.registry import import_bundle

    with pytest.raises(ManifestError, match="phantom 0.2 exists already"):
        import_bundle(manifest, bundle, "phantom", "0.2", "get-phantom-volume", [SPHERE])
    with pytest.raises(ManifestError, match="served by get-phantom-volume, not get-other"):
        import_bundle(manifest, bundle, "phantom", "0.9", "get-other", [SPHERE])
    with pytest.raises(ManifestError, match="served by its own handler"):
        import_bundle(manifest, bundle, "hippocampus", "9.0", "get-hippocampus-volume", [SPHERE])


def test_add_creates_a_new_family_from_another_family_s_version(tmp_path, manifest, phantom_networks):
    bundle = write_bundle(tmp_path / "b", phantom_networks["one"]["onnx"])
    assert main(import_args(manifest, bundle, SPHERE)) == 0
    weights = manifest.parent / "sphere-large.onnx"
    shutil.copyfile(phantom_networks["one"]["onnx"], weights)
    base = ["--manifest", str(manifest), "add", "sphere", "1.0", "--weights", str(weights), "--like", "phantom/0.2"]
    assert main(base) == 1  # a declared template needs the new family's own command
    before = manifest.read_text(encoding="utf-8")
    assert main([*base, "--command", "get-sphere-volume"]) == 0
    assert manifest.read_text(encoding="utf-8").startswith(before)
    family = parse_manifest(manifest)["sphere"]
    assert (family.command, family.default_version, list(family.versions)) == ("get-sphere-volume", "1.0", ["1.0"])
    assert family.versions["1.0"].declaration == parse_manifest(manifest)["phantom"].versions["0.2"].declaration
    data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    assert set(data["families"]) == {"hippocampus", "phantom", "sphere"}
