"""The Radiomics API's wire: our .proto files give the reference's bytes, and the committed modules match them.

The example values and their lengths and SHA-256 are the fact sheet's (SEGINT-API.md, section 10):
re-encoding them with our schema must give the reference's files byte for byte.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from inference.radiomics.proto import Model_pb2 as M

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = PROJECT_ROOT / "inference" / "radiomics" / "proto"


def example_model_family() -> M.ModelFamily:
    """The sheet's example ModelFamily ("Centered Square"), built from its listed values."""
    family = M.ModelFamily(CanonicalName="Centered Square", LanguageCode="en")
    description = family.FamilyDescription
    description.Name = "Centered Square Mock Models"
    description.Description = "Mock models that generate a centered square in axial view"
    description.ClinicalDomain, description.AnatomicalRegion = "IO", "THORAX"
    description.PrimaryStructure, description.Modalities = "Liver", "CT"
    constraints = description.InputChannels.add(ChannelID="1").Constraints
    constraints.AcceptedModalities.append(M.ModelChannelConstraints.CT)
    for vector in (constraints.SpacingMinInMillimeters, constraints.SpacingMaxInMillimeters):
        vector.X, vector.Y, vector.Z = 0.7, 0.7, 1.0
    for vector in (constraints.DimensionsMinInPixels, constraints.DimensionsMaxInPixels):
        vector.X, vector.Y, vector.Z = 1.0, 1.0, 1.0
    constraints.OriginalDataRequired = constraints.IsAxial = True
    description.Constraints.BodyPartsExamined.append(M.ModelConstraints.Abdomen)
    description.Constraints.Gender = M.ModelConstraints.Any
    version = family.ModelVersions.add(
        ID="Centered Orange Square", VersionDescription="Centered orange square for mock segmentation for a liver",
        MinorVersion=1, LanguageCode="en")
    version.CreatedOn.seconds = 1595947330
    structure = version.Structures.add(Name="liver", Type=M.Structure.Organ, FMACode=4567, InputChannelID="1",
                                       StructureID="1")
    structure.Color.R, structure.Color.G = 255, 120
    return family


def example_feedback() -> M.SegmentationFeedback:
    feedback = M.SegmentationFeedback(SegmentationID="Test Seg ID", SegmentationAccepted=True,
                                      GeneralComments="Test General Comments")
    feedback.ClientInformation.SoftwareVersion = "1.0.0"
    feedback.GeneralScore.Value = 0.45
    for structure, comments, score in (("Structure 1", "Structure 1 comments", 0.41),
                                       ("Structure 2", "Structure 2 comments", 0.49)):
        feedback.StructureComments.add(StructureID=structure, Comments=comments).Score.Value = score
    return feedback


def example_telemetry() -> M.SegmentationTelemetry:
    telemetry = M.SegmentationTelemetry(UploadTimeInMilliseconds=1000, SegmentationWaitInMilliseconds=2000,
                                        SegmentationDownloadInMilliseconds=3000, ModelID="Centered Orange Square",
                                        SegmentationID="Test", ClientErrorInformation="None")
    telemetry.ClientInformation.SoftwareVersion = "1.0.0 Research"
    return telemetry


@pytest.mark.parametrize(("build", "length", "sha256"), [
    (example_model_family, 398, "583f680319946e1c8f9da36bbe76e673c48fcd9e962dcfa3fd233e4aa20fab71"),
    (lambda: M.ModelsCollection(Models=[example_model_family()]), 401,
     "65470ae740b26f08b404c38568b74152518aa417a24861ec718c4534866b0831"),
    (example_feedback, 154, "e529f2bf5bb5e1eff132a4e84795fcb018a99bf833f8dac46c604da9ab6c84ce"),
    (example_telemetry, 63, "2033edd02de9abee1987d4d2a9080456b498078ba7e9d543b3b0e2f17142cca5"),
], ids=["ModelFamily", "ModelsCollection", "SegmentationFeedback", "SegmentationTelemetry"])
def test_the_sheets_examples_encode_to_the_reference_bytes(build, length, sha256):
    encoded = build().SerializeToString()
    assert (len(encoded), hashlib.sha256(encoded).hexdigest()) == (length, sha256)


def test_small_messages_have_the_sheets_bytes():
    """SegmentationProgress at 100 is 08 64 and at 0 is empty; packed enums are written packed."""
    assert M.SegmentationProgress(Progress=100).SerializeToString() == b"\x08\x64"
    assert M.SegmentationProgress(Progress=0).SerializeToString() == b""
    packed = M.ModelConstraints(BodyPartsExamined=[M.ModelConstraints.Abdomen]).SerializeToString()
    assert packed == b"\x0a\x01\x00"
    assert M.ModelConstraints.FromString(b"\x08\x00\x08\x08").BodyPartsExamined == [0, 8]  # unpacked also read


def test_the_committed_modules_match_the_proto_files(tmp_path):
    """Regenerating with the pinned protoc (grpcio-tools) gives the committed *_pb2.py byte for byte."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (requirements-dev.txt) regenerates the modules")
    protos = sorted(PROTO_DIR.glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(PROJECT_ROOT), f"--python_out={tmp_path}",
                    *[str(p.relative_to(PROJECT_ROOT)) for p in protos]], check=True, cwd=PROJECT_ROOT)
    for proto in protos:
        generated = tmp_path / proto.relative_to(PROJECT_ROOT).with_name(proto.stem + "_pb2.py")
        committed = proto.with_name(proto.stem + "_pb2.py")
        assert generated.read_bytes() == committed.read_bytes(), f"{committed.name} is stale: run make proto"
