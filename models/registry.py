"""The model registry: families of models, their versions and the structures each version segments.

The manifest (``models/manifest.yaml``, reviewed in git) lists families; each family has versions
(a weights file with its SHA-256, the network and inference settings, evaluation figures,
training data, date) and a default version. Weights are loaded only when their SHA-256 matches
the manifest, so every result can name the exact weights that produced it (``Provenance``).

    python -m models.registry list                 # families, versions, default marked
    python -m models.registry verify               # re-hash every weights file; exit 1 on a mismatch
    python -m models.registry add hippocampus 1.1 --weights W.pt --metrics W.metrics.json --like 1.0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from models.declared.schema import Declaration, parse_declaration

DEFAULT_MANIFEST = Path(__file__).resolve().parent / "manifest.yaml"
#: Keys every version must have; the rest (evaluation, notes) are optional.
VERSION_KEYS = ("weights", "sha256", "architecture", "framework", "input", "inference", "structures",
                "training_data", "date")
STRUCTURE_KEYS = ("name", "label", "color", "anatomy")
#: What a declared family's ``command:`` may be: an inference command name.
COMMAND_PATTERN = re.compile(r"[a-z][a-z0-9-]{1,62}")


class ManifestError(Exception):
    """The manifest cannot be used; the message names the file, the line and the fix."""


class UnknownModel(LookupError):
    """A family or version the manifest does not have; the message lists the available ones (a server answers
    it as the client's error, 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelUnavailable(RuntimeError):
    """A version that could not be loaded (a server answers 503: the server is fine, that model is not)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Structure:
    """One structure a version segments: its label value in the mask, display colour and coded meaning.

    ``anatomy`` is a SNOMED CT code (e.g. Hippocampus, SCT 5366008, DICOM CID 7140), ``modifier`` an
    optional anatomic modifier (CID 2, e.g. Anterior SCT 255549009).
    """

    name: str
    label: int
    color: tuple[int, int, int]
    anatomy: Code
    modifier: Code | None = None
    category: Code = codes.SCT.AnatomicalStructure

    def describe(self) -> dict:
        out = {"name": self.name, "label": self.label, "color": list(self.color), "anatomy": _code_json(self.anatomy)}
        if self.modifier is not None:
            out["modifier"] = _code_json(self.modifier)
        return out


def _code_json(code: Code) -> dict:
    return {"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}


@dataclass(frozen=True)
class Provenance:
    """Which weights made a result: family, version and the weights' SHA-256."""

    family: str
    version: str
    weights_sha256: str

    @property
    def short(self) -> str:
        return f"{self.family} {self.version} ({self.weights_sha256[:12]})"

    def as_json(self) -> dict:
        return {"family": self.family, "version": self.version, "weights_sha256": self.weights_sha256}


@dataclass(frozen=True)
class ModelVersion:
    """One version of a family, as the manifest describes it."""

    family: str
    version: str
    weights: Path
    sha256: str
    architecture: str
    framework: str
    input: dict
    inference: dict
    structures: tuple[Structure, ...]
    training_data: dict
    date: str
    evaluation: dict = field(default_factory=dict)
    line: int = 0
    #: What the version was validated on and its calibrated uncertainty threshold (``python -m models.calibrate``);
    #: empty when the manifest declares none (its results are then flagged, saying so).
    validated_input: dict = field(default_factory=dict)
    uncertainty: dict = field(default_factory=dict)
    #: The training split's histograms the served distributions are compared with (``models.monitoring``).
    drift_reference: Path | None = None
    #: How a version of a declared family (one with a ``command:``) is run (``models.declared``), and why it
    #: cannot be when its declaration is broken (the version is then listed as unavailable).
    declaration: Declaration | None = None
    problem: str | None = None

    @property
    def provenance(self) -> Provenance:
        return Provenance(self.family, self.version, self.sha256)

    def verify(self) -> None:
        """Raise ``ManifestError`` unless the weights file exists and hashes to the manifest's SHA-256."""
        if not self.weights.is_file():
            raise ManifestError(f"{self.family} {self.version}: weights file {self.weights.name} is missing")
        actual = file_sha256(self.weights)
        if actual != self.sha256:
            raise ManifestError(f"{self.family} {self.version}: weights {self.weights.name} have SHA-256 "
                                f"{actual[:12]}..., the manifest says {self.sha256[:12]}...; the file is corrupt or "
                                "was replaced: restore it, or register the new file as a new version "
                                "(python -m models.registry add)")

    def describe(self) -> dict:
        """The version as JSON, for ``GET /models``."""
        return {
            "version": self.version, "weights": self.weights.name, "weights_sha256": self.sha256,
            "architecture": self.architecture, "framework": self.framework, "input": self.input,
            "inference": self.inference, "training_data": self.training_data, "date": self.date,
            "evaluation": self.evaluation,
            "structures": [s.describe() for s in self.structures],
            "validated_input": self.validated_input, "uncertainty": self.uncertainty,
            **({"declaration": asdict(self.declaration)} if self.declaration is not None else {}),
        }


@dataclass(frozen=True)
class ModelFamily:
    """A family: versions by name and the default one."""

    name: str
    description: str
    default_version: str
    versions: dict[str, ModelVersion]
    catalogue: dict = field(default_factory=dict)  # what other protocols' model lists say of it (Radiomics API)
    command: str | None = None  # the inference command serving a declared family (``handlers.declared``)

    def resolve(self, version: str | None) -> ModelVersion:
        """The version named (the default when ``None``); ``UnknownModel`` listing the available ones otherwise."""
        name = self.default_version if version is None else version
        if not isinstance(name, str):
            raise UnknownModel(f"model_version must be a string naming a version, got the {type(name).__name__} "
                               f"{json.dumps(name)}: send it quoted, e.g. \"{self.default_version}\"; available: "
                               f"{', '.join(self.versions)} (default {self.default_version})")
        if name not in self.versions:
            raise UnknownModel(f"unknown model_version {version!r} of {self.name}; available: "
                               f"{', '.join(self.versions)} (default {self.default_version})")
        return self.versions[name]

    def describe(self, failures: dict[tuple[str, str], str] | None = None) -> dict:
        failures = failures or {}
        versions = []
        for name, version in self.versions.items():
            entry = {**version.describe(), "default": name == self.default_version}
            if (self.name, name) in failures:
                entry["unavailable"] = failures[(self.name, name)]
            versions.append(entry)
        return {"family": self.name, "description": self.description, "default_version": self.default_version,
                "catalogue": self.catalogue, "command": self.command, "versions": versions}


class ModelRegistry:
    """The manifest's families, and the models loaded from it (each verified once, then cached)."""

    def __init__(self, path: Path, families: dict[str, ModelFamily]) -> None:
        self.path = path
        self.families = families
        self._models: dict[tuple[str, str], Any] = {}
        self._failures: dict[tuple[str, str], str] = {
            (family.name, version.version): version.problem
            for family in families.values() for version in family.versions.values() if version.problem}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path = DEFAULT_MANIFEST) -> ModelRegistry:
        """Parse the manifest; ``ManifestError`` naming the line and the fix when it is unusable."""
        path = Path(path)
        return cls(path, parse_manifest(path))

    def family(self, name: str) -> ModelFamily:
        try:
            return self.families[name]
        except KeyError:
            raise UnknownModel(f"unknown model family {name!r}; families: {', '.join(self.families)}") from None

    def model(self, version: ModelVersion, loader: Callable[[ModelVersion], Any]) -> Any:
        """The loaded model of ``version`` (``loader(version)`` once, after verifying the weights)."""
        key = (version.family, version.version)
        with self._lock:
            if key in self._models:
                return self._models[key]
            if key in self._failures:
                raise ModelUnavailable(f"model {version.family} {version.version} is unavailable: "
                                       f"{self._failures[key]}")
            try:
                version.verify()
                self._models[key] = loader(version)
            except Exception as exc:
                self._failures[key] = str(exc) if isinstance(exc, ManifestError) else f"{type(exc).__name__}: {exc}"
                raise ModelUnavailable(f"model {version.family} {version.version} is unavailable: "
                                       f"{self._failures[key]}") from exc
            return self._models[key]

    def load_family(self, name: str, loader: Callable[[ModelVersion], Any]) -> dict[str, str]:
        """Load every version of a family; ``{version: why}`` for those that failed (the others serve)."""
        failed = {}
        for version in self.family(name).versions.values():
            try:
                self.model(version, loader)
            except ModelUnavailable:
                failed[version.version] = self._failures[(name, version.version)]
        return failed

    @property
    def failures(self) -> dict[tuple[str, str], str]:
        return dict(self._failures)

    def describe(self) -> list[dict]:
        return [family.describe(self._failures) for family in self.families.values()]


