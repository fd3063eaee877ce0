"""The declaration of a segmentation version in the manifest, read and checked when the manifest loads.

A family with a ``command:`` is served by declaration: each of its versions says, besides the
registry's usual keys, which series it takes (``input``), how the volume is prepared
(``preprocessing``), how the network runs (``inference``), how its output becomes labels
(``postprocessing``); ``framework`` (``onnx`` or ``torchscript``) says how ``weights`` is loaded.
``parse_declaration`` returns the declaration and every problem found, each naming the key and why,
so that a broken version is listed as unavailable with all its faults at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nibabel.orientations import axcodes2ornt

FRAMEWORKS = ("onnx", "torchscript")
INFERENCE_MODES = ("whole", "slices", "sliding_window")
BLENDS = ("constant", "gaussian")
ACTIVATIONS = ("none", "softmax", "sigmoid")
PAD_MODES = ("constant", "edge")
SLICE_EDGES = ("replicate", "zero")
#: The keys a declared version adds to (or reads more strictly than) the registry's.
DECLARATION_KEYS = ("framework", "input", "preprocessing", "inference", "postprocessing")


@dataclass(frozen=True)
class SeriesRule:
    """Which series of a study the model takes: a modality, a SeriesDescription pattern, or the only series."""

    modality: str | None = None
    series_description: str | None = None  # a regular expression, searched case-insensitively


@dataclass(frozen=True)
class IntensityStep:
    """One intensity operation, applied in the declared order.

    ``window``: ``source`` range mapped linearly to ``to``, clipped to it when ``clip``.
    ``zscore``: (x - mean) / std, over the non-zero voxels only (the zeros kept) when ``nonzero``.
    ``percentiles``: the ``source`` percentiles' values mapped to ``to`` (kept as they are when ``to`` is
    None), clipped when ``clip``.  ``minmax``: the volume's minimum and maximum mapped to ``to``.
    """

    kind: str
    source: tuple[float, float] | None = None
    to: tuple[float, float] | None = None
    clip: bool = False
    nonzero: bool = False


@dataclass(frozen=True)
class Crop:
    """Crop before inference: to the foreground (voxels above ``above``, plus ``margin`` voxels) or a box."""

    kind: str  # "foreground" or "box"
    above: float = 0.0
    margin: tuple[int, int, int] = (0, 0, 0)
    start: tuple[int, int, int] = (0, 0, 0)
    size: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class Pad:
    """Centre padding (the extra voxel, if odd, after the data): to a ``multiple`` and at least ``minimum``."""

    multiple: tuple[int, int, int] = (1, 1, 1)
    minimum: tuple[int, int, int] = (0, 0, 0)
    mode: str = "constant"
    value: float = 0.0


@dataclass(frozen=True)
class Preprocessing:
    """From the series' voxels to the network's input grid, in this order."""

    orientation: str | None = None  # axis codes of the network's array axes, e.g. "RAS", "LPS", "SAR"
    spacing_mm: tuple[float, float, float] | None = None  # None: the series' own spacing
    intensity: tuple[IntensityStep, ...] = ()
    crop: Crop | None = None
    pad: Pad | None = None


@dataclass(frozen=True)
class Inference:
    """How the network sees the prepared volume.

    ``whole``: one pass, input (1, 1, X, Y, Z). ``slices``: slice by slice along ``axis``, the
    ``context`` neighbours on either side as channels, input (batch, 2 * context + 1, A, B).
    ``sliding_window``: patches of ``patch`` overlapping by ``overlap``, blended with ``blend`` weights.
    """

    mode: str = "whole"
    axis: int = 0
    context: int = 0
    edge: str = "replicate"  # neighbours beyond the volume: the edge slice repeated, or zeros
    patch: tuple[int, int, int] = (0, 0, 0)
    overlap: float = 0.25
    blend: str = "constant"
    sigma_scale: float = 0.125
    batch: int = 1


@dataclass(frozen=True)
class Postprocessing:
    """From the network's output channels to labels.

    ``argmax``: label = the channel with the largest value. Thresholds (``threshold`` set): channel c is
    label c + 1 where it exceeds the threshold, a later channel winning where several do.
    """

    activation: str = "none"
    threshold: float | None = None  # None: argmax
    largest_component: bool = False
    min_component_mm3: float = 0.0


@dataclass(frozen=True)
class Declaration:
    """A version's whole declaration (the weights and structures stay the registry's)."""

    framework: str
    input: SeriesRule
    preprocessing: Preprocessing
    inference: Inference
    postprocessing: Postprocessing = field(default_factory=Postprocessing)


class _Problems:
    """Problems found, each ``key.path: why``."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def add(self, path: str, why: str) -> None:
        self.found.append(f"{path}: {why}")


