"""Draw what a viewer would show: windowed DICOM images with masks, heatmaps, boxes and lengths.

Pure numpy + Pillow, shared by the inference test tool and the reports. Images are uint8 RGB
arrays (rows, columns, 3); masks are arrays of the image's (rows, columns). Upscale image and
masks together with ``upscale`` before overlaying, then draw the vector annotations (boxes,
lines, text) with the same ``factor`` so their coordinates stay in source pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space

from inference.protocol.rules import DEFAULT_DRAW_THRESHOLD

Color = tuple[int, int, int]

#: Distinct, saturated colours for labels and mask parts; label value n uses LABEL_COLORS[(n - 1) % len].
LABEL_COLORS: tuple[Color, ...] = (
    (255, 64, 64), (64, 200, 255), (255, 210, 0), (80, 230, 80), (255, 120, 230),
    (255, 150, 40), (150, 110, 255), (0, 230, 190), (200, 255, 100), (255, 255, 255),
)
MIN_DISPLAY_SIDE = 256  # small images are upscaled until their short side reaches this
MAX_DISPLAY_SIDE = 1024  # ... unless their long side would pass this
MASK_ALPHA = 0.4


def label_color(value: int) -> Color:
    """The colour of label ``value`` (1, 2, ...) or of the n-th drawn part."""
    return LABEL_COLORS[(int(value) - 1) % len(LABEL_COLORS)]


# -- windowing -----------------------------------------------------------------------------
def first_value(value: Any) -> float | None:
    """A float from a possibly multi-valued DICOM element (its first value), None when absent."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    return None if value is None or value == "" else float(value)


def window_values(values: np.ndarray, center: float | None = None, width: float | None = None) -> np.ndarray:
    """Map real-world values to uint8 with the DICOM linear VOI window, or min..max without one."""
    values = np.asarray(values, np.float64)
    if center is None or width is None or width < 1:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        # PS3.3 C.11.2.1.2: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1]
        scaled = (values - (center - 0.5)) / max(width - 1, 1) + 0.5
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _frame(ds: Dataset, frame: int) -> np.ndarray:
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[frame]
    return pixels


def window_image(ds: Dataset, frame: int = 0) -> np.ndarray:
    """The image of ``ds`` as a viewer shows it by default: uint8 (rows, columns), or (rows, columns, 3) in colour.

    Monochrome: rescale slope/intercept (modality LUT), then Window Center/Width (first value
    when several) or min/max, MONOCHROME1 inverted. RGB, YBR and PALETTE COLOR become RGB.
    """
    pixels = _frame(ds, frame)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _to_uint8(apply_color_lut(pixels, ds), int(ds.RedPaletteColorLookupTableDescriptor[2]))
    bits = int(ds.get("BitsStored", 8) or 8)
    if photometric.startswith("YBR"):
        return _to_uint8(convert_color_space(pixels, photometric, "RGB"), bits)
    if pixels.ndim == 3:
        return _to_uint8(pixels, bits)
    values = apply_modality_lut(pixels, ds)
    out = window_values(values, first_value(ds.get("WindowCenter")), first_value(ds.get("WindowWidth")))
    return 255 - out if photometric == "MONOCHROME1" else out


