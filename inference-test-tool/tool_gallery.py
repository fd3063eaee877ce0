"""The test tool's output folder: the response's files, one viewer per series as PNGs, and index.html.

Each input series becomes one viewer on the page: its images as PNGs (one window for the whole
series), the response's overlays as transparent PNGs beside them (switched on and off, and
faded, in the browser), and a derived series the response returned (the blur) side by side on
the same slider. The page itself is ``templates/index.html.j2`` (Jinja2), self-contained: open
``index.html`` from disk or attach the folder to a ticket.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from inference import protocol
from inference.dicom.series import slice_normal, sort_by_position
from inference.imaging import render
from inference.protocol.client import InferenceResponse
from inference.protocol.summary import ResultRow, model_version, result_rows
from tool_input import InputImage, InputSeries, Study

BOX_COLOR = (255, 210, 0)
MEASUREMENT_COLOR = (0, 230, 190)
PNG_COMPRESSION = 1  # fast; the pictures of a full study are written in seconds
WINDOW_SAMPLE_SLICES = 16  # slices read to choose a series' window
RENDER_THREADS = min(4, os.cpu_count() or 1)
TEMPLATES = Path(__file__).resolve().parent / "templates"

Progress = Callable[[int, int], None]


# -- the response's masks --------------------------------------------------------------------
@dataclass
class MaskPart:
    """A mask of the response as an array of its binary_data_shape: (T, D, H, W) for 3D, (H, W) for 2D."""

    index: int
    part: dict
    array: np.ndarray

    @property
    def is_3d(self) -> bool:
        return "depth" in self.part["binary_data_shape"]

    @property
    def name(self) -> str:
        return f"{self.part.get('label') or self.part['binary_type']} (part {self.index})"

    def plane_for(self, position: int, count: int) -> np.ndarray | None:
        """The 2D plane laid over the ``position``-th of ``count`` sorted images of its series."""
        if not self.is_3d:
            return self.array
        volume = self.array.reshape((-1, *self.array.shape[-3:]))
        timepoints, depth = volume.shape[:2]
        if timepoints > 1 and timepoints * depth == count:
            return volume[position % timepoints, position // timepoints]
        return volume[0, position] if position < depth else None


def mask_parts(response_json: dict, buffers: Sequence[bytes]) -> list[MaskPart]:
    """The response's mask parts as arrays shaped like their ``binary_data_shape``."""
    out = []
    # a count mismatch is reported by the protocol check: render what pairs up
    for index, (part, buffer) in enumerate(zip(response_json.get("parts", []), buffers, strict=False)):
        if part.get("binary_type") in protocol.MASK_TYPES:
            shape = protocol.mask_array_shape(part["binary_data_shape"])
            out.append(MaskPart(index, part, np.frombuffer(buffer, np.uint8).reshape(shape)))
    return out


def masks_on_image(masks: Sequence[MaskPart], series: InputSeries, single_series: bool, position: int,
                   image: InputImage) -> list[tuple[MaskPart, np.ndarray]]:
    """(mask, plane) pairs drawn on one image: 3D masks of its series, 2D masks naming it."""
    out = []
    for mask in masks:
        if mask.is_3d:
            target = mask.part.get("SeriesInstanceUID")
            if target == series.uid or (target is None and single_series):
                plane = mask.plane_for(position, len(series.images))
                if plane is not None:
                    out.append((mask, plane))
        elif mask.part.get("dicom_image", {}).get("SOPInstanceUID") == image.sop_instance_uid:
            out.append((mask, mask.array))
    return out