def _mapping(value: Any, path: str, known: Sequence[str], problems: _Problems) -> dict:
    """``value`` as a mapping of ``known`` keys (a problem per unknown key); {} when absent."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(path, f"must be a mapping of {', '.join(known)}, got {_shown(value)}")
        return {}
    out = {}
    for key, item in value.items():
        if key == "__line__":
            continue
        if key not in known:
            problems.add(f"{path}.{key}", f"unknown key; {path} takes {', '.join(known)}")
        else:
            out[key] = item
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _triple(value: Any, path: str, problems: _Problems, *, kind: Callable = float, low: float = 0,
            strict: bool = True, scalar: bool = False) -> tuple | None:
    """Three numbers (one repeated when ``scalar``) each > ``low`` (>= when not ``strict``), or a problem."""
    if scalar and _number(value):
        value = [value] * 3
    ok = (isinstance(value, (list, tuple)) and len(value) == 3 and all(_number(v) for v in value)
          and all((v > low if strict else v >= low) for v in value)
          and (kind is float or all(float(v).is_integer() for v in value)))
    if not ok:
        what = "integers" if kind is int else "numbers"
        sign = ">" if strict else ">="
        problems.add(path, f"must be three {what} {sign} {low:g}{' (or one for all axes)' if scalar else ''}, "
                           f"got {_shown(value)}")
        return None
    return tuple(kind(v) for v in value)


def _pair(value: Any, path: str, problems: _Problems) -> tuple[float, float] | None:
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value)
            and float(value[0]) < float(value[1])):
        return float(value[0]), float(value[1])
    problems.add(path, f"must be [low, high] with low < high, got {_shown(value)}")
    return None


def _boolean(value: Any, path: str, problems: _Problems, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        problems.add(path, f"must be true or false, got {_shown(value)}")
        return default
    return value


def _choice(value: Any, path: str, choices: Sequence[str], problems: _Problems, default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        problems.add(path, f"must be one of {', '.join(choices)}, got {_shown(value)}")
        return default
    return str(value)


def parse_declaration(spec: Mapping[str, Any]) -> tuple[Declaration | None, list[str]]:
    """The declaration of a version's manifest entry ``spec``, and every problem found in it (none: a declaration)."""
    problems = _Problems()
    framework = spec.get("framework")
    if framework not in FRAMEWORKS:
        problems.add("framework", f"must be one of {', '.join(FRAMEWORKS)} (how the weights file is run), "
                                  f"got {_shown(framework)}")
    series = _series_rule(spec.get("input"), problems)
    preprocessing = _preprocessing(spec.get("preprocessing"), problems)
    inference = _inference(spec.get("inference"), problems)
    postprocessing = _postprocessing(spec.get("postprocessing"), problems)
    if "inference" not in spec:
        problems.add("inference", "missing; say mode: whole, slices or sliding_window")
    if problems.found:
        return None, problems.found
    return Declaration(str(framework), series, preprocessing, inference, postprocessing), []


def _series_rule(value: Any, problems: _Problems) -> SeriesRule:
    spec = _mapping(value, "input", ("modality", "series_description"), problems)
    modality, pattern = spec.get("modality"), spec.get("series_description")
    if modality is not None and not (isinstance(modality, str) and re.fullmatch(r"[A-Z]{2,4}", modality)):
        problems.add("input.modality", f"must be a DICOM modality such as CT or MR, got {_shown(modality)}")
        modality = None
    if pattern is not None:
        try:
            re.compile(str(pattern))
        except re.error as exc:
            problems.add("input.series_description", f"is not a regular expression ({exc})")
            pattern = None
    return SeriesRule(modality, None if pattern is None else str(pattern))