def _to_uint8(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of ``bits`` bits as uint8, keeping their top 8 bits."""
    if bits > 8:
        rgb = np.asarray(rgb, np.uint32) >> (bits - 8)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 grey (rows, columns) image as RGB (rows, columns, 3); RGB passes through (copied)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image[:, :, :3].copy()


# -- scaling -------------------------------------------------------------------------------
def display_factor(rows: int, columns: int, min_side: int = MIN_DISPLAY_SIDE, max_side: int = MAX_DISPLAY_SIDE) -> int:
    """Integer upscaling factor so that the short side reaches ``min_side``, the long one staying under ``max_side``."""
    short, long = max(1, min(rows, columns)), max(1, rows, columns)
    return max(1, min(-(-min_side // short), max_side // long))


def upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of the first two axes by an integer factor."""
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


# -- overlays (numpy, on RGB arrays) -------------------------------------------------------
def outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` that touch a pixel outside it (4-neighbourhood), image border included."""
    mask = np.asarray(mask, bool)
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def blend(rgb: np.ndarray, where: np.ndarray, color: Sequence[float], alpha: float | np.ndarray) -> np.ndarray:
    """``rgb`` with ``color`` laid over the pixels ``where`` is true at opacity ``alpha`` (scalar or per pixel)."""
    out = rgb.astype(np.float32)
    weight = np.where(where, alpha, 0.0).astype(np.float32)[..., None]
    out = out * (1 - weight) + np.asarray(color, np.float32)[:3] * weight
    return np.rint(out).astype(np.uint8)


def overlay_mask(rgb: np.ndarray, mask: np.ndarray, color: Color, alpha: float = MASK_ALPHA) -> np.ndarray:
    """A boolean mask as a translucent fill with an opaque outline."""
    mask = np.asarray(mask, bool)
    out = blend(rgb, mask, color, alpha)
    return blend(out, outline(mask), color, 1.0)


def probability_cutoff(threshold: float | None) -> float:
    """The mask value a probability mask is drawn above: threshold x 255, or 128 without a threshold."""
    return DEFAULT_DRAW_THRESHOLD if threshold is None else float(threshold) * 255


def report_slices(labels: np.ndarray) -> list[int]:
    """Three slices (axis 0) for a report: at a quarter, half and three quarters of the slices holding a label,
    or of the whole volume when none does."""
    present = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if present.size:
        return [int(present[int(round(q * (present.size - 1)))]) for q in (0.25, 0.5, 0.75)]
    return [labels.shape[0] // 4, labels.shape[0] // 2, 3 * labels.shape[0] // 4]


def overlay_labels(rgb: np.ndarray, labels: np.ndarray, colors: Mapping[int, Color],
                   alpha: float = MASK_ALPHA) -> np.ndarray:
    """A label map: each value in ``colors`` filled and outlined in its colour (0 and others untouched)."""
    out = rgb
    for value, color in colors.items():
        region = labels == value
        if region.any():
            out = overlay_mask(out, region, color, alpha)
    return out


def palette_lut(palette: Mapping[str, Any]) -> np.ndarray:
    """A (256, 4) uint8 RGBA table of an anchor-point palette, interpolated linearly between anchors.

    Entry v is the colour of heatmap value v, i.e. of ``v / 255`` on the palette's 0..1 scale.
    """
    points = palette["data"]
    stops = np.array([p["threshold"] for p in points], np.float64)
    colors = np.array([p["color"] for p in points], np.float64)
    positions = np.arange(256) / 255.0
    channels = [np.interp(positions, stops, colors[:, c]) for c in range(4)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


# -- vector annotations (Pillow, on the upscaled image) -------------------------------------
@functools.lru_cache(maxsize=4)
def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (the bitmap font when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _text_with_shadow(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: Color) -> None:
    x, y = xy
    draw.text((x + 1, y + 1), text, fill=(0, 0, 0), font=font())
    draw.text((x, y), text, fill=color, font=font())


def draw_box(image: Image.Image, top_left: Sequence[float], bottom_right: Sequence[float], label: str,
             color: Color, factor: int = 1) -> None:
    """A bounding box given as ``[column, row]`` pixel corners (inclusive), with its label above it."""
    draw = ImageDraw.Draw(image)
    x0, y0 = top_left[0] * factor, top_left[1] * factor
    x1, y1 = (bottom_right[0] + 1) * factor - 1, (bottom_right[1] + 1) * factor - 1
    draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
    _text_with_shadow(draw, (x0 + 2, max(0, y0 - 17)), label, color)


def measurement_text(start: Sequence[float], end: Sequence[float], label: str,
                     pixel_spacing: Sequence[float] | None) -> str:
    """``label: 12.3 mm`` with PixelSpacing (row, column spacing), else the length in pixels."""
    d_col, d_row = end[0] - start[0], end[1] - start[1]
    if pixel_spacing:
        length = float(np.hypot(d_col * float(pixel_spacing[1]), d_row * float(pixel_spacing[0])))
        value = f"{length:.1f} mm"
    else:
        value = f"{float(np.hypot(d_col, d_row)):.1f} px"
    return f"{label}: {value}" if label else value


def draw_measurement(image: Image.Image, start: Sequence[float], end: Sequence[float], text: str,
                     color: Color, factor: int = 1) -> None:
    """A linear measurement between two ``[column, row]`` pixel centres, end ticks and its text."""
    draw = ImageDraw.Draw(image)
    (x0, y0), (x1, y1) = (((p[0] + 0.5) * factor, (p[1] + 0.5) * factor) for p in (start, end))
    draw.line((x0, y0, x1, y1), fill=color, width=2)
    for x, y in ((x0, y0), (x1, y1)):
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), outline=color, width=2)
    _text_with_shadow(draw, (min(x0, x1), min(y0, y1) + 6), text, color)


# -- a series' display window ----------------------------------------------------------------
#: Percentiles of a series' values that bound the window chosen when the header's misses the data.
PERCENTILE_WINDOW = (1.0, 99.5)
#: The header's window is used when the data's central 96 % spans at least this many grey levels in it.
MIN_HEADER_SPREAD = 64


@dataclass(frozen=True)
class SeriesWindow:
    """How a series is shown: its header's VOI (window or LUT) or a percentile window, and why."""

    source: str  # "header", "percentile", "colour" or "min/max"
    center: float | None = None
    width: float | None = None
    note: str = ""

    def describe(self) -> str:
        """``window 470/950 (header)``, ``window 58/110 (1-99.5 percentile)``, ``colour``..."""
        if self.center is None or self.width is None:
            return self.source
        label = "header" if self.source == "header" else f"{PERCENTILE_WINDOW[0]:g}-{PERCENTILE_WINDOW[1]:g} percentile"
        return f"window {self.center:.6g}/{self.width:.6g} ({label})"


def is_colour(ds: Dataset) -> bool:
    """Whether ``ds`` holds colour pixels (RGB, YBR or PALETTE COLOR), which take no window."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"


def _voi_output_range(ds: Dataset) -> tuple[float, float]:
    """The range of what ``pydicom.pixels.apply_voi_lut`` returns for ``ds`` (PS3.3 C.11.2.1.2 / C.11.1.1.1)."""
    if "VOILUTSequence" in ds and "WindowWidth" not in ds:
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)  # the LUT's own output range
    bits = int(ds.get("BitsStored", 16) or 16)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0) or 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def apply_header_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Real-world ``values`` through the header's VOI (first window, or VOI LUT) with pydicom, as uint8."""
    uses_lut = "VOILUTSequence" in ds and "WindowWidth" not in ds
    values = np.rint(values).astype(np.int64) if uses_lut else np.asarray(values, np.float64)  # a LUT indexes
    out = apply_voi_lut(values, ds, index=0, prefer_lut=False)
    low, high = _voi_output_range(ds)
    scaled = (np.asarray(out, np.float64) - low) / max(high - low, 1e-12)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def has_header_voi(ds: Dataset) -> bool:
    return ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds


def choose_window(sample: np.ndarray, ds: Dataset) -> SeriesWindow:
    """The window a series is shown with, judged once from a ``sample`` of its real-world values.

    The header's window (or VOI LUT) is kept when it shows the data: the data's 2nd-98th
    percentiles land at least ``MIN_HEADER_SPREAD`` grey levels apart in it. Otherwise (or
    without one) a window from the 1st to the 99.5th percentile, with a note saying why.
    """
    if is_colour(ds):
        return SeriesWindow("colour")
    sample = np.asarray(sample, np.float64).ravel()
    if sample.size == 0:
        return SeriesWindow("min/max")
    header = None
    if has_header_voi(ds):
        shown = apply_header_voi(np.percentile(sample, [2, 98]), ds)
        spread = abs(int(shown[1]) - int(shown[0]))
        center, width = first_value(ds.get("WindowCenter")), first_value(ds.get("WindowWidth"))
        if spread >= MIN_HEADER_SPREAD:
            return SeriesWindow("header", center, width)
        header = f"window {center:.6g}/{width:.6g}" if center is not None and width is not None else "VOI LUT"
    low, high = np.percentile(sample, PERCENTILE_WINDOW)
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    width = max(float(high - low), 1.0)
    center = float(low) + width / 2
    data = f"values {np.percentile(sample, 2):.6g}-{np.percentile(sample, 98):.6g}"
    note = (f"the header's {header} leaves this series' data ({data}) nearly flat, as a viewer would show it "
            "by default; shown with a percentile window instead" if header else "")
    return SeriesWindow("percentile", center, width, note)


def display_image(ds: Dataset, window: SeriesWindow, frame: int = 0) -> np.ndarray:
    """``ds`` as uint8 grey (rows, columns) through ``window``, or RGB for colour images."""
    if window.source == "colour" or is_colour(ds):
        return window_image(ds, frame)
    values = apply_modality_lut(_frame(ds, frame), ds)
    if window.source == "header":
        out = apply_header_voi(values, ds)
    else:
        out = window_values(values, window.center, window.width)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    return 255 - out if photometric == "MONOCHROME1" else out


# -- overlays on a transparent layer (RGBA), for pages that switch them on and off ---------------
def transparent_layer(rows: int, columns: int) -> np.ndarray:
    """An empty float32 RGBA layer (premultiplied colour, alpha in 0..1) of ``rows`` x ``columns``."""
    return np.zeros((rows, columns, 4), np.float32)


def _extent(where: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of the true pixels of a 2D boolean array (None when there are none)."""
    rows, columns = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
    if rows.size == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1)


def paint(layer: np.ndarray, where: np.ndarray, color: Sequence[float], alpha: float | np.ndarray) -> None:
    """Lay ``color`` over ``layer`` where ``where`` holds, at opacity ``alpha`` (scalar or per pixel), in place.

    Only the bounding box of ``where`` is computed: masks cover a small part of large images.
    """
    where = np.asarray(where, bool)
    box = _extent(where)
    if box is None:
        return
    alpha = alpha[box] if isinstance(alpha, np.ndarray) else alpha
    weight = np.where(where[box], alpha, 0.0).astype(np.float32)[..., None]
    region = layer[box]
    rgb = np.asarray(color, np.float32)[:3] / 255
    region[..., :3] = rgb * weight + region[..., :3] * (1 - weight)
    region[..., 3:] = weight + region[..., 3:] * (1 - weight)


def paint_mask(layer: np.ndarray, mask: np.ndarray, color: Color, alpha: float = MASK_ALPHA) -> None:
    """A boolean mask as a translucent fill with an opaque outline (as ``overlay_mask``), on a layer."""
    mask = np.asarray(mask, bool)
    box = _extent(mask)
    if box is None:
        return
    region, inside = layer[box], mask[box]  # the outline of the crop is the mask's: nothing lies outside it
    paint(region, inside, color, alpha)
    paint(region, outline(inside), color, 1.0)


def paint_labels(layer: np.ndarray, labels: np.ndarray, colors: Mapping[int, Color], alpha: float = MASK_ALPHA) -> None:
    """A label map, each value of ``colors`` filled and outlined in its colour, on a layer."""
    for value, color in colors.items():
        region = labels == value
        if region.any():
            paint_mask(layer, region, color, alpha)


def paint_heatmap(layer: np.ndarray, values: np.ndarray, palette: Mapping[str, Any]) -> None:
    """A heatmap in its palette's colours and alphas, on a layer (only where the palette is not transparent)."""
    lut = palette_lut(palette)
    values = np.asarray(values, np.uint8)
    box = _extent(lut[values, 3] > 0)
    if box is None:
        return
    rgba = lut[values[box]].astype(np.float32) / 255
    weight = rgba[..., 3:4]
    region = layer[box]
    region[..., :3] = rgba[..., :3] * weight + region[..., :3] * (1 - weight)
    region[..., 3:] = weight + region[..., 3:] * (1 - weight)


def layer_image(layer: np.ndarray) -> Image.Image:
    """A layer as a Pillow RGBA image (straight alpha), ready for vector annotations and PNG."""
    out = np.zeros(layer.shape, np.uint8)
    box = _extent(layer[..., 3] > 0)
    if box is not None:
        region = layer[box]
        alpha = region[..., 3:]
        rgb = np.divide(region[..., :3], alpha, out=np.zeros_like(region[..., :3]), where=alpha > 0)
        out[box] = np.rint(np.clip(np.concatenate([rgb, alpha], axis=2), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(out, "RGBA")
