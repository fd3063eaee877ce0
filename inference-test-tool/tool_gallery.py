"""The test tool's output: mask and DICOM files, one PNG per input image as a viewer would draw it, index.html."""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from tool_input import InputImage, InputSeries, Study
from utils import protocol, render
from utils.client import InferenceResult

BOX_COLOR = (255, 210, 0)
MEASUREMENT_COLOR = (0, 230, 190)
PNG_COMPRESSION = 3  # fast; the gallery of a full study is written in seconds


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
    out = []
    for index, (part, buffer) in enumerate(zip(response_json.get("parts", []), buffers)):
        if part.get("binary_type") in protocol.MASK_TYPES:
            shape = protocol.mask_array_shape(part["binary_data_shape"])
            out.append(MaskPart(index, part, np.frombuffer(buffer, np.uint8).reshape(shape)))
    return out


def _masks_for(masks: Sequence[MaskPart], series: InputSeries, single_series: bool, position: int,
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


def overlay_masks(rgb: np.ndarray, masks: Sequence[tuple[MaskPart, np.ndarray]], palettes: dict,
                  factor: int) -> tuple[np.ndarray, list[tuple[str, render.Color | None]]]:
    """Draw masks in viewer order (heatmaps, label maps, then probability/boolean masks); returns the legend."""
    order = {"heatmap": 0, "numeric_label_mask": 1, "probability_mask": 2, "boolean_mask": 2}
    legend: list[tuple[str, render.Color | None]] = []
    for mask, plane in sorted(masks, key=lambda item: order[item[0].part["binary_type"]]):
        part, binary_type = mask.part, mask.part["binary_type"]
        plane = render.upscale(plane, factor)
        empty = "" if plane.any() else " - empty here"
        color = render.label_color(mask.index + 1)
        if binary_type == "heatmap":
            palette = palettes[part["palette"]]
            rgb = render.overlay_heatmap(rgb, plane, palette)
            top = tuple(int(c) for c in render.palette_lut(palette)[255][:3])
            legend.append((f"heatmap {mask.name}, palette {part['palette']}{empty}", top))
        elif binary_type == "numeric_label_mask":
            colors = {int(k): render.label_color(int(k)) for k in part["label_map"] if int(k) != 0}
            rgb = render.overlay_labels(rgb, plane, colors)
            legend.append((f"{mask.name}{empty}", None))
            legend += [(f"  {k}: {part['label_map'][str(k)]}", c) for k, c in colors.items()]
        elif binary_type == "probability_mask":
            threshold = part.get("probability_threshold")
            drawn = plane > render.probability_cutoff(threshold)
            rgb = render.overlay_mask(rgb, drawn, color)
            rule = f"> {threshold} x 255" if threshold is not None else f"> {protocol.DEFAULT_DRAW_THRESHOLD}"
            legend.append((f"{mask.name} {rule}{'' if drawn.any() else ' - nothing drawn here'}", color))
        else:
            rgb = render.overlay_mask(rgb, plane.astype(bool), color)
            legend.append((f"{mask.name}{empty}", color))
    return rgb, legend


def render_image(image: InputImage, series: InputSeries, position: int, masks: Sequence[MaskPart],
                 response_json: dict, single_series: bool, plot_labels: bool) -> tuple[Image.Image, list[str]]:
    """The PNG of one input image with everything the response draws on it, and caption lines."""
    ds = pydicom.dcmread(image.path)
    notes: list[tuple[str, render.Color | None]] = []
    try:
        gray_or_rgb = render.window_image(ds)
    except Exception as exc:  # e.g. a compressed transfer syntax without its decoder installed
        gray_or_rgb = np.full((int(ds.Rows), int(ds.Columns)), 64, np.uint8)
        notes.append((f"pixels not shown: {type(exc).__name__}: {exc}", None))
    if gray_or_rgb.ndim == 2 and "WindowWidth" in ds and int(gray_or_rgb.max()) - int(gray_or_rgb.min()) < 64:
        notes.append(("note: the header's window leaves this image dark or flat; so will the viewer", None))
    factor = render.display_factor(*gray_or_rgb.shape[:2])
    rgb = render.upscale(render.to_rgb(gray_or_rgb), factor)
    rgb, legend = overlay_masks(rgb, _masks_for(masks, series, single_series, position, image),
                                response_json.get("palettes") or {}, factor)
    legend = notes + legend
    picture = Image.fromarray(rgb)
    sop = image.sop_instance_uid
    for box in response_json.get("bounding_boxes_2d") or []:
        if box["SOPInstanceUID"] == sop:
            render.draw_box(picture, box["top_left"], box["bottom_right"], box["label"], BOX_COLOR, factor)
            legend.append((f"box {box['label']}: {box['top_left']} - {box['bottom_right']}", BOX_COLOR))
    for item in response_json.get("linear_measurements_2d") or []:
        if item["SOPInstanceUID"] == sop:
            text = render.measurement_text(item["start"], item["end"], item.get("label", ""), ds.get("PixelSpacing"))
            render.draw_measurement(picture, item["start"], item["end"], text, MEASUREMENT_COLOR, factor)
            legend.append((f"measurement {text}", MEASUREMENT_COLOR))
    if plot_labels:
        if "study_ml_json" in response_json:
            legend.append((f"study: {format_result(response_json['study_ml_json'])}", None))
        series_result = (response_json.get("series_ml_json") or {}).get(series.uid)
        if series_result is not None:
            legend.append((f"series: {format_result(series_result)}", None))
    caption = [f"{position + 1}/{len(series.images)} · instance {ds.get('InstanceNumber', '?')} · {window_description(ds)}"]
    caption += [text.strip() for text, _ in legend]
    return render.add_panel(picture, legend), caption


def window_description(ds: Dataset) -> str:
    """How the image was windowed, for its caption (a header window can make an image look dark)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 or ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        return "colour"
    if center is not None and width is not None:
        return f"window {render.first_value(center):g}/{render.first_value(width):g} (header)"
    return "window min/max"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "series"


@dataclass
class Gallery:
    """What was written, for index.html and the summary."""

    series: list[tuple[InputSeries, list[tuple[str, list[str]]]]] = field(default_factory=list)
    dicom_parts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # dcm, png or "", caption
    masks: list[tuple[str, str]] = field(default_factory=list)  # npy file, description

    @property
    def png_count(self) -> int:
        return sum(len(items) for _, items in self.series) + sum(1 for _, png, _ in self.dicom_parts if png)


def clear_previous_output(output: Path) -> None:
    """Remove what an earlier run of the tool wrote there, so the gallery never shows stale pictures."""
    if not (output / "response.json").exists():
        return
    for pattern in ("response.json", "index.html", "output_masks_*.npy", "output_dicom_*"):
        for path in output.glob(pattern):
            path.unlink()
    shutil.rmtree(output / "images", ignore_errors=True)


def write_outputs(output: Path, result: InferenceResult, study: Study | None,
                  dicom_parts: dict[int, Dataset], plot_labels: bool) -> Gallery:
    """response.json, mask .npy files, DICOM parts (.dcm and .png) and one PNG per input image."""
    output.mkdir(parents=True, exist_ok=True)
    clear_previous_output(output)
    response_json = result.response_json
    (output / "response.json").write_text(json.dumps(response_json, indent=2) + "\n", encoding="utf-8")
    gallery = Gallery()
    masks = mask_parts(response_json, result.buffers)
    for mask in masks:
        name = f"output_masks_{mask.index}.npy"
        np.save(output / name, mask.array)
        gallery.masks.append((name, f"{mask.part['binary_type']} {mask.name}, shape {list(mask.array.shape)}"))
    for index, ds in dicom_parts.items():
        name = f"output_dicom_{index}"
        (output / f"{name}.dcm").write_bytes(result.buffers[index])
        caption = [f"part {index}: {response_json['parts'][index]['binary_type']}",
                   str(ds.get("SeriesDescription", "") or ds.get("SOPClassUID", ""))]
        png = ""
        if "PixelData" in ds:
            pixels = render.to_rgb(render.window_image(ds))
            Image.fromarray(render.upscale(pixels, render.display_factor(*pixels.shape[:2]))).save(
                output / f"{name}.png", compress_level=PNG_COMPRESSION)
            png = f"{name}.png"
        gallery.dicom_parts.append((f"{name}.dcm", png, caption))
    if study is None:
        return gallery
    single = len(study.series) == 1
    for number, series in enumerate(study.series, start=1):
        folder = Path("images") / f"{number:02d}-{_slug(series.description)}"
        (output / folder).mkdir(parents=True, exist_ok=True)
        items = []
        for position, image in enumerate(series.images):
            if not image.has_pixels:
                continue
            picture, caption = render_image(image, series, position, masks, response_json, single, plot_labels)
            name = (folder / f"{position + 1:04d}.png").as_posix()
            picture.save(output / name, compress_level=PNG_COMPRESSION)
            items.append((name, caption))
        gallery.series.append((series, items))
    return gallery


# -- index.html ----------------------------------------------------------------------------
PAGE_STYLE = """
body { font-family: sans-serif; background: #111; color: #ddd; margin: 1.5em; }
h1, h2 { font-weight: normal; } h2 small { color: #999; font-size: 60%; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; background: #1c1c1c; padding: 6px; width: 260px; }
figure img { width: 256px; image-rendering: pixelated; }
figcaption { font-size: 12px; line-height: 1.35; word-break: break-word; }
pre { background: #1c1c1c; padding: 1em; overflow: auto; font-size: 12px; }
a { color: #7cf; }
"""


def _figure(href: str, caption: Sequence[str]) -> str:
    text = "<br>".join(html.escape(line) for line in caption)
    return f'<figure><a href="{html.escape(href)}"><img src="{html.escape(href)}" loading="lazy" alt=""></a>' \
           f"<figcaption>{text}</figcaption></figure>"


def write_index(output: Path, gallery: Gallery, response_json: dict, summary: Sequence[str]) -> Path:
    """A self-contained gallery page (relative links): returned DICOM images, then each input series with
    its overlays, the mask files and the JSON response."""
    body = ["<h1>Inference test tool</h1>", "<p>" + "<br>".join(html.escape(line) for line in summary) + "</p>"]
    if gallery.dicom_parts:
        body.append("<h2>DICOM parts returned</h2><div class=\"grid\">")
        for dcm, png, caption in gallery.dicom_parts:
            link = f'<a href="{html.escape(dcm)}">{html.escape(dcm)}</a>'
            body.append(_figure(png, caption + [dcm]) if png else f"<figure>{link}<br>{'<br>'.join(map(html.escape, caption))}</figure>")
        body.append("</div>")
    for series, items in gallery.series:
        body.append(f"<h2>{html.escape(series.description)} <small>{html.escape(series.uid)} · "
                    f"{len(series.images)} images</small></h2>")
        body.append('<div class="grid">' + "".join(_figure(name, caption) for name, caption in items) + "</div>")
    if gallery.masks:
        body.append("<h2>Mask buffers</h2><ul>" + "".join(
            f'<li><a href="{html.escape(n)}">{html.escape(n)}</a>: {html.escape(d)}</li>' for n, d in gallery.masks) + "</ul>")
    body.append('<h2>Response JSON <small><a href="response.json">response.json</a></small></h2>')
    body.append(f"<pre>{html.escape(json.dumps(response_json, indent=2))}</pre>")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Inference test tool</title>"
            f"<style>{PAGE_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = output / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