def _preprocessing(value: Any, problems: _Problems) -> Preprocessing:
    spec = _mapping(value, "preprocessing", ("orientation", "spacing_mm", "intensity", "crop", "pad"), problems)
    orientation = spec.get("orientation")
    if orientation is not None:
        try:
            if not isinstance(orientation, str) or len(orientation) != 3:
                raise ValueError
            if sorted(axcodes2ornt(tuple(orientation.upper()))[:, 0].tolist()) != [0, 1, 2]:  # e.g. RAR: x twice
                raise ValueError
        except ValueError:
            problems.add("preprocessing.orientation", "must be three axis codes, one of L/R, one of A/P, one of "
                                                      f"S/I (e.g. RAS, LPS), got {_shown(orientation)}")
            orientation = None
        else:
            orientation = orientation.upper()
    spacing = spec.get("spacing_mm")
    if spacing is not None:
        spacing = _triple(spacing, "preprocessing.spacing_mm", problems, scalar=True)
    steps = spec.get("intensity") or []
    if not isinstance(steps, list):
        problems.add("preprocessing.intensity", "must be a list of steps (window, zscore, percentiles, minmax)")
        steps = []
    intensity = tuple(step for i, item in enumerate(steps)
                      if (step := _intensity(item, f"preprocessing.intensity[{i}]", problems)) is not None)
    return Preprocessing(orientation, spacing, intensity, _crop(spec.get("crop"), problems),
                         _pad(spec.get("pad"), problems))


def _intensity(item: Any, path: str, problems: _Problems) -> IntensityStep | None:
    kinds = ("window", "zscore", "percentiles", "minmax")
    if not isinstance(item, Mapping) or len([k for k in item if k != "__line__"]) != 1:
        problems.add(path, f"must be one of {', '.join(kinds)} with its settings, e.g. "
                           "{window: {source: [-57, 164], to: [0, 1], clip: true}}")
        return None
    kind = next(k for k in item if k != "__line__")
    path = f"{path}.{kind}"
    if kind not in kinds:
        problems.add(path, f"unknown intensity step; steps: {', '.join(kinds)}")
        return None
    known = {"window": ("source", "to", "clip"), "zscore": ("nonzero",),
             "percentiles": ("source", "to", "clip"), "minmax": ("to",)}[kind]
    spec = _mapping(item[kind] or {}, path, known, problems)
    source = to = None
    if kind in ("window", "percentiles"):
        if "source" not in spec:
            problems.add(f"{path}.source", "missing: the [low, high] " +
                         ("values" if kind == "window" else "percentiles (0-100)"))
        else:
            source = _pair(spec["source"], f"{path}.source", problems)
            if kind == "percentiles" and source is not None and not (0 <= source[0] and source[1] <= 100):
                problems.add(f"{path}.source", f"percentiles lie in 0..100, got {list(source)}")
    if "to" in spec and spec["to"] is not None:
        to = _pair(spec["to"], f"{path}.to", problems)
    elif kind == "window":
        problems.add(f"{path}.to", "missing: the [low, high] the window maps to")
    elif kind == "minmax":
        to = (0.0, 1.0)
    return IntensityStep(kind, source, to, _boolean(spec.get("clip"), f"{path}.clip", problems, kind != "window"),
                         _boolean(spec.get("nonzero"), f"{path}.nonzero", problems, False))


def _crop(value: Any, problems: _Problems) -> Crop | None:
    if value is None:
        return None
    spec = _mapping(value, "preprocessing.crop", ("foreground", "box"), problems)
    if len(spec) != 1:
        if isinstance(value, Mapping):
            problems.add("preprocessing.crop", "give one of foreground or box")
        return None
    if "foreground" in spec:
        fg = _mapping(spec["foreground"] or {}, "preprocessing.crop.foreground", ("above", "margin"), problems)
        above = fg.get("above", 0.0)
        if not _number(above):
            problems.add("preprocessing.crop.foreground.above", f"must be a number, got {_shown(above)}")
            above = 0.0
        margin = _triple(fg.get("margin", 0), "preprocessing.crop.foreground.margin", problems, kind=int,
                         strict=False, scalar=True) or (0, 0, 0)
        return Crop("foreground", above=float(above), margin=margin)
    box = _mapping(spec["box"], "preprocessing.crop.box", ("start", "size"), problems)
    start = _triple(box.get("start"), "preprocessing.crop.box.start", problems, kind=int, strict=False)
    size = _triple(box.get("size"), "preprocessing.crop.box.size", problems, kind=int)
    return Crop("box", start=start or (0, 0, 0), size=size or (1, 1, 1))