_registries: dict[Path, ModelRegistry] = {}
_registries_lock = threading.Lock()


def registry_for(path: str | Path) -> ModelRegistry:
    """The process's registry of manifest ``path`` (parsed once, so its loaded models are shared)."""
    path = Path(path).resolve()
    with _registries_lock:
        if path not in _registries:
            _registries[path] = ModelRegistry.load(path)
        return _registries[path]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- the manifest ----------------------------------------------------------------------------------
class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping (as ``__line__``) for error messages."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def parse_manifest(path: Path) -> dict[str, ModelFamily]:
    """Families from the manifest at ``path``; ``ManifestError`` naming the line and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot read the model manifest {path}: {exc.strerror}; set INFERENCE_MODEL_MANIFEST "
                            "to the manifest's path") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise ManifestError(f"{path.name}, {where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the "
                            "indentation or quoting there") from None

    def fail(line: int, message: str) -> ManifestError:
        return ManifestError(f"{path.name}, line {line}: {message}")

    if not isinstance(data, dict) or not isinstance(data.get("families"), dict):
        raise fail(1, "the manifest must be a mapping with 'families:' (family name -> family)")
    families = {}
    for name, family in _items(data["families"]):
        if not isinstance(family, dict) or not isinstance(family.get("versions"), dict):
            raise fail(_line(family, data["families"]), f"family {name!r} needs 'versions:' (version -> settings)")
        command = family.get("command")
        if command is not None and not (isinstance(command, str) and COMMAND_PATTERN.fullmatch(command)):
            raise fail(family["__line__"], f"family {name!r}: command must be an inference command name (lower-case "
                                           f"letters, digits and dashes, e.g. get-spleen-volume), got {command!r}")
        versions = {str(v): _parse_version(path, str(name), str(v), spec, fail, declared=command is not None)
                    for v, spec in _items(family["versions"])}
        default = str(family.get("default_version", ""))
        if default not in versions:
            raise fail(family["__line__"], f"family {name!r}: default_version {default!r} is not one of its "
                                           f"versions ({', '.join(versions)}); set it to one of them")
        if versions[default].problem:
            raise fail(versions[default].line, f"{name} {default} (the default version) cannot be served: "
                                                f"{versions[default].problem}")
        catalogue = family.get("catalogue") or {}
        if not isinstance(catalogue, dict):
            raise fail(family["__line__"], f"family {name!r}: catalogue must be a mapping (see the hippocampus family)")
        families[str(name)] = ModelFamily(str(name), str(family.get("description", "")), default, versions,
                                          _plain(catalogue), command)
    return families


def _items(mapping: dict):
    return [(key, value) for key, value in mapping.items() if key != "__line__"]


def _line(value: Any, parent: dict) -> int:
    return value.get("__line__", parent["__line__"]) if isinstance(value, dict) else parent["__line__"]


def _plain(value: Any) -> Any:
    """``value`` without the loader's ``__line__`` keys."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _parse_version(path: Path, family: str, name: str, spec: Any, fail, declared: bool = False) -> ModelVersion:
    if not isinstance(spec, dict):
        raise fail(1, f"{family} {name}: a version must be a mapping of {', '.join(VERSION_KEYS)}")
    line = spec["__line__"]
    missing = [key for key in VERSION_KEYS if key not in spec]
    if missing:
        raise fail(line, f"{family} {name}: missing {', '.join(missing)}; "
                         f"every version needs {', '.join(VERSION_KEYS)}")
    weights = (path.parent / str(spec["weights"])).resolve()
    if not weights.is_file():
        raise fail(line, f"{family} {name}: weights file {spec['weights']!r} does not exist next to the manifest; "
                         "put the file there or correct the path (relative to the manifest)")
    sha = str(spec["sha256"])
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise fail(line, f"{family} {name}: sha256 must be 64 lowercase hex digits; compute it with "
                         f"'sha256sum {spec['weights']}'")
    structures = tuple(_parse_structure(family, name, s, fail, line) for s in spec["structures"] or [])
    labels = [s.label for s in structures]
    if not structures or len(set(labels)) != len(labels):
        raise fail(line, f"{family} {name}: structures must be a non-empty list with unique label values")
    declaration, problem = None, None
    if declared:
        declaration, problems = parse_declaration(spec)
        if problems:
            problem = f"line {line}: " + "; ".join(problems)
    return ModelVersion(family, name, weights, sha, str(spec["architecture"]), str(spec["framework"]),
                        _plain(spec["input"]), _plain(spec["inference"]), structures,
                        _plain(spec["training_data"]), str(spec["date"]), _plain(spec.get("evaluation") or {}), line,
                        _plain(spec.get("validated_input") or {}), _plain(spec.get("uncertainty") or {}),
                        (path.parent / str(spec["drift_reference"])).resolve() if spec.get("drift_reference") else None,
                        declaration, problem)