def format_result(value: Any) -> str:
    """A classification entry on one line: ``label=Normal, confidence=0.73``."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v if not isinstance(v, (dict, list)) else json.dumps(v)}" for k, v in value.items())
    return json.dumps(value)


# -- the results table ------------------------------------------------------------------------
@dataclass
class ResultTable:
    title: str
    rows: list[ResultRow]
    subtitle: str = ""
    columns: tuple[str, str, str] = ("measure", "value", "unit")


def _image_lookup(study: Study | None) -> dict[str, tuple[InputSeries, int, InputImage]]:
    if study is None:
        return {}
    return {image.sop_instance_uid: (series, position, image)
            for series in study.series for position, image in enumerate(series.images)}


def _where(sop: str, lookup: dict) -> str:
    if sop not in lookup:
        return f"image {sop}"
    series, position, _ = lookup[sop]
    return f"{series.description}, image {position + 1}/{len(series.images)}"


def pixel_spacing(sop: str, lookup: dict) -> Any:
    """The PixelSpacing of the input image ``sop``, None when the study has no such image or it has none."""
    return lookup[sop][2].header.get("PixelSpacing") if sop in lookup else None


def result_tables(response_json: dict, study: Study | None) -> list[ResultTable]:
    """The numbers of the response as tables: study and series results, boxes, measurements."""
    tables = []
    if "study_ml_json" in response_json:
        tables.append(ResultTable("Study", result_rows(response_json["study_ml_json"])))
    names = {series.uid: series.description for series in study.series} if study else {}
    for uid, values in (response_json.get("series_ml_json") or {}).items():
        tables.append(ResultTable(f"Series {names.get(uid, '')}".strip(), result_rows(values), uid))
    lookup = _image_lookup(study)
    boxes = response_json.get("bounding_boxes_2d") or []
    if boxes:
        rows = []
        for box in boxes:
            (c0, r0), (c1, r1) = box["top_left"], box["bottom_right"]
            size = f"{c1 - c0 + 1:g} × {r1 - r0 + 1:g} px"
            spacing = pixel_spacing(box["SOPInstanceUID"], lookup)
            if spacing:
                size += f" ({(c1 - c0 + 1) * float(spacing[1]):.1f} × {(r1 - r0 + 1) * float(spacing[0]):.1f} mm)"
            rows.append(ResultRow(f"{box['label']} · {_where(box['SOPInstanceUID'], lookup)}",
                                  f"[{c0:g}, {r0:g}] - [{c1:g}, {r1:g}], {size}", "column, row"))
        tables.append(ResultTable(f"Bounding boxes ({len(boxes)})", rows,
                                  columns=("box", "corners, size", "corners as")))
    measurements = response_json.get("linear_measurements_2d") or []
    if measurements:
        rows = []
        for item in measurements:
            spacing = pixel_spacing(item["SOPInstanceUID"], lookup)
            length = render.measurement_text(item["start"], item["end"], "", spacing)
            value, _, unit = length.partition(" ")
            where = _where(item["SOPInstanceUID"], lookup)
            rows.append(ResultRow(f"{item.get('label') or 'length'} · {where}", value, unit))
        tables.append(ResultTable(f"Linear measurements ({len(measurements)})", rows,
                                  columns=("measurement", "length", "unit")))
    return tables


# -- one viewer per series ---------------------------------------------------------------------
@dataclass
class Slice:
    """One step of a viewer's slider: picture files (relative to the page) and what it shows."""

    base: str
    position: str
    overlay: str = ""
    derived: str = ""
    legend: list[tuple[str, str]] = field(default_factory=list)  # text, CSS colour ("" for none)


@dataclass
class ColorBar:
    """A heatmap's palette as a CSS gradient from 0 to 1."""

    title: str
    gradient: str
    palette: str


@dataclass
class Viewer:
    """A series on the page: its slices, window, overlay key, and the derived series shown beside it."""

    key: str
    title: str
    uid: str
    window: str
    note: str = ""
    slices: list[Slice] = field(default_factory=list)
    derived_title: str = ""
    key_entries: list[tuple[str, str]] = field(default_factory=list)
    colorbars: list[ColorBar] = field(default_factory=list)

    @property
    def has_overlay(self) -> bool:
        return any(s.overlay for s in self.slices)


@dataclass
class DicomPart:
    """A DICOM object of the response shown on its own (report image, SR text)."""

    index: int
    binary_type: str
    title: str
    file: str
    png: str = ""
    text: list[str] = field(default_factory=list)


