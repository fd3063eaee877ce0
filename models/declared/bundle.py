"""A MONAI bundle read as a declaration: its configs are data here, never code.

``configs/metadata.json`` and ``configs/inference.json`` (or .yaml) are parsed; only the
``preprocessing``, ``inferer`` and ``postprocessing`` entries are read, ``@`` references (and ``%``
macros into the bundle's own config files) resolved as data. Nothing is instantiated and nothing
evaluated: a ``$`` expression, a Lambdad or any ``_target_`` off the whitelist inside those entries
is refused, naming it. The I/O transforms (loading, channel-first, typing, inverting, saving) are
what the runner does anyway. The rest of the file (imports, datalist, device, network, evaluator)
is never looked at. The network comes from ``models/model.onnx`` or ``models/model.ts``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: Transforms the runner performs itself whatever their arguments say (read from the image, back to its grid).
IO_TRANSFORMS = ("LoadImaged", "EnsureChannelFirstd", "EnsureTyped", "Invertd", "SaveImaged")
#: Per whitelisted target, the arguments it understands; ``HARMLESS`` ones are accepted and ignored.
WHITELIST: dict[str, tuple[str, ...]] = {
    "Orientationd": ("axcodes",),
    "Spacingd": ("pixdim", "mode"),
    "ScaleIntensityRanged": ("a_min", "a_max", "b_min", "b_max", "clip"),
    "ScaleIntensityd": ("minv", "maxv"),
    "NormalizeIntensityd": ("nonzero", "channel_wise"),
    "ScaleIntensityRangePercentilesd": ("lower", "upper", "b_min", "b_max", "clip", "relative"),
    "CropForegroundd": ("source_key", "margin", "allow_smaller"),
    "SimpleInferer": (),
    "SlidingWindowInferer": ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale"),
    "Activationsd": ("softmax", "sigmoid"),
    "AsDiscreted": ("argmax", "threshold", "to_onehot"),
    "KeepLargestConnectedComponentd": ("independent",),
}
HARMLESS = ("keys", "allow_missing_keys", "dtype", "meta_keys", "meta_key_postfix", "image_only", "align_corners",
            "padding_mode", "device", "sw_device", "progress", "cache_roi_weight_map")
SECTIONS = ("preprocessing", "inferer", "postprocessing")


class BundleError(ValueError):
    """The bundle cannot be imported; the message names the file, the entry and why."""


@dataclass(frozen=True)
class Bundle:
    """What was read: the declaration's blocks, the model file and its format, the metadata's words."""

    declaration: dict  # framework, input, preprocessing, inference, postprocessing (the manifest's keys)
    model: Path
    framework: str
    channels: int | None  # the output channels metadata.json declares
    channel_names: dict[int, str]
    metadata: dict
    threshold: bool  # labels from thresholds (channel c is label c + 1) rather than argmax (channel c is label c)


def read_bundle(root: Path) -> Bundle:
    """The declaration of the bundle at ``root``; ``BundleError`` naming what is missing or refused."""
    root = Path(root)
    metadata = _load(_config(root, "metadata"), "metadata")
    inference_path = _config(root, "inference")
    config = _load(inference_path, "inference")
    reader = _Reader(root, config, inference_path.name)
    transforms = {section: reader.section(section) for section in SECTIONS}
    declaration, threshold = _declaration(transforms, inference_path.name)
    model, framework = _model_file(root)
    declaration["framework"] = framework
    modality = _modality(metadata)
    declaration["input"] = {"modality": modality} if modality else {}
    pred = ((metadata.get("network_data_format") or {}).get("outputs") or {}).get("pred") or {}
    channels = pred.get("num_channels")
    names = {int(k): str(v) for k, v in (pred.get("channel_def") or {}).items() if str(k).isdigit()}
    return Bundle(declaration, model, framework, int(channels) if isinstance(channels, int) else None, names,
                  metadata, threshold)


def _config(root: Path, name: str) -> Path:
    for suffix in (".json", ".yaml", ".yml"):
        path = root / "configs" / f"{name}{suffix}"
        if path.is_file():
            return path
    raise BundleError(f"{root.name}: no configs/{name}.json (or .yaml): is this a MONAI bundle folder?")


def _load(path: Path, what: str) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise BundleError(f"configs/{path.name}: cannot be read as {'JSON' if path.suffix == '.json' else 'YAML'} "
                          f"({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"configs/{path.name}: the {what} config must be a mapping")
    return data


def _model_file(root: Path) -> tuple[Path, str]:
    for name, framework in (("model.onnx", "onnx"), ("model.ts", "torchscript")):
        path = root / "models" / name
        if path.is_file():
            return path, framework
    raise BundleError(f"{root.name}: neither models/model.onnx nor models/model.ts is there; the gateway runs an "
                      "exported network (export it with 'python -m monai.bundle ckpt_export' or torch.onnx), "
                      "never models/model.pt with the bundle's network code")


def _modality(metadata: dict) -> str | None:
    image = ((metadata.get("network_data_format") or {}).get("inputs") or {}).get("image") or {}
    modality = str(image.get("modality", "")).upper()
    return {"MRI": "MR"}.get(modality, modality) if modality in ("CT", "MR", "MRI", "PT", "US") else None


class _Reader:
    """Reads entries of a bundle config as data: ``@`` references and ``%`` macros resolved, ``$`` refused."""

    def __init__(self, root: Path, config: dict, name: str) -> None:
        self.root, self.config, self.name = root, config, name

    def section(self, section: str) -> list[tuple[str, dict]]:
        """The (where, transform) pairs of a section (a Compose, a list of transforms, or one inferer)."""
        if section not in self.config:
            raise BundleError(f"configs/{self.name}: no '{section}' entry; the gateway reads preprocessing, inferer "
                              "and postprocessing")
        value = self.resolve(self.config[section], section)
        if isinstance(value, dict) and _target(value, section) == "Compose":
            value = self.resolve(value.get("transforms", []), f"{section}#transforms")
        items = value if isinstance(value, list) else [value]
        out = []
        for i, item in enumerate(items):
            where = f"{section}#{i}" if isinstance(value, list) else section
            item = self.resolve(item, where)
            if not isinstance(item, dict):
                raise BundleError(f"configs/{self.name}: {where} is not a transform (a mapping with _target_)")
            target = _target(item, where)
            if target in IO_TRANSFORMS:
                continue  # what the runner does anyway
            if target not in WHITELIST:  # a Compose inside a Compose
                raise BundleError(f"configs/{self.name}: {where}: a nested {target} is not supported")
            arguments = {}
            for key, raw in item.items():
                if key in ("_target_", "_requires_", "_disabled_", "_desc_", "_mode_"):
                    continue
                if key not in WHITELIST[target] and key not in HARMLESS:
                    raise BundleError(f"configs/{self.name}: {where} ({target}): argument {key!r} is not supported "
                                      f"(it takes {', '.join(WHITELIST[target]) or 'none'}); nothing was imported")
                arguments[key] = raw  # resolved with the transform above
            out.append((f"{where} ({target})", {"_target_": target, **arguments}))
        return out

    def resolve(self, value: Any, where: str, depth: int = 0) -> Any:
        if depth > 20:
            raise BundleError(f"configs/{self.name}: {where}: references nest too deep (a cycle?)")
        if isinstance(value, str):
            if value.startswith("$"):
                raise BundleError(f"configs/{self.name}: {where}: {value[:60]!r} is a Python expression ($); the "
                                  "gateway never evaluates bundle code: write the value itself; nothing was imported")
            if value.startswith("@"):
                return self.resolve(self._lookup(self.config, value[1:], where), where, depth + 1)
            if value.startswith("%"):
                return self.resolve(self._macro(value[1:], where), where, depth + 1)
            return value
        if isinstance(value, list):
            return [self.resolve(v, f"{where}#{i}", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" in value:
                target = _target(value, where)
                if target in IO_TRANSFORMS:
                    return value  # never read: its arguments (output folders, the inverse's reference) stay as written
                if target not in WHITELIST and target != "Compose":
                    raise BundleError(f"configs/{self.name}: {where}: _target_ {value['_target_']!r} is not one the "
                                      f"gateway reads as data; allowed: {', '.join(sorted(WHITELIST))} (and the I/O "
                                      f"transforms {', '.join(IO_TRANSFORMS)}); nothing was imported")
            return {k: v if k == "_target_" else self.resolve(v, f"{where}#{k}", depth + 1) for k, v in value.items()}
        return value

    def _lookup(self, config: Any, reference: str, where: str) -> Any:
        node = config
        for part in reference.replace("::", "#").split("#"):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise BundleError(f"configs/{self.name}: {where}: reference @{reference} names nothing in the config")
        return node

    def _macro(self, macro: str, where: str) -> Any:
        file, _, reference = macro.partition("#")
        if not file:
            return self._lookup(self.config, reference, where)
        path = (self.root / file).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            raise BundleError(f"configs/{self.name}: {where}: macro %{macro} names a file outside the bundle or "
                              "missing; nothing was imported")
        return self._lookup(_load(path, "macro's"), reference, where)


def _target(item: dict, where: str) -> str:
    target = item.get("_target_")
    if not isinstance(target, str):
        raise BundleError(f"{where}: a transform's _target_ must be a class name, got {target!r}")
    if target.startswith("$"):
        raise BundleError(f"{where}: _target_ {target[:60]!r} is a Python expression ($); refused")
    if "." in target:  # monai.transforms.Orientationd is Orientationd; any other module is not MONAI's
        module, _, name = target.rpartition(".")
        return name if module.split(".")[0] == "monai" else target
    return target


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BundleError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _declaration(sections: dict[str, list[tuple[str, dict]]], name: str) -> tuple[dict, bool]:
    """The manifest blocks (preprocessing, inference, postprocessing) of the whitelisted transforms."""
    pre: dict[str, Any] = {}
    intensity: list[dict] = []
    for where, t in sections["preprocessing"]:
        target, at = t["_target_"], f"configs/{name}: {where}"
        if target == "Orientationd":
            pre["orientation"] = str(t.get("axcodes", "RAS"))
        elif target == "Spacingd":
            pixdim = t.get("pixdim")
            pixdim = [pixdim] * 3 if isinstance(pixdim, (int, float)) else list(pixdim or [])[:3]
            pre["spacing_mm"] = [_number(v, at) for v in pixdim]
            if str(t.get("mode", "bilinear")) not in ("bilinear", "linear", "1"):
                raise BundleError(f"{at}: mode {t.get('mode')!r}: the runner resamples images linearly only")
        elif target == "ScaleIntensityRanged":
            if t.get("b_min") is None or t.get("b_max") is None:
                raise BundleError(f"{at}: b_min and b_max are needed (the range the window maps to)")
            intensity.append({"window": {"source": [_number(t.get("a_min"), at), _number(t.get("a_max"), at)],
                                         "to": [_number(t["b_min"], at), _number(t["b_max"], at)],
                                         "clip": bool(t.get("clip", False))}})
        elif target == "ScaleIntensityd":
            intensity.append({"minmax": {"to": [_number(t.get("minv", 0.0), at), _number(t.get("maxv", 1.0), at)]}})
        elif target == "NormalizeIntensityd":
            intensity.append({"zscore": {"nonzero": bool(t.get("nonzero", False))}})
        elif target == "ScaleIntensityRangePercentilesd":
            if t.get("relative"):
                raise BundleError(f"{at}: relative=true is not supported")
            to = None if t.get("b_min") is None else [_number(t["b_min"], at), _number(t["b_max"], at)]
            intensity.append({"percentiles": {"source": [_number(t.get("lower"), at), _number(t.get("upper"), at)],
                                              "to": to, "clip": bool(t.get("clip", False))}})
        elif target == "CropForegroundd":
            margin = t.get("margin", 0)
            pre["crop"] = {"foreground": {"above": 0, "margin": margin}}
        else:
            raise BundleError(f"{at}: {target} does not belong in preprocessing")
        if "crop" in pre and target != "CropForegroundd" and target not in ("Orientationd", "Spacingd"):
            raise BundleError(f"{at}: {target} after CropForegroundd: the runner crops after the intensity steps")
    if intensity:
        pre["intensity"] = intensity
    inferers = sections["inferer"]
    if len(inferers) != 1:
        raise BundleError(f"configs/{name}: inferer must be one SimpleInferer or SlidingWindowInferer")
    where, t = inferers[0]
    if t["_target_"] == "SimpleInferer":
        inference: dict[str, Any] = {"mode": "whole"}
    elif t["_target_"] == "SlidingWindowInferer":
        roi = t.get("roi_size")
        roi = [roi] * 3 if isinstance(roi, int) else list(roi or [])
        if len(roi) != 3 or not all(isinstance(v, int) and v > 0 for v in roi):
            raise BundleError(f"configs/{name}: {where}: roi_size must be three positive integers, got {roi!r}")
        inference = {"mode": "sliding_window", "patch": roi, "overlap": _number(t.get("overlap", 0.25), where),
                     "blend": str(t.get("mode", "constant")), "batch": int(t.get("sw_batch_size", 1))}
        if "sigma_scale" in t:
            inference["sigma_scale"] = _number(t["sigma_scale"], where)
    else:
        raise BundleError(f"configs/{name}: {where}: {t['_target_']} is not an inferer")
    post: dict[str, Any] = {}
    threshold = False
    for where, t in sections["postprocessing"]:
        target = t["_target_"]
        if target == "Activationsd":
            post["activation"] = "softmax" if t.get("softmax") else "sigmoid" if t.get("sigmoid") else "none"
        elif target == "AsDiscreted":
            if t.get("argmax"):
                post["discretize"] = "argmax"
            elif t.get("threshold") is not None:
                post["discretize"] = {"threshold": _number(t["threshold"], where)}
                threshold = True
            else:
                raise BundleError(f"configs/{name}: {where}: AsDiscreted needs argmax or threshold to give labels")
        elif target == "KeepLargestConnectedComponentd":
            post["largest_component"] = True
        else:
            raise BundleError(f"configs/{name}: {where}: {target} does not belong in postprocessing")
    return {"preprocessing": pre, "inference": inference, "postprocessing": post}, threshold