def _pad(value: Any, problems: _Problems) -> Pad | None:
    if value is None:
        return None
    spec = _mapping(value, "preprocessing.pad", ("multiple", "minimum", "mode", "value"), problems)
    multiple = _triple(spec.get("multiple", 1), "preprocessing.pad.multiple", problems, kind=int, scalar=True)
    minimum = _triple(spec.get("minimum", 0), "preprocessing.pad.minimum", problems, kind=int, strict=False,
                      scalar=True)
    fill = spec.get("value", 0.0)
    if not _number(fill):
        problems.add("preprocessing.pad.value", f"must be a number, got {_shown(fill)}")
        fill = 0.0
    return Pad(multiple or (1, 1, 1), minimum or (0, 0, 0),
               _choice(spec.get("mode"), "preprocessing.pad.mode", PAD_MODES, problems, "constant"), float(fill))


def _inference(value: Any, problems: _Problems) -> Inference:
    known = ("mode", "axis", "context", "edge", "patch", "overlap", "blend", "sigma_scale", "batch")
    spec = _mapping(value, "inference", known, problems)
    mode = _choice(spec.get("mode"), "inference.mode", INFERENCE_MODES, problems, "whole")
    if value is not None and "mode" not in spec:
        problems.add("inference.mode", f"missing; one of {', '.join(INFERENCE_MODES)}")
    allowed = {"whole": (), "slices": ("axis", "context", "edge", "batch"),
               "sliding_window": ("patch", "overlap", "blend", "sigma_scale", "batch")}[mode]
    for key in spec:
        if key != "mode" and key not in allowed:
            problems.add(f"inference.{key}", f"does not apply to mode {mode}" +
                         (f" (it takes {', '.join(allowed)})" if allowed else ""))
    axis, context, batch = spec.get("axis", 0), spec.get("context", 0), spec.get("batch", 1)
    if mode == "slices" and axis not in (0, 1, 2):
        problems.add("inference.axis", f"must be 0, 1 or 2 (an axis of the prepared volume), got {_shown(axis)}")
        axis = 0
    if not (isinstance(context, int) and not isinstance(context, bool) and 0 <= context <= 16):
        problems.add("inference.context", f"must be an integer 0..16 (neighbours on each side), got {_shown(context)}")
        context = 0
    if not (isinstance(batch, int) and not isinstance(batch, bool) and 1 <= batch <= 1024):
        problems.add("inference.batch", f"must be an integer 1..1024, got {_shown(batch)}")
        batch = 1
    patch: tuple = (0, 0, 0)
    overlap, sigma = spec.get("overlap", 0.25), spec.get("sigma_scale", 0.125)
    if mode == "sliding_window":
        if "patch" not in spec:
            problems.add("inference.patch", "missing: the patch size, three integers")
        else:
            patch = _triple(spec["patch"], "inference.patch", problems, kind=int) or patch
        if not (_number(overlap) and 0 <= overlap < 1):
            problems.add("inference.overlap", f"must be a number in [0, 1), got {_shown(overlap)}")
            overlap = 0.25
        if not (_number(sigma) and sigma > 0):
            problems.add("inference.sigma_scale", f"must be a number > 0, got {_shown(sigma)}")
            sigma = 0.125
    return Inference(mode, int(axis), int(context),
                     _choice(spec.get("edge"), "inference.edge", SLICE_EDGES, problems, "replicate"),
                     patch, float(overlap), _choice(spec.get("blend"), "inference.blend", BLENDS, problems, "constant"),
                     float(sigma), int(batch))


def _postprocessing(value: Any, problems: _Problems) -> Postprocessing:
    known = ("activation", "discretize", "largest_component", "min_component_mm3")
    spec = _mapping(value, "postprocessing", known, problems)
    activation = _choice(spec.get("activation"), "postprocessing.activation", ACTIVATIONS, problems, "none")
    discretize = spec.get("discretize", "argmax")
    threshold = None
    if isinstance(discretize, Mapping) and set(discretize) - {"__line__"} == {"threshold"} \
            and _number(discretize["threshold"]):
        threshold = float(discretize["threshold"])
    elif discretize != "argmax":
        problems.add("postprocessing.discretize", f"must be argmax or {{threshold: T}}, got {_shown(discretize)}")
    minimum = spec.get("min_component_mm3", 0)
    if not (_number(minimum) and minimum >= 0):
        problems.add("postprocessing.min_component_mm3", f"must be a number >= 0, got {_shown(minimum)}")
        minimum = 0
    return Postprocessing(activation, threshold,
                          _boolean(spec.get("largest_component"), "postprocessing.largest_component", problems, False),
                          float(minimum))