@dataclass
class Gallery:
    """What was written, for index.html and the summary."""

    viewers: list[Viewer] = field(default_factory=list)
    dicom_parts: list[DicomPart] = field(default_factory=list)
    masks: list[tuple[str, str]] = field(default_factory=list)  # npy file, description
    derived_files: dict[str, list[str]] = field(default_factory=dict)  # derived series description -> dcm files
    png_count: int = 0


def css(color: render.Color | None) -> str:
    return "" if color is None else "rgb({},{},{})".format(*color)


def palette_gradient(palette: dict) -> str:
    """A CSS ``linear-gradient`` of an anchor-point palette (colours with their alpha)."""
    stops = [f"rgba({c[0]},{c[1]},{c[2]},{c[3] / 255:.3f}) {100 * p['threshold']:.1f}%"
             for p in palette["data"] for c in [p["color"]]]
    return f"linear-gradient(to right, {', '.join(stops)})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "series"


def position_text(ds: Dataset, position: int, count: int) -> str:
    """``slice 3/8 · instance 3 · 12.0 mm along the normal`` (image instead of slice without a position)."""
    parts = [f"instance {ds.get('InstanceNumber', '?')}"]
    normal, ipp = slice_normal(ds), ds.get("ImagePositionPatient")
    if normal is not None and ipp is not None and len(ipp) == 3:
        parts.append(f"{float(np.dot(np.asarray(ipp, float), normal)):.2f} mm along the slice normal")
        return f"slice {position + 1}/{count} · " + " · ".join(parts)
    return f"image {position + 1}/{count} · " + " · ".join(parts)