def _parse_code(value: Any) -> Code:
    return Code(str(value["value"]), str(value["scheme"]), str(value["meaning"]))  # value, scheme designator, meaning


def _parse_structure(family: str, version: str, spec: Any, fail, line: int) -> Structure:
    where = _line(spec, {"__line__": line})
    if not isinstance(spec, dict) or any(key not in spec for key in STRUCTURE_KEYS):
        raise fail(where, f"{family} {version}: each structure needs {', '.join(STRUCTURE_KEYS)}")
    try:
        color = tuple(int(c) for c in spec["color"])
        anatomy = _parse_code(spec["anatomy"])
        modifier = _parse_code(spec["modifier"]) if spec.get("modifier") else None
        category = _parse_code(spec["category"]) if spec.get("category") else Structure.category
    except (KeyError, TypeError, ValueError):
        raise fail(where, f"{family} {version}: structure {spec.get('name')!r}: color is [r, g, b] and anatomy, "
                          "modifier and category are codes with value, scheme and meaning") from None
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
        raise fail(where, f"{family} {version}: structure {spec['name']!r}: color must be [r, g, b] in 0..255")
    return Structure(str(spec["name"]), int(spec["label"]), color, anatomy, modifier, category)


# -- command line -----------------------------------------------------------------------------------
def add_version(manifest: Path, family: str, version: str, weights: Path, metrics: Path | None,
                like: str | None, make_default: bool = False, command: str | None = None) -> dict:
    """Register ``weights`` as a new version of ``family`` in ``manifest``; refuses an existing version.

    ``like`` names the version whose settings are copied: one of the family's, or ``FAMILY/VERSION``
    of another family, which a new family needs (created with ``command`` when it is a declared one).
    """
    families = parse_manifest(manifest)
    if family in families and version in families[family].versions:
        raise ManifestError(f"{family} {version} exists already; versions are never overwritten: choose a new "
                            "version name")
    source_family, _, source_version = (like or "").rpartition("/")
    source_family = source_family or family
    if source_family not in families:
        raise ManifestError(f"no family {source_family!r} in {manifest.name} (families: {', '.join(families)}); "
                            "for a new family name the version to copy settings from as --like FAMILY/VERSION")
    source = families[source_family]
    if (source_version or source.default_version) not in source.versions:
        raise ManifestError(f"--like {like}: {source_family} has no version {source_version!r}; versions: "
                            f"{', '.join(source.versions)}")
    template = source.versions[source_version or source.default_version]
    data = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    # a deep copy: shared blocks would be written as YAML anchors and aliases (&id001 / *id001)
    entry = copy.deepcopy(data["families"][source_family]["versions"][template.version])
    try:
        entry["weights"] = weights.resolve().relative_to(manifest.parent.resolve()).as_posix()
    except ValueError:
        raise ManifestError(f"{weights} must lie in {manifest.parent} (the manifest's folder) to be served") from None
    entry["sha256"] = file_sha256(weights)
    entry["date"] = date.today().isoformat()
    if metrics is not None:
        figures = json.loads(metrics.read_text(encoding="utf-8"))
        test = figures.get("test") or {}
        entry["evaluation"] = {key: round(float(test[key]), 4)
                               for key in ("mean_dice", "dice_anterior", "dice_posterior") if key in test}
        if "n" in test:
            entry["evaluation"]["n"] = int(test["n"])
        entry["evaluation"]["metrics_file"] = metrics.name
    text = manifest.read_text(encoding="utf-8")
    if family not in families:
        if source.command is not None and command is None:
            raise ManifestError(f"the new family {family} copies the declared {source_family}: give it its own "
                                "--command (the inference command that will serve it)")
        text = _with_family(text, family, source.description, command, version)
    _write_checked(manifest, _with_version(text, family, version, entry, make_default), family, version)
    return entry


