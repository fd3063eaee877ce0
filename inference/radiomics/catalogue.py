"""The Radiomics API's model list, built from the model registry: a family per registry family that a
served handler runs on posted volumes, a ModelVersion per registry version.

A model id addresses one version: ``<family>-<version>`` (e.g. ``hippocampus-1.0-fast``), so a version
added with ``python -m models.registry add`` is listed, and runnable, with nothing configured twice.
The family's ``catalogue`` mapping in the manifest says what the protocol needs beyond the registry
(clinical domain, region, input channels and their constraints, body parts, gender).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from inference.radiomics.proto import Model_pb2 as M
from models.registry import ManifestError, ModelFamily, ModelRegistry, ModelVersion, Structure

#: ModelChannelConstraints.ModalityTypes, ModelConstraints.BodyPartExaminedType and GenderType by name.
MODALITIES = M.ModelChannelConstraints.ModalityTypes
BODY_PARTS = M.ModelConstraints.BodyPartExaminedType
GENDERS = M.ModelConstraints.GenderType


@dataclass(frozen=True)
class CatalogueModel:
    """One runnable model id: the registry version, the command that runs it, its input channel ids."""

    model_id: str
    version: ModelVersion
    command: str
    channel_ids: tuple[str, ...]
    language: str

    @property
    def processer_version(self) -> str:
        """``<MajorVersion>.<MinorVersion>``, as the protocol's ModelOutput carries it."""
        major, minor = version_numbers(self.version.version)
        return f"{major}.{minor}"

    def structure(self, index: int) -> M.Structure:
        """The protocol's Structure of the version's structure ``index`` (StructureID = its name)."""
        return structure_message(self.version.structures[index], self.channel_ids[0])


def structure_message(structure: Structure, channel_id: str) -> M.Structure:
    """A registry structure as the protocol's Structure: an organ, its StructureID its name."""
    message = M.Structure(Name=structure.name, Type=M.Structure.Organ, InputChannelID=channel_id,
                          StructureID=structure.name)
    message.Color.R, message.Color.G, message.Color.B = structure.color
    return message


def model_id(version: ModelVersion) -> str:
    """The protocol's ModelVersion.ID of a registry version."""
    return f"{version.family}-{version.version}"


def version_numbers(name: str) -> tuple[int, int]:
    """Major and minor of a version name (``1.0-fast`` -> 1, 0); 0, 0 when it starts with no number."""
    match = re.match(r"(\d+)(?:\.(\d+))?", name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else (0, 0)


class Catalogue:
    """The families and versions offered to Radiomics clients: those of ``registry`` that ``commands`` run."""

    def __init__(self, registry: ModelRegistry, commands: dict[str, str]) -> None:
        """``commands``: family -> the served command that runs it on posted volumes."""
        self.registry = registry
        self.commands = commands
        self.models: dict[str, CatalogueModel] = {}
        self.families: list[M.ModelFamily] = []
        for name, command in commands.items():
            family = registry.family(name)
            message = family_message(family)
            channel_ids = tuple(channel.ChannelID for channel in message.FamilyDescription.InputChannels)
            for version in family.versions.values():
                self.models[model_id(version)] = CatalogueModel(model_id(version), version, command, channel_ids,
                                                                message.LanguageCode)
            self.families.append(message)

    def collection(self) -> M.ModelsCollection:
        """The answer to ``GET /api/v2/Model/``."""
        return M.ModelsCollection(Models=self.families)

    def model(self, model_id: str) -> CatalogueModel | None:
        return self.models.get(model_id)


def family_message(family: ModelFamily) -> M.ModelFamily:
    """A registry family as the protocol's ModelFamily; ``ManifestError`` for a catalogue it cannot express."""
    spec = family.catalogue

    def names(values: Iterable[str], enum, what: str) -> list[int]:
        try:
            return [enum.Value(str(value)) for value in values]
        except ValueError:
            raise ManifestError(f"family {family.name}: catalogue {what} {list(values)} must be names of "
                                f"{enum.DESCRIPTOR.full_name}: {', '.join(enum.keys())}") from None

    language = str(spec.get("language", "en"))
    region, structure = str(spec.get("anatomical_region", "")), str(spec.get("primary_structure", family.name))
    domain, modalities = str(spec.get("clinical_domain", "")), str(spec.get("modalities", ""))
    display = " ".join(part for part in (domain, region, structure, modalities) if part)
    message = M.ModelFamily(CanonicalName=display, LanguageCode=language)
    description = message.FamilyDescription
    description.Name, description.Description = display, family.description
    description.ClinicalDomain, description.AnatomicalRegion = domain, region
    description.PrimaryStructure, description.Modalities = structure, modalities
    channels = spec.get("input_channels") or [{"id": "1"}]
    for channel in channels:
        constraints = description.InputChannels.add(ChannelID=str(channel["id"])).Constraints
        constraints.AcceptedModalities.extend(names(channel.get("modalities", []), MODALITIES, "modalities"))
        for target, pair, key in ((constraints.SpacingMinInMillimeters, "spacing_mm", "min"),
                                  (constraints.SpacingMaxInMillimeters, "spacing_mm", "max"),
                                  (constraints.DimensionsMinInPixels, "dimensions", "min"),
                                  (constraints.DimensionsMaxInPixels, "dimensions", "max")):
            if key in (channel.get(pair) or {}):
                target.X, target.Y, target.Z = (float(v) for v in channel[pair][key])
        constraints.OriginalDataRequired = bool(channel.get("original_data", False))
        constraints.IsAxial = bool(channel.get("axial", False))
    description.Constraints.BodyPartsExamined.extend(names(spec.get("body_parts", []), BODY_PARTS, "body_parts"))
    description.Constraints.Gender = names([spec.get("gender", "Any")], GENDERS, "gender")[0]
    channel_id = description.InputChannels[0].ChannelID
    for version in family.versions.values():
        major, minor = version_numbers(version.version)
        entry = message.ModelVersions.add(ID=model_id(version), VersionDescription=version.architecture,
                                          MajorVersion=major, MinorVersion=minor, LanguageCode=language)
        entry.CreatedOn.FromDatetime(datetime.fromisoformat(version.date).replace(tzinfo=UTC))
        entry.Structures.extend(structure_message(structure, channel_id) for structure in version.structures)
    ordered = sorted(message.ModelVersions, key=lambda v: (v.CreatedOn.seconds, v.ID))  # by CreatedOn
    del message.ModelVersions[:]
    message.ModelVersions.extend(ordered)
    return message