def series_window(series: InputSeries) -> render.SeriesWindow:
    """The window of a series, chosen from up to ``WINDOW_SAMPLE_SLICES`` of its images."""
    images = [image for image in series.images if image.has_pixels]
    if not images:
        return render.SeriesWindow("min/max")
    step = max(1, len(images) // WINDOW_SAMPLE_SLICES)
    samples, first = [], None
    for image in images[::step]:
        ds = pydicom.dcmread(image.path)
        first = first or ds
        if render.is_colour(ds):
            return render.SeriesWindow("colour")
        try:
            pixels = ds.pixel_array
        except Exception:  # e.g. a compressed transfer syntax without its decoder; shown as a note per slice
            continue
        values = np.asarray(render.apply_modality_lut(pixels, ds), np.float64)
        samples.append(values.ravel()[:: max(1, values.size // 65536)])
    return render.choose_window(np.concatenate(samples) if samples else np.zeros(0), first)


def draw_overlay(shape: tuple[int, int], factor: int, masks: Sequence[tuple[MaskPart, np.ndarray]], palettes: dict,
                 boxes: Sequence[dict], measurements: Sequence[dict], pixel_spacing: Any
                 ) -> tuple[Image.Image | None, list[tuple[str, str]]]:
    """The transparent overlay of one image (None when nothing is drawn on it) and its legend lines."""
    order = {"heatmap": 0, "numeric_label_mask": 1, "probability_mask": 2, "boolean_mask": 2}
    layer = render.transparent_layer(shape[0] * factor, shape[1] * factor)
    legend: list[tuple[str, str]] = []
    for mask, plane in sorted(masks, key=lambda item: order[item[0].part["binary_type"]]):
        part, binary_type = mask.part, mask.part["binary_type"]
        plane = render.upscale(plane, factor)
        empty = "" if plane.any() else " - empty here"
        if binary_type == "heatmap":
            render.paint_heatmap(layer, plane, palettes[part["palette"]])
            legend.append((f"heatmap {mask.name}, palette {part['palette']}{empty}", ""))
        elif binary_type == "numeric_label_mask":
            colors = {int(k): render.label_color(int(k)) for k in part["label_map"] if int(k) != 0}
            render.paint_labels(layer, plane, colors)
            present = set(np.unique(plane).tolist())
            title = part.get("label") or f"part {mask.index}"
            legend += [(f"{part['label_map'][str(k)]} ({title})" + ("" if k in present else " - not on this slice"),
                        css(c)) for k, c in colors.items()]
        elif binary_type == "probability_mask":
            threshold = part.get("probability_threshold")
            drawn = plane > render.probability_cutoff(threshold)
            render.paint_mask(layer, drawn, render.label_color(mask.index + 1))
            rule = f"> {threshold} x 255" if threshold is not None else f"> {protocol.DEFAULT_DRAW_THRESHOLD}"
            legend.append((f"{mask.name} {rule}{'' if drawn.any() else ' - nothing drawn here'}",
                           css(render.label_color(mask.index + 1))))
        else:
            render.paint_mask(layer, plane.astype(bool), render.label_color(mask.index + 1))
            legend.append((f"{mask.name}{empty}", css(render.label_color(mask.index + 1))))
    if not boxes and not measurements and not layer[..., 3].any():
        return None, legend  # nothing drawn on this image: no overlay file
    picture = render.layer_image(layer)
    for box in boxes:
        render.draw_box(picture, box["top_left"], box["bottom_right"], box["label"], BOX_COLOR, factor)
        legend.append((f"box {box['label']}: {box['top_left']} - {box['bottom_right']}", css(BOX_COLOR)))
    for item in measurements:
        text = render.measurement_text(item["start"], item["end"], item.get("label", ""), pixel_spacing)
        render.draw_measurement(picture, item["start"], item["end"], text, MEASUREMENT_COLOR, factor)
        legend.append((f"measurement {text}", css(MEASUREMENT_COLOR)))
    return picture, legend


def save_png(array_or_image: np.ndarray | Image.Image, path: Path) -> None:
    picture = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    picture.save(path, compress_level=PNG_COMPRESSION)


def derived_series_for(series: InputSeries, derived: dict[str, list[Dataset]]) -> tuple[str, list[Dataset]] | None:
    """A series the response returned whose slices lie where ``series``' do (a derived series), if any."""
    positions = [tuple(float(v) for v in image.header.get("ImagePositionPatient", ()) or ()) for image in series.images]
    for uid, datasets in derived.items():
        if len(datasets) != len(series.images):
            continue
        theirs = [tuple(float(v) for v in ds.get("ImagePositionPatient", ()) or ()) for ds in datasets]
        if all(a and b and np.allclose(a, b, atol=1e-3) for a, b in zip(positions, theirs, strict=True)):
            return uid, datasets
    return None


def build_viewer(number: int, series: InputSeries, output: Path, masks: Sequence[MaskPart], response_json: dict,
                 single_series: bool, plot_labels: bool, derived: tuple[str, list[Dataset]] | None,
                 step: Callable[[], None]) -> Viewer:
    """Write one series' PNGs (image, overlay, derived image per slice) and describe its viewer."""
    folder = Path("images") / f"{number:02d}-{_slug(series.description)}"
    (output / folder).mkdir(parents=True, exist_ok=True)
    window = series_window(series)
    viewer = Viewer(f"series-{number}", series.description, series.uid, window.describe(), window.note)
    palettes = response_json.get("palettes") or {}
    boxes = response_json.get("bounding_boxes_2d") or []
    measurements = response_json.get("linear_measurements_2d") or []
    classification = []
    if plot_labels:
        if "study_ml_json" in response_json:
            classification.append((f"study: {format_result(response_json['study_ml_json'])}", ""))
        if series.uid in (response_json.get("series_ml_json") or {}):
            classification.append((f"series: {format_result(response_json['series_ml_json'][series.uid])}", ""))
    if derived is not None:
        description = str(derived[1][0].get("SeriesDescription", "") or "derived series")
        viewer.derived_title = f"{description} (returned, same window)"

    def render_slice(position: int, image: InputImage) -> Slice | None:
        """Write one image's PNGs; None for an image without pixels."""
        if not image.has_pixels:
            return None
        ds = pydicom.dcmread(image.path)
        notes: list[tuple[str, str]] = []
        try:
            pixels = render.display_image(ds, window)
        except Exception as exc:  # e.g. a compressed transfer syntax without its decoder installed
            pixels = np.full((int(ds.Rows), int(ds.Columns)), 64, np.uint8)
            notes.append((f"pixels not shown: {type(exc).__name__}: {exc}", ""))
        factor = render.display_factor(*pixels.shape[:2])
        stem = folder / f"{position + 1:04d}"
        save_png(render.upscale(pixels, factor), output / f"{stem}.png")  # grey stays one channel
        sop = image.sop_instance_uid
        overlay, legend = draw_overlay(
            pixels.shape[:2], factor, masks_on_image(masks, series, single_series, position, image), palettes,
            [b for b in boxes if b["SOPInstanceUID"] == sop], [m for m in measurements if m["SOPInstanceUID"] == sop],
            ds.get("PixelSpacing"))
        current = Slice(f"{stem.as_posix()}.png", position_text(ds, position, len(series.images)),
                        legend=notes + legend + classification)
        if overlay is not None:
            overlay.save(output / f"{stem}-overlay.png", compress_level=PNG_COMPRESSION)
            current.overlay = f"{stem.as_posix()}-overlay.png"
        if derived is not None:
            derived_pixels = render.display_image(derived[1][position], window)
            save_png(render.upscale(derived_pixels, factor), output / f"{stem}-derived.png")
            current.derived = f"{stem.as_posix()}-derived.png"
        return current

    def render_and_count(item: tuple[int, InputImage]) -> Slice | None:
        try:
            return render_slice(*item)
        finally:
            step()

    # PNG encoding and most numpy work release the GIL: a few threads use the cores
    with ThreadPoolExecutor(max_workers=RENDER_THREADS) as pool:
        viewer.slices = [s for s in pool.map(render_and_count, enumerate(series.images)) if s is not None]
    sops = {image.sop_instance_uid for image in series.images}
    for mask in masks:
        if mask.part["binary_type"] != "heatmap" or mask.part["palette"] in {bar.palette for bar in viewer.colorbars}:
            continue
        target = mask.part.get("SeriesInstanceUID")
        on_series = (target == series.uid or (target is None and single_series)) if mask.is_3d else \
            mask.part.get("dicom_image", {}).get("SOPInstanceUID") in sops
        if on_series:
            viewer.colorbars.append(ColorBar(f"{mask.part.get('label') or 'heatmap'}: palette {mask.part['palette']}",
                                             palette_gradient(palettes[mask.part["palette"]]), mask.part["palette"]))
    for current in viewer.slices:  # the key: every coloured entry once; each slice then lists only the rest
        for text, color in current.legend:
            label = re.sub(r" - (empty|not|nothing) .*$", "", text)
            if color and not text.startswith(("box ", "measurement ")) and (label, color) not in viewer.key_entries:
                viewer.key_entries.append((label, color))
    for current in viewer.slices:
        current.legend = [entry for entry in current.legend if entry not in viewer.key_entries]
    return viewer


# -- writing the folder ---------------------------------------------------------------------------
def sr_text(ds: Dataset) -> list[str]:
    """The lines of a Structured Report's content tree: ``concept: value``, nested items indented."""
    lines: list[str] = []

    def walk(items: Sequence[Dataset], depth: int) -> None:
        for item in items:
            concept = item.get("ConceptNameCodeSequence")
            name = str(concept[0].CodeMeaning) if concept else ""
            value = item.get("TextValue") or item.get("UID") or ""
            if "MeasuredValueSequence" in item and item.MeasuredValueSequence:
                measured = item.MeasuredValueSequence[0]
                unit = measured.get("MeasurementUnitsCodeSequence")
                value = f"{measured.NumericValue} {unit[0].CodeValue if unit else ''}".strip()
            if "ConceptCodeSequence" in item and item.ConceptCodeSequence:
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            lines.append("  " * depth + (f"{name}: {value}" if value else name))
            walk(item.get("ContentSequence", []), depth + 1)

    walk(ds.get("ContentSequence", []), 0)
    return lines


def image_count(study: Study | None) -> int:
    """How many steps rendering ``study`` takes (one per image sent)."""
    return 0 if study is None else len(study.images)


def write_outputs(output: Path, result: InferenceResponse, study: Study | None, dicom_parts: dict[int, Dataset],
                  plot_labels: bool, progress: Progress | None = None) -> Gallery:
    """response.json, mask .npy files, DICOM parts (.dcm, and .png for images), and every viewer's PNGs.

    ``output`` is a new, empty folder (the tool renames it into place once complete).
    """
    output.mkdir(parents=True, exist_ok=True)
    response_json = result.response_json
    (output / "response.json").write_text(json.dumps(response_json, indent=2) + "\n", encoding="utf-8")
    gallery = Gallery()
    masks = mask_parts(response_json, result.buffers)
    for mask in masks:
        name = f"output_masks_{mask.index}.npy"
        np.save(output / name, mask.array)
        gallery.masks.append((name, f"{mask.part['binary_type']} {mask.name}, shape {list(mask.array.shape)}"))
    derived: dict[str, list[Dataset]] = {}
    for index, ds in dicom_parts.items():
        (output / f"output_dicom_{index}.dcm").write_bytes(result.buffers[index])
        binary_type = response_json["parts"][index]["binary_type"]
        if binary_type == "dicom" and "PixelData" in ds and "ImagePositionPatient" in ds:
            derived.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    derived = {uid: sort_by_position(datasets) for uid, datasets in derived.items()}
    paired: set[str] = set()
    total, done, lock = image_count(study), [0], threading.Lock()

    def step() -> None:  # called from the rendering threads
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

    if study is not None:
        single = len(study.series) == 1
        for number, series in enumerate(study.series, start=1):
            pair = derived_series_for(series, {u: d for u, d in derived.items() if u not in paired})
            if pair is not None:
                paired.add(pair[0])
            viewer = build_viewer(number, series, output, masks, response_json, single, plot_labels, pair, step)
            gallery.viewers.append(viewer)
            gallery.png_count += sum(1 + bool(s.overlay) + bool(s.derived) for s in viewer.slices)
    # series the response draws on (or derived from) first: what the person came to see
    gallery.viewers.sort(key=lambda viewer: not (viewer.has_overlay or viewer.derived_title))
    for index, ds in dicom_parts.items():
        part = response_json["parts"][index]
        if str(ds.get("SeriesInstanceUID", "")) in paired:
            description = str(ds.get("SeriesDescription", "") or ds.SeriesInstanceUID)
            gallery.derived_files.setdefault(description, []).append(f"output_dicom_{index}.dcm")
            continue
        title = str(part.get("label") or ds.get("SeriesDescription", "") or part["binary_type"])
        shown = DicomPart(index, part["binary_type"], title, f"output_dicom_{index}.dcm")
        if "PixelData" in ds:
            pixels = render.to_rgb(render.window_image(ds))
            upscaled = render.upscale(pixels, render.display_factor(*pixels.shape[:2]))
            save_png(upscaled, output / f"output_dicom_{index}.png")
            shown.png = f"output_dicom_{index}.png"
            gallery.png_count += 1
        elif "ContentSequence" in ds:
            shown.text = sr_text(ds)
        gallery.dicom_parts.append(shown)
    return gallery


@dataclass
class PageInfo:
    """What the page says above the pictures: what was run, on what, and how it went."""

    command: str
    description: str = ""
    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_index(output: Path, gallery: Gallery, response_json: dict, info: PageInfo, study: Study | None) -> Path:
    """index.html from ``templates/index.html.j2``: results first, then one viewer per series, then files."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                     autoescape=jinja2.select_autoescape(default=True),
                                     undefined=jinja2.StrictUndefined)
    page = environment.get_template("index.html.j2").render(
        info=info, version=model_version(response_json), tables=result_tables(response_json, study),
        quality=response_json.get("quality"), change=response_json.get("change_since_prior"),
        gallery=gallery, response_text=json.dumps(response_json, indent=2),
        viewer_data={v.key: [{"base": s.base, "overlay": s.overlay, "derived": s.derived, "position": s.position,
                              "legend": s.legend} for s in v.slices] for v in gallery.viewers})
    path = output / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
