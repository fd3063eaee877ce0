"""Unit tests of inference/imaging/render.py: windowing, colour handling, palettes, thresholds and annotations."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.dicom.writing import series_from_volume
from inference.imaging import render

GREY = 100


def mr_image(values: np.ndarray, **attributes) -> object:
    """One MR dataset holding ``values`` (rows, columns) int16/uint16, with extra attributes set."""
    ds = series_from_volume(values[None])[0]
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def grey_rgb(rows: int = 9, columns: int = 9) -> np.ndarray:
    return np.full((rows, columns, 3), GREY, np.uint8)


# -- windowing -----------------------------------------------------------------------------
def test_without_window_the_range_is_min_to_max():
    assert render.window_values(np.array([10, 20, 30])).tolist() == [0, 128, 255]


def test_window_center_and_width_follow_the_dicom_linear_function():
    out = render.window_values(np.array([-1000, 49, 100, 151, 5000]), center=100, width=101)
    assert out[0] == 0 and out[1] == 0  # at or below the window's bottom
    assert out[3] == 255 and out[4] == 255
    assert 126 <= out[2] <= 129  # the centre maps to mid-grey


def test_window_image_uses_the_first_of_several_window_values():
    values = np.array([[0, 100], [200, 300]], np.int16)
    ds = mr_image(values, WindowCenter=[100, 1000], WindowWidth=[101, 10])
    out = render.window_image(ds)
    assert out[0, 0] == 0 and 127 <= out[0, 1] <= 129 and out[1].tolist() == [255, 255]


def test_rescale_is_applied_before_windowing():
    stored = np.array([[0, 25], [50, 75]], np.uint16)
    # real values: -100, -50, 0, 50; the window covers -49.5..48.5
    ds = mr_image(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=0, WindowWidth=99)
    out = render.window_image(ds)
    assert out[0, 0] == 0 and out[0, 1] == 0
    assert 126 <= out[1, 0] <= 129
    assert out[1, 1] == 255


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_int16_and_uint16_images_span_the_full_range(dtype):
    low = -500 if dtype == np.int16 else 0
    values = np.linspace(low, 3000, 12).astype(dtype).reshape(3, 4)
    out = render.window_image(mr_image(values))
    assert out.dtype == np.uint8 and out.shape == (3, 4)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotonic, no wrap-around


def test_monochrome1_is_inverted():
    values = np.array([[0, 10], [20, 30]], np.int16)
    normal = render.window_image(mr_image(values))
    inverted = render.window_image(mr_image(values, PhotometricInterpretation="MONOCHROME1"))
    assert inverted[0, 0] == 255 and inverted[1, 1] == 0
    assert (normal.astype(int) + inverted).tolist() == [[255, 255], [255, 255]]


def test_rgb_images_pass_through():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    ds = mr_image(np.zeros((2, 3), np.int16), SamplesPerPixel=3, PhotometricInterpretation="RGB",
                  BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0, PlanarConfiguration=0,
                  PixelData=rgb.tobytes())
    out = render.window_image(ds)
    assert out.shape == (2, 3, 3) and out[0, 0].tolist() == [255, 0, 0] and out[1, 2].tolist() == [0, 0, 0]


def test_palette_color_uses_the_lookup_tables():
    indices = np.array([[0, 1], [2, 3]], np.uint8)
    ds = mr_image(np.zeros((2, 2), np.int16), PhotometricInterpretation="PALETTE COLOR", BitsAllocated=8,
                  BitsStored=8, HighBit=7, PixelRepresentation=0, PixelData=indices.tobytes())
    lut = {"Red": [0, 65535, 0, 0], "Green": [0, 0, 65535, 0], "Blue": [0, 0, 0, 65535]}
    for colour, entries in lut.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array(entries, "<u2").tobytes())
    out = render.window_image(ds)
    assert out[0, 1].tolist() == [255, 0, 0]
    assert out[1, 0].tolist() == [0, 255, 0]
    assert out[1, 1].tolist() == [0, 0, 255]


def test_small_images_are_upscaled_and_large_ones_are_not():
    assert render.display_factor(51, 35) == 8  # 35 x 8 = 280 >= 256
    assert render.display_factor(512, 512) == 1
    assert render.display_factor(120, 512) == 2  # the long side stays under 1024
    assert render.upscale(np.array([[1, 2]]), 2).tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]


# -- overlays ------------------------------------------------------------------------------
def test_probability_mask_without_threshold_is_drawn_above_128():
    mask = np.array([127, 128, 129], np.uint8)
    assert (mask > render.probability_cutoff(None)).tolist() == [False, False, True]


def test_probability_threshold_is_respected():
    mask = np.array([51, 52], np.uint8)  # threshold 0.2 draws above 51
    assert (mask > render.probability_cutoff(0.2)).tolist() == [False, True]


def test_mask_overlay_is_translucent_inside_and_opaque_on_the_outline():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    out = render.overlay_mask(grey_rgb(), mask, (255, 0, 0), alpha=0.5)
    assert render.outline(mask).sum() == 16  # the ring of a 5 x 5 square
    assert out[2, 2].tolist() == [255, 0, 0]  # outline
    assert out[4, 4].tolist() == [178, 50, 50]  # fill: half grey, half red
    assert out[0, 0].tolist() == [GREY] * 3


def test_label_overlay_colours_each_label_and_leaves_background():
    labels = np.zeros((9, 9), np.uint8)
    labels[1:4, 1:4], labels[5:8, 5:8] = 1, 2
    colors = {1: render.label_color(1), 2: render.label_color(2)}
    out = render.overlay_labels(grey_rgb(), labels, colors, alpha=1.0)
    assert out[2, 2].tolist() == list(colors[1])
    assert out[6, 6].tolist() == list(colors[2])
    assert out[0, 8].tolist() == [GREY] * 3
    assert colors[1] != colors[2]


PALETTE = {"type": "anchorpoint", "data": [
    {"threshold": 0.0, "color": [0, 0, 255, 0]},
    {"threshold": 0.5, "color": [0, 255, 0, 128]},
    {"threshold": 1.0, "color": [255, 0, 0, 255]},
]}


def test_palette_interpolation_hits_the_anchor_points():
    lut = render.palette_lut(PALETTE)
    assert lut.shape == (256, 4)
    assert lut[0].tolist() == [0, 0, 255, 0]
    assert lut[255].tolist() == [255, 0, 0, 255]
    middle = lut[128]  # 128 / 255 is just above the 0.5 anchor
    assert middle[1] > 250 and middle[0] < 5 and 127 <= middle[3] <= 130
    quarter = lut[64]  # halfway between the first two anchors
    assert 60 <= quarter[3] <= 68 and 120 <= quarter[1] <= 135


# -- annotations ---------------------------------------------------------------------------
def test_box_is_drawn_around_its_pixels_at_the_display_scale():
    image = Image.new("RGB", (40, 40))
    render.draw_box(image, [2, 3], [5, 6], "", (255, 255, 0), factor=4)
    pixels = np.asarray(image)
    assert pixels[12, 8].tolist() == [255, 255, 0]  # top-left corner: (row 3, column 2) x 4
    assert pixels[27, 23].tolist() == [255, 255, 0]  # bottom-right: the last display pixel of (6, 5)
    assert pixels[20, 16].tolist() == [0, 0, 0]  # inside stays clear
    assert pixels[30, 30].tolist() == [0, 0, 0]


def test_measurement_length_uses_pixel_spacing_row_then_column():
    assert render.measurement_text([0, 0], [10, 0], "len", [0.5, 2.0]) == "len: 20.0 mm"
    assert render.measurement_text([0, 0], [0, 10], "len", [0.5, 2.0]) == "len: 5.0 mm"
    assert render.measurement_text([0, 0], [3, 4], "", None) == "5.0 px"


# -- a series' window: the header's when it shows the data, else percentiles ----------------------------
def test_a_header_window_that_shows_the_data_is_kept():
    values = np.linspace(0, 1000, 400).reshape(20, 20).astype(np.int16)
    ds = mr_image(values, WindowCenter=500, WindowWidth=1000)
    window = render.choose_window(values, ds)
    assert window.source == "header" and window.note == ""
    assert window.describe() == "window 500/1000 (header)"
    shown = render.display_image(ds, window)
    assert shown.min() == 0 and shown.max() == 255


def test_a_header_window_that_misses_the_data_falls_back_to_percentiles_with_one_note():
    # Study1's crop: values 5-114 under a header window of 470/950 look nearly black
    values = np.linspace(5, 114, 400).reshape(20, 20).astype(np.int16)
    ds = mr_image(values, WindowCenter=470, WindowWidth=950)
    window = render.choose_window(values, ds)
    assert window.source == "percentile"
    assert "window 470/950" in window.note and "percentile window" in window.note
    assert 50 < window.center < 70 and 100 < window.width < 115
    shown = render.display_image(ds, window)
    assert shown.min() == 0 and shown.max() == 255  # the data spans the grey scale
    header = render.apply_header_voi(render.apply_modality_lut(ds.pixel_array, ds), ds)
    assert int(header.max()) - int(header.min()) < 40  # what the header's window alone would show


def test_a_wide_ct_window_with_air_and_bone_is_kept():
    values = np.concatenate([np.full(200, -1000), np.linspace(0, 80, 150), np.full(50, 1500)]).reshape(20, 20)
    ds = mr_image(values.astype(np.int16), WindowCenter=40, WindowWidth=80)
    assert render.choose_window(values, ds).source == "header"


def test_without_a_header_window_the_percentiles_are_used_without_a_note():
    values = np.linspace(0, 100, 400).reshape(20, 20).astype(np.int16)
    window = render.choose_window(values, mr_image(values))
    assert window.source == "percentile" and window.note == ""


def test_a_voi_lut_sequence_is_applied_by_pydicom():
    from pydicom.dataset import Dataset
    values = np.array([[0, 1], [2, 3]], np.uint16)
    ds = mr_image(values)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = [0, 200, 100, 255]  # not monotonic: only a LUT gives this
    ds.VOILUTSequence = [item]
    assert render.apply_header_voi(values, ds).tolist() == [[0, 200], [100, 255]]


def test_monochrome1_is_inverted_through_the_chosen_window():
    values = np.linspace(0, 100, 400).reshape(20, 20).astype(np.int16)
    ds = mr_image(values, PhotometricInterpretation="MONOCHROME1")
    shown = render.display_image(ds, render.choose_window(values, ds))
    assert shown[0, 0] == 255 and shown[-1, -1] == 0


# -- overlays on a transparent layer -------------------------------------------------------------------
def test_painted_masks_are_translucent_fills_with_opaque_outlines():
    layer = render.transparent_layer(9, 9)
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    render.paint_mask(layer, mask, (255, 0, 0))
    picture = np.asarray(render.layer_image(layer))
    assert picture[0, 0, 3] == 0  # outside: transparent
    assert picture[2, 2].tolist() == [255, 0, 0, 255]  # the outline
    assert picture[4, 4, :3].tolist() == [255, 0, 0] and 95 <= picture[4, 4, 3] <= 110  # the fill, 40 %


def test_painted_heatmaps_keep_their_palette_colours_and_alpha():
    palette = {"type": "anchorpoints", "data": [{"threshold": 0.0, "color": [0, 0, 255, 0]},
                                                {"threshold": 1.0, "color": [255, 0, 0, 255]}]}
    layer = render.transparent_layer(1, 3)
    render.paint_heatmap(layer, np.array([[0, 128, 255]], np.uint8), palette)
    picture = np.asarray(render.layer_image(layer))
    assert picture[0, 0, 3] == 0 and picture[0, 2].tolist() == [255, 0, 0, 255]
    assert 126 <= picture[0, 1, 3] <= 130