def _write_checked(manifest: Path, text: str, family: str, version: str) -> None:
    """Write ``text`` as the manifest if it loads with ``family`` ``version`` usable; else keep the old one."""
    before = manifest.read_text(encoding="utf-8")
    manifest.write_text(text, encoding="utf-8")
    try:
        written = parse_manifest(manifest)[family].versions[version]
        if written.problem:
            raise ManifestError(f"{family} {version} would not be servable: {written.problem}")
    except ManifestError:
        manifest.write_text(before, encoding="utf-8")
        raise


def _with_family(text: str, family: str, description: str, command: str | None, default: str) -> str:
    """The manifest ``text`` with a new, empty ``family`` appended (its versions follow with ``_with_version``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", family):
        raise ManifestError(f"family name {family!r}: use lower-case letters, digits, '-' and '_'")
    if command is not None and not COMMAND_PATTERN.fullmatch(command):
        raise ManifestError(f"--command {command!r} must be an inference command name (lower-case letters, digits "
                            "and dashes, e.g. get-spleen-volume)")
    block = {family: {"description": description, **({"command": command} if command else {}),
                      "default_version": default, "versions": {}}}
    dumped = yaml.safe_dump(block, sort_keys=False, allow_unicode=True, width=110).replace("versions: {}", "versions:")
    return text.rstrip("\n") + "\n" + "".join("  " + line + "\n" for line in dumped.splitlines())


def import_bundle(manifest: Path, bundle_dir: Path, family: str, version: str, command: str,
                  structures: Sequence[str], make_default: bool = False) -> dict:
    """Declare the MONAI bundle at ``bundle_dir`` as ``family`` ``version`` (served by ``command``), read as data.

    ``structures`` are ``CHANNEL=NAME:SCHEME:CODE:MEANING``, one per output channel that is a structure.
    The bundle's network file is copied next to the manifest and registered with its SHA-256.
    """
    import shutil

    from models.declared.bundle import BundleError, read_bundle

    families = parse_manifest(manifest)
    if family in families and version in families[family].versions:
        raise ManifestError(f"{family} {version} exists already; versions are never overwritten: choose a new "
                            "version name")
    if family in families and families[family].command != command:
        raise ManifestError(f"family {family} is served by {families[family].command or 'its own handler'}, not "
                            f"{command}; give the same --command or another family")
    try:
        bundle = read_bundle(bundle_dir)
    except BundleError as exc:
        raise ManifestError(f"bundle {bundle_dir}: {exc}") from None
    parsed = [_structure_argument(text, bundle.threshold) for text in structures]
    channels = bundle.channels
    first = 0 if bundle.threshold else 1  # argmax: channel 0 is the background
    wanted = range(first, channels) if channels else sorted({channel for channel, _ in parsed})
    given = dict(parsed)
    if len(given) != len(parsed):
        raise ManifestError("a channel is given twice with --structure")
    missing = [c for c in wanted if c not in given]
    if missing or not given:
        names = ", ".join(f"{c} ({bundle.channel_names.get(c, 'unnamed')})" for c in missing) or "any"
        raise ManifestError(f"output channel {names} has no --structure CHANNEL=NAME:SCHEME:CODE:MEANING; "
                            "give one per channel that is a structure; nothing was imported")
    extra = [c for c in given if channels and not first <= c < channels]
    if extra:
        raise ManifestError(f"--structure for channel {extra[0]}, but the network has channels {first}.."
                            f"{channels - 1} that are structures (metadata.json num_channels {channels})")
    suffix = ".onnx" if bundle.framework == "onnx" else ".ts"
    weights = manifest.parent / (re.sub(r"[^A-Za-z0-9._-]", "_", f"{family}-{version}") + suffix)
    if weights.exists() and file_sha256(weights) != file_sha256(bundle.model):
        raise ManifestError(f"{weights.name} exists next to the manifest with other contents; remove it or choose "
                            "another version")
    shutil.copyfile(bundle.model, weights)
    meta = bundle.metadata
    entry = {
        "weights": weights.name, "sha256": file_sha256(weights),
        "architecture": str(meta.get("name") or meta.get("task") or bundle_dir.name),
        "framework": bundle.framework,
        **bundle.declaration,
        "structures": [given[c] for c in sorted(given)],
        "training_data": {key: str(meta[k]) for key, k in (("name", "data_source"), ("licence", "data_license"),
                                                             ("description", "description")) if meta.get(k)},
        "date": date.today().isoformat(),
        "imported_from": {"bundle": bundle_dir.name, "version": str(meta.get("version", "")),
                          **{k: str(meta[k]) for k in ("monai_version", "authors", "copyright") if meta.get(k)}},
    }
    text = manifest.read_text(encoding="utf-8")
    if family not in families:
        text = _with_family(text, family, str(meta.get("description") or meta.get("name") or family), command,
                            version)
    try:
        _write_checked(manifest, _with_version(text, family, version, entry, make_default), family, version)
    except ManifestError:
        weights.unlink(missing_ok=True)
        raise
    return entry


#: Colours given to imported structures, in channel order.
PALETTE = ((230, 80, 60), (60, 160, 230), (240, 200, 60), (120, 220, 120), (200, 120, 240), (240, 140, 40),
           (80, 220, 220), (220, 90, 170))


def _structure_argument(text: str, threshold: bool) -> tuple[int, dict]:
    """``CHANNEL=NAME:SCHEME:CODE:MEANING`` as (channel, manifest structure); the label is the channel (argmax)
    or the channel + 1 (thresholds)."""
    channel, _, rest = text.partition("=")
    parts = rest.split(":", 3)
    if not channel.strip().isdigit() or len(parts) != 4 or not all(p.strip() for p in parts):
        raise ManifestError(f"--structure {text!r}: write CHANNEL=NAME:SCHEME:CODE:MEANING, e.g. "
                            "1=Spleen:SCT:78961009:Spleen")
    name, scheme, code, meaning = (p.strip() for p in parts)
    label = int(channel) + (1 if threshold else 0)
    return int(channel), {"name": name, "label": label, "color": list(PALETTE[(label - 1) % len(PALETTE)]),
                          "anatomy": {"value": code, "scheme": scheme, "meaning": meaning}}


def _with_version(text: str, family: str, version: str, entry: dict, make_default: bool) -> str:
    """The manifest ``text`` with ``entry`` appended to ``family``'s versions, comments and layout kept.

    The manifest's own layout (families at 2 spaces, their keys at 4, versions at 6) is what this
    relies on; ``add_version`` parses the result, so a manifest laid out otherwise fails loudly.
    """
    lines = text.splitlines()
    family_at = next((i for i, line in enumerate(lines) if line.rstrip() == f"  {family}:"), None)
    if family_at is None:
        raise ManifestError(f"family {family!r} is not laid out as '  {family}:' in the manifest; "
                            "add the version by hand")
    family_end = next((i for i in range(family_at + 1, len(lines))
                       if lines[i].strip() and not lines[i].startswith("   ")), len(lines))
    versions_at = next((i for i in range(family_at + 1, family_end) if lines[i].rstrip() == "    versions:"), None)
    if versions_at is None:
        raise ManifestError(f"{family} has no '    versions:' line in the manifest; add the version by hand")
    end = next((i for i in range(versions_at + 1, family_end)
                if lines[i].strip() and not lines[i].startswith("     ")), family_end)
    while end > versions_at + 1 and not lines[end - 1].strip():
        end -= 1
    dumped = yaml.safe_dump({version: entry}, sort_keys=False, allow_unicode=True, width=110, default_flow_style=None)
    block = ["      " + line if line else line for line in dumped.splitlines()]
    lines[end:end] = block
    if make_default:
        for i in range(family_at + 1, versions_at):
            if lines[i].startswith("    default_version:"):
                lines[i] = f"    default_version: {yaml.safe_dump(version).splitlines()[0]}"
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.registry", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List, verify and add model versions of the manifest.",
        epilog="examples:\n  python -m models.registry list\n  python -m models.registry verify\n"
               "  python -m models.registry add hippocampus 1.1 --weights models/new.pt "
               "--metrics models/new.metrics.json --like 1.0")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help="the manifest (default: models/manifest.yaml)")
    commands = parser.add_subparsers(dest="action", required=True)
    commands.add_parser("list", help="families and versions, the default marked with *")
    commands.add_parser("verify", help="re-hash every weights file; exit 1 on any mismatch")
    add = commands.add_parser("add", help="register a new version from a weights file (never overwrites)")
    add.add_argument("family", help="the family, e.g. hippocampus")
    add.add_argument("version", help="the new version's name, e.g. 1.1")
    add.add_argument("--weights", type=Path, required=True, help="the weights file, inside models/")
    add.add_argument("--metrics", type=Path, help="its metrics JSON (models.train_hippocampus writes one)")
    add.add_argument("--like", help="copy the other settings from this version (default: the family's default); "
                                    "FAMILY/VERSION for another family's, as a new family needs")
    add.add_argument("--default", action="store_true", help="make the new version the family's default")
    add.add_argument("--command", dest="command_name", help="a new declared family's inference command")
    bundle = commands.add_parser("import-bundle", help="declare a MONAI bundle's network as a version (its configs "
                                                       "read as data, never executed)")
    bundle.add_argument("bundle", type=Path, help="the bundle's folder (configs/, models/model.onnx or model.ts)")
    bundle.add_argument("--family", required=True, help="the family, new or declared already")
    bundle.add_argument("--version", required=True, help="the new version's name")
    bundle.add_argument("--command", dest="command_name", required=True,
                        help="the inference command serving the family")
    bundle.add_argument("--structure", action="append", default=[], metavar="CHANNEL=NAME:SCHEME:CODE:MEANING",
                        help="one per output channel that is a structure, e.g. 1=Spleen:SCT:78961009:Spleen")
    bundle.add_argument("--default", action="store_true", help="make the new version the family's default")
    args = parser.parse_args(argv)
    try:
        if args.action == "add":
            entry = add_version(args.manifest, args.family, args.version, args.weights, args.metrics, args.like,
                                args.default, args.command_name)
            print(f"added {args.family} {args.version}: {entry['weights']} sha256 {entry['sha256']}")
            return 0
        if args.action == "import-bundle":
            entry = import_bundle(args.manifest, args.bundle, args.family, args.version, args.command_name,
                                  args.structure, args.default)
            print(f"imported {args.bundle} as {args.family} {args.version}: {entry['weights']} sha256 "
                  f"{entry['sha256']}, served by {args.command_name}")
            return 0
        families = parse_manifest(args.manifest)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    status = 0
    for family in families.values():
        for version in family.versions.values():
            mark = "*" if version.version == family.default_version else " "
            line = f"{mark} {family.name} {version.version:<12} {version.weights.name} {version.sha256[:12]}"
            if args.action == "verify":
                try:
                    version.verify()
                    line += "  OK"
                except ManifestError as exc:
                    line += f"  MISMATCH: {exc}"
                    status = 1
            else:
                dice = version.evaluation.get("mean_dice")
                line += f"  {version.architecture}" + (f", test Dice {dice}" if dice is not None else "")
            print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
